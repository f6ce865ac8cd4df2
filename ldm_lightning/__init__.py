"""ldm-lightning: latent diffusion training (autoencoder stage + diffusion stage) on PyTorch Lightning."""

__version__ = "0.1.0"
