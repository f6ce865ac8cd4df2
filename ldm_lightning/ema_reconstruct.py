"""`ldm-lightning ema-reconstruct`: the EMA of any length, synthesised after training from post-hoc EMA snapshots.

    ldm-lightning ema-reconstruct --snapshots runs/dit/checkpoints --sigma-rel 0.07 --out runs/dit/ema-0.07
    ldm-lightning ema-reconstruct --snapshots runs/dit/checkpoints --sweep 0.03,0.05,0.08,0.12 --out runs/dit/sweep \
        -- --reference data/mnist/test --extractor mnist --weights CLASSIFIER.pt --num 1000 --metrics fid

A run with `model.init_args.posthoc_ema` set writes snapshots of its power-function EMA profiles to
`<checkpoint dir>/posthoc-ema/` (training/posthoc_snapshots.py). This tool solves EDM2's least-squares problem
(nn/posthoc_ema.py: closed-form inner products of the profiles) for the weights of the snapshots that best match
the profile of the chosen sigma_rel at the chosen time (default: the last snapshot's), sums the snapshots with
them and writes an export that `sample`, `evaluate` and the loaders read: a denoiser export for a diffusion run,
an autoencoder export (safetensors) for an autoencoder run. `--sweep` writes one export per value into
`--out/sigma_rel-<v>/`, scores each with `ldm-lightning evaluate` (its options after `--`) and reports the best
by `--select`.

It reads both stages' runs and scores with `evaluation/`, so it sits at the top level beside `export.py` rather
than under a stage (no module under `diffusion/` imports `evaluation/`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ldm_lightning.autoencoder.load import CHECKPOINT_TAG as AUTOENCODER_TAG
from ldm_lightning.errors import UserError
from ldm_lightning.finite import finite_float
from ldm_lightning.nn.posthoc_ema import MAX_SIGMA_REL, profile_fit_error, sigma_rel_to_gamma, synthesis_weights
from ldm_lightning.training.posthoc_snapshots import Snapshot, list_snapshots, read_profile
from ldm_lightning.user_errors import EXIT_USER_ERROR, debug_requested, print_user_error

from ldm_lightning.diffusion.load import CHECKPOINT_TAG as DENOISER_TAG

# evaluate's metrics: lower is better for FID / KID, higher for IS / precision / recall.
SELECT = {"fid": min, "kid_mean": min, "is_mean": max, "precision": max, "recall": max}


def _sigma(value: str) -> float:
    v = finite_float(value)
    if not 0.0 < v <= MAX_SIGMA_REL:
        raise argparse.ArgumentTypeError(f"sigma_rel must be in (0, {MAX_SIGMA_REL}]; got {value}")
    return v


def _sigmas(value: str) -> list[float]:
    return [_sigma(v) for v in value.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning ema-reconstruct", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--snapshots", required=True,
                   help="the run's checkpoint folder, or its posthoc-ema/ folder of snapshots")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--sigma-rel", type=_sigma, help="the EMA length to synthesise (EDM2's sigma_rel)")
    what.add_argument("--sweep", type=_sigmas, help="comma-separated sigma_rels: synthesise, evaluate each, "
                                                   "report the best (evaluate's options after `--`)")
    p.add_argument("--at", type=int, default=None,
                   help="the time (EMA updates) of the synthesised EMA (default: the last snapshot's)")
    p.add_argument("--basis", type=_sigmas, default=None,
                   help="use only the tracked profiles of these sigma_rels (default: all that were tracked)")
    p.add_argument("--out", required=True, help="export folder (with --sweep: a folder of one export per value)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    p.add_argument("--select", default="fid", choices=sorted(SELECT), help="the --sweep score to choose by")
    return p


def _basis(snapshots: list[Snapshot], at: int, basis: list[float] | None):
    """[(snapshot, profile index, t, gamma)] of the snapshots up to time `at`, restricted to `basis`."""
    tracked = snapshots[-1].sigma_rels
    if basis is not None:
        missing = [s for s in basis if not any(abs(s - x) < 1e-12 for x in tracked)]
        if missing:
            raise ValueError(f"--basis {missing}: not tracked by this run (it tracked sigma_rels {tracked})")
    chosen = []
    for snap in snapshots:
        if snap.t > at:
            continue
        for i, (s, g) in enumerate(zip(snap.sigma_rels, snap.gammas)):
            if basis is None or any(abs(s - b) < 1e-12 for b in basis):
                chosen.append((snap, i, snap.t, g))
    if not chosen:
        raise ValueError(f"no snapshot at or before --at {at} (the first is at {snapshots[0].t})")
    return chosen


def synthesise(snapshots: list[Snapshot], sigma_rel: float, at: int | None = None,
               basis: list[float] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, report) of the EMA of `sigma_rel` at time `at`, summed from the snapshots' profiles."""
    at = snapshots[-1].t if at is None else at
    chosen = _basis(snapshots, at, basis)
    ts, gammas = [c[2] for c in chosen], [c[3] for c in chosen]
    gamma = sigma_rel_to_gamma(sigma_rel)
    x = synthesis_weights(ts, gammas, at, gamma)
    state: dict[str, torch.Tensor] = {}
    for (snap, i, _, _), w in zip(chosen, x):
        if w == 0.0:
            continue
        for k, v in read_profile(snap, i).items():
            if not v.is_floating_point():  # counters and the like: the newest snapshot's
                state[k] = v
                continue
            acc = state.get(k)
            term = v.double() * float(w)
            state[k] = term if acc is None else acc + term
    for snap, i, _, _ in chosen[-1:]:  # non-float entries no weighted snapshot had (all weights 0 there)
        for k, v in read_profile(snap, i).items():
            state.setdefault(k, v)
    dtypes = {k: v.dtype for k, v in read_profile(chosen[-1][0], chosen[-1][1]).items()}
    state = {k: v.to(dtypes.get(k, v.dtype)).contiguous() for k, v in state.items()}
    report = {"sigma_rel": sigma_rel, "gamma": gamma, "at": at, "snapshots": len({id(c[0]) for c in chosen}),
              "profiles": len(chosen), "profile_fit_error": profile_fit_error(ts, gammas, x, at, gamma),
              "basis_sigma_rels": sorted({c[0].sigma_rels[c[1]] for c in chosen})}
    return state, report


