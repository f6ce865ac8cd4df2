"""Which checkpoints are valid, and which one a run resumes from: the one with the highest global step
recorded inside it, among the files that load safely and have what a resume needs.

`resolve_ckpt_path` is `ldm-lightning fit`'s choice: `--ckpt_path last`, an explicit `--ckpt_path FILE`, a
rerun in a run directory that already holds checkpoints, or from scratch; it uses `resolve_resume_checkpoint`,
which every other chooser (the final-step save, the disk-full message, the non-finite stop) uses too. Every
skipped file is reported with its reason, and the file used is named with why it was chosen. Writing
checkpoints: training/checkpointing.py.

Why the recorded step and not the file time: `cp -r`, `rsync` without `-t`, a restore from a backup or a
`touch` rewrite modification times, and the newest file is then often not the furthest one (a resume from
it redoes thousands of steps). The step inside the checkpoint is what its state is. Ties (`last.ckpt` and
`step=…ckpt` of one step, or a `nonfinite-stop.ckpt` copy): the file carrying more of the resume state
(loop progress, data position, RNG states, run topology — `resume_state_parts`), then `last.ckpt`, then a
step file, then the newer file.

Reading each candidate's step costs little: `torch.load(mmap=True, weights_only=True)` parses the small
pickle and maps the tensor data without reading it (measured: 26 ms for a 2.1 GB checkpoint).

Validation never runs code from a file: `weights_only=True`'s restricted unpickler refuses any global that
is not a tensor, a container or a plain value, so a crafted pickle in the checkpoint folder is reported and
skipped, never executed. It catches the failure modes of crashes (empty or truncated files, a missing zip
directory, non-checkpoint pickles), not bit flips inside tensor data. DeepSpeed checkpoints are directories
written by DeepSpeed; they are checked for their files (the `latest` tag and every rank's `*.pt` a complete
zip) without unpickling them, and their step is read from rank 0's model-states file with the same
restricted unpickler; where that refuses (DeepSpeed versions that pickle other objects) the step in the
directory's name is used, and the message says so. FSDP2 checkpoints are DCP folders (`meta.pt` inside):
their index is read by a restricted unpickler and every shard checked to hold the bytes it lists
(ldm_lightning/dcp_files.py); their step and resume state come from `meta.pt` (weights_only).
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm_lightning.dcp_files import ShardedCheckpointError, is_sharded_checkpoint, validate_sharded_checkpoint
from ldm_lightning.errors import UNSAFE_PICKLE, is_unsafe_pickle, unsafe_pickle_detail

# Top-level keys every full-state Lightning training checkpoint has.
REQUIRED_KEYS = ("state_dict", "global_step", "epoch", "loops", "optimizer_states", "lr_schedulers")
CKPT_SUFFIX = ".ckpt"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded safely or lacks the keys a resume needs."""


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """The checkpoint a resume will load, and what validation learned of it."""

    path: str
    global_step: int | None
    """The step recorded in the checkpoint (for a DeepSpeed directory whose files the restricted unpickler
    refuses: the step in its name); None when neither says."""
    reason: str = ""
    """Why this file was chosen (without its step), for the one line `fit` prints."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What choosing between checkpoints needs to know of one valid candidate."""

    path: Path
    global_step: int | None
    step_from_name: bool
    """True when `global_step` comes from the file name (a DeepSpeed directory whose files were not read)."""
    resume_parts: int
    """How many of the optional resume-state parts it carries (see `resume_state_parts`)."""
    mtime_ns: int


def _validate_deepspeed_dir(path: str) -> Path:
    """Checks the files of a DeepSpeed checkpoint directory; returns rank 0's model-states file."""
    tag_file = os.path.join(path, "latest")
    if not os.path.isfile(tag_file):
        raise CorruptCheckpointError(f"checkpoint directory {path} has no 'latest' tag file (an unfinished DeepSpeed save)")
    tag = Path(tag_file).read_text().strip()
    shards = sorted(Path(path, tag).glob("*.pt")) if tag else []
    model_states = [p for p in shards if p.name.endswith("model_states.pt")]
    if not model_states:
        raise CorruptCheckpointError(f"checkpoint directory {path} lacks {tag or '<tag>'}/*model_states.pt")
    for p in shards:
        if not zipfile.is_zipfile(p):
            raise CorruptCheckpointError(f"checkpoint {p} is truncated or not a torch zip file")
    return model_states[0]


