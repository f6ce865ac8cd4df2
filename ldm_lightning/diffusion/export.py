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

from ldm_lightning.autoencoder.load import DIFFUSERS_WEIGHTS
from ldm_lightning.autoencoder.load import EXPORT_WEIGHTS as AE_EXPORT_WEIGHTS
from ldm_lightning.output_paths import replace_dir

from .load import CHECKPOINT_TAG, CONFIG_KEY, WEIGHTS, denoiser_state


def export_denoiser(ckpt: dict, out: str | os.PathLike, fmt: str = "safetensors", weights: str = "ema",
                    overwrite: bool = True) -> Path:
    """Write the denoiser of a training checkpoint (already loaded dict) to folder `out`, replacing an export
    there whole (`overwrite=False`: a non-empty `out` is refused)."""
    from safetensors.torch import save_file
    if fmt != "safetensors":
        raise ValueError(f"denoisers export only as --format safetensors (got {fmt!r}); diffusers has no "
                         "equivalent of these backbones")
    meta = ckpt.get("ldm_lightning") or {}
    if meta.get("module") != CHECKPOINT_TAG:
        raise ValueError(f"not a DiffusionModule checkpoint (ldm_lightning.module={meta.get('module')!r})")
    sd = {k: v.detach().cpu().contiguous() for k, v in denoiser_state(ckpt, weights, "checkpoint").items()}
    config = {CONFIG_KEY: {**meta, "weights": weights}}

    def write(folder: Path) -> None:
        save_file(sd, str(folder / WEIGHTS))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    # An autoencoder export there may be replaced too (--overwrite): it is as much an export as ours.
    return replace_dir(out, write, {WEIGHTS, "config.json", AE_EXPORT_WEIGHTS, *DIFFUSERS_WEIGHTS}, overwrite)
