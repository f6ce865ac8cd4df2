"""`IdentityAutoencoder`: stage 2 on pixels (JiT, arXiv 2511.13720; pixel-space SR / inpainting).

encode(x) is a point posterior at x and decode(z) = z, with latent_channels = image channels and
downsample factor 1, so the diffusion stage keeps its frozen-autoencoder contract (it still gets the
model from `load_autoencoder`) while training directly on [-1, 1] pixels. No weights: it is named by
the spec `identity:CxR` (C image channels, R the nominal resolution), e.g. `--model.autoencoder
identity:1x32` for 32² MNIST; `load_autoencoder` builds it, and its content hash covers the spec.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ldm_lightning.finite import check_finite_fields
from ldm_lightning.autoencoder.distributions import PointPosterior

SPEC_PREFIX = "identity:"


@dataclass
class IdentityConfig:
    """The pixel 'latent space' an identity autoencoder stands for."""

    in_channels: int = 3
    """Image channels (= latent channels)."""
    resolution: int = 256
    """Nominal image side (the DiT's default input_size, the validation sample size)."""

    def __post_init__(self):
        check_finite_fields(self, "identity")  # NaN/inf pass every comparison below
        if self.in_channels < 1 or self.resolution < 1:
            raise ValueError(f"identity autoencoder: in_channels and resolution must be >= 1, got "
                             f"{self.in_channels}, {self.resolution}")

    def to_dict(self) -> dict:
        return {"kind": "identity", **asdict(self)}


def parse_identity_spec(spec: str) -> IdentityConfig | None:
    """'identity:1x32' -> IdentityConfig(1, 32); None when `spec` is not an identity spec."""
    if not str(spec).startswith(SPEC_PREFIX):
        return None
    m = re.fullmatch(r"identity:(\d+)x(\d+)", str(spec))
    if not m:
        raise ValueError(f"autoencoder {spec!r}: an identity autoencoder is named identity:CxR (image channels x "
                         "resolution), e.g. identity:1x32 for MNIST or identity:3x256")
    return IdentityConfig(int(m.group(1)), int(m.group(2)))


class IdentityAutoencoder(nn.Module):
    """encode = point posterior at x, decode = identity; scale 1, shift 0 (pixels are already in [-1, 1])."""

    def __init__(self, config: IdentityConfig):
        super().__init__()
        self.config = config
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.register_buffer("shift_factor", torch.tensor(0.0))

    @property
    def latent_channels(self) -> int:
        return self.config.in_channels

    @property
    def downsample_factor(self) -> int:
        return 1

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> PointPosterior:
        return PointPosterior(x)  # (B, C, H, W)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def normalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift_factor) * self.scale_factor  # the Autoencoder's, with scale 1 and shift 0

    def denormalize_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale_factor + self.shift_factor

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        return x, self.encode(x)
