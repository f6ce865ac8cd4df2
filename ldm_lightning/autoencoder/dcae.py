"""Deep-compression autoencoder in the spirit of DC-AE (Chen et al. 2024, arXiv 2410.10733).

At high spatial compression (f = 32, 64) a plain conv autoencoder is hard to optimise: DC-AE reports
rFID 0.90 -> 28.3 going from f8 to f64 naively. Its fix is *residual autoencoding*: every resolution
change gets a parameter-free shortcut that moves information between space and channels, and the
learned block only has to model a residual on top of it:

- down: `space_to_channel(x)` = pixel_unshuffle(x, 2) (C -> 4C channels at half resolution), then
  average groups of 4C/C_out adjacent channels down to the output width;
- up:   `channel_to_space(x)` = repeat each channel 4C_out/C times, then pixel_shuffle(·, 2);
- the same non-spatial average / repeat shortcuts wrap the encoder's output and decoder's input conv.

Blocks are the CompVis ResnetBlock / AttnBlock (kl.py); attention at the coarsest levels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.autoencoder.kl import AttnBlock, Normalize, ResnetBlock


def channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, out_channels, H, W) by averaging groups of C / out_channels adjacent channels."""
    B, C, H, W = x.shape
    return x.reshape(B, out_channels, C // out_channels, H, W).mean(2)


def channel_repeat(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, out_channels, H, W), each channel repeated out_channels / C times."""
    return x.repeat_interleave(out_channels // x.shape[1], dim=1)


def space_to_channel(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    return channel_average(F.pixel_unshuffle(x, 2), out_channels)  # (B, Co, H/2, W/2)


def channel_to_space(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    return F.pixel_shuffle(channel_repeat(x, 4 * out_channels), 2)  # (B, Co, 2H, 2W)


class DownShortcut(nn.Module):
    """Learned conv + pixel_unshuffle, plus the space-to-channel shortcut."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True):
        super().__init__()
        if (4 * in_channels) % out_channels:
            raise ValueError(f"dcae: 4*{in_channels} must be divisible by the next width {out_channels} "
                             "(adjust autoencoder.ch_mult)")
        self.out_channels, self.shortcut = out_channels, shortcut
        self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_unshuffle(self.conv(x), 2)                   # (B, Co, H/2, W/2)
        return h + space_to_channel(x, self.out_channels) if self.shortcut else h


class UpShortcut(nn.Module):
    """Learned conv + pixel_shuffle, plus the channel-to-space shortcut."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True):
        super().__init__()
        if (4 * out_channels) % in_channels:
            raise ValueError(f"dcae: 4*{out_channels} must be divisible by the previous width {in_channels} "
                             "(adjust autoencoder.ch_mult)")
        self.out_channels, self.shortcut = out_channels, shortcut
        self.conv = nn.Conv2d(in_channels, out_channels * 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.pixel_shuffle(self.conv(x), 2)                     # (B, Co, 2H, 2W)
        return h + channel_to_space(x, self.out_channels) if self.shortcut else h


def _stage(width: int, n: int, attn: bool, groups: int, dropout: float) -> nn.Sequential:
    layers = []
    for _ in range(n):
        layers.append(ResnetBlock(width, width, groups, dropout))
        if attn:
            layers.append(AttnBlock(width, groups))
    return nn.Sequential(*layers)


class DCEncoder(nn.Module):
    """x (B, in_channels, H, W) -> (B, z_out, H/f, W/f), f = 2^(len(ch_mult)-1)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_levels: tuple[int, ...],
                 in_channels: int, z_out: int, groups: int, dropout: float = 0.0, shortcut: bool = True):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        if widths[-1] % z_out:
            raise ValueError(f"dcae: last width {widths[-1]} must be divisible by the latent width {z_out}")
        self.z_out, self.shortcut = z_out, shortcut
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList(_stage(w, num_res_blocks, i in attn_levels, groups, dropout)
                                    for i, w in enumerate(widths))
        self.downs = nn.ModuleList(DownShortcut(widths[i], widths[i + 1], shortcut) for i in range(len(widths) - 1))
        self.norm_out = Normalize(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                                      # (B, w0, H, W)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.downs):
                h = self.downs[i](h)                             # (B, w_{i+1}, H/2^(i+1), W/2^(i+1))
        out = self.conv_out(F.silu(self.norm_out(h)))            # (B, z_out, H/f, W/f)
        return out + channel_average(h, self.z_out) if self.shortcut else out


class DCDecoder(nn.Module):
    """z (B, z_channels, h, w) -> (B, out_ch, h*f, w*f)."""

    def __init__(self, *, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, attn_levels: tuple[int, ...],
                 out_ch: int, z_channels: int, groups: int, dropout: float = 0.0, shortcut: bool = True):
        super().__init__()
        widths = [ch * m for m in ch_mult]
        if widths[-1] % z_channels:
            raise ValueError(f"dcae: last width {widths[-1]} must be divisible by z_channels {z_channels}")
        self.shortcut, self.width = shortcut, widths[-1]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], 3, padding=1)
        # stages[i] runs at level i (widths[i]); ups[i] goes from level i+1 to level i.
        self.stages = nn.ModuleList(_stage(w, num_res_blocks + 1, i in attn_levels, groups, dropout)
                                    for i, w in enumerate(widths))
        self.ups = nn.ModuleList(UpShortcut(widths[i + 1], widths[i], shortcut) for i in range(len(widths) - 1))
        self.norm_out = Normalize(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)                                      # (B, wL, h, w)
        if self.shortcut:
            h = h + channel_repeat(z, self.width)
        for i in reversed(range(len(self.stages))):
            h = self.stages[i](h)
            if i > 0:
                h = self.ups[i - 1](h)                           # (B, w_{i-1}, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))           # (B, out_ch, H, W)
