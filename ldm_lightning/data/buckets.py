"""Aspect-ratio buckets (SDXL / NovelAI style): which (H, W) sizes a batch may have, which one a sample gets,
and how a sample is resized and cropped into it.

A bucket set holds sizes of about `target_pixels` pixels with sides that are multiples of `divisor` and an
aspect ratio within `max_aspect`: the square, then ever wider (and, mirrored, ever taller) sizes, each the
widest of its height. A sample goes to the bucket nearest to its aspect ratio on a log scale (so 2:1 and
1:2 are equally far from 1:1), read from the image header alone (no decode). Its image is scaled to
*cover* the bucket (the smaller scale that fills both sides) and cropped to it: center, or random with
`resize_mode: random_crop`; then optionally flipped. How buckets enter the exact, resumable epoch is
bucket_stream.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ldm_lightning.data.pixels import to_mode
from ldm_lightning.data.transforms import BadSample, open_image
from ldm_lightning.finite import check_finite_fields


@dataclass(frozen=True)
class BucketConfig:
    """`data.bucketing` of ShardDataModule (all optional): off when the key is absent or null."""

    target_pixels: int = 256 * 256
    """Pixels per image (H × W) each bucket comes close to without exceeding it; e.g. 1024² for SDXL."""
    divisor: int = 64
    """Every bucket side is a multiple of this: the autoencoder's downsampling × the backbone's patch (or
    its UNet's 2^levels), e.g. 64 for an f8 autoencoder and a DiT with 8-pixel (latent 1-patch) patches,
    16 for f8 × patch 2. Sides must divide by it or the model refuses the batch."""
    max_aspect: float = 2.0
    """Largest long side / short side of a bucket; wider images go to the most extreme bucket (cropped)."""
    header_cache: str | None = "auto"
    """Where the start-up counting pass keeps each shard's image sizes (header_cache.py), so that it reads
    every header once, not at every start or requeue: 'auto' = a `.ldm-bucket-headers/` folder beside the
    shards when writable, else `$LDM_LIGHTNING_CACHE/bucket-headers` (default ~/.cache/ldm-lightning/...;
    always there for http(s) and pipe: shards); a folder path; null = off (headers read at every start).
    Entries are keyed by shard path, size and mtime, so a rewritten shard is read again."""
    split_header_pass: bool = True
    """Under torch.distributed, split the counting pass: rank r handles shards r, r + world, ... (from the
    cache, or reading their headers) and the per-shard counts are all-gathered, so a first start reads the
    data once in all, not once per rank. Off: every rank handles every shard (no collective)."""

    def __post_init__(self):
        check_finite_fields(self, "data.bucketing")  # NaN/inf pass every comparison below
        if not (isinstance(self.divisor, int) and self.divisor >= 1):
            raise ValueError(f"data.bucketing.divisor must be an int >= 1; got {self.divisor!r}")
        if not (isinstance(self.target_pixels, int) and self.target_pixels >= self.divisor ** 2):
            raise ValueError(f"data.bucketing.target_pixels must be an int >= divisor² = {self.divisor ** 2}; "
                             f"got {self.target_pixels!r}")
        if not (isinstance(self.max_aspect, (int, float)) and self.max_aspect >= 1.0):
            raise ValueError(f"data.bucketing.max_aspect must be >= 1.0; got {self.max_aspect!r}")
        if not isinstance(self.split_header_pass, bool):
            raise ValueError(f"data.bucketing.split_header_pass must be true or false; got {self.split_header_pass!r}")
        if not (self.header_cache is None or (isinstance(self.header_cache, str) and self.header_cache)):
            raise ValueError(f"data.bucketing.header_cache must be 'auto', a folder or null; got {self.header_cache!r}")

    @classmethod
    def parse(cls, value: "dict | BucketConfig | None") -> "BucketConfig | None":
        if value is None or isinstance(value, BucketConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError("data.bucketing must be a mapping {target_pixels, divisor, max_aspect, header_cache, "
                             f"split_header_pass}} or null; got {value!r}")
        allowed = ("target_pixels", "divisor", "max_aspect", "header_cache", "split_header_pass")
        unknown = set(value) - set(allowed)
        if unknown:
            raise ValueError(f"data.bucketing: unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
        return cls(**value)

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_sizes(cfg: BucketConfig) -> list[tuple[int, int]]:
    """The bucket set: (H, W) pairs sorted by aspect W/H (tallest first), mirrored around the square."""
    d = cfg.divisor
    side = max(d, math.isqrt(cfg.target_pixels) // d * d)
    wide: dict[int, int] = {}  # height -> the widest width of that height
    w = side
    while True:
        h = cfg.target_pixels // w // d * d  # the tallest multiple of d with h × w <= target
        if h < d or w / h > cfg.max_aspect + 1e-9:
            break
        wide[h] = max(wide.get(h, 0), w)
        w += d
    sizes = {(h, w) for h, w in wide.items()} | {(w, h) for h, w in wide.items()}
    return sorted(sizes, key=lambda hw: (hw[1] / hw[0], hw[0]))


def size_of(ext: str | None, payload) -> tuple[int, int]:
    """(width, height) of an image member, from its header only; BadSample when there is none or it is unreadable."""
    if ext is None:
        raise BadSample(f"no image member (has {payload})")
    try:
        return open_image(payload, ext).size  # header only
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"undecodable {ext}: {type(e).__name__}: {e}") from None


class Buckets:
    """A bucket set, sample assignment and the resize-to-cover + crop into a bucket."""

    def __init__(self, cfg: BucketConfig, channels: int, random_crop: bool, flip: bool, background: int = 255):
        self.cfg, self.sizes = cfg, bucket_sizes(cfg)
        self.log_aspects = np.log(np.array([w / h for h, w in self.sizes]))  # (n_buckets,)
        self.channels, self.random_crop, self.flip, self.background = channels, random_crop, flip, background
        self.pil_mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.sizes)

    def nearest(self, w: int, h: int) -> int:
        """Index of the bucket nearest in log aspect to a w × h image (ties: the taller bucket)."""
        if w < 1 or h < 1:
            raise BadSample(f"image of size {w}x{h}")
        return int(np.argmin(np.abs(self.log_aspects - math.log(w / h))))

    def nearest_many(self, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        """`nearest` of many w × h sizes (all >= 1) at once: the same index for each, ties included (the same
        math.log and float64 differences; argmin takes the first minimum as the scalar one does)."""
        x = np.array([math.log(a / b) for a, b in zip(w.tolist(), h.tolist())], np.float64)  # (n,)
        return np.abs(self.log_aspects[None, :] - x[:, None]).argmin(axis=1) if len(x) else np.zeros(0, np.int64)

    def of_payload(self, ext: str | None, payload) -> int:
        """The bucket of an image member, from its header only."""
        return self.nearest(*size_of(ext, payload))

    def decode_into(self, data: bytes, ext: str, out: np.ndarray, rng: np.random.Generator | None) -> tuple:
        """Decode into `out` (C, H, W) uint8, a bucket's size: scale to cover, crop, optional flip. Nothing is
        written unless the decode succeeds. Returns (original_h, original_w, crop_top, crop_left) as
        transforms.ImageTransform.decode_into does (the crop's corner in the scaled, possibly flipped image)."""
        try:
            img = open_image(data, ext)
            img.load()
        except Exception as e:  # noqa: BLE001
            raise BadSample(f"undecodable {ext}: {type(e).__name__}: {e}") from None
        if img.mode != self.pil_mode:
            img = to_mode(img, self.pil_mode, self.background)
        (w, h), (H, W) = img.size, out.shape[1:]
        scale = max(H / h, W / w)  # cover: both sides reach the bucket's
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        if self.random_crop and rng is not None:
            x0, y0 = int(rng.integers(0, nw - W + 1)), int(rng.integers(0, nh - H + 1))
        else:
            x0, y0 = (nw - W) // 2, (nh - H) // 2
        a = np.asarray(img.crop((x0, y0, x0 + W, y0 + H)))  # (H, W) or (H, W, 3) uint8
        if self.flip and rng is not None and rng.random() < 0.5:
            a, x0 = a[:, ::-1], nw - W - x0
        out[:] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
        return h, w, y0, x0
