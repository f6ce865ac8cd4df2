"""Goodput: where a run's wall time went, over all its jobs (preemptions, requeues and resumes included).

Every instant from the run's first start to now is in exactly one bucket:
  train       the training steps themselves (forward, backward, optimizer step; per micro-batch, from the
              batch's start to its end, CUDA synchronised first)
  data_wait   between two steps: waiting for the next batch and the loop's own overhead (as telemetry.py's
              data wait, less the checkpoint and validation time in that gap)
  checkpoint  writing checkpoints (`trainer.save_checkpoint`: gathering the state and the atomic write)
  restart     from the stop of a job to the first step of the job that resumes it: from the signal (SIGUSR1 /
              SIGTERM / SIGINT: the rest of that step, the save, exit, queue time, start-up, loading the
              checkpoint) or, after a kill with no signal, from the checkpoint's save (the work done after it
              was lost and is redone: it is restart time, not training)
  other       the rest: the first job's start-up, validation, logging, the end of the run
so the fractions sum to 1. `requeues` counts the resumes of a job that a signal stopped (a Slurm requeue after
SIGUSR1, or a resubmission after SIGTERM); `restarts` every resume.

The totals, the run's start time and the stop (signal name and time, else the save time) travel in every
checkpoint (`checkpoint["goodput"]`); the resumed job measures the restart at its first step. Wall time is
`time.time()` of the nodes (clock skew between nodes enters the restart time). Every rank measures, global rank
0 logs `goodput/*` to every logger (W&B: the dashboard) every `every_n_steps` optimizer steps and at the end.
"""

from __future__ import annotations

import signal
import time

import torch
from lightning.pytorch import Callback

BUCKETS = ("train", "data_wait", "checkpoint", "restart")


def process_start_time() -> float:
    """When this process started (epoch seconds): the first job's start-up counts from there."""
    try:
        import psutil
        return float(psutil.Process().create_time())
    except Exception:  # psutil missing or no /proc: from the callback's creation (loses the imports)
        return time.time()


