"""FLOPs per training sample and peak FLOP/s of the GPU: the two halves of MFU.

MFU (model FLOPs utilisation; PaLM, Chowdhery et al. 2022, App. B; nanoGPT `estimate_mfu`;
torchtitan `get_peak_flops`) = achieved model FLOP/s ÷ the device's peak dense bf16 FLOP/s.

* FLOPs are COUNTED on the real model with `torch.utils.flop_counter.FlopCounterMode`, which counts
  2 FLOPs per multiply-add for matmul/conv/SDPA. One training sample costs forward + backward ≈ 3×
  forward (backward computes grads w.r.t. both inputs and weights: 2× forward).
* A module can state its own count instead: `flops_per_sample(batch) -> float` on the LightningModule
  (e.g. DiT counts its adaLN path once per image rather than once per token, which FLOP counters of
  the per-token formula 6·N·params overcount).
"""

from __future__ import annotations

import os

import torch
from torch.utils.flop_counter import FlopCounterMode

# Peak DENSE bf16 tensor-core FLOP/s (not the "with sparsity" numbers datasheets print first).
# Matched by substring of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIE"), 756e12),  # NVIDIA H100 datasheet: PCIe 1513 TF sparse -> 756 dense
    (("H100", "NVL"), 835e12),   # H100 NVL: 1671 TF sparse -> 835 dense
    (("H100",), 989e12),         # H100 SXM5: 1979 TF sparse -> 989 dense (torchtitan uses 989e12)
    (("GH200",), 989e12),        # Grace Hopper: same H100 SXM tensor cores
    (("H200",), 989e12),         # H200 SXM datasheet: 1979 TF sparse -> 989 dense
    (("B200",), 2250e12),        # HGX B200 datasheet: 4.5 PF sparse -> 2.25 PF dense per GPU
    (("A100",), 312e12),         # A100 datasheet: 312 TF bf16 dense (624 sparse); nanoGPT uses 312e12
    (("L40S",), 362e12),         # L40S datasheet: 733 TF sparse -> 362 dense
    (("L4",), 121e12),           # L4 datasheet: 242 TF sparse -> 121 dense
    (("A10",), 125e12),          # A10 datasheet: 250 TF sparse -> 125 dense
]


def peak_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of the named (default: current) CUDA device; None when unknown or on CPU.
    `$LDM_PEAK_FLOPS` (a number, e.g. 989e12) overrides the table for unlisted hardware."""
    if os.environ.get("LDM_PEAK_FLOPS"):
        return float(os.environ["LDM_PEAK_FLOPS"])
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    for keys, value in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return value
    return None


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of everything `fn(*args, **kwargs)` runs, forward and — if `fn`
    calls `.backward()` — backward."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def first_sample(batch):
    """The same batch structure cut to its first sample (tensors and lists along dim 0)."""
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, dict):
        return {k: first_sample(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if batch and all(isinstance(b, (torch.Tensor, dict, list, tuple)) for b in batch):
            return type(batch)(first_sample(b) for b in batch)
        return batch[:1]
    return batch


def training_flops_per_sample(module: torch.nn.Module, batch) -> float:
    """Training FLOPs (forward + backward) for one sample of `batch`.

    Uses `module.flops_per_sample(batch)` when the module provides it; else counts one forward of
    `module.compute_loss` (or `module(batch)`) on a single sample under `no_grad` — no gradients or
    state are touched — and multiplies by 3 (backward ≈ 2× forward).
    """
    hint = getattr(module, "flops_per_sample", None)
    if callable(hint):
        return float(hint(batch))
    one = first_sample(batch)
    step = getattr(module, "compute_loss", None) or module
    was_training = module.training
    try:
        with torch.no_grad():
            forward = count_flops(step, one)
    finally:
        module.train(was_training)
    return 3.0 * forward
