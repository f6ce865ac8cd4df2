"""The LDM paper's trainable text encoder τθ (Rombach et al. 2022, §4.3 / Tab. 15: a transformer over BERT-tokenised
captions, trained jointly with the UNet): token ids -> (B, L, width) token states for cross-attention.

It lives INSIDE the backbone (`DiTConfig.text_transformer` / `UNetConfig.text_transformer`), so it is trained with
the denoiser and sits in its optimizer, checkpoint, EMA copy and ZeRO partitions, and `load_denoiser` rebuilds it
from the checkpoint's backbone config. The conditioner only tokenises (the bundled MiniLM folder's BERT WordPiece
tokenizer by default: `conditioning.trainable_text`), so sampling needs no frozen text model at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layout import BoxFourierEmbedding


@dataclass
class TextTransformerConfig:
    """τθ's size (defaults: a small one for MNIST captions; LDM-KL-8-G's is 1280 wide and 32 deep)."""

    vocab_size: int = 30522
    """Token ids the tokenizer gives (BERT WordPiece: 30522)."""
    max_length: int = 32
    """Tokens per caption (learned positions)."""
    width: int = 256
    """Token width = the backbone's context_dim."""
    depth: int = 4
    """Transformer blocks (pre-LayerNorm)."""
    heads: int = 4
    """Attention heads."""
    box_fourier: int = 0
    """Layout models only: frequencies of GLIGEN-style Fourier features of each box's coordinates, added through a
    learned map to all 5 tokens of the box (diffusion/layout.py BoxFourierEmbedding); 0 = the paper's plain tokens."""
    box_class: bool = False
    """Layout models with box_fourier: also add a learned embedding of the box's class to all 5 of its tokens
    (GLIGEN's grounding token joins class and box), so cross-attention reads the class from any token of the box."""
    layout_classes: int = 0
    """Layout models: the tokenizer's class count (set from conditioning.layout, not by hand)."""
    layout_bins: int = 0
    """Layout models: the tokenizer's position_bins (set from conditioning.layout, not by hand)."""

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text_transformer.width={self.width} must be divisible by heads={self.heads}")
        for name in ("vocab_size", "max_length", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"text_transformer.{name} must be >= 1, got {getattr(self, name)}")
        if self.box_fourier < 0:
            raise ValueError(f"text_transformer.box_fourier must be >= 0, got {self.box_fourier}")
        if self.box_class and not self.box_fourier:
            raise ValueError("text_transformer.box_class adds to box_fourier's box features: set box_fourier too")


class TextTransformer(nn.Module):
    """ids (B, L) int64, mask (B, L) bool (True = real token) -> (B, L, width) token states."""

    def __init__(self, cfg: TextTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.max_length, cfg.width))
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)
        self.box_embedding = None
        if cfg.box_fourier:
            if cfg.layout_classes < 1 or cfg.layout_bins < 1:
                raise ValueError("trainable_text.box_fourier is for layout models (conditioning.kind: layout); "
                                 "set it to 0 for captions")
            self.box_embedding = BoxFourierEmbedding(cfg.layout_classes, cfg.layout_bins, cfg.box_fourier, cfg.width,
                                                     cfg.box_class)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        L = ids.shape[1]
        if L > self.cfg.max_length:
            raise ValueError(f"text_transformer: {L} tokens > max_length={self.cfg.max_length}")
        h = self.token_embedding(ids) + self.position_embedding[:, :L]  # (B, L, width)
        if self.box_embedding is not None:
            h = h + self.box_embedding(ids)
        pad = None if mask is None else ~mask.bool()  # (B, L) True = ignore
        return self.norm(self.blocks(h, src_key_padding_mask=pad))  # (B, L, width)


def build_text_transformer(fields: dict | None) -> TextTransformer | None:
    """τθ from a backbone config's `text_transformer` dict (None: no τθ)."""
    return None if not fields else TextTransformer(TextTransformerConfig(**dict(fields)))


def text_context(tau: TextTransformer | None, context: torch.Tensor | None, ids: torch.Tensor | None,
                 mask: torch.Tensor | None) -> torch.Tensor | None:
    """A backbone's cross-attention context: τθ(ids) when it has τθ, else the given (frozen-encoder) context."""
    if tau is None:
        return context
    if ids is None:
        raise ValueError("this backbone trains its own text transformer (text_transformer set): pass context_ids "
                         "(B, L) token ids (the conditioner's tokenizer makes them)")
    return tau(ids, mask)
