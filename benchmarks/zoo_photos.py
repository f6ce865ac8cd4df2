"""The compression zoo's second dataset: random 64x64 RGB crops of the photos bundled with scikit-image.

Training crops come from `TRAIN_PHOTOS`, evaluation crops from `EVAL_PHOTOS`, a photo the autoencoders
never see (held out by photo, not by region, so no evaluation crop overlaps a training one). Crops are
taken at the photos' native resolution, uniformly at random (seeded), in the project's [-1, 1] range.
Only images that ship inside the scikit-image wheel are used: nothing is downloaded.
"""

from __future__ import annotations

import torch

TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "hubble_deep_field", "immunohistochemistry")
EVAL_PHOTOS = ("rocket",)


def _photo(name: str) -> torch.Tensor:
    """skimage.data.<name>() as float (3, H, W) in [-1, 1]."""
    try:
        import skimage.data
    except ImportError as e:
        raise SystemExit("--data photos needs scikit-image (its bundled photos are the data set): "
                         "pip install 'scikit-image>=0.22' (the project's [test] extra has it)") from e
    a = getattr(skimage.data, name)()                                # (H, W, 3) uint8
    if a.ndim != 3 or a.shape[2] < 3:
        raise SystemExit(f"skimage.data.{name}() is not an RGB photo (shape {a.shape}); pick another")
    return torch.from_numpy(a[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)


def photo_crops(names: tuple[str, ...], n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n random size x size crops, drawn evenly over the photos `names`: float (n, 3, size, size) in [-1, 1]."""
    photos = [_photo(k) for k in names]
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        p = photos[i % len(photos)]                                  # (3, H, W)
        y = int(torch.randint(0, p.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(0, p.shape[2] - size + 1, (1,), generator=g))
        out[i] = p[:, y:y + size, x:x + size]
    return out


def load_photo_crops(train: int, evaluate: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(train crops from TRAIN_PHOTOS, evaluation crops from the held-out EVAL_PHOTOS)."""
    return photo_crops(TRAIN_PHOTOS, train, size, seed=0), photo_crops(EVAL_PHOTOS, evaluate, size, seed=1)
