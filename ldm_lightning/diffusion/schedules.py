"""Noise schedules. Every process is x_t = alpha_t * x0 + sigma_t * eps (EDM's unifying view).

- `VPSchedule`: discrete variance-preserving (DDPM family), t an integer index 0..T-1,
  alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t).
- `FlowSchedule`: rectified flow (SD3, arXiv 2403.03206), t in [0, 1], alpha = 1 - t, sigma = t.

Both expose the same interface to losses and samplers: `alpha_sigma(t)`, `model_time(t)` (the float
the backbone embeds), `sample_t(u)` (u in (0,1) -> a training timestep) and `inference_times(steps,
spacing)` (descending timesteps a sampler visits; samplers append the clean end point alpha=1, sigma=0).
Tables are float64: conversions near t=0 lose digits in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields

BetaSchedule = Literal["linear", "scaled_linear", "cosine"]
BETA_SCHEDULES = get_args(BetaSchedule)
Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS = get_args(Spacing)


def make_betas(name: str, T: int = 1000, beta_start: float | None = None, beta_end: float | None = None,
               cosine_s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """(T,) float64 betas.

    linear: DDPM (Ho et al. 2020) linspace(1e-4, 0.02); scaled_linear: Stable Diffusion,
    linspace(sqrt(0.00085), sqrt(0.012))**2; cosine: Nichol & Dhariwal 2021 eq. 17,
    abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), beta_t = min(1 - abar(t+1)/abar(t), max_beta).
    """
    if name == "linear":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if name == "scaled_linear":
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=torch.float64) ** 2
    if name == "cosine":
        f = lambda t: math.cos((t / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"beta schedule must be one of {BETA_SCHEDULES}, got {name!r}")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1:
    shift and scale sqrt(abar) so that the last step has SNR exactly 0 and the first is unchanged."""
    abar_sqrt = torch.cumprod(1 - betas, 0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - aT) * a0 / (a0 - aT)
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


