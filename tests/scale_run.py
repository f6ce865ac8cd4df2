"""Helpers for the Scale tests: run `python -m ldm_lightning <subcommand> ...` in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TRAINER_CFG = REPO / "configs" / "trainer"


def cli_env(tmp_path, **extra) -> dict:
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
    })
    for k in ("WANDB_RUN_ID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_NNODES",
              "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(args: list[str], tmp_path, timeout: int = 300, check: bool = True, **env_extra):
    proc = subprocess.run([sys.executable, "-m", "ldm_lightning", *args], cwd=tmp_path, env=cli_env(tmp_path, **env_extra),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ldm-lightning {' '.join(args)} failed (rc={proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_yaml(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def tiny_stage(tmp_path, root: str = "run", **model_args) -> str:
    """A stage config for the tiny test module (tests/scale_tiny.py)."""
    init = ", ".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in {"width": 8, **model_args}.items())
    return write_yaml(tmp_path / "stage.yaml", f"""
model:
  class_path: scale_tiny.TinyModule
  init_args: {{{init}}}
data:
  class_path: scale_tiny.TinyData
trainer:
  default_root_dir: {tmp_path / root}
""")


def ckpt_every(tmp_path, n: int) -> str:
    """Trainer callbacks with a checkpoint every `n` steps (a test-size override of the config's)."""
    return write_yaml(tmp_path / "ckpt.yaml", f"""
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {n}, save_last: true, save_top_k: -1}}
    - class_path: ldm_lightning.training.telemetry.TelemetryCallback
""")
