"""The convolutional encoder/decoder of LDM / Stable Diffusion (Rombach et al. 2022, arXiv 2112.10752;
CompVis `ldm/modules/diffusionmodules/model.py`), re-written compactly.

Parameter names follow CompVis exactly (`encoder.down.0.block.1.norm1`, `mid.attn_1.q`, ...), so an
SD / LDM first-stage state dict loads with no renaming, and diffusers' `AutoencoderKL` is a fixed
key mapping (see interop.py). Attention is single-head over all pixels through
`scaled_dot_product_attention` (flash / memory-efficient kernels where available).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def Normalize(channels: int, groups: int) -> nn.GroupNorm:
    # eps=1e-6 as in CompVis/diffusers; changing it would break weight compatibility numerically.
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                    # (B, Co, H, W)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))      # (B, Co, H, W)
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (1x1 conv projections, as in CompVis)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = Normalize(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(2, 3)    # (B, 1, HW, C)
                   for t in (self.q(h), self.k(h), self.v(h)))
        h = F.scaled_dot_product_attention(q, k, v)              # (B, 1, HW, C)
        h = h.transpose(2, 3).reshape(B, C, H, W)                # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric (0, 1, 0, 1) pad: the CompVis/diffusers convention."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))                 # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, possibly empty)."""


def _mid(channels: int, groups: int, dropout: float, attn: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, groups, dropout)
    mid.attn_1 = AttnBlock(channels, groups) if attn else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, groups, dropout)
    return mid


class Encoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, z_channels * (2 if double_z else 1), H/f, W/f), f = 2^(L-1)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 in_channels: int, resolution: int, z_channels: int, double_z: bool, groups: int,
                 dropout: float = 0.0, mid_attn: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        res = resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, groups, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups))
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = _mid(block_in, groups, dropout, mid_attn)
        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                      # (B, ch, H, W)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)                          # (B, C, H/2, W/2)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))           # (B, 2z, H/f, W/f)


class Decoder(nn.Module):
    """z (B, z_channels, h, w) -> (B, out_ch, h*f, w*f). `up[i]` is level i (CompVis order), run last-to-first."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_resolutions: tuple[int, ...],
                 out_ch: int, resolution: int, z_channels: int, groups: int, dropout: float = 0.0,
                 mid_attn: bool = True):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, groups, dropout, mid_attn)
        up = []
        for i in reversed(range(len(ch_mult))):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, groups, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in, groups))
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)                                      # (B, C, h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)                            # (B, C, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))           # (B, out_ch, H, W)
