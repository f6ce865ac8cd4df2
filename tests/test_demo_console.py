"""The demo's console: third-party noise a user can do nothing about is dropped, real warnings stay."""

from __future__ import annotations

import subprocess
import sys

CODE = r'''
import logging, warnings
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from ldm_lightning.demo import quiet_console
from ldm_lightning.training.wandb_logger import PinnedWandbLogger
logging.basicConfig(level=logging.INFO)
quiet_console()
warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", FutureWarning)
warnings.warn("LightningCLI's args parameter is intended to run from within Python like if it were from the command line")
rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://x)")
rank_zero_warn("a real warning stays")
logger = PinnedWandbLogger(save_dir="/tmp", offline=True, id="x")
print("anonymous" in logger._wandb_init)
'''


def test_quiet_console_drops_only_the_noise():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "a real warning stays" in err
    for noise in ("LeafSpec", "args parameter", "litlogger"):
        assert noise not in err, err
    assert r.stdout.strip() == "False"  # wandb warns "anonymous setting has no effect" whenever the key is passed
