"""Conditioning: batch -> the keyword arguments a backbone takes, with dropout for classifier-free guidance.

Backbones accept `y` (B,) int64 class labels (index `num_classes` = the learned null class) and/or
`context` (B, L, D) token states with `context_mask` (B, L) bool (True = real token), and `pooled` (B, P), the
text encoders' pooled vector (when one has use_pooled). The text encoders are FROZEN Hugging Face models read
from local directories (ldm_lightning/encoders: CLIP, T5, BERT-family, decoder-only LMs; default: the bundled
all-MiniLM-L6-v2); they are kept outside the module tree, so they are never trained, never in a checkpoint,
never EMA'd, and never sharded — they follow the conditioner's device on first use.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from ldm_lightning.choices import check_choices
from ldm_lightning.finite import check_finite_fields
from ldm_lightning.encoders.text import TextEncoderConfig, TextEncoderError, default_text_encoder_path, load_tokenizer
from ldm_lightning.encoders.text_join import TextEmbedding, TextEncoders
from ldm_lightning.nn.attention import trim_key_padding

from .concat import ConcatTask, InpaintMasks
from .layout import LayoutConfig, LayoutTokenizer, parse_layout_text
from .text_transformer import TextTransformerConfig

log = logging.getLogger(__name__)
ConditioningKind = Literal["none", "class", "text", "layout"]
CONDITIONINGS = get_args(ConditioningKind)


@dataclass
class ConditioningConfig:
    """What the denoiser is conditioned on."""

    kind: ConditioningKind = "none"
    """'none', 'class' (labels from batch['cls']), 'text' (captions from batch['txt']) or 'layout' (boxes, as their
    JSON in batch['txt']: data.caption_key boxes; tokenised by diffusion/layout.py into τθ = trainable_text)."""
    num_classes: int = 0
    """Number of real classes (class kind); the null class gets index num_classes."""
    text_encoder: str | None = None
    """Local directory of one Hugging Face text model (any kind of ldm_lightning/encoders/text.py: CLIP, a full
    CLIP, T5 / UMT5, BERT-family, decoder-only LM), its last layer with its kind's mask convention; None = the
    bundled MiniLM. For a layer, a pooled vector, a dtype or several encoders, use text_encoders instead."""
    text_encoders: list[TextEncoderConfig] | None = None
    """Several (or one finely set) frozen text encoders, each {path, layer, max_length, use_pooled, use_mask,
    dtype}; their token states are joined SD3's way and their pooled vectors concatenated
    (encoders/text_join.py). Mutually exclusive with text_encoder."""
    text_cache: bool | None = None
    """Cached text embeddings (diffusion/text_cache.py, written by `ldm-lightning data encode --text-encoders`):
    None = use the latent shards' cache when they have one (a cache of other encoders is refused), True = require
    one, False = always run the encoders. With the cache, training loads no text encoder."""
    trainable_text: TextTransformerConfig | None = None
    """LDM §4.3's trainable τθ instead of frozen encoders: a transformer {vocab_size, max_length, width, depth,
    heads} inside the backbone (diffusion/text_transformer.py), trained jointly; captions are tokenised with
    text_tokenizer. text_encoder(s) and the text cache are then unused."""
    layout: LayoutConfig | None = None
    """kind 'layout': the box tokenizer {num_classes, position_bins, max_boxes} (diffusion/layout.py); None = its
    defaults. τθ's width, depth and heads come from trainable_text (its defaults when unset); its vocab_size and
    max_length follow the tokenizer."""
    map_classes: int = 0
    """concat 'semantic': class ids of the maps, background included (11 for mnist-canvas: 0 + ten digits)."""
    text_tokenizer: str | None = None
    """Tokenizer folder of trainable_text; None = the bundled MiniLM's BERT WordPiece tokenizer (30522 ids)."""
    max_length: int = 32
    """Tokens per caption (padded / truncated), so every batch's context has the same shape; the default of
    each text_encoders entry that sets none."""
    drop_prob: float = 0.1
    """Probability of replacing a condition by the null one in training (classifier-free guidance)."""
    concat: ConcatTask = "none"
    """Concatenation conditioning (diffusion/concat.py): 'none', 'super_resolution' (a low-res image),
    'inpainting' (the autoencoder's latent of the masked image + the mask on the latent grid) or 'semantic' (a
    one-hot class map of map_classes channels, from the batch's class_map: data.members.map_ext), joined to the
    backbone input as c_concat. Needs image batches."""
    inpaint_masks: InpaintMasks = "strokes_boxes"
    """inpainting: the training masks, 'strokes_boxes' (LaMa-style large strokes / boxes, LDM's; masks.py: 10-60%
    of the image) or 'box' (one random box, 25-60% of each side: the first version's)."""
    sr_factor: int = 4
    """super_resolution: the low-res side is the image side / sr_factor (e.g. 4: 8² -> 32²)."""
    trim_padding: bool = False
    """Training batches: cut the token columns that are padding in every caption and drop the key mask
    when no caption is padded, so SDPA may use its flash kernel (any mask rules it out). Exact (masked
    keys add nothing). Off by default: the context length then varies per batch, which makes
    torch.compile re-specialise and defeats CUDA graphs, and real caption sets are rarely all one length;
    it pays for template captions of one length and small batches (nn/attention.trim_key_padding)."""

    def __post_init__(self):
        check_finite_fields(self, "conditioning")  # NaN/inf pass every comparison below
        check_choices(self, "conditioning")
        if self.kind == "class" and self.num_classes < 1:
            raise ValueError(f"conditioning.num_classes must be >= 1 for kind='class', got {self.num_classes}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"conditioning.drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.sr_factor < 2:
            raise ValueError(f"conditioning.sr_factor must be >= 2, got {self.sr_factor}")
        if self.max_length < 2:
            raise ValueError(f"conditioning.max_length must be >= 2, got {self.max_length}")
        if self.text_encoders is not None:
            if self.text_encoder is not None:
                raise ValueError("conditioning: set text_encoder (one folder) or text_encoders (a list), not both")
            if not self.text_encoders:
                raise ValueError("conditioning.text_encoders is empty: list at least one {path: ...}, or leave it "
                                 "unset for the bundled MiniLM")
            self.text_encoders = [e if isinstance(e, TextEncoderConfig) else TextEncoderConfig(**dict(e))
                                  for e in self.text_encoders]
        if self.trainable_text is not None and not isinstance(self.trainable_text, TextTransformerConfig):
            self.trainable_text = TextTransformerConfig(**dict(self.trainable_text))
        if self.layout is not None and not isinstance(self.layout, LayoutConfig):
            self.layout = LayoutConfig(**dict(self.layout))
        if self.kind == "layout":
            self.layout = self.layout or LayoutConfig()
            self.trainable_text = self.trainable_text or TextTransformerConfig()
        elif self.trainable_text is not None and self.trainable_text.box_fourier:
            raise ValueError("conditioning.trainable_text.box_fourier is for layout models (conditioning.kind: "
                             "layout); drop it")
        if self.concat == "semantic" and self.map_classes < 2:
            raise ValueError(f"conditioning.map_classes must be >= 2 for concat='semantic' (background + the "
                             f"classes: 11 for mnist-canvas), got {self.map_classes}")

    def text_encoder_configs(self) -> list[TextEncoderConfig]:
        """The text encoders this config names (text_encoder is one with the defaults)."""
        return list(self.text_encoders) if self.text_encoders else [TextEncoderConfig(path=self.text_encoder)]


class Conditioner(nn.Module):
    """`cond = conditioner(batch, generator)` in training (with dropout); `from_labels` / `from_prompts`
    and `null(B)` at sampling time. Returns dicts of backbone kwargs."""

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("_device", torch.zeros(()), persistent=False)
        trainable = cfg.kind == "text" and cfg.trainable_text is not None
        self._text = TextEncoders(cfg.text_encoder_configs(), cfg.max_length) \
            if cfg.kind == "text" and not trainable else None
        self._tokenizer = None
        if trainable:  # τθ lives in the backbone: here only its tokenizer
            self._tokenizer = load_tokenizer(cfg.text_tokenizer or default_text_encoder_path())
            if len(self._tokenizer) > cfg.trainable_text.vocab_size:
                raise TextEncoderError(f"conditioning.text_tokenizer has {len(self._tokenizer)} ids, more than "
                                       f"trainable_text.vocab_size={cfg.trainable_text.vocab_size}; raise vocab_size")
        self._layout = LayoutTokenizer(cfg.layout) if cfg.kind == "layout" else None
        self._said_uncached = False
        self._cache = None  # a TextCache (diffusion/text_cache.py) once `use_text_cache` attaches one

    @property
    def text_encoders(self) -> TextEncoders | None:
        return self._text

    def use_text_cache(self, cache) -> None:
        """Read captions' embeddings from `cache` (a TextCache whose key was checked against these encoders)."""
        self._cache = cache

    @property
    def context_dim(self) -> int | None:
        if self._tokenizer is not None or self._layout is not None:
            return self.cfg.trainable_text.width
        return self._text.dim if self._text is not None else None

    def tau_fields(self) -> dict | None:
        """The backbone's `text_transformer` fields when τθ is trained inside it (trainable text, layouts)."""
        if self._layout is not None:
            return {**dataclasses.asdict(self.cfg.trainable_text), "vocab_size": self._layout.vocab_size,
                    "max_length": self._layout.length, "layout_classes": self.cfg.layout.num_classes,
                    "layout_bins": self.cfg.layout.position_bins}
        return dataclasses.asdict(self.cfg.trainable_text) if self._tokenizer is not None else None

    def from_layouts(self, layouts: list, where: str = "layout") -> dict:
        """One layout (a list of [class, x0, y0, x1, y1] boxes) per sample -> τθ's token ids and mask."""
        return self._layout.batch(list(layouts), self._device.device, where)

    @property
    def pooled_dim(self) -> int | None:
        """Width of the text encoders' joined pooled vector (the backbone's `pooled` input), None if unused."""
        return self._text.pooled_dim if self._text is not None else None

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
        if self._tokenizer is not None:  # τθ: token ids, encoded inside the backbone
            tok = self._tokenizer(list(prompts), padding="max_length", truncation=True,
                                  max_length=self.cfg.trainable_text.max_length, return_tensors="pt")
            dev = self._device.device
            return {"context_ids": tok["input_ids"].to(dev), "context_mask": tok["attention_mask"].bool().to(dev)}
        if self._cache is not None and all(p in self._cache for p in prompts):
            emb = self._cache.lookup(list(prompts))  # on the CPU
            if trim:
                emb.states, emb.mask = trim_key_padding(emb.states, emb.mask)
            dev = self._device.device
            emb = TextEmbedding(emb.states.to(dev), None if emb.mask is None else emb.mask.to(dev),
                                None if emb.pooled is None else emb.pooled.to(dev))
        else:
            if self._cache is not None and not self._said_uncached:
                self._said_uncached = True
                log.warning("text cache: a caption is not in the cache (e.g. a validation prompt); the text encoders "
                            "are loaded to encode it (said once)")
            emb = self._text(prompts, self._device.device, trim)
        cond = {"context": emb.states, "context_mask": emb.mask}
        if emb.pooled is not None:
            cond["pooled"] = emb.pooled  # (B, P)
        return cond

    def null(self, batch_size: int) -> dict:
        if self.cfg.kind == "class":
            return {"y": torch.full((batch_size,), self.cfg.num_classes, dtype=torch.long,
                                    device=self._device.device)}
        if self.cfg.kind == "text":
            return self.from_prompts([""] * batch_size)
        if self.cfg.kind == "layout":
            return self.from_layouts([[]] * batch_size)  # the empty layout: the begin token only
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
        if self.cfg.kind == "layout":
            keys = batch.get("key") or [str(i) for i in range(len(batch["txt"]))]
            layouts = [parse_layout_text(s, f"sample {k}") for s, k in zip(batch["txt"], keys)]
            drop = self._drop(len(layouts), p, generator).tolist()
            return self.from_layouts([[] if d else lay for lay, d in zip(layouts, drop)], "training sample")
        return {}
