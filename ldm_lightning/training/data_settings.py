"""What the DataModule was configured with, read in one place by both training stages.

The stage modules never take the DataModule's settings as arguments (the config gives them to `data:`), but
they check against them at fit start: the autoencoder that its images fit the network, the diffusion module that
latent shards were made from images prepared the same way (the latent cache's key). Both read them here, from
the DataModule's saved hyper-parameters (`ShardDataModule` saves every constructor argument).
"""

from __future__ import annotations

# The image preparation a latent cache depends on: `data encode` records these; a fit on the cache must agree.
PREPROCESS_KEYS = ("image_size", "resize_mode", "random_flip", "bucketing")


def datamodule_settings(trainer) -> dict:
    """The attached DataModule's settings by name (image_size, channels, kind, resize_mode, random_flip,
    bucketing, ...), or {} when the trainer has no DataModule (plain loaders)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    if dm is None:
        return {}
    settings = dict(getattr(dm, "hparams", {}) or {})
    if getattr(dm, "kind", None) is not None:  # the live value: tools may set it after construction
        settings["kind"] = dm.kind
    return settings


def preprocess_settings(settings: dict) -> dict:
    """The part of `datamodule_settings` that keys a latent cache (PREPROCESS_KEYS present in it)."""
    return {k: settings[k] for k in PREPROCESS_KEYS if k in settings}


__all__ = ["PREPROCESS_KEYS", "datamodule_settings", "preprocess_settings"]
