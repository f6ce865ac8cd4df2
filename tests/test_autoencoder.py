"""Stage-1 autoencoder models: shapes, posterior / VQ math, DC-AE shortcuts, the one-backward GAN loss."""

from __future__ import annotations

import math

import pytest
import torch
from float_paths import assert_close_for, largest, sum_length

from ldm_lightning.autoencoder import Autoencoder, AutoencoderConfig, DiagonalGaussian, get_preset
from ldm_lightning.autoencoder.dcae import channel_to_space, space_to_channel
from ldm_lightning.autoencoder.loss import AutoencoderLoss, LossConfig
from ldm_lightning.autoencoder.vq import VectorQuantizer

TINY = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, resolution=32, in_channels=1)


@pytest.mark.parametrize("arch,reg,extra", [
    ("kl", "kl", {}),
    ("kl", "vq", dict(vq_codebook_size=64)),
    ("kl", "none", {}),
    ("dcae", "none", dict(ch_mult=(1, 2, 4, 4), z_channels=8, attn_resolutions=(4,))),
    ("dcae", "kl", dict(ch_mult=(1, 2, 4, 4), z_channels=8)),
])
def test_shapes_and_contract(arch, reg, extra):
    cfg = AutoencoderConfig(**{**TINY, "arch": arch, "regularizer": reg, **extra})
    ae = Autoencoder(cfg)
    x = torch.randn(2, 1, 32, 32)
    post = ae.encode(x)
    f, c = cfg.downsample_factor, ae.latent_channels
    assert ae.downsample_factor == f
    assert post.mean.shape == post.logvar.shape == (2, c, 32 // f, 32 // f)
    z = post.sample(generator=torch.Generator().manual_seed(0))
    assert z.shape == post.mode().shape == (2, c, 32 // f, 32 // f)
    assert ae.decode(z).shape == (2, 1, 32, 32)
    recon, _ = ae(x)
    assert recon.shape == x.shape
    # Latent normalisation travels in the state dict.
    assert {"scale_factor", "shift_factor", "latent_mean", "latent_std"} <= set(ae.state_dict())


def test_presets_build_and_sizes():
    tiny = Autoencoder(get_preset("tiny-mnist"))
    n = sum(p.numel() for p in tiny.parameters())
    assert 100_000 < n < 1_000_000, n
    assert tiny.downsample_factor == 4 and tiny.latent_channels == 4
    with torch.device("meta"):  # full-size presets: check structure without allocating
        kl8 = Autoencoder(get_preset("kl-f8"))
        dc = Autoencoder(get_preset("dcae-f32"))
        vq = Autoencoder(get_preset("vq-f4"))
    n8 = sum(p.numel() for p in kl8.parameters())
    assert 83e6 < n8 < 84e6, n8  # the SD VAE has 83.65M parameters
    assert kl8.downsample_factor == 8 and dc.downsample_factor == 32 and vq.downsample_factor == 4
    assert dc.latent_channels == 32 and get_preset("kl-f8").scale_factor == pytest.approx(0.18215)


def test_bad_config_names_field():
    with pytest.raises(ValueError, match="autoencoder.arch"):
        AutoencoderConfig(arch="unet")
    with pytest.raises(ValueError, match="autoencoder.norm_groups"):
        AutoencoderConfig(ch=12, norm_groups=32)
    with pytest.raises(ValueError, match="autoencoder.resolution"):
        AutoencoderConfig(resolution=36, ch_mult=(1, 2, 4, 4))
    with pytest.raises(ValueError, match="unknown autoencoder config field"):
        AutoencoderConfig.from_dict({"chmult": [1, 2]})
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        get_preset("kl-f9")


def test_diagonal_gaussian_matches_torch_distributions():
    torch.manual_seed(0)
    moments = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.mean))
    expect = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), expect, atol=1e-5, rtol=1e-5)
    # Generator-determined samples with the right moments.
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    big = DiagonalGaussian(torch.cat([torch.full((1, 1, 200, 200), 2.0), torch.full((1, 1, 200, 200),
                                                                                    math.log(0.25))], 1))
    s = big.sample(torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 2.0) < 0.01 and abs(s.std().item() - 0.5) < 0.01
    # logvar is clamped to [-30, 20]
    ext = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 1e4)], 1))
    assert ext.logvar.item() == 20.0 and torch.isfinite(ext.kl()).all()


