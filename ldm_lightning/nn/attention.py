"""Multi-head self/cross attention through `F.scaled_dot_product_attention`.

SDPA dispatches to FlashAttention / memory-efficient kernels on GPU and to a fused C++ kernel on CPU;
nothing here materialises the (L, S) attention matrix by hand. Optional QK RMSNorm (SD3, arXiv
2403.03206 §5.3.2; ViT-22B) keeps attention logits bounded under mixed precision.

Any `attn_mask` rules out SDPA's flash kernel (it takes none), leaving the memory-efficient or math
kernel; `trim_key_padding` lets a caller drop the mask whenever a batch turns out to need none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.nn.rope import apply_rope


class Attention(nn.Module):
    """Self-attention (context=None) or cross-attention to `context`.

    key_padding_mask: (B, S) bool, True = attend to this key (the Hugging Face `attention_mask`
    convention). Queries whose every key is masked would give NaN in softmax; SDPA rows with at least
    one valid key are exact, and callers always keep >= 1 valid token (a tokenizer's [CLS]).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = False,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.is_cross = context_dim is not None
        kv_dim = context_dim if context_dim is not None else dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_kv = nn.Linear(kv_dim, 2 * dim, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """rope: (cos, sin), each (L, head_dim), rotating queries and keys of SELF-attention (nn/rope.py)."""
        B, L, D = x.shape
        if self.is_cross and context is None:
            raise ValueError("cross-attention block called without `context`")
        ctx = x if context is None else context  # (B, S, kv_dim)
        q = self.to_q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, L, d)
        k, v = self.to_kv(ctx).view(B, ctx.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)  # (B, h, L, d), (B, h, S, d)
        if rope is not None:
            if context is not None:
                raise ValueError("rope applies to self-attention only")
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if key_padding_mask is not None:
            mask = key_padding_mask.to(torch.bool)[:, None, None, :]  # (B, 1, 1, S), broadcast over heads/queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


def trim_key_padding(context: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cut the key columns that are padding in EVERY row, and drop the mask when nothing is left padded.

    context (B, S, D), mask (B, S) bool on the CPU (where a tokenizer made it: deciding here costs no
    device sync). Exact: a key masked for every query contributes nothing, so attention over the
    remaining keys is the same function. Returns (B, S', D) and the (B, S') mask, or None when every
    remaining key is real — then SDPA may run the flash kernel.
    """
    if mask.device.type != "cpu":
        raise ValueError("trim_key_padding decides on the host: pass the CPU mask (before .to(device))")
    used = mask.any(0).nonzero()  # (n_used, 1) key columns some row attends to
    keep = int(used.max()) + 1 if len(used) else 1
    mask = mask[:, :keep]  # (B, S')
    return context[:, :keep], None if bool(mask.all()) else mask
