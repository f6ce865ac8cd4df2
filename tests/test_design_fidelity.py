"""Issue 30: the design documents at full fidelity. Each defect has a test that failed before its fix (REPA's
encoder resolution, JiT's clamped v-loss, the latent scale factor), and the schedule options (SD3's loss weight,
RAE's dimension-dependent shift, a sampling-only timestep grid) are checked against their formulas and through
`ldm-lightning fit` with a shipped config."""

from __future__ import annotations

import math

import pytest
import torch


# --- REPA: the encoder's input resolution ----------------------------------------------------------


def test_repa_dinov2_defaults_to_repas_224_px_not_the_configs_518(tmp_path):
    """REPA feeds DINOv2 /14 224 px images (16x16 = 256 tokens); the published DINOv2 configs say 518 (1369)."""
    from transformers import Dinov2Config, Dinov2Model

    from ldm_lightning.diffusion.repa import load_repa_encoder
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       patch_size=14, image_size=518)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    enc = load_repa_encoder(str(tmp_path / "dino"))
    assert enc.resolution == 224
    assert enc(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 16, 16, 16)  # 256 tokens
    assert load_repa_encoder(str(tmp_path / "dino"), resolution=448).resolution == 448  # explicit: kept


# --- JiT's v-loss, exactly (both 1/(1-t) clamped at 0.05) ----------------------------------------------


class _FixedX0(torch.nn.Module):
    """A backbone that outputs a fixed clean estimate and records the noisy input it was given."""

    def __init__(self, x_pred: torch.Tensor):
        super().__init__()
        self.x_pred, self.z = x_pred, None

    def forward(self, x_t, t, **cond):
        self.z = x_t
        return self.x_pred


@pytest.mark.parametrize("noise_level", [0.001, 0.01, 0.04, 0.3])
def test_jit_v_loss_equals_jits_formula_below_and_above_the_clamp(noise_level):
    """JiT (arXiv 2511.13720), with t_jit = 1 - noise level (t = 1 clean) and z = t x + (1 - t) eps:
    v = (x - z) / max(1 - t, 0.05), v_pred = (x_pred - z) / max(1 - t, 0.05), loss = mean (v - v_pred)^2.
    Ours (t = noise level, u = eps - x0 = -v) must give the same number at every t."""
    from ldm_lightning.diffusion.denoiser import Denoiser
    from ldm_lightning.diffusion.loss import DiffusionObjective, ObjectiveConfig
    from ldm_lightning.diffusion.schedules import FlowSchedule
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 4, 4, generator=g)
    x_pred = x + 0.1 * torch.randn(3, 2, 4, 4, generator=g)
    net = _FixedX0(x_pred)
    den = Denoiser(net, FlowSchedule(), prediction="x0", clamp=0.05)
    obj = DiffusionObjective(ObjectiveConfig(prediction="x0", loss_space="flow", clamp=0.05))
    got = obj.loss(den, x, generator=g, t=torch.full((3,), noise_level, dtype=torch.float64)).loss
    z, t_jit = net.z.double(), 1 - noise_level
    v = (x.double() - z) / max(1 - t_jit, 0.05)
    v_pred = (x_pred.double() - z) / max(1 - t_jit, 0.05)
    want = (v - v_pred).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


# --- the renamed latent DiT-B/4 config: the old name still resolves, with a note ------------------------


