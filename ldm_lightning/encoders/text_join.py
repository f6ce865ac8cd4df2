"""Several frozen text encoders as one condition: joined token states + mask, and one pooled vector.

How the token states are joined (SD3's scheme, Esser et al. 2024 §2/Fig. 2, generalised):
  1. the CLIP-kind encoders' token states are concatenated along CHANNELS (CLIP-L 768 ‖ CLIP-G 1280 = 2048; a
     shorter sequence is zero-padded, and a position is real if it is real in any of them);
  2. that CLIP group and every other encoder (T5, LM, BERT-family) are zero-padded on channels to the widest
     (SD3: 2048 -> T5's 4096);
  3. they are concatenated along the SEQUENCE, in the order listed (the CLIP group where its first member is):
     SD3's 77 CLIP + 256 T5 = 333 tokens, masks joined the same way.
One encoder is its own states, unchanged. The pooled vectors of the encoders with `use_pooled` are concatenated
into one (B, sum P) vector (SDXL: CLIP-G's 1280; SD3: 768 + 1280 = 2048), which the backbone adds to its
timestep embedding through a small MLP (DiT / UNet `pooled_dim`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm_lightning.nn.attention import trim_key_padding

from .text import TextEncoder, TextEncoderConfig


@dataclass
class TextEmbedding:
    """The text condition of a batch of captions."""

    states: torch.Tensor
    """(B, L, D) fp32 joined token states."""
    mask: torch.Tensor | None
    """(B, L) bool, True = a real token (None after trimming when no position is padding)."""
    pooled: torch.Tensor | None
    """(B, P) fp32 joined pooled vector, or None when no encoder has use_pooled."""

    def rows(self) -> list[tuple]:
        """Per-caption (states, mask, pooled) rows (for a cache)."""
        pooled = self.pooled if self.pooled is not None else [None] * len(self.states)
        return list(zip(self.states, self.mask, pooled))

    @staticmethod
    def stack(rows: list[tuple]) -> "TextEmbedding":
        pooled = None if rows[0][2] is None else torch.stack([r[2] for r in rows])
        return TextEmbedding(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), pooled)


def pad_to(x: torch.Tensor, length: int | None = None, width: int | None = None) -> torch.Tensor:
    """Zero-pad (B, L[, D]) on the right to `length` tokens and (3-D) `width` channels."""
    pad = []
    if x.ndim == 3:
        pad += [0, (width or x.shape[2]) - x.shape[2]]
    pad += [0, (length or x.shape[1]) - x.shape[1]]
    return F.pad(x, pad)


def joined_dims(kinds: list[str], dims: list[int], pooled_dims: list[int | None]) -> tuple[int, int | None]:
    """(channels of the joined token states, width of the joined pooled vector or None) of encoders of these
    kinds, token widths and pooled widths (None = that encoder's pooled vector is not used)."""
    clip = [d for k, d in zip(kinds, dims) if k == "clip"]
    widths = ([sum(clip)] if clip else []) + [d for k, d in zip(kinds, dims) if k != "clip"]
    pooled = [p for p in pooled_dims if p is not None]
    return max(widths), (sum(pooled) if pooled else None)


def join_outputs(kinds: list[str], outs: list[tuple], dim: int) -> TextEmbedding:
    """One TextEmbedding from each encoder's (states (B, L_i, D_i), mask (B, L_i), pooled (B, P_i) or None),
    joined as the module docstring says; `dim` = joined_dims(...)[0]."""
    clip = [o for k, o in zip(kinds, outs) if k == "clip"]
    groups, placed = [], False
    for k, (h, m, _) in zip(kinds, outs):
        if k != "clip":
            groups.append((h, m))
        elif not placed:  # the CLIP group, joined on channels
            L = max(o[0].shape[1] for o in clip)
            hs = torch.cat([pad_to(o[0], L) for o in clip], dim=2)  # (B, L, sum D_clip)
            ms = torch.stack([pad_to(o[1], L) for o in clip]).any(0)  # (B, L)
            groups.append((hs, ms))
            placed = True
    states = torch.cat([pad_to(h, width=dim) for h, _ in groups], dim=1)  # (B, sum L, D)
    mask = torch.cat([m for _, m in groups], dim=1)  # (B, sum L)
    pooled = [o[2] for o in outs if o[2] is not None]
    return TextEmbedding(states, mask, torch.cat(pooled, dim=1) if pooled else None)


class TextEncoders:
    """list[str] -> TextEmbedding through several `TextEncoder`s (module docstring: how they are joined), with
    a per-caption cache: captions repeat (templated captions, the empty CFG prompt), and each is padded to its
    max_length alone, so a cached row is the row a batched call would give."""

    def __init__(self, configs: list[TextEncoderConfig], max_length: int = 32, cache_size: int = 4096):
        if not configs:
            raise ValueError("TextEncoders needs at least one encoder config")
        self.encoders = [TextEncoder(c, max_length) for c in configs]
        self.kinds = [e.kind for e in self.encoders]
        self.dim, self.pooled_dim = joined_dims(self.kinds, [e.dim for e in self.encoders],
                                                [e.pooled_dim if e.cfg.use_pooled else None for e in self.encoders])
        """dim: channels of the joined token states (the backbone's context_dim); pooled_dim: width of the joined
        pooled vector (the backbone's pooled_dim), None when no encoder gives one."""
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple] = OrderedDict()

    def identity(self) -> list[dict]:
        return [e.identity() for e in self.encoders]

    @torch.no_grad()
    def encode_each(self, texts: list[str], device: torch.device) -> list[tuple]:
        """Each encoder's own (states, mask, pooled or None) of `texts` on `device` (what a cache stores)."""
        return [e.encode(texts, device) for e in self.encoders]

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device) -> TextEmbedding:
        """Uncached: the joined TextEmbedding of `texts` on `device`."""
        return join_outputs(self.kinds, self.encode_each(texts, device), self.dim)

    def __call__(self, texts: list[str], device: torch.device, trim: bool = False) -> TextEmbedding:
        """The TextEmbedding of `texts` on `device`, through the cache (cache_size 0 disables it).
        trim: cut all-padding columns, mask None when none is left (nn/attention.trim_key_padding)."""
        texts = list(texts)
        if self.cache_size <= 0:
            emb = self.encode(texts, device)
            if trim:
                emb.states, emb.mask = trim_key_padding(emb.states, emb.mask.cpu())
            return emb
        unique = list(dict.fromkeys(texts))  # first-seen order
        new = [t for t in unique if t not in self._cache]
        if new:
            emb = self.encode(new, device)
            cpu = TextEmbedding(emb.states.cpu(), emb.mask.cpu(), None if emb.pooled is None else emb.pooled.cpu())
            for t, row in zip(new, cpu.rows()):
                self._cache[t] = row
        rows = [self._cache[t] for t in texts]
        for t in unique:
            self._cache.move_to_end(t)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        emb = TextEmbedding.stack(rows)  # on the CPU
        if trim:
            emb.states, emb.mask = trim_key_padding(emb.states, emb.mask)  # decided on the host: no device sync
        return TextEmbedding(emb.states.to(device), None if emb.mask is None else emb.mask.to(device),
                             None if emb.pooled is None else emb.pooled.to(device))
