"""Inpainting training masks: large random strokes and boxes, the LaMa-style masks LDM's inpainting model
trains on (Rombach et al. 2022 §4.5 and appendix: "the mask generation of LaMa", Suvorov et al. 2022).

Each mask is, with equal probability, either 1-5 thick brush strokes (each a polyline of 1-5 segments) or 1-3
axis-aligned boxes. Sizes are LaMa's "thick" setting at 256 px, scaled to the image side `s`: strokes up to
s·200/256 long per segment and s·(5..105)/256 wide, boxes with sides s·(30..150)/256 at least s·10/256 from
the border. A mask whose masked fraction falls outside [min_area, max_area] is drawn again (up to 50 tries,
then the last one is clipped to a box), so the area range is a guarantee, not a tendency.

Deterministic: every random number comes from the `generator` passed in (a CPU torch.Generator), so the same
seed gives the same masks on any device; `ldm-lightning fit` draws them from its per-step generator.
"""

from __future__ import annotations

import math

import torch

MIN_AREA, MAX_AREA = 0.1, 0.6
"""The masked fraction every mask falls in (training and the benchmark)."""


def _strokes(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """(h, w) bool: 1-5 polylines of thick segments (pixel centres within half the brush width)."""
    s = max(h, w) / 256  # LaMa's sizes are in pixels of 256² images
    rows = torch.arange(h, dtype=torch.float32)[:, None] + 0.5  # (h, 1) pixel centres
    cols = torch.arange(w, dtype=torch.float32)[None, :] + 0.5  # (1, w)
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(1 + int(torch.randint(5, (1,), generator=g))):
        y, x = float(torch.rand((), generator=g)) * h, float(torch.rand((), generator=g)) * w
        for _ in range(1 + int(torch.randint(5, (1,), generator=g))):
            u = torch.rand(3, generator=g)  # angle, length, brush width
            angle, length, width = 2 * math.pi * float(u[0]), s * (10 + 190 * float(u[1])), s * (5 + 100 * float(u[2]))
            y1 = min(max(y + length * math.cos(angle), 0.0), float(h))
            x1 = min(max(x + length * math.sin(angle), 0.0), float(w))
            dy, dx = y1 - y, x1 - x
            # distance of every pixel centre to the segment (x, y)-(x1, y1)
            t = (((rows - y) * dy + (cols - x) * dx) / max(dy * dy + dx * dx, 1e-9)).clamp(0, 1)  # (h, w)
            dist2 = (rows - y - t * dy) ** 2 + (cols - x - t * dx) ** 2
            mask |= dist2 <= (width / 2) ** 2
            y, x = y1, x1
    return mask


def _boxes(h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """(h, w) bool: the union of 1-3 boxes, sides in s·[30, 150]/256, kept s·10/256 from the border."""
    s = max(h, w) / 256
    margin = int(round(10 * s))
    lo, hi = max(1, int(round(30 * s))), max(1, int(round(150 * s)))
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(1 + int(torch.randint(3, (1,), generator=g))):
        u = torch.rand(4, generator=g)
        bh = min(lo + int(u[0] * (hi - lo + 1)), h - 2 * margin)
        bw = min(lo + int(u[1] * (hi - lo + 1)), w - 2 * margin)
        top = margin + int(u[2] * (h - 2 * margin - bh + 1))
        left = margin + int(u[3] * (w - 2 * margin - bw + 1))
        mask[top:top + bh, left:left + bw] = True
    return mask


def _fallback_box(h: int, w: int, area: float) -> torch.Tensor:
    """A centred box covering about `area` of the image (the rare mask no try brought into range)."""
    mask = torch.zeros(h, w, dtype=torch.bool)
    bh, bw = max(1, round(h * math.sqrt(area))), max(1, round(w * math.sqrt(area)))
    mask[(h - bh) // 2:(h - bh) // 2 + bh, (w - bw) // 2:(w - bw) // 2 + bw] = True
    return mask


def stroke_box_masks(n: int, h: int, w: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu", min_area: float = MIN_AREA,
                     max_area: float = MAX_AREA) -> torch.Tensor:
    """(n, 1, h, w) float masks (1 = to be generated), each masking a fraction in [min_area, max_area]."""
    if not 0 <= min_area < max_area <= 1:
        raise ValueError(f"mask area range must satisfy 0 <= min_area < max_area <= 1, got [{min_area}, {max_area}]")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    if g.device.type != "cpu":  # one seed from the caller's generator; the many small draws stay on the CPU
        g = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,), generator=g, device=g.device)))
    out = torch.zeros(n, 1, h, w)
    for i in range(n):
        for _ in range(50):
            m = _strokes(h, w, g) if float(torch.rand((), generator=g)) < 0.5 else _boxes(h, w, g)
            if min_area <= float(m.float().mean()) <= max_area:
                break
        else:
            m = _fallback_box(h, w, (min_area + max_area) / 2)
        out[i, 0] = m.float()
    return out.to(device)
