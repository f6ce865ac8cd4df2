"""DiT: a ViT over latent patches with AdaLN-Zero conditioning (Peebles & Xie 2023; facebookresearch/DiT
`models.py`).

The timestep (+ class) embedding c regresses per-block shift/scale/gate vectors; the modulation MLPs
and the final layer start at zero, so every block is the identity and the output is 0 at init.
A pooled text vector (optional, `pooled_dim`: SD3's CLIP pooled vector) goes through Linear-SiLU-Linear and
is added to c, next to the timestep. Text conditioning (optional): 'cross_attn' adds a cross-attention sub-block after self-attention in
each block (PixArt-alpha), its output projection zero-initialised to keep the identity at init;
'in_context' appends projected text tokens to the sequence (DiT §3.2 "in-context conditioning").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields
from ldm_lightning.diffusion.concat import join_concat
from ldm_lightning.diffusion.text_transformer import build_text_transformer, text_context
from ldm_lightning.nn.attention import Attention
from ldm_lightning.nn.embeddings import TimestepEmbedder, sincos_2d
from ldm_lightning.nn.rope import rope_2d

TextMode = Literal["cross_attn", "in_context"]
TEXT_MODES = get_args(TextMode)
BlockMLP = Literal["gelu", "swiglu"]
MLPS = get_args(BlockMLP)
BlockNorm = Literal["layernorm", "rmsnorm"]
NORMS = get_args(BlockNorm)


@dataclass
class DiTConfig:
    """DiT hyper-parameters (defaults: DiT-S/2 on 32x32x4 latents, i.e. 256 px with an f8 autoencoder)."""

    input_size: int = 32
    """Latent height = width the fixed position embedding is built for (other sizes are recomputed)."""
    in_channels: int = 4
    """Latent channels (out channels are the same: learn_sigma is off)."""
    concat_channels: int = 0
    """Extra input channels joined to x before patchify (`c_concat`: a low-res image, a masked image + mask;
    LDM §3.3). The output keeps in_channels."""
    bottleneck_dim: int | None = None
    """JiT's bottleneck patch embedding: patch -> Linear to this rank (no bias) -> Linear to hidden_size;
    None = one Linear (DiT). Large pixel patches (p^2 C >> rank) are what it is for."""
    patch_size: int = 2
    """Patch side p; tokens = (input_size / p)^2."""
    hidden_size: int = 384
    """Token width."""
    depth: int = 12
    """Number of DiT blocks."""
    num_heads: int = 6
    """Attention heads."""
    mlp_ratio: float = 4.0
    """MLP hidden = mlp_ratio * hidden_size."""
    num_classes: int | None = None
    """Class conditioning: embedding of num_classes + 1 rows (last = null class)."""
    context_dim: int | None = None
    """Width of text tokens; None = no text conditioning."""
    text_mode: TextMode = "cross_attn"
    """'cross_attn' or 'in_context'."""
    pooled_dim: int | None = None
    """Width of a pooled text vector added to the AdaLN condition (SD3's 'vector' input: the text encoders'
    joined pooled vectors, encoders/text_join.py); None = no such input (and no extra layer)."""
    text_transformer: dict | None = None
    """A trainable text transformer τθ inside the backbone (diffusion/text_transformer.py: TextTransformerConfig
    fields {vocab_size, max_length, width, depth, heads}); forward then takes `context_ids` (B, L) token ids and
    makes `context` itself (LDM §4.3). None = context comes from frozen encoders."""
    qk_norm: bool = False
    """RMSNorm on queries and keys (SD3: stabilises mixed-precision training)."""
    grad_checkpointing: bool = False
    """Recompute each block in backward (torch.utils.checkpoint, use_reentrant=False)."""
    timestep_freq_shift: int = 0
    """Timestep frequencies max_period^(-i / (128 - shift)): 0 = facebookresearch/DiT; 1 = diffusers'
    DiTTransformer2DModel port (its `Timesteps(downscale_freq_shift=1)`), set by a diffusers import so the
    weights run to the same output (diffusion/interop.py)."""
    mlp_norm_eps: float = 1e-6
    """LayerNorm eps before each block's MLP: 1e-6 in facebookresearch/DiT; the diffusers port reads its
    config's norm_eps (1e-5 by default) there."""
    mlp: BlockMLP = "gelu"
    """Block MLP: 'gelu' (DiT: Linear-GELU-Linear) or 'swiglu' (JiT, arXiv 2511.13720, as LLaMA: fc2(SiLU(a) * b)
    with [a | b] = fc1(x), hidden int(2/3 * mlp_ratio * hidden_size) so the parameter count stays DiT's)."""
    norm: BlockNorm = "layernorm"
    """Block and final-layer norms before AdaLN's scale/shift: 'layernorm' (DiT) or 'rmsnorm' (JiT); no affine
    either way (AdaLN supplies it)."""
    rope: bool = False
    """2-D rotary position embedding on the image tokens' queries and keys in every self-attention (JiT; nn/rope.py),
    on top of the fixed sin-cos positions; class / text tokens are not rotated. Needs head width % 4 == 0."""
    class_tokens: int = 0
    """In-context class tokens (JiT prepends 32): this many tokens, each the class embedding plus a learned per-slot
    embedding, are prepended to the image tokens (the class also stays in AdaLN's condition). 0 = none."""
    class_tokens_start: int = 0
    """Index of the first block that sees the class tokens: JiT prepends them before block 4 of 12 (B), 8 of 24 (L),
    10 of 32 (H), so its early blocks attend among image tokens only. 0 = from the input on."""

    def __post_init__(self):
        check_finite_fields(self, "dit")  # NaN/inf pass every comparison below
        check_choices(self, "dit")
        if self.input_size % self.patch_size:
            raise ValueError(f"dit.input_size={self.input_size} must be divisible by dit.patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise ValueError(f"dit.hidden_size={self.hidden_size} must be divisible by dit.num_heads="
                             f"{self.num_heads} and by 4 (2-D sin-cos position embedding)")
        if self.concat_channels < 0:
            raise ValueError(f"dit.concat_channels must be >= 0, got {self.concat_channels}")
        if self.bottleneck_dim is not None and self.bottleneck_dim < 1:
            raise ValueError(f"dit.bottleneck_dim must be None or >= 1, got {self.bottleneck_dim}")
        if self.pooled_dim is not None and self.pooled_dim < 1:
            raise ValueError(f"dit.pooled_dim must be None or >= 1, got {self.pooled_dim}")
        if self.rope and (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"dit.rope needs a head width (hidden_size / num_heads = "
                             f"{self.hidden_size // self.num_heads}) divisible by 4")
        if self.class_tokens < 0 or (self.class_tokens and not self.num_classes):
            raise ValueError(f"dit.class_tokens={self.class_tokens} needs a class-conditional model (num_classes) "
                             "and must be >= 0")
        start = self.class_tokens_start
        if start < 0 or (start and (start >= self.depth or not self.class_tokens)):
            raise ValueError(f"dit.class_tokens_start={self.class_tokens_start} must be a block index in [0, depth="
                             f"{self.depth}) and needs class_tokens > 0")


