"""Stable Diffusion's UNet as diffusers lays it out (`UNet2DConditionModel`, SD 1.x / 2.x): `SDUNet`.

Our `unet.py` is a smaller CompVis-style UNet (scale-shift time embedding, one head width, linear projections);
published SD weights do not fit it. This network is the SD architecture family itself, written here:
- ResnetBlock2D: GroupNorm-SiLU-conv, + Linear(SiLU(temb)) added per channel, GroupNorm-SiLU-conv, 1x1 shortcut
  where the width changes;
- Transformer2DModel: GroupNorm(eps 1e-6), proj_in (1x1 conv, or Linear with `use_linear_projection`, SD 2.x),
  blocks of LayerNorm + self-attention, LayerNorm + cross-attention to `context`, LayerNorm + GEGLU MLP (x4),
  proj_out, residual;
- CrossAttnDownBlock2D / DownBlock2D (resnets [+ transformers], a stride-2 conv except at the last level), a
  UNetMidBlock2DCrossAttn (resnet, transformer, resnet), CrossAttnUpBlock2D / UpBlock2D (one resnet more than the
  down path, each on the concatenated skip, then nearest x2 + conv except at the last level);
- the sinusoidal timestep features of width block_out_channels[0] (`flip_sin_to_cos`, `freq_shift`), a 2-layer
  MLP to 4x that width, plus an optional class embedding (diffusers' `num_class_embeds`).
Module names are diffusers' own (down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, ...), so importing
and exporting weights is a renaming-free copy (diffusion/sd_interop.py) and checkpoints read like SD's.
Not built (refused at import, sd_interop.py): SDXL's `addition_embed_type` (pooled text + size ids), other
class-embedding types, dual / only cross-attention, scale-shift time embedding, upcast_softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_lightning.finite import check_finite_fields

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass
class SDUNetConfig:
    """UNet2DConditionModel hyper-parameters, under diffusers' names where the field is theirs (defaults: SD 1.5)."""

    in_channels: int = 4
    """Latent channels in."""
    out_channels: int | None = None
    """Channels out; None = in_channels."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    """Channels of each level; each level but the last halves the resolution."""
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    """Per level: 'CrossAttnDownBlock2D' (resnets + transformers) or 'DownBlock2D' (resnets only)."""
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    """Per level from the deepest: 'CrossAttnUpBlock2D' or 'UpBlock2D'."""
    layers_per_block: int = 2
    """Resnets per down level (up levels have one more)."""
    attention_head_dim: int | tuple[int, ...] = 8
    """NUMBER OF HEADS per level, despite the name (diffusers passes it as the head count: SD 1.x's 8 means 8
    heads of 40..160 channels; SD 2.x's (5, 10, 20, 20) means 64-channel heads). The middle block uses the last."""
    transformer_layers_per_block: int | tuple[int, ...] = 1
    """Transformer blocks per Transformer2DModel, one number or one per level."""
    context_dim: int | None = 768
    """diffusers' cross_attention_dim: width of the text tokens (filled from the text encoder in a run)."""
    use_linear_projection: bool = False
    """proj_in / proj_out as Linear (SD 2.x) instead of 1x1 convolutions (SD 1.x)."""
    upcast_attention: bool = False
    """Attention in fp32 under mixed precision (SD 2.1 overflows in fp16 otherwise)."""
    flip_sin_to_cos: bool = True
    """Timestep features as [cos, sin] (SD) instead of [sin, cos]."""
    freq_shift: int = 0
    """Timestep frequencies exp(-ln(1e4) i / (half - freq_shift)); SD: 0."""
    norm_num_groups: int = 32
    """GroupNorm groups; must divide every level's channels."""
    norm_eps: float = 1e-5
    """GroupNorm eps of the resnets and the output norm (the transformers' GroupNorm has 1e-6, as diffusers)."""
    num_classes: int | None = None
    """Class conditioning: a table of num_classes + 1 rows added to the time embedding (the last row = the null
    class); diffusers' num_class_embeds = num_classes + 1."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""

    def __post_init__(self):
        check_finite_fields(self, "sd_unet")
        n = len(self.block_out_channels)
        self.block_out_channels = tuple(self.block_out_channels)
        self.down_block_types, self.up_block_types = tuple(self.down_block_types), tuple(self.up_block_types)
        for name in ("attention_head_dim", "transformer_layers_per_block"):
            v = getattr(self, name)
            v = tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n
            if len(v) != n:
                raise ValueError(f"sd_unet.{name} lists {len(v)} values for {n} levels (block_out_channels)")
            setattr(self, name, v)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"sd_unet: down_block_types and up_block_types need one entry per level ({n})")
        bad = [t for t in self.down_block_types if t not in DOWN_TYPES] + \
              [t for t in self.up_block_types if t not in UP_TYPES]
        if bad:
            raise ValueError(f"sd_unet: block types {bad} are not built here; use {DOWN_TYPES} / {UP_TYPES}")
        for ch, heads in zip(self.block_out_channels, self.attention_head_dim):
            if ch % self.norm_num_groups or ch % heads:
                raise ValueError(f"sd_unet: level width {ch} must be divisible by norm_num_groups="
                                 f"{self.norm_num_groups} and its head count {heads} (attention_head_dim)")
        if self.context_dim is None:
            raise ValueError("sd_unet: context_dim (cross_attention_dim) is required: SD's transformers "
                             "cross-attend to text tokens (use conditioning.kind: text)")

    @property
    def level_heads(self) -> tuple[int, ...]:
        """Attention heads per level (attention_head_dim is a head count; see its docstring)."""
        return self.attention_head_dim


def timestep_features(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) sinusoids at frequencies exp(-ln(1e4) i / (dim/2 - freq_shift)), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin: int, cout: int, temb_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, cout, H, W)
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # the time embedding added per channel
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention with separate bias-free q/k/v (SD's), `context` for cross-attention."""

    def __init__(self, dim: int, heads: int, context_dim: int | None, upcast: bool):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        kv_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k, self.to_v = nn.Linear(kv_dim, dim, bias=False), nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])  # index 1: diffusers' dropout slot

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        B, L, D = x.shape
        split = lambda z: z.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731 (B, h, L, d)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, Lk): True = attend
        if self.upcast:  # fp32 scores and softmax even under autocast (which would cast sdpa's inputs back down)
            with torch.autocast(q.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, L, d)
        out = out.to(x.dtype)
        return self.to_out[0](out.transpose(1, 2).reshape(B, L, D))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, None, upcast)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, upcast)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)

    def forward(self, x, context, mask=None):
        x = x + self.attn1(self.norm1(x))  # (B, HW, C)
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, ch: int, heads: int, depth: int, cfg: SDUNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(ch, heads, cfg.context_dim, cfg.upcast_attention)
                                                for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch) if self.linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:  # SD 1.x: 1x1 convolutions on the feature map
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.linear:  # SD 2.x: the same map as a Linear on tokens
            h = self.proj_in(h)
        for blk in self.transformer_blocks:
            h = blk(h, context, mask)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Resample(nn.Module):
    """A stride-2 conv (down) or nearest x2 + conv (up); `conv` as diffusers names it."""

    def __init__(self, ch: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNetBlock(nn.Module):
    """One level of the down or up path: resnets, a transformer after each (cross-attention types), a resampler.
    The up path's resnets take the skip from the down path concatenated to their input."""

    def __init__(self, widths: list[tuple[int, int]], attention: bool, heads: int, depth: int, resample: str | None,
                 temb_dim: int, cfg: SDUNetConfig):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock2D(cin, cout, temb_dim, g, eps) for cin, cout in widths)
        self.attentions = nn.ModuleList(Transformer2DModel(cout, heads, depth, cfg) for _, cout in widths) \
            if attention else None
        ch = widths[-1][1]
        if resample == "down":
            self.downsamplers = nn.ModuleList([Resample(ch, up=False)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Resample(ch, up=True)])
        self.resample = resample

    def forward(self, h, temb, context, mask, skips: tuple = ()):
        """-> (h, the outputs the up path takes as skips). `skips` (up path): one per resnet in down-path order,
        resnet i taking skips[-1 - i] (the latest first); passed in, not popped here, so a checkpointed block
        recomputes the same in backward."""
        outputs = []
        for i, resnet in enumerate(self.resnets):
            if skips:  # up path: the latest skip joins the input
                h = torch.cat([h, skips[-1 - i]], dim=1)
            h = resnet(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context, mask)
            outputs.append(h)
        if self.resample == "down":
            h = self.downsamplers[0](h)
            outputs.append(h)
        elif self.resample == "up":
            h = self.upsamplers[0](h)
        return h, tuple(outputs)


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, ch: int, heads: int, depth: int, temb_dim: int, cfg: SDUNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb_dim, cfg.norm_num_groups, cfg.norm_eps)
                                     for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, depth, cfg)])

    def forward(self, h, temb, context, mask):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context, mask), temb)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class SDUNet(nn.Module):
    def __init__(self, cfg: SDUNetConfig):
        super().__init__()
        self.cfg = cfg
        chans, L = cfg.block_out_channels, cfg.layers_per_block
        temb_dim = 4 * chans[0]
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        n, heads, depth = len(chans), cfg.level_heads, cfg.transformer_layers_per_block
        self.down_blocks, skips, ch = nn.ModuleList(), [chans[0]], chans[0]
        for i, kind in enumerate(cfg.down_block_types):
            widths = [(ch if j == 0 else chans[i], chans[i]) for j in range(L)]
            ch = chans[i]
            skips += [ch] * (L + (i < n - 1))  # each resnet's output, and the downsampler's
            self.down_blocks.append(UNetBlock(widths, kind == DOWN_TYPES[0], heads[i], depth[i],
                                              "down" if i < n - 1 else None, temb_dim, cfg))
        self.mid_block = UNetMidBlock2DCrossAttn(ch, heads[-1], depth[-1], temb_dim, cfg)
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i  # up blocks run from the deepest level
            widths = []
            for _ in range(L + 1):
                widths.append((ch + skips.pop(), chans[level]))
                ch = chans[level]
            self.up_blocks.append(UNetBlock(widths, kind == UP_TYPES[0], heads[level], depth[level],
                                            "up" if level > 0 else None, temb_dim, cfg))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels or cfg.in_channels, 3, padding=1)

    def _run(self, block: nn.Module, *args):
        if self.cfg.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); t (B,) float timesteps; y (B,) int64 (num_classes = null); context (B, L, context_dim);
        context_mask (B, L) bool, True = a real token (None: attend to all, SD's convention)."""
        f = 2 ** (len(self.cfg.block_out_channels) - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"SDUNet input {tuple(x.shape)}: H and W must be divisible by {f} (one halving per "
                             "level but the last)")
        if context is None:
            raise ValueError(f"SDUNet cross-attends to text: pass context (B, L, {self.cfg.context_dim})")
        temb = self.time_embedding(timestep_features(t, self.cfg.block_out_channels[0], self.cfg.flip_sin_to_cos,
                                                     self.cfg.freq_shift).to(x.dtype))  # (B, 4 C0)
        if self.class_embedding is not None:
            if y is None:
                raise ValueError("this SDUNet is class-conditional: pass y (index num_classes for 'no class')")
            temb = temb + self.class_embedding(y).to(temb.dtype)
        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks:
            h, outs = self._run(block, h, temb, context, context_mask)
            skips += outs
        h = self._run(self.mid_block, h, temb, context, context_mask)  # (B, C_last, H/f, W/f)
        for block in self.up_blocks:
            n = len(block.resnets)
            h, _ = self._run(block, h, temb, context, context_mask, tuple(skips[-n:]))
            del skips[-n:]
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)
