"""`load_autoencoder(path)`: the one way the rest of the project gets a frozen stage-1 model.

Accepts, by what is at `path`:
- our Lightning checkpoint (`.ckpt` with an `ldm_lightning` entry, or an FSDP2 run's sharded `.ckpt` folder, its
  shards gathered): EMA weights unless `weights='live'`;
- our export: a folder (or its `model.safetensors`) with `config.json` holding `ldm_lightning_autoencoder`;
- a diffusers `AutoencoderKL` folder: `config.json` + `diffusion_pytorch_model.safetensors`;
- a CompVis / Stable Diffusion state dict (`.ckpt` / `.safetensors`, `first_stage_model.` prefix or bare);
- the spec `identity:CxR`: the weightless pixel-space `IdentityAutoencoder` (identity.py).
Everything is read with `torch.load(weights_only=True)` or safetensors: loading never runs pickled code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ldm_lightning.autoencoder.autoencoder import Autoencoder, AutoencoderConfig
from ldm_lightning.autoencoder import interop
from ldm_lightning.errors import UnreadableCheckpointError, WrongFileError, checkpoint_load_error

CHECKPOINT_TAG = "ldm_lightning.autoencoder.AutoencoderModule"  # `ldm_lightning.module` of our stage-1 .ckpt
EXPORT_CONFIG_KEY = "ldm_lightning_autoencoder"
EXPORT_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with errors that name the path and the fix: `UnsafeCheckpointError` for a
    pickle the restricted unpickler refuses, `UnreadableCheckpointError` for a truncated or foreign file."""
    path = Path(path)
    from ldm_lightning.dcp_files import ShardedCheckpointError, is_sharded_checkpoint, read_full_state_dict
    if is_sharded_checkpoint(path):  # an FSDP2 checkpoint folder: its shards gathered into full tensors
        try:
            return read_full_state_dict(path)
        except ShardedCheckpointError as err:
            raise UnreadableCheckpointError(f"{err}; use another checkpoint of the run (its checkpoints/ folder)") from err
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; pass the path of a .ckpt written by "
                                "`ldm-lightning fit` (see the run's checkpoints/ folder)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, garbage bytes, a pickle naming objects that could run code
        raise checkpoint_load_error(path, err) from err


def read_export_config(path: Path) -> dict:
    """An export's config.json; a corrupt one is named with the fix."""
    try:
        dc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableCheckpointError(f"{path} is not valid JSON ({err}); the export is corrupt: export the "
                                        "checkpoint again") from err
    if not isinstance(dc, dict):
        raise UnreadableCheckpointError(f"{path} holds a {type(dc).__name__}, not an export config: export again")
    return dc


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file on the CPU; a truncated or corrupt one is named with the fix."""
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:
        raise UnreadableCheckpointError(f"could not read safetensors file {str(path)!r} ({type(err).__name__}: "
                                        f"{err}); the file is truncated or corrupt: re-copy or re-export it") from err


def _build(cfg: AutoencoderConfig, sd: dict[str, torch.Tensor], source: str) -> Autoencoder:
    ae = Autoencoder(cfg)
    missing, unexpected = ae.load_state_dict(sd, strict=False)
    # Latent statistics buffers are optional in foreign formats (their config carries the scale).
    missing = [k for k in missing if k not in ("scale_factor", "shift_factor", "latent_mean", "latent_std")]
    if missing or unexpected:
        raise WrongFileError(f"{source}: weights do not match the autoencoder config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if "scale_factor" not in sd:
        ae.scale_factor.fill_(cfg.scale_factor)
        ae.shift_factor.fill_(cfg.shift_factor)
    return ae.eval().requires_grad_(False)


def _from_lightning(ckpt: dict, path: Path, weights: str) -> Autoencoder:
    meta = ckpt.get("ldm_lightning", {})
    if meta.get("module") not in (None, CHECKPOINT_TAG):  # e.g. a diffusion checkpoint given where the autoencoder goes
        raise WrongFileError(f"{path} is not an autoencoder checkpoint (ldm_lightning.module={meta.get('module')!r}); "
                             "give the stage-1 .ckpt, its export folder, or a diffusers/SD autoencoder")
    cfg = AutoencoderConfig.from_dict(meta["autoencoder"])
    prefix = {"ema": "ema.module.", "live": "autoencoder."}[weights]
    sd = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not sd and weights == "ema":
        raise WrongFileError(f"{path}: checkpoint has no EMA weights (ema.enabled was false); pass weights='live'")
    return _build(cfg, sd, str(path))


def load_autoencoder(path: str | os.PathLike, weights: str = "ema", config: AutoencoderConfig | dict | None = None,
                     device: str | torch.device = "cpu") -> Autoencoder:
    """A frozen `Autoencoder` in eval mode from any supported format (module docstring).

    weights: 'ema' (default) or 'live' — which weights of our Lightning checkpoint to take.
    config: override the architecture for a bare SD state dict (inferred from tensor shapes otherwise).
    """
    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live'; got {weights!r}")
    from ldm_lightning.autoencoder.identity import IdentityAutoencoder, parse_identity_spec
    identity = parse_identity_spec(str(path))  # 'identity:CxR': stage 2 on pixels, no weights
    if identity is not None:
        return IdentityAutoencoder(identity).eval().requires_grad_(False).to(device)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"autoencoder {str(path)!r} does not exist: give a .ckpt, an export folder, a "
                                "diffusers AutoencoderKL folder or an SD .ckpt/.safetensors")
    if path.is_file() and path.name == EXPORT_WEIGHTS and (path.parent / "config.json").is_file():
        path = path.parent
    from ldm_lightning.dcp_files import is_sharded_checkpoint
    if path.is_dir() and not is_sharded_checkpoint(path):  # an FSDP2 checkpoint folder reads like a .ckpt below
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} is a folder without config.json: not an autoencoder export")
        dc = read_export_config(cfg_file)
        if EXPORT_CONFIG_KEY in dc:  # our export
            cfg = AutoencoderConfig.from_dict(dc[EXPORT_CONFIG_KEY])
            ae = _build(cfg, read_safetensors(path / EXPORT_WEIGHTS), str(path))
        else:  # diffusers AutoencoderKL
            cfg = interop.config_from_diffusers(dc)
            wfile = next((path / w for w in DIFFUSERS_WEIGHTS if (path / w).is_file()), None)
            if wfile is None:
                raise FileNotFoundError(f"{path}: diffusers folder without {DIFFUSERS_WEIGHTS[0]}")
            sd = read_safetensors(wfile) if wfile.suffix == ".safetensors" else read_checkpoint(wfile)
            ae = _build(cfg, interop.from_diffusers_state_dict(sd, cfg), str(path))
        return ae.to(device)
    if path.suffix == ".safetensors":
        sd = read_safetensors(path)
    else:
        ckpt = read_checkpoint(path)
        if isinstance(ckpt, dict) and "ldm_lightning" in ckpt and "state_dict" in ckpt:
            return _from_lightning(ckpt, path, weights).to(device)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise WrongFileError(f"{path}: not a state dict or a Lightning checkpoint")
    sd = interop.strip_sd_prefix(sd)
    if config is not None:
        cfg = config if isinstance(config, AutoencoderConfig) else AutoencoderConfig.from_dict(config)
    else:
        cfg = interop.config_from_sd_state_dict(sd)
    # SD checkpoints hold the loss's logvar etc. under other prefixes; keep the autoencoder's tensors only.
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    return _build(cfg, sd, str(path)).to(device)
