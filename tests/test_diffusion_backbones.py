"""UNet / DiT: shapes, zero init (AdaLN-Zero), class and text conditioning, checkpointing; attention,
embeddings, classifier-free guidance, conditioning with the bundled MiniLM text encoder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_lightning.diffusion import (PRESETS, Conditioner, ConditioningConfig, Denoiser, DiT, DiTConfig, UNet,
                                     UNetConfig, VPSchedule, build_backbone, cfg_denoiser, concat_cond)
from ldm_lightning.nn.attention import Attention
from ldm_lightning.nn.embeddings import sincos_2d, timestep_embedding

torch.set_num_threads(1)


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _perturb(model, seed=0):
    """Give every parameter a random value so zero-initialised paths are exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _inputs(B=2, C=4, S=8, L=5, D=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return (torch.randn(B, C, S, S, generator=g), torch.tensor([10.0, 900.0])[:B],
            torch.tensor([3, 10])[:B], torch.randn(B, L, D, generator=g), mask)


# ----------------------------------------------------------------------------------------------------- nn
def test_attention_matches_explicit_softmax_and_honours_key_padding_mask():
    torch.manual_seed(0)
    attn = Attention(32, 4, context_dim=16, qk_norm=False)
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = attn(x, ctx, mask)
    q = attn.to_q(x).view(2, 6, 4, 8).transpose(1, 2)
    k, v = attn.to_kv(ctx).view(2, 5, 2, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) + torch.where(mask, 0.0, -torch.inf)[:, None, None]
    ref = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 6, 32))
    assert torch.allclose(out, ref, atol=1e-5)
    ctx2 = ctx.clone()
    ctx2[0, 3:] = 1e3  # masked keys must not matter
    assert torch.allclose(attn(x, ctx2, mask)[0], out[0], atol=1e-5)
    with pytest.raises(ValueError, match="without `context`"):
        attn(x)
    assert isinstance(Attention(32, 4, qk_norm=True).q_norm, torch.nn.RMSNorm)


