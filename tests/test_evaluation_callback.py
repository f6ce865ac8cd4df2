"""The in-training `SampleQualityCallback` through `ldm-lightning fit` (2-process DDP, gloo): FID/KID of
EMA samples logged to W&B at the right steps with their cost, and the same FID as `ldm-lightning evaluate
--checkpoint` on one process gives for the final checkpoint (same seeds: the sample set does not depend on
the number of ranks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ldm_lightning.evaluation import SampleQualityCallback, train_mnist_classifier

TESTS = Path(__file__).resolve().parent
CONFIGS = TESTS.parent / "configs"
sys.path.insert(0, str(TESTS))


def test_bad_callback_settings_name_the_field():
    with pytest.raises(ValueError, match="SampleQualityCallback.extractor"):
        SampleQualityCallback("r.npz", "w", extractor="clip")
    with pytest.raises(ValueError, match="SampleQualityCallback.num_samples"):
        SampleQualityCallback("r.npz", "w", num_samples=1)
    with pytest.raises(ValueError, match="SampleQualityCallback.metrics"):
        SampleQualityCallback("r.npz", "w", metrics=["fid", "ssim"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fit_logs_sample_quality_and_evaluate_agrees(tiny_ae, mnist_shards, tmp_path):
    from scale_run import TRAINER_CFG, run_cli
    from wandb_reader import find_runs, read_run
    clf = tmp_path / "mnist.safetensors"
    train_mnist_classifier(clf, epochs=1, seed=0, train_subset=1000)
    mnist = ["--extractor", "mnist", "--weights", str(clf)]
    run_cli(["evaluate", "--images", mnist_shards["test"], "--save-stats", str(tmp_path / "ref.npz"), *mnist], tmp_path)
    run = tmp_path / "run"
    run_cli(["fit", "-c", str(CONFIGS / "diffusion" / "mnist-unet-class.yaml"), "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
             "--model.init_args.autoencoder", tiny_ae, "--model.init_args.val_num", "0",
             "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
             "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--trainer.limit_val_batches", "0",
             "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(run),
             "--trainer.devices", "2", "--trainer.strategy", "ddp",
             # the documented flag: append the callback to the config's list
             "--trainer.callbacks+=ldm_lightning.evaluation.SampleQualityCallback",
             "--trainer.callbacks.reference", str(tmp_path / "ref.npz"), "--trainer.callbacks.extractor", "mnist",
             "--trainer.callbacks.weights", str(clf), "--trainer.callbacks.every_n_steps", "2",
             "--trainer.callbacks.num_samples", "12", "--trainer.callbacks.batch_size", "4",
             "--trainer.callbacks.steps", "2", "--trainer.callbacks.kid_subset_size", "12"], tmp_path, timeout=500)
    runs = find_runs(str(run))
    assert len(runs) == 1, runs
    history = [row for row in read_run(runs[0]).history if "eval/fid" in row]
    print("\nW&B eval rows:", history)
    assert [row["trainer/global_step"] for row in history] == [2, 4]
    for row in history:
        assert row["eval/num_samples"] == 12 and row["eval/seconds"] > 0
        assert row["eval/fid"] > 0 and "eval/kid" in row
    ckpts = sorted(run.rglob("*.ckpt"))
    final = [c for c in ckpts if torch.load(c, map_location="cpu", weights_only=True)["global_step"] == 4]
    assert final, ckpts
    out = tmp_path / "r.json"
    run_cli(["evaluate", "--checkpoint", str(final[0]), "--num", "12", "--batch-size", "4", "--steps", "2",
             "--sampler", "ddim", "--guidance-scale", "1", "--seed", "0", "--reference", str(tmp_path / "ref.npz"),
             "--metrics", "fid,kid", "--kid-subset-size", "12", "--out", str(out), *mnist], tmp_path)
    r = json.loads(out.read_text())
    print("evaluate --checkpoint:", r)
    assert r["num_fake"] == 12 and r["fid"] == pytest.approx(history[-1]["eval/fid"], rel=1e-4)
    assert r["kid_mean"] == pytest.approx(history[-1]["eval/kid"], rel=1e-3, abs=1e-6)
