"""The README's "Your own data and models" flow, end to end at tiny scale, through the console script.

The commands are the README's (run from a folder that is not a checkout: `-c configs/...` resolves to the
configs shipped in the package), with only these changes: sizes and step counts (image 32 instead of
256, tiny widths, 2 steps), the CPU trainer config instead of ddp-8gpu, and LPIPS off (its VGG16 weights
are never downloaded). Real photos from skimage.data, in two class folders.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow
CLI = str(Path(sys.executable).parent / "ldm-lightning")
ENV = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
PHOTOS = {"space": ("astronaut", "rocket", "hubble_deep_field"), "lab": ("immunohistochemistry", "retina"),
          "cats": ("chelsea", "cat"), "gray": ("camera", "coins", "moon")}
TRAINER = ["-c", "configs/trainer/cpu-debug.yaml", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]


def _sh(cwd: Path, *args: str, timeout: int = 180) -> str:
    r = subprocess.run([CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert r.returncode == 0, f"ldm-lightning {' '.join(args)}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def test_readme_own_data_flow(tmp_path):
    import skimage.data

    for cls, names in PHOTOS.items():
        for split in ("photos", "photos-val"):
            (tmp_path / split / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            img = Image.fromarray(getattr(skimage.data, name)())
            img.save(tmp_path / "photos" / cls / f"{name}.png")
            img.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "photos-val" / cls / f"{name}.png")
    d = tmp_path

    # 1. pack (README: --size 288 --workers 8; here 40 → random 32 crops)
    for split in ("photos", "photos-val"):
        out = _sh(d, "data", "pack", "--source", split, "--out", f"data/{split}", "--size", "40", "--workers", "2",
                  "--class-from-folder", "--no-progress")
        assert "packed 10 samples" in out

    # 2. stage 1: KL-f8 (narrow), then export
    _sh(d, "fit", "-c", "configs/autoencoder/kl-f8.yaml", *TRAINER, "-c", "configs/data/folder-256.yaml",
        "--model.init_args.loss.perceptual_weight", "0", "--model.init_args.image_size", "32",
        "--model.init_args.autoencoder", "{ch: 16, norm_groups: 8, num_res_blocks: 1, resolution: 32}", "--model.init_args.scale_batches", "1",
        "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", "--data.init_args.val_samples", "4",
        "--trainer.default_root_dir", "runs/kl-f8", timeout=240)
    ckpt = sorted(glob.glob(str(d / "runs/kl-f8/**/last.ckpt"), recursive=True))
    assert ckpt, "stage 1 wrote no last.ckpt"
    _sh(d, "export", "--checkpoint", ckpt[0], "--format", "diffusers", "--out", "runs/kl-f8/export")

    # 3. cache latents, then stage 2: DiT-B/4 (narrow, 1 block) with the JiT recipe
    for src, dst in (("data/photos", "data/photos-latents"), ("data/photos-val", "data/photos-latents-val")):
        out = _sh(d, "data", "encode", "--autoencoder", "runs/kl-f8/export", "--shards", src, "--out", dst,
                  "--resize-mode", "center_crop")
        assert "encoded 10 samples" in out and "skipped 0" in out
    _sh(d, "fit", "-c", "configs/diffusion/dit-b4-xpred-vloss-class.yaml", *TRAINER,
        "--data.init_args.train_shards", "data/photos-latents", "--data.init_args.val_shards",
        "data/photos-latents-val", "--data.init_args.image_size", "32", "--trainer.default_root_dir", "runs/dit",
        "--data.init_args.batch_size", "4", "--data.init_args.val_samples", "4", "--model.init_args.backbone_config",
        "{hidden_size: 32, depth: 1, num_heads: 2, qk_norm: true}", "--model.init_args.val_num", "2",
        "--model.init_args.val_steps", "2", timeout=240)

    # 4. sample
    ckpt = sorted(glob.glob(str(d / "runs/dit/**/last.ckpt"), recursive=True))
    assert ckpt, "stage 2 wrote no last.ckpt"
    _sh(d, "sample", "--checkpoint", ckpt[0], "--sampler", "dpmpp_2m", "--steps", "2", "--cfg", "4",
        "--classes", "0-9", "--num", "1", "--out", "samples/")
    pngs = sorted((d / "samples").glob("*.png"))
    assert len(pngs) >= 10
    a = np.asarray(Image.open(pngs[0]))
    assert a.shape[:2] == (32, 32) and a.std() > 0  # an image, not a constant
