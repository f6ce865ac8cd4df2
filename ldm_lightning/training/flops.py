"""FLOPs per training sample and peak FLOP/s of the GPU: the two halves of MFU.

MFU (model FLOPs utilisation; PaLM, Chowdhery et al. 2022, App. B; nanoGPT `estimate_mfu`;
torchtitan `get_peak_flops`) = achieved model FLOP/s ÷ the device's peak dense bf16 FLOP/s.

* FLOPs are COUNTED on the real model while it runs one sample's `compute_loss`: 2 FLOPs per
  multiply-add for matmul/conv/SDPA (the formulas of `torch.utils.flop_counter`). An op that touches a
  tensor requiring grad belongs to a TRAINABLE network and costs 3x its forward (backward computes grads
  w.r.t. inputs and weights: 2x forward); an op on frozen tensors only (the autoencoder's encoder, the
  text encoder, under no_grad) has no backward and costs 1x. Counting the frozen encoders 3x, as a plain
  "3 x forward" does, overstates MFU.
* The counter counts what runs, so DiT's adaLN / timestep path is counted once per image, as it is
  computed (the 6·N·params rule of thumb counts it per token and overcounts DiT-XL/2 by ~1.5x;
  `DiT.flops_per_image` is the analytic count, and tests/test_diffusion_flops.py checks the two agree).
* A module can state its own count instead: `flops_per_sample(batch) -> float` on the LightningModule.
"""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

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


# torch's table has formulas for CUDA's fused attention kernels but not for the CPU one, which would
# count as 0 FLOPs: it computes the same products as flash attention.
_aten = torch.ops.aten


def _cpu_sdpa_flops(*args, out_val=None, **kwargs) -> int:
    return flop_registry[_aten._scaled_dot_product_flash_attention](*args, out_val=out_val, **kwargs)


_cpu_sdpa_flops._get_raw = True  # takes tensors, as the table's entries (FlopCounterMode must not re-wrap it)
EXTRA_FORMULAS = {_aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
FORMULAS = {**flop_registry, **EXTRA_FORMULAS}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of everything `fn(*args, **kwargs)` runs, forward and — if `fn`
    calls `.backward()` — backward."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
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


class TrainableFlopCounter(TorchDispatchMode):
    """Forward FLOPs split by whether an op takes a tensor that requires grad (`trainable`) or not (`frozen`)."""

    def __init__(self):
        super().__init__()
        self.trainable, self.frozen = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            if any(a.requires_grad for a in tensors):
                self.trainable += n
            else:
                self.frozen += n
        return out


def split_forward_flops(fn, *args, **kwargs) -> tuple[int, int]:
    """(trainable, frozen) forward FLOPs of `fn(*args, **kwargs)`, run with grad enabled (the graph is
    built so that requires_grad marks the trainable path, then dropped: nothing calls backward)."""
    counter = TrainableFlopCounter()
    with torch.enable_grad(), counter:
        fn(*args, **kwargs)
    return counter.trainable, counter.frozen


def training_flops_per_sample(module: torch.nn.Module, batch) -> float:
    """Training FLOPs (forward + backward) for one sample of `batch`: 3 x trainable + 1 x frozen forward.

    Uses `module.flops_per_sample(batch)` when the module provides it; else runs `module.compute_loss`
    (or `module(batch)`) on a single sample and splits its ops (`TrainableFlopCounter`). No gradient is
    computed or stored, and the module's train/eval mode is restored.
    """
    hint = getattr(module, "flops_per_sample", None)
    if callable(hint):
        return float(hint(batch))
    one = first_sample(batch)
    step = getattr(module, "compute_loss", None) or module
    was_training = module.training
    try:
        trainable, frozen = split_forward_flops(step, one)
    finally:
        module.train(was_training)
    return 3.0 * trainable + 1.0 * frozen
