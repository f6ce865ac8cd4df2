"""`load_denoiser(path)`: the one way to get a trained denoiser back, without Lightning.

Mirrors `ldm_lightning.autoencoder.load`. Reads a DiffusionModule training checkpoint (EMA or live
weights) or a `ldm-lightning export` folder (`denoiser.safetensors` + `config.json`). Both carry the
same metadata (`CHECKPOINT_TAG`, backbone family + config, schedule, objective, conditioning, latent
shape, the autoencoder's path and hash), from which `build_denoiser_parts` rebuilds the network.
The training module, the exporter and `ldm-lightning sample` all import from here, so none of them
imports another (no import cycle), and a tag check never loads Lightning. `read_pretrained` reads any layout
`interop.LAYOUTS` lists (published DiT weights through interop's converters, SD UNets through sd_interop's, or
our own), for `ldm-lightning import` and `model.init_args.init_from`; a LoRA checkpoint's base is read through
it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ldm_lightning.autoencoder.load import CHECKPOINT_TAG as AUTOENCODER_TAG
from ldm_lightning.autoencoder.load import read_checkpoint, read_export_config, read_safetensors
from ldm_lightning.dcp_files import is_sharded_checkpoint
from ldm_lightning.errors import WrongFileError

from .conditioning import Conditioner, ConditioningConfig
from .denoiser import Denoiser
from .interop import (DIFFUSERS_DIT_CLASSES, DIFFUSERS_WEIGHT_FILES, LAYOUTS, NOT_MAPPED, OURS_LAYOUT, ImportLayoutError,
                      Pretrained, from_diffusers_dit, from_fb_dit, is_fb_dit, schedule_from_scheduler_config)
from .presets import backbone_from_config
from .sd_interop import SD_UNET_CLASS, from_diffusers_unet
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
    if path.is_dir() and not is_sharded_checkpoint(path):  # an FSDP2 checkpoint folder reads like a .ckpt below
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


# --- reading any of them -----------------------------------------------------------------------------------
def unknown_layout(path, what: str) -> ImportLayoutError:
    return ImportLayoutError(f"{path}: {what}; layouts understood: " + "; ".join(LAYOUTS))


def read_pretrained(path, num_heads: int | None = None) -> Pretrained:
    """The denoiser weights at `path` in our names, whatever layout of `LAYOUTS` it is in."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"pretrained weights {str(path)!r} do not exist; give " + ", ".join(LAYOUTS))
    if path.is_dir():
        # a pipeline folder (transformer/ or unet/ beside scheduler/), or the model folder itself
        sub = next((path / d for d in ("transformer", "unet") if (path / d / "config.json").is_file()), None)
        transformer = sub or path
        sched_file = transformer.parent / "scheduler" / "scheduler_config.json"
        cfg_file = transformer / "config.json"
        if not cfg_file.is_file():
            raise unknown_layout(path, "a folder without config.json (or transformer/ or unet/config.json)")
        dc = read_export_config(cfg_file)
        if CONFIG_KEY in dc:
            meta = dc[CONFIG_KEY]
            return from_ours(meta, read_safetensors(transformer / WEIGHTS), meta.get("weights", "ema"))
        cls = dc.get("_class_name")
        if cls in NOT_MAPPED:
            raise unknown_layout(path, f"diffusers {cls} does not map to a backbone here: {NOT_MAPPED[cls]}")
        if cls not in DIFFUSERS_DIT_CLASSES + (SD_UNET_CLASS,):
            raise unknown_layout(path, f"config.json of _class_name {cls!r}")
        wfile = next((transformer / w for w in DIFFUSERS_WEIGHT_FILES if (transformer / w).is_file()), None)
        if wfile is None:
            raise FileNotFoundError(f"{transformer}: diffusers folder without {DIFFUSERS_WEIGHT_FILES[0]}")
        sd = read_safetensors(wfile) if wfile.suffix == ".safetensors" else read_checkpoint(wfile)
        pre = from_diffusers_unet(dc, sd, str(transformer)) if cls == SD_UNET_CLASS else from_diffusers_dit(dc, sd)
        if sched_file.is_file():
            pre.schedule, pre.prediction = schedule_from_scheduler_config(json.loads(sched_file.read_text()),
                                                                          str(sched_file))
            pre.notes.append(f"schedule and prediction from {sched_file}")
        return pre
    sd = read_safetensors(path) if path.suffix == ".safetensors" else read_checkpoint(path)
    if not isinstance(sd, dict):
        raise unknown_layout(path, f"a {type(sd).__name__}, not a state dict")
    meta = sd.get("ldm_lightning")
    if isinstance(meta, dict) and "state_dict" in sd:
        if meta.get("module") != CHECKPOINT_TAG:
            raise unknown_layout(path, f"an ldm-lightning checkpoint of {meta.get('module')!r}, not a denoiser")
        weights = "ema" if any(k.startswith("ema.module.") for k in sd["state_dict"]) else "live"
        return from_ours(meta, denoiser_state(sd, weights, str(path)), weights)
    if isinstance(sd.get("ema"), dict):  # a facebookresearch/DiT training checkpoint: its EMA (as sample.py)
        sd = sd["ema"]
    if is_fb_dit(sd):
        return from_fb_dit(sd, num_heads)
    keys = [k for k in sd if isinstance(k, str)][:3]
    raise unknown_layout(path, f"tensors named like {keys}")


def from_ours(meta: dict, sd: dict[str, torch.Tensor], weights: str) -> Pretrained:
    if meta.get("lora"):  # a LoRA run's checkpoint: its adapters folded into its own init_from base
        denoiser, _, meta = denoiser_with_weights(meta, sd, "init_from")
        sd = denoiser.state_dict()
    return Pretrained(OURS_LAYOUT, meta["backbone_family"], dict(meta["backbone"]), dict(sd), dict(meta["schedule"]),
                      meta["objective"]["prediction"], meta["conditioning"].get("num_classes") or None,
                      [f"{weights} weights"], meta)
