"""The diffusion training loss: timestep sampling, noising, prediction-space change and weighting.

Prediction space and loss space are independent (JiT, arXiv 2511.13720: predict x0, regress v).
The loss calls the Denoiser and takes `prediction.get(loss_space)`; the target is the perfect network
output passed through the same `Denoiser.to_prediction` (same schedule, same clamp), so a perfect
network has exactly zero loss at every t, as JiT's clamping of both prediction and target gives. With x0
prediction and the loss on the flow velocity (JiT's v-loss) the per-sample loss is JiT's exactly at every t,
mean |x0_pred - x0|^2 / max(sigma, clamp)^2, below the clamp too (denoiser.py: that velocity is taken
straight from x0, not through eps).

Noise-level convention: x_t = alpha_t x0 + sigma_t eps. On the flow path sigma = t, so t = 1 is pure
noise and t = 0 is clean (SD3's convention; JiT writes z = t x + (1 - t) eps, the reverse).
Min-SNR-gamma (Hang et al. 2023) is defined on the x0-space error, w_x0 = min(SNR, gamma); in another
loss space L the same weighting is w_x0 / k_L, where ||dL||^2 = k_L ||dx0||^2 at fixed x_t:
k_eps = SNR, k_v = (alpha^2 + sigma^2)^2 / sigma^2 (= SNR + 1 for VP), k_flow = ((alpha + sigma) / sigma)^2.
This reproduces the paper's eps and v weights, min(SNR, g)/SNR and min(SNR, g)/(SNR + 1). SD3's
rectified-flow weight (`weighting: sd3`) is w_x0 = k_flow in the same scheme: the flow-matching loss in any space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields
from .denoiser import PredictionKind, expand_like, from_x0_eps

TimestepSampling = Literal["uniform", "logit_normal"]
TIMESTEP_SAMPLING = get_args(TimestepSampling)
Weighting = Literal["none", "min_snr", "sd3"]
WEIGHTINGS = get_args(Weighting)


@dataclass
class ObjectiveConfig:
    """What the denoiser predicts, where the loss is taken, which timesteps are trained and how they weigh."""

    prediction: PredictionKind = "eps"
    """Backbone output: 'eps', 'v', 'x0' or 'flow'."""
    loss_space: PredictionKind | None = None
    """Space of the MSE: one of the same four; None = the prediction space."""
    timestep_sampling: TimestepSampling = "uniform"
    """'uniform' or 'logit_normal' (SD3 §3.1: u = sigmoid(N(mean, std)), then the schedule's t(u))."""
    logit_mean: float = 0.0
    """Mean of the logit-normal over the NOISE level: t = 1 is pure noise here (sigma = t on the flow path),
    so a positive mean trains more at high noise. JiT's recipe (written with t = 1 clean, mean -0.8) is +0.8
    in this convention; SD3 uses 0.0."""
    logit_std: float = 1.0
    """Std of the logit-normal (JiT uses 0.8, SD3 1.0)."""
    weighting: Weighting = "none"
    """'none', 'min_snr' (Hang et al. 2023) or 'sd3': SD3's rectified-flow weight (Esser et al. 2024, arXiv
    2403.03206, §2 and Table 1's 'rf'): L = -1/2 E[w_t lambda'_t ||eps_pred - eps||^2] with w_t = t / (1 - t),
    lambda_t = log SNR = 2 log((1 - t) / t), so the eps-space weight is w_t (-lambda'_t / 2) = 1 / (1 - t)^2. That is
    the flow-matching loss ||u_pred - u||^2 in any loss space (x0-space weight ((alpha + sigma) / sigma)^2), i.e. an
    eps/x0/v-space loss weighted to train like SD3; with loss_space 'flow' it is 1. Timestep density stays with
    `timestep_sampling` (SD3: logit_normal(0, 1))."""
    snr_gamma: float = 5.0
    """gamma of min-SNR weighting."""
    clamp: float = 0.05
    """Lower bound on the alpha / sigma denominators of the prediction-space conversions (JiT's 0.05). The
    Denoiser owns it: applied alike to the network output and to the target, in training and sampling."""

    def __post_init__(self):
        check_finite_fields(self, "objective")  # NaN/inf pass every comparison below
        check_choices(self, "objective")
        if self.loss_space is None:
            self.loss_space = self.prediction
        if self.logit_std <= 0 or self.snr_gamma <= 0:
            raise ValueError("objective.logit_std and objective.snr_gamma must be > 0")
        if not 0 <= self.clamp < 1:
            raise ValueError(f"objective.clamp must be in [0, 1), got {self.clamp}")


@dataclass
class LossOutput:
    loss: torch.Tensor
    """(B,) per-sample weighted MSE (mean over C, H, W)."""
    t: torch.Tensor
    """(B,) the timesteps drawn (schedule units)."""
    t_fraction: torch.Tensor
    """(B,) t mapped to [0, 1] (0 = clean), for `loss_by_bin`."""


class DiffusionObjective:
    """`loss(denoiser, x0, cond, generator)`; every random draw comes from `generator`."""

    def __init__(self, config: ObjectiveConfig, schedule=None):
        self.cfg = config
        self.schedule = schedule  # only for `sample_timesteps` without a denoiser; `loss` uses the denoiser's

    def sample_timesteps(self, n: int, generator: torch.Generator | None, device, schedule=None) -> torch.Tensor:
        if self.cfg.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        else:
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        return (schedule or self.schedule).sample_t(u)  # VP: index floor(u T); flow: shifted t

    def weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights for the configured loss space."""
        if self.cfg.weighting == "none":
            return torch.ones_like(alpha)
        snr = alpha ** 2 / sigma.clamp_min(1e-12) ** 2
        if self.cfg.weighting == "sd3":  # the flow-matching loss's own x0-space weight, k_flow (docstring)
            w_x0 = ((alpha + sigma) / sigma.clamp_min(1e-12)) ** 2
        else:
            w_x0 = snr.clamp_max(self.cfg.snr_gamma)
        k = {"x0": torch.ones_like(snr), "eps": snr, "v": (alpha ** 2 + sigma ** 2) ** 2 / sigma ** 2,
             "flow": ((alpha + sigma) / sigma) ** 2}[self.cfg.loss_space]
        return w_x0 / k

    def loss(self, denoiser, x0: torch.Tensor, cond: dict | None = None,
             generator: torch.Generator | None = None, t: torch.Tensor | None = None) -> LossOutput:
        """Per-sample loss of `denoiser` on clean x0 (B, C, H, W). `t` (B,) fixes the noise levels (e.g. to
        evaluate the loss on a grid of t); by default they are drawn from `generator` before the noise."""
        B = x0.shape[0]
        x0 = x0.float()
        schedule = denoiser.schedule  # the one schedule owner
        t = self.sample_timesteps(B, generator, x0.device, schedule) if t is None else t.to(x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
        alpha, sigma = schedule.alpha_sigma(t)  # (B,) float64
        a, s = expand_like(alpha, x0), expand_like(sigma, x0)  # (B, 1, 1, 1)
        x_t = a * x0 + s * noise  # (B, C, H, W)
        pred = denoiser(x_t, t, cond).get(self.cfg.loss_space)  # (B, C, H, W)
        perfect = from_x0_eps(self.cfg.prediction, x0, noise, a, s)  # what a perfect network outputs
        target = denoiser.to_prediction(perfect, x_t, t).get(self.cfg.loss_space)  # same conversion as pred
        mse = (pred.float() - target).pow(2).flatten(1).mean(1)  # (B,)
        w = self.weight(alpha, sigma).to(mse)
        return LossOutput(loss=w * mse, t=t, t_fraction=schedule.t_fraction(t).float())


def loss_by_bin(loss: torch.Tensor, t_fraction: torch.Tensor, bins: int = 10) -> dict[str, torch.Tensor]:
    """Mean per-sample loss in `bins` equal bins of t in [0, 1]: {'loss_t0': ..., 'loss_t9': ...}.

    Empty bins are omitted (so a logged mean is never a fake 0). Keys name the bin index; bin i covers
    t_fraction in [i/bins, (i+1)/bins).
    """
    idx = (t_fraction.clamp(0, 1) * bins).long().clamp_max(bins - 1)  # (B,)
    sums = torch.zeros(bins, device=loss.device, dtype=torch.float32).index_add_(0, idx, loss.detach().float())
    counts = torch.bincount(idx, minlength=bins)
    return {f"loss_t{i}": sums[i] / counts[i] for i in range(bins) if counts[i] > 0}
