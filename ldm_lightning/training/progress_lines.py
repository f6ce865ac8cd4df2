"""Plain progress lines for logs that are files (Slurm jobs, `nohup`, `> train.log`).

Lightning's progress bar redraws one terminal line; written to a file it shows nothing useful (or nothing at
all: the GPU and CPU configs turn it off). When stdout is not a terminal this callback prints, on global rank
0, one line every N optimizer steps and at least every `every_seconds`:

    [progress] step 120/4000 (3.0%) | loss 0.0421 | 812.5 images/s | elapsed 0:02:10 | ETA 1:10:04

* images/s is `TelemetryCallback`'s last window (all ranks together), not measured again here; before its
  first window (`trainer.log_every_n_steps` steps) it is "-".
* ETA = the wall time per step since this run started (a resume counts from its own start, validation
  included) times the steps left to `trainer.max_steps`; no ETA for a run bounded by epochs only.
* loss is the last logged `train/loss` on rank 0 (no collective).

The cost per step is one clock read and a comparison; the line itself reads one scalar.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import torch
from lightning.pytorch import Callback

from ldm_lightning.training.telemetry import TelemetryCallback


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(max(0.0, seconds))))


class ProgressLines(Callback):
    """One plain line of progress every `every_n_steps` steps and every `every_seconds` (rank 0, stdout).

    Args:
        every_n_steps: print every this many optimizer steps (default: `trainer.log_every_n_steps`, so the
            images/s of each line is fresh from `TelemetryCallback`).
        every_seconds: also print when this long has passed since the last line, so a slow run shows life
            (0: by steps only).
        on_tty: also print when stdout is a terminal (default False: a terminal has the progress bar).
        enabled: False switches the lines off.
    """

    def __init__(self, every_n_steps: int | None = None, every_seconds: float = 60.0, on_tty: bool = False,
                 enabled: bool = True):
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ProgressLines.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if not every_seconds >= 0:  # also refuses nan
            raise ValueError(f"ProgressLines.every_seconds must be >= 0, got {every_seconds}")
        self.every_n_steps = every_n_steps
        self.every_seconds = float(every_seconds)
        self.on_tty = on_tty
        self.enabled = enabled
        self._active = False
        self._start_time = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        isatty = getattr(sys.stdout, "isatty", None)
        tty = bool(isatty and isatty())
        self._active = self.enabled and trainer.is_global_zero and (self.on_tty or not tty)
        self._start_time = self._last_time = time.monotonic()
        self._start_step = trainer.global_step
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active:
            return
        step = trainer.global_step
        if step == self._last_step:
            return  # a gradient-accumulation micro-batch: no new step
        every = self.every_n_steps or trainer.log_every_n_steps or 50
        now = time.monotonic()
        if step % every == 0 or (self.every_seconds and now - self._last_time >= self.every_seconds):
            self._print(trainer, step, now)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._active and trainer.global_step != self._last_step:
            self._print(trainer, trainer.global_step, time.monotonic())

    def line(self, trainer, step: int, now: float) -> str:
        """The progress line of `step` (public so a caller can print it elsewhere)."""
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [f"step {step}/{max_steps} ({100.0 * step / max_steps:.1f}%)" if max_steps else f"step {step}"]
        loss = trainer.callback_metrics.get("train/loss")
        parts.append(f"loss {float(loss):.4g}" if isinstance(loss, torch.Tensor) else "loss -")
        telemetry = next((c for c in trainer.callbacks if isinstance(c, TelemetryCallback)), None)
        rate = telemetry.last_metrics.get("perf/images_per_sec") if telemetry is not None else None
        parts.append(f"{rate:.1f} images/s" if rate else "- images/s")
        elapsed = now - self._start_time
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._start_step
        if max_steps and done > 0:
            parts.append(f"ETA {_clock(elapsed / done * max(0, max_steps - step))}")
        else:
            parts.append("ETA -")
        return "[progress] " + " | ".join(parts)

    def _print(self, trainer, step: int, now: float) -> None:
        print(self.line(trainer, step, now), flush=True)
        self._last_step = step
        self._last_time = now
