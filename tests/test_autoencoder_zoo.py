"""The survey's compression zoo (issue 19): MoVQ, VQ-VAE-2, RAE and DC-AE's training phases, each trained
from its shipped config through `ldm-lightning fit` on real MNIST shards (sizes overridden to tiny),
exported with `ldm-lightning export` and read back by `load_autoencoder`; plus the pieces' own math."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
import torch

from ldm_lightning.autoencoder import Autoencoder, AutoencoderConfig, load_autoencoder
from ldm_lightning.autoencoder.movq import SpatialNorm
from ldm_lightning.autoencoder.vq import VectorQuantizer
from ldm_lightning.encoders.mnist_data import load_mnist_32

TINY = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32, in_channels=1)


@pytest.fixture(scope="module")
def mnist():
    x, _ = load_mnist_32("test", limit=16)                    # (16, 1, 32, 32) in [-1, 1]
    return x


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory) -> str:
    """A Hugging Face DINOv2 folder with random weights (patch 4 on 32 px: an 8x8 token grid of width 32)."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=4)).save_pretrained(out)
    return str(out)


# --- the pieces -----------------------------------------------------------------------------------
def test_spatial_norm_starts_as_groupnorm_and_is_modulated_by_zq():
    torch.manual_seed(0)
    sn = SpatialNorm(16, 4, groups=8)
    f, zq = torch.randn(2, 16, 8, 8), torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(sn(f, zq), torch.nn.functional.group_norm(f, 8, eps=1e-6))
    torch.nn.init.normal_(sn.conv_y.weight)
    a, b = sn(f, zq), sn(f, zq + 1)
    assert not torch.allclose(a, b)
    # Nearest resize: every 4x4 feature block reads the one latent pixel above it.
    zq2 = zq.clone()
    zq2[:, :, 0, 0] += 5
    changed = (sn(f, zq2) - a).abs().sum(dim=(0, 1)) > 0     # (8, 8)
    assert changed[:4, :4].all() and not changed[4:].any() and not changed[:, 4:].any()


def test_multichannel_vq_heads_share_one_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 8, heads=4)                      # 4 heads of 2-dim codes
    assert vq.embedding.weight.shape == (16, 2)
    z = torch.randn(3, 8, 5, 5)
    zq, _, stats = vq(z)
    assert stats["indices"].shape == (3, 4, 5, 5)
    for h in range(4):                                       # each head: nearest code of the shared book
        part = z[:, 2 * h:2 * h + 2].permute(0, 2, 3, 1).reshape(-1, 2)
        torch.testing.assert_close(stats["indices"][:, h].reshape(-1), torch.cdist(part, vq.embedding.weight).argmin(1))
    torch.testing.assert_close(vq.embed(stats["indices"]), zq.detach())
    torch.testing.assert_close(vq.snap(z), zq.detach())


def test_vqvae2_levels_and_stage2_latent():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(**TINY, regularizer="vq2", vq_codebook_size=32)).eval()
    x = torch.randn(2, 1, 32, 32)
    post = ae.encode(x)
    assert ae.latent_channels == 8 and post.mode().shape == (2, 8, 8, 8)
    assert post.indices.shape == (2, 8, 8) and post.indices_top.shape == (2, 4, 4)  # top at f/2 of bottom
    q = post.quantized
    assert torch.equal(q[:, 4:, ::2, ::2], q[:, 4:, 1::2, 1::2])                 # top half: 2x2 blocks
    # Both levels decodable from their codes; a stage-2 (pre-quantisation) latent decodes through them.
    from_codes = ae.quantize.embed_codes(post.indices, post.indices_top)
    torch.testing.assert_close(from_codes, q)
    torch.testing.assert_close(ae.decode(post.mode()), ae.decode_latent(q))
    # The top level conditions the bottom one: other top codes -> other bottom inputs.
    assert not torch.allclose(post.mode()[:, :4], post.quantized[:, :4])