def test_renamed_dit_b4_config_old_name_still_resolves_with_a_deprecation_note(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert not (root / "configs/diffusion/jit-dit-b4-class.yaml").exists()
    r = subprocess.run([sys.executable, "-m", "ldm_lightning", "fit", "-c", "configs/diffusion/jit-dit-b4-class.yaml",
                        "--print_config"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "deprecated" in r.stderr and "diffusion/dit-b4-xpred-vloss-class.yaml" in r.stderr
    assert "backbone: DiT-B/4" in r.stdout and "loss_space: flow" in r.stdout


# --- MoVQ presets: the paper's 1024-entry multichannel codebook -------------------------------------


@pytest.mark.parametrize("name", ["movq-f4", "movq-f8"])
def test_movq_presets_use_the_papers_1024_codes_in_two_heads(name):
    from ldm_lightning.autoencoder import Autoencoder, get_preset
    cfg = get_preset(name)
    assert (cfg.vq_codebook_size, cfg.vq_heads, cfg.embed_dim) == (1024, 2, 4)
    with torch.device("meta"):
        q = Autoencoder(cfg).quantize
    assert (q.codebook_size, q.dim, q.heads) == (1024, 2, 2)  # 1024^2 code pairs per position


# --- the latent scale factor is 1 / std of the latents (LDM's scale_by_std) -----------------------------


def test_scale_factor_is_one_over_the_std_of_the_latents():
    """On real MNIST through a tiny trained-shape autoencoder: the measured factor equals 1 / std of every latent
    value the pass encoded (posterior samples replayed from the same generator; and the posterior mode)."""
    from ldm_lightning.autoencoder import Autoencoder, get_preset
    from ldm_lightning.encoders.mnist_data import load_mnist_32
    torch.manual_seed(0)
    ae = Autoencoder(get_preset("tiny-mnist")).eval()
    x, _ = load_mnist_32("test", limit=24)  # (24, 1, 32, 32) in [-1, 1]
    batches = list(x.split(8))
    for sample in (False, True):
        stats = ae.compute_scale_factor(batches, sample=sample, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            z = torch.cat([(ae.encode(b).sample(generator=g) if sample else ae.encode(b).mode()).double()
                           for b in batches])
        assert float(stats["scale_factor"]) == pytest.approx(1 / z.std(unbiased=False).item(), rel=1e-6)
        assert float(ae.scale_factor) == float(stats["scale_factor"]) and float(ae.shift_factor) == 0.0
        torch.testing.assert_close(stats["latent_std"].double(), z.transpose(0, 1).flatten(1).std(1, unbiased=False),
                                   rtol=1e-5, atol=1e-6)


def test_keep_latent_stats_is_refused_where_the_latents_change():
    from ldm_lightning.autoencoder import AutoencoderModule
    with pytest.raises(ValueError, match="keep_latent_stats needs model.init_from"):
        AutoencoderModule(keep_latent_stats=True, loss={"perceptual_weight": 0, "disc_weight": 0})
    with pytest.raises(ValueError, match="the latent side trains"):
        AutoencoderModule(keep_latent_stats=True, init_from="x.ckpt", train_only=["encoder.conv_in.*"],
                          loss={"perceptual_weight": 0, "disc_weight": 0})
    m = AutoencoderModule(keep_latent_stats=True, init_from="x.ckpt", train_only=["decoder.conv_out.*"],
                          loss={"perceptual_weight": 0, "disc_weight": 0})
    assert m.configure_callbacks()[0].keep


# --- schedules: SD3's loss weight, RAE's dimension-dependent shift, a sampling-only grid -------------------


def test_sd3_weighting_is_sd3s_rectified_flow_weight_in_every_loss_space():
    """SD3 (arXiv 2403.03206 §2): eps-space weight w_t * (-lambda'_t / 2), w_t = t / (1 - t), lambda = 2 log((1-t)/t);
    so in every loss space the weighted loss equals the unweighted flow-matching loss of the same model."""
    from ldm_lightning.diffusion.denoiser import Denoiser
    from ldm_lightning.diffusion.loss import DiffusionObjective, ObjectiveConfig
    from ldm_lightning.diffusion.schedules import FlowSchedule
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97], dtype=torch.float64)
    alpha, sigma = FlowSchedule().alpha_sigma(t)
    lam_prime = -2 / (t * (1 - t))  # d/dt 2 log((1 - t) / t)
    sd3_eps = (t / (1 - t)) * (-0.5 * lam_prime)
    w = DiffusionObjective(ObjectiveConfig(prediction="eps", weighting="sd3")).weight(alpha, sigma)
    torch.testing.assert_close(w, sd3_eps, rtol=1e-12, atol=0)

    class _Off(torch.nn.Module):  # an imperfect eps-predictor: a fixed function of x_t
        def forward(self, x_t, t, **cond):
            return 0.5 * x_t + 0.1
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(len(t), 2, 4, 4, generator=g)
    den = Denoiser(_Off(), FlowSchedule(), "eps", clamp=0.0)
    losses = {}
    for space in ("eps", "x0", "v", "flow"):
        obj = DiffusionObjective(ObjectiveConfig(prediction="eps", loss_space=space, weighting="sd3", clamp=0.0))
        losses[space] = obj.loss(den, x0, generator=torch.Generator().manual_seed(1), t=t).loss.double()
    flow_plain = DiffusionObjective(ObjectiveConfig(prediction="eps", loss_space="flow", clamp=0.0)).loss(
        den, x0, generator=torch.Generator().manual_seed(1), t=t).loss.double()
    for space, got in losses.items():
        torch.testing.assert_close(got, flow_plain, rtol=1e-4, atol=1e-6, msg=space)


def test_rae_shift_and_sampling_only_grid():
    from ldm_lightning.diffusion.schedules import FlowSchedule
    rae = FlowSchedule(shift_base_dim=4096, latent_dim=16 * 16 * 768)  # RAE's DINOv2-B latent at 256 px
    assert rae.shift == pytest.approx(math.sqrt(48)) and rae.shift == pytest.approx(6.928, abs=1e-3)
    u = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    s = math.sqrt(48)
    torch.testing.assert_close(rae.sample_t(u), s * u / (1 + (s - 1) * u))  # training draws are shifted
    torch.testing.assert_close(rae.inference_times(4), rae.shift_t(torch.tensor([1, 0.75, 0.5, 0.25]).double()))
    # the sampling grid alone: training unchanged, the grid shifted (more of it at high noise)
    plain, grid = FlowSchedule(), FlowSchedule(sample_shift=3.0)
    torch.testing.assert_close(grid.sample_t(u), plain.sample_t(u))
    g = grid.inference_times(4)
    torch.testing.assert_close(g, 3 * plain.inference_times(4) / (1 + 2 * plain.inference_times(4)))
    assert (g[1:] > plain.inference_times(4)[1:]).all()
    both = FlowSchedule(shift_base_dim=4096, latent_dim=16 * 16 * 768, sample_shift=1.0)
    torch.testing.assert_close(both.inference_times(4), plain.inference_times(4))
    for bad, match in ((dict(shift_base_dim=4096), "needs schedule.latent_dim"),
                       (dict(shift=3.0, shift_base_dim=4096, latent_dim=8192), "both set the training shift"),
                       (dict(sample_shift=0.0), "sample_shift must be > 0")):
        with pytest.raises(ValueError, match=match):
            FlowSchedule(**bad)


@pytest.mark.timeout(600)
def test_rae_stage2_config_fits_with_its_shift_and_samples_on_a_grid_of_its_own(mnist_shards, tiny_ae, tmp_path):
    """The shipped RAE stage-2 config through `ldm-lightning fit` (sizes overridden to tiny, real MNIST, the tiny
    autoencoder in place of the RAE: 4x8x8 latents, so RAE's shift is sqrt(256 / 4096) = 0.25; SD3's weighting; a
    tiny DiT with JiT's block options from backbone_config), then
    `ldm-lightning sample --time-shift 3` (the sampling grid alone); a bad value is a user error."""
    import glob
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}

    def cli(*args):
        import os
        return subprocess.run([sys.executable, "-m", "ldm_lightning", *args], cwd=tmp_path, env={**os.environ, **env},
                              capture_output=True, text=True, timeout=400)
    r = cli("fit", "-c", str(root / "configs/diffusion/rae-ditdh-class.yaml"),
            "-c", str(root / "configs/trainer/cpu-debug.yaml"),
            "--model.init_args.autoencoder", tiny_ae, "--model.init_args.backbone", "dit-tiny",
            "--model.init_args.backbone_config", "{mlp: swiglu, norm: rmsnorm, rope: true, class_tokens: 4}",
            "--model.init_args.conditioning.num_classes", "10", "--model.init_args.val_num", "0",
            "--model.init_args.val_steps", "1", "--model.init_args.optim.warmup_steps", "0",
            "--model.init_args.objective.prediction", "eps", "--model.init_args.objective.loss_space", "flow",
            "--model.init_args.objective.weighting", "sd3",
            "--data.init_args.train_shards", mnist_shards["train"], "--data.init_args.val_shards", mnist_shards["test"],
            "--data.init_args.image_size", "32", "--data.init_args.channels", "1",
            "--data.init_args.resize_mode", "pad",
            "--data.init_args.random_flip", "false", "--data.init_args.batch_size", "8",
            "--data.init_args.val_samples", "8", "--data.init_args.num_workers", "0",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
            "--trainer.default_root_dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (ckpt,) = glob.glob(str(tmp_path / "run" / "**" / "last.ckpt"), recursive=True)
    meta = torch.load(ckpt, map_location="cpu", weights_only=True)["ldm_lightning"]
    assert meta["schedule"] == {"kind": "flow", "shift_base_dim": 4096, "latent_dim": 256}
    assert meta["objective"]["weighting"] == "sd3"
    bb = meta["backbone"]  # JiT's block options, from the documented backbone_config flag
    assert (bb["mlp"], bb["norm"], bb["rope"], bb["class_tokens"]) == ("swiglu", "rmsnorm", True, 4)
    from ldm_lightning.diffusion.load import load_denoiser
    den = load_denoiser(ckpt)[0]
    assert den.schedule.shift == pytest.approx(0.25) and den.schedule.sample_shift is None
    r = cli("sample", "--checkpoint", ckpt, "--classes", "0-1", "--num", "1", "--steps", "2",
            "--sampler", "flow_euler", "--time-shift", "3", "--out", str(tmp_path / "s"))
    assert r.returncode == 0 and "wrote 2 samples" in r.stdout, r.stderr[-2000:]
    from ldm_lightning.diffusion.sample import main
    from ldm_lightning.errors import UserError
    with pytest.raises(UserError, match="--time-shift 0.0: give a shift > 0"):
        main(["--checkpoint", ckpt, "--class", "1", "--time-shift", "0", "--out", str(tmp_path / "s0")])


# --- JiT's block components as DiT config fields: SwiGLU, RMSNorm, 2-D RoPE, in-context class tokens ----------


def _jit_dit(**kw):
    """A tiny class-conditional DiT with every zero-initialised weight randomised (AdaLN-Zero outputs 0 at init)."""
    from ldm_lightning.diffusion import DiT, DiTConfig
    torch.manual_seed(0)
    cfg = dict(input_size=8, in_channels=2, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    dit = DiT(DiTConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return dit


def test_rope_2d_scores_depend_on_relative_position_only():
    from ldm_lightning.nn.rope import apply_rope, rope_2d
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)
    cos, sin = rope_2d(16, 6, 6, prefix=2)  # 2 unrotated prefix tokens, then a 6x6 grid (row-major)

    def score(a, b):  # query at grid (r, c) = a, key at b
        i, j = 2 + a[0] * 6 + a[1], 2 + b[0] * 6 + b[1]
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum().item()
    for (a, b), (a2, b2) in [(((0, 0), (1, 2)), ((3, 1), (4, 3))), (((5, 5), (2, 0)), ((3, 5), (0, 0)))]:
        assert score(a, b) == pytest.approx(score(a2, b2), abs=1e-5)  # same offset: same score
    assert abs(score((0, 0), (1, 2)) - score((0, 0), (2, 1))) > 1e-3  # rows and columns are told apart
    assert torch.equal(cos[:2], torch.ones(2, 16)) and torch.equal(sin[:2], torch.zeros(2, 16))  # prefix: identity
    # rotation keeps norms (it is orthogonal)
    torch.testing.assert_close(apply_rope(q, cos[9:10], sin[9:10]).norm(), q.norm())


def test_swiglu_rmsnorm_rope_class_tokens_in_the_dit():
    from ldm_lightning.diffusion.dit import SwiGLU
    from ldm_lightning.training.flops import count_flops
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 700.0]), torch.tensor([3, 10])
    base = _jit_dit()
    jit = _jit_dit(mlp="swiglu", norm="rmsnorm", rope=True, class_tokens=4)
    blk = jit.blocks[0]
    assert isinstance(blk.mlp, SwiGLU) and isinstance(blk.norm1, torch.nn.RMSNorm)
    assert isinstance(jit.final_layer.norm, torch.nn.RMSNorm)
    n_gelu = sum(p.numel() for p in base.blocks[0].mlp.parameters())
    n_swiglu = sum(p.numel() for p in blk.mlp.parameters())
    assert abs(n_swiglu - n_gelu) / n_gelu < 0.02  # the 2/3 hidden width keeps DiT's MLP size
    h = torch.randn(3, 32)  # SwiGLU = fc2(silu(a) * b), [a | b] = fc1(h)
    a, b = blk.mlp.fc1(h).chunk(2, -1)
    torch.testing.assert_close(blk.mlp(h), blk.mlp.fc2(torch.nn.functional.silu(a) * b))
    with torch.no_grad():
        out = jit(x, t, y)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # RoPE is live: the same weights without it give another output
        jit.cfg.rope = False
        assert (jit(x, t, y) - out).abs().max() > 1e-4
        jit.cfg.rope = True
        # class tokens: their slot order does not matter (their outputs are dropped, attention sums over keys;
        # they are not rotated), the class they carry does
        perm = torch.tensor([2, 0, 3, 1])
        jit.class_token_pos.copy_(jit.class_token_pos[perm])
        torch.testing.assert_close(jit(x, t, y), out, rtol=1e-5, atol=1e-6)
        # ... while the image tokens' order does (sin-cos positions and RoPE)
        flipped = jit(x.flip(-1), t, y).flip(-1)
        assert (flipped - out).abs().max() > 1e-4
    counted = count_flops(lambda: jit(x[:1], t[:1], y[:1]))
    assert counted == pytest.approx(jit.flops_per_image(), rel=0.02)
    with pytest.raises(ValueError, match="class_tokens=2 needs a class-conditional"):
        _jit_dit(num_classes=None, class_tokens=2)
    with pytest.raises(ValueError, match="dit.mlp must be one of"):
        _jit_dit(mlp="relu")


def test_class_tokens_join_at_their_start_block_and_their_order_does_not_matter():
    """JiT inserts its in-context class tokens before block `in_context_start`: the blocks before see the image
    tokens only; from there on the tokens are [class | image (| text)], the class tokens unrotated by RoPE, so their
    slot order still does not matter while their content does. Text tokens' padding mask follows the insertion."""
    from ldm_lightning.diffusion import DiT, DiTConfig
    from ldm_lightning.training.flops import count_flops
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([300.0, 700.0]), torch.tensor([3, 10])
    jit = _jit_dit(depth=3, mlp="swiglu", norm="rmsnorm", rope=True, class_tokens=4, class_tokens_start=2)
    lengths = []
    hooks = [b.register_forward_hook(lambda m, a, out: lengths.append(out.shape[1])) for b in jit.blocks]
    with torch.no_grad():
        out = jit(x, t, y)
        assert lengths == [16, 16, 20] and [jit.leading_tokens(i) for i in range(3)] == [0, 0, 4]
        for h in hooks:
            h.remove()
        perm = torch.tensor([3, 1, 0, 2])
        jit.class_token_pos.copy_(jit.class_token_pos[perm])
        torch.testing.assert_close(jit(x, t, y), out, rtol=1e-5, atol=1e-6)  # slot order: no effect
        jit.class_token_pos.add_(1.0)
        assert (jit(x, t, y) - out).abs().max() > 1e-4  # their content: live
        jit.cfg.class_tokens_start = 0
        assert (jit(x, t, y) - out).abs().max() > 1e-4  # where they join: live
        jit.cfg.class_tokens_start = 2
    assert count_flops(lambda: jit(x[:1], t[:1], y[:1])) == pytest.approx(jit.flops_per_image(), rel=0.02)
    # with in-context text tokens and a padding mask: masked text tokens change nothing
    txt = _jit_dit(depth=3, rope=True, class_tokens=4, class_tokens_start=1, context_dim=6, text_mode="in_context")
    ctx, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        ref = txt(x, t, y, ctx, mask)
        ctx[0, 3:] = 100.0
        torch.testing.assert_close(txt(x, t, y, ctx, mask), ref, rtol=1e-5, atol=1e-5)
    for bad in (dict(class_tokens=4, class_tokens_start=3), dict(class_tokens_start=1), dict(class_tokens_start=-1)):
        with pytest.raises(ValueError, match="class_tokens_start"):
            DiTConfig(input_size=8, depth=3, hidden_size=32, num_heads=2, num_classes=10, **bad)


# paper (arXiv 2511.13720, its system-level table): parameters (M) and GFLOPs (multiply-adds) at 256 (/16) / 512 (/32)
JIT_PAPER = {"JiT-B/16": (131, 25), "JiT-L/16": (459, 88), "JiT-H/16": (953, 182),
             "JiT-B/32": (133, 26), "JiT-L/32": (462, 89), "JiT-H/32": (956, 183)}


def test_jit_presets_match_the_papers_sizes():
    """LTH14/JiT model_jit.py: depth / width / heads / bottleneck / in-context start per size, 32 class tokens;
    built on the meta device (no memory), the counts match the paper's within 0.5% (parameters) and 2% (GFLOPs)."""
    from ldm_lightning.diffusion import PRESETS, build_backbone
    arch = {"B": (12, 768, 12, 128, 4), "L": (24, 1024, 16, 128, 8), "H": (32, 1280, 16, 256, 10)}
    for name, (params_m, gflops) in JIT_PAPER.items():
        family, cfg = PRESETS[name]
        assert family == "dit" and (cfg["depth"], cfg["hidden_size"], cfg["num_heads"], cfg["bottleneck_dim"],
                                    cfg["class_tokens_start"]) == arch[name[4]], name
        assert (cfg["mlp"], cfg["norm"], cfg["rope"], cfg["qk_norm"], cfg["class_tokens"]) == (
            "swiglu", "rmsnorm", True, True, 32)
        with torch.device("meta"):
            net = build_backbone(name, num_classes=1000)
        assert net.cfg.input_size // net.cfg.patch_size == 16  # 256 image tokens at 256 px (/16) and 512 px (/32)
        assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(params_m, rel=0.005), name
        assert net.flops_per_image() / 2e9 == pytest.approx(gflops, rel=0.02), name
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        build_backbone("JiT-B/16")
