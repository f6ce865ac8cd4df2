"""DDT: the decoupled diffusion transformer (Wang et al. 2025, arXiv 2504.05741), and RAE's wide DiT^DH head
(Zheng et al. 2025, arXiv 2510.11690) which is the same structure with a wider, shallower decoder.

A condition encoder (DiT blocks over the noisy input's tokens, AdaLN on timestep + class) computes the
self-condition z_t = silu(encoder tokens + c); a velocity decoder (its own patch embedding of the same
noisy input, blocks of width `decoder_hidden_size`) is modulated PER TOKEN by a projection of z_t through
AdaLN, and predicts the output. The decoder may be wider than the encoder (DiT^DH: a DiT plus a 2-block,
2048-wide head).

z_t changes slowly between neighbouring sampling steps (DDT §4.3), so a sampler may reuse it:
`encoder_reuse(backbone, every=k)` makes the encoder run on every k-th call only (the decoder runs on
every call); `encoder_nfe` / `decoder_nfe` count the evaluations. Samplers keep their one signature: the
reuse lives in the backbone, switched on around the sampler call (`SamplingConfig(encoder_every=k)`, sampling.py).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .concat import join_concat
from .text_transformer import text_context
from .dit import DiT, DiTBlock, DiTConfig, FinalLayer, init_patch_embedder, patch_embedder


@dataclass
class DDTConfig(DiTConfig):
    """DiTConfig's fields describe the condition encoder (and the shared embeddings); these the decoder."""

    decoder_depth: int = 4
    """Number of velocity-decoder blocks (DDT-XL/2: 6 after 22 encoder blocks; DiT^DH: 2)."""
    decoder_hidden_size: int | None = None
    """Decoder token width; None = hidden_size (DDT). DiT^DH uses a wider head (2048 on DiT-XL's 1152)."""
    decoder_num_heads: int | None = None
    """Decoder attention heads; None = num_heads."""

    def __post_init__(self):
        super().__post_init__()
        if self.decoder_depth < 1:
            raise ValueError(f"ddt.decoder_depth must be >= 1, got {self.decoder_depth}")
        if self.context_dim is not None and self.text_mode != "cross_attn":
            raise ValueError("ddt: text conditioning is cross-attention in the encoder only; set text_mode=cross_attn")
        if (self.mlp, self.norm, self.rope, self.class_tokens) != ("gelu", "layernorm", False, 0):
            raise ValueError("ddt: JiT's block options (mlp, norm, rope, class_tokens) are DiT backbones' only; "
                             "leave them at gelu / layernorm / false / 0")
        Dd, nd = self.decoder_hidden_size or self.hidden_size, self.decoder_num_heads or self.num_heads
        if Dd % nd or Dd % 4:
            raise ValueError(f"ddt.decoder_hidden_size={Dd} must be divisible by decoder_num_heads={nd} and by 4")


