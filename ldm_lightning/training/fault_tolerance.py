"""The fault-tolerance defaults of `ldm-lightning fit`, and which checkpoint a run resumes from.

Every run gets step checkpoints + the final step (`StepCheckpoint`), atomic writes, RNG state,
SIGUSR1/SIGTERM/SIGINT handling, goodput (`GoodputCallback`) and plain progress lines when stdout is a file
(`ProgressLines`), plus, under Slurm, the cluster environment without Lightning's in-handler requeue — unless
its config lists one of the same kind (then only to set options). See README "Fault tolerance" for what each
does and the exit codes.
"""

from __future__ import annotations

import os

from lightning.pytorch import Callback
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.plugins.io import CheckpointIO

from ldm_lightning.training.checkpointing import AtomicCheckpointIO, StepCheckpoint
from ldm_lightning.training.goodput import GoodputCallback
from ldm_lightning.training.preemption import PreemptionCallback, slurm_environment
from ldm_lightning.training.progress_lines import ProgressLines
from ldm_lightning.training.resume import resolve_resume_checkpoint, say
from ldm_lightning.training.rng_state import RNGStateCallback
from ldm_lightning.training.run_topology import TopologyCheck
from ldm_lightning.training.telemetry import TelemetryCallback

# --ckpt_path values Lightning itself resolves (best model, Lightning's hpc checkpoints, model registry).
_LIGHTNING_CKPT_WORDS = ("best", "hpc")


def default_callbacks() -> list[Callback]:
    """Callbacks every training run gets, unless the config already has one of the same class: config
    files list one only to change its options."""
    # TopologyCheck before RNGStateCallback: a refused resume should not first warn about RNG states.
    # GoodputCallback first: its step stamps enclose the step alone, not the other callbacks' work.
    return [GoodputCallback(), TelemetryCallback(), StepCheckpoint(), TopologyCheck(), RNGStateCallback(),
            PreemptionCallback(), ProgressLines()]


def default_plugins(configured: list, strategy) -> list:
    """Plugins every run gets unless one of the same kind is configured: atomic checkpoint writes (not for
    DeepSpeed, which writes its own directories) and, under Slurm, the cluster environment without
    Lightning's auto-requeue (it saves inside the signal handler; PreemptionCallback does it safely)."""
    extra = []
    if "deepspeed" not in str(strategy).lower() and not any(isinstance(p, CheckpointIO) for p in configured):
        extra.append(AtomicCheckpointIO())
    slurm = slurm_environment()
    if slurm is not None and not any(isinstance(p, ClusterEnvironment) for p in configured):
        extra.append(slurm)
    return extra


def checkpoint_dir(trainer_config) -> str:
    """Where this run's StepCheckpoint writes: its configured dirpath, else <default_root_dir>/checkpoints."""
    for cb in trainer_config.get("callbacks") or []:
        if str(getattr(cb, "class_path", "")).endswith("StepCheckpoint"):
            dirpath = (getattr(cb, "init_args", None) or {}).get("dirpath")
            if dirpath:
                return os.fspath(dirpath)
    return os.path.join(trainer_config.get("default_root_dir") or os.getcwd(), "checkpoints")


def resolve_ckpt_path(requested: str | None, directory: str, max_steps: int | None = None) -> str | None:
    """The checkpoint `fit` resumes from (None: from scratch). Raises FileNotFoundError /
    CorruptCheckpointError with a message for the user."""
    if requested is not None and (requested in _LIGHTNING_CKPT_WORDS or requested.startswith("registry")):
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
