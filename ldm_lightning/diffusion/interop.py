"""Published stage-2 weights in, and back out: facebookresearch/DiT and diffusers' DiT port <-> our `DiT`.

Read (the converters below; `load.read_pretrained` dispatches a path to them, for `ldm-lightning import` and
`model.init_args.init_from`):
- a facebookresearch/DiT checkpoint (`DiT-XL-2-256x256.pt`: a plain state dict, read with weights_only; also a
  training checkpoint's `ema` entry). Learned sigma (out_channels = 2 * in_channels): our DiT predicts eps
  only, so the final linear keeps the eps half of its outputs (the variance half is dropped: sampling then
  uses the fixed DDPM variances, as every deterministic sampler here does anyway).
- a diffusers `DiTTransformer2DModel` folder, or a DiT pipeline folder (`transformer/` + `scheduler/`): the
  port of the same network, with two numeric differences the DiTConfig records (timestep_freq_shift=1,
  mlp_norm_eps = its norm_eps); its per-block copies of the timestep/class embedding must be equal (they
  are in the official port), since our DiT has one.
- our own denoiser export folder or DiffusionModule .ckpt.
A diffusers `UNet2DConditionModel` folder (SD 1.x / 2.x; or a pipeline folder holding unet/ and scheduler/) maps
onto `SDUNet` (sd_unet.py, converters in sd_interop.py).
Not mapped (one message each, `NOT_MAPPED`, saying which part our DiT lacks): `PixArtTransformer2DModel`,
`SD3Transformer2DModel`.

Write (`to_diffusers_dit`, used by `ldm-lightning export --format diffusers` for a denoiser): the inverse map
to a `DiTTransformer2DModel` folder; exact only for a DiT whose timestep_freq_shift is 1 (diffusers hard-codes
it), class-conditional, without text / concat / qk-norm / bottleneck / pooled inputs.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ldm_lightning.errors import UserError

from .dit import DiTConfig

FB_LAYOUT = "facebookresearch/DiT state dict (.pt / .pth / .safetensors; keys x_embedder.proj.*, blocks.N.attn.qkv.*)"
DIFFUSERS_LAYOUT = "diffusers DiTTransformer2DModel folder (config.json + diffusion_pytorch_model.safetensors), " \
                   "or a DiT pipeline folder holding transformer/ and scheduler/"
OURS_LAYOUT = "an ldm-lightning denoiser export folder or DiffusionModule .ckpt"
SD_UNET_LAYOUT = "diffusers UNet2DConditionModel folder (Stable Diffusion 1.x / 2.x UNet: config.json + " \
                 "diffusion_pytorch_model.safetensors), or an SD pipeline folder holding unet/ and scheduler/"
LAYOUTS = (FB_LAYOUT, DIFFUSERS_LAYOUT, SD_UNET_LAYOUT, OURS_LAYOUT)
NOT_MAPPED = {
    "PixArtTransformer2DModel": "PixArt-alpha/sigma modulate every block from ONE shared adaLN-single table (a "
                                "timestep MLP whose output each block offsets by its own learned scale_shift_table) "
                                "and cross-attend to T5 captions through a caption-projection MLP; our DiT regresses "
                                "its modulation per block from the timestep + class embedding and has neither the "
                                "shared table nor the caption projection, so those tensors have no counterpart",
    "SD3Transformer2DModel": "SD3's MM-DiT runs a second (text) token stream with its own weights in every block and "
                             "joint attention over image + text tokens, plus a pooled-text vector in its adaLN; our "
                             "DiT has one image stream (text enters through cross-attention), so the text-stream "
                             "weights have no counterpart",
}
# Head count is not in the weights: the DiT paper's sizes (models.py) give it by width.
FB_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
# facebookresearch/DiT's diffusion (create_diffusion): linear betas 1e-4..0.02, T = 1000, eps prediction.
FB_SCHEDULE = {"kind": "vp", "beta_schedule": "linear", "num_timesteps": 1000}
DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# DiTConfig fields the diffusers port has no counterpart for, with the value it implies.
DIFFUSERS_FIXED = {"concat_channels": 0, "bottleneck_dim": None, "context_dim": None, "pooled_dim": None,
                   "qk_norm": False, "mlp_ratio": 4.0, "timestep_freq_shift": 1}
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


class ImportLayoutError(UserError):
    """A checkpoint of a layout this project cannot read, or one whose architecture does not map."""


@dataclasses.dataclass
class Pretrained:
    """Weights read from a published checkpoint, already in our DiT's names, with what they imply."""

    layout: str
    backbone_family: str
    backbone: dict
    """The backbone config (DiTConfig fields) the weights were made for."""
    state: dict[str, torch.Tensor]
    """The denoiser's state dict (`backbone.*` keys)."""
    schedule: dict | None = None
    """The noise schedule the weights were trained with (None: unknown, the config's stays)."""
    prediction: str | None = None
    """What the network predicts ('eps', 'v', 'x0', 'flow'); None: unknown."""
    num_classes: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    meta: dict | None = None
    """Our full denoiser metadata, when the source is one of our own exports / checkpoints."""
    latent_size: int | None = None
    """The latent side the weights were made for, where the backbone config does not hold it (SD UNet)."""


