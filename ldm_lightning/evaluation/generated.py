"""Features of image sets read or sampled in shares by the ranks, gathered so every rank holds all of them.

Used by `ldm-lightning evaluate` and by the in-training `SampleQualityCallback`. Each rank makes exactly one
collective call (`all_gather_object`) per image set; when sampling, every rank first draws the same number of
chunks, so the ranks reach that call together.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ldm_lightning.errors import UserError
from ldm_lightning.images import save_png, to_hwc_uint8, to_uint8

from .image_sources import iter_batches


def gather_in_order(part: list[tuple[int, torch.Tensor]]) -> list[torch.Tensor]:
    """Every rank's [(global index, tensor)] → all tensors in global-index order, on every rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, [(i, t.cpu()) for i, t in part])
        part = [x for p in parts for x in p]
    return [t for _, t in sorted(part, key=lambda x: x[0])]


# ---------------------------------------------------------------------------------------------- features


def features_of_images(extractor, spec: str, batch_size: int, limit: int | None, rank: int, world: int):
    """(features (N, D), logits (N, K) | None) of an image set, read in shares by the ranks."""
    part = []
    for k, batch in enumerate(iter_batches(spec, batch_size, rank, world, limit)):
        f, lg = extractor(batch)  # (B, D), (B, K) | None
        part.append((k * world + rank, (f.cpu(), None if lg is None else lg.cpu())))
    # Rank r's k-th batch holds items r, r + W, ...: concatenating in batch-index order then regrouping
    # keeps each rank's items together; the scores do not depend on the order of the items.
    parts = gather_in_order([(i, torch.cat([f, lg], 1) if lg is not None else f) for i, (f, lg) in part])
    if not parts:
        raise ValueError(f"{spec}: no images")
    allf = torch.cat(parts)
    d = extractor.dim
    return allf[:, :d], (allf[:, d:] if allf.shape[1] > d else None)


def _condition(conditioner, start: int, n: int, prompts: list[str] | None) -> dict:
    kind = conditioner.cfg.kind
    if kind == "class":
        return {"labels": [(start + i) % conditioner.cfg.num_classes for i in range(n)]}
    if kind == "text":
        if not prompts:
            raise ValueError("this model is text-conditional: give --prompts FILE (one prompt a line)")
        return {"prompts": [prompts[(start + i) % len(prompts)] for i in range(n)]}
    if kind == "layout":
        raise UserError("this model is layout-conditional, and evaluate draws no layouts: sample them with "
                        "`ldm-lightning sample --layout FILE --out DIR` and evaluate that folder of images")
    return {}


def features_of_samples(extractor, sample_fn, conditioner, num: int, batch_size: int, seed: int, rank: int,
                        world: int, prompts: list[str] | None = None, save_dir: str | None = None):
    """Sample `num` images in chunks (chunk c: seed + 2c, drawn by rank c % world) and extract their features.

    sample_fn(n, seed, **condition) -> (n, C, H, W) images in [-1, 1]. Every rank draws the same number of
    chunks (the last ones may be surplus and are dropped) so no rank waits at the gather for another."""
    chunks = -(-num // batch_size)
    per_rank = -(-chunks // world)
    part = []
    for j in range(per_rank):
        c = j * world + rank
        start = c * batch_size
        images = sample_fn(batch_size, seed + 2 * c, **_condition(conditioner, start, batch_size, prompts))
        u8 = to_uint8(images.cpu())  # (B, C, H, W), as the PNGs hold them
        f, lg = extractor(u8)
        if save_dir is not None and start < num:
            for i, img in enumerate(to_hwc_uint8(u8[: num - start])):  # (H, W, C) each
                save_png(img, Path(save_dir) / f"{start + i:06d}.png")
        part.append((c, torch.cat([f.cpu(), lg.cpu()], 1) if lg is not None else f.cpu()))
    allf = torch.cat(gather_in_order(part))[:num]
    d = extractor.dim
    return allf[:, :d], (allf[:, d:] if allf.shape[1] > d else None)


__all__ = ["features_of_images", "features_of_samples", "gather_in_order"]
