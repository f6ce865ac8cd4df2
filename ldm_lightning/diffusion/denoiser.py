"""`Denoiser` and `Prediction`: the one interface the loss, the samplers and guidance share.

With x_t = alpha * x0 + sigma * eps, a network output in any of the four spaces determines (x0, eps)
exactly, given (x_t, alpha, sigma):

  eps  : x0 = (x_t - sigma * eps) / alpha
  x0   : eps = (x_t - alpha * x0) / sigma
  v    : v = alpha * eps - sigma * x0 (Salimans & Ho 2022);
         x0 = (alpha * x_t - sigma * v) / (alpha^2 + sigma^2), eps = (sigma * x_t + alpha * v) / (alpha^2 + sigma^2)
  flow : u = eps - x0 (velocity dx_t/dt of the linear path alpha = 1 - t, sigma = t);
         x0 = (x_t - sigma * u) / (alpha + sigma), eps = u + x0

The v and flow inversions hold for any (alpha, sigma); eps needs alpha > 0 and x0 needs sigma > 0
(a zero-terminal-SNR or flow endpoint), which is why `clamp` bounds those denominators from below.
The Denoiser owns that clamp (one policy for training and sampling, JiT's 0.05 by default): the loss
converts its target through the same `Denoiser.to_prediction` as the network output, so a perfect
network has exactly zero loss at every t (JiT, arXiv 2511.13720, clamps prediction and target alike).

JiT's velocity from an x0 output is u = (x_t - (alpha + sigma) x0) / max(sigma, clamp) (JiT writes
v = (x - z) / max(1 - t, 0.05) with t = 1 clean; alpha + sigma = 1 on its path), computed straight from x0.
Going through eps instead, eps - x0 = (x_t - alpha x0) / max(sigma, clamp) - x0, is the same above the clamp
but below it weighs the x0 error by ((1 - sigma) / clamp + 1)^2 instead of JiT's 1 / clamp^2. So an x0 output
carries that direct velocity (`Prediction.flow_direct`): the flow-space loss is JiT's exactly at every t, and
the flow samplers step with JiT's clamped velocity as JiT's sampler does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

PredictionKind = Literal["eps", "v", "x0", "flow"]
PREDICTIONS = get_args(PredictionKind)


def _check(kind: str, what: str = "prediction") -> None:
    if kind not in PREDICTIONS:
        raise ValueError(f"{what} must be one of {PREDICTIONS}, got {kind!r}")


def to_x0_eps(kind: str, out: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
              clamp: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A network output of type `kind` -> (x0, eps). alpha, sigma broadcast against x_t."""
    _check(kind)
    if kind == "eps":
        x0 = (x_t - sigma * out) / alpha.clamp_min(clamp)
        return x0, out
    if kind == "x0":
        return out, (x_t - alpha * out) / sigma.clamp_min(clamp)
    if kind == "v":
        norm = alpha ** 2 + sigma ** 2  # 1 for VP
        return (alpha * x_t - sigma * out) / norm, (sigma * x_t + alpha * out) / norm
    x0 = (x_t - sigma * out) / (alpha + sigma)  # flow; alpha + sigma = 1 on the linear path
    return x0, out + x0


def from_x0_eps(kind: str, x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """(x0, eps) -> the quantity of type `kind` (the regression target in that space)."""
    _check(kind)
    return {"eps": lambda: eps, "x0": lambda: x0, "v": lambda: alpha * eps - sigma * x0,
            "flow": lambda: eps - x0}[kind]()


@dataclass
class Prediction:
    """What a denoiser says about x_t: the clean estimate and the noise estimate (other spaces on demand)."""

    x0: torch.Tensor
    eps: torch.Tensor
    alpha: torch.Tensor
    """Broadcastable (B, 1, ...) float tensor, the alpha this prediction was made at."""
    sigma: torch.Tensor
    raw: torch.Tensor | None = None
    """The network output itself, in space `raw_kind` (None for combined predictions such as CFG's)."""
    raw_kind: str | None = None
    flow_direct: torch.Tensor | None = None
    """The flow velocity computed straight from an x0 output, (x_t - (alpha + sigma) x0) / max(sigma, clamp)
    (JiT's clamped v; module docstring); None: flow = eps - x0 (the same wherever sigma >= clamp)."""

    @property
    def v(self) -> torch.Tensor:
        return self.alpha * self.eps - self.sigma * self.x0

    @property
    def flow(self) -> torch.Tensor:
        return self.eps - self.x0 if self.flow_direct is None else self.flow_direct

    def get(self, kind: str) -> torch.Tensor:
        """The prediction in space `kind`; the network's own space is returned as output, unconverted."""
        if kind == self.raw_kind and self.raw is not None:
            return self.raw
        if kind == "flow":
            return self.flow
        return from_x0_eps(kind, self.x0, self.eps, self.alpha, self.sigma)


def expand_like(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or () coefficient -> (B, 1, 1, ...) in x's dtype, ready to multiply x."""
    coef = coef.to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        coef = coef.expand(x.shape[0])
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


class Denoiser(nn.Module):
    """D(x_t, t, cond) -> Prediction: wraps a backbone, a schedule and the backbone's output type.

    The backbone is called as backbone(x_t, schedule.model_time(t), **cond) (a float timestep: the
    index for VP, 1000 t for flow). Everything downstream (losses, samplers, guidance) sees only this.
    """

    def __init__(self, backbone: nn.Module, schedule, prediction: PredictionKind = "eps", clamp: float = 0.05):
        super().__init__()
        _check(prediction, "objective.prediction")
        self.backbone = backbone
        self.schedule = schedule
        self.prediction = prediction
        self.clamp = clamp

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """The backbone's output (in `self.prediction` space), (B, C, H, W)."""
        t = t.to(x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        return self.backbone(x_t, self.schedule.model_time(t), **(cond or {}))

    def to_prediction(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        """A backbone output `out` (prediction space) at (x_t, t) -> Prediction, with this denoiser's clamp.
        The loss passes its target through here too, so output and target see the same conversion."""
        alpha, sigma = self.schedule.alpha_sigma(t.to(x_t.device))
        alpha, sigma = expand_like(alpha, x_t), expand_like(sigma, x_t)  # (B, 1, 1, 1)
        out = out.to(x_t.dtype)
        x0, eps = to_x0_eps(self.prediction, out, x_t, alpha, sigma, self.clamp)
        flow = None
        if self.prediction == "x0":  # JiT's clamped velocity, not eps - x0 (module docstring)
            flow = (x_t - (alpha + sigma) * out) / sigma.clamp_min(self.clamp)
        return Prediction(x0=x0, eps=eps, alpha=alpha, sigma=sigma, raw=out, raw_kind=self.prediction,
                          flow_direct=flow)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict | None = None) -> Prediction:
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return self.to_prediction(self.raw(x_t, t, cond), x_t, t)
