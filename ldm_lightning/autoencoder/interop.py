"""Key and config mapping between our `Autoencoder` ('kl' arch) and diffusers' `AutoencoderKL`.

Our parameter names ARE the CompVis / Stable Diffusion names (kl.py), so an SD first-stage state dict
needs only its `first_stage_model.` prefix stripped. diffusers renamed the same tensors; the mapping
is fixed per block, plus one reshape: diffusers' attention projections are `nn.Linear` (C, C) where
CompVis uses 1x1 convs (C, C, 1, 1).
"""

from __future__ import annotations

import re

import torch

from ldm_lightning.autoencoder.autoencoder import AutoencoderConfig

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RES = {"nin_shortcut": "conv_shortcut"}


def _ours_to_diffusers_key(key: str, levels: int) -> str:
    k = key
    k = k.replace("encoder.norm_out.", "encoder.conv_norm_out.").replace("decoder.norm_out.", "decoder.conv_norm_out.")
    m = re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(\w+)\.(weight|bias)$", k)
    if m:
        part, blk, layer, wb = m.groups()
        if blk == "attn_1":
            return f"{part}.mid_block.attentions.0.{_ATTN[layer]}.{wb}"
        return f"{part}.mid_block.resnets.{int(blk[-1]) - 1}.{_RES.get(layer, layer)}.{wb}"
    m = re.match(r"encoder\.down\.(\d+)\.(block\.(\d+)\.(\w+)|downsample\.conv)\.(weight|bias)$", k)
    if m:
        i, _, j, layer, wb = m.groups()
        if j is None:
            return f"encoder.down_blocks.{i}.downsamplers.0.conv.{wb}"
        return f"encoder.down_blocks.{i}.resnets.{j}.{_RES.get(layer, layer)}.{wb}"
    m = re.match(r"decoder\.up\.(\d+)\.(block\.(\d+)\.(\w+)|upsample\.conv)\.(weight|bias)$", k)
    if m:
        i, _, j, layer, wb = m.groups()
        d = levels - 1 - int(i)                                  # diffusers orders up blocks coarse -> fine
        if j is None:
            return f"decoder.up_blocks.{d}.upsamplers.0.conv.{wb}"
        return f"decoder.up_blocks.{d}.resnets.{j}.{_RES.get(layer, layer)}.{wb}"
    return k


def _is_attn_proj(key: str) -> bool:
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", key))


def check_diffusers_compatible(cfg: AutoencoderConfig) -> None:
    if cfg.arch != "kl" or cfg.regularizer != "kl":
        raise ValueError(f"only arch='kl', regularizer='kl' autoencoders map to diffusers AutoencoderKL; got "
                         f"arch={cfg.arch!r}, regularizer={cfg.regularizer!r} (use --format safetensors)")
    if cfg.attn_resolutions:
        raise ValueError("diffusers AutoencoderKL has attention only in the mid block; autoencoder.attn_resolutions="
                         f"{list(cfg.attn_resolutions)} cannot be exported (use --format safetensors)")


