"""Samplers: step-for-step equivalence with diffusers, and convergence on a target with an exact denoiser."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.diffusion import SAMPLERS, FlowSchedule, VPSchedule, get_sampler, to_x0_eps
from ldm_lightning.diffusion.denoiser import Prediction, expand_like

from gmm_oracle import GaussianMixture, gaussian_w2  # the closed-form test oracle (tests/gmm_oracle.py)

GMM = GaussianMixture.default(dim=2)


def _eps_model(schedule):
    """An eps-prediction 'network' (the exact GMM one), float32 in and out, as diffusers sees a UNet."""
    def eps(x, t):
        t = torch.as_tensor(t).reshape(-1).expand(x.shape[0])
        a, s = schedule.alpha_sigma(t)
        x0 = GMM.x0_hat(x.double(), a, s)
        return ((x.double() - expand_like(a, x0) * x0) / expand_like(s, x0)).float()
    return eps


def _ours_from_eps(schedule, eps):
    def fn(x, t):
        a, s = schedule.alpha_sigma(t)
        a, s = expand_like(a, x), expand_like(s, x)
        out = eps(x, t)
        x0, e = to_x0_eps("eps", out, x, a, s)
        return Prediction(x0=x0, eps=e, alpha=a, sigma=s)
    return fn


def _run_diffusers(sched, eps, x, steps):
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(eps(x, t), t, x).prev_sample
    return x, sched.timesteps


@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("trailing", 25), ("leading", 20)])
@pytest.mark.parametrize("beta", ["scaled_linear", "linear"])
def test_ddim_matches_diffusers(spacing, steps, beta):
    from diffusers import DDIMScheduler
    sched = VPSchedule(beta, steps_offset=1)
    kw = dict(beta_start=0.00085, beta_end=0.012) if beta == "scaled_linear" else {}
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule=beta, clip_sample=False, set_alpha_to_one=True,
                        timestep_spacing=spacing, steps_offset=1, prediction_type="epsilon", **kw)
    eps = _eps_model(sched)
    xT = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    want, ts = _run_diffusers(ref, eps, xT.clone(), steps)
    got = SAMPLERS["ddim"](_ours_from_eps(sched, eps), xT.clone(), sched, steps, spacing=spacing)
    assert ts.tolist() == sched.inference_times(steps, spacing).tolist()
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("trailing", 20), ("linspace", 15)])
def test_dpmpp_2m_matches_diffusers(spacing, steps):
    from diffusers import DPMSolverMultistepScheduler
    sched = VPSchedule("scaled_linear")
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                      beta_end=0.012, algorithm_type="dpmsolver++", solver_order=2,
                                      solver_type="midpoint", timestep_spacing=spacing, prediction_type="epsilon",
                                      final_sigmas_type="zero", lower_order_final=True)
    eps = _eps_model(sched)
    xT = torch.randn(256, 2, generator=torch.Generator().manual_seed(1))
    want, ts = _run_diffusers(ref, eps, xT.clone(), steps)
    # diffusers' DPM-Solver grids differ from DDIM's for 'linspace' (steps+1 points, last dropped): pass its timesteps
    got = SAMPLERS["dpmpp_2m"](_ours_from_eps(sched, eps), xT.clone(), sched, steps, timesteps=ts.clone())
    assert (got - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    if spacing == "trailing":
        assert ts.tolist() == sched.inference_times(steps, spacing).tolist()


def test_stochastic_ddim_matches_diffusers_with_the_same_generator():
    from diffusers import DDIMScheduler
    sched = VPSchedule("scaled_linear")
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    eps = _eps_model(sched)
    xT = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    ref.set_timesteps(20)
    x, g = xT.clone(), torch.Generator().manual_seed(9)
    for t in ref.timesteps:
        x = ref.step(eps(x, t), t, x, eta=0.7, generator=g).prev_sample
    got = SAMPLERS["ddim"](_ours_from_eps(sched, eps), xT.clone(), sched, 20, eta=0.7,
                           generator=torch.Generator().manual_seed(9))
    assert (got - x).abs().max().item() < 1e-4


def test_ddpm_matches_diffusers_with_the_same_generator():
    from diffusers import DDPMScheduler
    sched = VPSchedule("linear")
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                        timestep_spacing="leading", variance_type="fixed_small", prediction_type="epsilon")
    eps = _eps_model(sched)
    xT = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    ref.set_timesteps(50)
    x, g = xT.clone(), torch.Generator().manual_seed(9)
    for t in ref.timesteps:
        x = ref.step(eps(x, t), t, x, generator=g).prev_sample
    got = SAMPLERS["ddpm"](_ours_from_eps(sched, eps), xT.clone(), sched, 50, spacing="leading",
                           generator=torch.Generator().manual_seed(9))
    assert (got - x).abs().max().item() < 1e-4


# ------------------------------------------------------------------------ convergence on the exact-score target
def _ode_error(name, schedule, steps, xT, ref, **kw):
    x = SAMPLERS[name](GMM.denoiser(schedule), xT.clone(), schedule, steps, **kw)
    return (x - ref).pow(2).sum(1).mean().sqrt().item()  # RMS distance to the converged ODE solution


@pytest.fixture(scope="module")
def vp_reference():
    sched = VPSchedule("linear")
    xT = torch.randn(512, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = SAMPLERS["heun"](GMM.denoiser(sched), xT.clone(), sched, 1000)  # 1999 NFE on the full index grid
    return sched, xT, ref


def test_vp_ode_samplers_converge_with_steps(vp_reference):
    sched, xT, ref = vp_reference
    for name in ("ddim", "euler", "heun", "dpmpp_2m"):
        errs = [_ode_error(name, sched, n, xT, ref) for n in (5, 10, 20, 50)]
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)  # error falls with steps
        assert errs[-1] < 0.1, (name, errs)
    # the reference itself is converged: halving its step count barely moves it
    assert _ode_error("heun", sched, 500, xT, ref) < 2e-3


@pytest.mark.parametrize("steps", [10, 15])
def test_dpmpp_2m_beats_ddim_at_same_steps(vp_reference, steps):
    sched, xT, ref = vp_reference
    e_dpm, e_ddim = _ode_error("dpmpp_2m", sched, steps, xT, ref), _ode_error("ddim", sched, steps, xT, ref)
    assert e_dpm < 0.75 * e_ddim, (e_dpm, e_ddim)


def test_ddim_is_euler_in_sigma_over_alpha(vp_reference):
    # DDIM (eta = 0) is exactly Euler on x / alpha against sigma / alpha (Karras et al. 2022 §3; Song et al. eq. 14)
    sched, xT, _ = vp_reference
    a = SAMPLERS["ddim"](GMM.denoiser(sched), xT.clone(), sched, 12)
    b = SAMPLERS["euler"](GMM.denoiser(sched), xT.clone(), sched, 12)
    assert torch.allclose(a, b, atol=1e-10)


def test_flow_heun_beats_euler_and_converges():
    sched = FlowSchedule()
    xT = torch.randn(512, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = SAMPLERS["flow_heun"](GMM.denoiser(sched), xT.clone(), sched, 1000)
    e_euler = [_ode_error("flow_euler", sched, n, xT, ref) for n in (5, 10, 20, 40)]
    e_heun = [_ode_error("flow_heun", sched, n, xT, ref) for n in (5, 10, 20, 40)]
    assert all(b < a for a, b in zip(e_euler, e_euler[1:])) and all(b < a for a, b in zip(e_heun, e_heun[1:]))
    assert all(h < e for h, e in zip(e_heun, e_euler)), (e_heun, e_euler)
    # Heun at 10 steps (19 NFE) beats Euler at 20 steps (20 NFE): second order pays for its extra NFE
    assert e_heun[1] < e_euler[2]


def test_ancestral_samplers_match_the_mixture_moments():
    sched = VPSchedule("linear")
    g = torch.Generator().manual_seed(4)
    xT = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    mean, cov = GMM.mean_cov()
    floor = gaussian_w2(GMM.sample(4000, torch.Generator().manual_seed(5)), mean, cov)  # finite-sample noise
    for name, kw in (("ddpm", {}), ("ddim", {"eta": 1.0})):
        g = torch.Generator().manual_seed(6)
        x = SAMPLERS[name](GMM.denoiser(sched), xT.clone(), sched, 100, generator=g, **kw)
        assert gaussian_w2(x, mean, cov) < 3 * floor + 0.05, name
    few = SAMPLERS["ddpm"](GMM.denoiser(sched), xT.clone(), sched, 3, generator=torch.Generator().manual_seed(6))
    assert gaussian_w2(few, mean, cov) > gaussian_w2(x, mean, cov)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_generator_same_samples(name):
    sched = FlowSchedule() if name.startswith("flow") else VPSchedule("linear")
    xT = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kw = {"eta": 0.5} if name == "ddim" else {}
    a = SAMPLERS[name](GMM.denoiser(sched), xT.clone(), sched, 8, generator=torch.Generator().manual_seed(1), **kw)
    b = SAMPLERS[name](GMM.denoiser(sched), xT.clone(), sched, 8, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_sampler_errors_are_clear():
    with pytest.raises(ValueError, match="sampler must be one of"):
        get_sampler("plms")
    with pytest.raises(ValueError, match="FlowSchedule"):
        SAMPLERS["flow_euler"](GMM.denoiser(VPSchedule()), torch.zeros(2, 2), VPSchedule(), 4)
    zsnr = VPSchedule("scaled_linear", zero_terminal_snr=True)
    with pytest.raises(ValueError, match="alpha > 0"):
        SAMPLERS["euler"](GMM.denoiser(zsnr), torch.zeros(2, 2), zsnr, 4)
    # zero-terminal SNR with trailing spacing: DDIM and DPM-Solver++ start at alpha = 0 and stay finite
    for name in ("ddim", "dpmpp_2m"):
        x = SAMPLERS[name](GMM.denoiser(zsnr), torch.randn(8, 2, dtype=torch.float64), zsnr, 10)
        assert torch.isfinite(x).all(), name