def test_vq_nearest_code_straight_through_and_stats():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    zq, loss, stats = vq(z)
    # Every output vector is the nearest codebook entry (brute force).
    flat = z.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    nearest = torch.cdist(flat, vq.embedding.weight).argmin(1)
    assert torch.equal(stats["indices"].flatten(), nearest)
    torch.testing.assert_close(zq.detach().permute(0, 2, 3, 1).reshape(-1, 4), vq.embedding.weight[nearest])
    # VQ-VAE loss: ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (both are the same MSE value).
    mse = ((flat - vq.embedding.weight[nearest].detach()) ** 2).mean()
    torch.testing.assert_close(loss, 1.25 * mse)
    # Straight-through: d zq / d z = identity.
    (zq * torch.arange(zq.numel()).reshape(zq.shape)).sum().backward(retain_graph=True)
    torch.testing.assert_close(z.grad, torch.arange(zq.numel()).reshape(zq.shape).float())
    used = stats["indices"].unique().numel()
    assert stats["usage"].item() == pytest.approx(used / 16)
    assert 1.0 <= stats["perplexity"].item() <= used + 1e-4


def test_vq_ema_and_dead_code_restart():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, ema=True, restart_threshold=0.5, ema_decay=0.9)
    assert not vq.embedding.weight.requires_grad
    z = torch.randn(4, 4, 8, 8) * 3 + 5  # far from the tiny init codebook
    vq.train()
    _, _, s0 = vq(z, generator=torch.Generator().manual_seed(0))
    # Every code that got no assignment was dead, so the first step restarted it from a data encoding
    # (the codes that were used are EMA-updated instead).
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    d = torch.cdist(vq.embedding.weight, flat).min(1).values
    n_used = s0["indices"].unique().numel()
    assert int((d < 1e-4).sum()) >= 32 - n_used, "unused codes are restarted from batch encodings"
    for _ in range(5):
        _, loss, s = vq(z, generator=torch.Generator().manual_seed(0))
    assert s["usage"] > s0["usage"] and torch.isfinite(loss)
    # eval: no codebook update
    vq.eval()
    before = vq.embedding.weight.clone()
    vq(z)
    assert torch.equal(before, vq.embedding.weight)


def test_vq_l2_normalized_codes_are_unit():
    vq = VectorQuantizer(8, 4, l2_normalize=True)
    zq, _, _ = vq(torch.randn(2, 4, 2, 2))
    torch.testing.assert_close(zq.norm(dim=1), torch.ones(2, 2, 2))


def test_dcae_shortcut_is_space_channel_identity():
    x = torch.randn(2, 8, 8, 8)
    # width x4 on the way down: pixel_unshuffle exactly, and channel_to_space inverts it exactly.
    y = space_to_channel(x, 32)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(channel_to_space(y, 8), x)
    # width x2: channel-averaged pairs; up then down is exactly the identity.
    y2 = space_to_channel(x, 16)                                 # (2, 16, 4, 4)
    torch.testing.assert_close(space_to_channel(channel_to_space(y2, 8), 16), y2)
    # and down-then-up equals averaging each 2x2 block pair-wise: mean is preserved.
    torch.testing.assert_close(channel_to_space(y2, 8).mean(), x.mean())


def test_dcae_shortcut_flag_changes_model():
    cfg = dict(TINY, arch="dcae", regularizer="none", ch_mult=(1, 2, 4, 4), z_channels=8)
    a, b = Autoencoder(AutoencoderConfig(**cfg)), Autoencoder(AutoencoderConfig(**cfg, dcae_shortcut=False))
    b.load_state_dict(a.state_dict())  # same parameters, only the parameter-free path differs
    x = torch.randn(1, 1, 32, 32)
    assert not torch.allclose(a(x)[0], b(x)[0])


