"""`model.backbone_config`: fields overriding the backbone preset's, typed (every UNetConfig / DiTConfig / DDTConfig /
SDUNetConfig field, each optional) so `--help` lists them and a misspelt field is refused when the config is
parsed. A field of another family than the preset's (a DiT field on a UNet) is refused when the backbone is built
(presets.backbone_config). The module records the plain dict of the fields set: `backbone_overrides`."""

from __future__ import annotations

import dataclasses

from ldm_lightning.optional_fields import optional_fields_dataclass, set_fields

from .ddt import DDTConfig
from .dit import DiTConfig
from .sd_unet import SDUNetConfig
from .unet import UNetConfig

BackboneOverrides = optional_fields_dataclass(
    "BackboneOverrides", __name__,
    "Fields overriding the backbone preset's (null = the preset's value). in_channels, out_channels, "
    "num_classes, context_dim, pooled_dim, text_transformer, concat_channels and (DiT) input_size are filled "
    "from the autoencoder, model.image_size and model.conditioning.",
    {"unet": UNetConfig, "dit": DiTConfig, "ddt": DDTConfig, "sd_unet": SDUNetConfig})


def backbone_overrides(config) -> dict:
    """The fields set, from a BackboneOverrides, a plain dict (Python callers, checkpoint hyper-parameters written
    before the type existed) or None."""
    if config is None:
        return {}
    if isinstance(config, BackboneOverrides):
        return set_fields(config)
    given = dict(config)
    allowed = {f.name for f in dataclasses.fields(BackboneOverrides)}
    if set(given) - allowed:
        raise ValueError(f"backbone_config has no field(s) {sorted(set(given) - allowed)}; see `ldm-lightning fit "
                         "--model.help ldm_lightning.diffusion.module.DiffusionModule` for the fields")
    return given
