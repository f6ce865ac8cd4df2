"""Writing checkpoints: atomically, every N steps, keeping the last K, and at the final step.

- `AtomicCheckpointIO` — a Lightning `CheckpointIO` plugin writing through `ldm_lightning.fileio`
  (temp file, fsync, rename, directory fsync): a SIGKILL / node loss / full disk mid-write leaves either
  the old file or the new one, never a half file under the real name.
- `StepCheckpoint` — a `ModelCheckpoint` keeping the last K step checkpoints (`step=00001234.ckpt`) plus
  `last.ckpt` in `<default_root_dir>/checkpoints` (a fixed place: a new Slurm job or W&B run id in the
  same run directory finds them), and saving the final step when training ends for any reason
  but an error, so no trained step is in no checkpoint.

`ldm-lightning fit` adds both by default (training/fault_tolerance.py), with `RNGStateCallback`
(training/rng_state.py) and `PreemptionCallback` (training/preemption.py); a config lists one to set
its options. Which checkpoint a resume loads: training/resume.py.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm_lightning.fileio import atomic_write
from ldm_lightning.training.resume import (CorruptCheckpointError, list_checkpoints, resolve_resume_checkpoint,
                                           validate_checkpoint)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a partial file at `path` (see `ldm_lightning.fileio.atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a checkpoint file so that `dst` is complete or absent."""
    with open(src, "rb") as fin, atomic_write(dst) as fout:
        shutil.copyfileobj(fin, fout, length=16 << 20)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning `CheckpointIO` that writes local checkpoints atomically (see module docstring).

    Remote URLs (s3://, gs://, ...) fall back to Lightning's own transactional writer.
    Use: `Trainer(plugins=[AtomicCheckpointIO()])` (the CLI adds it by default).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}; "
                            "it takes none (pass them to a custom CheckpointIO instead)")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


class StepCheckpoint(ModelCheckpoint):
    """Keep the last `keep_last_k` step checkpoints and `last.ckpt`; save the final step at train end.

    `Trainer.fit(ckpt_path="last")` with this callback resumes from the newest checkpoint in `dirpath`
    that passes `validate_checkpoint` (a truncated `last.ckpt` falls back to the previous good file, with
    a message), and starts from scratch when there is none yet.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_train_steps: int = 1000,
                 keep_last_k: int = 3, save_final: bool = True, filename: str = "step={step:08d}",
                 enable_version_counter: bool = False, **kwargs):
        """
        Args:
            dirpath: Checkpoint directory (default: `<trainer.default_root_dir>/checkpoints`).
            every_n_train_steps: Save every this many optimizer steps.
            keep_last_k: How many step checkpoints to keep (plus `last.ckpt`).
            save_final: Save the final step when training ends (max_steps, max_epochs, early stop,
                a preemption stop), unless that step is already saved.
            filename: Step checkpoint name pattern.
            enable_version_counter: False: overwrite `last.ckpt` instead of writing `last-v1.ckpt`.
            kwargs: Other `ModelCheckpoint` arguments (`monitor`, `mode`, `save_top_k`, `save_last` are fixed).
        """
        if every_n_train_steps < 1:
            raise ValueError(f"StepCheckpoint.every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if keep_last_k < 1:
            raise ValueError(f"StepCheckpoint.keep_last_k must be >= 1, got {keep_last_k}")
        fixed = {"monitor", "mode", "save_top_k", "save_last", "auto_insert_metric_name"} & kwargs.keys()
        if fixed:
            raise ValueError(f"StepCheckpoint sets {sorted(fixed)} itself; use ModelCheckpoint to choose them")
        # monitor="step" with mode="max" is Lightning's way to say "the K most recent".
        super().__init__(dirpath=dirpath, filename=filename, monitor="step", mode="max", save_top_k=keep_last_k,
                         every_n_train_steps=every_n_train_steps, save_last=True, auto_insert_metric_name=False,
                         enable_version_counter=enable_version_counter, **kwargs)
        self.save_final = save_final
        self._start_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        found = resolve_resume_checkpoint(self.dirpath or os.path.join(trainer.default_root_dir, "checkpoints"))
        return {found.path} if found else set()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # No periodic save inside a run of skipped non-finite steps: they change no weights, and rotating
        # them in would push out the good checkpoints a non-finite stop falls back to.
        if int(getattr(pl_module, "nonfinite_consecutive", 0)) > 0:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def save_now(self, trainer) -> str:
        """Save this step as a step checkpoint and `last.ckpt` now (all ranks call it); returns last's path."""
        candidates = self._monitor_candidates(trainer)
        if self._last_global_step_saved != trainer.global_step:
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        return self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)

    def on_train_end(self, trainer, pl_module) -> None:
        # Lightning saves only every N steps: without this the last steps of a run are in no checkpoint.
        if self.save_final and trainer.global_step > self._start_step and not trainer.sanity_checking:
            self.save_now(trainer)
        super().on_train_end(trainer, pl_module)

    def newest_before(self, step: int) -> str | None:
        """The newest valid checkpoint in `dirpath` whose global step is <= `step` (None if there is none)."""
        for path in list_checkpoints(self.dirpath) if self.dirpath else []:
            try:
                ckpt = validate_checkpoint(path)
            except CorruptCheckpointError:
                continue
            if ckpt and int(ckpt["global_step"]) <= step:
                return str(path)
        return None


def find_step_checkpoint(trainer) -> StepCheckpoint | None:
    """The run's `StepCheckpoint` (the CLI always adds one), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)
