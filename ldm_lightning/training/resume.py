"""Which checkpoint a run resumes from: the newest one that loads safely and has what a resume needs.

`resolve_resume_checkpoint` is what `ldm-lightning fit` uses for `--ckpt_path last`, for an explicit
`--ckpt_path FILE` and for a rerun in a run directory that already holds checkpoints. Every skipped file
is reported with its reason, and the file used is named.

Validation never runs code from a file: it loads with `torch.load(weights_only=True)`, whose restricted
unpickler refuses any global that is not a tensor, a container or a plain value, so a crafted pickle in
the checkpoint folder is reported and skipped, never executed. It catches the failure modes of crashes
(empty or truncated files, a missing zip directory, non-checkpoint pickles), not bit flips inside tensor
data. DeepSpeed checkpoints are directories written by DeepSpeed; they are checked for their files (the
`latest` tag and every rank's `*.pt` a complete zip) without unpickling them.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    """None for DeepSpeed directories (reading the step would mean unpickling DeepSpeed's files)."""


def _validate_deepspeed_dir(path: str) -> None:
    tag_file = os.path.join(path, "latest")
    if not os.path.isfile(tag_file):
        raise CorruptCheckpointError(f"checkpoint directory {path} has no 'latest' tag file (an unfinished DeepSpeed save)")
    tag = Path(tag_file).read_text().strip()
    shards = sorted(Path(path, tag).glob("*.pt")) if tag else []
    if not any(p.name.endswith("model_states.pt") for p in shards):
        raise CorruptCheckpointError(f"checkpoint directory {path} lacks {tag or '<tag>'}/*model_states.pt")
    for p in shards:
        if not zipfile.is_zipfile(p):
            raise CorruptCheckpointError(f"checkpoint {p} is truncated or not a torch zip file")


def validate_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load `path` safely (weights_only, memory-mapped, on CPU) and check the keys a full resume needs.

    Returns the loaded checkpoint ({} for a DeepSpeed directory); raises `CorruptCheckpointError` naming
    the file and the reason.
    """
    path = os.fspath(path)
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


def step_in_name(path: Path) -> int | None:
    m = re.search(r"step=(\d+)", path.name)
    return int(m.group(1)) if m else None


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints (`*.ckpt` files or DeepSpeed directories) in `directory`, newest first (modification
    time; ties: higher step in the name, then `last`)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.suffix == CKPT_SUFFIX and not p.name.startswith(".")]

    def key(p: Path):
        return (p.stat().st_mtime_ns, step_in_name(p) or -1, p.name.startswith("last"))

    return sorted(found, key=key, reverse=True)


def resolve_resume_checkpoint(dir_or_path: str | os.PathLike | None, *, must_exist: bool = False,
                              verbose: bool = True) -> ResolvedCheckpoint | None:
    """The checkpoint a resume should load.

    - a file: validated; if unusable, the newest good checkpoint in the same directory is used instead.
    - a directory: the newest good checkpoint in it (None when it holds none, e.g. the first run of a
      job — unless `must_exist`).
    - a missing path: `FileNotFoundError` for a `.ckpt` path (an explicit request), None for a directory
      path unless `must_exist`.
    """
    if dir_or_path is None:
        return None
    p = Path(dir_or_path)
    if p.suffix == CKPT_SUFFIX and not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass an existing .ckpt file, a checkpoint "
                                "directory, or 'last' (the newest valid checkpoint of the run)")
    if not p.exists():
        if must_exist:
            raise FileNotFoundError(f"checkpoint directory {p} does not exist")
        return None
    explicit_file = p.suffix == CKPT_SUFFIX or p.is_file()
    if explicit_file:
        candidates = [p] + [q for q in list_checkpoints(p.parent) if q.resolve() != p.resolve()]
    else:
        candidates = list_checkpoints(p)
    bad: list[str] = []
    for c in candidates:
        try:
            ckpt = validate_checkpoint(c)
        except CorruptCheckpointError as e:
            bad.append(str(e))
            say(f"WARNING: skipping unusable checkpoint: {e}", verbose)
            continue
        if bad:
            say(f"using {c} instead of the newer but unusable {len(bad)} file(s) above", verbose)
        step = ckpt.get("global_step")
        return ResolvedCheckpoint(str(c), int(step) if step is not None else None)
    if candidates or must_exist:
        raise CorruptCheckpointError(f"no usable checkpoint in {p.parent if explicit_file else p}: "
                                     + ("; ".join(bad) if bad else "no .ckpt files"))
    return None


def say(msg: str, verbose: bool = True) -> None:
    """Print a fault-tolerance message once per job (global rank 0)."""
    if verbose and int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        print(f"[ldm-lightning] {msg}", flush=True)