def test_embeddings_match_reference_formulas():
    t = torch.tensor([0.0, 1.0, 500.0])
    e = timestep_embedding(t, 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(e, torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1))
    # 2-D sin-cos: MAE / DiT `get_2d_sincos_pos_embed` written out in numpy
    D, G = 16, 3
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(G, dtype=np.float32), np.arange(G, dtype=np.float32))  # w first, as DiT
    ref = np.concatenate([one_d(D // 2, grid[0]), one_d(D // 2, grid[1])], axis=1)
    assert np.allclose(sincos_2d(D, G, G).numpy(), ref, atol=1e-6)


# ------------------------------------------------------------------------------------------------- DiT
def test_dit_adaln_zero_init_blocks_are_identity_and_output_zero():
    model = DiT(DiTConfig(input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10, context_dim=384))
    x, t, y, ctx, mask = _inputs()
    assert torch.equal(model(x, t, y, ctx, mask), torch.zeros_like(x))
    tokens = torch.randn(2, 16, 64)
    c = model.t_embedder(t) + model.y_embedder(y)
    for blk in model.blocks:
        assert torch.equal(blk(tokens, c, ctx, mask), tokens)  # gates and cross-attn output start at zero


@pytest.mark.parametrize("text_mode", ["cross_attn", "in_context"])
def test_dit_class_and_text_conditioning_forward_backward(text_mode):
    model = _perturb(DiT(DiTConfig(input_size=8, depth=2, hidden_size=64, num_heads=4, num_classes=10,
                                   context_dim=384, text_mode=text_mode, qk_norm=True)))
    x, t, y, ctx, mask = _inputs()
    out = model(x, t, y, ctx, mask)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        assert not torch.allclose(model(x, t, torch.tensor([0, 10]), ctx, mask), out)  # class matters
        ctx2 = ctx.clone()
        ctx2[1] += 1.0
        o2 = model(x, t, y, ctx2, mask)
        assert torch.allclose(o2[0], out[0], atol=1e-6) and not torch.allclose(o2[1], out[1])  # per-sample context
        ctx3 = ctx.clone()
        ctx3[0, 3:] = 100.0  # padded tokens of sample 0 are masked
        assert torch.allclose(model(x, t, y, ctx3, mask), out, atol=1e-5)
        assert model(torch.randn(2, 4, 12, 12), t, y, ctx, mask).shape == (2, 4, 12, 12)  # other latent size
    with pytest.raises(ValueError, match="pass y"):
        model(x, t, None, ctx, mask)
    with pytest.raises(ValueError, match="pass context"):
        model(x, t, y, None, None)


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_activation_checkpointing_gives_same_grads(family):
    kw = dict(num_classes=10, context_dim=384)
    if family == "dit":
        make = lambda ck: DiT(DiTConfig(input_size=8, depth=2, hidden_size=64, num_heads=4,  # noqa: E731
                                        grad_checkpointing=ck, **kw))
    else:
        make = lambda ck: UNet(UNetConfig(model_channels=32, channel_mult=(1, 2), head_dim=16, norm_groups=8,  # noqa
                                          grad_checkpointing=ck, **kw))
    torch.manual_seed(0)
    a = _perturb(make(False))
    b = make(True)
    b.load_state_dict(a.state_dict())
    x, t, y, ctx, mask = _inputs()
    for m in (a, b):
        m(x, t, y, ctx, mask).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-5), n


def test_dit_presets_match_paper_sizes_and_flops_hint():
    for name, depth, hidden, heads in (("DiT-S/2", 12, 384, 6), ("DiT-B/4", 12, 768, 12), ("DiT-L/8", 24, 1024, 16),
                                       ("DiT-XL/2", 28, 1152, 16)):
        fam, cfg = PRESETS[name]
        assert fam == "dit" and (cfg["depth"], cfg["hidden_size"], cfg["num_heads"]) == (depth, hidden, heads)
    model = build_backbone("DiT-S/2", input_size=32, num_classes=1000)
    # DiT paper Table 4: DiT-S/2 is 33 M parameters and 6.06 GFLOPs (multiply-adds) at 256 px
    assert _nparams(model) / 1e6 == pytest.approx(33.0, rel=0.03)
    assert model.flops_per_image() / 2 / 1e9 == pytest.approx(6.06, rel=0.03)
    with pytest.raises(ValueError, match="no field"):
        build_backbone("DiT-S/2", learn_sigma=True)
    with pytest.raises(ValueError, match="unknown backbone preset"):
        build_backbone("DiT-M/2")
    with pytest.raises(ValueError, match="dit.text_mode"):
        DiTConfig(text_mode="concat")


# ------------------------------------------------------------------------------------------------ UNet
def test_unet_zero_output_at_init_and_shapes():
    model = build_backbone("unet-tiny", num_classes=10, context_dim=384)
    assert 1e6 < _nparams(build_backbone("unet-tiny")) < 5e6  # MNIST-demo size (measured 3.94 M)
    x, t, y, ctx, mask = _inputs()
    assert torch.equal(model(x, t, y, ctx, mask), torch.zeros_like(x))
    _perturb(model)
    out = model(x, t, y, ctx, mask)
    assert out.shape == x.shape and out.abs().mean() > 0
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        ctx2 = ctx.clone()
        ctx2[1] += 1.0
        o2 = model(x, t, y, ctx2, mask)
        assert torch.allclose(o2[0], out[0], atol=1e-6) and not torch.allclose(o2[1], out[1])
        ctx3 = ctx.clone()
        ctx3[0, 3:] = 100.0
        assert torch.allclose(model(x, t, y, ctx3, mask), out, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 4, 7, 7), t[:1], y[:1], ctx[:1], mask[:1])
    with pytest.raises(ValueError, match="unet.attention_levels"):
        UNetConfig(attention_levels=(3,))


# --------------------------------------------------------------------------------------------- guidance
def test_cfg_scale_one_is_conditional_and_batched_guidance_is_exact():
    sched = VPSchedule("linear")
    den = Denoiser(_perturb(DiT(DiTConfig(input_size=8, depth=1, hidden_size=64, num_heads=4, num_classes=10))),
                   sched, "v")
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 990])
    cond, uncond = {"y": torch.tensor([1, 2, 3])}, {"y": torch.full((3,), 10)}
    with torch.no_grad():
        pc, pu = den(x, t, cond), den(x, t, uncond)
        p1 = cfg_denoiser(den, cond, uncond, 1.0)(x, t)
        assert torch.equal(p1.x0, pc.x0) and torch.equal(p1.eps, pc.eps)
        pw = cfg_denoiser(den, cond, uncond, 4.0)(x, t)  # one batched forward of 2B
        assert torch.allclose(pw.x0, pu.x0 + 4 * (pc.x0 - pu.x0), atol=1e-5)
        # guidance in (x0, eps) equals guidance in the network's own v space
        assert torch.allclose(pw.v, pu.v + 4 * (pc.v - pu.v), atol=1e-5)


def test_concat_cond_pads_context_with_false_mask():
    a = {"context": torch.ones(2, 5, 3), "context_mask": torch.ones(2, 5, dtype=torch.bool)}
    b = {"context": torch.ones(2, 2, 3), "context_mask": torch.ones(2, 2, dtype=torch.bool)}
    c = concat_cond(a, b)
    assert c["context"].shape == (4, 5, 3) and c["context_mask"][2:, 2:].sum() == 0
    with pytest.raises(ValueError, match="same keys"):
        concat_cond(a, {"y": torch.zeros(2)})


