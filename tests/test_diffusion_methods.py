"""Issue 18's methods through the user path: `ldm-lightning fit` with the shipped configs and `ldm-lightning
sample` in subprocesses, at tiny scale on real MNIST: super-resolution and inpainting by concatenation
conditioning, JiT on pixels (identity autoencoder, bottleneck patches, x-prediction + v-loss), and sampling
at another resolution than training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--data.init_args.batch_size", "8", "--data.init_args.val_samples", "8", "--data.init_args.num_workers", "1",
        "--trainer.max_steps", "2", "--trainer.log_every_n_steps", "1", "--model.init_args.val_steps", "1",
        "--model.init_args.optim.warmup_steps", "0"]


def _cli(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", *args], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _fit(config: str, shards: dict, root: Path, *extra: str) -> Path:
    _cli(["fit", "-c", str(ROOT / "configs/diffusion" / f"{config}.yaml"), "-c", str(ROOT / "configs/trainer/cpu-debug.yaml"),
          "--data.init_args.train_shards", shards["train"], "--data.init_args.val_shards", shards["test"], *TINY,
          "--trainer.default_root_dir", str(root), *extra], root.parent)
    last = sorted(root.rglob("last.ckpt"))
    assert len(last) == 1
    return last[0]


def _mnist_test(n: int) -> torch.Tensor:
    from ldm_lightning.data.mnist import load_mnist
    x, _ = load_mnist("test")
    return torch.from_numpy(np.pad(x[:n], ((0, 0), (2, 2), (2, 2)))).float()[:, None] / 127.5 - 1  # (n, 1, 32, 32)


def _write_pngs(images: torch.Tensor, folder: Path) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(((im[0] + 1) * 127.5).round().clamp(0, 255).byte().numpy()).save(folder / f"digit{i}.png")


def _read(path: Path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path))


def test_identity_autoencoder_is_loaded_by_spec_and_is_exact():
    from ldm_lightning.autoencoder import autoencoder_hash
    from ldm_lightning.autoencoder.load import load_autoencoder
    ae = load_autoencoder("identity:1x32")
    x = _mnist_test(2)
    assert ae.latent_channels == 1 and ae.downsample_factor == 1 and ae.config.resolution == 32
    assert torch.equal(ae.decode(ae.encode(x).mode()), x) and torch.equal(ae.encode(x).sample(), x)
    assert autoencoder_hash(ae) != autoencoder_hash(load_autoencoder("identity:3x32"))
    with pytest.raises(ValueError, match="identity:CxR"):
        load_autoencoder("identity:32")


def test_concat_conditions_have_the_documented_content():
    from ldm_lightning.diffusion.concat import downsample, random_box_masks, training_c_concat, upsample
    x = _mnist_test(4)
    c = training_c_concat("super_resolution", x, (32, 32), 4)
    assert c.shape == (4, 1, 32, 32) and torch.equal(c, upsample(downsample(x, 4), (32, 32)))
    from ldm_lightning.autoencoder.load import load_autoencoder
    c = training_c_concat("inpainting", x, (32, 32), 4, torch.Generator().manual_seed(0),
                          load_autoencoder("identity:1x32"), "box")  # on pixels the masked image's "latent" is itself
    mask = random_box_masks(4, 32, 32, torch.Generator().manual_seed(0))
    frac = mask.mean((1, 2, 3))
    assert c.shape == (4, 2, 32, 32) and torch.equal(c[:, 1:], mask) and ((frac > 0.05) & (frac < 0.4)).all()
    assert torch.equal(c[:, :1], x * (1 - mask))  # known pixels kept, missing ones at 0


@pytest.mark.slow
def test_super_resolution_fit_and_sample_from_low_res_pngs(mnist_shards, tmp_path):
    """Shipped SR config: fit 2 steps (with a validation grid from the conditioned sampler), then `sample`
    from a folder of 8x8 PNGs gives 32x32 images named after them; wrong inputs are refused by name."""
    from ldm_lightning.diffusion.concat import downsample
    ckpt = _fit("mnist-sr-pixels", mnist_shards, tmp_path / "run", "--trainer.val_check_interval", "2",
                "--trainer.check_val_every_n_epoch", "null", "--model.init_args.val_num", "2")
    grids = [q for q in (tmp_path / "run").rglob("*.png") if "samples" in str(q)]  # W&B media or samples/step_*.png
    assert grids, "no validation grid"  # sampled conditioned on the validation images
    _write_pngs(downsample(_mnist_test(2), 4), tmp_path / "low")
    _cli(["sample", "--checkpoint", str(ckpt), "--cond-images", str(tmp_path / "low"), "--num", "1", "--steps", "2",
          "--sampler", "flow_euler", "--out", str(tmp_path / "up")], tmp_path)
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == ["digit0_0.png", "digit1_0.png", "grid.png"]
    assert _read(tmp_path / "up" / "digit0_0.png").shape == (32, 32)
    from ldm_lightning.diffusion.sample import main
    with pytest.raises(SystemExit, match="--cond-images DIR"):
        main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_inpainting_fit_and_sample_from_images_and_masks(mnist_shards, tmp_path):
    """Shipped inpainting config: fit, then `sample` with images + masks; at 48x48 (another resolution
    than training: the UNet is convolutional) the output follows the input size."""
    import torch.nn.functional as F

    from ldm_lightning.diffusion.concat import random_box_masks
    ckpt = _fit("mnist-inpaint-pixels", mnist_shards, tmp_path / "run", "--model.init_args.val_num", "0")
    x = F.interpolate(_mnist_test(2), size=(48, 48), mode="bilinear")
    _write_pngs(x, tmp_path / "img")
    _write_pngs(random_box_masks(2, 48, 48, torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "mask")
    _cli(["sample", "--checkpoint", str(ckpt), "--cond-images", str(tmp_path / "img"), "--masks", str(tmp_path / "mask"),
          "--num", "1", "--steps", "2", "--sampler", "flow_euler", "--out", str(tmp_path / "filled")], tmp_path)
    assert _read(tmp_path / "filled" / "digit1_0.png").shape == (48, 48)
    known, given = _read(tmp_path / "mask" / "digit1.png") == 0, _read(tmp_path / "img" / "digit1.png")
    assert np.array_equal(_read(tmp_path / "filled" / "digit1_0.png")[known], given[known])  # the known region kept
    from ldm_lightning.diffusion.sample import main
    with pytest.raises(SystemExit, match="--masks DIR"):
        main(["--checkpoint", str(ckpt), "--cond-images", str(tmp_path / "img"), "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_jit_b16_imagenet_config_fits_and_samples_with_its_jit_parts(mnist_shards, tmp_path):
    """configs/diffusion/jit-b16-imagenet256.yaml through `ldm-lightning fit` with only the sizes overridden (MNIST
    pixels, width 32, 5 blocks: the preset's 32 class tokens still join before block 4) and `ldm-lightning sample`:
    the checkpoint records the JiT-B/16 preset's parts and JiT's objective."""
    ckpt = _fit("jit-b16-imagenet256", mnist_shards, tmp_path / "run", "--model.init_args.val_num", "0",
                "--model.init_args.autoencoder", "identity:1x32", "--model.init_args.conditioning.num_classes", "10",
                "--model.init_args.backbone_config",
                "{input_size: 32, patch_size: 4, bottleneck_dim: 8, hidden_size: 32, depth: 5, num_heads: 2}",
                "--data.init_args.image_size", "32", "--data.init_args.channels", "1",
                "--data.init_args.resize_mode", "pad", "--data.init_args.random_flip", "false")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ldm_lightning"]
    bb, obj = meta["backbone"], meta["objective"]
    assert (bb["mlp"], bb["norm"], bb["rope"], bb["qk_norm"], bb["class_tokens"], bb["class_tokens_start"]) == (
        "swiglu", "rmsnorm", True, True, 32, 4)
    assert (obj["prediction"], obj["loss_space"], obj["timestep_sampling"], obj["logit_mean"], obj["logit_std"],
            obj["clamp"]) == ("x0", "flow", "logit_normal", 0.8, 0.8, 0.05)
    _cli(["sample", "--checkpoint", str(ckpt), "--classes", "0-1", "--num", "1", "--steps", "2",
          "--sampler", "flow_heun", "--out", str(tmp_path / "s")], tmp_path)
    assert _read(tmp_path / "s" / "1_0.png").shape == (32, 32)


@pytest.mark.slow
def test_jit_pixels_fit_and_sample_at_another_resolution(mnist_shards, tmp_path):
    """Shipped JiT config (identity autoencoder, bottleneck 4x4 patches, x-pred + v-loss): fit, then sample
    at 32 and, with recomputed positions, at 48 px; a size off the patch grid is refused."""
    import json
    ckpt = _fit("mnist-jit-pixels", mnist_shards, tmp_path / "run", "--model.init_args.val_num", "0")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ldm_lightning"]
    assert meta["autoencoder"]["path"] == "identity:1x32" and meta["latent_shape"] == [1, 32, 32]
    assert meta["backbone"]["bottleneck_dim"] == 8 and meta["objective"]["prediction"] == "x0"
    _cli(["sample", "--checkpoint", str(ckpt), "--classes", "0-1", "--num", "1", "--steps", "2", "--size", "48",
          "--sampler", "flow_heun", "--out", str(tmp_path / "s48")], tmp_path)
    assert _read(tmp_path / "s48" / "1_0.png").shape == (48, 48)
    from ldm_lightning.diffusion.sample import main
    with pytest.raises(SystemExit, match="--size 30 must be a positive multiple of 4"):
        main(["--checkpoint", str(ckpt), "--class", "1", "--size", "30", "--out", str(tmp_path / "x")])
    json.dumps(meta)  # plain metadata