# --- facebookresearch/DiT ------------------------------------------------------------------------------
def is_fb_dit(sd: dict) -> bool:
    return "x_embedder.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd


def fb_dit_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> tuple[DiTConfig, bool]:
    """(DiTConfig, learned_sigma) of a facebookresearch/DiT state dict, from its tensor shapes."""
    w = sd["x_embedder.proj.weight"]  # (D, C, p, p)
    D, C, p = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    out = int(sd["final_layer.linear.weight"].shape[0]) // (p * p)
    if out not in (C, 2 * C):
        raise ImportLayoutError(f"facebookresearch/DiT checkpoint: final_layer.linear has {out} output channels per "
                                f"pixel for {C} input channels (expected {C}, or {2 * C} with learned sigma)")
    heads = num_heads or FB_HEADS_BY_WIDTH.get(D)
    if heads is None:
        raise ImportLayoutError(f"facebookresearch/DiT checkpoint of width {D}: the number of attention heads is not "
                                f"in the weights and {D} is no paper size ({sorted(FB_HEADS_BY_WIDTH)}); pass "
                                "--num-heads N (or model.init_args.init_num_heads)")
    if "pos_embed" in sd:
        g = math.isqrt(int(sd["pos_embed"].shape[1]))
        input_size = g * p
    else:
        raise ImportLayoutError("facebookresearch/DiT checkpoint without pos_embed: its latent size is unknown")
    table = sd.get("y_embedder.embedding_table.weight")
    num_classes = int(table.shape[0]) - 1 if table is not None else None
    mlp_ratio = int(sd["blocks.0.mlp.fc1.weight"].shape[0]) / D
    cfg = DiTConfig(input_size=input_size, in_channels=C, patch_size=p, hidden_size=D, depth=depth, num_heads=heads,
                    mlp_ratio=mlp_ratio, num_classes=num_classes)
    return cfg, out == 2 * C


def eps_rows(n_rows: int, patch: int, channels: int) -> torch.Tensor:
    """Row indices of a learned-sigma final linear that give the eps half: its outputs are (p, p, 2C) per token,
    the first C channels of each pixel being eps (unpatchify reshapes to (h, w, p, p, 2C))."""
    rows = torch.arange(n_rows).view(patch * patch, 2 * channels)
    return rows[:, :channels].reshape(-1)


