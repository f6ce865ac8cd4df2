"""Autoencoder export: a pickle-free model folder that `load_autoencoder(folder)` (load.py) reads.

- `safetensors`: `model.safetensors` + `config.json` (`ldm_lightning_autoencoder`: the AutoencoderConfig);
  any arch; the scale/shift/latent stats travel as tensors.
- `diffusers`: a `diffusers.AutoencoderKL.from_pretrained` folder (KL arch, no down-block attention);
  `scaling_factor` / `shift_factor` carry our measured factors (interop.py).

`ldm-lightning export` (`ldm_lightning/export.py`) lands here for autoencoder checkpoints, as it lands in
`diffusion/export.py` for denoiser checkpoints.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldm_lightning.autoencoder.load import DIFFUSERS_WEIGHTS, EXPORT_WEIGHTS
from ldm_lightning.output_paths import replace_dir

# What any export writes (autoencoder in either format, denoiser): a folder holding only these may be replaced.
EXPORT_FILES = {"config.json", EXPORT_WEIGHTS, *DIFFUSERS_WEIGHTS, "denoiser.safetensors",
                "pytorch_lora_weights.safetensors", "adapter_config.json"}


def export_autoencoder(ae, out: str | os.PathLike, fmt: str = "safetensors", overwrite: bool = True) -> Path:
    """Write `ae` (an `Autoencoder`) to folder `out` in format `fmt`; returns the folder.

    An existing export in `out` is replaced whole (`replace_dir`: never a mix of two exports); with
    `overwrite=False` (the CLI's default) a non-empty `out` is refused instead."""
    from safetensors.torch import save_file

    from ldm_lightning.autoencoder import interop
    from ldm_lightning.autoencoder.load import EXPORT_CONFIG_KEY
    if fmt not in ("diffusers", "safetensors"):
        raise ValueError(f"an autoencoder exports as --format diffusers or safetensors; got {fmt!r}")
    sd = {k: v.detach().cpu().contiguous() for k, v in ae.state_dict().items()}
    if fmt == "safetensors":
        config = {EXPORT_CONFIG_KEY: ae.config.to_dict()}
        weights = {EXPORT_WEIGHTS: sd}
    else:
        config = interop.config_to_diffusers(ae.config, float(ae.scale_factor), float(ae.shift_factor))
        weights = {"diffusion_pytorch_model.safetensors": interop.to_diffusers_state_dict(sd, ae.config)}

    def write(folder: Path) -> None:
        for name, tensors in weights.items():
            save_file(tensors, str(folder / name))
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return replace_dir(out, write, EXPORT_FILES, overwrite)


__all__ = ["EXPORT_FILES", "export_autoencoder"]
