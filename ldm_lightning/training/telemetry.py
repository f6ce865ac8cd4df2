"""Throughput telemetry: images/s, samples seen, data-wait vs compute, peak memory, MFU.

Per training (micro-)batch the callback stamps `on_train_batch_start` and `on_train_batch_end`:
  compute = end(i) - start(i)           (forward, backward, optimizer step, on the host clock)
  wait    = start(i) - end(i-1)         (fetching the next batch + Lightning's loop overhead)
  stall   = Σ wait / Σ (wait + compute) over the logging window, in [0, 1]: the loader stall fraction.
On CUDA the end stamp synchronises first (`sync_cuda`), else kernels still queued would be counted
as the next step's wait.

Every `every_n_steps` it logs (rank 0, to every logger):
  perf/images_per_sec   global (all ranks): world_size × per-rank samples / window time
  perf/samples_seen     global, all-reduced, exact even with unequal batches
  perf/step_time_s, perf/data_wait_s, perf/compute_s, perf/loader_stall_frac
  perf/peak_mem_gb      CUDA max_memory_allocated, else the process's peak RSS
  perf/flops_per_sample counted once (flops.py); perf/tflops_per_device; perf/mfu (GPU only)
On CPU there is no peak FLOP/s to divide by: MFU is skipped and that is said once.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ldm_lightning.training.flops import peak_flops, training_flops_per_sample


def batch_size_of(batch) -> int:
    """Samples in a batch: first dim of `image`/`moments`, else of the first tensor found."""
    if isinstance(batch, dict):
        for key in ("image", "moments"):
            if key in batch:
                return int(batch[key].shape[0])
        batch = list(batch.values())
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, (torch.Tensor, dict, list, tuple)):
                return batch_size_of(item)
    raise ValueError(f"telemetry: cannot tell the batch size of a {type(batch).__name__} batch")


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


class TelemetryCallback(Callback):
    def __init__(self, every_n_steps: int | None = None, count_flops: bool = True, sync_cuda: bool = True,
                 peak_flops_per_device: float | None = None):
        """
        every_n_steps: log every this many optimizer steps (default: trainer.log_every_n_steps).
        count_flops: count training FLOPs per sample once (first batch) for TFLOP/s and MFU.
        sync_cuda: synchronise CUDA at each batch end so compute/wait split is exact.
        peak_flops_per_device: overrides the detected GPU's dense bf16 peak (flops.PEAK_BF16_FLOPS).
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"TelemetryCallback.every_n_steps must be >= 1 or null, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.count_flops = count_flops
        self.sync_cuda = sync_cuda
        self.peak = peak_flops_per_device
        self.flops_per_sample: float | None = None
        self.last_metrics: dict[str, float] = {}
        self._said_no_mfu = False
        self._reset_window()
        self._samples_local = 0
        self._last_end: float | None = None
        self._last_logged_step = -1

    def _reset_window(self):
        self._wait = 0.0
        self._compute = 0.0
        self._samples = 0
        self._batches = 0

    def on_train_start(self, trainer, pl_module):
        if self.peak is None and pl_module.device.type == "cuda":
            self.peak = peak_flops(torch.cuda.get_device_name(pl_module.device))
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.count_flops and self.flops_per_sample is None:
            self.flops_per_sample = self._count(pl_module, batch)
        self._t_start = time.perf_counter()
        if self._last_end is not None:
            self._wait += self._t_start - self._last_end

    def _count(self, pl_module, batch) -> float:
        try:
            return training_flops_per_sample(pl_module, batch)
        except Exception as e:  # e.g. ZeRO-3 sharded weights outside the engine
            rank_zero_info(f"[telemetry] FLOPs per sample not counted ({type(e).__name__}: {e}); "
                           "TFLOP/s and MFU are not logged. Give the module a flops_per_sample(batch) method.")
            self.count_flops = False
            return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        end = time.perf_counter()
        self._compute += end - self._t_start
        self._last_end = end
        n = batch_size_of(batch)
        self._samples += n
        self._batches += 1
        self._samples_local += n
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step > 0 and step % every == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._log(trainer, pl_module)

    def _log(self, trainer, pl_module):
        window = self._wait + self._compute
        world = trainer.world_size
        device = pl_module.device
        # All ranks take part in the reduce (same step), then only rank 0 writes.
        seen = torch.tensor([float(self._samples_local)], device=device)
        if world > 1:
            seen = trainer.strategy.reduce(seen, reduce_op="sum")
        per_rank_rate = self._samples / window if window > 0 else 0.0
        m = {
            "perf/images_per_sec": per_rank_rate * world,
            "perf/samples_seen": float(seen.item()),
            "perf/step_time_s": window / max(1, self._batches),  # per micro-batch
            "perf/data_wait_s": self._wait,
            "perf/compute_s": self._compute,
            "perf/loader_stall_frac": self._wait / window if window > 0 else 0.0,
            "perf/peak_mem_gb": peak_memory_gb(device),
        }
        if self.flops_per_sample:
            achieved = self.flops_per_sample * per_rank_rate  # FLOP/s per device
            m["perf/flops_per_sample"] = self.flops_per_sample
            m["perf/tflops_per_device"] = achieved / 1e12
            if self.peak:
                m["perf/mfu"] = achieved / self.peak
            elif not self._said_no_mfu:
                self._said_no_mfu = True
                rank_zero_info(f"[telemetry] MFU unavailable: no peak FLOP/s known for {device.type} "
                               "(set TelemetryCallback.peak_flops_per_device or $LDM_PEAK_FLOPS)")
        self.last_metrics = m
        self._reset_window()
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(m, step=trainer.global_step)

