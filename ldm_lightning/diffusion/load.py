"""`load_denoiser(path)`: the one way to get a trained denoiser back, without Lightning.

Mirrors `ldm_lightning.autoencoder.load`. Reads a DiffusionModule training checkpoint (EMA or live
weights) or a `ldm-lightning export` folder (`denoiser.safetensors` + `config.json`). Both carry the
same metadata (`CHECKPOINT_TAG`, backbone family + config, schedule, objective, conditioning, latent
shape, the autoencoder's path and hash), from which `build_denoiser_parts` rebuilds the network.
The training module, the exporter and `ldm-lightning sample` all import from here, so none of them
imports another (no import cycle), and a tag check never loads Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ldm_lightning.autoencoder.load import CHECKPOINT_TAG as AUTOENCODER_TAG
from ldm_lightning.autoencoder.load import read_checkpoint, read_export_config, read_safetensors
from ldm_lightning.errors import WrongFileError

from .conditioning import Conditioner, ConditioningConfig
from .denoiser import Denoiser
from .presets import backbone_from_config
from .schedules import build_schedule

CHECKPOINT_TAG = "ldm_lightning.diffusion.DiffusionModule"
CONFIG_KEY = "ldm_lightning_denoiser"
WEIGHTS = "denoiser.safetensors"
WEIGHT_PREFIX = {"ema": "ema.module.", "live": "denoiser."}
DEFAULT_CLAMP = 0.05  # ObjectiveConfig.clamp's default, for metadata written before the field existed


def build_denoiser_parts(meta: dict) -> tuple[Denoiser, Conditioner]:
    """(Denoiser, Conditioner) from the `ldm_lightning` checkpoint / export metadata (random weights)."""
    sched = dict(meta["schedule"])
    schedule = build_schedule(sched.pop("kind", "vp"), **sched)
    objective = meta["objective"]
    backbone = backbone_from_config(meta["backbone_family"], meta["backbone"])
    denoiser = Denoiser(backbone, schedule, objective["prediction"], objective.get("clamp", DEFAULT_CLAMP))
    return denoiser, Conditioner(ConditioningConfig(**meta["conditioning"]))


def denoiser_state(ckpt: dict, weights: str, source: str) -> dict[str, torch.Tensor]:
    """The denoiser's state dict (EMA or live) out of a DiffusionModule checkpoint dict."""
    if weights not in WEIGHT_PREFIX:
        raise ValueError(f"weights must be 'ema' or 'live'; got {weights!r}")
    prefix = WEIGHT_PREFIX[weights]
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not sd:
        hint = "; the run had ema.enabled=false: use --no-ema / weights='live'" if weights == "ema" else ""
        raise WrongFileError(f"{source}: checkpoint has no {weights} denoiser weights (prefix {prefix!r}){hint}")
    return sd


def load_denoiser(path: str | os.PathLike, weights: str = "ema"):
    """(Denoiser, Conditioner, meta) in eval mode from an export folder or a DiffusionModule .ckpt.

    `weights` picks EMA or live weights of a checkpoint (an export holds the ones it was made with)."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        path = path.parent
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.is_file() or CONFIG_KEY not in (dc := read_export_config(cfg_file)):
            raise FileNotFoundError(f"{path}: not a denoiser export (config.json with {CONFIG_KEY!r} missing); "
                                    "create one with `ldm-lightning export --checkpoint diffusion.ckpt --out DIR`")
        meta, sd = dc[CONFIG_KEY], read_safetensors(path / WEIGHTS)
    else:
        ckpt = read_checkpoint(path)
        meta = ckpt.get("ldm_lightning") if isinstance(ckpt, dict) else None
        if not isinstance(meta, dict) or meta.get("module") != CHECKPOINT_TAG:
            module = (meta if isinstance(meta, dict) else {}).get("module")
            what = ("an autoencoder (stage-1) checkpoint" if module == AUTOENCODER_TAG
                    else f"not a DiffusionModule checkpoint (ldm_lightning.module={module!r})")
            raise WrongFileError(f"{path} is {what}; pass a diffusion (stage-2) .ckpt written by `ldm-lightning fit` "
                                 "or a denoiser export folder")
        sd = denoiser_state(ckpt, weights, str(path))
    denoiser, conditioner, meta = denoiser_with_weights(meta, sd, str(path))
    return denoiser.eval().requires_grad_(False), conditioner, meta


def denoiser_with_weights(meta: dict, sd: dict[str, torch.Tensor], source: str) -> tuple[Denoiser, Conditioner, dict]:
    """(Denoiser, Conditioner, meta) with `sd` loaded. A LoRA run's checkpoint holds the adapters only: its base
    comes from the `init_from` it records, and the adapters are folded in (the returned meta has no 'lora')."""
    denoiser, conditioner = build_denoiser_parts(meta)
    if not meta.get("lora"):
        denoiser.load_state_dict(sd, strict=True)
        return denoiser, conditioner, meta
    from ldm_lightning.nn.lora import LoRAConfig, apply_lora, is_adapter_key, merge_lora

    from .interop import read_pretrained
    base = meta.get("init_from")
    if not base or not Path(base).exists():
        raise WrongFileError(f"{source} holds LoRA adapters over the base weights of init_from={base!r}, which do "
                             "not exist here: put them back at that path (or export this model on the machine that "
                             "trained it: `ldm-lightning export` writes merged weights)")
    pre = read_pretrained(base, num_heads=meta["backbone"].get("num_heads"))
    denoiser.load_state_dict(pre.state, strict=False)
    apply_lora(denoiser.backbone, LoRAConfig(**meta["lora"]))
    missing, unexpected = denoiser.load_state_dict(sd, strict=False)
    missing = [k for k in missing if is_adapter_key(k) or k not in pre.state]
    if missing or unexpected:
        raise WrongFileError(f"{source}: LoRA weights do not match their config: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
    merge_lora(denoiser.backbone)
    return denoiser, conditioner, {k: v for k, v in meta.items() if k != "lora"}
