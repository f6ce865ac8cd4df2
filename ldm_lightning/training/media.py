"""Image grids for the loggers: the one route both training stages take to show pictures.

`image_grid` (ldm_lightning/images.py) tiles (N, C, H, W) images in [-1, 1] into one uint8 array;
`log_image_grid` hands it to the logger's `log_image` (W&B) when the logger has one, and otherwise writes a
PNG under the run's log directory, so a run with the CSV logger still leaves its pictures on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ldm_lightning.images import save_png


def log_image_grid(trainer, key: str, grid: np.ndarray, step: int, caption: str | None = None,
                   png_dir: str | None = "samples") -> Path | None:
    """Log `grid` (H, W, C) uint8 as `key` at `step`: through `trainer.logger.log_image` when it exists,
    else (unless `png_dir` is None) as `<log_dir>/<png_dir>/step_XXXXXXX.png`. Returns the PNG path."""
    logger = getattr(trainer, "logger", None)
    if logger is not None and hasattr(logger, "log_image"):
        kw = {"caption": [caption]} if caption else {}
        logger.log_image(key, [grid], step=step, **kw)
        return None
    if png_dir is None:
        return None
    return save_png(grid, Path(trainer.log_dir or trainer.default_root_dir) / png_dir / f"step_{step:07d}.png")