def from_fb_dit(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> Pretrained:
    """A facebookresearch/DiT state dict -> our DiT's weights (exact; the learned-sigma half dropped)."""
    from ldm_lightning.nn.embeddings import sincos_2d
    cfg, learned_sigma = fb_dit_config(sd, num_heads)
    D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
    out, unknown = {}, []
    for k, v in sd.items():
        parts = k.split(".")
        if k == "pos_embed":  # a fixed buffer in the original too: check it is the sin-cos we compute
            g = cfg.input_size // p
            ref = sincos_2d(D, g, g)[None]
            if v.shape != ref.shape or (v.float() - ref).abs().max() > 1e-4:
                raise ImportLayoutError("facebookresearch/DiT checkpoint: pos_embed is not the fixed 2-D sin-cos "
                                        "embedding our DiT computes, so it would not run the same")
            continue
        if k.startswith("x_embedder.proj."):
            out["x_embedder." + parts[-1]] = v
        elif k == "y_embedder.embedding_table.weight":
            out["y_embedder.weight"] = v
        elif k.startswith("blocks.") and ".attn.qkv." in k:  # (3D, D): q | k | v rows, ours q and kv
            base = ".".join(parts[:3])
            out[f"{base}.to_q.{parts[-1]}"] = v[:D]
            out[f"{base}.to_kv.{parts[-1]}"] = v[D:]
        elif k.startswith("final_layer.linear.") and learned_sigma:
            out[k] = v[eps_rows(v.shape[0], p, C)]
        elif k.startswith(("t_embedder.mlp.", "blocks.", "final_layer.")):
            out[k] = v
        else:
            unknown.append(k)
    if unknown:
        raise ImportLayoutError(f"facebookresearch/DiT checkpoint has {len(unknown)} tensor(s) our DiT has no place "
                                f"for, e.g. {unknown[:3]}")
    notes = ["learned sigma: kept the eps half of final_layer.linear (our DiT predicts eps only)"] if learned_sigma \
        else []
    return Pretrained(FB_LAYOUT, "dit", dataclasses.asdict(cfg), prefixed(out), dict(FB_SCHEDULE), "eps",
                      cfg.num_classes, notes)


def prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone keys -> the Denoiser's (`backbone.` prefix)."""
    return {f"backbone.{k}": v.contiguous() for k, v in sd.items()}


# --- diffusers DiTTransformer2DModel -------------------------------------------------------------------
def diffusers_dit_keys(cfg: DiTConfig) -> dict[str, list[str]]:
    """Our backbone key -> its diffusers key(s). Several for the timestep/class embedding (diffusers keeps a copy
    in every block); to_kv maps to to_k and to_v (rows split in half)."""
    m = {"x_embedder.weight": ["pos_embed.proj.weight"], "x_embedder.bias": ["pos_embed.proj.bias"]}
    blocks = range(cfg.depth)
    for ours, theirs in (("t_embedder.mlp.0", "timestep_embedder.linear_1"),
                         ("t_embedder.mlp.2", "timestep_embedder.linear_2")):
        for wb in ("weight", "bias"):
            m[f"{ours}.{wb}"] = [f"transformer_blocks.{i}.norm1.emb.{theirs}.{wb}" for i in blocks]
    if cfg.num_classes:
        m["y_embedder.weight"] = [f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"
                                  for i in blocks]
    for i in blocks:
        for ours, theirs in (("attn.to_q", "attn1.to_q"), ("attn.to_kv", "attn1.to_k|attn1.to_v"),
                             ("attn.proj", "attn1.to_out.0"), ("mlp.fc1", "ff.net.0.proj"), ("mlp.fc2", "ff.net.2"),
                             ("adaLN_modulation.1", "norm1.linear")):
            for wb in ("weight", "bias"):
                m[f"blocks.{i}.{ours}.{wb}"] = [f"transformer_blocks.{i}.{t}.{wb}" for t in theirs.split("|")]
    for ours, theirs in (("final_layer.adaLN_modulation.1", "proj_out_1"), ("final_layer.linear", "proj_out_2")):
        for wb in ("weight", "bias"):
            m[f"{ours}.{wb}"] = [f"{theirs}.{wb}"]
    return m


def diffusers_dit_config(cfg: DiTConfig) -> dict:
    """Our DiTConfig -> a DiTTransformer2DModel config.json; refused (one message) where the port has no
    counterpart."""
    bad = [f"{k}={getattr(cfg, k)!r} (the diffusers port has {v!r})" for k, v in DIFFUSERS_FIXED.items()
           if getattr(cfg, k) != v]
    if not cfg.num_classes:
        bad.append("num_classes=None (DiTTransformer2DModel is class-conditional only)")
    if bad:
        raise UserError("this DiT does not map to diffusers' DiTTransformer2DModel: " + "; ".join(bad)
                        + ". Export it with --format safetensors (timestep_freq_shift=1 is a DiTConfig field: "
                        "set it from the start, e.g. by importing a diffusers DiT, to export back exactly)")
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": cfg.num_heads,
            "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
            "out_channels": cfg.in_channels, "num_layers": cfg.depth, "dropout": 0.0, "attention_bias": True,
            "sample_size": cfg.input_size, "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": cfg.num_classes, "upcast_attention": False, "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": False, "norm_eps": cfg.mlp_norm_eps}


def to_diffusers_dit(backbone_sd: dict[str, torch.Tensor], cfg: DiTConfig) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a DiTTransformer2DModel running our DiT's function."""
    config = diffusers_dit_config(cfg)
    out = {}
    for ours, theirs in diffusers_dit_keys(cfg).items():
        v = backbone_sd[ours].detach().cpu()
        if ours.endswith((".to_kv.weight", ".to_kv.bias")):
            out[theirs[0]], out[theirs[1]] = (t.contiguous() for t in v.chunk(2, dim=0))
        else:
            for t in theirs:
                out[t] = v.clone().contiguous()
    return config, out


