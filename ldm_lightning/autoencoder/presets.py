"""Named autoencoder configurations (DiT-style registry). Sizes follow CompVis latent-diffusion
`configs/autoencoder/*.yaml` (kl-f8 is the Stable Diffusion VAE) and DC-AE f32c32 (arXiv 2410.10733)."""

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
    # MNIST demo: 32x32x1 -> 8x8x4, ~0.55M params, trains on a laptop CPU in minutes.
    "tiny-mnist": dict(arch="kl", regularizer="kl", in_channels=1, ch=24, ch_mult=(1, 2, 2), num_res_blocks=1,
                       z_channels=4, resolution=32, norm_groups=8),
}


def get_preset(name: str, **overrides) -> AutoencoderConfig:
    """The config of preset `name` with `overrides` applied (any AutoencoderConfig field)."""
    if name not in PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return AutoencoderConfig.from_dict({**PRESETS[name], **overrides})
