"""Denoiser export: a pickle-free folder `denoiser.safetensors` + `config.json`, and its loader.

`ldm-lightning export --checkpoint diffusion.ckpt --out folder` lands here (dispatch in
`ldm_lightning/export.py`). The config holds everything to rebuild the network without the training
code's hyper-parameters: backbone family + config, schedule, objective, conditioning, latent shape and
the autoencoder's path and content hash (the denoiser is meaningless without that autoencoder).
`load_denoiser` reads either such a folder or a training checkpoint (EMA or live weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .module import CHECKPOINT_TAG, build_denoiser_parts

CONFIG_KEY = "ldm_lightning_denoiser"
WEIGHTS = "denoiser.safetensors"
_PREFIX = {"ema": "ema.module.", "live": "denoiser."}


def _denoiser_state(ckpt: dict, weights: str, source: str) -> dict[str, torch.Tensor]:
    if weights not in _PREFIX:
        raise ValueError(f"weights must be 'ema' or 'live'; got {weights!r}")
    prefix = _PREFIX[weights]
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not sd:
        hint = "; the run had ema.enabled=false: use --no-ema / weights='live'" if weights == "ema" else ""
        raise ValueError(f"{source}: checkpoint has no {weights} denoiser weights (prefix {prefix!r}){hint}")
    return sd


def export_denoiser(ckpt: dict, out: str | os.PathLike, fmt: str = "safetensors", weights: str = "ema") -> Path:
    """Write the denoiser of a training checkpoint (already loaded dict) to folder `out`."""
    from safetensors.torch import save_file
    if fmt != "safetensors":
        raise ValueError(f"denoisers export only as --format safetensors (got {fmt!r}); diffusers has no "
                         "equivalent of these backbones")
    meta = ckpt.get("ldm_lightning") or {}
    if meta.get("module") != CHECKPOINT_TAG:
        raise ValueError(f"not a DiffusionModule checkpoint (ldm_lightning.module={meta.get('module')!r})")
    sd = {k: v.detach().cpu().contiguous() for k, v in _denoiser_state(ckpt, weights, "checkpoint").items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / WEIGHTS))
    (out / "config.json").write_text(json.dumps({CONFIG_KEY: {**meta, "weights": weights}}, indent=2))
    return out


def load_denoiser(path: str | os.PathLike, weights: str = "ema"):
    """(Denoiser, Conditioner, meta) in eval mode from an export folder or a DiffusionModule .ckpt.

    `weights` picks EMA or live weights of a checkpoint (an export holds the ones it was made with)."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file() or CONFIG_KEY not in (dc := json.loads(cfg_file.read_text())):
            raise FileNotFoundError(f"{path}: not a denoiser export (config.json with {CONFIG_KEY!r} missing); "
                                    "create one with `ldm-lightning export --checkpoint diffusion.ckpt --out DIR`")
        from safetensors.torch import load_file
        meta, sd = dc[CONFIG_KEY], load_file(str(path / WEIGHTS), device="cpu")
    else:
        from ldm_lightning.autoencoder.load import read_checkpoint
        ckpt = read_checkpoint(path)
        meta = ckpt.get("ldm_lightning") if isinstance(ckpt, dict) else None
        if not meta or meta.get("module") != CHECKPOINT_TAG:
            raise ValueError(f"{path}: not a DiffusionModule checkpoint (ldm_lightning.module="
                             f"{(meta or {}).get('module')!r}); pass a stage-2 .ckpt or a denoiser export folder")
        sd = _denoiser_state(ckpt, weights, str(path))
    denoiser, conditioner = build_denoiser_parts(meta)
    denoiser.load_state_dict(sd, strict=True)
    return denoiser.eval().requires_grad_(False), conditioner, meta
