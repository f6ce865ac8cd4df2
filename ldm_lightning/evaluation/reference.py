"""Reference statistics files (`.npz`): what generated images are scored against without the real images.

Keys, read and written:
- `mu` (D,), `sigma` (D, D): the FID Gaussian — the keys of pytorch-fid's, torch-fidelity's and ADM's
  reference files, so their published statistics load here unchanged (FID only needs these two);
- `features` (N, D) float32 (written by `--save-stats`): the real features themselves, which KID and
  precision/recall need (an (N, D) sample cannot be recovered from mu/sigma);
- `extractor`, `num_images`: which extractor made them and from how many images — a file made with
  another extractor is refused instead of giving a meaningless number;
- `arr_0`: ADM's reference batches also carry the real images; `evaluate` extracts features from them
  when KID or precision/recall are asked for and no `features` are stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .scores import feature_statistics


@dataclass
class ReferenceStats:
    """Statistics of a real image set, as loaded from / saved to an `.npz`."""

    mu: np.ndarray
    """Feature mean (D,)."""
    sigma: np.ndarray
    """Feature covariance (D, D)."""
    features: np.ndarray | None = None
    """The (N, D) features themselves, when stored (needed by KID and precision/recall)."""
    extractor: str | None = None
    """Name of the extractor that made them (None: a foreign file that does not say; assumed Inception)."""
    num_images: int | None = None
    """How many images the statistics come from."""
    path: str = ""
    """The file they were read from (for messages)."""

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, extractor: str) -> "ReferenceStats":
        f = features.cpu().float().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float32)
        mu, sigma = feature_statistics(f)
        return cls(mu, sigma, f, extractor, len(f))


def save_reference(stats: ReferenceStats, path: str | os.PathLike) -> Path:
    """Write `stats` to `path` (.npz; written to a temporary name and renamed: never half-written)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"reference statistics are an .npz file; got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": stats.mu, "sigma": stats.sigma, "extractor": np.array(stats.extractor or ""),
              "num_images": np.array(stats.num_images or 0)}
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_reference(path: str | os.PathLike, extractor: str | None = None) -> ReferenceStats:
    """Read an `.npz` with `mu` and `sigma` (ours, pytorch-fid's, torch-fidelity's or ADM's); refuse one made
    by another extractor than `extractor` when the file says which made it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path}: no such file (make one from real images with "
                                "`ldm-lightning evaluate --images REAL --save-stats FILE.npz`)")
    with np.load(path) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {z.files}); a reference-statistics file "
                             "holds the feature mean and covariance as pytorch-fid / ADM / --save-stats write them")
        name = str(z["extractor"]) if "extractor" in z.files else None
        stats = ReferenceStats(z["mu"].astype(np.float64), z["sigma"].astype(np.float64),
                               z["features"] if "features" in z.files else None, name or None,
                               int(z["num_images"]) if "num_images" in z.files else None, str(path))
    if extractor is not None and stats.extractor is not None and stats.extractor != extractor:
        raise ValueError(f"{path} was made with the {stats.extractor!r} extractor, not {extractor!r}: scores "
                         f"across extractors mean nothing; pass --extractor {stats.extractor} or remake the file")
    return stats


def reference_images_in(path: str | os.PathLike) -> bool:
    """Whether an `.npz` also carries the real images (`arr_0`, as ADM's reference batches do)."""
    with np.load(path) as z:
        return "arr_0" in z.files


__all__ = ["ReferenceStats", "load_reference", "reference_images_in", "save_reference"]
