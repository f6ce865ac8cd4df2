"""Per-sample decoding and geometry: raw shard bytes → uint8 (C, H, W) arrays, or a `BadSample` reason.

Float conversion to [-1, 1] happens once per batch (`ldm_lightning.images.to_model_range`) on the stacked uint8 tensor: in the
worker, or — `loader.normalize_on_device` (the default) — on the training device after the transfer.
All randomness (crop offset, flip) comes from the `numpy.random.Generator` the stream passes in,
which is seeded by the sample's position in the stream, so augmentation is part of the
deterministic, resumable stream.
"""

from __future__ import annotations

import io
from typing import Literal, get_args

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm_lightning.data.jpeg import decode_rgb
from ldm_lightning.data.pixels import to_mode

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")
ResizeMode = Literal["pad", "resize", "center_crop", "random_crop"]
RESIZE_MODES = get_args(ResizeMode)


class BadSample(Exception):
    """A sample that cannot be used (missing key, undecodable bytes, wrong size); the stream skips it."""


def image_key(sample: dict) -> str:
    for k in IMAGE_KEYS:
        if k in sample:
            return k
    raise BadSample(f"no image member (expected one of {', '.join(IMAGE_KEYS)}; has {sorted(k for k in sample if not k.startswith('__'))})")


_PIL_FORMATS = {"png": ("PNG",), "jpg": ("JPEG",), "jpeg": ("JPEG",), "webp": ("WEBP",)}


def open_image(data: bytes, key: str):
    """PIL image of a shard member (header parsed, pixels not yet decoded). The member's extension names the
    format, so PIL tries that plugin first: ~10% of a small PNG's decode is PIL probing plugins in turn.
    A member whose bytes do not match its extension still opens, through the full probe."""
    try:
        return Image.open(io.BytesIO(data), formats=_PIL_FORMATS.get(key))
    except UnidentifiedImageError:
        return Image.open(io.BytesIO(data))


def quick_check(ext: str | None, payload, kind: str, transform: "ImageTransform | None" = None) -> None:
    """What can be checked without decoding pixels (used to skip consumed samples on resume) of a stream
    record's payload (see stream.py): it exists, the image header parses, and (resize_mode='pad') the size
    fits. Every sample rejected here is also rejected by the full decode, so skip and play agree on batch
    boundaries except for the rare sample whose header is fine but whose pixel data is corrupt."""
    if ext is None:
        raise BadSample(missing_payload(kind, payload))
    if kind == "latent":
        return
    try:
        img = open_image(payload, ext)  # header only
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"undecodable {ext}: {type(e).__name__}: {e}") from None
    if transform is not None:
        transform.check_size(*img.size)


def missing_payload(kind: str, has: list[str]) -> str:
    if kind == "latent":
        return f"no 'moments.npy' member in a latent shard sample (has {has})"
    return f"no image member (expected one of {', '.join(IMAGE_KEYS)}; has {has})"


