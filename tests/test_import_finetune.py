"""Start from published stage-2 weights (issue 28): import exactly, fine-tune (full / LoRA), export back.

References: facebookresearch/DiT (`models.py`) cannot be fetched here, so its forward pass is written out below
from the paper / official layout, on the official state-dict names, independently of our DiT; diffusers'
`DiTTransformer2DModel` (a test-only dependency) is the reference for the diffusers port. All weights random
(the zero-initialised adaLN / final layers too), fp32, max abs diff <= 1e-4.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]
C, P, D, DEPTH, HEADS, SIZE, CLASSES = 4, 2, 64, 2, 4, 8, 10  # tiny: 8x8x4 latents (the tiny_ae fixture's)


# --- the facebookresearch/DiT reference ---------------------------------------------------------------------
def mae_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed (what facebookresearch/DiT stores in pos_embed), in numpy."""
    gh, gw = np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)
    g = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], axis=1)


def random_fb_dit(seed: int = 0, learn_sigma: bool = True) -> dict[str, torch.Tensor]:
    """A facebookresearch/DiT state dict (DiT-XL-2-256x256.pt's key layout), tiny, every tensor random."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)  # noqa: E731
    out_c = 2 * C if learn_sigma else C
    sd = {"x_embedder.proj.weight": r(D, C, P, P), "x_embedder.proj.bias": r(D),
          "pos_embed": torch.from_numpy(mae_sincos_2d(D, SIZE // P)).float()[None],
          "t_embedder.mlp.0.weight": r(D, 256), "t_embedder.mlp.0.bias": r(D),
          "t_embedder.mlp.2.weight": r(D, D), "t_embedder.mlp.2.bias": r(D),
          "y_embedder.embedding_table.weight": r(CLASSES + 1, D),
          "final_layer.linear.weight": r(P * P * out_c, D), "final_layer.linear.bias": r(P * P * out_c),
          "final_layer.adaLN_modulation.1.weight": r(2 * D, D), "final_layer.adaLN_modulation.1.bias": r(2 * D)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update({b + "attn.qkv.weight": r(3 * D, D), b + "attn.qkv.bias": r(3 * D), b + "attn.proj.weight": r(D, D),
                   b + "attn.proj.bias": r(D), b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D),
                   b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D),
                   b + "adaLN_modulation.1.weight": r(6 * D, D), b + "adaLN_modulation.1.bias": r(6 * D)})
    return sd


def fb_dit_forward(sd, x, t, y, heads=HEADS):
    """facebookresearch/DiT `DiT.forward(x, t, y)` on its own state dict (paper Fig. 3, adaLN-Zero blocks)."""
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        a = ln(h) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * (D // heads) ** -0.5).softmax(-1)
        h = h + g1[:, None] * lin((w @ v).transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        m = ln(h) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(ln(h) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    co, g = out.shape[-1] // (P * P), SIZE // P
    out = out.reshape(B, g, g, P, P, co)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, co, g * P, g * P)


def random_diffusers_dit(seed: int = 0, out_channels: int = 2 * C):
    """A tiny DiTTransformer2DModel with every tensor random; one timestep/class embedding copied into every
    block, as the official port does."""
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C,
                                        out_channels=out_channels, num_layers=DEPTH, sample_size=SIZE, patch_size=P,
                                        num_embeds_ada_norm=CLASSES, norm_eps=1e-5).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        emb0 = m.transformer_blocks[0].norm1.emb.state_dict()
        for blk in m.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(emb0)
    return m


def inputs(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, C, SIZE, SIZE, generator=g), torch.tensor([0, 421, 999][:n]),
            torch.tensor([3, 7, CLASSES][:n]))  # the last: the null class


def ours_from(pre):
    from ldm_lightning.diffusion.presets import backbone_from_config
    net = backbone_from_config(pre.backbone_family, pre.backbone).eval()
    net.load_state_dict({k[len("backbone."):]: v for k, v in pre.state.items()}, strict=True)
    return net


# --- 1. import, exact ---------------------------------------------------------------------------------------
def test_fb_dit_imports_exactly_learned_sigma_and_not(tmp_path):
    from ldm_lightning.diffusion.load import read_pretrained
    x, t, y = inputs()
    for learn_sigma in (True, False):
        sd = random_fb_dit(learn_sigma=learn_sigma)
        torch.save(sd, tmp_path / "dit.pt")  # plain state dict: read back with weights_only=True
        pre = read_pretrained(tmp_path / "dit.pt", num_heads=HEADS)
        assert pre.prediction == "eps" and pre.schedule["beta_schedule"] == "linear" and pre.num_classes == CLASSES
        assert pre.backbone["timestep_freq_shift"] == 0 and bool(pre.notes) == learn_sigma
        with torch.no_grad():
            ref = fb_dit_forward(sd, x, t, y)[:, :C]  # learned sigma: the eps half
            out = ours_from(pre)(x, t.float(), y)
        assert (out - ref).abs().max() <= 1e-4, (out - ref).abs().max()


def test_diffusers_dit_imports_and_exports_exactly(tmp_path):
    """diffusers DiT folder (+ scheduler) -> ours: same output; ours -> DiTTransformer2DModel folder that diffusers
    loads: same output again."""
    from ldm_lightning.diffusion.interop import to_diffusers_dit
    from ldm_lightning.diffusion.load import read_pretrained
    ref = random_diffusers_dit()
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            prediction_type="epsilon").save_pretrained(tmp_path / "pipe" / "scheduler")
    pre = read_pretrained(tmp_path / "pipe")
    assert pre.prediction == "eps" and pre.schedule["beta_schedule"] == "linear"
    assert pre.backbone["timestep_freq_shift"] == 1 and pre.backbone["mlp_norm_eps"] == 1e-5
    net = ours_from(pre)
    x, t, y = inputs()
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample[:, :C]
        assert (net(x, t.float(), y) - want).abs().max() <= 1e-4
        config, sd = to_diffusers_dit(net.state_dict(), net.cfg)
    back = diffusers.DiTTransformer2DModel.from_config(config).eval()
    back.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert (back(x, timestep=t, class_labels=y).sample - net(x, t.float(), y)).abs().max() <= 1e-4


def test_import_bad_inputs_one_message_each(tmp_path):
    from ldm_lightning.diffusion.interop import ImportLayoutError
    from ldm_lightning.diffusion.load import read_pretrained
    from ldm_lightning.diffusion import importer
    with pytest.raises(SystemExit) as e:  # no --autoencoder and no pipeline vae/: argparse's one message, exit 2
        importer.main(["--from", str(tmp_path / "odd.pt"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "odd.pt")
    with pytest.raises(ImportLayoutError, match="layouts understood: facebookresearch/DiT"):
        read_pretrained(tmp_path / "odd.pt")
    (tmp_path / "pixart").mkdir()
    (tmp_path / "pixart" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ImportLayoutError, match="PixArtTransformer2DModel does not map.*adaLN-single"):
        read_pretrained(tmp_path / "pixart")
    sd = random_fb_dit()
    torch.save(sd, tmp_path / "dit.pt")
    with pytest.raises(ImportLayoutError, match="--num-heads"):  # width 64 is no paper size
        read_pretrained(tmp_path / "dit.pt")
    # the facebookresearch original's timestep frequencies are not the diffusers port's: export is refused
    from ldm_lightning.diffusion.interop import to_diffusers_dit
    from ldm_lightning.errors import UserError
    net = ours_from(read_pretrained(tmp_path / "dit.pt", num_heads=HEADS))
    with pytest.raises(UserError, match="timestep_freq_shift=0 .*has 1.*--format safetensors"):
        to_diffusers_dit(net.state_dict(), net.cfg)


# --- 2-5. the user path: import -> fit (full, LoRA, resume) -> sample -> export -> diffusers -----------------------
FLOW = r'''
import json, sys
from cli_inprocess import run
root, ae, train, test, pipe, fb = sys.argv[1:7]
TINY = json.dumps({"hidden_size": 64, "depth": 2, "num_heads": 4, "patch_size": 2, "input_size": 8})
def fit(name, init_from, *extra, expect=0):
    return run("fit", "-c", "ldm_lightning:diffusion/" + name, "-c", "ldm_lightning:trainer/cpu-debug.yaml",
               "-c", "ldm_lightning:data/mnist.yaml", "--model.init_args.autoencoder", ae,
               "--model.init_args.init_from", init_from, "--model.init_args.backbone", "dit",
               "--model.init_args.backbone_config", TINY, "--model.init_args.conditioning.num_classes", "10",
               "--model.init_args.encode_dtype", "fp32", "--model.init_args.optim.warmup_steps", "2",
               "--data.init_args.train_shards", train, "--data.init_args.val_shards", test,
               "--data.init_args.batch_size", "8", "--data.init_args.num_workers", "0",
               "--data.init_args.shuffle_buffer", "16", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
               *extra, expect=expect)
def ckpt(run_dir):
    return f"{root}/{run_dir}/checkpoints/last.ckpt"
# import once: a facebookresearch .pt and a diffusers pipeline folder -> denoiser exports; sample the first as it is
run("import", "--from", fb, "--out", f"{root}/imp_fb", "--num-heads", "4", "--autoencoder", ae)
run("import", "--from", pipe, "--out", f"{root}/imp_pipe")  # the autoencoder: the pipeline's vae/
run("sample", "--checkpoint", f"{root}/imp_fb", "--classes", "0-1", "--num", "1", "--steps", "2",
    "--out", f"{root}/s_fb")
# full fine-tuning from the diffusers folder directly; its prediction must agree with the config's
print(fit("dit-xl2-finetune.yaml", pipe, "--model.init_args.objective.prediction", "v", expect=2), file=sys.stderr)
fit("dit-xl2-finetune.yaml", pipe, "--trainer.max_steps", "3", "--trainer.default_root_dir", f"{root}/full")
# LoRA from the imported folder: 4 steps at once, and 2 + a resume to 4 (exact resume)
for d, steps in (("lora", "4"), ("lora_r", "2")):
    fit("dit-xl2-lora.yaml", f"{root}/imp_pipe", "--model.init_args.lora.rank", "4", "--trainer.max_steps", steps,
        "--trainer.default_root_dir", f"{root}/{d}")
fit("dit-xl2-lora.yaml", f"{root}/imp_pipe", "--model.init_args.lora.rank", "4", "--trainer.max_steps", "4",
    "--trainer.default_root_dir", f"{root}/lora_r", "--ckpt_path", ckpt("lora_r"))
print(fit("dit-xl2-lora.yaml", f"{root}/imp_pipe", "--model.init_args.lora.targets", '["blocks.*.attn.qkv"]',
          expect=2), file=sys.stderr)
run("sample", "--checkpoint", ckpt("lora"), "--classes", "0-1", "--num", "1", "--steps", "2", "--out", f"{root}/s_lora")
run("export", "--checkpoint", ckpt("full"), "--format", "diffusers", "--out", f"{root}/x_full")
run("export", "--checkpoint", ckpt("lora"), "--format", "diffusers", "--out", f"{root}/x_merged")
run("export", "--checkpoint", ckpt("lora"), "--format", "lora", "--out", f"{root}/x_lora")
'''


@pytest.mark.timeout(300)
def test_import_fit_full_and_lora_sample_export_to_diffusers(tiny_ae, mnist_shards, tmp_path):
    from safetensors.torch import load_file

    from ldm_lightning.diffusion.load import load_denoiser
    from scale_run import cli_env
    random_diffusers_dit(seed=2).save_pretrained(tmp_path / "pipe" / "transformer")
    diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            prediction_type="epsilon").save_pretrained(tmp_path / "pipe" / "scheduler")
    torch.save(random_fb_dit(seed=3), tmp_path / "dit.pt")
    from ldm_lightning.autoencoder import load_autoencoder
    from ldm_lightning.autoencoder.export import export_autoencoder
    export_autoencoder(load_autoencoder(tiny_ae), tmp_path / "pipe" / "vae", "diffusers")
    proc = subprocess.run([sys.executable, "-c", FLOW, str(tmp_path), tiny_ae, mnist_shards["train"],
                           mnist_shards["test"], str(tmp_path / "pipe"), str(tmp_path / "dit.pt")],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-5000:]
    # bad inputs: one paragraph each, naming the field and the fix
    assert "predicts 'eps'" in proc.stderr and "objective.prediction: eps" in proc.stderr, proc.stderr[-3000:]
    assert "lora.targets ['blocks.*.attn.qkv'] match no Linear" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "s_fb").iterdir()) == ["0_0.png", "1_0.png", "grid.png"]
    imported = json.loads((tmp_path / "imp_pipe" / "config.json").read_text())["ldm_lightning_denoiser"]
    assert imported["autoencoder"]["path"] == str(tmp_path / "pipe" / "vae")
    assert (tmp_path / "s_lora" / "grid.png").is_file()

    # LoRA checkpoints hold adapters + training state only; the resumed run equals the uninterrupted one
    last = lambda d: tmp_path / d / "checkpoints" / "last.ckpt"  # noqa: E731
    lora, resumed = (torch.load(last(d), map_location="cpu", weights_only=True) for d in ("lora", "lora_r"))
    full = torch.load(last("full"), map_location="cpu", weights_only=True)
    trainable = [k for k in lora["state_dict"] if k.startswith("denoiser.")]
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable), trainable[:5]
    assert len(lora["optimizer_states"][0]["state"]) == len(trainable)  # only adapters in the optimizer
    assert last("lora").stat().st_size < 0.5 * last("full").stat().st_size
    assert lora["global_step"] == resumed["global_step"] == 4
    for k, v in lora["state_dict"].items():
        assert torch.equal(v, resumed["state_dict"][k]), k
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in lora["state_dict"].items() if ".lora_B." in k)

    # export back: diffusers loads the folders and runs them to our outputs
    x, t, y = inputs()
    for run_dir, folder in (("full", "x_full"), ("lora", "x_merged")):
        ours, _, _ = load_denoiser(last(run_dir))
        theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / folder).eval()
        with torch.no_grad():
            diff = (theirs(x, timestep=t, class_labels=y).sample - ours.backbone(x, t.float(), y)).abs().max()
        assert diff <= 1e-4, (run_dir, diff)
    assert full["state_dict"]  # full fine-tuning keeps every tensor
    from ldm_lightning.diffusion.load import read_pretrained  # a LoRA checkpoint as the next init_from: merged
    merged_ours = read_pretrained(last("lora")).state
    assert merged_ours.keys() == read_pretrained(last("full")).state.keys()
    # the adapter export: PEFT keys on diffusers module names; base (the import) + scale * B A = the merged export
    adapter = load_file(str(tmp_path / "x_lora" / "pytorch_lora_weights.safetensors"))
    cfg = json.loads((tmp_path / "x_lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "attn1.to_k" in cfg["target_modules"]
    assert "transformer.transformer_blocks.0.attn1.to_k.lora_A.weight" in adapter
    base = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer").state_dict()
    merged = load_file(str(tmp_path / "x_merged" / "diffusion_pytorch_model.safetensors"))
    scale = cfg["lora_alpha"] / cfg["r"]
    for k in [k for k in adapter if k.endswith(".lora_A.weight")]:
        m = k[len("transformer."):-len(".lora_A.weight")]
        w = base[m + ".weight"] + scale * adapter[k.replace("lora_A", "lora_B")] @ adapter[k]
        torch.testing.assert_close(w, merged[m + ".weight"], atol=1e-5, rtol=1e-5)
    # and PEFT itself (what diffusers' LoRA loaders call) reads the adapter onto the diffusers DiT: the same output
    # as the merged export
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    peft_dit = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer").eval()
    peft_cfg = LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"])
    peft_dit = inject_adapter_in_model(peft_cfg, peft_dit)
    result = set_peft_model_state_dict(peft_dit, {k[len("transformer."):]: v for k, v in adapter.items()})
    assert not result.unexpected_keys, result.unexpected_keys[:5]
    merged_dit = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "x_merged").eval()
    with torch.no_grad():
        # the base folder predicts learned sigma too (2C channels); the import keeps the first C (eps)
        diff = peft_dit(x, timestep=t, class_labels=y).sample[:, :C] - merged_dit(x, timestep=t, class_labels=y).sample
    assert diff.abs().max() <= 1e-4, diff.abs().max()


def test_init_from_sets_live_and_ema_and_names_a_mismatch(tiny_ae, tmp_path):
    """init_from lands in the live AND the EMA weights (the EMA starts from the import); a config that disagrees
    with the weights is one message naming the field to set."""
    from ldm_lightning.diffusion.finetune import InitFromError
    from ldm_lightning.diffusion.module import DiffusionModule
    sd = random_fb_dit(seed=4)
    torch.save(sd, tmp_path / "dit.pt")
    kw = dict(autoencoder=tiny_ae, backbone="dit", init_from=str(tmp_path / "dit.pt"), val_num=0,
              schedule={"kind": "vp", "beta_schedule": "linear"},
              backbone_config={"hidden_size": D, "depth": DEPTH, "num_heads": HEADS, "patch_size": P})
    m = DiffusionModule(conditioning={"kind": "class", "num_classes": CLASSES}, **kw)
    live, ema = m.denoiser.state_dict(), m.ema.module.state_dict()
    assert torch.equal(live["backbone.blocks.1.attn.to_kv.weight"], sd["blocks.1.attn.qkv.weight"][D:])
    assert all(torch.equal(v, ema[k]) for k, v in live.items())
    with pytest.raises(InitFromError, match="num_classes=10; this model has num_classes=7"):
        DiffusionModule(conditioning={"kind": "class", "num_classes": 7}, **kw)
    with pytest.raises(InitFromError, match="schedule.beta_schedule='linear'.*scaled_linear"):
        DiffusionModule(conditioning={"kind": "class", "num_classes": CLASSES}, **{**kw, "schedule": {"kind": "vp"}})
