"""Denoiser export: a pickle-free folder `denoiser.safetensors` + `config.json`.

`ldm-lightning export --checkpoint diffusion.ckpt --out folder` lands here (dispatch in
`ldm_lightning/export.py`). The config holds everything to rebuild the network without the training
code's hyper-parameters: backbone family + config, schedule, objective, conditioning, latent shape and
the autoencoder's path and content hash (the denoiser is meaningless without that autoencoder).
`diffusion/load.py`'s `load_denoiser` reads such a folder or a training checkpoint.

Formats: `safetensors` (ours, above); `diffusers`: a DiT as a `DiTTransformer2DModel` folder (interop.py says
which DiTs map), an SD UNet (`sd_unet`) as a `UNet2DConditionModel` folder (sd_interop.py); `lora` (a DiT or
SD UNet): the adapters of a LoRA run alone, as `pytorch_lora_weights.safetensors` with PEFT-style keys
`transformer.<diffusers module>.lora_A.weight` (what diffusers' `load_lora_weights` reads) and
`adapter_config.json` (rank, alpha, target modules). A LoRA run's checkpoint exported as safetensors or
diffusers gives the merged full weights (base + scale * B A). An SD UNet's adapters go under `unet.` (diffusers'
module names are ours), the layout `StableDiffusionPipeline.load_lora_weights` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ldm_lightning.autoencoder.load import DIFFUSERS_WEIGHTS
from ldm_lightning.autoencoder.load import EXPORT_WEIGHTS as AE_EXPORT_WEIGHTS
from ldm_lightning.output_paths import replace_dir

from .load import CHECKPOINT_TAG, CONFIG_KEY, WEIGHTS, denoiser_state, denoiser_with_weights

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA weight name
LORA_CONFIG = "adapter_config.json"
DENOISER_FILES = {LORA_WEIGHTS, LORA_CONFIG}


def export_denoiser(ckpt: dict, out: str | os.PathLike, fmt: str = "safetensors", weights: str = "ema",
                    overwrite: bool = True) -> Path:
    """Write the denoiser of a training checkpoint (already loaded dict) to folder `out` in format `fmt`
    (module docstring), replacing an export there whole (`overwrite=False`: a non-empty `out` is refused)."""
    from safetensors.torch import save_file
    meta = ckpt.get("ldm_lightning") or {}
    if meta.get("module") != CHECKPOINT_TAG:
        raise ValueError(f"not a DiffusionModule checkpoint (ldm_lightning.module={meta.get('module')!r})")
    raw = denoiser_state(ckpt, weights, "checkpoint")
    files: dict[str, dict] = {}
    if fmt == "lora":
        config, files[LORA_WEIGHTS] = lora_adapter(meta, raw)
        json_name = LORA_CONFIG
    else:
        denoiser, _, plain_meta = denoiser_with_weights(meta, raw, "checkpoint")  # LoRA adapters folded in
        sd = {k: v.detach().cpu().contiguous() for k, v in denoiser.state_dict().items()}
        json_name = "config.json"
        if fmt == "safetensors":
            files[WEIGHTS], config = sd, {CONFIG_KEY: {**plain_meta, "weights": weights}}
        elif fmt == "diffusers":
            config, files[DIFFUSERS_WEIGHTS[0]] = diffusers_transformer(plain_meta, sd)
        else:
            raise ValueError(f"denoisers export as --format safetensors, diffusers (a DiT or SD UNet) or lora (a LoRA "
                             f"run's adapters); got {fmt!r}")

    def write(folder: Path) -> None:
        for name, tensors in files.items():
            save_file(tensors, str(folder / name), metadata=lora_file_metadata(config) if fmt == "lora" else None)
        (folder / json_name).write_text(json.dumps(config, indent=2))
    # An autoencoder export there may be replaced too (--overwrite): it is as much an export as ours.
    return replace_dir(out, write, {WEIGHTS, "config.json", AE_EXPORT_WEIGHTS, *DIFFUSERS_WEIGHTS, *DENOISER_FILES},
                       overwrite)


def lora_file_metadata(config: dict) -> dict:
    """The safetensors header diffusers writes for a LoRA (`lora_adapter_metadata`: the LoraConfig per prefix): its
    loaders take rank and alpha from it; without it they assume alpha = rank (scale 1)."""
    prefix = config["prefix"]
    adapter = {f"{prefix}.{k}": config[k] for k in ("r", "lora_alpha", "target_modules")}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, sort_keys=True)}


def dit_config_of(meta: dict):
    from ldm_lightning.errors import UserError

    from .presets import backbone_config
    if meta["backbone_family"] != "dit":
        raise UserError(f"only a DiT maps to diffusers' DiT names (and an SD UNet, backbone sd_unet, to "
                        f"UNet2DConditionModel with --format diffusers); this checkpoint's backbone is a "
                        f"{meta['backbone_family']}: export it with --format safetensors")
    return backbone_config("dit", meta["backbone"])


def diffusers_transformer(meta: dict, sd: dict) -> tuple[dict, dict]:
    """(config.json, weights) of a diffusers DiTTransformer2DModel, or of a UNet2DConditionModel for an SD UNet,
    from our merged denoiser state dict."""
    backbone_sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    if meta["backbone_family"] == "sd_unet":
        from .presets import backbone_config
        from .sd_interop import to_diffusers_unet
        return to_diffusers_unet(backbone_sd, backbone_config("sd_unet", meta["backbone"]), meta["latent_shape"][-1])
    from .interop import to_diffusers_dit
    return to_diffusers_dit(backbone_sd, dit_config_of(meta))


def lora_adapter(meta: dict, sd: dict) -> tuple[dict, dict]:
    """(adapter_config.json, weights) of a LoRA run's adapters in diffusers' names (PEFT key layout): a DiT's under
    `transformer.` (our fused to_kv adapter becomes to_k and to_v adapters sharing lora_A, B split by rows: the same
    update); an SD UNet's under `unet.`, its module names being diffusers' own (what `load_lora_weights` reads)."""
    from ldm_lightning.errors import UserError
    if not meta.get("lora"):
        raise UserError("--format lora: this checkpoint is not from a LoRA run (model.lora unset); use --format "
                        "safetensors or diffusers")
    if meta["backbone_family"] == "sd_unet":
        prefix, names = "unet", None
    else:
        from .interop import diffusers_dit_keys
        prefix, names = "transformer", diffusers_dit_keys(dit_config_of(meta))
    out, targets = {}, set()
    for k, v in sd.items():
        if ".lora_A." not in k:
            continue
        module = k[len("backbone."):k.index(".lora_A.")]
        theirs = [f"{module}.weight"] if names is None else names.get(f"{module}.weight")
        if theirs is None:
            raise UserError(f"LoRA adapter on {module!r} has no diffusers DiTTransformer2DModel counterpart")
        A = v.detach().cpu()
        B = sd[k.replace(".lora_A.", ".lora_B.")].detach().cpu()
        Bs = B.chunk(len(theirs), 0) if module.endswith(".to_kv") else [B] * len(theirs)
        for t, b in zip(theirs, Bs):
            m = t[:-len(".weight")]
            out[f"{prefix}.{m}.lora_A.weight"] = A.clone().contiguous()
            out[f"{prefix}.{m}.lora_B.weight"] = b.clone().contiguous()
            targets.add(m.split(".", 2)[-1] if m.startswith("transformer_blocks.") else
                        ".".join(m.split(".")[-2:]) if m.endswith(".0") else m.rsplit(".", 1)[-1])
    lora = meta["lora"]
    alpha = lora.get("alpha") if lora.get("alpha") is not None else lora["rank"]
    config = {"peft_type": "LORA", "r": lora["rank"], "lora_alpha": alpha, "target_modules": sorted(targets),
              "prefix": prefix, "base_model": meta.get("init_from"), "ldm_lightning_lora": lora}
    return config, out