def test_vq_stage2_gets_prequant_latent_and_decode_quantizes():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32)
    for latent in ("pre_quant", "quantized"):
        ae = Autoencoder(AutoencoderConfig(**TINY, regularizer="vq", vq_codebook_size=64, vq_latent=latent)).eval()
        post = ae.encode(x)
        z = post.mode()
        assert torch.equal(z, post.quantized) == (latent == "quantized")
        ref = ae.decode_latent(post.quantized)
        torch.testing.assert_close(ae.decode(z), ref)
        torch.testing.assert_close(ae.decode(z + 1e-4 * torch.randn_like(z)), ref)  # off-codebook -> snapped


def test_rae_encoder_frozen_normalised_and_noise_only_in_training(dinov2_dir, mnist):
    ae = Autoencoder(AutoencoderConfig(arch="rae", regularizer="none", rae_encoder=dinov2_dir, in_channels=1,
                                       resolution=32, rae_decoder_width=32, rae_decoder_depth=1, rae_decoder_heads=2))
    assert ae.downsample_factor == 4 and ae.latent_channels == 32
    assert not any(p.requires_grad for p in ae.encoder.parameters())
    ae.compute_representation_stats([mnist])
    z = ae.encode(mnist).mode()                              # (16, 32, 8, 8)
    assert z.shape == (16, 32, 8, 8)
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4 and (z.std(dim=(0, 2, 3)) - 1).abs().max() < 0.01
    ae.eval()
    torch.testing.assert_close(ae(mnist)[0], ae.decode(z))
    ae.train()
    assert not ae.encoder.model.training
    g = torch.Generator().manual_seed(0)
    assert not torch.allclose(ae(mnist, generator=g)[0], ae.decode(z))
    with pytest.raises(FileNotFoundError, match="autoencoder.rae_encoder"):
        AutoencoderConfig(arch="rae", regularizer="none", rae_encoder=dinov2_dir + "-missing")
    with pytest.raises(ValueError, match="autoencoder.regularizer must be 'none'"):
        AutoencoderConfig(arch="rae", regularizer="vq", rae_encoder=dinov2_dir)


def test_image_grid_and_png_fallback(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    from ldm_lightning.images import image_grid
    from ldm_lightning.training.media import log_image_grid
    x = torch.linspace(-1, 1, 5 * 16).reshape(5, 1, 4, 4)
    g = image_grid(x, nrow=3, pad=1)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1, 1) and g.dtype == np.uint8
    assert g[1, 1, 0] == 0 and g[-2, 5 + 4, 0] == 255          # first pixel of image 0, last of image 4
    logged = []
    wandb_like = SimpleNamespace(logger=SimpleNamespace(log_image=lambda k, imgs, step, **kw: logged.append(k)))
    assert log_image_grid(wandb_like, "val/x", g, 3) is None and logged == ["val/x"]
    csv_like = SimpleNamespace(logger=None, log_dir=str(tmp_path), default_root_dir=str(tmp_path))
    path = log_image_grid(csv_like, "val/x", g, 3, png_dir="recon")
    assert path == tmp_path / "recon" / "step_0000003.png" and Image.open(path).size == (16, 11)
    assert log_image_grid(csv_like, "val/x", g, 3, png_dir=None) is None


def test_compile_keeps_donated_buffer_setting_process_wide():
    import torch._functorch.config as fc

    from ldm_lightning.autoencoder import AutoencoderModule
    before = fc.donated_buffer
    m = AutoencoderModule(preset="tiny-mnist", compile=True, loss=dict(perceptual_weight=0.0, disc_weight=0.5))
    assert m._keep_buffers and fc.donated_buffer == before    # scoped to the training step, not the process


