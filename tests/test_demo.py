"""`ldm-lightning demo`: its plan / config plumbing (fast) and a reduced end-to-end run (`--fast`, slow) whose
floors a broken pipeline cannot reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm_lightning import demo

ROOT = Path(__file__).resolve().parent.parent


def test_plans_are_valid_and_fast_is_smaller():
    full, fast = demo.PLANS["full"], demo.PLANS["fast"]
    assert full.samples_per_class == 100 and full.train_images is None  # the 100 per class, all 60k
    assert fast.ae_steps < full.ae_steps and fast.diffusion_steps < full.diffusion_steps
    with pytest.raises(ValueError, match="diffusion_steps"):
        demo.DemoPlan(train_images=None, test_images=None, ae_steps=1, ae_disc_start=0, diffusion_steps=0, text_steps=0,
                      samples_per_class=2)
    with pytest.raises(ValueError, match="samples_per_class"):
        demo.DemoPlan(train_images=None, test_images=None, ae_steps=1, ae_disc_start=0, diffusion_steps=1, text_steps=0,
                      samples_per_class=1)


def test_trainer_config_is_cpu_debug_with_the_demo_settings(tmp_path):
    path = demo.write_trainer_config(tmp_path, "cpu", 123, "x")
    cfg = yaml.safe_load(path.read_text())
    base = yaml.safe_load((ROOT / "configs" / "trainer" / "cpu-debug.yaml").read_text())
    t = cfg["trainer"]
    assert t["max_steps"] == 123 and t["accelerator"] == "cpu" and t["enable_progress_bar"] is True
    assert t["logger"] == base["trainer"]["logger"]  # W&B offline, as in cpu-debug
    ckpt = [c for c in t["callbacks"] if c["class_path"].endswith("StepCheckpoint")][0]["init_args"]
    assert ckpt["every_n_train_steps"] == 123 and ckpt["keep_last_k"] == 1
    assert demo.write_trainer_config(tmp_path, "gpu", 5, "y").read_text().count("bf16-mixed") == 1


def test_lpips_weights_are_found_locally_or_left_off(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert demo.find_vgg_weights(None) is None and demo.lpips_overrides(None) == []
    cached = tmp_path / "torch" / "hub" / "checkpoints" / demo.VGG16_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert demo.find_vgg_weights(None) == cached  # torch hub's cache, as torchvision would look
    explicit = tmp_path / "mine.pth"
    with pytest.raises(SystemExit, match="--lpips-weights"):
        demo.find_vgg_weights(explicit)
    explicit.write_bytes(b"x")
    assert demo.find_vgg_weights(explicit) == explicit
    over = demo.lpips_overrides(explicit)
    assert over[over.index("--model.init_args.loss.lpips_vgg_weights") + 1] == str(explicit)
    assert float(over[over.index("--model.init_args.loss.perceptual_weight") + 1]) > 0


def test_cli_help_and_bad_device():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "ldm_lightning", "demo", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and "--fast" in out.stdout and "--device" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "ldm_lightning", "demo", "--device", "tpu"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.slow
@pytest.mark.longest
@pytest.mark.timeout(3300)
def test_fast_demo_end_to_end(tmp_path, classifier_cache, installed_package):
    """The reduced demo on real MNIST, run as a user of the INSTALLED package runs it (`ldm-lightning demo --fast`
    from a wheel installed non-editable, in a directory outside the repository): every artifact exists and the
    measured quality is far above what a broken stage gives (untrained autoencoder: PSNR ≈ 10 dB; broken
    conditioning: class accuracy ≈ 0.1).

    Measured with the plan's 200 / 400 / 200 steps (idle 2-core machine, 2 threads, 2026-12-07; 11.2 min): PSNR
    20.5 dB, SSIM 0.87; class model with CFG: accuracy 0.98, MNIST-FID 67 (real train vs test 24); text model
    with CFG: accuracy 0.71 (0.98 at 300 steps). The plan's text model now trains 250 steps, for margin."""
    venv, env, _ = installed_package
    out = tmp_path / "demo"
    env = dict(env, WANDB_SILENT="true")
    cmd = [str(venv / "bin" / "ldm-lightning"), "demo", "--fast", "--out", str(out),
           "--classifier-cache", str(classifier_cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3000, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    m = json.loads((out / "metrics.json").read_text())
    print(json.dumps({k: m[k] for k in ("autoencoder", "diffusion", "wall_seconds")}, indent=1))

    k = m["plan"]["samples_per_class"]
    assert len(list((out / "samples").glob("[0-9]_*.png"))) == 10 * k
    for f in ("samples/grid.png", "samples/text_grid.png", "reconstructions.png", "checkpoints/autoencoder.ckpt",
              "checkpoints/diffusion.ckpt", "checkpoints/diffusion-text.ckpt", "results.md"):
        assert (out / f).is_file(), f
    assert list((out / "runs").rglob("offline-run-*")), "no W&B offline run written"
    assert set(m["wall_seconds"]) >= {"pack", "autoencoder", "encode", "diffusion", "sample", "evaluate",
                                      "diffusion_text", "text_evaluate", "total"}

    assert m["classifier"]["test_accuracy"] >= 0.98
    assert m["autoencoder"]["psnr"] > 18.0 and m["autoencoder"]["ssim"] > 0.6
    d = m["diffusion"]
    guided, plain = d[f"cfg_{m['plan']['cfg']:g}"], d["cfg_1"]
    assert guided["class_accuracy"] >= 0.6, guided  # chance is 0.1
    assert guided["class_accuracy"] >= plain["class_accuracy"] - 0.05  # guidance must not hurt accuracy
    # Random noise scores MNIST-FID in the thousands with this classifier (test_evaluation.py).
    assert guided["fid"] < 20 * max(d["fid_real_train_vs_test"], 1.0), d
    # the text model, prompted "a handwritten digit K": a broken text path (conditioning ignored) gives ~0.1
    t = m["diffusion_text"][f"cfg_{m['plan']['cfg']:g}"]
    assert t["class_accuracy"] >= 0.5, m["diffusion_text"]
    table = (out / "results.md").read_text()
    assert f"{guided['class_accuracy']:.4f}" in table and f"{t['class_accuracy']:.4f}" in table


# ------------------------------------------------------------------------------------------ benchmarks/run_all.py


def _run_all():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_run_all_extracts_the_ratio_lines_the_benchmarks_print():
    out = _run_all().extract_ratios(
        "ratio (median start-to-start step, Lightning / plain) = 1.032   (target <= 1.05)\n"
        "speedup (eager / compiled median step) = 1.87x\n"
        "ratio on-the-fly / cached: 1.41x\n"
        "stream (ShardDataModule)          5321         0.93x\n"
        "decode-only limit                 5700         1.00x\n"
        "device=cpu width=256 batch=32\n")
    assert [v for _, v in out] == [1.032, 1.87, 1.41, 0.93, 1.0]
    assert out[0][0].startswith("ratio (median") and out[3][0].startswith("stream (ShardDataModule)")


def test_run_all_runs_every_script_and_reports_failures(tmp_path):
    (tmp_path / "bench_good.py").write_text(
        "import sys\nif '--help' in sys.argv: print('usage: --quick'); sys.exit(0)\n"
        "print('quick' if '--quick' in sys.argv else 'slow')\nprint('speedup (a / b) = 2.50x')\n")
    (tmp_path / "bench_bad.py").write_text("import sys\nif '--help' in sys.argv: sys.exit(0)\nraise SystemExit(3)\n")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--quick", "--dir", str(tmp_path),
                           "--logs", str(tmp_path / "logs")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1  # one benchmark failed
    assert "2.500x  speedup (a / b)" in proc.stdout and "FAILED rc=3" in proc.stdout
    assert (tmp_path / "logs" / "bench_good.log").read_text().splitlines()[1] == "quick"
