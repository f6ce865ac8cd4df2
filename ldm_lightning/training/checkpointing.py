"""Writing checkpoints: atomically, every N steps, keeping the last K, and at the final step.

- `AtomicCheckpointIO` — a Lightning `CheckpointIO` plugin writing through `ldm_lightning.fileio`
  (temp file, fsync, rename, directory fsync): a SIGKILL / node loss / full disk mid-write leaves either
  the old file or the new one, never a half file under the real name. A full disk is a `DiskFullError`
  (a user error: one message naming the folder and the intact previous checkpoint, exit 2).
- `StepCheckpoint` — a `ModelCheckpoint` keeping the last K step checkpoints (`step=00001234.ckpt`) plus
  `last.ckpt` in `<default_root_dir>/checkpoints` (a fixed place: a new Slurm job or W&B run id in the
  same run directory finds them), and saving the final step when training ends for any reason
  but an error, so no trained step is in no checkpoint. At start-up it removes the temp files a kill
  mid-write left there; after each save it prunes the step files beyond the last K, also those an earlier
  process (a resume, a copied run folder) wrote.

- `checkpoint_dir(root)` — where a run's checkpoints live: `<root>/checkpoints` (the one spelling of it);
  `run_checkpoint_dir(trainer)` — where this trainer's run writes them (its StepCheckpoint's `dirpath`).

`ldm-lightning fit` adds both by default (training/cli_defaults.py), with `RNGStateCallback`
(training/rng_state.py) and `PreemptionCallback` (training/preemption.py); a config lists one to set
its options. Which checkpoint is valid and which one a resume loads: training/resume.py.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm_lightning.errors import UserError
from ldm_lightning.fileio import atomic_write
from ldm_lightning.training.resume import resolve_resume_checkpoint, say, valid_checkpoints

# The name `ldm_lightning.fileio.atomic_write` gives its temp file: `.<name>.<mkstemp's 8 characters>.tmp`.
TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")


def checkpoint_dir(root: str | os.PathLike) -> str:
    """Where the checkpoints of the run in `root` (its `trainer.default_root_dir`) live: `<root>/checkpoints`,
    a fixed place, so a new Slurm job or W&B run id in the same run directory finds them."""
    return os.path.join(os.fspath(root), "checkpoints")


class DiskFullError(UserError):
    """A checkpoint save ran out of space (ENOSPC / EDQUOT); the atomic writer left the previous file intact."""


def _out_of_space(exc: BaseException) -> bool:
    # torch.save into a Python file reports a failed write as "[enforce fail at inline_container.cc]
    # ... unexpected pos"; the OSError with the errno is in the chain (its __context__).
    seen = []
    while exc is not None and all(exc is not s for s in seen):
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_message(path: str | os.PathLike) -> str:
    """'no space left on <dir>; the previous checkpoint is intact' — with which one, checked, and the fix."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        previous = resolve_resume_checkpoint(directory, verbose=False)
    except Exception:  # no valid checkpoint there (then the message says so)
        previous = None
    if previous is not None:
        step = f" (global step {previous.global_step})" if previous.global_step is not None else ""
        kept = f"the previous checkpoint is intact: {os.path.basename(previous.path)}{step}"
    else:
        kept = "no earlier checkpoint of this run is there to keep (nothing was saved yet)"
    return (f"no space left on {directory} while saving {os.path.basename(path)} (it was not written); {kept}. "
            "Free space there (or move the run to a disk with room) and rerun the same command: it resumes "
            "from that checkpoint.")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a partial file at `path` (see `ldm_lightning.fileio.atomic_write`).
    Raises `DiskFullError` when the disk is full."""
    try:
        with atomic_write(path) as f:
            torch.save(obj, f)
    except Exception as e:
        if _out_of_space(e):
            raise DiskFullError(disk_full_message(path)) from e
        raise


def remove_stale_temp_files(directory: str | os.PathLike) -> list[str]:
    """Remove the temp files of atomic writes that a kill mid-write left in `directory` (only names of the
    `atomic_write` pattern, only directly in it; also the temp folders of sharded FSDP2 saves). Call it only while no other process writes there: at the
    start of a `fit`, on global rank 0, after the run folder's lock (training/run_lock.py) is taken."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in sorted(names):
        path = os.path.join(directory, name)
        if TEMP_NAME.fullmatch(name) and not os.path.islink(path) and os.path.isfile(path):
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
        elif TEMP_NAME.fullmatch(name) and not os.path.islink(path) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)  # a sharded (FSDP2) save's temp folder (training/fsdp2.py)
            removed.append(name + "/")
    return removed


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

    `Trainer.fit(ckpt_path="last")` with this callback resumes from the checkpoint in `dirpath` with the
    highest recorded step that passes `validate_checkpoint` (a truncated `last.ckpt` falls back to the
    next good file, with a message), and starts from scratch when there is none yet.
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
            self.dirpath = checkpoint_dir(trainer.default_root_dir)
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero:
            removed = remove_stale_temp_files(self.dirpath)
            if removed:
                say(f"removed {len(removed)} temp file(s) an interrupted save left in {self.dirpath}: "
                    f"{', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}")

    def step_files(self) -> dict[int, str]:
        """{step: path} of the step checkpoints in `dirpath` named by this callback's `filename` pattern
        (empty when the pattern has another field than the step: then only Lightning's own pruning runs)."""
        fields = re.findall(r"{[^}]*}", self.filename or "")
        if not self.dirpath or len(fields) != 1 or not fields[0].startswith("{step"):
            return {}
        head, tail = (self.filename or "").split(fields[0])
        pattern = re.compile(re.escape(head) + r"(\d+)" + re.escape(tail) + re.escape(self.FILE_EXTENSION))
        try:
            names = os.listdir(self.dirpath)
        except OSError:
            return {}
        return {int(m.group(1)): os.path.join(self.dirpath, n) for n in names if (m := pattern.fullmatch(n))}

    def prune_step_files(self, trainer) -> None:
        """Keep the newest `save_top_k` step files up to the current step. Lightning's own pruning knows only the
        files of the process that wrote them (or of the checkpoint's folder before a copy): after a resume
        the older ones stayed. Files of later steps (an abandoned branch after a resume from an older file)
        are left alone: they are overwritten when the run gets there."""
        if not trainer.is_global_zero or self.save_top_k < 1:
            return
        mine = sorted((s, p) for s, p in self.step_files().items() if s <= trainer.global_step)
        for _, path in mine[:-self.save_top_k]:
            trainer.strategy.remove_checkpoint(path)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self.prune_step_files(trainer)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        found = resolve_resume_checkpoint(self.dirpath or checkpoint_dir(trainer.default_root_dir))
        return {found.path} if found else set()

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # No periodic save inside a run of skipped non-finite steps: they change no weights, and rotating
        # them in would push out the good checkpoints a non-finite stop falls back to.
        if int(getattr(pl_module, "nonfinite_consecutive", 0)) > 0:
            return
        # Nor before a resumed run's first optimizer step: with gradient accumulation its first micro-batches
        # end at the resumed step, and saving there would overwrite the checkpoint it resumed from with a
        # mid-accumulation data position (an elastic resume's accumulation, run_topology.py).
        if trainer.global_step == self._start_step:
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
        """The valid checkpoint in `dirpath` with the highest recorded global step <= `step` (None if none)."""
        found, _ = valid_checkpoints(self.dirpath, verbose=False) if self.dirpath else ([], [])
        return next((str(i.path) for i in found if i.global_step is not None and i.global_step <= step), None)


def find_step_checkpoint(trainer) -> StepCheckpoint | None:
    """The run's `StepCheckpoint` (the CLI always adds one), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, StepCheckpoint)), None)


def run_checkpoint_dir(trainer) -> str:
    """Where this trainer's run writes checkpoints: its `StepCheckpoint`'s `dirpath`, else
    `checkpoint_dir(trainer.default_root_dir)`."""
    callback = find_step_checkpoint(trainer)
    return getattr(callback, "dirpath", None) or checkpoint_dir(trainer.default_root_dir)
