"""Stage 1: autoencoders (KL / VQ / DC-AE) that map images to the latent space of stage 2.

Public API (docs/contracts.md): `load_autoencoder(path) -> Autoencoder`, `Autoencoder`, `autoencoder_hash`,
`AutoencoderConfig`, `get_preset`, `AutoencoderModule` (the LightningModule). Heavy pieces
(Lightning, LPIPS) are imported lazily so `from ldm_lightning.autoencoder import load_autoencoder`
stays cheap for the diffusion stage.
"""

from ldm_lightning.autoencoder.autoencoder import Autoencoder, AutoencoderConfig
from ldm_lightning.autoencoder.distributions import DiagonalGaussian, PointPosterior
from ldm_lightning.autoencoder.hashing import autoencoder_hash
from ldm_lightning.autoencoder.presets import PRESETS, get_preset

__all__ = ["Autoencoder", "AutoencoderConfig", "AutoencoderModule", "DiagonalGaussian", "PointPosterior",
           "PRESETS", "autoencoder_hash", "get_preset", "load_autoencoder", "LossConfig"]


def __getattr__(name):
    if name == "AutoencoderModule":
        from ldm_lightning.autoencoder.module import AutoencoderModule
        return AutoencoderModule
    if name == "LossConfig":
        from ldm_lightning.autoencoder.loss import LossConfig
        return LossConfig
    if name == "load_autoencoder":
        from ldm_lightning.autoencoder.load import load_autoencoder
        return load_autoencoder
    raise AttributeError(f"module 'ldm_lightning.autoencoder' has no attribute {name!r}")
