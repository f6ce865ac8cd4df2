"""Data layer: pack images into WebDataset shards (`pack.py`) and stream them (`ShardDataModule`).

Exports are resolved lazily so that `ldm-lightning data pack` does not import Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ShardDataModule": "ldm_lightning.data.datamodule",
    "ShardStream": "ldm_lightning.data.stream",
    "Shard": "ldm_lightning.data.shards",
    "resolve_shards": "ldm_lightning.data.shards",
    "to_model_range": "ldm_lightning.images",
    "ensure_model_range": "ldm_lightning.images",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ldm_lightning.data' has no attribute {name!r}")
