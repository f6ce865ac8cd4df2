"""Checkpoints that survive being killed at any instant, and a resume that skips broken ones.

Three pieces, all wired in by default by the training CLI:

- `AtomicCheckpointIO` — a Lightning `CheckpointIO` plugin. A checkpoint is written to a temp file in
  the target's directory, flushed, fsync'ed, renamed over the target (`os.replace` is atomic on POSIX),
  then the directory is fsync'ed so the rename itself is durable. A SIGKILL / node loss / full disk
  mid-write leaves either the old file or the new one, never a half file under the real name.
- `RNGStateCallback` — saves and restores the torch CPU/CUDA, numpy and python global RNG states.
  Training noise in this project comes from `TrainingModule.step_generator` (a pure function of the
  step) so it does not need them; user code, augmentations and dropout that use global generators do.
- `StepCheckpoint` — a `ModelCheckpoint` keeping the last K step checkpoints plus `last.ckpt`, whose
  `ckpt_path="last"` resolution validates candidates and falls back to the newest good one.

`resolve_resume_checkpoint(dir_or_path)` is the same resolution for callers (CLI, sbatch scripts).
Validation is `torch.load(mmap=True, weights_only=...)` + the expected top-level keys: it catches the failure modes of
crashes (truncated files, empty files, missing zip central directory, non-checkpoint pickles), not
random bit flips inside tensor data.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ldm_lightning.fileio import atomic_write

# Top-level keys every full-state Lightning training checkpoint has.
REQUIRED_KEYS = ("state_dict", "global_step", "epoch", "loops", "optimizer_states", "lr_schedulers")
CKPT_SUFFIX = ".ckpt"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded or lacks the keys a resume needs."""


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` that never leaves a partial file at `path` (see `ldm_lightning.fileio.atomic_write`)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning `CheckpointIO` that writes local checkpoints atomically (see module docstring).

    Remote URLs (s3://, gs://, ...) fall back to Lightning's own transactional writer.
    Use: `Trainer(plugins=[AtomicCheckpointIO()])`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}; "
                            "it takes none (pass them to a custom CheckpointIO instead)")
        if not _is_local(path):
            return super().save_checkpoint(checkpoint, path)
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))


# --- RNG states ----------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of this process: torch CPU (+ every CUDA device), numpy, python."""
    algo, keys, pos, has_gauss, cached = np.random.get_state()
    # Tensors and plain Python values only: Lightning loads checkpoints with torch.load(weights_only=True)
    # (torch >= 2.6 default), which rejects numpy arrays.
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"algo": str(algo), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["algo"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(cuda)} devices but "
                          f"{torch.cuda.device_count()} are visible; CUDA RNG states not restored")


class RNGStateCallback(L.Callback):
    """Saves the global RNG states of every rank into the checkpoint and restores them on resume.

    Each rank's state is gathered (ranks differ: Lightning seeds workers per rank) and stored as a list
    indexed by global rank; a resume with a different world size keeps the current states and warns.

    When to restore matters for exactness. Creating a DataLoader iterator draws one number from the
    global torch generator (its worker base seed). The uninterrupted run creates one at each epoch
    start; the resumed run creates one in `setup_data`, before training. So:
    - checkpoint taken mid-epoch (the usual case): the uninterrupted run draws nothing between the
      save and the next batch, so the states are restored at `on_train_start`, after the resumed
      run's extra iterator creation;
    - checkpoint taken after the last batch of an epoch: the uninterrupted run then starts a new
      epoch (one draw); the resumed run's iterator creation is that draw, so the states are restored
      at load time, before it.
    """

    def __init__(self):
        self._pending = None

    def state_key(self) -> str:
        return "RNGStateCallback"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        mine = capture_rng_state()
        states = [mine]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, mine)
        epoch_loop = trainer.fit_loop.epoch_loop
        at_epoch_end = bool(epoch_loop.batch_progress.is_last_batch) or (
            epoch_loop.batch_progress.current.processed >= trainer.num_training_batches)
        checkpoint["rng_states"] = {"ranks": states, "at_epoch_end": at_epoch_end}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("rng_states")
        self._pending = None
        if not saved:
            return
        if len(saved["ranks"]) != trainer.world_size:
            warnings.warn(f"checkpoint holds RNG states for {len(saved['ranks'])} ranks, this run has "
                          f"{trainer.world_size}; global RNG states not restored")
            return
        state = saved["ranks"][trainer.global_rank]
        if saved["at_epoch_end"]:
            restore_rng_state(state)
        else:
            self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


# --- validation and resume resolution ------------------------------------------------------------

def validate_checkpoint(path: str | os.PathLike, weights_only: bool = False) -> dict[str, Any]:
    """Load `path` (memory-mapped, on CPU) and check the keys a full resume needs.

    Returns the loaded checkpoint; raises `CorruptCheckpointError` naming the file and the reason.
    `weights_only=False` by default: our own checkpoints hold hyper-parameters (dataclass configs) that
    the restricted unpickler rejects; pass True for files from untrusted sources.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"checkpoint {path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise CorruptCheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as e:  # zip/pickle errors come in many types; all mean "unusable"
        raise CorruptCheckpointError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CorruptCheckpointError(
            f"checkpoint {path} lacks {missing} (a weights-only export, or not a Lightning training checkpoint)")
    return ckpt


def _step_of(path: Path) -> int | None:
    m = re.search(r"step=(\d+)", path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in `directory`, newest first (modification time; ties: higher step, then `last`)."""
    d = Path(directory)
    files = [p for p in d.iterdir() if p.suffix == CKPT_SUFFIX and p.is_file() and not p.name.startswith(".")]

    def key(p: Path):
        return (p.stat().st_mtime_ns, _step_of(p) or -1, p.name.startswith("last"))

    return sorted(files, key=key, reverse=True)


def resolve_resume_checkpoint(dir_or_path: str | os.PathLike | None, *, must_exist: bool = False,
                              verbose: bool = True) -> str | None:
    """The checkpoint a resume should load.

    - a file: validated; if corrupt, the newest good checkpoint in the same directory is used instead.
    - a directory: the newest good checkpoint in it (None when it holds none, e.g. the first run of a
      job — unless `must_exist`).
    - a missing path: `FileNotFoundError` for a `.ckpt` path (an explicit request), None for a directory
      path unless `must_exist`.

    Every skipped file is reported with the reason, and the one used is named.
    """
    if dir_or_path is None:
        return None
    p = Path(dir_or_path)
    if p.suffix == CKPT_SUFFIX and not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass an existing .ckpt file, a checkpoint "
                                "directory, or 'last' (newest valid checkpoint in the run's checkpoint dir)")
    if not p.exists():
        if must_exist:
            raise FileNotFoundError(f"checkpoint directory {p} does not exist")
        return None
    if p.is_file():
        candidates = [p] + [q for q in list_checkpoints(p.parent) if q.resolve() != p.resolve()]
    else:
        candidates = list_checkpoints(p)
    bad: list[str] = []
    for c in candidates:
        try:
            validate_checkpoint(c)
        except CorruptCheckpointError as e:
            bad.append(str(e))
            _say(f"WARNING: skipping unusable checkpoint: {e}", verbose)
            continue
        if bad:
            _say(f"resuming from {c} instead of the newer but unusable {len(bad)} file(s) above", verbose)
        return str(c)
    if candidates or must_exist:
        raise CorruptCheckpointError(f"no usable checkpoint in {p if p.is_dir() else p.parent}: "
                                     + ("; ".join(bad) if bad else "no .ckpt files"))
    return None


def _say(msg: str, verbose: bool) -> None:
    if verbose and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"[ldm-lightning] {msg}", flush=True)


class StepCheckpoint(ModelCheckpoint):
    """Keep the last `keep_last_k` step checkpoints (`step=00001234.ckpt`) and `last.ckpt`.

    `Trainer.fit(ckpt_path="last")` with this callback resumes from the newest checkpoint in `dirpath`
    that passes `validate_checkpoint` (so a truncated `last.ckpt` falls back to the previous good file,
    with a message), and starts from scratch when there is none yet.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, every_n_train_steps: int = 1000,
                 keep_last_k: int = 3, filename: str = "step={step:08d}", enable_version_counter: bool = False,
                 **kwargs):
        """
        Args:
            dirpath: Checkpoint directory (default: Lightning's `<logger dir>/checkpoints`).
            every_n_train_steps: Save every this many optimizer steps.
            keep_last_k: How many step checkpoints to keep (plus `last.ckpt`).
            filename: Step checkpoint name pattern.
            enable_version_counter: False: overwrite `last.ckpt` instead of writing `last-v1.ckpt` when a
                resumed run (whose restored `last_model_path` differs, e.g. after a preemption save) finds it.
            kwargs: Other `ModelCheckpoint` arguments (`monitor`, `mode`, `save_top_k`, `save_last` are fixed).
        """
        if every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be >= 1, got {every_n_train_steps}")
        if keep_last_k < 1:
            raise ValueError(f"keep_last_k must be >= 1 (use -1 in ModelCheckpoint to keep all), got {keep_last_k}")
        fixed = {"monitor", "mode", "save_top_k", "save_last", "auto_insert_metric_name"} & kwargs.keys()
        if fixed:
            raise ValueError(f"StepCheckpoint sets {sorted(fixed)} itself; use ModelCheckpoint to choose them")
        # monitor="step" with mode="max" is Lightning's way to say "the K most recent".
        super().__init__(dirpath=dirpath, filename=filename, monitor="step", mode="max", save_top_k=keep_last_k,
                         every_n_train_steps=every_n_train_steps, save_last=True, auto_insert_metric_name=False,
                         enable_version_counter=enable_version_counter, **kwargs)

    def _find_last_checkpoints(self, trainer) -> set[str]:
        directory = self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer)
        path = resolve_resume_checkpoint(directory)
        return {path} if path else set()
