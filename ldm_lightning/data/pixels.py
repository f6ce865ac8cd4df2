"""PIL image modes → 8-bit L / RGB / RGBA, shared by the loader (transforms.py) and `data pack` (torch-free).

Two conversions PIL gets wrong for training data when asked for `convert("L")` / `convert("RGB")`:
- 16-bit grayscale (`I;16*`, or `I` from a 16-bit PNG) is clipped at 255, so a typical 16-bit image comes
  out nearly white. Here it is scaled: v → round(v / 257) (0 → 0, 65535 → 255).
- Alpha is dropped, leaving whatever colour the transparent pixels happen to store (often black). Here it
  is composited onto a background (white by default, as image viewers show it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_8bit(img: "Image.Image") -> "Image.Image":
    """16-bit (and 32-bit integer) grayscale → 8-bit L by scaling, not clipping; other modes unchanged."""
    if img.mode not in SIXTEEN_BIT_MODES:
        return img
    a = np.asarray(img).astype(np.float64)  # (h, w)
    return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), mode="L")


def has_alpha(img: "Image.Image") -> bool:
    return img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)


def flatten_alpha(img: "Image.Image", background: int) -> "Image.Image":
    """Composite an image with alpha onto a uniform gray `background` (0–255): RGB (or L for LA)."""
    if not has_alpha(img):
        return img
    gray = img.mode in ("LA", "La")
    img = img.convert("LA" if gray else "RGBA")
    bg = Image.new(img.mode, img.size, (background, 255) if gray else (background,) * 3 + (255,))
    return Image.alpha_composite(bg.convert("RGBA"), img.convert("RGBA")).convert("L" if gray else "RGB")


def to_mode(img: "Image.Image", mode: str, background: int = 255) -> "Image.Image":
    """Any PIL image → `mode` ('L' or 'RGB'): 16-bit scaled, alpha composited onto `background`."""
    img = flatten_alpha(to_8bit(img), background)
    return img if img.mode == mode else img.convert(mode)