class GoodputCallback(Callback):
    def __init__(self, every_n_steps: int | None = None):
        """
        every_n_steps: log every this many optimizer steps (default: trainer.log_every_n_steps), and at the end.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"GoodputCallback.every_n_steps must be >= 1 or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.totals = dict.fromkeys(BUCKETS, 0.0)
        self.run_start: float | None = None
        self.requeues = 0
        self.restarts = 0
        self.last_restart_s: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._process_start = process_start_time()
        self._resumed_stop: tuple[float, str | None] | None = None  # (stop time, signal) of the checkpoint resumed
        self._start: float | None = None  # this step's start
        self._last_end: float | None = None  # the previous step's end (None before this job's first step)
        self._gap_start: float | None = None
        self._gap_spans: list[tuple[float, float]] = []  # the excluded spans of the gap before this step
        # checkpoint + validation spans (start, end) since the previous step's end
        self._gap_excluded: list[tuple[float, float]] = []
        self._val_start: float | None = None
        self._last_logged_step = -1
        self._wrapped = None

    # --- checkpoint writes: timed around trainer.save_checkpoint (every saver goes through it) -------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._wrapped is not None:
            return
        original = trainer.save_checkpoint

        def timed_save(*args, **kwargs):
            t0 = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.time() - t0
                self.totals["checkpoint"] += dt
                if self._last_end is not None:
                    self._gap_excluded.append((t0, t0 + dt))
        # An instance attribute, not a subclass: StepCheckpoint, the preemption save and user callbacks all call
        # `trainer.save_checkpoint`, and the Trainer is built by LightningCLI.
        trainer.save_checkpoint = timed_save
        self._wrapped = (trainer, original)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._wrapped is not None:
            wrapped_trainer, original = self._wrapped
            wrapped_trainer.__dict__.pop("save_checkpoint", None)
            self._wrapped = None

    # --- the steps ---------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if self.run_start is None:  # a fresh run (a resume restored it from the checkpoint)
            self.run_start = self._process_start
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.time()
        if self._resumed_stop is not None:
            stopped_at, signal_name = self._resumed_stop
            self._resumed_stop = None
            self.last_restart_s = max(0.0, now - stopped_at)
            self.totals["restart"] += self.last_restart_s
            self.restarts += 1
            self.requeues += signal_name is not None
            # this job's time before now is in the restart: checkpoint loads etc. must not count again
            self._gap_excluded = []
        elif self._last_end is not None:
            self.totals["data_wait"] += _wait_after(self._last_end, now, self._gap_excluded)
        self._gap_start, self._gap_spans, self._gap_excluded = self._last_end, self._gap_excluded, []
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # else queued kernels count as the next gap
        now = time.time()
        if self._start is not None:
            self.totals["train"] += now - self._start
        self._last_end = now
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step > 0 and step % every == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._log(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val_start = time.time()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_start is not None and self._last_end is not None:
            self._gap_excluded.append((self._val_start, time.time()))  # validation is "other", not data wait
        self._val_start = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._log(trainer)

    # --- the dashboard ----------------------------------------------------------------------------------
    def metrics(self, now: float | None = None) -> dict[str, float]:
        now = time.time() if now is None else now
        wall = max(now - (self.run_start if self.run_start is not None else self._process_start), 1e-9)
        m = {f"goodput/{k}_s": v for k, v in self.totals.items()}
        m["goodput/other_s"] = wall - sum(self.totals.values())
        m["goodput/wall_s"] = wall
        for k in (*BUCKETS, "other"):
            m[f"goodput/{k}_frac"] = m[f"goodput/{k}_s"] / wall
        m["goodput/requeues"] = float(self.requeues)
        m["goodput/restarts"] = float(self.restarts)
        if self.last_restart_s is not None:
            m["goodput/last_restart_s"] = self.last_restart_s
        return m

    def _log(self, trainer) -> None:
        self.last_metrics = m = self.metrics()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(m, step=trainer.global_step)

    # --- the checkpoint: totals as of the stop, and the stop itself ----------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        now = time.time()
        totals = dict(self.totals)
        signum, received_at = _pending_signal(trainer)
        if received_at is not None:
            # The stop is the signal: time after it belongs to the restart the next job measures. Take the part
            # of the current step (and of the gap before it) after the signal out of train / data_wait.
            if self._start is not None and self._last_end is not None and self._last_end >= self._start:
                totals["train"] -= max(0.0, self._last_end - max(self._start, received_at))
            if self._gap_start is not None and self._start is not None:
                # only the waiting after the signal: a checkpoint or validation still running then was not data wait
                totals["data_wait"] -= _wait_after(max(self._gap_start, received_at), self._start, self._gap_spans)
        checkpoint["goodput"] = {
            "run_start": self.run_start if self.run_start is not None else self._process_start,
            "totals": totals, "requeues": self.requeues, "restarts": self.restarts,
            "last_restart_s": self.last_restart_s, "saved_at": now,
            "stop_signal": signal.Signals(signum).name if received_at is not None else None,
            "stop_time": received_at if received_at is not None else now,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        g = checkpoint.get("goodput")
        if not isinstance(g, dict):  # a checkpoint from before goodput: this job starts the count
            return
        self.run_start = float(g["run_start"])
        self.totals = {k: float(g["totals"].get(k, 0.0)) for k in BUCKETS}
        self.requeues, self.restarts = int(g["requeues"]), int(g["restarts"])
        self.last_restart_s = g.get("last_restart_s")
        self._resumed_stop = (float(g["stop_time"]), g.get("stop_signal"))


def _wait_after(begin: float, end: float, excluded: list[tuple[float, float]]) -> float:
    """Seconds of [begin, end] outside the excluded (checkpoint / validation) spans."""
    inside = sum(max(0.0, min(end, t1) - max(begin, t0)) for t0, t1 in excluded)
    return max(0.0, end - begin - inside)


def _pending_signal(trainer) -> tuple[int | None, float | None]:
    """(signal number, its arrival time) of a stop signal this process received and is saving for, else Nones."""
    from ldm_lightning.training.preemption import PreemptionCallback
    for cb in trainer.callbacks:
        if isinstance(cb, PreemptionCallback) and cb.received is not None and cb.received_at is not None:
            return cb.received, cb.received_at
    return None, None
