"""What `ldm-lightning fit` adds to every run unless its config lists one of the same kind.

Every run gets step checkpoints + the final step (`StepCheckpoint`), atomic writes, RNG state,
SIGUSR1/SIGTERM/SIGINT handling, goodput (`GoodputCallback`) and plain progress lines when stdout is a file
(`ProgressLines`), plus, under Slurm, the cluster environment without Lightning's in-handler requeue — unless
its config lists one of the same kind (then only to set options). See docs/fault-tolerance.md for what each
does and the exit codes. Which checkpoint a run resumes from: training/resume.py.
"""

from __future__ import annotations

import os

from lightning.pytorch import Callback
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.plugins.io import CheckpointIO

from ldm_lightning.training.checkpointing import AtomicCheckpointIO, StepCheckpoint, checkpoint_dir
from ldm_lightning.training.goodput import GoodputCallback
from ldm_lightning.training.preemption import PreemptionCallback, slurm_environment
from ldm_lightning.training.progress_lines import ProgressLines
from ldm_lightning.training.rng_state import RNGStateCallback
from ldm_lightning.training.run_topology import TopologyCheck
from ldm_lightning.training.telemetry import TelemetryCallback


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


def configured_checkpoint_dir(trainer_config) -> str:
    """Where this run's StepCheckpoint will write, read from the (not yet built) trainer config: its configured
    dirpath, else `checkpoint_dir(<default_root_dir>)`."""
    for cb in trainer_config.get("callbacks") or []:
        if str(getattr(cb, "class_path", "")).endswith("StepCheckpoint"):
            dirpath = (getattr(cb, "init_args", None) or {}).get("dirpath")
            if dirpath:
                return os.fspath(dirpath)
    return checkpoint_dir(trainer_config.get("default_root_dir") or os.getcwd())
