"""Classifier-free guidance (Ho & Salimans 2022): pred = uncond + w * (cond - uncond).

Every prediction space is affine in the network output at fixed x_t, with coefficients summing to 1,
so combining x0 and eps here equals combining eps, v or flow. The conditional and unconditional
branches run as ONE batched forward (concatenated along the batch), as in LDM / diffusers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .denoiser import Prediction


def concat_cond(a: dict, b: dict) -> dict:
    """Concatenate two condition dicts along the batch. Sequences of different length (a prompt batch
    and the null prompt) are right-padded with zeros and a False key mask."""
    if a.keys() != b.keys():
        raise ValueError(f"cond and uncond must have the same keys, got {sorted(a)} and {sorted(b)}")
    out = {}
    seq = ("context", "context_mask", "context_ids")  # token axis 1; ids (τθ's input) pad with 0 under a False mask
    L = max([d[k].shape[1] for d in (a, b) for k in d if k in seq and d[k] is not None] + [0])
    for k in a:
        x, y = a[k], b[k]
        if k in seq:
            pad = lambda z: F.pad(z, (0, 0, 0, L - z.shape[1]) if z.ndim == 3 else (0, L - z.shape[1]))  # noqa
            x, y = pad(x), pad(y)
        out[k] = torch.cat([x, y])
    return out


def cfg_denoiser(denoiser, cond: dict, uncond: dict | None, scale: float):
    """-> fn(x, t) -> Prediction for samplers. scale == 1 (or no uncond) runs the conditional branch
    alone, so it equals the conditional prediction exactly; scale == 0 is the unconditional model."""
    if uncond is None or scale == 1.0:
        return lambda x, t: denoiser(x, t, cond)
    if scale == 0.0:
        return lambda x, t: denoiser(x, t, uncond)
    both = concat_cond(cond, uncond)

    def fn(x: torch.Tensor, t: torch.Tensor) -> Prediction:
        p = denoiser(torch.cat([x, x]), torch.cat([t, t]), both)  # (2B, C, H, W) in one forward
        B = x.shape[0]
        x0 = p.x0[B:] + scale * (p.x0[:B] - p.x0[B:])  # (B, C, H, W)
        eps = p.eps[B:] + scale * (p.eps[:B] - p.eps[B:])
        flow = None  # an x0 model's clamped velocity (denoiser.py), combined like the rest
        if p.flow_direct is not None:
            flow = p.flow_direct[B:] + scale * (p.flow_direct[:B] - p.flow_direct[B:])
        return Prediction(x0=x0, eps=eps, alpha=p.alpha[:B], sigma=p.sigma[:B], flow_direct=flow)

    return fn
