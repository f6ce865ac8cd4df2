"""Post-hoc EMA (EDM2) through the user path: `ldm-lightning fit` with `model.init_args.posthoc_ema` (stopped and
resumed), then `ldm-lightning ema-reconstruct`, in subprocesses, on real MNIST shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ldm_lightning.nn.posthoc_ema import (gamma_to_sigma_rel, profile_inner_products, sigma_rel_to_gamma,
                                          synthesis_weights)

ROOT = Path(__file__).resolve().parents[1]
LDM = str(Path(sys.executable).parent / "ldm-lightning")


def run(*args: str, expect: int = 0, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_RUN_ID"))}
    env.update(WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    r = subprocess.run([LDM, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert r.returncode == expect, f"exit {r.returncode}, expected {expect}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_profile_math_matches_the_discrete_tracker():
    # gamma from sigma_rel inverts EDM2's sigma_rel(gamma); EDM2's pairs (0.05 -> 16.97, 0.10 -> 6.94).
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.07, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    # The closed form of a profile with itself: (gamma+1)^2 / ((2 gamma + 1) t).
    g = sigma_rel_to_gamma(0.1)
    assert profile_inner_products(50, g, 50, g) == pytest.approx((g + 1) ** 2 / ((2 * g + 1) * 50))
    # A scalar random walk tracked directly at three lengths; the third one synthesised from snapshots of the other two.
    theta = np.cumsum(np.random.default_rng(0).normal(size=201))
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10, 0.07)]
    ema, snaps = [0.0, 0.0, 0.0], []
    for t in range(1, 201):
        for i, gm in enumerate(gammas):
            beta = (1 - 1 / t) ** (gm + 1)
            ema[i] = beta * ema[i] + (1 - beta) * theta[t]
        if t % 10 == 0:
            snaps += [(t, gammas[0], ema[0]), (t, gammas[1], ema[1])]
    ts, gs, vals = (np.array(c) for c in zip(*snaps))
    x = synthesis_weights(ts, gs, 200, gammas[2])
    spread = abs(ema[0] - ema[1])
    assert abs(x @ vals - ema[2]) < 0.1 * spread
    x = synthesis_weights(ts, gs, 200, gammas[1])  # a tracked length at a snapshot time: that snapshot exactly
    assert x @ vals == pytest.approx(ema[1], abs=1e-9 * abs(ema[1]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fit_resume_then_ema_reconstruct_matches_directly_tracked_emas(tmp_path, mnist_shards, tiny_ae):
    """A third profile (sigma_rel 0.07) is tracked only as the reference: 0.07 is synthesised from the snapshots
    of 0.05 and 0.10 alone (`--basis`) and compared with it."""
    from safetensors.torch import load_file

    from ldm_lightning.ema_reconstruct import synthesise
    from ldm_lightning.diffusion.load import load_denoiser
    from ldm_lightning.training.posthoc_snapshots import list_snapshots, read_profile

    cfg = tmp_path / "posthoc.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"init_args": {
        "posthoc_ema": {"sigma_rels": [0.05, 0.1, 0.07], "snapshot_every": 2}}}}))
    out = tmp_path / "run"
    args = ["fit", "-c", str(ROOT / "configs/diffusion/mnist-unet-class.yaml"),
            "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"), "-c", str(cfg),
            "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
            "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
            "--model.init_args.autoencoder", tiny_ae, "--model.init_args.val_num", "0",
            # no warmup: the weights move from the first step, so the EMA lengths differ measurably in 24 steps
            "--model.init_args.optim.warmup_steps", "0", "--trainer.default_root_dir", str(out)]
    run(*args, "--trainer.max_steps", "12")
    run(*args, "--trainer.max_steps", "24", "--ckpt_path", "last")  # the profiles continue from the checkpoint
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(ckpt["state_dict"]["posthoc_ema.num_updates"]) == 24
    snaps = list_snapshots(out / "checkpoints")
    assert [s.t for s in snaps] == list(range(2, 25, 2))
    assert snaps[-1].sigma_rels == [0.05, 0.1, 0.07]
    # The snapshot of step 24 holds what the checkpoint of step 24 holds.
    for i in range(3):
        prof = read_profile(snaps[-1], i)
        for k, v in prof.items():
            assert torch.equal(v, ckpt["state_dict"][f"posthoc_ema.profiles.{i}.{k}"].float()), k

    rec = tmp_path / "ema-0.07"
    r = run("ema-reconstruct", "--snapshots", str(out / "checkpoints"), "--sigma-rel", "0.07", "--basis", "0.05,0.1",
            "--out", str(rec))
    assert "tracked [0.05, 0.1]" in r.stdout
    # The export is what sample / evaluate read.
    denoiser, _, meta = load_denoiser(rec)
    assert meta["posthoc_ema"]["sigma_rel"] == 0.07 and meta["posthoc_ema"]["at"] == 24

    def flat(sd):
        return torch.cat([sd[k].flatten().double() for k in sorted(sd) if sd[k].is_floating_point()])
    p05, p10, p07 = (flat(read_profile(snaps[-1], i)) for i in range(3))
    got = flat(load_file(rec / "denoiser.safetensors"))
    err, nearest = (got - p07).norm(), min((p07 - p05).norm(), (p07 - p10).norm())
    # Tolerance: a finite number of snapshots (12 per length here) spans the target profile only approximately
    # (profile fit error ~0.7%), and 24 steps of Adam noise put that residual into the weights; measured 0.12 of
    # the distance to the nearest tracked length. Below a quarter of it: much closer than either tracked EMA.
    assert err < 0.25 * nearest, (err, nearest)
    # A tracked length at a snapshot time is that snapshot exactly (the least-squares weights are one-hot).
    state, report = synthesise(snaps, 0.1)
    assert report["profile_fit_error"] < 1e-6
    assert flat(state).sub(p10).abs().max() < 1e-6

    # --sweep: an export per value, each scored by `evaluate` (a classifier trained for seconds: plumbing, not quality)
    from ldm_lightning.encoders.mnist_classifier_training import train_mnist_classifier
    clf = tmp_path / "mnist.safetensors"
    train_mnist_classifier(clf, epochs=1, seed=0, train_subset=200)
    r = run("ema-reconstruct", "--snapshots", str(out / "checkpoints"), "--sweep", "0.05,0.2", "--out",
            str(tmp_path / "sweep"), "--", "--reference", mnist_shards["test"], "--reference-num", "50",
            "--extractor", "mnist", "--weights", str(clf), "--num", "10", "--steps", "1", "--metrics", "fid",
            "--batch-size", "10", "--device", "cpu")
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [row["sigma_rel"] for row in summary["scores"]] == [0.05, 0.2]
    assert summary["best"]["fid"] == min(row["fid"] for row in summary["scores"])
    assert f"best sigma_rel {summary['best']['sigma_rel']:g}" in r.stdout
    load_denoiser(tmp_path / "sweep" / "sigma_rel-0.2")

    bad = run("ema-reconstruct", "--snapshots", str(tmp_path / "nowhere"), "--sigma-rel", "0.07", "--out",
              str(tmp_path / "x"), expect=2)
    assert "no such folder of post-hoc EMA snapshots" in bad.stderr and "Traceback" not in bad.stderr

    # ZeRO-3 partitions the profiles (their snapshots would hold empty tensors): refused in one line, exit 2
    z3 = run(*[a if a != str(out) else str(tmp_path / "zero3") for a in args], "--trainer.max_steps", "2",
             "--trainer.strategy", "deepspeed_stage_3_anydevice", expect=2)
    assert "model.posthoc_ema is not supported with DeepSpeed ZeRO-3" in z3.stderr and "Traceback" not in z3.stderr
    assert not (tmp_path / "zero3" / "checkpoints" / "posthoc-ema").exists()


def test_the_readme_plot_redraws_from_the_published_table(tmp_path):
    """The README's post-hoc EMA plot is the docs table drawn by the benchmark's --replot: one point per sigma_rel
    column, and the committed SVG is what that command writes today."""
    import xml.dom.minidom
    out = tmp_path / "plot.svg"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "posthoc_ema_mnist.py"), "--replot",
                           str(ROOT / "docs" / "evaluation.md"), "--plot", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    svg = xml.dom.minidom.parse(str(out))
    assert len(svg.getElementsByTagName("polyline")) == 2
    assert len(svg.getElementsByTagName("circle")) == 2 * 9  # sigma_rel 0.01 ... 0.25, accuracy and FID
    assert out.read_text() == (ROOT / "docs" / "img" / "posthoc_ema_mnist.svg").read_text()
