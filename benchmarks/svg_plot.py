"""A line plot as a standalone SVG file, with no plotting library (matplotlib is not a dependency of this project):
one x axis, up to two y axes (left and right), a marker on every point and a value label on it. Used by the
benchmarks that put a plot in the docs (posthoc_ema_mnist.py)."""

from __future__ import annotations

from pathlib import Path

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 360, 70, 70, 40, 50
COLOURS = ("#1f77b4", "#d62728")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / (n - 1) if hi > lo else 1.0
    return [lo + i * step for i in range(n)]


def line_plot(path: str | Path, title: str, x_label: str, xs: list[float],
              series: list[tuple[str, list[float]]], log_x: bool = False) -> Path:
    """Write `series` ([(label, ys)], one or two: the second gets the right-hand axis) over `xs` to `path`."""
    import math
    fx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    x0, x1 = min(map(fx, xs)), max(map(fx, xs))
    px = lambda v: PAD_L + (fx(v) - x0) / ((x1 - x0) or 1) * (W - PAD_L - PAD_R)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="11"><rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
           f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 10}" text-anchor="middle">{x_label}</text>',
           f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="black"/>']
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{x:g}</text>')
    for i, (label, ys) in enumerate(series[:2]):
        lo, hi = min(ys), max(ys)
        lo, hi = lo - 0.05 * (hi - lo or 1), hi + 0.05 * (hi - lo or 1)
        py = lambda v: H - PAD_B - (v - lo) / (hi - lo) * (H - PAD_T - PAD_B)  # noqa: E731
        axis_x, anchor, dx = (PAD_L, "end", -6) if i == 0 else (W - PAD_R, "start", 6)
        c = COLOURS[i]
        out.append(f'<line x1="{axis_x}" y1="{PAD_T}" x2="{axis_x}" y2="{H - PAD_B}" stroke="{c}"/>')
        for t in _ticks(lo, hi):
            out.append(f'<text x="{axis_x + dx}" y="{py(t) + 4:.1f}" text-anchor="{anchor}" fill="{c}">{t:.3g}</text>')
        out.append(f'<text x="{axis_x}" y="{PAD_T - 8}" text-anchor="middle" fill="{c}">{label}</text>')
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{c}"/>')
    out.append("</svg>\n")
    path = Path(path)
    path.write_text("\n".join(out))
    return path
