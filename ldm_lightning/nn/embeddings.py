"""Fixed sinusoidal embeddings: timesteps (DDPM / Transformer) and 2-D patch positions (MAE / DiT)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DiT `TimestepEmbedder`.

    t: (B,) float tensor (a VP index 0..T-1, or 1000*t for rectified flow). Returns (B, dim) float32:
    [cos(t * f_0..f_{dim/2-1}), sin(...)], f_i = max_period^(-i / (dim/2 - freq_shift)). freq_shift 0 is
    facebookresearch/DiT's; 1 is diffusers' `Timesteps(downscale_freq_shift=1)`, which its DiT port uses.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)  # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> 2-layer SiLU MLP (DiT `TimestepEmbedder`, LDM `time_embed`)."""

    def __init__(self, out_dim: int, freq_dim: int = 256, freq_shift: int = 0):
        super().__init__()
        self.freq_dim, self.freq_shift = freq_dim, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, out_dim)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) = [sin(pos * w), cos(pos * w)], w_i = 1 / 10000^(2i/dim) (MAE convention)."""
    if dim % 2:
        raise ValueError(f"sin-cos position embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))  # (dim/2,)
    out = pos.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (N, dim)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE `get_2d_sincos_pos_embed`, used by DiT).

    Returns (grid_h * grid_w, dim) float32, tokens in row-major order; half of the channels encode
    the column (w) index, half the row (h) index, as in the reference implementation.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh, gw = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")  # (H, W) each
    emb_w = sincos_1d(dim // 2, gw.reshape(-1))  # (H*W, dim/2)
    emb_h = sincos_1d(dim // 2, gh.reshape(-1))  # (H*W, dim/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (H*W, dim)
