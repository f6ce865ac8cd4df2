"""Named backbone presets: `build_backbone("DiT-B/4", num_classes=10)`, `build_backbone("unet-tiny")`.

DiT sizes are the paper's (facebookresearch/DiT `models.py`); JiT's are its paper's (LTH14/JiT); UNet 'sd15' is Stable Diffusion 1.x's
(CompVis `v1-inference.yaml`); the tiny presets are for CPU tests and the MNIST demo on 8x8x4 latents.
"""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from .ddt import DDT, DDTConfig
from .dit import DiT, DiTConfig
from .sd_unet import SDUNet, SDUNetConfig
from .unet import UNet, UNetConfig

_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

PRESETS: dict[str, tuple[type, dict]] = {
    f"DiT-{size}/{p}": ("dit", dict(depth=d, hidden_size=h, num_heads=n, patch_size=p))
    for size, (d, h, n) in _DIT_SIZES.items() for p in (2, 4, 8)
}
# DDT (Wang et al. 2025): DDT-XL/2 is 22 encoder + 6 decoder blocks (the paper's); the smaller sizes keep
# DiT's total depth with a 4-block decoder (a choice made here). DiT^DH (RAE, Zheng et al. 2025): a full DiT
# as the encoder plus a 2-block, 2048-wide head (RAE's DiT^DH-XL); patch 1 for 16x16 representation latents.
_DDT_SPLIT = {"S": 8, "B": 8, "L": 20, "XL": 22}
PRESETS.update({
    f"DDT-{size}/{p}": ("ddt", dict(depth=_DDT_SPLIT[size], decoder_depth=d - _DDT_SPLIT[size], hidden_size=h,
                                    num_heads=n, patch_size=p))
    for size, (d, h, n) in _DIT_SIZES.items() for p in (1, 2, 4)
})
PRESETS.update({
    f"DiTDH-{size}/{p}": ("ddt", dict(depth=d, hidden_size=h, num_heads=n, patch_size=p, decoder_depth=2,
                                      decoder_hidden_size=2048, decoder_num_heads=16))
    for size, (d, h, n) in _DIT_SIZES.items() for p in (1, 2)
})
# JiT (Li & He 2025, arXiv 2511.13720; LTH14/JiT `model_jit.py`): a pixel-space DiT with SwiGLU, RMSNorm, 2-D RoPE,
# QK-norm, a bottleneck patch embedding and 32 in-context class tokens that join before block `start`.
# (depth, width, heads, bottleneck rank, class-token start block); /16 at 256 px, /32 at 512 px (256 tokens each).
_JIT_SIZES = {"B": (12, 768, 12, 128, 4), "L": (24, 1024, 16, 128, 8), "H": (32, 1280, 16, 256, 10)}
PRESETS.update({
    f"JiT-{size}/{p}": ("dit", dict(input_size=16 * p, in_channels=3, depth=d, hidden_size=h, num_heads=n,
                                    patch_size=p, bottleneck_dim=r, mlp="swiglu", norm="rmsnorm", rope=True,
                                    qk_norm=True, class_tokens=32, class_tokens_start=start))
    for size, (d, h, n, r, start) in _JIT_SIZES.items() for p in (16, 32)
})
PRESETS.update({
    "ddt-tiny": ("ddt", dict(input_size=8, depth=3, decoder_depth=1, hidden_size=128, num_heads=4, patch_size=2)),
    "dit-tiny": ("dit", dict(input_size=8, depth=4, hidden_size=128, num_heads=4, patch_size=2)),
    "unet-tiny": ("unet", dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                               head_dim=32, norm_groups=32)),
    "unet-small": ("unet", dict(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                                attention_levels=(1, 2), head_dim=64)),
    "unet-sd15": ("unet", dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                               attention_levels=(0, 1, 2), head_dim=40, context_dim=768)),
    # Stable Diffusion's own UNet layout (sd_unet.py; imports diffusers UNet2DConditionModel weights exactly):
    # 'sd_unet' = SD 1.x (8 heads per level, conv projections), 'sd_unet-2' = SD 2.x (64-channel heads, linear
    # projections, upcast attention); 'sd_unet-tiny' for CPU tests on 8x8x4 latents.
    "sd_unet": ("sd_unet", {}),
    "sd_unet-2": ("sd_unet", dict(attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                                  upcast_attention=True, context_dim=1024)),
    "sd_unet-tiny": ("sd_unet", dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2,
                                     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16)),
    "unet": ("unet", {}),  # the bare UNetConfig defaults
    "dit": ("dit", {}),    # the bare DiTConfig defaults
})
FAMILIES = {"dit": (DiT, DiTConfig), "ddt": (DDT, DDTConfig), "unet": (UNet, UNetConfig),
            "sd_unet": (SDUNet, SDUNetConfig)}
TRANSFORMER_FAMILIES = ("dit", "ddt")  # patch-token backbones: input_size, patch_size, blocks
UNET_FAMILIES = ("unet", "sd_unet")  # convolutional: any latent side divisible by their grid step


def latent_grid_step(family: str, cfg: dict) -> int:
    """The latent side must be a multiple of this: a DiT's patch, a UNet's 2^(levels - 1)."""
    if family in TRANSFORMER_FAMILIES:
        return int(cfg.get("patch_size", 1))
    levels = cfg.get("block_out_channels") if family == "sd_unet" else cfg.get("channel_mult")
    return 2 ** (len(levels or (1,)) - 1)


def backbone_config(family: str, fields_: dict):
    """The DiTConfig / UNetConfig of `family` from a plain dict (checkpoint metadata: lists become tuples)."""
    if family not in FAMILIES:
        raise ValueError(f"backbone family must be one of {sorted(FAMILIES)}, got {family!r}")
    cfg_cls = FAMILIES[family][1]
    allowed = {f.name for f in fields(cfg_cls)}
    bad = sorted(set(fields_) - allowed)
    if bad:
        raise ValueError(f"{cfg_cls.__name__} has no field(s) {bad}; fields are {sorted(allowed)}")
    return cfg_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields_.items()})


def backbone_from_config(family: str, fields_: dict) -> nn.Module:
    """A backbone of `family` ('dit' / 'ddt' / 'unet' / 'sd_unet') from its full config dict (random weights)."""
    return FAMILIES[family][0](backbone_config(family, fields_))


def build_backbone(name: str, **overrides) -> nn.Module:
    """A backbone from a preset name, with any config field overridden (in_channels, num_classes,
    context_dim, qk_norm, grad_checkpointing, input_size, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(PRESETS)}")
    family, base = PRESETS[name]
    return backbone_from_config(family, {**base, **overrides})
