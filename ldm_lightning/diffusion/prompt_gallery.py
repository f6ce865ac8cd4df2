"""The fixed prompt gallery: prompts from the config or a file, sampled with the same seeds at every validation (and
by `ldm-lightning sample --prompts-file`), at the training size or, with aspect buckets, at every bucket's size.

One grid per set of weights: a row per prompt, and per bucket (data/buckets.py order: tallest to widest) the same
`per` seeds as columns; images are centred on a black canvas of the largest bucket height and width, so the grid
stays one regular image. Column k of a bucket is the same noise for every prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm_lightning.errors import UserError
from ldm_lightning.images import image_grid

from .sampling import sample_images


class PromptsFileError(UserError, ValueError):
    """A prompts file that cannot be read or holds no prompt."""


def read_prompts_file(path: str | Path, option: str) -> list[str]:
    """One prompt a line (UTF-8; surrounding spaces stripped, blank lines skipped) of the file `option` names."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptsFileError(f"{option} {str(path)!r}: cannot read it ({type(e).__name__}: {e}); give a UTF-8 "
                               "text file with one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptsFileError(f"{option} {str(path)!r} holds no prompt; write one prompt a line")
    return prompts


def gallery_latent_shapes(latent_shape: list[int], factor: int, bucketing: dict | None) -> list[list[int]]:
    """The latent (c, h, w) of each gallery column group: the trained one, or each aspect bucket's."""
    if not bucketing:
        return [list(latent_shape)]
    from ldm_lightning.data.buckets import BucketConfig, bucket_sizes
    return [[latent_shape[0], h // factor, w // factor] for h, w in bucket_sizes(BucketConfig.parse(bucketing))]


def on_canvas(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, h, w) images in [-1, 1] centred on a black (-1) (N, C, height, width) canvas."""
    n, c, h, w = images.shape
    out = torch.full((n, c, height, width), -1.0, dtype=images.dtype, device=images.device)
    top, left = (height - h) // 2, (width - w) // 2
    out[:, :, top:top + h, left:left + w] = images
    return out


@torch.no_grad()
def gallery_grid(denoiser, conditioner, autoencoder, shapes: list[list[int]], prompts: list[str], per: int,
                 sampling) -> np.ndarray:
    """The uint8 grid of `prompts` (rows) x `shapes` x `per` seeds (columns)."""
    f = autoencoder.downsample_factor
    height, width = max(s[1] for s in shapes) * f, max(s[2] for s in shapes) * f
    rows = []
    for p in prompts:
        for shape in shapes:  # the same seed per cell group: column k is the same noise for every prompt
            images = sample_images(denoiser, conditioner, autoencoder, list(shape), per, sampling, prompts=[p] * per)
            rows.append(on_canvas(images.float().cpu(), height, width))
    return image_grid(torch.cat(rows), nrow=per * len(shapes))