# --- the user path: ldm-lightning fit with the shipped configs -------------------------------------
def _fit(tmp_path, config: str, mnist_shards, autoencoder: dict, *extra: str, name: str = "run") -> str:
    from scale_run import REPO, TRAINER_CFG, run_cli
    root = tmp_path / name
    args = ["fit", "-c", str(REPO / "configs" / "autoencoder" / config), "-c", str(TRAINER_CFG / "cpu-debug.yaml"),
            "--trainer.max_steps", "3", "--trainer.default_root_dir", str(root),
            "--trainer.limit_val_batches", "0",
            "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
            "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
            "--data.init_args.image_size", "32", "--data.init_args.channels", "1",
            "--data.init_args.resize_mode", "pad",
            "--model.init_args.image_size", "32", "--model.init_args.scale_batches", "1",
            "--model.init_args.autoencoder", json.dumps(autoencoder),
            "--model.init_args.loss.perceptual_weight", "0", *extra]
    run_cli(args, tmp_path, timeout=300)
    (last,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return last


def _export_roundtrip(ckpt: str, out, x: torch.Tensor) -> Autoencoder:
    from ldm_lightning.cli import main
    ae = load_autoencoder(ckpt)
    assert float(ae.scale_factor) != 1.0                     # the final checkpoint carries the measured factor
    assert main(["export", "--checkpoint", ckpt, "--format", "safetensors", "--out", str(out)]) == 0
    back = load_autoencoder(out)
    with torch.no_grad():
        z = back.encode(x).mode()
        torch.testing.assert_close(z, ae.encode(x).mode())
        torch.testing.assert_close(back.decode(z), ae.decode(z))
    assert float(back.scale_factor) == float(ae.scale_factor)
    return back


@pytest.mark.slow
def test_movq_fit_export_load(mnist_shards, mnist, tmp_path):
    ae_cfg = dict(TINY, vq_codebook_size=64, vq_heads=2, vq_restart_threshold=0.01)
    ckpt = _fit(tmp_path, "movq-f4.yaml", mnist_shards, ae_cfg, "--model.init_args.loss.disc_weight", "0")
    ae = _export_roundtrip(ckpt, tmp_path / "export", mnist)
    assert ae.config.arch == "movq" and ae.config.vq_heads == 2
    post = ae.encode(mnist)
    assert post.indices.shape == (16, 2, 8, 8)
    # Stage 2's latent is pre-quantisation; the public object's decode quantises it.
    assert not torch.equal(post.mode(), post.quantized)
    torch.testing.assert_close(ae.decode(post.mode()), ae.decode_latent(post.quantized))
    # End to end through stage 2's latent cache: `data encode` stores those pre-quantisation latents.
    import io
    import tarfile

    import numpy as np

    from scale_run import run_cli
    run_cli(["data", "encode", "--autoencoder", str(tmp_path / "export"), "--shards", mnist_shards["test"],
             "--out", str(tmp_path / "latents"), "--batch-size", "125"], tmp_path, timeout=300)
    shard = sorted(glob.glob(str(tmp_path / "latents" / "*.tar")))[0]
    with tarfile.open(shard) as tar:
        got = {m.name.split(".")[0]: np.load(io.BytesIO(tar.extractfile(m).read()))
               for m in tar.getmembers() if m.name.endswith(".moments.npy")}
    keys = sorted(got)[:8]
    idx = [int(k.rsplit("-", 1)[1]) for k in keys]
    x_all, _ = load_mnist_32("test", limit=max(idx) + 1)
    mean = torch.from_numpy(np.stack([got[k] for k in keys]))[:, :4]  # moments = mean || logvar
    with torch.no_grad():
        torch.testing.assert_close(mean, ae.encode(x_all[idx]).mode(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_vqvae2_fit_export_load(mnist_shards, mnist, tmp_path):
    ae_cfg = dict(TINY, z_channels=4, embed_dim=4, vq_codebook_size=64)
    ckpt = _fit(tmp_path, "vqvae2-f4.yaml", mnist_shards, ae_cfg)
    ae = _export_roundtrip(ckpt, tmp_path / "export", mnist)
    assert ae.latent_channels == 8 and ae.encode(mnist).indices_top.shape == (16, 4, 4)


@pytest.mark.slow
def test_rae_fit_export_load_without_encoder_folder(mnist_shards, mnist, dinov2_dir, tmp_path):
    ae_cfg = dict(rae_encoder=dinov2_dir, in_channels=1, resolution=32, rae_decoder_width=32, rae_decoder_depth=1,
                  rae_decoder_heads=2)
    ckpt = _fit(tmp_path, "rae-dinov2-b.yaml", mnist_shards, ae_cfg, "--model.init_args.loss.disc_weight", "0",
                "--model.init_args.optim.warmup_steps", "0")
    ae = load_autoencoder(ckpt)
    assert float(ae.encoder.rep_std.mean()) != 1.0            # normalisation measured before training
    moved = dinov2_dir + "-away"
    shutil.move(dinov2_dir, moved)                            # the export is self-contained
    try:
        back = _export_roundtrip(ckpt, tmp_path / "export", mnist)
    finally:
        shutil.move(moved, dinov2_dir)
    assert back.config.rae_encoder_config["hidden_size"] == 32


@pytest.mark.slow
def test_dcae_phases_freeze_by_name_and_start_from_previous_phase(mnist_shards, tmp_path):
    ae_cfg = dict(TINY, ch=8, ch_mult=(1, 2, 4, 4), z_channels=8, attn_resolutions=())
    p1 = _fit(tmp_path, "dcae-f32.yaml", mnist_shards, ae_cfg, name="p1")
    head = ["decoder.stages.0.*", "decoder.norm_out.*", "decoder.conv_out.*"]
    mid = ["encoder.stages.3.*", "encoder.conv_out.*", "quant_conv.*", "post_quant_conv.*", "decoder.conv_in.*",
           "decoder.stages.3.*"]
    # phase 2: latent adaptation at a higher resolution (64 px), only the layers next to the latent
    p2 = _fit(tmp_path, "dcae-f32-phase2.yaml", mnist_shards, ae_cfg, "--model.init_args.init_from", p1,
              "--model.init_args.train_only", json.dumps(mid), "--model.init_args.image_size", "64",
              "--data.init_args.image_size", "64", "--data.init_args.resize_mode", "resize", name="p2")
    # phase 3: decoder head only, with the GAN loss from step 0 (the shipped patterns fit this size)
    p3 = _fit(tmp_path, "dcae-f32-phase3.yaml", mnist_shards, ae_cfg, "--model.init_args.init_from", p2,
              "--model.init_args.loss.disc_layers", "2", "--model.init_args.loss.disc_ndf", "16", name="p3")
    sd = [load_autoencoder(p, weights="live").state_dict() for p in (p1, p2, p3)]
    ema = [load_autoencoder(p).state_dict() for p in (p1, p2)]
    import fnmatch
    for (before, after, pats) in ((ema[0], sd[1], mid), (ema[1], sd[2], head)):
        for k, v in after.items():
            if k in ("scale_factor", "shift_factor", "latent_mean", "latent_std"):
                continue
            if any(fnmatch.fnmatchcase(k, p) for p in pats):
                assert not k.endswith("weight") or not torch.equal(v, before[k]), f"{k} should have trained"
            else:
                assert torch.equal(v, before[k]), f"{k} should be frozen"
    ck = torch.load(p3, map_location="cpu", weights_only=True)
    assert any(k.startswith("loss.discriminator.") for k in ck["state_dict"])
    # phase 3 (encoder frozen, keep_latent_stats) keeps phase 2's latent statistics instead of re-measuring them
    # at its own resolution (32 px here, 64 in phase 2): latents made with phase 2 keep their scale
    ae2, ae3 = load_autoencoder(p2), load_autoencoder(p3)
    for k in ("scale_factor", "shift_factor", "latent_mean", "latent_std"):
        assert torch.equal(getattr(ae3, k), getattr(ae2, k)), k
    with torch.no_grad():
        x = torch.rand(2, 1, 32, 32) * 2 - 1
        torch.testing.assert_close(ae3.encode(x).mode(), ae2.encode(x).mode(), rtol=0, atol=0)
