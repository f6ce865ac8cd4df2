"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
arXiv 2312.02696, Sec. 3 and Appendix C): power-function EMA profiles tracked during training, and the
least-squares synthesis of the EMA of another length from snapshots of them after training.

A power-function EMA with exponent gamma, after t updates, is the average of the weights theta(tau) under the
profile  p(tau; t, gamma) = (gamma + 1) tau^gamma / t^(gamma + 1)  on [0, t] (it integrates to 1). Its update is
    ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1)          (EDM2 eq. 3)
(beta_1 = 0: the random initialisation gets no weight). Unrolling it, the weight of theta_tau in ema_t is
(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1) = the integral of p over (tau - 1, tau]: the discrete tracker
is exactly the continuous profile applied to the piecewise-constant weight trajectory, so the closed-form
inner products below are those of the tracked EMAs themselves, not an approximation of them.

The length is given as sigma_rel, the profile's standard deviation relative to its time t (EDM2 eq. 2):
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)),
so gamma is the largest real root of the cubic  sigma_rel^2 (gamma + 2)^2 (gamma + 3) - (gamma + 1) = 0.

Synthesis (EDM2 Appendix C.3): given snapshots i (profile p_i: time t_i, exponent gamma_i) and a target profile q,
find x minimising || q - sum_i x_i p_i ||^2 in L2([0, inf)), i.e. solve the normal equations A x = b with
A_ij = <p_i, p_j>, b_i = <p_i, q>; the synthesised weights are sum_i x_i ema_i. For two profiles
(t_a, gamma_a), (t_b, gamma_b), with m = min(t_a, t_b):
    <p_a, p_b> = (g_a + 1)(g_b + 1) / (t_a^(g_a+1) t_b^(g_b+1)) * integral_0^m tau^(g_a+g_b) dtau
               = (g_a + 1)(g_b + 1) m^(g_a+g_b+1) / ((g_a + g_b + 1) t_a^(g_a+1) t_b^(g_b+1))      (g = gamma),
evaluated here in log space (t^(gamma+1) overflows float64 for long runs and small sigma_rel).
The error of a synthesised EMA is integral (q - sum x_i p_i) theta: it shrinks with more (and denser)
snapshots and is zero when q is one of the snapshots' profiles.

Torch and numpy only: the training module tracks, `ldm-lightning ema-reconstruct` synthesises.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ldm_lightning.finite import check_finite_fields

# sigma_rel peaks at about 0.2887 (gamma = 0); larger values have no gamma >= 0 (EDM2 uses 0.01 .. 0.25).
MAX_SIGMA_REL = 0.28