def _deepspeed_step(model_states: Path) -> int | None:
    """The global step Lightning stored in a DeepSpeed model-states file, read with the restricted unpickler
    (None where it refuses or the key is missing: the caller falls back to the name)."""
    try:
        state = torch.load(model_states, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load `path` safely (weights_only, memory-mapped, on CPU) and check the keys a full resume needs.

    Returns the loaded checkpoint ({} for a DeepSpeed directory); raises `CorruptCheckpointError` naming
    the file and the reason.
    """
    path = os.fspath(path)
    if is_sharded_checkpoint(path):
        return _validate_sharded(path)
    if os.path.isdir(path):
        _validate_deepspeed_dir(path)
        return {}
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"checkpoint {path} does not exist or is not a file")
    if os.path.getsize(path) == 0:
        raise CorruptCheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # zip, pickle and "unsupported global" errors: all mean "not usable"
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if is_unsafe_pickle(e):  # the wording every loader uses (errors.py)
            raise CorruptCheckpointError(f"checkpoint {path} {UNSAFE_PICKLE} ({unsafe_pickle_detail(e)})") from e
        raise CorruptCheckpointError(f"checkpoint {path} cannot be loaded safely: {reason}") from e
    if not isinstance(ckpt, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CorruptCheckpointError(
            f"checkpoint {path} lacks {missing} (a weights-only export, or not a Lightning training checkpoint)")
    return ckpt


def _validate_sharded(path: str) -> dict[str, Any]:
    """A DCP checkpoint folder (FSDP2, dcp_files.py): files checked, `meta.pt` returned (no tensors read)."""
    try:
        meta = validate_sharded_checkpoint(path)
    except ShardedCheckpointError as e:
        raise CorruptCheckpointError(str(e)) from e
    missing = [k for k in REQUIRED_KEYS if k not in meta and k not in ("state_dict", "optimizer_states")]
    if missing:
        raise CorruptCheckpointError(f"checkpoint {path}/meta.pt lacks {missing} (not a Lightning training checkpoint)")
    return meta


def resume_state_parts(ckpt: dict[str, Any]) -> int:
    """How much of the state beyond the weights a resume restores: the fit loop's progress, the data
    position (the loaders' state in the loop), the global RNG states, the run topology (run_topology.py),
    optimizer states. Two files of one step compare on this: the one that restores more wins the tie."""
    fit_loop = (ckpt.get("loops") or {}).get("fit_loop") or {}
    loader_state = (fit_loop.get("state_dict") or {}).get("combined_loader")
    return sum(bool(x) for x in (fit_loop, loader_state, ckpt.get("rng_states"), ckpt.get("run_topology"),
                                 ckpt.get("optimizer_states")))


def step_in_name(path: Path) -> int | None:
    m = re.search(r"step=(\d+)", path.name)
    return int(m.group(1)) if m else None


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Validate `path` and read what choosing needs (its step, how complete its resume state is); raises
    `CorruptCheckpointError`. Nothing but the small pickle is read: tensors stay memory-mapped and unread."""
    p = Path(path)
    if is_sharded_checkpoint(p):  # FSDP2: its meta.pt holds the step and the resume state; shards hold tensors
        meta = _validate_sharded(os.fspath(p))
        step = meta.get("global_step")
        return CheckpointInfo(p, int(step) if step is not None else None, False,
                              resume_state_parts({**meta, "optimizer_states": True}), p.stat().st_mtime_ns)
    if p.is_dir():
        step = _deepspeed_step(_validate_deepspeed_dir(os.fspath(p)))
        from_name = step is None
        return CheckpointInfo(p, step_in_name(p) if from_name else step, from_name, 0, p.stat().st_mtime_ns)
    ckpt = validate_checkpoint(p)
    step = ckpt.get("global_step")
    return CheckpointInfo(p, int(step) if step is not None else None, False, resume_state_parts(ckpt),
                          p.stat().st_mtime_ns)


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints (`*.ckpt` files or DeepSpeed directories) in `directory`, by name (unvalidated; hidden
    names, e.g. the atomic writer's temp files, left out)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix == CKPT_SUFFIX and not p.name.startswith("."))


def _name_rank(p: Path) -> int:
    # Ties of equal resume state: last.ckpt (the file every resume of the run writes), a step file, other names.
    return 2 if p.name.startswith("last") else 1 if step_in_name(p) is not None else 0


def choice_key(info: CheckpointInfo) -> tuple:
    """Highest recorded step first; ties: more resume state, then last.ckpt, a step file, then the newer file."""
    return (info.global_step if info.global_step is not None else -1, info.resume_parts, _name_rank(info.path),
            info.mtime_ns)


def valid_checkpoints(directory: str | os.PathLike, verbose: bool = True,
                      skip: Path | None = None) -> tuple[list[CheckpointInfo], list[str]]:
    """The valid checkpoints in `directory`, best first (`choice_key`), and the reasons of the unusable ones
    (each also reported). `skip`: a path not to look at again."""
    found, bad = [], []
    for c in list_checkpoints(directory):
        if skip is not None and c.resolve() == skip.resolve():
            continue
        try:
            found.append(inspect_checkpoint(c))
        except CorruptCheckpointError as e:
            bad.append(str(e))
            say(f"WARNING: skipping unusable checkpoint: {e}", verbose)
    return sorted(found, key=choice_key, reverse=True), bad


def why_chosen(best: CheckpointInfo, others: list[CheckpointInfo]) -> str:
    """One clause: why the chosen file beat the others (its step is printed beside it)."""
    if best.global_step is None:
        return "no step is recorded in any valid checkpoint: the newest file"
    where = ("the step in its directory name (DeepSpeed's files were not unpickled to read it)"
             if best.step_from_name else "the highest step recorded")
    text = f"{where} among {len(others) + 1} valid checkpoint(s); chosen by step, not by file time"
    tied = [o.path.name for o in others if o.global_step == best.global_step]
    if tied:
        less = any(o.resume_parts < best.resume_parts for o in others if o.global_step == best.global_step)
        text += (f"; {', '.join(tied)} hold{'s' if len(tied) == 1 else ''} the same step"
                 + (" with less resume state (loop, data position, RNG, topology)" if less else
                    f" and state: {best.path.name} is preferred"))
    return text


def resolve_resume_checkpoint(dir_or_path: str | os.PathLike | None, *, must_exist: bool = False,
                              verbose: bool = True) -> ResolvedCheckpoint | None:
    """The checkpoint a resume should load.

    - a file: validated; if unusable, the best valid checkpoint in the same directory is used instead.
    - a directory: its valid checkpoint with the highest recorded step (`choice_key`; None when it holds
      none, e.g. the first run of a job — unless `must_exist`).
    - a missing path: `FileNotFoundError` for a `.ckpt` path (an explicit request), None for a directory
      path unless `must_exist`.
    """
    if dir_or_path is None:
        return None
    p = Path(dir_or_path)
    if p.suffix == CKPT_SUFFIX and not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass an existing .ckpt file, a checkpoint "
                                "directory, or 'last' (the valid checkpoint of the run with the highest step)")
    if not p.exists():
        if must_exist:
            raise FileNotFoundError(f"checkpoint directory {p} does not exist")
        return None
    explicit_file = p.suffix == CKPT_SUFFIX or p.is_file()
    bad: list[str] = []
    if explicit_file:
        try:
            info = inspect_checkpoint(p)
            return ResolvedCheckpoint(str(p), info.global_step, "as requested")
        except CorruptCheckpointError as e:
            bad.append(str(e))
            say(f"WARNING: skipping unusable checkpoint: {e}", verbose)
    directory = p.parent if explicit_file else p
    found, bad_here = valid_checkpoints(directory, verbose, skip=p if explicit_file else None)
    bad += bad_here
    if found:
        best = found[0]
        instead = f"instead of the unusable {p.name}; " if explicit_file else ""
        return ResolvedCheckpoint(str(best.path), best.global_step, instead + why_chosen(best, found[1:]))
    if bad or must_exist:
        raise CorruptCheckpointError(f"no usable checkpoint in {directory}: "
                                     + ("; ".join(bad) if bad else "no .ckpt files"))
    return None


# --ckpt_path values Lightning itself resolves (best model, Lightning's hpc checkpoints, model registry).
LIGHTNING_CKPT_WORDS = ("best", "hpc")


def resolve_ckpt_path(requested: str | None, directory: str, max_steps: int | None = None) -> str | None:
    """The checkpoint `fit` resumes from (None: from scratch), for its `--ckpt_path` (None: not given) and the
    run's checkpoint `directory`. Raises FileNotFoundError / CorruptCheckpointError with a message for the user."""
    if requested is not None and (requested in LIGHTNING_CKPT_WORDS or requested.startswith("registry")):
        return requested
    if requested is None:
        found = resolve_resume_checkpoint(directory) if os.path.isdir(directory) else None
        if found is not None:
            say(f"{directory} holds checkpoints of an earlier run; a rerun in the same run directory resumes "
                "(for a fresh run use a new --trainer.default_root_dir)")
    elif requested == "last":
        found = resolve_resume_checkpoint(directory)
        if found is None:
            say(f"--ckpt_path last: no checkpoint in {directory} yet; starting from scratch")
    else:
        found = resolve_resume_checkpoint(requested)
    if found is None:
        return None
    say(f"resuming from {found.path}" + (f" (global step {found.global_step})" if found.global_step is not None else "")
        + (f": {found.reason}" if found.reason else ""))
    if found.global_step is not None and max_steps is not None and 0 < max_steps <= found.global_step:
        say(f"{found.path} is at global step {found.global_step} and trainer.max_steps={max_steps}: nothing left "
            "to train (raise --trainer.max_steps to train longer)")
    return found.path


def saved_hparams(path: str | os.PathLike) -> dict | None:
    """The hyper-parameters a checkpoint file was trained with (None: a DeepSpeed directory, or none saved)."""
    if not os.path.isfile(path) and not is_sharded_checkpoint(path):
        return None
    try:
        hparams = validate_checkpoint(path).get("hyper_parameters")
    except CorruptCheckpointError:
        return None
    return dict(hparams) if isinstance(hparams, dict) else None


def say(msg: str, verbose: bool = True) -> None:
    """Print a fault-tolerance message once per job (global rank 0)."""
    if verbose and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"[ldm-lightning] {msg}", flush=True)
