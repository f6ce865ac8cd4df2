"""Schedules vs published formulas and diffusers' betas; exact prediction-space conversions; the loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_lightning.diffusion import (PREDICTIONS, Denoiser, DiffusionObjective, FlowSchedule, ObjectiveConfig,
                                     VPSchedule, from_x0_eps, loss_by_bin, make_betas, rescale_zero_terminal_snr,
                                     to_x0_eps)


# ----------------------------------------------------------------------------------------------- schedules
def test_betas_match_published_formulas():
    T = 1000
    lin = make_betas("linear", T)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert torch.allclose(lin.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64))
    sl = make_betas("scaled_linear", T)
    assert sl[0].item() == pytest.approx(0.00085, rel=1e-12) and sl[-1].item() == pytest.approx(0.012, rel=1e-12)
    assert torch.allclose(sl.sqrt().diff(), torch.full((T - 1,), (0.012 ** 0.5 - 0.00085 ** 0.5) / (T - 1),
                                                       dtype=torch.float64))
    cos = make_betas("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Nichol & Dhariwal eq. 17
    abar = torch.cumprod(1 - cos, 0)
    # before the 0.999 clip binds, abar_t = f(t+1) / f(0) (the cumulative product telescopes)
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cos.max().item() <= 0.999 and cos[-1].item() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="beta schedule"):
        make_betas("quadratic")


@pytest.mark.parametrize("ours,theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(ours, theirs):
    from diffusers import DDPMScheduler
    kw = dict(beta_start=0.00085, beta_end=0.012) if ours == "scaled_linear" else {}
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs, **kw).betas.double()
    assert torch.allclose(make_betas(ours, 1000), ref, rtol=1e-5, atol=1e-8)  # diffusers stores float32


def test_zero_terminal_snr_matches_diffusers_and_paper():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as ref_rescale
    betas = make_betas("scaled_linear")
    ours = rescale_zero_terminal_snr(betas)
    assert torch.allclose(ours, ref_rescale(betas.clone()), rtol=1e-10, atol=1e-12)  # same algorithm, float64
    s = VPSchedule("scaled_linear", zero_terminal_snr=True)
    a, sg = s.alpha_sigma(torch.tensor([0, 999]))
    assert a[1].item() == 0.0 and sg[1].item() == pytest.approx(1.0)  # SNR(T-1) = 0
    a0, _ = VPSchedule("scaled_linear").alpha_sigma(torch.tensor([0]))
    assert a[0].item() == pytest.approx(a0.item(), rel=1e-12)  # first step unchanged


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [10, 7, 50])
def test_inference_times_match_diffusers_ddim(spacing, steps):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=1)
    ref.set_timesteps(steps)
    ours = VPSchedule("scaled_linear", steps_offset=1).inference_times(steps, spacing)
    assert ours.tolist() == ref.timesteps.tolist()


def test_vp_and_flow_schedule_basics():
    s = VPSchedule("linear")
    t = torch.arange(1000)
    a, sg = s.alpha_sigma(t)
    assert torch.allclose(a ** 2 + sg ** 2, torch.ones(1000, dtype=torch.float64))
    assert (a.diff() < 0).all()  # signal decays
    assert s.sample_t(torch.tensor([0.0, 0.99999])).tolist() == [0, 999]
    f = FlowSchedule(shift=3.0)
    tt = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    a, sg = f.alpha_sigma(tt)
    assert torch.equal(a + sg, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(f.shift_t(tt), 3 * tt / (1 + 2 * tt))  # SD3 eq. 23
    grid = f.inference_times(4)
    assert grid[0].item() == 1.0 and (grid.diff() < 0).all() and len(grid) == 4
    assert torch.allclose(f.model_time(torch.tensor([0.5])), torch.tensor([500.0]))
    for bad in (lambda: VPSchedule("foo"), lambda: FlowSchedule(shift=0), lambda: s.inference_times(0),
                lambda: s.inference_times(5, "uniform")):
        with pytest.raises(ValueError):
            bad()


# --------------------------------------------------------------------------------------------- objectives
@pytest.mark.parametrize("kind", PREDICTIONS)
@pytest.mark.parametrize("process", ["vp", "flow"])
def test_prediction_round_trip_exact(kind, process):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g)
    if process == "vp":
        a, s = VPSchedule("cosine").alpha_sigma(torch.randint(0, 999, (64,), generator=g))
    else:
        a, s = FlowSchedule().alpha_sigma(torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01)
    a, s = a.float()[:, None], s.float()[:, None]
    x_t = a * x0 + s * eps
    out = from_x0_eps(kind, x0, eps, a, s)
    rx0, reps = to_x0_eps(kind, out, x_t, a, s)
    # fp32: errors are a few ulps times the conditioning (1/alpha for eps at high noise, 1/sigma for x0)
    tol = 2e-4 if kind in ("eps", "x0") else 1e-5
    assert torch.allclose(rx0, x0, atol=tol) and torch.allclose(reps, eps, atol=tol)
    # and every space agrees with every other
    for other in PREDICTIONS:
        assert torch.allclose(from_x0_eps(other, rx0, reps, a, s), from_x0_eps(other, x0, eps, a, s), atol=5 * tol)


def test_v_and_flow_definitions():
    x0, eps, a, s = torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(0.6), torch.tensor(0.8)
    assert from_x0_eps("v", x0, eps, a, s).item() == pytest.approx(0.6 * -1 - 0.8 * 2)  # Salimans & Ho
    assert from_x0_eps("flow", x0, eps, a, s).item() == pytest.approx(-3.0)  # eps - x0
    with pytest.raises(ValueError, match="prediction must be one of"):
        from_x0_eps("score", x0, eps, a, s)


class _Oracle(torch.nn.Module):
    """A 'backbone' that outputs the exact target in its prediction space (it knows x0 for the batch)."""

    def __init__(self, x0, kind, schedule):
        super().__init__()
        self.x0, self.kind, self.schedule = x0, kind, schedule

    def forward(self, x_t, t_model, **_):
        t = t_model if self.schedule.kind == "vp" else t_model.double() / 1000
        a, s = self.schedule.alpha_sigma(t.long() if self.schedule.kind == "vp" else t)
        a, s = a.float().view(-1, 1, 1, 1), s.float().view(-1, 1, 1, 1)
        eps = (x_t - a * self.x0) / s
        return from_x0_eps(self.kind, self.x0, eps, a, s)


@pytest.mark.parametrize("pred,space", [("eps", "eps"), ("v", "v"), ("x0", "v"), ("flow", "flow"), ("x0", "eps")])
def test_loss_zero_for_perfect_model_and_deterministic(pred, space):
    sched = FlowSchedule() if pred == "flow" else VPSchedule("linear")
    x0 = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    den = Denoiser(_Oracle(x0, pred, sched), sched, pred)
    obj = DiffusionObjective(ObjectiveConfig(prediction=pred, loss_space=space, timestep_sampling="logit_normal",
                                             weighting="min_snr"), sched)
    out = obj.loss(den, x0, None, torch.Generator().manual_seed(3))
    assert out.loss.shape == (8,) and out.t.shape == (8,)
    assert out.loss.max().item() < 1e-6
    again = obj.loss(den, x0, None, torch.Generator().manual_seed(3))
    assert torch.equal(out.t, again.t)  # same generator -> same timesteps and noise


def test_min_snr_weights_match_paper():
    sched = VPSchedule("linear")
    a, s = sched.alpha_sigma(torch.arange(0, 1000, 37))
    snr = a ** 2 / s ** 2
    for space, expected in (("eps", snr.clamp_max(5) / snr), ("v", snr.clamp_max(5) / (snr + 1)),
                            ("x0", snr.clamp_max(5))):
        obj = DiffusionObjective(ObjectiveConfig(prediction="eps", loss_space=space, weighting="min_snr"), sched)
        assert torch.allclose(obj.weight(a, s), expected)


def test_timestep_sampling_logit_normal_and_uniform():
    sched = FlowSchedule()
    obj = DiffusionObjective(ObjectiveConfig(prediction="flow", timestep_sampling="logit_normal",
                                             logit_mean=-0.8, logit_std=0.8), sched)
    t = obj.sample_timesteps(20000, torch.Generator().manual_seed(0), "cpu")
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(-0.8, abs=0.03) and logit.std().item() == pytest.approx(0.8, abs=0.03)
    vp = DiffusionObjective(ObjectiveConfig(), VPSchedule("linear"))
    t = vp.sample_timesteps(50000, torch.Generator().manual_seed(0), "cpu")
    counts = torch.bincount(t // 100, minlength=10).double()
    assert t.min() >= 0 and t.max() <= 999 and (counts / 5000 - 1).abs().max() < 0.06


def test_loss_by_bin():
    loss = torch.tensor([1.0, 3.0, 10.0, 5.0])
    tf = torch.tensor([0.0, 0.05, 0.95, 1.0])
    bins = loss_by_bin(loss, tf)
    assert set(bins) == {"loss_t0", "loss_t9"}
    assert bins["loss_t0"].item() == 2.0 and bins["loss_t9"].item() == 7.5


def test_objective_config_errors_name_the_field():
    with pytest.raises(ValueError, match="objective.prediction"):
        ObjectiveConfig(prediction="score")
    with pytest.raises(ValueError, match="objective.loss_space"):
        ObjectiveConfig(loss_space="x1")
    with pytest.raises(ValueError, match="objective.weighting"):
        ObjectiveConfig(weighting="p2")
    with pytest.raises(ValueError, match="objective.timestep_sampling"):
        ObjectiveConfig(timestep_sampling="beta")
    assert np.isclose(ObjectiveConfig(prediction="v").snr_gamma, 5.0)


# ------------------------------------------------------------------ issue 18 defects: JiT noise levels, target clamp
def _logit_normal_cdf(x: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return 0.5 * (1 + torch.erf((torch.log(x / (1 - x)) - mean) / (std * math.sqrt(2))))


def test_jit_config_draws_noisy_levels_with_the_logit_normal_law():
    """The shipped JiT config trains at high noise (t = 1 is noise here): the drawn t follow the
    logit-normal(+0.8, 0.8) law in distribution (Kolmogorov-Smirnov), not only in their moments."""
    import yaml
    cfg = yaml.safe_load(open("configs/diffusion/dit-b4-xpred-vloss-class.yaml"))["model"]["init_args"]
    obj_cfg = ObjectiveConfig(**cfg["objective"])
    assert cfg["schedule"]["kind"] == "flow" and obj_cfg.logit_mean == 0.8 and obj_cfg.logit_std == 0.8
    obj = DiffusionObjective(obj_cfg, FlowSchedule())
    n = 20000
    t = obj.sample_timesteps(n, torch.Generator().manual_seed(0), "cpu").sort().values
    emp_hi, emp_lo = torch.arange(1, n + 1, dtype=torch.float64) / n, torch.arange(n, dtype=torch.float64) / n
    cdf = _logit_normal_cdf(t, 0.8, 0.8)
    ks = max((emp_hi - cdf).abs().max().item(), (cdf - emp_lo).abs().max().item())
    assert ks < 1.63 / math.sqrt(n)  # the KS test's 1% critical value
    # and against the sign-flipped law the same draws are far off (the old -0.8 bug is visible here)
    assert (emp_hi - _logit_normal_cdf(t, -0.8, 0.8)).abs().max().item() > 0.3
    below_half = (t < 0.5).double().mean().item()  # P(noise < 0.5) = Phi(-1) = 0.159
    assert abs(below_half - 0.5 * (1 + math.erf(-1 / math.sqrt(2)))) < 0.01


class _ReplayOracle(torch.nn.Module):
    """The perfect network: it replays the loss's noise draw (same generator seed) and outputs exactly
    the target in its prediction space, computed as the loss computes it."""

    def __init__(self, x0, kind, schedule, seed, t):
        super().__init__()
        self.x0, self.kind, self.schedule, self.seed, self.t = x0, kind, schedule, seed, t

    def forward(self, x_t, t_model, **_):
        noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(self.seed))
        a, s = self.schedule.alpha_sigma(self.t)  # the exact t (t_model is float32 of 1000 t)
        a, s = a.float().view(-1, 1, 1, 1), s.float().view(-1, 1, 1, 1)
        return from_x0_eps(self.kind, self.x0, noise, a, s)


@pytest.mark.parametrize("process", ["vp", "flow"])
@pytest.mark.parametrize("pred", PREDICTIONS)
def test_perfect_model_has_exactly_zero_loss_at_every_t(pred, process):
    """JiT clamps the prediction AND the target: a perfect model's loss is exactly 0 at every t (including
    the clean and pure-noise ends, where the 0.05 clamp acts), for every loss space."""
    if process == "vp":
        sched = VPSchedule("linear", zero_terminal_snr=True)
        t = torch.arange(0, 1000, 37).tolist() + [0, 1, 998, 999]
        t = torch.tensor(t)
    else:
        sched = FlowSchedule()
        t = torch.cat([torch.linspace(0, 1, 21, dtype=torch.float64), torch.tensor([1e-4, 0.01, 0.049, 0.999])])
    x0 = torch.randn(len(t), 2, 4, 4, generator=torch.Generator().manual_seed(1))
    den = Denoiser(_ReplayOracle(x0, pred, sched, 3, t), sched, pred, clamp=0.05)
    for space in PREDICTIONS:
        obj = DiffusionObjective(ObjectiveConfig(prediction=pred, loss_space=space))
        out = obj.loss(den, x0, None, torch.Generator().manual_seed(3), t=t)
        assert torch.equal(out.loss, torch.zeros_like(out.loss)), (pred, space, out.loss)
    # a slightly wrong x0-predictor at low noise: the v-loss is finite (both sides clamped alike)
    if pred == "x0" and process == "flow":
        den_off = Denoiser(_Shifted(den.backbone), sched, pred, clamp=0.05)
        out = DiffusionObjective(ObjectiveConfig(prediction="x0", loss_space="flow")).loss(
            den_off, x0, None, torch.Generator().manual_seed(3), t=t)
        # JiT: d(flow)/d(x0) = -1 / max(sigma, 0.05) (was -(1 + alpha / max(sigma, 0.05)) through eps)
        assert torch.isfinite(out.loss).all() and out.loss.max().item() <= (0.01 / 0.05) ** 2 * 1.0001


class _Shifted(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x_t, t_model, **kw):
        return self.inner(x_t, t_model, **kw) + 0.01
