"""Exact resume of the REAL stages (autoencoder with its GAN running; class-conditional latent diffusion
encoding images on the fly through a frozen autoencoder) through the REAL CLI (`ldm-lightning fit`) on real
MNIST shards streamed by `ShardDataModule`: SIGKILL mid-epoch, `--ckpt_path last`, bitwise-equal weights.

The fault-tolerance pieces are listed in the config the way the CLI defaults should add them
(StepCheckpoint, RNGStateCallback, PreemptionCallback, AtomicCheckpointIO).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def stage_model(stage: str, ae: str | None) -> dict:
    if stage == "autoencoder":
        return {"class_path": "ldm_lightning.autoencoder.AutoencoderModule", "init_args": {
            "preset": "tiny-mnist", "optim": {"lr": 2e-3}, "ema": {"decay": 0.99},
            # The discriminator starts at step 6: the kill happens with the GAN running.
            "loss": {"perceptual_weight": 0.0, "disc_start": 6, "disc_warmup_train": 2, "disc_layers": 2,
                     "disc_ndf": 16, "kl_weight": 1e-6}}}
    # posterior sampling, condition dropout and the diffusion noise all draw from the step generators
    return {"class_path": "ldm_lightning.diffusion.module.DiffusionModule", "init_args": {
        "autoencoder": ae, "backbone": "unet-tiny", "conditioning": {"kind": "class", "num_classes": 10},
        "optim": {"lr": 1e-3}, "ema": {"decay": 0.99}, "val_num": 0}}


def config(shards: str, out: Path, kill_at: int | None, stage: str = "autoencoder", ae: str | None = None) -> Path:
    callbacks = [
        {"class_path": "ldm_lightning.training.checkpointing.StepCheckpoint",
         "init_args": {"dirpath": str(out / "checkpoints"), "every_n_train_steps": 4, "keep_last_k": 2}},
        {"class_path": "ldm_lightning.training.checkpointing.RNGStateCallback"},
        {"class_path": "ldm_lightning.training.preemption.PreemptionCallback"},
    ]
    if kill_at is not None:  # tests/slurm/tiny_train.Progress: SIGKILLs its own process at that step
        callbacks.append({"class_path": "tiny_train.Progress",
                          "init_args": {"path": str(out / "progress.txt"), "sleep": 0.0, "kill_self_at": kill_at}})
    cfg = {
        "seed_everything": 0,
        "model": stage_model(stage, ae),
        "data": {"class_path": "ldm_lightning.data.ShardDataModule", "init_args": {
            "train_shards": shards, "val_shards": None, "batch_size": 16, "num_workers": 0, "seed": 0,
            "shuffle_buffer": 50, "image_size": 32, "channels": 1, "resize_mode": "pad"}},
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": STEPS, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(out), "callbacks": callbacks,
                    "plugins": [{"class_path": "ldm_lightning.training.checkpointing.AtomicCheckpointIO"}]},
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.in.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(cfg: Path, *extra, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "slurm"), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "fit", "-c", str(cfg), *extra],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"fit exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage", ["autoencoder", "diffusion"])
def test_stage_sigkill_resume_is_bitwise_exact(stage, tmp_path, mnist_shards, tiny_ae):
    cfg = lambda out, kill_at: config(mnist_shards["train"], out, kill_at, stage, tiny_ae)  # noqa: E731
    ref = tmp_path / "ref"
    fit(cfg(ref, None))
    run = tmp_path / "killed"
    # 2,000 samples / batch 16 = 125 batches per epoch: everything below is mid-epoch 0.
    r = fit(cfg(run, 7), check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert not (run / "checkpoints" / f"step={STEPS:08d}.ckpt").exists()
    fit(cfg(run, None), "--ckpt_path", "last")
    a = torch.load(ref / "checkpoints" / f"step={STEPS:08d}.ckpt", weights_only=False)
    b = torch.load(run / "checkpoints" / f"step={STEPS:08d}.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == STEPS
    diff = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not diff, f"resumed {stage} differs in {len(diff)} tensors, e.g. {diff[:5]}"
    assert any(k.startswith("ema.") for k in a["state_dict"])
    assert a["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == \
        b["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"]
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"]):
        for pid, sa in opt_a["state"].items():
            assert torch.equal(sa["exp_avg"], opt_b["state"][pid]["exp_avg"])
