"""`model.autoencoder` of the AutoencoderModule: AutoencoderConfig fields overriding the preset's, typed (each
optional) so `--help` lists them and a misspelt field is refused when the config is parsed."""

from __future__ import annotations

from ldm_lightning.optional_fields import optional_fields_dataclass, set_fields

from .autoencoder import AutoencoderConfig

AutoencoderOverrides = optional_fields_dataclass(
    "AutoencoderOverrides", __name__,
    "AutoencoderConfig fields overriding the preset's (null = the preset's value, or the AutoencoderConfig "
    "default without a preset).",
    {"autoencoder": AutoencoderConfig})


def autoencoder_overrides(config) -> dict:
    """The fields set, from an AutoencoderOverrides, or a plain dict (Python callers) as given, or None."""
    if config is None:
        return {}
    return set_fields(config) if isinstance(config, AutoencoderOverrides) else dict(config)
