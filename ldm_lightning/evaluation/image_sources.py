"""Image sets to score, read as uint8 batches: a folder of image files, WebDataset shards, or an `.npz`.

- folder: every .png/.jpg/.jpeg/.webp/.bmp below it (recursively), in sorted path order;
- shards: a directory with `manifest.json`, a `.tar` file, glob or brace pattern (`data/shards.py` specs),
  the image member of each sample (png/jpg/jpeg/webp);
- npz: an array of uint8 images (N, H, W, C) under `arr_0` — the format of ADM's sample and reference
  batches (`np.savez(path, samples)`), which DiT and EDM also write.

Gray images stay 1-channel (the MNIST extractor wants gray; the others repeat it to RGB, which equals
PIL's `convert("RGB")` of a gray image). Rank r of W reads items r, r + W, ... so ranks share the work.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ldm_lightning.errors import UserError

class UnreadableImageError(UserError, ValueError):
    """A file of the image set (by its name or shard member an image) that PIL cannot decode."""


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SHARD_IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def decode_image(data: bytes | str | os.PathLike) -> torch.Tensor:
    """An image file (bytes or path) → uint8 (C, H, W), C = 1 for gray images, else 3 (alpha dropped)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im = im.convert("L" if im.mode in _GRAY_MODES else "RGB")
            a = np.asarray(im)  # (H, W) or (H, W, 3) uint8
    except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError (an OSError), truncated data
        if isinstance(err, (FileNotFoundError, PermissionError)):
            raise
        where = "" if isinstance(data, bytes) else f"{os.fspath(data)}: "
        raise UnreadableImageError(f"{where}not a readable image ({type(err).__name__}: {err}); remove or replace "
                                   "the file, or score another set") from err
    return torch.from_numpy(a.copy()).reshape(a.shape[0], a.shape[1], -1).permute(2, 0, 1)  # (C, H, W)


def source_kind(spec: str) -> str:
    """'npz', 'shards' or 'folder' for an image-set spec; a clear error when it is none of them."""
    s = str(spec)
    p = Path(os.path.expanduser(s))
    if s.endswith(".npz"):
        if not p.is_file():
            raise FileNotFoundError(f"{s}: no such .npz file")
        return "npz"
    if p.is_dir():
        if (p / "manifest.json").is_file():
            return "shards"
        if any(f.suffix.lower() in IMAGE_EXTS for f in p.rglob("*")):
            return "folder"
        raise FileNotFoundError(f"{s}: a folder with neither image files ({', '.join(IMAGE_EXTS)}) nor a shard "
                                "manifest.json")
    if ".tar" in s or "{" in s or "*" in s:
        return "shards"
    raise FileNotFoundError(f"{s}: not an image folder, a shard spec (.tar / directory with manifest.json) or an "
                            ".npz of uint8 images")


def _npz_images(spec: str) -> np.ndarray:
    with np.load(spec) as z:
        if "arr_0" not in z.files:
            raise ValueError(f"{spec}: no 'arr_0' array of images (has {z.files}); an .npz image set holds uint8 "
                             "(N, H, W, C) under arr_0 as ADM's evaluator expects")
        a = z["arr_0"]
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"{spec}: arr_0 must be uint8 (N, H, W, 1|3); got {a.dtype} {a.shape}")
    return a


def iter_images(spec: str, rank: int = 0, world: int = 1, limit: int | None = None) -> Iterator[torch.Tensor]:
    """uint8 (C, H, W) images of `spec`: those with index % world == rank among the first `limit`."""
    kind = source_kind(spec)
    take = lambda i: (limit is None or i < limit) and i % world == rank  # noqa: E731
    if kind == "npz":
        a = _npz_images(spec)
        for i in range(rank, len(a) if limit is None else min(limit, len(a)), world):
            yield torch.from_numpy(a[i]).permute(2, 0, 1).contiguous()  # (C, H, W)
    elif kind == "folder":
        root = Path(os.path.expanduser(spec))
        files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTS and f.is_file())
        for i, f in enumerate(files[:limit]):
            if take(i):
                yield decode_image(f)
    else:
        from ldm_lightning.data import resolve_shards
        from ldm_lightning.data.tario import iter_samples
        i = 0
        for shard in resolve_shards(spec):
            for sample in iter_samples(shard.url):
                if limit is not None and i >= limit:
                    return
                key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
                if key is None:
                    raise ValueError(f"{shard.url}: sample {sample['__key__']!r} has no image member "
                                     f"({'/'.join(SHARD_IMAGE_KEYS)}); is this a latent shard?")
                if take(i):
                    try:
                        image = decode_image(sample[key])
                    except UnreadableImageError as err:
                        raise UnreadableImageError(f"{shard.url}: sample {sample['__key__']!r}: {err}") from err
                    yield image
                i += 1


def iter_batches(spec: str, batch_size: int, rank: int = 0, world: int = 1,
                 limit: int | None = None) -> Iterator[torch.Tensor]:
    """This rank's images of `spec` as uint8 (B, C, H, W) batches (streamed: a 50k set never sits in memory)."""
    batch: list[torch.Tensor] = []
    count = 0
    for x in iter_images(spec, rank, world, limit):
        if batch and x.shape != batch[0].shape:
            raise ValueError(f"{spec}: images of different sizes/channels ({tuple(batch[0].shape)} and "
                             f"{tuple(x.shape)}); score one size at a time (resize or crop them first)")
        batch.append(x)
        if len(batch) == batch_size:
            yield torch.stack(batch)  # (B, C, H, W)
            count, batch = count + len(batch), []
    if batch:
        yield torch.stack(batch)
    elif count == 0 and world == 1:
        raise ValueError(f"{spec}: no images")


__all__ = ["IMAGE_EXTS", "UnreadableImageError", "decode_image", "iter_batches", "iter_images", "source_kind"]
