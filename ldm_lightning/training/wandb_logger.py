"""Weights & Biases: one run per job, whatever the number of restarts.

A Slurm job that is preempted and requeued (or a run resumed with `ckpt_path: last`) must keep logging
into the SAME W&B run, or its curves end up split over many runs. The run id is therefore pinned:

  1. `$WANDB_RUN_ID` when set (explicit wins);
  2. else derived from Slurm: `slurm-<SLURM_ARRAY_JOB_ID>_<SLURM_ARRAY_TASK_ID>` for array tasks,
     `slurm-<SLURM_JOB_ID>` otherwise — both survive `scontrol requeue`;
  3. else a random id stored in `<save_dir>/wandb_run_id.txt`, re-read by a resume in the same dir.

and the run is opened with `resume="allow"` (continue if it exists, create otherwise). Offline mode
(`offline: true` or `WANDB_MODE=offline`) needs no network; `wandb sync <dir>` uploads later.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

RUN_ID_FILE = "wandb_run_id.txt"
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def resolve_run_id(save_dir: str | os.PathLike, env: dict | None = None) -> str:
    """The pinned W&B run id for a run writing into `save_dir` (see the module docstring for the order)."""
    env = os.environ if env is None else env
    if env.get("WANDB_RUN_ID"):
        return env["WANDB_RUN_ID"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    path = Path(save_dir) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    new_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    try:  # O_EXCL: if two processes race, exactly one id is written and both read it back.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(new_id + "\n")
    except FileExistsError:
        pass
    run_id = path.read_text().strip()
    if not run_id:
        raise ValueError(f"{path} is empty: delete it (a new W&B run id is then created) or write a run id into it")
    return run_id


class PinnedWandbLogger(WandbLogger):
    """`WandbLogger` whose run id is pinned across Slurm requeues and resumes (see `resolve_run_id`).

    Same arguments as `lightning.pytorch.loggers.WandbLogger` (`project`, `entity`, `name`, `tags`,
    `offline`, `save_dir`, `log_model`, ...); `id` overrides the pinned id, `resume` defaults to "allow".
    """

    def __init__(self, save_dir: str = "runs", id: str | None = None, resume: str = "allow", **kwargs):
        if id is None and kwargs.get("version") is None:
            id = resolve_run_id(save_dir)
        super().__init__(save_dir=save_dir, id=id, resume=resume, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning always passes the key; wandb warns on it
            self._wandb_init.pop("anonymous", None)
