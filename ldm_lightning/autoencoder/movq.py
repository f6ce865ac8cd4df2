"""MoVQ decoder (Zheng et al. 2022, "MoVQ: Modulating Quantized Vectors for High-Fidelity Image Generation",
arXiv 2209.09002).

A VQ decoder sees the same code vector wherever that code occurs, so neighbouring patches that share a
code decode alike ("repeated artifacts"). MoVQ's spatially-conditional normalisation fixes it: every
GroupNorm of the decoder becomes `SpatialNorm`, whose per-pixel scale and shift are predicted (1x1 convs)
from the quantised latent z_q, resized nearest to the feature map. The decoder therefore reads z_q twice:
through `conv_in` as usual and, at every block, as a modulation of the normalised features.

The block layout and parameter names are kl.py's `Decoder` (CompVis), with `norm*` replaced; the
multichannel quantisation MoVQ pairs it with is `VectorQuantizer(heads=...)` (vq.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.autoencoder.kl import Upsample


class SpatialNorm(nn.Module):
    """GroupNorm(f) * conv_y(z_q) + conv_b(z_q), z_q resized (nearest) to f's size (MoVQ eq. 5)."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        # No affine of its own: the per-pixel scale/shift from z_q take its place.
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=False)
        self.conv_y = nn.Conv2d(zq_channels, channels, 1)
        self.conv_b = nn.Conv2d(zq_channels, channels, 1)
        # Start as a plain GroupNorm (scale 1, shift 0) so early training matches the VQGAN decoder.
        nn.init.zeros_(self.conv_y.weight)
        nn.init.ones_(self.conv_y.bias)
        nn.init.zeros_(self.conv_b.weight)
        nn.init.zeros_(self.conv_b.bias)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")  # (B, e, H, W)
        return self.norm(f) * self.conv_y(zq) + self.conv_b(zq)    # (B, C, H, W)


class SpatialResnetBlock(nn.Module):
    """kl.py's ResnetBlock with both norms spatially conditioned on z_q."""

    def __init__(self, in_channels: int, out_channels: int, zq_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = SpatialNorm(in_channels, zq_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = SpatialNorm(out_channels, zq_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))                # (B, Co, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h, zq))))  # (B, Co, H, W)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class SpatialAttnBlock(nn.Module):
    """kl.py's single-head AttnBlock with a spatially-conditioned norm."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        self.norm = SpatialNorm(channels, zq_channels, groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x, zq)
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3)    # (B, 1, HW, C)
                   for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class _Level(nn.Module):
    """One resolution level: `block`, `attn` (possibly empty), optional `upsample`."""


class MoVQDecoder(nn.Module):
    """(h (B, z_channels, h, w), z_q (B, zq_channels, h, w)) -> (B, out_ch, h*f, w*f)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 out_ch: int, resolution: int, z_channels: int, zq_channels: int, groups: int,
                 dropout: float = 0.0, mid_attn: bool = True):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = SpatialResnetBlock(block_in, block_in, zq_channels, groups, dropout)
        self.mid.attn_1 = SpatialAttnBlock(block_in, zq_channels, groups) if mid_attn else None
        self.mid.block_2 = SpatialResnetBlock(block_in, block_in, zq_channels, groups, dropout)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(SpatialResnetBlock(block_in, block_out, zq_channels, groups, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(SpatialAttnBlock(block_in, zq_channels, groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = SpatialNorm(block_in, zq_channels, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)                                      # (B, C, h, w)
        h = self.mid.block_1(h, zq)
        if self.mid.attn_1 is not None:
            h = self.mid.attn_1(h, zq)
        h = self.mid.block_2(h, zq)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h, zq)
                if len(level.attn):
                    h = level.attn[j](h, zq)
            if hasattr(level, "upsample"):
                h = level.upsample(h)                            # (B, C, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h, zq)))       # (B, out_ch, H, W)
