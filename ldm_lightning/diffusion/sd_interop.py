"""diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x) <-> our `SDUNet`, both ways, exactly.

`SDUNet` uses diffusers' module names, so the weights copy as they are; what is converted is the config.json
(`sd_unet_config` / `diffusers_unet_config`), and what is checked is that every diffusers option that changes the
function is one SDUNet builds (`UNSUPPORTED`: one message listing each value it cannot run). Tensors are then
matched one to one: a missing, extra or differently shaped tensor is named (the first one).
"""

from __future__ import annotations

import dataclasses

import torch

from ldm_lightning.errors import UserError

from .interop import SD_UNET_LAYOUT, ImportLayoutError, Pretrained, prefixed
from .sd_unet import DOWN_TYPES, UP_TYPES, SDUNet, SDUNetConfig

SD_UNET_CLASS = "UNet2DConditionModel"
# diffusers config fields SDUNet has no counterpart for, with the values it runs (the SD 1.x / 2.x ones).
SUPPORTED_VALUES = {
    "center_input_sample": (False,), "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,),
    "downsample_padding": (1,), "mid_block_scale_factor": (1, 1.0), "dropout": (0, 0.0), "act_fn": ("silu",),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "num_attention_heads": (None,),
    "dual_cross_attention": (False,), "class_embed_type": (None,), "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,), "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",), "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,), "reverse_transformer_layers_per_block": (None,),
}
# diffusers' UNet2DConditionModel defaults for the fields SDUNet takes (a config.json may omit any of them).
DIFFUSERS_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "attention_head_dim": 8,
    "transformer_layers_per_block": 1, "cross_attention_dim": 1280, "use_linear_projection": False,
    "upcast_attention": False, "flip_sin_to_cos": True, "freq_shift": 0, "norm_num_groups": 32, "norm_eps": 1e-5,
    "num_class_embeds": None, "sample_size": None,
}


def sd_unet_config(config: dict, source: str) -> tuple[SDUNetConfig, int | None]:
    """(SDUNetConfig, latent side `sample_size`) of a UNet2DConditionModel config.json; one message listing every
    option SDUNet does not build."""
    c = {**DIFFUSERS_DEFAULTS, **config}
    bad = [f"{k}={c[k]!r}" for k, ok in SUPPORTED_VALUES.items() if k in c and c[k] not in ok]
    if not isinstance(c["layers_per_block"], int):
        bad.append(f"layers_per_block={c['layers_per_block']!r} (one number for every level)")
    if not isinstance(c["cross_attention_dim"], int):
        bad.append(f"cross_attention_dim={c['cross_attention_dim']!r} (one width for every level)")
    if isinstance(c["transformer_layers_per_block"], list) and \
            any(not isinstance(v, int) for v in c["transformer_layers_per_block"]):
        bad.append("transformer_layers_per_block as nested lists")
    bad += [f"block type {t!r}" for t in [*c["down_block_types"], *c["up_block_types"]]
            if t not in DOWN_TYPES + UP_TYPES]
    if bad:
        raise ImportLayoutError(f"{source}: this UNet2DConditionModel uses " + "; ".join(bad) + ", which the SD UNet "
                                "here does not build (it runs the SD 1.x / 2.x architecture: "
                                f"{'/'.join(DOWN_TYPES + UP_TYPES)} blocks, positional time embedding, optional "
                                "num_class_embeds; SDXL's addition_embed_type is not built)")
    n_cls = c["num_class_embeds"]
    try:
        cfg = SDUNetConfig(
            in_channels=c["in_channels"], out_channels=c["out_channels"], block_out_channels=c["block_out_channels"],
            down_block_types=c["down_block_types"], up_block_types=c["up_block_types"],
            layers_per_block=c["layers_per_block"], attention_head_dim=c["attention_head_dim"],
            transformer_layers_per_block=c["transformer_layers_per_block"], context_dim=c["cross_attention_dim"],
            use_linear_projection=c["use_linear_projection"], upcast_attention=c["upcast_attention"],
            flip_sin_to_cos=c["flip_sin_to_cos"], freq_shift=c["freq_shift"], norm_num_groups=c["norm_num_groups"],
            norm_eps=float(c["norm_eps"]), num_classes=int(n_cls) - 1 if n_cls else None)
    except ValueError as e:
        raise ImportLayoutError(f"{source}: {e}") from None
    return cfg, c["sample_size"]


def diffusers_unet_config(cfg: SDUNetConfig, sample_size: int | None) -> dict:
    """Our SDUNetConfig -> a UNet2DConditionModel config.json."""
    return {"_class_name": SD_UNET_CLASS, "sample_size": sample_size, "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels or cfg.in_channels, "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": list(cfg.down_block_types), "up_block_types": list(cfg.up_block_types),
            "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": cfg.layers_per_block,
            "attention_head_dim": list(cfg.attention_head_dim),
            "transformer_layers_per_block": list(cfg.transformer_layers_per_block),
            "cross_attention_dim": cfg.context_dim, "use_linear_projection": cfg.use_linear_projection,
            "upcast_attention": cfg.upcast_attention, "flip_sin_to_cos": cfg.flip_sin_to_cos,
            "freq_shift": cfg.freq_shift, "norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps,
            "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None, "act_fn": "silu",
            "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0}


def expected_shapes(cfg: SDUNetConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an SDUNet of `cfg` and its shape (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        net = SDUNet(cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def from_diffusers_unet(config: dict, sd: dict[str, torch.Tensor], source: str) -> Pretrained:
    """A UNet2DConditionModel (config.json, state dict) -> our SDUNet's weights (the same names)."""
    cfg, sample_size = sd_unet_config(config, source)
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in sd]
    if missing:
        raise ImportLayoutError(f"{source}: {len(missing)} tensor(s) its config.json implies are missing, first "
                                f"{missing[0]!r}")
    extra = [k for k in sd if k not in want]
    if extra:
        raise ImportLayoutError(f"{source}: {len(extra)} tensor(s) the SD UNet of its config.json has no place for, "
                                f"first {extra[0]!r}")
    wrong = next((k for k in want if tuple(sd[k].shape) != want[k]), None)
    if wrong is not None:
        raise ImportLayoutError(f"{source}: tensor {wrong!r} has shape {tuple(sd[wrong].shape)}; its config.json "
                                f"makes it {want[wrong]}")
    return Pretrained(SD_UNET_LAYOUT, "sd_unet", dataclasses.asdict(cfg), prefixed(sd), None, None, cfg.num_classes,
                      [], latent_size=sample_size)


def to_diffusers_unet(backbone_sd: dict[str, torch.Tensor], cfg: SDUNetConfig,
                      sample_size: int | None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a UNet2DConditionModel running our SDUNet's function."""
    if not isinstance(cfg, SDUNetConfig):
        raise UserError(f"only the SD UNet (backbone family sd_unet) maps to diffusers' UNet2DConditionModel, not "
                        f"a {type(cfg).__name__}")
    return diffusers_unet_config(cfg, sample_size), {k: v.detach().cpu().contiguous() for k, v in backbone_sd.items()}
