"""The `mnist-canvas` recipe of `ldm-lightning data pack`: several MNIST digits on one canvas, with their boxes
and (optionally) a per-pixel class map: data for layout-to-image and semantic synthesis (LDM §4.3).

    ldm-lightning data pack --source mnist-canvas --split train --limit 20000 --class-maps --out data/canvas/train

Each canvas (default 64x64, black) gets 2-4 digits drawn from the MNIST split; each digit is cropped to its ink
(pixels > 0), scaled so its longer side is 14-28 px and placed at a random position where it overlaps the digits
already there by at most a little (its box's IoU with each earlier box <= 0.1; later digits are drawn over earlier
ones where they do overlap, with max). Everything is drawn from a generator seeded by (--seed, canvas index), so a
canvas is the same whatever the shard split or worker count.

Per sample: `png` (the canvas), `json` {"boxes": [[class, x0, y0, x1, y1], ...] with coordinates in [0, 1] of the
canvas side (x to the right, y down; x1, y1 exclusive), "source", "width", "height"}, `txt` (e.g. "digits three,
seven, one") and, with --class-maps, `seg.png`: a uint8 map of the canvas size, 0 = background, 1 + digit where the
digit's ink (> 127) is; a later digit's ink wins where two overlap.
"""

from __future__ import annotations

import io
import json

import numpy as np

CANVAS_SIZE = 64
DIGITS_PER_CANVAS = (2, 4)
DIGIT_SIDE = (14, 28)  # the longer side of a placed digit, in canvas pixels
MAX_BOX_IOU = 0.1  # a new digit's box against each earlier one: room for each digit to be read
INK_THRESHOLD = 127  # a class-map pixel belongs to a digit where its ink is brighter than this
MAP_EXT = "seg.png"


def box_iou(a, b) -> float:
    """IoU of two (x0, y0, x1, y1) boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _ink_crop(digit: np.ndarray) -> np.ndarray:
    """A 28x28 MNIST digit cut to the rows and columns that hold ink."""
    rows, cols = np.nonzero(digit.max(1))[0], np.nonzero(digit.max(0))[0]
    return digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def compose_canvas(images: np.ndarray, labels: np.ndarray, seed: int, index: int, size: int = CANVAS_SIZE
                   ) -> tuple[np.ndarray, np.ndarray, list[list]]:
    """Canvas `index`: (image (size, size) uint8, class map (size, size) uint8, boxes [[class, x0, y0, x1, y1]])."""
    from PIL import Image

    rng = np.random.default_rng([seed, index])
    n = int(rng.integers(DIGITS_PER_CANVAS[0], DIGITS_PER_CANVAS[1] + 1))
    canvas = np.zeros((size, size), np.uint8)
    cmap = np.zeros((size, size), np.uint8)
    boxes: list[list] = []
    placed: list[tuple[int, int, int, int]] = []
    lo, hi = (max(4, round(s * size / CANVAS_SIZE)) for s in DIGIT_SIDE)
    for _ in range(n):
        i = int(rng.integers(len(labels)))
        ink = _ink_crop(images[i])
        side = int(rng.integers(lo, hi + 1))
        s = side / max(ink.shape)
        h, w = max(1, round(ink.shape[0] * s)), max(1, round(ink.shape[1] * s))
        tile = np.asarray(Image.fromarray(ink).resize((w, h), Image.BILINEAR))
        for _attempt in range(20):  # a free spot, or the last try (a crowded canvas overlaps a little more)
            x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            rect = (x0, y0, x0 + w, y0 + h)
            if all(box_iou(rect, p) <= MAX_BOX_IOU for p in placed):
                break
        placed.append(rect)
        np.maximum(canvas[y0:y0 + h, x0:x0 + w], tile, out=canvas[y0:y0 + h, x0:x0 + w])
        cmap[y0:y0 + h, x0:x0 + w][tile > INK_THRESHOLD] = 1 + int(labels[i])
        boxes.append([int(labels[i]), *(round(v / size, 4) for v in rect)])
    return canvas, cmap, boxes


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def encode_canvas(images: np.ndarray, labels: np.ndarray, split: str, seed: int, index: int, size: int,
                  class_maps: bool) -> tuple[str, dict[str, bytes]]:
    """(key, {member ext: bytes}) of canvas `index` of `split` (see the module docstring)."""
    from ldm_lightning.data.mnist import CLASS_NAMES

    canvas, cmap, boxes = compose_canvas(images, labels, seed, index, size)
    meta = {"source": f"mnist-canvas/{split}/{seed}/{index}", "width": size, "height": size, "boxes": boxes}
    sample = {"png": _png(canvas), "json": json.dumps(meta).encode(),
              "txt": ("digits " + ", ".join(CLASS_NAMES[b[0]] for b in boxes)).encode()}
    if class_maps:
        sample[MAP_EXT] = _png(cmap)
    return f"canvas-{split}-{index:07d}", sample
