"""Representation autoencoder (RAE; Zheng, Ma, Tong & Xie 2025, "Diffusion Transformers with
Representation Autoencoders", arXiv 2510.11690): a FROZEN pretrained representation encoder and a
trained ViT decoder.

- `RepresentationEncoder`: the project's frozen DINOv2 (`encoders/dinov2.py`), read from a local folder
  (never downloaded). Images in [-1, 1] get ImageNet normalisation (grey images are repeated to RGB); the patch
  tokens (CLS dropped) form the latent grid (B, D, H/p, W/p): f = patch size, latent width = hidden size.
  Latent normalisation: each channel is standardised with its mean / std over the training data
  (`rep_mean`, `rep_std`, measured once before training by the latent-statistics callback), as RAE does
  before diffusion.
- `ViTDecoder`: tokens -> linear -> pre-norm Transformer blocks -> linear to p*p*C pixels per patch.
- Noise-augmented decoder training (the paper's fix for a decoder that must read slightly-off diffusion
  samples) is `Autoencoder.forward`'s: z + |n| * eps, n ~ N(0, tau^2) per sample, in training only.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.encoders.dinov2 import DINOv2


def read_encoder_config(path: str) -> dict:
    """config.json of a Hugging Face DINOv2 folder, with an error that names the field and the fix."""
    import json
    cfg_file = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"autoencoder.rae_encoder={path!r} is not a Hugging Face model folder (no "
                                "config.json); point it at a local DINOv2 folder (save_pretrained output)")
    cfg = json.loads(open(cfg_file).read())
    if cfg.get("model_type") != "dinov2":
        raise ValueError(f"autoencoder.rae_encoder={path!r} holds model_type {cfg.get('model_type')!r}; "
                         "supported: 'dinov2'")
    return cfg


class RepresentationEncoder(DINOv2):
    """Frozen DINOv2 (encoders/dinov2.py): x (B, C, H, W) in [-1, 1] -> normalised patch grid (B, D, H/p, W/p)."""

    def __init__(self, encoder_config: dict, path: str | None, in_channels: int):
        path = os.path.expanduser(path) if path else None
        if path and os.path.isfile(os.path.join(path, "config.json")):
            super().__init__(path=path)
        else:  # rebuilt from the recorded config; the weights come with the autoencoder's state dict
            super().__init__(config=encoder_config)
        if in_channels not in (1, self.channels):
            raise ValueError(f"autoencoder.in_channels={in_channels} cannot feed a representation encoder with "
                             f"{self.channels} input channels; use {self.channels} (or 1: grey is repeated)")
        self.register_buffer("rep_mean", torch.zeros(self.dim))
        self.register_buffer("rep_std", torch.ones(self.dim))

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (un-normalised) patch tokens as a grid (B, D, H/p, W/p)."""
        return self.patch_grid((x.float() + 1) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)                                     # (B, D, h, w)
        return (h - self.rep_mean.view(1, -1, 1, 1)) / self.rep_std.view(1, -1, 1, 1)


class ViTDecoder(nn.Module):
    """z (B, D, h, w) -> (B, out_ch, h*p, w*p): a plain pre-norm ViT over the h*w tokens."""

    def __init__(self, in_dim: int, width: int, depth: int, heads: int, patch: int, out_ch: int, grid: int):
        super().__init__()
        self.patch, self.out_ch, self.grid = patch, out_ch, grid
        self.proj_in = nn.Linear(in_dim, width)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.conv_out = nn.Linear(width, patch * patch * out_ch)  # named as the conv decoders' last layer

    def _pos(self, h: int, w: int) -> torch.Tensor:
        if h == w == self.grid:
            return self.pos
        g = self.pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)  # (1, width, g, g)
        g = F.interpolate(g, size=(h, w), mode="bicubic", align_corners=False)
        return g.flatten(2).transpose(1, 2)                      # (1, h*w, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, D, h, w = z.shape
        t = self.proj_in(z.flatten(2).transpose(1, 2)) + self._pos(h, w)  # (B, N, width)
        t = self.conv_out(self.norm(self.blocks(t)))             # (B, N, p*p*C)
        p, C = self.patch, self.out_ch
        x = t.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return x.reshape(B, C, h * p, w * p)


def decoder_grid(resolution: int, patch: int) -> int:
    return max(1, math.ceil(resolution / patch))
