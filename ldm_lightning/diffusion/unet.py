"""LDM / Stable Diffusion UNet with cross-attention (Rombach et al. 2022; CompVis `openaimodel.py`).

ResBlocks take the timestep (+ class) embedding through scale-shift GroupNorm (Dhariwal & Nichol 2021
"AdaGN"); SpatialTransformer blocks do self-attention, cross-attention to `context` and a GEGLU
feed-forward. Every residual branch's last layer and the output conv start at zero, so the network
outputs exactly 0 at init and each block starts as the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_lightning.finite import check_finite_fields
from ldm_lightning.diffusion.concat import join_concat
from ldm_lightning.diffusion.text_transformer import build_text_transformer, text_context
from ldm_lightning.nn.attention import Attention
from ldm_lightning.nn.embeddings import TimestepEmbedder


@dataclass
class UNetConfig:
    """UNet hyper-parameters (defaults = preset 'unet-tiny': 3.9 M parameters, for 8x8x4 latents)."""

    in_channels: int = 4
    """Latent channels in."""
    out_channels: int | None = None
    """Channels out; None = in_channels."""
    concat_channels: int = 0
    """Extra input channels joined to x (`c_concat`: a low-res image, a masked image + mask; LDM §3.3)."""
    model_channels: int = 64
    """Channels at the first level."""
    channel_mult: tuple[int, ...] = (1, 2)
    """Per-level multiplier of model_channels; each level after the first halves the resolution."""
    num_res_blocks: int = 1
    """ResBlocks per level (the decoder has one more, as in LDM)."""
    attention_levels: tuple[int, ...] = (1,)
    """Level indices (0-based) that get a SpatialTransformer after each ResBlock; the middle always has one."""
    head_dim: int = 32
    """Channels per attention head (heads = channels // head_dim)."""
    transformer_depth: int = 1
    """Transformer blocks per SpatialTransformer."""
    context_dim: int | None = None
    """Width of text tokens for cross-attention; None = no cross-attention."""
    num_classes: int | None = None
    """Class conditioning: embedding table of num_classes + 1 rows (last = null class)."""
    pooled_dim: int | None = None
    """Width of a pooled text vector added to the time embedding through Linear-SiLU-Linear (SDXL's
    `add_embedding` of CLIP-G's pooled vector); None = no such input (and no extra layer)."""
    text_transformer: dict | None = None
    """A trainable text transformer τθ inside the UNet (LDM §4.3; diffusion/text_transformer.py fields); forward
    then takes `context_ids` (B, L) token ids. None = context comes from frozen encoders."""
    norm_groups: int = 32
    """GroupNorm groups; must divide every level's channels."""
    dropout: float = 0.0
    """Dropout inside ResBlocks."""
    qk_norm: bool = False
    """RMSNorm on queries and keys."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""

    def __post_init__(self):
        check_finite_fields(self, "unet")  # NaN/inf pass every comparison below
        self.channel_mult = tuple(self.channel_mult)
        self.attention_levels = tuple(self.attention_levels)
        if not self.channel_mult:
            raise ValueError("unet.channel_mult must list at least one level")
        bad = [lv for lv in self.attention_levels if not 0 <= lv < len(self.channel_mult)]
        if bad:
            raise ValueError(f"unet.attention_levels {bad} out of range 0..{len(self.channel_mult) - 1}")
        for m in self.channel_mult:
            c = self.model_channels * m
            if c % self.norm_groups or c % self.head_dim:
                raise ValueError(f"unet.model_channels*channel_mult = {c} must be divisible by "
                                 f"unet.norm_groups={self.norm_groups} and unet.head_dim={self.head_dim}")


def zero(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.drop = nn.GroupNorm(groups, cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb, context=None, mask=None):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, cout, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))  # (B, cout, H, W)


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020), as SD's transformer blocks."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj, self.out = nn.Linear(dim, 2 * mult * dim), nn.Linear(mult * dim, dim)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)  # (B, L, mult*dim) each
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None, qk_norm: bool):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, qk_norm=qk_norm)
        self.attn2 = Attention(dim, heads, context_dim, qk_norm) if context_dim else None
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.norm3, self.ff = nn.LayerNorm(dim), GEGLU(dim)

    def forward(self, x, context=None, mask=None):
        x = x + self.attn1(self.norm1(x))  # (B, HW, C)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, ch)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, ch // cfg.head_dim, cfg.context_dim, cfg.qk_norm)
                                    for _ in range(cfg.transformer_depth))
        self.proj_out = zero(nn.Linear(ch, ch))

    def forward(self, x, emb=None, context=None, mask=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B, HW, C)
        for blk in self.blocks:
            h = blk(h, context, mask)
        return x + self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None, mask=None):
        return self.conv(x)  # (B, C, H/2, W/2)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, context=None, mask=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Stage(nn.ModuleList):
    """A sequence of layers that all take (x, emb, context, mask)."""

    def forward(self, x, emb, context, mask):
        for layer in self:
            x = layer(x, emb, context, mask)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * mc
        self.time_embed = TimestepEmbedder(emb_dim, freq_dim=mc)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        # SDXL's add_embedding; only when configured, so older checkpoints load
        self.pooled_embed = (nn.Sequential(nn.Linear(cfg.pooled_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                             if cfg.pooled_dim else None)
        self.text_transformer = build_text_transformer(cfg.text_transformer)  # τθ, trained with the UNet (or None)
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, mc, 3, padding=1)
        res = lambda cin, cout: ResBlock(cin, cout, emb_dim, groups, cfg.dropout)  # noqa: E731

        self.down, skips, ch = nn.ModuleList(), [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [res(ch, mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                self.down.append(Stage(layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Stage([Down(ch)]))
                skips.append(ch)
        self.mid = Stage([res(ch, ch), SpatialTransformer(ch, cfg), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(ch + skips.pop(), mc * mult)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg))
                if level and i == cfg.num_res_blocks:
                    layers.append(Up(ch))
                self.up.append(Stage(layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(),
                                 zero(nn.Conv2d(ch, cfg.out_channels or cfg.in_channels, 3, padding=1)))

    def _run(self, stage: Stage, *args):
        if self.cfg.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, *args, use_reentrant=False)
        return stage(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                c_concat: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                context_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); t (B,) float; y (B,) int64 (num_classes = null); context (B, L, D); mask (B, L);
        c_concat (B, concat_channels, H, W); pooled (B, pooled_dim); context_ids (B, L) int64 for τθ."""
        context = text_context(self.text_transformer, context, context_ids, context_mask)
        x = join_concat(x, c_concat, self.cfg.concat_channels, "UNet")  # (B, C + C_cat, H, W)
        f = 2 ** (len(self.cfg.channel_mult) - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"UNet input {tuple(x.shape)}: H and W must be divisible by {f} "
                             f"(one halving per level after the first in unet.channel_mult)")
        emb = self.time_embed(t)  # (B, 4*mc)
        if self.class_embed is not None:
            if y is None:
                raise ValueError("this UNet is class-conditional: pass y (use index num_classes for 'no class')")
            emb = emb + self.class_embed(y)
        if self.pooled_embed is not None:
            if pooled is None:
                raise ValueError(f"this UNet takes a pooled text vector (pooled_dim set): pass pooled "
                                 f"(B, {self.cfg.pooled_dim})")
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))
        if self.cfg.context_dim and context is None:
            raise ValueError("this UNet has cross-attention (context_dim set): pass context (B, L, context_dim)")
        h = self.conv_in(x)  # (B, mc, H, W)
        hs = [h]
        for stage in self.down:
            h = self._run(stage, h, emb, context, context_mask)
            hs.append(h)
        h = self._run(self.mid, h, emb, context, context_mask)  # (B, ch, H/2^k, W/2^k)
        for stage in self.up:
            h = self._run(stage, torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
        return self.out(h)  # (B, out_channels, H, W)
