"""Named autoencoder configurations (DiT-style registry). Sizes follow CompVis latent-diffusion
`configs/autoencoder/*.yaml` (kl-f8 is the Stable Diffusion VAE), DC-AE f32c32 (arXiv 2410.10733),
MoVQGAN (arXiv 2209.09002; Kandinsky's 67M f8 MoVQ), VQ-VAE-2 (arXiv 1906.00446: 512 codes of dim 64 per
level) and RAE (arXiv 2510.11690: DINOv2-B/14 encoder, ViT decoder, noise tau 0.8)."""

from __future__ import annotations

from ldm_lightning.autoencoder.autoencoder import AutoencoderConfig

PRESETS: dict[str, dict] = {
    # Stable Diffusion / LDM KL-f8: 256x256x3 -> 32x32x4, ~84M params.
    "kl-f8": dict(arch="kl", regularizer="kl", ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4,
                  embed_dim=4, resolution=256, scale_factor=0.18215),
    # LDM KL-f4: 256x256x3 -> 64x64x3.
    "kl-f4": dict(arch="kl", regularizer="kl", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3,
                  embed_dim=3, resolution=256),
    # LDM VQ-f4: 8192 codes of dim 3.
    "vq-f4": dict(arch="kl", regularizer="vq", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3,
                  embed_dim=3, resolution=256, vq_codebook_size=8192, vq_beta=0.25),
    # DC-AE-style f32c32: 256x256x3 -> 8x8x32, attention at the two coarsest levels, no KL.
    "dcae-f32": dict(arch="dcae", regularizer="none", ch=128, ch_mult=(1, 2, 4, 4, 8, 8), num_res_blocks=2,
                     z_channels=32, resolution=256, attn_resolutions=(16, 8)),
    # MoVQ f4: 256x256x3 -> 64x64x4; z_q-conditioned decoder norms, 2 heads of 2-dim codes from ONE codebook of
    # 1024 entries. 1024 is the MoVQ paper's: multichannel quantisation is what lets a small codebook match
    # VQGAN's 16384 (each position gets 1024^2 code pairs). Kandinsky's MoVQGAN checkpoints use 16384 codes of
    # dim 4 with one head: set autoencoder.vq_codebook_size: 16384, vq_heads: 1 to build that layout.
    "movq-f4": dict(arch="movq", regularizer="vq", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=4,
                    embed_dim=4, resolution=256, vq_codebook_size=1024, vq_heads=2, vq_beta=0.25),
    # MoVQ f8 (Kandinsky's MoVQ layout, the paper's 1024-entry multichannel codebook): 256x256x3 -> 32x32x4,
    # attention at 32.
    "movq-f8": dict(arch="movq", regularizer="vq", ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=4,
                    embed_dim=4, resolution=256, attn_resolutions=(32,), vq_codebook_size=1024, vq_heads=2,
                    vq_beta=0.25),
    # VQ-VAE-2: bottom 64x64 and top 32x32 codes of dim 64 (512 each); stage-2 latent (128, 64, 64).
    "vqvae2-f4": dict(arch="kl", regularizer="vq2", ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=64,
                      embed_dim=64, resolution=256, vq_codebook_size=512, vq_beta=0.25, vq_ema=True,
                      mid_attn=False),
    # RAE: frozen DINOv2-B/14 (set rae_encoder to its local folder): 224x224x3 -> 16x16x768, ViT-B decoder.
    "rae-dinov2-b": dict(arch="rae", regularizer="none", resolution=224, rae_decoder_width=768,
                         rae_decoder_depth=12, rae_decoder_heads=12, rae_noise_tau=0.8),
    # MNIST demo: 32x32x1 -> 8x8x4, ~0.55M params, trains on a laptop CPU in minutes.
    "tiny-mnist": dict(arch="kl", regularizer="kl", in_channels=1, ch=24, ch_mult=(1, 2, 2), num_res_blocks=1,
                       z_channels=4, resolution=32, norm_groups=8),
}


def get_preset(name: str, **overrides) -> AutoencoderConfig:
    """The config of preset `name` with `overrides` applied (any AutoencoderConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {sorted(PRESETS)}")
    if PRESETS[name].get("arch") == "rae" and not overrides.get("rae_encoder") and \
            not overrides.get("rae_encoder_config"):
        raise ValueError(f"preset {name!r} needs autoencoder.rae_encoder: the local Hugging Face DINOv2 folder "
                         "(e.g. model.init_args.autoencoder: {rae_encoder: weights/dinov2-base})")
    return AutoencoderConfig.from_dict({**PRESETS[name], **overrides})