def write_export(meta: dict, state: dict[str, torch.Tensor], report: dict, out: str | Path, overwrite: bool) -> Path:
    """A denoiser export (diffusion run) or an autoencoder export (autoencoder run) of the synthesised weights."""
    module = meta.get("module")
    if module == DENOISER_TAG:
        from ldm_lightning.diffusion.export import export_denoiser
        from ldm_lightning.diffusion.load import WEIGHT_PREFIX
        ckpt = {"ldm_lightning": {**meta, "posthoc_ema": report},
                "state_dict": {WEIGHT_PREFIX["ema"] + k: v for k, v in state.items()}}
        return export_denoiser(ckpt, out, "safetensors", "ema", overwrite)
    if module == AUTOENCODER_TAG:
        from ldm_lightning.autoencoder import Autoencoder
        from ldm_lightning.autoencoder.autoencoder import AutoencoderConfig
        from ldm_lightning.autoencoder.export import export_autoencoder
        ae = Autoencoder(AutoencoderConfig.from_dict(meta["autoencoder"]))
        ae.load_state_dict(state, strict=True)
        return export_autoencoder(ae, out, "safetensors", overwrite)
    raise ValueError(f"the snapshots name module {module!r}: neither a diffusion nor an autoencoder run")


def _say(report: dict, out: Path) -> None:
    print(f"sigma_rel {report['sigma_rel']:g} (gamma {report['gamma']:.3f}) at t={report['at']}: "
          f"{report['profiles']} profiles of {report['snapshots']} snapshots (tracked {report['basis_sigma_rels']}), "
          f"profile fit error {report['profile_fit_error']:.2e} -> {out}", flush=True)


def sweep(a, snapshots: list[Snapshot], eval_argv: list[str]) -> dict:
    from ldm_lightning.evaluation import evaluate
    if not eval_argv:
        raise ValueError("--sweep scores every value with `ldm-lightning evaluate`: give its options after `--`, "
                         "e.g. -- --reference data/mnist/test --extractor mnist --weights CLASSIFIER --num 1000 "
                         "--metrics fid")
    if any(o == "--checkpoint" or o.startswith("--checkpoint=") for o in eval_argv):
        raise ValueError("--sweep passes each synthesised export to evaluate as --checkpoint: leave it out after `--`")
    eval_args = evaluate.build_parser().parse_args([*eval_argv, "--checkpoint", "PLACEHOLDER"])
    scores = []
    for s in a.sweep:
        state, report = synthesise(snapshots, s, a.at, a.basis)
        out = write_export(snapshots[-1].meta, state, report, Path(a.out) / f"sigma_rel-{s:g}", a.overwrite)
        _say(report, out)
        eval_args.checkpoint = str(out)
        result = evaluate.run(eval_args)
        if a.select not in result:
            raise ValueError(f"--select {a.select}: evaluate did not compute it (add it to --metrics)")
        scores.append((s, float(result[a.select]), str(out)))
    best = SELECT[a.select](scores, key=lambda r: r[1])
    print(f"{'sigma_rel':>10} {a.select:>12}")
    for s, v, _ in scores:
        print(f"{s:>10g} {v:>12.5g}{'  <- best' if (s, v) == best[:2] else ''}")
    summary = {"select": a.select, "scores": [{"sigma_rel": s, a.select: v, "export": o} for s, v, o in scores],
               "best": {"sigma_rel": best[0], a.select: best[1], "export": best[2]}}
    (Path(a.out) / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"best sigma_rel {best[0]:g} ({a.select} {best[1]:.5g}): {best[2]}")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    eval_argv: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, eval_argv = argv[:i], argv[i + 1:]
    a = build_parser().parse_args(argv)
    try:
        return _run(a, eval_argv)
    except (FileNotFoundError, ValueError, UserError) as e:  # the others: user_errors.run_tool (cli.py)
        if debug_requested():
            raise
        print_user_error("ldm-lightning ema-reconstruct", str(e))
        return EXIT_USER_ERROR


def _run(a, eval_argv: list[str]) -> int:
    if eval_argv and a.sweep is None:
        raise ValueError("options after `--` are evaluate's, for --sweep only")
    snapshots = list_snapshots(a.snapshots)
    if a.at is not None and not snapshots[0].t <= a.at <= snapshots[-1].t:
        raise ValueError(f"--at {a.at}: outside the snapshots' times {snapshots[0].t}..{snapshots[-1].t} "
                         "(a synthesised EMA can only look back)")
    if a.sweep is not None:
        sweep(a, snapshots, eval_argv)
        return 0
    state, report = synthesise(snapshots, a.sigma_rel, a.at, a.basis)
    out = write_export(snapshots[-1].meta, state, report, a.out, a.overwrite)
    _say(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