def from_diffusers_dit(config: dict, sd: dict[str, torch.Tensor]) -> Pretrained:
    """A DiTTransformer2DModel (config.json, state dict) -> our DiT's weights."""
    checks = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
              "norm_elementwise_affine": False}
    bad = [f"{k}={config.get(k)!r} (need {v!r})" for k, v in checks.items() if config.get(k, v) != v]
    if config.get("num_embeds_ada_norm") is None:
        bad.append("num_embeds_ada_norm=None")
    if bad:
        raise ImportLayoutError("diffusers DiT does not map to our DiT: " + "; ".join(bad))
    heads, head_dim = int(config.get("num_attention_heads", 16)), int(config.get("attention_head_dim", 72))
    C = int(config.get("in_channels", 4))
    out_c = int(config.get("out_channels") or C)
    p = int(config.get("patch_size", 2))
    cfg = DiTConfig(input_size=int(config.get("sample_size", 32)), in_channels=C, patch_size=p,
                    hidden_size=heads * head_dim, depth=int(config.get("num_layers", 28)), num_heads=heads,
                    num_classes=int(config["num_embeds_ada_norm"]), timestep_freq_shift=1,
                    mlp_norm_eps=float(config.get("norm_eps", 1e-5)))
    if out_c not in (C, 2 * C):
        raise ImportLayoutError(f"diffusers DiT: out_channels={out_c} for in_channels={C} (expected {C} or {2 * C})")
    out, used = {}, set()
    for ours, theirs in diffusers_dit_keys(cfg).items():
        missing = [t for t in theirs if t not in sd]
        if missing:
            raise ImportLayoutError(f"diffusers DiT folder lacks {missing[0]!r} that its config.json implies")
        used.update(theirs)
        if len(theirs) == 2 and ".to_k." in theirs[0]:
            out[ours] = torch.cat([sd[theirs[0]], sd[theirs[1]]], 0)
            continue
        v = sd[theirs[0]]
        differ = next((t for t in theirs[1:] if not torch.equal(sd[t], v)), None)
        if differ is not None:  # the official port copies one embedding into every block
            raise ImportLayoutError(f"diffusers DiT: {differ} differs from {theirs[0]}; our DiT has one timestep/class "
                                    "embedding shared by all blocks, so per-block embeddings do not map")
        if ours.startswith("final_layer.linear.") and out_c == 2 * C:
            v = v[eps_rows(v.shape[0], p, C)]
        out[ours] = v
    extra = sorted(set(sd) - used)
    if extra:
        raise ImportLayoutError(f"diffusers DiT folder has {len(extra)} tensor(s) our DiT has no place for, "
                                f"e.g. {extra[:3]}")
    notes = ["diffusers port: timestep_freq_shift=1, mlp_norm_eps=norm_eps recorded in the DiTConfig"]
    if out_c == 2 * C:
        notes.append("learned sigma: kept the eps half of proj_out_2 (our DiT predicts eps only)")
    return Pretrained(DIFFUSERS_LAYOUT, "dit", dataclasses.asdict(cfg), prefixed(out), None, None, cfg.num_classes,
                      notes)


def schedule_from_scheduler_config(sc: dict, source: str) -> tuple[dict, str]:
    """(schedule, prediction) from a diffusers scheduler_config.json; refused where VPSchedule cannot hold it."""
    beta = sc.get("beta_schedule", "linear")
    if beta not in DEFAULT_BETAS and beta != "squaredcos_cap_v2":
        raise ImportLayoutError(f"{source}: beta_schedule={beta!r} has no counterpart here (linear, scaled_linear, "
                                "squaredcos_cap_v2)")
    if beta in DEFAULT_BETAS:
        want = DEFAULT_BETAS[beta]
        got = (float(sc.get("beta_start", want[0])), float(sc.get("beta_end", want[1])))
        if any(abs(a - b) > 1e-12 for a, b in zip(got, want)):
            raise ImportLayoutError(f"{source}: {beta} betas {got} differ from this project's {want}")
    pred = sc.get("prediction_type", "epsilon")
    if pred not in DIFFUSERS_PREDICTION:
        raise ImportLayoutError(f"{source}: prediction_type={pred!r}; understood: {sorted(DIFFUSERS_PREDICTION)}")
    schedule = {"kind": "vp", "beta_schedule": "cosine" if beta == "squaredcos_cap_v2" else beta,
                "num_timesteps": int(sc.get("num_train_timesteps", 1000)),
                "zero_terminal_snr": bool(sc.get("rescale_betas_zero_snr", False)),
                "steps_offset": int(sc.get("steps_offset", 0))}
    return schedule, DIFFUSERS_PREDICTION[pred]
