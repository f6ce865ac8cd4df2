"""The diffusion training loss: timestep sampling, noising, prediction-space change and weighting.

Prediction space and loss space are independent (JiT, arXiv 2511.13720: predict x0, regress v).
Min-SNR-gamma (Hang et al. 2023) is defined on the x0-space error, w_x0 = min(SNR, gamma); in another
loss space L the same weighting is w_x0 / k_L, where ||dL||^2 = k_L ||dx0||^2 at fixed x_t:
k_eps = SNR, k_v = (alpha^2 + sigma^2)^2 / sigma^2 (= SNR + 1 for VP), k_flow = ((alpha + sigma) / sigma)^2.
This reproduces the paper's eps and v weights, min(SNR, g)/SNR and min(SNR, g)/(SNR + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objectives import PREDICTIONS, broadcast_to, from_x0_eps, to_x0_eps

TIMESTEP_SAMPLING = ("uniform", "logit_normal")
WEIGHTINGS = ("none", "min_snr")


@dataclass
class ObjectiveConfig:
    """What the denoiser predicts, where the loss is taken, which timesteps are trained and how they weigh."""

    prediction: str = "eps"
    """Backbone output: 'eps', 'v', 'x0' or 'flow'."""
    loss_space: str | None = None
    """Space of the MSE: one of the same four; None = the prediction space."""
    timestep_sampling: str = "uniform"
    """'uniform' or 'logit_normal' (SD3 §3.1: t = sigmoid(N(mean, std)))."""
    logit_mean: float = 0.0
    """Mean of the logit-normal (JiT uses -0.8)."""
    logit_std: float = 1.0
    """Std of the logit-normal (JiT uses 0.8)."""
    weighting: str = "none"
    """'none' or 'min_snr' (Hang et al. 2023)."""
    snr_gamma: float = 5.0
    """gamma of min-SNR weighting."""
    clamp: float = 0.05
    """Lower bound on the alpha / sigma denominators when converting prediction -> loss space (JiT's 0.05)."""

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"objective.prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.loss_space is None:
            self.loss_space = self.prediction
        if self.loss_space not in PREDICTIONS:
            raise ValueError(f"objective.loss_space must be one of {PREDICTIONS} or None, got {self.loss_space!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"objective.timestep_sampling must be one of {TIMESTEP_SAMPLING}, "
                             f"got {self.timestep_sampling!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.logit_std <= 0 or self.snr_gamma <= 0:
            raise ValueError("objective.logit_std and objective.snr_gamma must be > 0")


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

    def __init__(self, config: ObjectiveConfig, schedule):
        self.cfg = config
        self.schedule = schedule

    def sample_timesteps(self, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
        if self.cfg.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        else:
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            u = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        return self.schedule.sample_t(u)  # VP: index floor(u T); flow: shifted t

    def weight(self, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) loss weights for the configured loss space."""
        if self.cfg.weighting == "none":
            return torch.ones_like(alpha)
        snr = alpha ** 2 / sigma.clamp_min(1e-12) ** 2
        w_x0 = snr.clamp_max(self.cfg.snr_gamma)
        k = {"x0": torch.ones_like(snr), "eps": snr, "v": (alpha ** 2 + sigma ** 2) ** 2 / sigma ** 2,
             "flow": ((alpha + sigma) / sigma) ** 2}[self.cfg.loss_space]
        return w_x0 / k

    def loss(self, denoiser, x0: torch.Tensor, cond: dict | None = None,
             generator: torch.Generator | None = None) -> LossOutput:
        B = x0.shape[0]
        t = self.sample_timesteps(B, generator, x0.device)  # (B,)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)  # (B, C, H, W)
        alpha, sigma = self.schedule.alpha_sigma(t)  # (B,) float64
        a, s = broadcast_to(alpha, x0), broadcast_to(sigma, x0)  # (B, 1, 1, 1)
        x_t = a * x0 + s * noise  # (B, C, H, W)
        out = denoiser.raw(x_t, t, cond).float()  # (B, C, H, W), prediction space
        if self.cfg.loss_space == self.cfg.prediction:
            pred = out
        else:
            px0, peps = to_x0_eps(self.cfg.prediction, out, x_t.float(), a.float(), s.float(), self.cfg.clamp)
            pred = from_x0_eps(self.cfg.loss_space, px0, peps, a.float(), s.float())
        target = from_x0_eps(self.cfg.loss_space, x0.float(), noise.float(), a.float(), s.float())
        mse = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
        w = self.weight(alpha, sigma).to(mse)
        return LossOutput(loss=w * mse, t=t, t_fraction=self.schedule.t_fraction(t).float())


def loss_by_bin(loss: torch.Tensor, t_fraction: torch.Tensor, bins: int = 10) -> dict[str, torch.Tensor]:
    """Mean per-sample loss in `bins` equal bins of t in [0, 1]: {'loss_t0': ..., 'loss_t9': ...}.

    Empty bins are omitted (so a logged mean is never a fake 0). Keys name the bin index; bin i covers
    t_fraction in [i/bins, (i+1)/bins).
    """
    idx = (t_fraction.clamp(0, 1) * bins).long().clamp_max(bins - 1)  # (B,)
    sums = torch.zeros(bins, device=loss.device, dtype=torch.float32).index_add_(0, idx, loss.detach().float())
    counts = torch.bincount(idx, minlength=bins)
    return {f"loss_t{i}": sums[i] / counts[i] for i in range(bins) if counts[i] > 0}
