"""Denoiser export: a pickle-free folder `denoiser.safetensors` + `config.json`.

`ldm-lightning export --checkpoint diffusion.ckpt --out folder` lands here (dispatch in
`ldm_lightning/export.py`). The config holds everything to rebuild the network without the training
code's hyper-parameters: backbone family + config, schedule, objective, conditioning, latent shape and
the autoencoder's path and content hash (the denoiser is meaningless without that autoencoder).
`diffusion/load.py`'s `load_denoiser` reads such a folder or a training checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .load import CHECKPOINT_TAG, CONFIG_KEY, WEIGHTS, denoiser_state


def export_denoiser(ckpt: dict, out: str | os.PathLike, fmt: str = "safetensors", weights: str = "ema") -> Path:
    """Write the denoiser of a training checkpoint (already loaded dict) to folder `out`."""
    from safetensors.torch import save_file
    if fmt != "safetensors":
        raise ValueError(f"denoisers export only as --format safetensors (got {fmt!r}); diffusers has no "
                         "equivalent of these backbones")
    meta = ckpt.get("ldm_lightning") or {}
    if meta.get("module") != CHECKPOINT_TAG:
        raise ValueError(f"not a DiffusionModule checkpoint (ldm_lightning.module={meta.get('module')!r})")
    sd = {k: v.detach().cpu().contiguous() for k, v in denoiser_state(ckpt, weights, "checkpoint").items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / WEIGHTS))
    (out / "config.json").write_text(json.dumps({CONFIG_KEY: {**meta, "weights": weights}}, indent=2))
    return out