def _two_optimizer_reference(loss_mod, x, recon, w):
    """taming's two-pass gradients: D gets grad of d_loss only; the generator gets w * g_loss only."""
    D = loss_mod.discriminator
    real, fake = D(x), D(recon.detach())
    d_loss = 0.5 * (torch.relu(1 - real).mean() + torch.relu(1 + fake).mean())
    gd = torch.autograd.grad(d_loss, list(D.parameters()))
    g_loss = -D(recon).mean()
    gr = torch.autograd.grad(w * g_loss, recon)[0]
    return gd, gr


@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_single_backward_gan_equals_two_optimizer_gradients(norm):
    # 'batch' (taming's BatchNorm) once ran D on cat[x, sg(x_rec), x_rec]: the batch statistics then carried
    # gradient into x_rec (relative error 1.36, cosine 0.645 against the two-pass gradient).
    torch.manual_seed(0)
    cfg = LossConfig(perceptual_weight=0.0, disc_start=0, disc_layers=2, disc_ndf=8, adaptive_weight=False,
                     disc_weight=0.7, kl_weight=0.0, disc_norm=norm)
    loss_mod = AutoencoderLoss(cfg, image_channels=1)
    x = torch.randn(2, 1, 32, 32)
    recon = torch.randn(2, 1, 32, 32, requires_grad=True)

    class _Post:  # KL 0 posterior: isolate the GAN part
        def kl(self):
            return torch.zeros(2)
    last = torch.zeros(1, requires_grad=True)
    loss, terms = loss_mod(x, recon, _Post(), step=5, last_layer=last)
    params = list(loss_mod.discriminator.parameters())
    got_d = torch.autograd.grad(loss, params + [recon], retain_graph=True)
    ref_d, ref_r = _two_optimizer_reference(loss_mod, x, recon, 0.7)
    n = sum_length(loss_mod.discriminator, x)  # a weight's gradient sums over batch x positions x fan-in
    for g, r in zip(got_d[:-1], ref_d):  # the same maths in another order: equal to fp32 rounding of n terms
        assert_close_for(g, r, n, "discriminator gradient", scale=largest(ref_d))  # some are 0 in theory
    nll_grad = torch.autograd.grad(((x - recon).abs().sum() / 2), recon)[0]
    got_g = got_d[-1] - nll_grad  # the generator's adversarial gradient alone
    rel = ((got_g - ref_r).norm() / ref_r.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got_g.flatten(), ref_r.flatten(), dim=0).item()
    assert rel < 0.02 and cos > 0.999, (norm, rel, cos)  # fp32: the L1 gradient dwarfs this one
    assert_close_for(got_d[-1], nll_grad + ref_r, n, "reconstruction gradient")
    assert {"d_loss", "g_loss", "logits_real", "logits_fake", "d_weight", "rec", "nll", "kl"} <= set(terms)


def test_gan_schedule_and_adaptive_weight():
    torch.manual_seed(0)
    ae = Autoencoder(get_preset("tiny-mnist"))
    cfg = LossConfig(perceptual_weight=0.0, disc_start=10, disc_warmup_train=4, disc_layers=2, disc_ndf=8)
    loss_mod = AutoencoderLoss(cfg, 1)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    seen = {}
    for step in (0, 6, 10):
        recon, post = ae(x, generator=torch.Generator().manual_seed(0))
        loss, terms = loss_mod(x, recon, post, step, ae.last_layer)
        loss.backward()
        seen[step] = terms
        # every discriminator parameter gets a gradient (zero before warm-up): DDP-safe
        assert all(p.grad is not None for p in loss_mod.discriminator.parameters())
        ae.zero_grad()
        loss_mod.zero_grad()
    assert "d_loss" not in seen[0] and "g_loss" not in seen[0]
    assert "d_loss" in seen[6] and "g_loss" not in seen[6]  # discriminator warm-up before disc_start
    assert "g_loss" in seen[10]
    w = seen[10]["d_weight"]
    assert torch.isfinite(w) and 0 < w <= 1e4 * cfg.disc_weight


