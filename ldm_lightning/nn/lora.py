"""LoRA (Hu et al. 2021): a frozen Linear W plus a trained low-rank update, y = W x + b + (alpha / r) B A x.

The math and the tensor names are PEFT's (`lora_A` (r, in), Kaiming-uniform; `lora_B` (out, r), zero, so the
wrapped layer starts as the original), but the wrapper keeps the base layer's own `weight` / `bias` names,
so a state dict without adapters loads into a wrapped network unchanged and checkpoints can leave the frozen
base out by name. peft itself is not used: it wraps modules as `base_layer` + per-adapter dicts (renaming
every base tensor) and would add peft + transformers + accelerate to the runtime for ~60 lines of math.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.finite import check_finite_fields

DEFAULT_TARGETS = ("blocks.*.attn.to_q", "blocks.*.attn.to_kv", "blocks.*.attn.proj", "blocks.*.mlp.fc1",
                   "blocks.*.mlp.fc2")


@dataclass
class LoRAConfig:
    """Low-rank adapters on the backbone's Linear layers; everything else frozen."""

    rank: int = 0
    """r: adapter rank; 0 = no LoRA (every parameter trains)."""
    alpha: float | None = None
    """Scale numerator: the update is (alpha / rank) B A; None = rank (scale 1)."""
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    """fnmatch patterns over the backbone's module names (`blocks.*.attn.to_q`); every matching nn.Linear gets
    an adapter. Default: DiT attention (q, kv, out) and MLP layers. A pattern that matches none is an error."""

    def __post_init__(self):
        check_finite_fields(self, "lora")
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        if self.rank and not self.targets:
            raise ValueError("lora.targets is empty: list the Linear layers to adapt (e.g. 'blocks.*.attn.to_q')")
        self.targets = list(self.targets)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoRALinear(nn.Module):
    """A Linear with a LoRA adapter; `weight` / `bias` are the base layer's own (frozen) parameters."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.in_features, self.out_features, self.scale = base.in_features, base.out_features, scale
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init: B = 0, so the update starts at 0
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(x)) * self.scale

    def merged(self) -> nn.Linear:
        """A plain Linear with W + scale * B A (the adapter folded in)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight + self.scale * self.lora_B.weight @ self.lora_A.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin


def apply_lora(net: nn.Module, cfg: LoRAConfig, what: str = "model.lora") -> list[str]:
    """Freeze `net`, wrap every nn.Linear whose name matches a pattern of cfg.targets; returns the wrapped names."""
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    unmatched = [p for p in cfg.targets if not any(fnmatch.fnmatchcase(n, p) for n in linears)]
    if unmatched:
        from ldm_lightning.errors import UserError
        sample = sorted({n if not n.split(".")[1:2] or not n.split(".")[1].isdigit()
                         else n.split(".")[0] + ".*." + ".".join(n.split(".")[2:]) for n in linears})
        raise UserError(f"{what}.targets {unmatched} match no Linear layer of the backbone; its Linear layers are "
                        f"named like {sample[:16]}")
    net.requires_grad_(False)
    wrapped = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in cfg.targets)]
    for name in wrapped:
        parent, _, leaf = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        setattr(owner, leaf, LoRALinear(linears[name], cfg.rank, cfg.scale))
    return wrapped


def merge_lora(net: nn.Module) -> int:
    """Fold every adapter into its base weight in place (plain Linears again); returns how many."""
    names = [n for n, m in net.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        setattr(owner, leaf, getattr(owner, leaf).merged())
    return len(names)


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key