def to_diffusers_state_dict(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """Our (= CompVis) state dict -> diffusers AutoencoderKL state dict (latent stats buffers dropped)."""
    check_diffusers_compatible(cfg)
    out = {}
    for k, v in sd.items():
        if k in ("scale_factor", "shift_factor", "latent_mean", "latent_std"):
            continue
        if _is_attn_proj(k):
            v = v.reshape(v.shape[0], v.shape[1])                 # (C, C, 1, 1) -> (C, C)
        out[_ours_to_diffusers_key(k, len(cfg.ch_mult))] = v.contiguous()
    return out


def from_diffusers_state_dict(sd: dict[str, torch.Tensor], cfg: AutoencoderConfig) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> ours. Built by inverting the forward map over our keys."""
    from ldm_lightning.autoencoder.autoencoder import Autoencoder
    with torch.device("meta"):
        ours = Autoencoder(cfg).state_dict()
    inverse = {_ours_to_diffusers_key(k, len(cfg.ch_mult)): k for k in ours}
    out, unknown = {}, []
    for k, v in sd.items():
        if k not in inverse:
            unknown.append(k)
            continue
        ok = inverse[k]
        out[ok] = v.reshape(ours[ok].shape) if _is_attn_proj(ok) else v
    if unknown:
        raise ValueError(f"diffusers state dict has {len(unknown)} key(s) with no counterpart in the autoencoder "
                         f"built from its config.json, e.g. {unknown[:3]}")
    return out


def config_from_diffusers(dc: dict) -> AutoencoderConfig:
    """diffusers AutoencoderKL config.json -> AutoencoderConfig."""
    if dc.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"only diffusers AutoencoderKL is supported, got _class_name={dc.get('_class_name')!r}")
    boc = list(dc.get("block_out_channels", [64]))
    ch = boc[0]
    if any(b % ch for b in boc):
        raise ValueError(f"block_out_channels={boc} are not multiples of the first width")
    if not dc.get("use_quant_conv", True) or not dc.get("use_post_quant_conv", True):
        raise ValueError("diffusers AutoencoderKL with use_quant_conv/use_post_quant_conv=False is not supported")
    z = int(dc.get("latent_channels", 4))
    shift = dc.get("shift_factor")
    return AutoencoderConfig(arch="kl", regularizer="kl", in_channels=int(dc.get("in_channels", 3)),
                             out_channels=int(dc.get("out_channels", 3)), resolution=int(dc.get("sample_size", 32)),
                             ch=ch, ch_mult=tuple(b // ch for b in boc), num_res_blocks=int(dc.get("layers_per_block", 1)),
                             mid_attn=bool(dc.get("mid_block_add_attention", True)), z_channels=z, embed_dim=z,
                             norm_groups=int(dc.get("norm_num_groups", 32)),
                             scale_factor=float(dc.get("scaling_factor", 0.18215)),
                             shift_factor=float(shift) if shift is not None else 0.0)


def config_to_diffusers(cfg: AutoencoderConfig, scale_factor: float, shift_factor: float) -> dict:
    check_diffusers_compatible(cfg)
    if cfg.latent_channels != cfg.z_channels:
        raise ValueError(f"diffusers AutoencoderKL needs embed_dim == z_channels; got {cfg.embed_dim} != {cfg.z_channels}")
    n = len(cfg.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels or cfg.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "block_out_channels": [cfg.ch * m for m in cfg.ch_mult], "layers_per_block": cfg.num_res_blocks,
            "act_fn": "silu", "latent_channels": cfg.z_channels, "norm_num_groups": cfg.norm_groups,
            "sample_size": cfg.resolution, "scaling_factor": float(scale_factor),
            "shift_factor": float(shift_factor) if shift_factor else None,
            "mid_block_add_attention": cfg.mid_attn, "force_upcast": True}


def strip_sd_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CompVis/SD checkpoint's `first_stage_model.*` (or an already bare VAE state dict)."""
    pre = "first_stage_model."
    if any(k.startswith(pre) for k in sd):
        return {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    return dict(sd)


def config_from_sd_state_dict(sd: dict[str, torch.Tensor]) -> AutoencoderConfig:
    """Infer the KL autoencoder's sizes from a bare CompVis state dict (SD checkpoints carry no config)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        in_ch = sd["encoder.conv_in.weight"].shape[1]
        out_ch = sd["decoder.conv_out.weight"].shape[0]
        z = sd["decoder.conv_in.weight"].shape[1]
        e = sd["post_quant_conv.weight"].shape[1]
    except KeyError as err:
        raise ValueError(f"not a CompVis/SD autoencoder state dict: missing {err}") from None
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    nrb = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    mid_attn = "encoder.mid.attn_1.q.weight" in sd
    if any(".attn." in k for k in sd if k.startswith("encoder.down.")):
        raise ValueError("SD state dict has attention inside down blocks; pass an explicit config instead")
    return AutoencoderConfig(arch="kl", regularizer="kl", in_channels=in_ch, out_channels=out_ch, ch=ch,
                             ch_mult=ch_mult, num_res_blocks=nrb, z_channels=z, embed_dim=e, mid_attn=mid_attn,
                             norm_groups=32 if ch % 32 == 0 else 8, resolution=256 if 256 % 2 ** (levels - 1) == 0
                             else 2 ** (levels - 1), scale_factor=0.18215)
