"""Pixels in one place: the image contract, uint8 <-> [-1, 1], one image grid, PNG read / write.

Every network input is float (B, C, H, W) in [-1, 1]. Pixels are normalised in one place, the DataModule
(`ShardDataModule.model_inputs`, run by its `on_after_batch_transfer`, through `to_model_range`); the models
only check (`model_range`): a uint8 batch reaching a model means a loader was read outside a Trainer, where
converting silently would hide a second, diverging normalisation path. On the way out, `to_uint8` is what a
PNG of an image holds, `image_grid` tiles a batch into one picture (validation grids, `sample`'s grid.png,
the demo's grids) and `save_png` / `read_png` write and read them.

Low on purpose: torch, numpy and (lazily) PIL only, so data/, autoencoder/, diffusion/, evaluation/ and
training/ all import it. Decoding foreign source files (16-bit, alpha, PIL modes) is ingest, not this
contract: data/pixels.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------- uint8 -> [-1, 1]
# uint8 value v -> v / 127.5 - 1 in float32, the same two float32 operations an elementwise pass does.
_MODEL_RANGE_LUT = (np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)).astype(np.float32)
_DEVICE_LUTS: dict[torch.device, torch.Tensor] = {}


def to_model_range(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] → float32 tensor in [-1, 1] (0 → -1, 255 → +1, exactly), on x's device.

    One gather through a 256-entry table, so every device gives bitwise the same values (CUDA's divide by a
    scalar multiplies by the reciprocal, which is not exact). On the CPU it is done in numpy on purpose: faster
    than astype + divide + subtract, and it does not use torch's multi-threaded elementwise kernels, which are
    far slower on an oversubscribed CPU (both measured: benchmarks/README.md)."""
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8:
            raise TypeError(f"to_model_range expects uint8 pixels, got {x.dtype}")
        if x.device.type != "cpu":
            if x.device not in _DEVICE_LUTS:
                _DEVICE_LUTS[x.device] = torch.from_numpy(_MODEL_RANGE_LUT).to(x.device)
            return _DEVICE_LUTS[x.device][x.long()]
        x = x.numpy()
    if x.dtype != np.uint8:
        raise TypeError(f"to_model_range expects uint8 pixels, got {x.dtype}")
    return torch.from_numpy(np.take(_MODEL_RANGE_LUT, x))


def ensure_model_range(x: torch.Tensor) -> torch.Tensor:
    """Images as a model takes them: uint8 batches (ShardDataModule with loader.normalize_on_device, used without a
    Trainer) are converted with `to_model_range`; float images are already in [-1, 1] and pass through."""
    return to_model_range(x) if x.dtype == torch.uint8 else x


def model_range(x: torch.Tensor) -> torch.Tensor:
    """x unchanged when it is a floating-point image batch; a TypeError naming the fix when it is raw pixels."""
    if not torch.is_floating_point(x):
        raise TypeError(f"images must be float in [-1, 1], got {x.dtype} pixels: a ShardDataModule loader read "
                        "outside a Trainer yields uint8 images; pass each batch through the DataModule's "
                        "`model_inputs(batch)` (or build it with loader={'normalize_on_device': False})")
    return x


# ---------------------------------------------------------------------------------------------- [-1, 1] -> uint8
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images (..., C, H, W) in [-1, 1] → uint8 in [0, 255], same layout and device (what a PNG of them
    holds: values outside [-1, 1] clip); uint8 passes through."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_hwc_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] → (N, H, W, C) uint8 numpy: one array per image as `save_png` takes it."""
    return to_uint8(images.detach().cpu()).permute(0, 2, 3, 1).numpy()


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) grid, filled row by row
    (`nrow` images a row; default ceil(sqrt(N)), at most N); the padding is black."""
    if images.dim() != 4:
        raise ValueError(f"image_grid expects (N, C, H, W) images; got shape {tuple(images.shape)}")
    a = to_hwc_uint8(images)                                      # (N, H, W, C)
    n, h, w, c = a.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y: y + h, x: x + w] = a[i]
    return grid


# ---------------------------------------------------------------------------------------------- PNG
def save_png(a: np.ndarray, path: str | os.PathLike) -> Path:
    """Write one (H, W, C) uint8 array (C = 1: grayscale, 3: RGB) as a PNG, creating its folder; returns the path."""
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(path)
    return path


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10, padding: int = 2) -> Path:
    """Save images (N, 1|3, H, W) in [-1, 1] as one PNG grid (`image_grid`), `nrow` images per row, filled row by
    row. Pass samples sorted by class with `nrow` = samples per class to get one row per class."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid expects (N, 1|3, H, W) images; got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"save_grid nrow must be >= 1; got {nrow}")
    return save_png(image_grid(images, nrow, padding), path)


def read_png(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """A PNG -> (channels, H, W) float in [-1, 1] (1: grayscale, 3: RGB)."""
    from PIL import Image
    with Image.open(path) as img:
        a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    a = a[..., None] if a.ndim == 2 else a  # (H, W, C)
    return to_model_range(np.ascontiguousarray(a.transpose(2, 0, 1)))  # (C, H, W)


__all__ = ["ensure_model_range", "image_grid", "model_range", "read_png", "save_grid", "save_png", "to_hwc_uint8",
           "to_model_range", "to_uint8"]
