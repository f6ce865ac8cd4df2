"""Samplers, one signature (k-diffusion style):

    sampler(denoiser_fn, x_T, schedule, steps, generator=None, **options) -> x0

`denoiser_fn(x, t) -> Prediction` (guidance already folded in; t a (B,) tensor in schedule units).
Each sampler walks the descending grid `schedule.inference_times(steps, spacing)` (or an explicit
`timesteps=`) and ends at the clean point alpha = 1, sigma = 0 (a flow schedule's `sample_shift`, or
`ldm-lightning sample --time-shift`, reshapes that grid without touching the training shift). All updates
are written in (alpha, sigma), so the VP samplers are exact for any such schedule; the flow samplers need
alpha + sigma = 1.
NFE: ddpm/ddim/euler/dpmpp_2m/flow_euler = steps; heun/flow_heun = 2*steps - 1.
"""

from __future__ import annotations

import torch

from .denoiser import Prediction


def _grid(schedule, steps, spacing, timesteps):
    t = schedule.inference_times(steps, spacing) if timesteps is None else torch.as_tensor(timesteps)
    alpha, sigma = schedule.alpha_sigma(t)
    one, zero = torch.ones(1, dtype=alpha.dtype), torch.zeros(1, dtype=alpha.dtype)
    return t, torch.cat([alpha.cpu(), one]).tolist(), torch.cat([sigma.cpu(), zero]).tolist()  # end: clean


def _call(fn, x, t) -> Prediction:
    return fn(x, t.to(x.device).expand(x.shape[0]))


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddpm(fn, x, schedule, steps, generator=None, spacing="trailing", timesteps=None):
    """Ancestral sampling from the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2), strided as in
    Nichol & Dhariwal 2021 §4 (beta_t -> 1 - abar_t / abar_s); written in VDM (Kingma et al. 2021) form."""
    ts, A, S = _grid(schedule, steps, spacing, timesteps)
    for i, t in enumerate(ts):
        p = _call(fn, x, t)
        a_t, s_t, a_s, s_s = A[i], S[i], A[i + 1], S[i + 1]
        a_ts = a_t / a_s
        var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2  # variance of q(x_t | x_s)
        mean = (a_s * var_ts / s_t ** 2) * p.x0 + (a_ts * s_s ** 2 / s_t ** 2) * x
        x = mean + (var_ts * s_s ** 2 / s_t ** 2) ** 0.5 * _noise(x, generator) if s_s > 0 else mean
    return x


@torch.no_grad()
def ddim(fn, x, schedule, steps, generator=None, eta=0.0, spacing="trailing", timesteps=None):
    """DDIM (Song et al. 2021, eq. 12): x_s = a_s x0 + sqrt(s_s^2 - c^2) eps + c z,
    c = eta * s_s * sqrt(1 - SNR_t / SNR_s) (eta=1: DDPM posterior variance, eta=0: deterministic)."""
    ts, A, S = _grid(schedule, steps, spacing, timesteps)
    for i, t in enumerate(ts):
        p = _call(fn, x, t)
        a_t, s_t, a_s, s_s = A[i], S[i], A[i + 1], S[i + 1]
        c = eta * s_s * max(0.0, 1 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2) ** 0.5 if s_s > 0 else 0.0
        x = a_s * p.x0 + (s_s ** 2 - c ** 2) ** 0.5 * p.eps
        if c > 0:
            x = x + c * _noise(x, generator)
    return x