def test_lpips_needs_weights_path():
    with pytest.raises(ValueError, match="loss.lpips_vgg_weights"):
        AutoencoderLoss(LossConfig(perceptual_weight=1.0), 1)
    with pytest.raises(FileNotFoundError, match="loss.lpips_vgg_weights"):
        AutoencoderLoss(LossConfig(perceptual_weight=1.0, lpips_vgg_weights="/nonexistent/vgg.pth"), 1)
    with pytest.raises(ValueError, match="loss.disc_loss"):
        LossConfig(disc_loss="wgan")


def test_lpips_random_backbone_engages_at_step():
    # pnet_rand=True: random VGG backbone (offline); only checks that the term is wired, not its quality.
    cfg = LossConfig(perceptual_weight=1.0, perceptual_start=3, lpips_pnet_rand=True, disc_weight=0.0)
    loss_mod = AutoencoderLoss(cfg, 1)
    assert not any(p.requires_grad for p in loss_mod.lpips.parameters())
    loss_mod.train()
    assert not loss_mod.lpips.training
    ae = Autoencoder(get_preset("tiny-mnist"))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon, post = ae(x)
    _, t0 = loss_mod(x, recon, post, 2, ae.last_layer)
    _, t1 = loss_mod(x, recon, post, 3, ae.last_layer)
    assert "lpips" not in t0 and "lpips" in t1 and t1["lpips"] > 0


@pytest.mark.parametrize("name", ["tiny-mnist", "kl-f8", "kl-f4", "vq-f4", "dcae-f32", "movq-f4", "movq-f8",
                                  "vqvae2-f4", "dcae-f32-phase2", "dcae-f32-phase3"])
def test_yaml_configs_are_valid(name):
    import inspect
    from pathlib import Path

    import yaml

    from ldm_lightning.autoencoder import AutoencoderModule
    from ldm_lightning.autoencoder.module import AutoencoderModule as M
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "autoencoder" / f"{name}.yaml").read_text())
    model = cfg["model"]
    assert model["class_path"] == "ldm_lightning.autoencoder.AutoencoderModule" and AutoencoderModule is M
    args = model["init_args"]
    assert set(args) <= set(inspect.signature(M.__init__).parameters)
    ae = get_preset(args["preset"], **args.get("autoencoder", {}))
    assert args["image_size"] % ae.downsample_factor == 0
    LossConfig(**args.get("loss", {}))
    if cfg.get("data"):
        from ldm_lightning.data import ShardDataModule
        assert set(cfg["data"]["init_args"]) <= set(inspect.signature(ShardDataModule.__init__).parameters)
        assert cfg["data"]["init_args"]["channels"] == ae.in_channels
    if name == "tiny-mnist":
        AutoencoderModule(**args)


def test_lpips_loads_local_vgg_weights(tmp_path):
    """`lpips_vgg_weights` is read from disk into lpips' VGG slices (a random stand-in for torchvision's
    vgg16-397923af.pth with the same `features.N.*` keys: no download)."""
    import lpips
    ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).net
    fake = {f"features.{k.split('.', 1)[1]}": torch.randn_like(v) for k, v in ref.state_dict().items()}
    fake["classifier.0.weight"] = torch.zeros(1)  # the rest of a torchvision checkpoint is ignored
    torch.save(fake, tmp_path / "vgg16.pth")
    mod = AutoencoderLoss(LossConfig(perceptual_weight=1.0, lpips_vgg_weights=str(tmp_path / "vgg16.pth"),
                                     disc_weight=0.0), 1)
    got = mod.lpips.net.state_dict()
    assert torch.equal(got["slice2.5.weight"], fake["features.5.weight"])
    assert torch.equal(got["slice5.28.bias"], fake["features.28.bias"])
