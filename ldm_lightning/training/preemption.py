"""Save at the next step boundary on SIGUSR1 / SIGTERM / SIGINT, then requeue (Slurm) or exit with a known code.

Slurm sends SIGUSR1 some time before the time limit (`#SBATCH --signal=USR1@90`), or an operator does
(`scancel --signal=USR1 --full JOBID`); schedulers, `kill`, Kubernetes and Slurm's own preemption send
SIGTERM; a user at the terminal presses Ctrl-C (SIGINT). The protocol:

1. The signal handler only sets a flag. Saving inside a handler interrupts arbitrary code (a
   collective, a half-written tensor) and can deadlock (Lightning issue #21406).
2. At the next step boundary (`on_train_batch_end`) every rank all-reduces the flag (MAX), so all
   ranks agree even when the signal reached only some of them; the decision is collective, so no rank
   waits in a collective the others skipped.
3. All ranks save the step (`StepCheckpoint.save_now`: a step checkpoint and `last.ckpt`, atomically);
   then a barrier, and the trainer stops.
4. Then: SIGUSR1 under Slurm -> rank 0 runs `scontrol requeue $SLURM_JOB_ID` (same job id,
   `SLURM_RESTART_COUNT` grows) and the requeued job resumes with `--ckpt_path last`. Otherwise the
   process exits with `exit_code`: EXIT_PREEMPTED (75) after SIGUSR1 outside Slurm, for a job that is not
   requeueable (`sbatch --no-requeue`, `scontrol update JobId=<id> Requeue=0`) or when the requeue failed,
   EXIT_TERMINATED (143 = 128 + SIGTERM) after SIGTERM, EXIT_INTERRUPTED (130 = 128 + SIGINT) after Ctrl-C,
   so a wrapper never mistakes a stop for a finished run.
5. A second Ctrl-C while a stop is pending (or saving) means "now": the handler raises KeyboardInterrupt,
   Lightning's own interrupt path tears the run down without saving (it writes no checkpoint unless
   `save_on_exception` is set) and ends with exit(1), which the CLI reports as 130.

Ctrl-C in a terminal reaches the whole process group, DataLoader workers included. They are forked after
the handler is installed and so inherit it; in them it does nothing (the pid differs), so a worker is not
killed by the first Ctrl-C and the save at the step boundary can still fetch its batch.

Lightning's own SLURM auto-requeue (which saves inside the handler) and its SIGTERM exception must be
off: the CLI passes `slurm_environment()` (auto_requeue=False) as a plugin, and this callback takes the
signals back from Lightning's signal connector when training starts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from ldm_lightning.training.checkpointing import checkpoint_dir, find_step_checkpoint

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: saved, resume with --ckpt_path last
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143: the shell's code for "terminated", after a clean save
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: the shell's code for Ctrl-C, after a clean save (or a second Ctrl-C)

_interrupted_twice = False  # process state: a second Ctrl-C asked to stop without saving


def interrupted_twice() -> bool:
    """True once a second Ctrl-C made this process stop at once (the CLI exits EXIT_INTERRUPTED then)."""
    return _interrupted_twice


def slurm_environment() -> SLURMEnvironment | None:
    """`SLURMEnvironment(auto_requeue=False)` when running under Slurm (else None: let Lightning detect)."""
    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


def slurm_job_id() -> str | None:
    """`<array job>_<task>` for array jobs, else `$SLURM_JOB_ID`; None outside Slurm."""
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id is not None and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{array_id}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def job_requeueable(job_id: str) -> bool | None:
    """Slurm's Requeue flag of the job: False when submitted with `sbatch --no-requeue` or set so while it runs
    (`scontrol update JobId=<id> Requeue=0`), e.g. to continue the run on another allocation; None: unknown."""
    if not re.fullmatch(r"[0-9_]+", job_id):
        return None
    try:
        r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bRequeue=([01])\b", r.stdout)
    return None if m is None else m.group(1) == "1"


def not_requeueable_message(job_id: str) -> str:
    return (f"[ldm-lightning] Slurm job {job_id} is not requeueable (--no-requeue / Requeue=0): saved, not "
            "requeued; resubmit with the same CONFIG and OVERRIDES to resume (with data.order: global on any "
            "number of nodes)")


class PreemptionCallback(L.Callback):
    """Checkpoint at the next step boundary after one of `signals` arrives, then requeue or stop.

    Args:
        signals: signal names that mean "save and stop". SIGUSR1: preemption warning (requeued under
            Slurm). SIGTERM: terminate (never requeued by us; exits EXIT_TERMINATED). SIGINT: Ctrl-C
            (exits EXIT_INTERRUPTED; a second one stops at once, without saving).
        requeue: run `scontrol requeue` on rank 0 after a SIGUSR1 save under Slurm.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1", "SIGTERM", "SIGINT"), requeue: bool = True):
        super().__init__()
        self.signals = []
        for name in signals:
            if name not in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"):
                raise ValueError(f"PreemptionCallback.signals: {name!r} is not one of SIGUSR1, SIGUSR2, SIGTERM, "
                                 "SIGINT, SIGHUP")
            self.signals.append(getattr(signal, name))
        self.requeue = requeue
        self.received: int | None = None  # the first signal received, until it is acted on
        self.received_at: float | None = None  # its time.time() (goodput.py: a restart is timed from the signal)
        self.stopped_by: int | None = None  # the signal that stopped training
        self.requeued = False
        self.saved_path: str | None = None
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()
        self._saving = False
        self.exit_on_sigterm = False  # saved, not requeued, under Slurm (see _exit_preempted_on_sigterm)

    # --- the handler: sets a flag, nothing else (but for a second Ctrl-C) -----------------------------
    def _handler(self, signum, frame) -> None:
        global _interrupted_twice
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the main process decides, the worker keeps serving batches
        if signum == signal.SIGINT and (self.received is not None or self._saving):
            _interrupted_twice = True
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum
            self.received_at = time.time()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal only works in the main thread
        self._pid = os.getpid()
        for sig in self.signals:
            previous = signal.signal(sig, self._handler)
            self._previous.setdefault(sig, previous)

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._install()

    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning's signal connector registered its handlers after `setup` (SIGTERM -> an exception that
        # exits 0 without a save): take the signals back.
        self._install()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()
        self._saving = False
        if self.exit_on_sigterm:
            self._exit_preempted_on_sigterm()

    # --- the step boundary ---------------------------------------------------------------------
    def _agreed(self, trainer) -> int | None:
        flag = torch.tensor([float(self.received or 0)], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        signum = int(flag.item())
        return signum or None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self._agreed(trainer)
        if signum is None:
            return
        name = signal.Signals(signum).name
        checkpoint = find_step_checkpoint(trainer)
        if trainer.is_global_zero:
            hint = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
            print(f"[ldm-lightning] {name} received: saving at global step {trainer.global_step}{hint}", flush=True)
        self._saving = True  # a Ctrl-C now still means "stop at once", also on a rank that got no signal
        if checkpoint is not None:
            path = checkpoint.save_now(trainer)
        else:
            path = os.path.join(checkpoint_dir(trainer.default_root_dir), "last.ckpt")
            trainer.save_checkpoint(path)
        trainer.strategy.barrier("preemption-saved")
        self.saved_path = path
        if trainer.is_global_zero:
            print(f"[ldm-lightning] saved {path}", flush=True)
        job_id = slurm_job_id()
        if signum == signal.SIGUSR1 and self.requeue and job_id is not None:
            if job_requeueable(job_id) is False:  # every rank asks Slurm: they agree on the exit code, no collective
                if trainer.is_global_zero:
                    print(not_requeueable_message(job_id), flush=True)
                self.requeued = False
            else:
                self.requeued = self._requeue(job_id) if trainer.is_global_zero else True
        if signum == signal.SIGUSR1 and not self.requeued and job_id is not None:
            self._exit_preempted_on_sigterm()
        trainer.should_stop = True
        self.stopped_by = signum
        self.received = None

    def _exit_preempted_on_sigterm(self) -> None:
        """Saved, not requeued: this process will exit EXIT_PREEMPTED. srun's --kill-on-bad-exit sends SIGTERM to
        the ranks still tearing down once the first one exits so; they end at once with the same code (the
        checkpoint is written on every rank), not 143, so the job's exit code does not depend on who was first."""
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(EXIT_PREEMPTED))
        self._previous.pop(signal.SIGTERM, None)  # teardown must not restore the old handler
        self.exit_on_sigterm = True  # teardown sets it again after Lightning's signal connector restored its own

    @property
    def exit_code(self) -> int | None:
        """None: training was not stopped by a signal. 0: saved and requeued. Else EXIT_*."""
        if self.stopped_by is None:
            return None
        if self.stopped_by == signal.SIGTERM:
            return EXIT_TERMINATED
        if self.stopped_by == signal.SIGINT:
            return EXIT_INTERRUPTED
        return 0 if self.requeued else EXIT_PREEMPTED

    @staticmethod
    def _requeue(job_id: str) -> bool:
        if not re.fullmatch(r"[0-9_]+", job_id):
            print(f"[ldm-lightning] WARNING: refusing to requeue odd SLURM job id {job_id!r}", flush=True)
            return False
        try:
            r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (FileNotFoundError, subprocess.TimeoutExpired) as e:
            print(f"[ldm-lightning] WARNING: `scontrol requeue {job_id}` failed ({e}); resubmit the job by "
                  "hand, it will resume from the checkpoint just saved", flush=True)
            return False
        if r.returncode == 0:
            print(f"[ldm-lightning] requeued Slurm job {job_id}", flush=True)
            return True
        if r.returncode == -signal.SIGTERM:
            # A requeue takes effect at once: Slurm stops every process of the job, and scontrol, our child,
            # may get its SIGTERM before it returns (seen under load on a 2-node job). The request went through.
            print(f"[ldm-lightning] requeued Slurm job {job_id} (Slurm stopped the job for the requeue before "
                  "scontrol returned)", flush=True)
            return True
        if "disabled" in r.stderr:  # made not requeueable after job_requeueable() asked
            print(not_requeueable_message(job_id), flush=True)
            return False
        print(f"[ldm-lightning] WARNING: `scontrol requeue {job_id}` exited {r.returncode}: "
              f"{r.stderr.strip()} (is the job submitted with --requeue?)", flush=True)
        return False