def _karras(fn, x, schedule, steps, spacing, timesteps, heun: bool):
    # Karras et al. 2022 Alg. 1 (Euler) / Alg. 2 (Heun, S_churn = 0) on the VE variable x / alpha with
    # sigma_ve = sigma / alpha: dx/dsigma = (x - D(x; sigma)) / sigma.
    ts, A, S = _grid(schedule, steps, spacing, timesteps)
    if A[0] == 0:
        raise ValueError("euler/heun need alpha > 0 at the first step (zero-terminal-SNR: use ddim or dpmpp_2m)")
    sig = [s / a for a, s in zip(A, S)]
    x = x / A[0]
    for i, t in enumerate(ts):
        d = (x - _call(fn, x * A[i], t).x0) / sig[i]
        x_next = x + (sig[i + 1] - sig[i]) * d
        if heun and sig[i + 1] > 0:
            d2 = (x_next - _call(fn, x_next * A[i + 1], ts[i + 1]).x0) / sig[i + 1]
            x_next = x + (sig[i + 1] - sig[i]) * (d + d2) / 2
        x = x_next
    return x  # sigma = 0: x / alpha = x0


@torch.no_grad()
def euler(fn, x, schedule, steps, generator=None, spacing="trailing", timesteps=None):
    return _karras(fn, x, schedule, steps, spacing, timesteps, heun=False)


@torch.no_grad()
def heun(fn, x, schedule, steps, generator=None, spacing="trailing", timesteps=None):
    return _karras(fn, x, schedule, steps, spacing, timesteps, heun=True)


@torch.no_grad()
def dpmpp_2m(fn, x, schedule, steps, generator=None, spacing="trailing", timesteps=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), data prediction, lambda = log(alpha / sigma):
    x_s = (s_s / s_t) x - a_s (e^-h - 1) D, D = (1 + 1/2r) x0_i - (1/2r) x0_{i-1}, r = h_{i-1} / h_i;
    first order on the first step and on the last (sigma = 0, h infinite), as diffusers / k-diffusion."""
    ts, A, S = _grid(schedule, steps, spacing, timesteps)
    lam = [torch.tensor(a / s if s > 0 else float("inf"), dtype=torch.float64).log().item() for a, s in zip(A, S)]
    old_x0, h_prev = None, None
    for i, t in enumerate(ts):
        x0 = _call(fn, x, t).x0
        a_s, s_s, s_t = A[i + 1], S[i + 1], S[i]
        if s_s == 0:
            x = x0  # h = inf: e^-h = 0, x_s = a_s * x0 with a_s = 1
            break
        h = lam[i + 1] - lam[i]
        D = x0
        if old_x0 is not None:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old_x0
        x = (s_s / s_t) * x - a_s * torch.expm1(torch.tensor(-h, dtype=torch.float64)).item() * D
        old_x0, h_prev = x0, h
    return x


def _flow(fn, x, schedule, steps, spacing, timesteps, heun: bool):
    # Rectified flow: dx/dt = u(x, t) = eps - x0 on alpha = 1 - t, sigma = t; integrate t: 1 -> 0
    # (Euler; Heun = Karras Alg. 2 in t, as SD3 / JiT sampling).
    if getattr(schedule, "kind", None) != "flow":
        raise ValueError("flow_euler / flow_heun need a FlowSchedule (alpha = 1 - t, sigma = t); "
                         "use ddim / dpmpp_2m for VP")
    ts, _, S = _grid(schedule, steps, spacing, timesteps)
    for i, t in enumerate(ts):
        u = _call(fn, x, t).flow
        x_next = x + (S[i + 1] - S[i]) * u
        if heun and S[i + 1] > 0:
            u2 = _call(fn, x_next, torch.tensor(S[i + 1], dtype=torch.float64)).flow
            x_next = x + (S[i + 1] - S[i]) * (u + u2) / 2
        x = x_next
    return x


@torch.no_grad()
def flow_euler(fn, x, schedule, steps, generator=None, spacing="linspace", timesteps=None):
    return _flow(fn, x, schedule, steps, spacing, timesteps, heun=False)


@torch.no_grad()
def flow_heun(fn, x, schedule, steps, generator=None, spacing="linspace", timesteps=None):
    return _flow(fn, x, schedule, steps, spacing, timesteps, heun=True)


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun, "dpmpp_2m": dpmpp_2m,
            "flow_euler": flow_euler, "flow_heun": flow_heun}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]