@dataclass
class PosthocEMAConfig:
    """Post-hoc EMA (EDM2): power-function EMA profiles tracked during training, snapshotted every
    `snapshot_every` updates into `<checkpoint dir>/posthoc-ema/`; `ldm-lightning ema-reconstruct` synthesises
    the EMA of any sigma_rel from those snapshots after training. Each profile is one more copy of the network
    in memory and in the checkpoint."""

    sigma_rels: list[float] = field(default_factory=lambda: [0.05, 0.10])
    """Lengths of the tracked profiles, as the std of the averaging profile relative to the training time, each
    in (0, 0.28]. EDM2 tracks 0.05 and 0.10 and synthesises anything between roughly 0.01 and 0.25 from them."""
    snapshot_every: int = 1000
    """Write a snapshot of every profile each this many EMA updates (= optimizer steps unless the non-finite
    guard skipped some). More snapshots synthesise other lengths more accurately (EDM2 keeps ~160 per run)."""

    def __post_init__(self):
        check_finite_fields(self, "posthoc_ema")
        self.sigma_rels = [float(s) for s in self.sigma_rels]
        if not self.sigma_rels:
            raise ValueError("posthoc_ema.sigma_rels must list at least one length (leave posthoc_ema null to turn "
                             "post-hoc EMA off)")
        for s in self.sigma_rels:
            if not math.isfinite(s) or not 0.0 < s <= MAX_SIGMA_REL:
                raise ValueError(f"posthoc_ema.sigma_rels: every value must be in (0, {MAX_SIGMA_REL}]; got {s}")
        if len(set(self.sigma_rels)) != len(self.sigma_rels):
            raise ValueError(f"posthoc_ema.sigma_rels lists a value twice: {self.sigma_rels}")
        if self.snapshot_every < 1:
            raise ValueError(f"posthoc_ema.snapshot_every must be >= 1; got {self.snapshot_every}")


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The power-function exponent of relative std `sigma_rel` (largest real root of EDM2's cubic, above)."""
    if not 0.0 < sigma_rel <= MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL}]; got {sigma_rel}")
    s2 = sigma_rel * sigma_rel
    # s2 (g^3 + 7 g^2 + 16 g + 12) - g - 1 = 0
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def profile_inner_products(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """<p_a, p_b> for every pair (broadcast): the closed form of the module docstring, in log space."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) - np.log(g_a + g_b + 1) + (g_a + g_b + 1) * np.log(m)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return np.exp(log)


def synthesis_weights(ts, gammas, target_t: float, target_gamma: float) -> np.ndarray:
    """x of the least-squares fit  sum_i x_i p(t_i, gamma_i) ~ p(target_t, target_gamma)  (EDM2 App. C.3)."""
    ts, gammas = np.asarray(ts, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    a = profile_inner_products(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    b = profile_inner_products(ts, gammas, target_t, target_gamma)
    # lstsq rather than solve: snapshots close in time give nearly parallel profiles (a near-singular A).
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    return x


def profile_fit_error(ts, gammas, x, target_t: float, target_gamma: float) -> float:
    """|| q - sum x_i p_i || / || q ||: how well the snapshots' profiles span the target's (0 = exactly)."""
    ts, gammas = np.asarray(ts, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    a = profile_inner_products(ts[:, None], gammas[:, None], ts[None, :], gammas[None, :])
    b = profile_inner_products(ts, gammas, target_t, target_gamma)
    qq = float(profile_inner_products(target_t, target_gamma, target_t, target_gamma))
    err2 = qq - 2 * float(x @ b) + float(x @ a @ x)
    return math.sqrt(max(err2, 0.0) / qq)


class PowerEMA(nn.Module):
    """Frozen copies of `model`, one per sigma_rel, each a power-function EMA of its weights (EDM2 eq. 3).

    Like `EMA` (nn/ema.py), the copies are ordinary submodules: saved in the owner's state dict (a resume
    continues every profile exactly), moved across devices with it, never seen by an optimizer. Kept in
    float32 whatever the training precision: (1 - beta_t) falls below bf16's resolution within a few steps.
    """

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        super().__init__()
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.profiles = nn.ModuleList(
            copy.deepcopy(model).float().eval().requires_grad_(False) for _ in self.sigma_rels)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        t = int(self.num_updates)
        live = dict(model.named_parameters())
        live_buffers = dict(model.named_buffers())
        for gamma, profile in zip(self.gammas, self.profiles):
            weight = 1.0 - (1.0 - 1.0 / t) ** (gamma + 1)  # 1 - beta_t; 1 at t = 1
            for name, e in profile.named_parameters():
                e.lerp_(live[name].detach().to(e.dtype), weight)
            for name, b in profile.named_buffers():  # running statistics etc.: the live ones, as EMA does
                b.copy_(live_buffers[name])

    def snapshot(self) -> dict[str, torch.Tensor]:
        """{'<profile index>.<state-dict key>': tensor} of every profile, on the CPU, sharing no storage. Profiles
        sharded under FSDP2 (DTensors) are gathered into full tensors: then every rank must call this."""
        from torch.distributed.tensor import DTensor

        def full(v: torch.Tensor) -> torch.Tensor:
            return v.full_tensor() if isinstance(v, DTensor) else v
        return {f"{i}.{k}": full(v.detach()).to("cpu", copy=True).contiguous()
                for i, profile in enumerate(self.profiles) for k, v in profile.state_dict().items()}
