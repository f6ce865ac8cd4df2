"""Sampler error vs NFE on a target with an exact denoiser (a Gaussian mixture; `tests/gmm_oracle.py`).

    python benchmarks/bench_samplers.py [--quick] [--dim 2] [--n 1024] [--schedule linear]

The denoiser is the closed-form E[x0 | x_t], i.e. a perfectly trained network, so every error printed
is the sampler's own discretisation error. ODE samplers (ddim eta=0, euler, heun, dpmpp_2m on the VP
schedule; flow_euler, flow_heun on rectified flow) are scored pathwise: RMS distance, from the same
x_T, to a converged reference (Heun with 1000 steps, 1999 NFE). Ancestral DDPM is stochastic, so it is
scored by the 2-Wasserstein distance between the Gaussians with the samples' and the mixture's moments
(its finite-sample floor is printed). Ends with the ratio DDIM error / DPM-Solver++(2M) error at 10 and
15 steps (> 1 means DPM-Solver++ is better).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the GMM oracle is a test helper

from ldm_lightning.diffusion import SAMPLERS, FlowSchedule, VPSchedule  # noqa: E402
from gmm_oracle import GaussianMixture, gaussian_w2  # noqa: E402

NFE_PER_STEP = {"heun": 2, "flow_heun": 2}  # minus one: the last Heun step (to sigma = 0) is a plain Euler step


def nfe(name: str, steps: int) -> int:
    return 2 * steps - 1 if name in NFE_PER_STEP else steps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer step counts and samples")
    p.add_argument("--dim", type=int, default=2, help="data dimension of the mixture")
    p.add_argument("--n", type=int, default=1024, help="samples (trajectories) per measurement")
    p.add_argument("--schedule", default="linear", choices=("linear", "scaled_linear", "cosine"))
    p.add_argument("--spacing", default="trailing", choices=("leading", "trailing", "linspace"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    steps_list = (5, 10, 15, 25) if a.quick else (5, 10, 15, 20, 25, 50, 100)
    n = 256 if a.quick else a.n
    gmm = GaussianMixture.default(a.dim)
    t0 = time.perf_counter()

    def run(name, sched, steps, xT, **kw):
        return SAMPLERS[name](gmm.denoiser(sched), xT.clone(), sched, steps,
                              generator=torch.Generator().manual_seed(a.seed + 1), **kw)

    def rms(x, ref):
        return (x - ref).pow(2).sum(1).mean().sqrt().item()

    vp, flow = VPSchedule(a.schedule), FlowSchedule()
    xT = torch.randn(n, a.dim, generator=torch.Generator().manual_seed(a.seed), dtype=torch.float64)
    ref_vp = run("heun", vp, 1000, xT)
    ref_flow = run("flow_heun", flow, 1000, xT)
    print(f"target: {len(gmm.weights)}-component Gaussian mixture in {a.dim}-D, exact denoiser, float64; "
          f"VP schedule '{a.schedule}' ({a.spacing} spacing), {n} trajectories")
    print("error = RMS distance to a 1000-step Heun solution of the same ODE from the same x_T\n")
    rows = [("ddim", vp, ref_vp, {"spacing": a.spacing}), ("euler", vp, ref_vp, {"spacing": a.spacing}),
            ("heun", vp, ref_vp, {"spacing": a.spacing}), ("dpmpp_2m", vp, ref_vp, {"spacing": a.spacing}),
            ("flow_euler", flow, ref_flow, {}), ("flow_heun", flow, ref_flow, {})]
    errors = {}
    print(f"{'sampler':<12}" + "".join(f"{'steps ' + str(s):>14}" for s in steps_list))
    for name, sched, ref, kw in rows:
        errs = [rms(run(name, sched, s, xT, **kw), ref) for s in steps_list]
        errors[name] = dict(zip(steps_list, errs))
        print(f"{name:<12}" + "".join(f"{e:>9.4f} ({nfe(name, s):>3})" for e, s in zip(errs, steps_list)))
    print("(NFE in parentheses)\n")

    mean, cov = gmm.mean_cov()
    xs = torch.randn(max(n, 4000), a.dim, generator=torch.Generator().manual_seed(a.seed + 2), dtype=torch.float64)
    floor = gaussian_w2(gmm.sample(len(xs), torch.Generator().manual_seed(a.seed + 3)), mean, cov)
    w2 = [gaussian_w2(run("ddpm", vp, s, xs, spacing=a.spacing), mean, cov) for s in steps_list]
    print(f"ddpm (ancestral) moment-W2 to the mixture, {len(xs)} samples; floor of true samples = {floor:.4f}")
    print(f"{'ddpm':<12}" + "".join(f"{e:>9.4f} ({s:>3})" for e, s in zip(w2, steps_list)) + "\n")

    for s in (10, 15):
        print(f"ratio DDIM / DPM-Solver++(2M) error at {s} steps = {errors['ddim'][s] / errors['dpmpp_2m'][s]:.2f}x")
    print(f"ratio flow Euler / flow Heun error at 10 steps = "
          f"{errors['flow_euler'][10] / errors['flow_heun'][10]:.2f}x")
    print(f"[{time.perf_counter() - t0:.1f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
