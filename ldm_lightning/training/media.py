"""Image grids for the loggers: the one route both training stages take to show pictures.

`image_grid` tiles (N, C, H, W) images in [-1, 1] into one uint8 array; `log_image_grid` hands it to
the logger's `log_image` (W&B) when the logger has one, and otherwise writes a PNG under the run's
log directory, so a run with the CSV logger still leaves its pictures on disk.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 (rows*(H+pad)+pad, nrow*(W+pad)+pad, C) grid, filled row by row
    (`nrow` images a row; default ceil(sqrt(N))); the padding is black."""
    if images.dim() != 4:
        raise ValueError(f"image_grid expects (N, C, H, W) images; got shape {tuple(images.shape)}")
    a = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    a = a.permute(0, 2, 3, 1).numpy()                            # (N, H, W, C)
    n, h, w, c = a.shape
    nrow = max(1, min(nrow or math.ceil(math.sqrt(n)), n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y: y + h, x: x + w] = a[i]
    return grid


def log_image_grid(trainer, key: str, grid: np.ndarray, step: int, caption: str | None = None,
                   png_dir: str | None = "samples") -> Path | None:
    """Log `grid` (H, W, C) uint8 as `key` at `step`: through `trainer.logger.log_image` when it exists,
    else (unless `png_dir` is None) as `<log_dir>/<png_dir>/step_XXXXXXX.png`. Returns the PNG path."""
    logger = getattr(trainer, "logger", None)
    if logger is not None and hasattr(logger, "log_image"):
        kw = {"caption": [caption]} if caption else {}
        logger.log_image(key, [grid], step=step, **kw)
        return None
    if png_dir is None:
        return None
    from PIL import Image
    out = Path(trainer.log_dir or trainer.default_root_dir) / png_dir
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step_{step:07d}.png"
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