@dataclass
class VPSchedule:
    """Discrete variance-preserving schedule (DDPM / LDM / SD)."""

    beta_schedule: BetaSchedule = "scaled_linear"
    """One of 'linear', 'scaled_linear' (SD), 'cosine' (improved DDPM)."""
    num_timesteps: int = 1000
    """T: training timesteps 0..T-1."""
    zero_terminal_snr: bool = False
    """Rescale to SNR(T-1) = 0 (Lin et al. 2023); pair it with v or x0 prediction and 'trailing' spacing."""
    steps_offset: int = 0
    """Added to 'leading' timesteps (SD configs use 1), as diffusers' `steps_offset`."""

    kind = "vp"

    def __post_init__(self):
        check_finite_fields(self, "schedule")  # NaN/inf pass every comparison below
        check_choices(self, "schedule")
        if self.num_timesteps < 2:
            raise ValueError(f"schedule.num_timesteps must be >= 2, got {self.num_timesteps}")
        betas = make_betas(self.beta_schedule, self.num_timesteps)
        if self.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)  # (T,) float64

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t: integer indices (any shape) -> (alpha, sigma) float64 of the same shape."""
        abar = self.alphas_cumprod.to(t.device)[t.long()]
        return abar.sqrt(), (1 - abar).sqrt()

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def sample_t(self, u: torch.Tensor) -> torch.Tensor:
        """u in [0, 1) -> index floor(u * T) (uniform u gives DDPM's uniform integer t)."""
        return (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)

    def t_fraction(self, t: torch.Tensor) -> torch.Tensor:
        """Position of t in [0, 1] (0 = clean) for loss binning."""
        return t.double() / (self.num_timesteps - 1)

    def inference_times(self, steps: int, spacing: str = "trailing") -> torch.Tensor:
        """(steps,) descending int64 indices, diffusers' `DDIMScheduler.set_timesteps` conventions
        (Lin et al. 2023 Table 2: 'trailing' starts at T-1, the others may not)."""
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        # numpy, as diffusers: float arange/linspace element counts and rounding then agree bit for bit.
        if spacing == "leading":
            t = (np.arange(0, steps) * (T // steps)).round()[::-1] + self.steps_offset
        elif spacing == "trailing":
            t = np.round(np.arange(T, 0, -T / steps)) - 1
        elif spacing == "linspace":
            t = np.linspace(0, T - 1, steps).round()[::-1]
        else:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        return torch.from_numpy(t.astype(np.int64).copy())


@dataclass
class FlowSchedule:
    """Rectified flow / conditional flow matching with a linear path (Liu et al. 2022; SD3).

    Two kinds of shift, both t' = s*t / (1 + (s-1)*t): the training shift (`shift`, or RAE's dimension-dependent
    one from `shift_base_dim`) moves the noise levels trained and, by default, the sampling grid; `sample_shift`
    moves only the sampling grid (`inference_times`), so a model can be sampled with more steps at high noise
    than it was trained with."""

    shift: float = 1.0
    """Timestep shift s: t' = s*t / (1 + (s-1)*t) (SD3 eq. 23; s > 1 spends more steps at high noise). Applies to
    training and, unless `sample_shift` is set, to the sampling grid."""
    time_scale: float = 1000.0
    """The backbone embeds time_scale * t, so its sinusoidal embedding sees the same range as VP indices."""
    shift_base_dim: int | None = None
    """RAE's dimension-dependent shift (Zheng et al. 2025, arXiv 2510.11690, "noise schedule shift"): when set,
    the shift is s = sqrt(m / n) with m = `latent_dim` (C*H*W of the stage-2 latent) and n = this base dimension
    (RAE uses n = 4096; its 16x16x768 DINOv2-B latents get s = sqrt(196608 / 4096) = 6.93). A wider latent keeps
    more of its signal at a given noise level, so it is trained at higher noise. Replaces `shift` (leave that 1)."""
    latent_dim: int | None = None
    """m for `shift_base_dim`: the DiffusionModule fills it in from its autoencoder's latent shape and records it
    in the checkpoint, so a loaded model rebuilds the same shift (set it by hand only outside the module)."""
    sample_shift: float | None = None
    """Shift of the SAMPLING grid only, independent of the training shift (None: the training shift). s > 1 puts
    more of the sampler's steps at high noise, which DDT (Wang et al. 2025, arXiv 2504.05741) reports helps
    few-step sampling. `ldm-lightning sample --time-shift` overrides it for one run."""

    kind = "flow"

    def __post_init__(self):
        check_finite_fields(self, "schedule")  # NaN/inf pass every comparison below
        if self.shift <= 0:
            raise ValueError(f"schedule.shift must be > 0, got {self.shift}")
        if self.sample_shift is not None and self.sample_shift <= 0:
            raise ValueError(f"schedule.sample_shift must be > 0 or null, got {self.sample_shift}")
        if self.shift_base_dim is not None:
            if self.shift_base_dim < 1:
                raise ValueError(f"schedule.shift_base_dim must be >= 1, got {self.shift_base_dim}")
            if self.latent_dim and self.shift not in (1.0, math.sqrt(self.latent_dim / self.shift_base_dim)):
                raise ValueError(f"schedule.shift={self.shift} and schedule.shift_base_dim={self.shift_base_dim} "
                                 "both set the training shift: keep one (shift_base_dim computes it from the latent)")
            if not self.latent_dim or self.latent_dim < 1:
                raise ValueError("schedule.shift_base_dim needs schedule.latent_dim (C*H*W of the latent; the "
                                 "DiffusionModule fills it in from its autoencoder)")
            self.shift = math.sqrt(self.latent_dim / self.shift_base_dim)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.double()
        return 1 - t, t

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() * self.time_scale

    def shift_t(self, t: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        s = self.shift if shift is None else shift
        return s * t / (1 + (s - 1) * t)

    def sample_t(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift_t(u)

    def t_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.double()

    def inference_times(self, steps: int, spacing: str = "linspace") -> torch.Tensor:
        """(steps,) descending t from 1 (pure noise) to 1/steps before the shift (`sample_shift`, else the training
        shift); 0 is appended by samplers. `spacing` is validated for a uniform signature; the flow grid is always
        uniform in t before the shift."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        return self.shift_t(torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1], self.sample_shift)


def build_schedule(kind: str = "vp", **kwargs):
    """'vp' -> VPSchedule(**kwargs); 'flow' -> FlowSchedule(**kwargs)."""
    if kind == "vp":
        return VPSchedule(**kwargs)
    if kind == "flow":
        return FlowSchedule(**kwargs)
    raise ValueError(f"schedule kind must be 'vp' or 'flow', got {kind!r}")
