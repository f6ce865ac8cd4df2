"""`ldm-lightning export`: turn a training checkpoint into a self-contained, pickle-free model folder.

    ldm-lightning export --checkpoint run/checkpoints/last.ckpt --format diffusers --out vae/
    ldm-lightning export --checkpoint vae.ckpt --format safetensors --out vae/

Dispatch is on the checkpoint's `ldm_lightning.module` tag, read from the Lightning-free loaders
(`autoencoder/load.py`, `diffusion/load.py`): autoencoder checkpoints go to
`ldm_lightning.autoencoder.export.export_autoencoder`, denoiser checkpoints to
`ldm_lightning.diffusion.export.export_denoiser` (each stage owns its export; this file is the command).
- `safetensors`: `model.safetensors` + `config.json` (`ldm_lightning_autoencoder`: the AutoencoderConfig);
  any arch; the scale/shift/latent stats travel as tensors. `load_autoencoder(folder)` reads it.
- `diffusers`: a `diffusers.AutoencoderKL.from_pretrained` folder (KL arch, no down-block attention);
  `scaling_factor` / `shift_factor` carry our measured factors.
An `--out` that already holds files is refused unless `--overwrite`; then the new export is written to a
sibling temp folder and swapped in with renames, so the folder is never a mix of two exports and a crash
while writing leaves the old one intact.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm_lightning.autoencoder.export import export_autoencoder
from ldm_lightning.autoencoder.load import CHECKPOINT_TAG
from ldm_lightning.errors import WrongFileError

FORMATS = ("diffusers", "safetensors", "lora")  # lora: a LoRA run's adapters (denoisers only)


def export_checkpoint(checkpoint: str, out: str, fmt: str, weights: str = "ema", overwrite: bool = False) -> Path:
    """Export the model of training checkpoint `checkpoint` (autoencoder or denoiser) to folder `out`."""
    from ldm_lightning.autoencoder.load import load_autoencoder, read_checkpoint
    ckpt = read_checkpoint(checkpoint)
    module = (ckpt.get("ldm_lightning") or {}).get("module") if isinstance(ckpt, dict) else None
    if module == CHECKPOINT_TAG:
        return export_autoencoder(load_autoencoder(checkpoint, weights=weights), out, fmt, overwrite)
    from ldm_lightning.diffusion.load import CHECKPOINT_TAG as DENOISER_TAG
    if module == DENOISER_TAG:
        from ldm_lightning.diffusion.export import export_denoiser  # stage 2 owns its export
        return export_denoiser(ckpt, out, fmt, weights, overwrite)
    raise WrongFileError(f"{checkpoint}: not an ldm-lightning training checkpoint (no 'ldm_lightning.module' tag; "
                         f"found {module!r}); pass a .ckpt written by `ldm-lightning fit`")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-lightning export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="Lightning .ckpt written by `ldm-lightning fit`")
    p.add_argument("--format", default="safetensors", choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--weights", default="ema", choices=("ema", "live"), help="which weights to export")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export in --out (written beside it, then swapped in whole)")
    a = p.parse_args(argv)
    out = export_checkpoint(a.checkpoint, a.out, a.format, a.weights, a.overwrite)
    print(f"exported {a.checkpoint} -> {out} ({a.format})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
