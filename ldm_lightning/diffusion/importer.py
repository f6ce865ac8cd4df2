"""`ldm-lightning import`: published stage-2 weights -> a denoiser export folder, converted once.

    ldm-lightning import --from DiT-XL-2-256x256.pt --out dit-xl2/ --autoencoder sd-vae-ft-ema/
    ldm-lightning import --from facebook/DiT-XL-2-256/ --out dit-xl2/ --autoencoder facebook/DiT-XL-2-256/vae
    ldm-lightning import --from stable-diffusion-v1-5/ --out sd15/        # unet/ + scheduler/ + vae/ + text_encoder/

The folder (`denoiser.safetensors` + `config.json`) is what `ldm-lightning export` writes for a trained model:
`ldm-lightning sample --checkpoint dit-xl2/` samples it, `model.init_args.init_from: dit-xl2/` fine-tunes it.
The schedule and prediction come with the weights (facebookresearch/DiT: linear betas 1e-4..0.02, T=1000,
eps; a diffusers folder: its scheduler_config.json beside it, SD's epsilon or v_prediction); the latent scale
factor is the autoencoder's (SD's VAE carries 0.18215). Layouts read: `interop.LAYOUTS`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ldm_lightning.errors import UserError
from ldm_lightning.finite import finite_float
from ldm_lightning.output_paths import replace_dir

from .conditioning import ConditioningConfig
from .load import read_pretrained
from .load import CHECKPOINT_TAG, CONFIG_KEY, WEIGHTS
from .loss import ObjectiveConfig


def import_weights(src, out, autoencoder: str | None = None, num_heads: int | None = None,
                   drop_prob: float = 0.1, overwrite: bool = False,
                   text_encoder: str | None = None) -> tuple[Path, list[str]]:
    """Convert `src` into a denoiser export folder `out`; returns (folder, notes on what was adapted).
    `text_encoder`: the text model an SD UNet cross-attends to (recorded as its conditioning)."""
    from safetensors.torch import save_file
    pre = read_pretrained(src, num_heads)
    if pre.meta is not None:
        raise UserError(f"{src} is already an ldm-lightning denoiser: use it as it is (sample --checkpoint, "
                        "model.init_args.init_from)")
    cfg = pre.backbone
    side = pre.latent_size or cfg.get("input_size")
    if side is None:
        raise UserError(f"{src}: its config.json gives no sample_size (the latent side it was trained at); add "
                        "\"sample_size\": N to it (SD 1.x: 64, SD 2.x-768: 96)")
    latent_shape = [cfg["in_channels"], side, side]
    if pre.backbone_family == "sd_unet" and not text_encoder:
        raise UserError(f"{src} is a text-conditional SD UNet: give --text-encoder FOLDER (the CLIP text model it "
                        "cross-attends to, with its tokenizer; a pipeline folder's text_encoder/ is taken by default)")
    ae_meta = {"path": None, "hash": None}
    if autoencoder:
        from ldm_lightning.autoencoder.hashing import autoencoder_hash
        from ldm_lightning.autoencoder.load import load_autoencoder
        ae = load_autoencoder(autoencoder)
        if ae.latent_channels != cfg["in_channels"]:
            raise UserError(f"--autoencoder {autoencoder} makes {ae.latent_channels}-channel latents; the imported "
                            f"model takes {cfg['in_channels']}: give the autoencoder it was trained with")
        ae_meta = {"path": str(autoencoder), "hash": autoencoder_hash(ae)}
    if pre.backbone_family == "sd_unet":  # SD's text conditioning: 77 CLIP tokens, no mask
        cond = ConditioningConfig(kind="text", text_encoders=[{"path": str(text_encoder), "max_length": 77}],
                                  drop_prob=drop_prob)
    elif pre.num_classes:
        cond = ConditioningConfig(kind="class", num_classes=pre.num_classes, drop_prob=drop_prob)
    else:
        cond = ConditioningConfig()
    meta = {"module": CHECKPOINT_TAG, "backbone_family": pre.backbone_family, "backbone": cfg,
            "schedule": pre.schedule or {"kind": "vp"},
            "objective": dataclasses.asdict(ObjectiveConfig(prediction=pre.prediction or "eps")),
            "conditioning": dataclasses.asdict(cond), "latent_shape": latent_shape, "autoencoder": ae_meta,
            "imported_from": {"path": str(src), "layout": pre.layout, "notes": pre.notes}, "weights": "live"}
    sd = {k: v.contiguous() for k, v in pre.state.items()}

    def write(folder: Path) -> None:
        save_file(sd, str(folder / WEIGHTS))
        (folder / "config.json").write_text(json.dumps({CONFIG_KEY: meta}, indent=2))
    return replace_dir(out, write, {WEIGHTS, "config.json"}, overwrite), pre.notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ldm-lightning import", description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True,
                   help="a facebookresearch/DiT .pt, a diffusers DiTTransformer2DModel / DiT pipeline folder, or a "
                        "diffusers UNet2DConditionModel / Stable Diffusion pipeline folder")
    p.add_argument("--out", required=True, help="output folder (a denoiser export)")
    p.add_argument("--autoencoder", default=None,
                   help="the autoencoder whose latents the model denoises (recorded for sample and fit; SD's VAE "
                        "(sd-vae-ft-ema / -mse, diffusers folder or .safetensors) for DiT); default: the vae/ of a "
                        "diffusers pipeline folder given as --from")
    p.add_argument("--text-encoder", default=None,
                   help="SD UNet: the text model folder it cross-attends to (CLIPTextModel + tokenizer); default: "
                        "the text_encoder/ of a diffusers pipeline folder given as --from")
    p.add_argument("--num-heads", type=int, default=None,
                   help="attention heads (not in a facebookresearch checkpoint; the paper's sizes are known)")
    p.add_argument("--drop-prob", type=finite_float, default=0.1,
                   help="class-dropout probability recorded for fine-tuning")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")
    a = p.parse_args(argv)
    if a.autoencoder is None:  # a pipeline folder carries its VAE (and with it the latent scale factor)
        vae = Path(a.src) / "vae"
        if not (vae / "config.json").is_file():
            p.error("--autoencoder is required (the autoencoder whose latents the model denoises) unless --from is a "
                    "diffusers pipeline folder with a vae/ subfolder")
        a.autoencoder = str(vae)
    if a.text_encoder is None and (Path(a.src) / "text_encoder" / "config.json").is_file():
        a.text_encoder = str(Path(a.src) / "text_encoder")
    out, notes = import_weights(a.src, a.out, a.autoencoder, a.num_heads, a.drop_prob, a.overwrite, a.text_encoder)
    print(f"imported {a.src} -> {out}" + "".join(f"\n  note: {n}" for n in notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
