"""2-D rotary position embedding (RoPE; Su et al. 2021, "RoFormer", arXiv 2104.09864) for image tokens.

Each attention head's width d splits in two halves: the first rotates with the token's row, the second with its
column, each as 1-D RoPE in the rotate-half layout (pairs (i, i + d/4) within a half share one frequency
theta^(-4i/d)). A query at (r1, c1) and a key at (r2, c2) then score q^T R(r1 - r2, c1 - c2) k: the attention
logits depend on relative position only. JiT (arXiv 2511.13720) uses this on its image tokens (as EVA-02's
VisionRotaryEmbeddingFast); tokens without a grid position (class or text tokens) get the identity rotation.
"""

from __future__ import annotations

import torch


def _angles(pos: torch.Tensor, quarter: int, theta: float) -> torch.Tensor:
    """(n,) positions -> (n, 2 * quarter) angles in the rotate-half layout (each frequency twice)."""
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (quarter,)
    ang = pos.double()[:, None] * freqs[None]  # (n, quarter)
    return torch.cat([ang, ang], dim=-1)


def rope_2d(head_dim: int, h: int, w: int, prefix: int = 0, suffix: int = 0,
            theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (prefix + h*w + suffix, head_dim) float32, for a row-major h x w token grid between
    `prefix` and `suffix` tokens that get no rotation (cos 1, sin 0)."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim}")
    q = head_dim // 4
    rows = torch.arange(h).repeat_interleave(w)  # (h*w,) row index of each token
    cols = torch.arange(w).repeat(h)  # (h*w,) column index
    ang = torch.cat([_angles(rows, q, theta), _angles(cols, q, theta)], dim=-1)  # (h*w, head_dim)
    ang = torch.cat([ang.new_zeros(prefix, head_dim), ang, ang.new_zeros(suffix, head_dim)])
    return ang.cos().float(), ang.sin().float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, L, d) by (cos, sin) (L, d): each half of d rotates on its own (rows, then columns)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    c1, c2 = cos.chunk(2, dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat([x1 * c1 + _rotate_half(x1) * s1, x2 * c2 + _rotate_half(x2) * s2], dim=-1)
