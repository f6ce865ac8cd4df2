"""Exponential moving average of a module's weights (Polyak averaging, as in LDM/DiT/EDM)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def zero3_views(e: nn.Parameter, p: nn.Parameter) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (EMA, live) tensor pairs one update must average: `(e, p)` itself, and under DeepSpeed ZeRO-3 each
    rank's partition `ds_tensor` as well. ZeRO-3 keeps a parameter's values in that partition (what a checkpoint
    saves and a gather reads); the full tensor exists only while gathered or "persistent" (small parameters), as a
    separate copy except at world size 1, where it is a view of the partition (averaged once, not twice)."""
    e_part, p_part = getattr(e, "ds_tensor", None), getattr(p, "ds_tensor", None)
    if e_part is None or p_part is None:  # not ZeRO-3
        return [(e, p)]
    pairs = [(e, p)] if e.numel() > 0 and e.shape == p.shape else []  # the full copies, where gathered
    if e_part.shape == p_part.shape:
        shared = e.numel() > 0 and e.untyped_storage().data_ptr() == e_part.untyped_storage().data_ptr()
        if not shared:
            pairs.append((e_part, p_part))
    return pairs


class EMA(nn.Module):
    """Holds a frozen copy of `model` whose weights track `decay * ema + (1 - decay) * model`.

    The copy is an ordinary submodule, so it is saved in (and restored from) the owner's state dict,
    exported with it, and moved across devices with it. Its parameters never require grad, so optimizers
    built from ``requires_grad`` parameters never see them.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 0):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        # Early in training the average would be dominated by the random init; ramp the decay up
        # (the (1 + n) / (10 + n) rule from LDM's LitEma) unless an explicit warmup is set.
        n = int(self.num_updates)
        if self.warmup_steps > 0:
            return self.decay * min(1.0, n / self.warmup_steps)
        return min(self.decay, (1 + n) / (10 + n))

    def current_decay_on_device(self) -> torch.Tensor:
        """`current_decay` as a 0-dim tensor on `num_updates`' device, computed there (no host read)."""
        n = self.num_updates.float()
        if self.warmup_steps > 0:
            return self.decay * (n / self.warmup_steps).clamp(max=1.0)
        return ((1 + n) / (10 + n)).clamp(max=self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module, ok: torch.Tensor | None = None) -> None:
        """One step of the average towards `model`'s weights (buffers are copied).

        `ok`: a 0-dim tensor on the device (the non-finite guard decided there, training/nonfinite_guard.py):
        the decay ramp is computed on the device and nothing changes where `ok` is 0, with no host read.
        Without it the decay is a Python float (one host read of `num_updates`).
        """
        if ok is None:
            weight = 1.0 - self.current_decay()
        else:
            weight = (1.0 - self.current_decay_on_device()) * ok.float()  # 0 for a skipped step: the average stays
        ema_params = dict(self.module.named_parameters())
        for name, p in model.named_parameters():
            e = ema_params[name]
            for e_values, p_values in zero3_views(e, p):
                e_values.lerp_(p_values.detach().to(e.dtype), weight if ok is None else weight.to(e.dtype))
        ema_buffers = dict(self.module.named_buffers())
        for name, b in model.named_buffers():
            ema_buffers[name].copy_(b)
        self.num_updates += 1 if ok is None else ok.long()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
