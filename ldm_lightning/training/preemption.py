"""Save-and-requeue on Slurm preemption / time limit, without losing a step.

Slurm sends SIGUSR1 some time before the kill (`#SBATCH --signal=USR1@90`), or an operator does
(`scancel --signal=USR1 --full JOBID`). The protocol:

1. The signal handler only sets a flag. Saving inside a handler interrupts arbitrary code (a
   collective, a half-written tensor) and can deadlock (Lightning issue #21406).
2. At the next step boundary (`on_train_batch_end`) every rank all-reduces the flag (MAX), so all
   ranks agree even when the signal reached only some of them; the decision is collective, so no rank
   waits in a collective the others skipped.
3. All ranks call `trainer.save_checkpoint(<ckpt dir>/last.ckpt)` (rank 0 writes it; atomically when
   `AtomicCheckpointIO` is the checkpoint plugin); then a barrier.
4. Rank 0 runs `scontrol requeue $SLURM_JOB_ID` (the job keeps its id; `SLURM_RESTART_COUNT` grows), and
   the trainer stops. The requeued job runs the same command with `--ckpt_path last`, which
   `StepCheckpoint` resolves to the newest valid checkpoint in the same directory.

Lightning's own SLURM auto-requeue (which saves inside the handler) must be off:
`slurm_environment()` gives `SLURMEnvironment(auto_requeue=False)` for `Trainer(plugins=[...])`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment


def slurm_environment() -> SLURMEnvironment | None:
    """`SLURMEnvironment(auto_requeue=False)` when running under Slurm (else None: let Lightning detect).

    Passing it as a Trainer plugin disables Lightning's in-handler save + requeue, which would
    otherwise race `PreemptionCallback` and save twice.
    """
    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


def slurm_job_id() -> str | None:
    """`<array job>_<task>` for array jobs, else `$SLURM_JOB_ID`; None outside Slurm."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionCallback(L.Callback):
    """Checkpoint at the next step boundary after `signals` arrive, requeue the Slurm job, stop.

    Args:
        dirpath: where to write `last.ckpt`. Default: the trainer's `ModelCheckpoint` dirpath (so
            `--ckpt_path last` finds it), else `<default_root_dir>/checkpoints`.
        signals: signal names to treat as "about to be preempted". SIGTERM is deliberately not
            included by default: Slurm sends it at the kill itself, too late to save reliably.
        requeue: run `scontrol requeue` on rank 0 after saving (only when `$SLURM_JOB_ID` is set).
        filename: checkpoint file name inside `dirpath`.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, signals: tuple[str, ...] = ("SIGUSR1",),
                 requeue: bool = True, filename: str = "last.ckpt"):
        super().__init__()
        self.signals = []
        for name in signals:
            if not hasattr(signal, name):
                raise ValueError(f"PreemptionCallback.signals: unknown signal {name!r}; use e.g. 'SIGUSR1', 'SIGUSR2'")
            self.signals.append(getattr(signal, name))
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.requeue = requeue
        self.filename = filename
        self.received = False
        self.saved_path: str | None = None
        self._previous: dict[int, object] = {}

    # --- the handler: sets a flag, nothing else ----------------------------------------------------
    def _handler(self, signum, frame) -> None:
        self.received = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    # --- the step boundary ---------------------------------------------------------------------
    def _agreed(self, trainer) -> bool:
        flag = torch.tensor([1.0 if self.received else 0.0], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item() > 0)

    def checkpoint_path(self, trainer) -> str:
        directory = self.dirpath
        if directory is None and trainer.checkpoint_callback is not None:
            directory = getattr(trainer.checkpoint_callback, "dirpath", None)
        if directory is None:
            directory = os.path.join(trainer.default_root_dir, "checkpoints")
        return os.path.join(os.fspath(directory), self.filename)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._agreed(trainer):
            return
        path = self.checkpoint_path(trainer)
        if trainer.is_global_zero:
            print(f"[ldm-lightning] preemption signal received: saving {path} at global step "
                  f"{trainer.global_step}", flush=True)
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("preemption-saved")
        self.saved_path = path
        job_id = slurm_job_id()
        if self.requeue and job_id is not None and trainer.is_global_zero:
            self._requeue(job_id)
        trainer.should_stop = True
        self.received = False

    @staticmethod
    def _requeue(job_id: str) -> None:
        if not re.fullmatch(r"[0-9_]+", job_id):
            raise ValueError(f"refusing to requeue odd SLURM job id {job_id!r}")
        try:
            r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (FileNotFoundError, subprocess.TimeoutExpired) as e:
            print(f"[ldm-lightning] WARNING: `scontrol requeue {job_id}` failed ({e}); resubmit the job by "
                  "hand, it will resume from the checkpoint just saved", flush=True)
            return
        if r.returncode == 0:
            print(f"[ldm-lightning] requeued Slurm job {job_id}", flush=True)
        else:
            print(f"[ldm-lightning] WARNING: `scontrol requeue {job_id}` exited {r.returncode}: "
                  f"{r.stderr.strip()} (is the job submitted with --requeue?)", flush=True)
