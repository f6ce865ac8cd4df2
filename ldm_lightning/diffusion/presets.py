"""Named backbone presets: `build_backbone("DiT-B/4", num_classes=10)`, `build_backbone("unet-tiny")`.

DiT sizes are the paper's (facebookresearch/DiT `models.py`); UNet 'sd15' is Stable Diffusion 1.x's
(CompVis `v1-inference.yaml`); the tiny presets are for CPU tests and the MNIST demo on 8x8x4 latents.
"""

from __future__ import annotations

from dataclasses import fields

from torch import nn

from .dit import DiT, DiTConfig
from .unet import UNet, UNetConfig

_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

PRESETS: dict[str, tuple[type, dict]] = {
    f"DiT-{size}/{p}": ("dit", dict(depth=d, hidden_size=h, num_heads=n, patch_size=p))
    for size, (d, h, n) in _DIT_SIZES.items() for p in (2, 4, 8)
}
PRESETS.update({
    "dit-tiny": ("dit", dict(input_size=8, depth=4, hidden_size=128, num_heads=4, patch_size=2)),
    "unet-tiny": ("unet", dict(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                               head_dim=32, norm_groups=32)),
    "unet-small": ("unet", dict(model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                                attention_levels=(1, 2), head_dim=64)),
    "unet-sd15": ("unet", dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                               attention_levels=(0, 1, 2), head_dim=40, context_dim=768)),
})


def build_backbone(name: str, **overrides) -> nn.Module:
    """A backbone from a preset name, with any config field overridden (in_channels, num_classes,
    context_dim, qk_norm, grad_checkpointing, input_size, ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown backbone preset {name!r}; choose one of {sorted(PRESETS)}")
    family, base = PRESETS[name]
    cls, cfg_cls = (DiT, DiTConfig) if family == "dit" else (UNet, UNetConfig)
    allowed = {f.name for f in fields(cfg_cls)}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"{cfg_cls.__name__} has no field(s) {bad}; fields are {sorted(allowed)}")
    return cls(cfg_cls(**{**base, **overrides}))
