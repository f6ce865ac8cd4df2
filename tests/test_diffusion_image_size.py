"""The training resolution has one owner, model.image_size (issue 26 item 2), through the user path: a DiT on the
tiny autoencoder (preset resolution 32, f = 4) trained at twice that size records the doubled latent shape in its
checkpoint, and `ldm-lightning sample` samples at it by default; an image_size the latent grid cannot take is one
message at start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ldm_lightning", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_dit_trained_at_twice_the_autoencoder_resolution_records_and_samples_it(mnist_shards, tiny_ae, tmp_path):
    from PIL import Image
    fit = ["fit", "-c", str(ROOT / "configs/diffusion/mnist-unet-class.yaml"),
           "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"),
           "--model.init_args.autoencoder", tiny_ae, "--model.init_args.backbone", "dit-tiny",
           "--model.init_args.backbone_config", '{"depth": 1, "hidden_size": 64, "num_heads": 2}',
           "--model.init_args.val_num", "2", "--model.init_args.val_steps", "1",
           "--model.init_args.optim.warmup_steps", "0",
           "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
           "--data.init_args.resize_mode", "resize", "--data.init_args.batch_size", "4",
           "--data.init_args.val_samples", "4", "--data.init_args.num_workers", "0",
           "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1"]
    root = tmp_path / "run"
    r = _cli([*fit, "--model.init_args.image_size", "64", "--data.init_args.image_size", "64",
              "--trainer.default_root_dir", str(root)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (last,) = sorted(root.rglob("last.ckpt"))
    meta = torch.load(last, map_location="cpu", weights_only=True)["ldm_lightning"]
    assert meta["latent_shape"] == [4, 16, 16]  # 64 px / f 4, not the preset's 32 / 4 = 8
    assert meta["backbone"]["input_size"] == 16
    r = _cli(["sample", "--checkpoint", str(last), "--class", "3", "--num", "1", "--steps", "2", "--device", "cpu",
              "--out", str(tmp_path / "samples")], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "samples" / "3_0.png")).shape == (64, 64)
    # 60 px is no multiple of f x the DiT's patch (4 x 2): one message naming the field, no traceback, exit 2
    r = _cli([*fit, "--model.init_args.image_size", "60", "--data.init_args.image_size", "60",
              "--trainer.default_root_dir", str(tmp_path / "bad")], tmp_path)
    assert r.returncode == 2 and "model.image_size=60 must be a positive multiple of 8" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