class DDT(DiT):
    """`blocks` = the condition encoder (so REPA's block index counts encoder blocks), `decoder_blocks` the
    velocity decoder. Same forward signature as DiT."""

    def __init__(self, cfg: DDTConfig):
        super().__init__(cfg)  # embeddings + encoder blocks (+ a DiT final layer, replaced below)
        Dd = cfg.decoder_hidden_size or cfg.hidden_size
        dec = DiTConfig(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(DiTConfig)},
                           "hidden_size": Dd, "num_heads": cfg.decoder_num_heads or cfg.num_heads,
                           "context_dim": None})
        self.s_projector = nn.Linear(cfg.hidden_size, Dd)  # z_t -> the decoder's AdaLN input
        self.dec_embedder = patch_embedder(cfg.in_channels + cfg.concat_channels, Dd, cfg.patch_size,
                                           cfg.bottleneck_dim)
        self.decoder_blocks = nn.ModuleList(DiTBlock(dec, cross=False) for _ in range(cfg.decoder_depth))
        self.final_layer = FinalLayer(Dd, cfg.patch_size, cfg.in_channels)
        self.initialize_weights()
        self.reuse_every, self._calls, self._z = 1, 0, None
        self.encoder_nfe = self.decoder_nfe = 0

    def initialize_weights(self):
        super().initialize_weights()
        if not hasattr(self, "decoder_blocks"):  # called from DiT.__init__ before the decoder exists
            return
        init_patch_embedder(self.dec_embedder)
        for blk in self.decoder_blocks:  # AdaLN-Zero: every decoder block starts as the identity
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)

    def encode(self, x, c, h, w, context=None, context_mask=None) -> torch.Tensor:
        """The self-condition z_t (B, N, D) of the (joined) input x at condition c (B, D)."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.positions(h, w, x)  # (B, N, D)
        for blk in self.blocks:
            tokens = self._run(blk, tokens, c, context, context_mask)
        self.encoder_nfe += 1
        return F.silu(tokens + c[:, None])  # (B, N, D): DDT adds the timestep/class condition back

    def _run(self, blk, tokens, c, context=None, context_mask=None):
        if self.cfg.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, tokens, c, context, context_mask, use_reentrant=False)
        return blk(tokens, c, context, context_mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                c_concat: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                context_ids: torch.Tensor | None = None) -> torch.Tensor:
        """As DiT.forward; with `encoder_reuse` active, the encoder runs on every k-th call only."""
        x = join_concat(x, c_concat, self.cfg.concat_channels, "DDT")  # (B, C + C_cat, H, W)
        h, w = self.token_grid(x)
        context = text_context(self.text_transformer, context, context_ids, context_mask)
        c = self.condition(t, y, pooled)  # (B, D)
        if self.cfg.context_dim is not None and context is None:
            raise ValueError("this DDT is text-conditional (context_dim set): pass context (B, L, context_dim)")
        reuse = (self.reuse_every > 1 and self._calls % self.reuse_every != 0 and self._z is not None
                 and self._z.shape[:2] == (x.shape[0], h * w))
        z = self._z if reuse else self.encode(x, c, h, w, context, context_mask)  # (B, N, D)
        if self.reuse_every > 1:
            self._calls, self._z = self._calls + 1, z
        s = self.s_projector(z)  # (B, N, Dd)
        Dd = s.shape[-1]
        tokens = self.dec_embedder(x).flatten(2).transpose(1, 2) + self.positions(h, w, x, Dd)  # (B, N, Dd)
        for blk in self.decoder_blocks:
            tokens = self._run(blk, tokens, s)
        self.decoder_nfe += 1
        return self.unpatchify(self.final_layer(tokens, s), h, w)  # (B, C, H, W)

    def flops_per_image(self, input_size: int | None = None, context_len: int = 0, training: bool = False,
                        encoder: bool = True) -> float:
        """Analytic matmul FLOPs for one image (2 per multiply-add), as DiT.flops_per_image, for encoder + decoder.
        The decoder's AdaLN is per token (N rows), unlike the encoder's once-per-image one. encoder=False: a call
        that reuses z_t (encoder_reuse), i.e. the decoder, its embeddings and the timestep MLP only."""
        cfg, D = self.cfg, self.cfg.hidden_size
        Dd, p, C = self.s_projector.out_features, cfg.patch_size, cfg.in_channels
        N = ((input_size or cfg.input_size) // p) ** 2
        c_in = C + cfg.concat_channels
        dit_macs = super().flops_per_image(input_size, context_len) / 2  # embed + encoder + a width-D final layer
        dit_final = N * D * p * p * C + 2 * D * D
        t_mlp = self.t_embedder.freq_dim * D + D * D
        macs = dit_macs - dit_final if encoder else t_mlp  # the DiT count holds the encoder's embedding and blocks
        embed_d = N * c_in * p * p * Dd if cfg.bottleneck_dim is None else N * (c_in * p * p + Dd) * cfg.bottleneck_dim
        mlp = int(Dd * cfg.mlp_ratio)
        per_block = N * (4 * Dd * Dd + 2 * Dd * mlp) + 2 * N * N * Dd + N * 6 * Dd * Dd  # + per-token adaLN
        macs += N * D * Dd + embed_d + cfg.decoder_depth * per_block  # s_projector, decoder embed, blocks
        macs += N * Dd * p * p * C + N * 2 * Dd * Dd  # final linear + its per-token adaLN
        return 2.0 * macs * (3 if training else 1)


@contextmanager
def encoder_reuse(backbone: nn.Module, every: int = 1):
    """Within the block, a DDT backbone recomputes its condition encoder on every `every`-th call and reuses
    the last z_t on the others (every=1: always recompute, no state kept). Any other backbone: every must be 1."""
    if every < 1:
        raise ValueError(f"encoder_every must be >= 1, got {every}")
    if every == 1:
        yield
        return
    if not isinstance(backbone, DDT):
        raise ValueError(f"encoder_every={every} reuses a DDT's condition encoder; this backbone is a "
                         f"{type(backbone).__name__} (use a DDT-* / DiTDH-* preset, or encoder_every=1)")
    backbone.reuse_every, backbone._calls, backbone._z = every, 0, None
    try:
        yield
    finally:
        backbone.reuse_every, backbone._calls, backbone._z = 1, 0, None
