"""The latent cache's key (issue 16; the kohya-ss/sd-scripts #1771 trap): `ldm-lightning data encode` records
the autoencoder hash and how the images were made (image_size, resize_mode, flip, bucketing); stage 2 on a
cache whose key differs from its config is refused with one message naming both values and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm_lightning.diffusion.encode import LatentCacheMismatch, check_preprocess
from ldm_lightning.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_check_preprocess_names_both_values_and_the_fix():
    man = {"preprocess": {"image_size": 32, "resize_mode": "pad", "random_flip": False, "bucketing": None}}
    check_preprocess(man, {"image_size": 32, "resize_mode": "pad", "random_flip": False, "bucketing": None})
    with pytest.raises(LatentCacheMismatch) as e:
        check_preprocess(man, {"image_size": 64, "resize_mode": "center_crop", "random_flip": False})
    msg = str(e.value)
    assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
    assert "data.image_size=64, but the cache was encoded with image_size=32" in msg
    assert "data.resize_mode='center_crop'" in msg and "--image-size 64 --resize-mode center_crop" in msg
    assert "data.image_size: 32, data.resize_mode: 'pad'" in msg
    with pytest.raises(LatentCacheMismatch, match="data.random_flip: False .*unflipped"):
        check_preprocess(man, {"random_flip": True})
    with pytest.raises(LatentCacheMismatch, match="data.bucketing"):
        check_preprocess(man, {"bucketing": {"target_pixels": 1024}})
    check_preprocess({"image_size": 32}, {"image_size": 32, "resize_mode": "center_crop"})  # an older manifest
    with pytest.raises(LatentCacheMismatch, match="image_size=32"):
        check_preprocess({"image_size": 32}, {"image_size": 256})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_fit_refuses_a_latent_cache_of_another_resolution(mnist_shards, tiny_ae, tmp_path):
    """`data encode` (defaults: the autoencoder's 32 px, pad) then `fit` of the shipped latent config asking
    for 64 px center crops: exit 2, one paragraph naming both values and `data encode`, before any step."""
    from scale_run import TRAINER_CFG, run_cli
    lat = tmp_path / "lat"
    one = str(Path(mnist_shards["test"]) / "shard-000000.tar")
    run_cli(["data", "encode", "--autoencoder", tiny_ae, "--shards", one, "--out", str(lat), "--device", "cpu"],
            tmp_path)
    man = json.loads((lat / "manifest.json").read_text())
    assert man["preprocess"] == {"image_size": 32, "resize_mode": "pad", "random_flip": False, "bucketing": None}
    cfg = ["fit", "-c", str(REPO / "configs/diffusion/mnist-unet-class.yaml"),
           "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
           "--model.init_args.autoencoder", tiny_ae, "--data.init_args.kind", "latent",
           "--data.init_args.train_shards", str(lat), "--data.init_args.val_shards", str(lat),
           "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0", "--data.init_args.val_samples", "8",
           "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path / "run")]
    proc = run_cli([*cfg, "--data.init_args.image_size", "64", "--data.init_args.resize_mode", "center_crop"],
                   tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.image_size=64, but the cache was encoded with image_size=32" in proc.stderr
    assert "ldm-lightning data encode" in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").rglob("*.ckpt"))
