"""JPEG decoding through `torchvision.io.decode_jpeg` (`data.jpeg_decoder: torchvision`, the default).

Why: it decodes straight to a (3, H, W) uint8 array, the layout of a batch row, so the HWC→CHW copy and
PIL's image-object copies (crop, tobytes) go away, and the decode itself is faster
(benchmarks/bench_loader_foreign.py measures both, and the pixels: both libraries call libjpeg-turbo with
the same IDCT, and the measured largest difference on 256² photos is 0). Only 3-channel JPEGs that end with
their EOI marker take this path: anything else (grayscale, CMYK, a truncated or undecodable file) returns
None and is decoded by PIL, so bad samples are judged by the same decoder as before.
"""

from __future__ import annotations

import numpy as np
import torch

JPEG_DECODERS = ("torchvision", "pil")


def available() -> bool:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:  # noqa: BLE001 (torchvision missing or built without image support)
        return False
    return True


def decode_rgb(data: bytes) -> np.ndarray | None:
    """(3, H, W) uint8 of a complete 3-channel JPEG, or None (then PIL decodes it)."""
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):  # truncated: PIL's error names the sample
        return None
    from torchvision.io import ImageReadMode, decode_jpeg
    try:
        t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED)
    except Exception:  # noqa: BLE001
        return None
    return t.numpy() if t.shape[0] == 3 else None  # (3, H, W)
