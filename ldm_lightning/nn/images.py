"""The image contract every network input obeys: float (B, C, H, W) in [-1, 1].

Pixels are normalised in one place, the DataModule (`ShardDataModule.model_inputs`, run by its
`on_after_batch_transfer`); the models only check. A uint8 batch reaching a model means a loader was read
outside a Trainer, where converting silently here would hide a second, diverging normalisation path."""

from __future__ import annotations

import torch


def model_range(x: torch.Tensor) -> torch.Tensor:
    """x unchanged when it is a floating-point image batch; a TypeError naming the fix when it is raw pixels."""
    if not torch.is_floating_point(x):
        raise TypeError(f"images must be float in [-1, 1], got {x.dtype} pixels: a ShardDataModule loader read "
                        "outside a Trainer yields uint8 images; pass each batch through the DataModule's "
                        "`model_inputs(batch)` (or build it with normalize_on_device=False)")
    return x