def per_token(v: torch.Tensor) -> torch.Tensor:
    """A modulation vector (B, D) -> (B, 1, D); a per-token one (B, N, D) (DDT's decoder) stays as it is."""
    return v[:, None] if v.ndim == 2 else v


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + per_token(scale)) + per_token(shift)  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """fc2(SiLU(a) * b), [a | b] = fc1(x) (Shazeer 2020; JiT's MLP). Names fc1 / fc2 as Mlp (LoRA targets)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


def block_mlp(cfg: DiTConfig, dim: int) -> nn.Module:
    hidden = int(dim * cfg.mlp_ratio)
    return SwiGLU(dim, int(2 * hidden / 3)) if cfg.mlp == "swiglu" else Mlp(dim, hidden)


def block_norm(cfg: DiTConfig, dim: int, eps: float = 1e-6) -> nn.Module:
    """The affine-free norm AdaLN modulates: LayerNorm (DiT) or RMSNorm (JiT)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps, elementwise_affine=False)
    return nn.LayerNorm(dim, elementwise_affine=False, eps=eps)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, cross: bool):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = block_norm(cfg, D)
        self.attn = Attention(D, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.cross = Attention(D, cfg.num_heads, cfg.context_dim, cfg.qk_norm) if cross else None
        self.norm_c = nn.LayerNorm(D, eps=1e-6) if cross else None
        self.norm2 = block_norm(cfg, D, cfg.mlp_norm_eps)
        self.mlp = block_mlp(cfg, D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c, context=None, mask=None, self_mask=None, rope=None):
        # c: (B, D) once per image (DiT), or (B, N, D) per token (DDT's decoder, conditioned on the encoder's z)
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, [N,] D) each
        x = x + per_token(g1) * self.attn(modulate(self.norm1(x), sh1, sc1), key_padding_mask=self_mask,
                                          rope=rope)  # (B, N, D)
        if self.cross is not None:
            x = x + self.cross(self.norm_c(x), context, mask)
        return x + per_token(g2) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, D: int, patch: int, out: int, norm: str = "layernorm"):
        super().__init__()
        self.norm = (nn.RMSNorm(D, eps=1e-6, elementwise_affine=False) if norm == "rmsnorm"
                     else nn.LayerNorm(D, elementwise_affine=False, eps=1e-6))
        self.linear = nn.Linear(D, patch * patch * out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, [N,] D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


def patch_embedder(c_in: int, D: int, p: int, bottleneck_dim: int | None) -> nn.Module:
    """Patchify + embed: one (p x p) conv (DiT), or JiT's bottleneck (p^2 C) -> rank -> D."""
    if bottleneck_dim is None:
        return nn.Conv2d(c_in, D, p, stride=p)
    return nn.Sequential(nn.Conv2d(c_in, bottleneck_dim, p, stride=p, bias=False), nn.Conv2d(bottleneck_dim, D, 1))


def init_patch_embedder(embedder: nn.Module) -> None:
    """Xavier on the patch embedding seen as a Linear (as DiT), zero biases."""
    for conv in (embedder if isinstance(embedder, nn.Sequential) else [embedder]):
        w = conv.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.hidden_size, cfg.patch_size
        c_in = cfg.in_channels + cfg.concat_channels
        self.x_embedder = patch_embedder(c_in, D, p, cfg.bottleneck_dim)
        self.t_embedder = TimestepEmbedder(D, freq_shift=cfg.timestep_freq_shift)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None
        # SD3's pooled-text projection (Linear-SiLU-Linear); only when configured, so older checkpoints load
        self.pooled_embedder = (nn.Sequential(nn.Linear(cfg.pooled_dim, D), nn.SiLU(), nn.Linear(D, D))
                                if cfg.pooled_dim else None)
        self.text_transformer = build_text_transformer(cfg.text_transformer)  # τθ, trained with the DiT (or None)
        g = cfg.input_size // p
        self.register_buffer("pos_embed", sincos_2d(D, g, g)[None], persistent=False)  # (1, N, D), fixed
        cross = cfg.context_dim is not None and cfg.text_mode == "cross_attn"
        self.context_embedder = (nn.Linear(cfg.context_dim, D)
                                 if cfg.context_dim is not None and cfg.text_mode == "in_context" else None)
        self.blocks = nn.ModuleList(DiTBlock(cfg, cross) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, p, cfg.in_channels, cfg.norm)
        # JiT's in-context class tokens: class embedding + a learned embedding per slot; only when configured
        self.class_token_pos = nn.Parameter(torch.zeros(cfg.class_tokens, D)) if cfg.class_tokens else None
        self.initialize_weights()

    def initialize_weights(self):
        # As DiT `initialize_weights`: xavier Linear, patch embed as a Linear, N(0, 0.02) embeddings,
        # then adaLN modulation and the final layer to zero (AdaLN-Zero).
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        init_patch_embedder(self.x_embedder)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if getattr(self, "class_token_pos", None) is not None:
            nn.init.normal_(self.class_token_pos, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
            if blk.cross is not None:
                nn.init.zeros_(blk.cross.proj.weight)
                nn.init.zeros_(blk.cross.proj.bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, C = self.cfg.patch_size, self.cfg.in_channels
        x = x.reshape(x.shape[0], h, w, p, p, C)  # (B, h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, w * p)  # (B, C, H, W)

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        """(h, w) tokens of an input (B, C, H, W)."""
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"{type(self).__name__} input {tuple(x.shape)}: H and W must be divisible by "
                             f"patch_size={p}")
        return x.shape[-2] // p, x.shape[-1] // p

    def positions(self, h: int, w: int, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """(1, h*w, width) fixed sin-cos positions: the cached ones at the training grid, else recomputed."""
        width = width or self.cfg.hidden_size
        g = self.cfg.input_size // self.cfg.patch_size
        if h == w == g and width == self.pos_embed.shape[-1]:
            return self.pos_embed.to(x.dtype)
        return sincos_2d(width, h, w).to(device=x.device, dtype=x.dtype)[None]

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """c = timestep embedding (+ class embedding) (+ pooled text embedding), (B, D): what AdaLN modulates with."""
        c = self.t_embedder(t)  # (B, D)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this DiT is class-conditional: pass y (use index num_classes for 'no class')")
            c = c + self.y_embedder(y)
        if self.pooled_embedder is not None:
            if pooled is None:
                raise ValueError(f"this {type(self).__name__} takes a pooled text vector (pooled_dim set): pass "
                                 f"pooled (B, {self.cfg.pooled_dim})")
            c = c + self.pooled_embedder(pooled.to(c.dtype))
        return c

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                c_concat: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                context_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, H, W); t (B,) float; y (B,) int64 (num_classes = null); context (B, L, D_ctx); mask (B, L);
        c_concat (B, concat_channels, H, W); pooled (B, pooled_dim); context_ids (B, L) int64 for τθ."""
        context = text_context(self.text_transformer, context, context_ids, context_mask)
        x = join_concat(x, c_concat, self.cfg.concat_channels, type(self).__name__)  # (B, C + C_cat, H, W)
        B = x.shape[0]
        h, w = self.token_grid(x)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.positions(h, w, x)  # (B, N, D)
        c = self.condition(t, y, pooled)  # (B, D)
        if self.cfg.context_dim is not None and context is None:
            raise ValueError("this DiT is text-conditional (context_dim set): pass context (B, L, context_dim)")
        self_mask, N, K = None, tokens.shape[1], self.cfg.class_tokens
        L = 0
        if self.context_embedder is not None:  # in-context: [image tokens | text tokens]
            text = self.context_embedder(context)
            L = text.shape[1]
            tokens = torch.cat([tokens, text], dim=1)  # (B, N + L, D)
            if context_mask is not None:
                self_mask = torch.cat([torch.ones(B, N, dtype=torch.bool, device=x.device), context_mask.bool()],
                                      dim=1)  # (B, N + L)
            context = context_mask = None
        rope = rope_joined = None
        if self.cfg.rope:  # rotate the image tokens by their grid position; class / text tokens by nothing
            head = self.cfg.hidden_size // self.cfg.num_heads
            rope = tuple(r.to(x.device) for r in rope_2d(head, h, w, suffix=L))
            rope_joined = tuple(r.to(x.device) for r in rope_2d(head, h, w, prefix=K, suffix=L))
        for i, blk in enumerate(self.blocks):
            if K and i == self.cfg.class_tokens_start:  # JiT's in-context class tokens join: [class | image | text]
                cls = self.class_token_pos.to(tokens.dtype) + self.y_embedder(y)[:, None].to(tokens.dtype)  # (B, K, D)
                tokens = torch.cat([cls, tokens], dim=1)  # (B, K + N + L, D)
                if self_mask is not None:
                    self_mask = torch.cat([self_mask.new_ones(B, K), self_mask], dim=1)  # (B, K + N + L)
                rope = rope_joined
            if self.cfg.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, c, context, context_mask, self_mask, rope, use_reentrant=False)
            else:
                tokens = blk(tokens, c, context, context_mask, self_mask, rope)
        out = self.final_layer(tokens[:, K:K + N], c)  # (B, N, p*p*C)
        return self.unpatchify(out, h, w)  # (B, C, H, W)

    def leading_tokens(self, block: int) -> int:
        """How many tokens come before the image tokens in the output of `blocks[block]` (0-based): the in-context
        class tokens once they have joined (REPA taps a block and aligns its image tokens only)."""
        return self.cfg.class_tokens if block >= self.cfg.class_tokens_start else 0

    def flops_per_image(self, input_size: int | None = None, context_len: int = 0, training: bool = False) -> float:
        """Analytic matmul FLOPs for one image (2 per multiply-add), counting the adaLN / timestep / class
        path ONCE per image rather than per token: 6*N*T overcounts DiT-XL/2 by ~1.5x since ~1/3 of its
        parameters are adaLN weights. training=True multiplies by 3 (forward + 2x backward)."""
        cfg, D = self.cfg, self.cfg.hidden_size
        s = input_size or cfg.input_size
        N = (s // cfg.patch_size) ** 2
        L = context_len if cfg.context_dim is not None else 0
        T0 = N + (L if self.context_embedder is not None else 0)  # sequence length before the class tokens join
        mlp = int(D * cfg.mlp_ratio)
        mlp_macs = 3 * D * int(2 * mlp / 3) if cfg.mlp == "swiglu" else 2 * D * mlp  # fc1 (2 halves) + fc2
        macs = 0
        for i in range(cfg.depth):
            T = T0 + self.leading_tokens(i)
            macs += T * (4 * D * D + mlp_macs) + 2 * T * T * D  # qkv + proj + mlp; QK^T and AV
            macs += 6 * D * D  # adaLN modulation: once per image
            if self.cfg.context_dim is not None and self.context_embedder is None:
                macs += N * 2 * D * D + L * 2 * cfg.context_dim * D + 2 * N * L * D  # q, out; k, v; attention
        c_in = cfg.in_channels + cfg.concat_channels
        if cfg.bottleneck_dim is None:
            macs += N * c_in * cfg.patch_size ** 2 * D  # patch embed
        else:
            macs += N * (c_in * cfg.patch_size ** 2 + D) * cfg.bottleneck_dim  # bottleneck patch embed
        macs += N * D * cfg.patch_size ** 2 * cfg.in_channels + 2 * D * D  # final linear + final adaLN
        macs += self.t_embedder.freq_dim * D + D * D  # timestep MLP (once)
        if self.context_embedder is not None:
            macs += L * cfg.context_dim * D
        return 2.0 * macs * (3 if training else 1)