# ------------------------------------------------------------------------------------------ conditioning
def test_class_conditioner_null_class_and_seeded_dropout():
    cond = Conditioner(ConditioningConfig(kind="class", num_classes=10, drop_prob=0.5))
    batch = {"cls": torch.arange(10).repeat(20)}
    a = cond(batch, torch.Generator().manual_seed(0))["y"]
    b = cond(batch, torch.Generator().manual_seed(0))["y"]
    assert torch.equal(a, b)
    dropped = a == 10
    assert 0.35 < dropped.float().mean() < 0.65 and torch.equal(a[~dropped], batch["cls"][~dropped])
    assert torch.equal(cond.null(3)["y"], torch.full((3,), 10))
    assert cond.from_labels(torch.tensor([-1]))["y"].item() == 10
    with pytest.raises(ValueError, match="num_classes"):
        cond.from_labels(torch.tensor([11]))
    with pytest.raises(ValueError, match="conditioning.kind"):
        ConditioningConfig(kind="image")


def test_text_conditioner_minilm_tokens_feed_cross_attention():
    cond = Conditioner(ConditioningConfig(kind="text", max_length=16, drop_prob=0.0))
    assert cond.context_dim == 384
    c = cond({"txt": ["a handwritten digit seven", "zero"]})
    assert c["context"].shape == (2, 16, 384) and c["context_mask"].shape == (2, 16)
    assert c["context_mask"][1].sum() < c["context_mask"][0].sum()  # shorter prompt, more padding
    null = cond.null(2)
    assert not torch.allclose(null["context"], c["context"])
    model = build_backbone("unet-tiny", context_dim=cond.context_dim)
    assert model(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), **c).shape == (2, 4, 8, 8)


def test_text_encoder_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="conditioning.text_encoder"):
        Conditioner(ConditioningConfig(kind="text", text_encoder=str(tmp_path / "nope")))


def test_text_encoder_cache_matches_batched_encoding_and_skips_repeats():
    from ldm_lightning.encoders import TextEncoderConfig, TextEncoders
    enc = TextEncoders([TextEncoderConfig()], max_length=16, cache_size=3)
    texts = ["a handwritten digit seven", "", "a handwritten digit one", "a handwritten digit seven"]
    ref = enc.encode(texts, torch.device("cpu"))  # one uncached batch, the reference
    ref_h, ref_m = ref.states, ref.mask
    calls = []
    real = enc.encode
    enc.encode = lambda t, d: calls.append(list(t)) or real(t, d)
    e = enc(texts, torch.device("cpu"))
    h, m = e.states, e.mask
    assert calls == [["a handwritten digit seven", "", "a handwritten digit one"]]  # each caption once
    assert torch.equal(m, ref_m) and torch.allclose(h, ref_h, atol=1e-5)
    h2 = enc(["", "a handwritten digit one"], torch.device("cpu")).states
    assert len(calls) == 1 and torch.allclose(h2, ref_h[1:3], atol=1e-5)  # all from the cache
    enc(["a handwritten digit two"], torch.device("cpu"))
    assert len(enc._cache) == 3 and "a handwritten digit seven" not in enc._cache  # least recently used went


# ------------------------------------------------------------------------------------- real data (MNIST)
def _train_dit_on_mnist(steps: int, seed: int) -> list[float]:
    import torch.nn.functional as F

    from ldm_lightning.data.mnist import load_mnist
    from ldm_lightning.diffusion import DiffusionObjective, ObjectiveConfig
    imgs, labels = load_mnist("train")
    x = torch.from_numpy(imgs[:1024]).float().div(127.5).sub(1)[:, None]  # (N, 1, 28, 28) in [-1, 1]
    x = F.adaptive_avg_pool2d(x, 8)  # (N, 1, 8, 8): an 8x8 'latent' the size of the demo's
    y = torch.from_numpy(labels[:1024])
    torch.manual_seed(seed)
    sched = VPSchedule("linear")
    den = Denoiser(build_backbone("dit-tiny", in_channels=1, num_classes=10), sched, "v")
    obj = DiffusionObjective(ObjectiveConfig(prediction="v", weighting="min_snr"), sched)
    opt = torch.optim.AdamW(den.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        out = obj.loss(den, x[idx], {"y": y[idx]}, g)  # every draw (t, noise) from g
        out.loss.mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.mean().item())
    return losses


def test_dit_learns_mnist_and_training_is_reproducible():
    a = _train_dit_on_mnist(60, seed=0)
    b = _train_dit_on_mnist(60, seed=0)
    assert a == b  # same seeds -> bit-identical losses (CPU)
    first, last = sum(a[:10]) / 10, sum(a[-10:]) / 10
    assert last < 0.6 * first, (first, last)
