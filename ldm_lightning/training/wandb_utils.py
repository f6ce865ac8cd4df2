"""Deprecated module name, kept for one release: `PinnedWandbLogger` now lives in `training/wandb_logger.py`.

A config whose `trainer.logger.class_path` still reads `ldm_lightning.training.wandb_utils.PinnedWandbLogger`
keeps working; importing this module says once on stderr what to write instead.
"""

import sys

from ldm_lightning.training.wandb_logger import RUN_ID_FILE, PinnedWandbLogger, resolve_run_id

print("ldm-lightning: class_path ldm_lightning.training.wandb_utils.PinnedWandbLogger is deprecated and will be "
      "removed after the next release: it is now ldm_lightning.training.wandb_logger.PinnedWandbLogger",
      file=sys.stderr)

__all__ = ["RUN_ID_FILE", "PinnedWandbLogger", "resolve_run_id"]