class ImageTransform:
    """Decode → channels → geometry → optional flip, into a uint8 (C, size, size) array.

    16-bit grayscale is scaled to 8 bits and alpha composited onto the gray level `background` (pixels.py)."""

    def __init__(self, image_size: int, channels: int, resize_mode: str, random_flip: bool, background: int = 255,
                 jpeg_decoder: str = "pil"):
        self.size, self.channels, self.mode, self.flip = image_size, channels, resize_mode, random_flip
        self.pil_mode = "L" if channels == 1 else "RGB"
        self.background = background
        self.jpeg_decoder = jpeg_decoder  # 'torchvision': 3-channel JPEGs decode to (3, H, W) there (data/jpeg.py)

    def __call__(self, sample: dict, rng: np.random.Generator | None) -> np.ndarray:
        """A WebDataset sample dict → a new uint8 (C, size, size) array."""
        k = image_key(sample)
        out = np.empty((self.channels, self.size, self.size), np.uint8)
        self.decode_into(sample[k], k, out, rng)
        return out

    def decode_into(self, data: bytes, ext: str, out: np.ndarray,
                    rng: np.random.Generator | None) -> tuple[int, int, int, int]:
        """Decode one image member into `out` (C, size, size) uint8, all of which is written (a batch buffer
        is reused). Nothing is written unless the decode succeeds: a BadSample leaves `out` as it was.

        Returns SDXL's crop conditioning (original_h, original_w, crop_top, crop_left): the source size,
        and the crop's top-left corner in the resized image (after a flip, as seen in the flipped image);
        (0, 0) for 'pad' and 'resize'."""
        chw = decode_rgb(data) if self.jpeg_decoder == "torchvision" and self.channels == 3 \
            and ext in ("jpg", "jpeg") else None  # (3, h, w) uint8, or None: PIL decodes
        if chw is None:
            try:
                img = open_image(data, ext)
                img.load()  # full decode: truncated data fails here
            except Exception as e:  # noqa: BLE001
                raise BadSample(f"undecodable {ext}: {type(e).__name__}: {e}") from None
            if img.mode != self.pil_mode:
                img = to_mode(img, self.pil_mode, self.background)  # MNIST 1→3 replicates the gray channel
            w, h = img.size
        else:
            h, w = chw.shape[1:]
        s = self.size
        self.check_size(w, h)
        top = left = 0
        crop = (h, w, 0, 0)
        if self.mode == "pad":
            top, left = (s - h) // 2, (s - w) // 2  # black border (→ -1): MNIST 28 → 32 with 2 px
        elif self.mode == "resize":
            if (w, h) != (s, s):
                img, chw = _as_pil(img if chw is None else chw).resize((s, s), Image.BICUBIC), None
        else:  # shorter side → s, then a center or random s×s crop (the LDM recipe)
            scale = s / min(w, h)
            nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
            if (nw, nh) != (w, h):
                img, chw = _as_pil(img if chw is None else chw).resize((nw, nh), Image.BICUBIC), None
            if self.mode == "random_crop" and rng is not None:
                x0, y0 = int(rng.integers(0, nw - s + 1)), int(rng.integers(0, nh - s + 1))
            else:
                x0, y0 = (nw - s) // 2, (nh - s) // 2
            if chw is None:
                img = img.crop((x0, y0, x0 + s, y0 + s))
            else:
                chw = chw[:, y0:y0 + s, x0:x0 + s]  # (3, s, s) view
            crop = (h, w, y0, x0)
        a = np.asarray(img) if chw is None else chw.transpose(1, 2, 0)  # (h, w) or (h, w, 3) uint8
        if self.flip and rng is not None and rng.random() < 0.5:
            a = a[:, ::-1]
            if self.mode in ("center_crop", "random_crop"):
                crop = (crop[0], crop[1], crop[2], nw - s - crop[3])  # the crop's left edge in the flipped image
        h, w = a.shape[:2]
        if (h, w) != (s, s):
            out[:] = 0  # the 'pad' border: black (→ -1)
        if a.ndim == 2:
            out[0, top:top + h, left:left + w] = a
        else:
            out[:, top:top + h, left:left + w] = a.transpose(2, 0, 1)  # (3, h, w)
        return crop

    def check_size(self, w: int, h: int) -> None:
        if self.mode == "pad" and (w > self.size or h > self.size):
            raise BadSample(f"{w}x{h} image is larger than image_size={self.size}; resize_mode='pad' only pads "
                            "(use 'resize' / 'center_crop' or re-pack with --size)")


def _as_pil(img) -> Image.Image:
    """A PIL image of a (3, H, W) uint8 array (a torchvision-decoded JPEG that needs resizing), or img itself."""
    return img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))


def decode_class_map(data: bytes | None, ext: str, size: int) -> np.ndarray:
    """A class map member (data.members.map_ext: one uint8 class id per pixel, e.g. `data pack --class-maps`) -> (size,
    size) uint8. Ids are labels, not intensities: never resized, so the map must already have the image's size."""
    if data is None:
        raise BadSample(f"no class map member {ext!r} (data.members.map_ext); re-pack with --class-maps")
    try:
        img = open_image(data, "png")
        img.load()
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"undecodable {ext}: {type(e).__name__}: {e}") from None
    if img.mode not in ("L", "P") or img.size != (size, size):
        raise BadSample(f"class map {ext} is {img.size[0]}x{img.size[1]} mode {img.mode}; it must be a {size}x{size} "
                        "8-bit single-channel PNG (one class id per pixel, the image's size)")
    return np.asarray(img, dtype=np.uint8)


def decode_moments(data: bytes) -> np.ndarray:
    """Latent shards: a `moments.npy` member → float32 (2c, h, w) = posterior mean ‖ logvar."""
    try:
        m = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise BadSample(f"undecodable moments.npy: {type(e).__name__}: {e}") from None
    if m.ndim != 3:
        raise BadSample(f"moments.npy must be (2c, h, w), got shape {m.shape}")
    return m.astype(np.float32, copy=False)
