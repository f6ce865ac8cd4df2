"""The text-embedding cache: each caption's frozen-encoder outputs written once by `ldm-lightning data encode`, so
training on latent shards loads no text encoder.

    ldm-lightning data encode --autoencoder AE --shards data/laion --out data/laion-latents \
        --text-encoders '[{path: models/clip-l, layer: penultimate}, {path: models/t5-xxl, max_length: 256}]'

Layout: beside the latent shards, `text-cache/<shard>.safetensors` holds, for the distinct captions (`txt`
members) of that shard, PER ENCODER its token states `e{i}.states` (N, L_i, D_i) in bf16 (default) / fp16 / fp32,
its mask `e{i}.mask` (N, L_i) bool and its pooled vector `e{i}.pooled` (N, P_i) when used; the caption strings
are in the file's metadata. `text-cache/empty.safetensors` holds the empty caption's outputs ONCE, which caption
dropout (classifier-free guidance) uses. The latent manifest's `text` section records the key: per encoder its
folder's content hash (config, weights, tokenizer), kind, layer, max length, mask and pooled use (`identity`).

Disk cost per distinct caption: sum_i L_i * D_i * 2 bytes (bf16) + L_i (mask) + P_i * 2 (pooled): 24.6 KB for
MiniLM at 32 tokens, ~2.4 MB for SD3's CLIP-L 77x768 + CLIP-G 77x1280 + T5-XXL 256x4096 — more than a 64x64x4
latent (64 KB in fp32), which is why it is opt-in. Written per shard, it is deduplicated within a shard only.
A sample with several captions (a JSON list, data/captions.py) has each one cached: n x that per sample.
Training reads only the batch's rows from disk (text_cache_reader.py): RAM does not grow with the cache.

Training (`DiffusionModule.on_fit_start`, `conditioning.text_cache`): latent shards whose manifest has a `text`
section are checked against the configured encoders (another encoder or setting: `TextCacheMismatch`, naming
both), and the conditioner then reads captions' embeddings from the cache, joining them as the encoders would
(encoders/text_join.py). The cached states are the encoder's outputs rounded to the stored dtype.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ldm_lightning.encoders.text_join import TextEmbedding, TextEncoders, join_outputs, joined_dims
from ldm_lightning.errors import UserError

TEXT_CACHE_DIR = "text-cache"
EMPTY_TABLE = "empty.safetensors"
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KEY_FIELDS = ("files_sha256", "kind", "layer", "max_length", "use_pooled", "use_mask")
log = logging.getLogger(__name__)


class TextCacheMismatch(UserError, ValueError):
    """A text-embedding cache made with other encoders or settings than the configured ones."""


def bytes_per_caption(identity: list[dict], dtype: str) -> int:
    """Disk bytes of one caption's cached outputs (states + mask + pooled, every encoder)."""
    size = CACHE_DTYPES[dtype].itemsize
    return sum(e["max_length"] * e["dim"] * size + e["max_length"]
               + (e["pooled_dim"] * size if e["use_pooled"] else 0) for e in identity)


def write_table(encoders: TextEncoders, captions: list[str], path: Path, device: torch.device, dtype: str,
                batch_size: int = 64) -> int:
    """Encode the distinct `captions` with each encoder and write one table (atomic); returns its row count."""
    from safetensors.torch import save_file
    unique = list(dict.fromkeys(captions))
    parts: list[list[tuple]] = []
    for i in range(0, len(unique), batch_size):
        outs = encoders.encode_each(unique[i:i + batch_size], device)
        parts.append([(h.to(CACHE_DTYPES[dtype]).cpu(), m.cpu(), None if p is None else p.to(CACHE_DTYPES[dtype]).cpu())
                      for h, m, p in outs])
    tensors = {}
    for k in range(len(encoders.encoders)):
        tensors[f"e{k}.states"] = torch.cat([p[k][0] for p in parts]).contiguous()  # (N, L_k, D_k)
        tensors[f"e{k}.mask"] = torch.cat([p[k][1] for p in parts]).contiguous()  # (N, L_k) bool
        if parts and parts[0][k][2] is not None:
            tensors[f"e{k}.pooled"] = torch.cat([p[k][2] for p in parts]).contiguous()  # (N, P_k)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"captions": json.dumps(unique)})
    os.replace(tmp, path)
    return len(unique)


def shard_captions(url: str) -> list[str]:
    """The `txt` captions of a (latent) shard, decoded as the data loader decodes them ('' when absent); every
    caption of a sample that has several (a JSON list: data/captions.py), so each one's embedding is cached."""
    from ldm_lightning.data.captions import every_caption, parse_caption_member
    from ldm_lightning.data.tario import iter_samples
    return [c for s in iter_samples(url)
            for c in (every_caption(parse_caption_member(s["txt"]), s["__key__"], url) if "txt" in s else [""])]


def manifest_section(encoders: TextEncoders, dtype: str) -> dict:
    """The latent manifest's `text` entry: the cache's key and layout."""
    identity = encoders.identity()
    return {"dir": TEXT_CACHE_DIR, "dtype": dtype, "encoders": identity,
            "bytes_per_caption": bytes_per_caption(identity, dtype)}


def describe(identity: list[dict]) -> str:
    return "; ".join(f"{e['path']} (kind {e['kind']}, layer {e['layer']}, max_length {e['max_length']}, "
                     f"use_pooled {e['use_pooled']}, use_mask {e['use_mask']}, files {e['files_sha256'][:12]})"
                     for e in identity)


def check_text_cache(section: dict, want: list[dict], where: str) -> None:
    """Raise TextCacheMismatch naming both when the cache's encoders differ from the configured ones."""
    have = section.get("encoders") or []
    if len(have) == len(want) and all(h.get(k) == w.get(k) for h, w in zip(have, want) for k in KEY_FIELDS):
        return
    raise TextCacheMismatch(
        f"{where}: the text-embedding cache was made with the text encoders [{describe(have)}], but the "
        f"conditioning names [{describe(want)}]; training on it would condition on another encoder's outputs. "
        "Re-encode with `ldm-lightning data encode ... --text-encoders ...` listing the configured encoders, or "
        "set model.init_args.conditioning.text_cache: false to encode captions on the fly")


class TextCache:
    """caption -> its cached per-encoder outputs, joined into a TextEmbedding (the reader of `write_table`).

    Only the tables' headers and the caption -> (table, row) index stay in RAM; a lookup reads the batch's rows
    from disk (text_cache_reader.py), so RAM does not grow with the cache's size."""

    def __init__(self, section: dict, dirs: list[Path]):
        from .text_cache_reader import TableRows
        ids = section["encoders"]
        self.kinds = [e["kind"] for e in ids]
        self.dim, self.pooled_dim = joined_dims(self.kinds, [e["dim"] for e in ids],
                                                [e["pooled_dim"] if e["use_pooled"] else None for e in ids])
        self.rows: dict[str, tuple[int, int]] = {}  # caption -> (table, row)
        self.tables: list[TableRows] = []
        files = sorted({f for d in dirs for f in (d / section.get("dir", TEXT_CACHE_DIR)).glob("*.safetensors")})
        if not any(f.name == EMPTY_TABLE for f in files):
            raise TextCacheMismatch(f"{dirs[0] / TEXT_CACHE_DIR}: no {EMPTY_TABLE} (the empty caption, for caption "
                                    "dropout); re-run `ldm-lightning data encode ... --text-encoders ...`")
        for f in files:
            table = TableRows(f)
            t = len(self.tables)
            self.tables.append(table)
            for r, c in enumerate(json.loads(table.metadata["captions"])):
                self.rows.setdefault(c, (t, r))
        self.n_encoders = len(ids)

    def __contains__(self, caption: str) -> bool:
        return caption in self.rows

    def lookup(self, texts: list[str]) -> TextEmbedding:
        """The joined TextEmbedding (fp32, on the CPU) of captions that are all in the cache."""
        where = [self.rows[t] for t in texts]
        by_table: dict[int, list[int]] = {}  # table -> positions in the batch
        for i, (t, _) in enumerate(where):
            by_table.setdefault(t, []).append(i)
        cols: dict[str, torch.Tensor] = {}
        for t, pos in by_table.items():
            table = self.tables[t]
            fd = os.open(table.path, os.O_RDONLY)
            try:
                for name in table.tensors:
                    part = table.rows(name, [where[i][1] for i in pos], fd)
                    if name not in cols:
                        cols[name] = torch.empty((len(texts), *part.shape[1:]), dtype=part.dtype)
                    cols[name][pos] = part
            finally:
                os.close(fd)
        outs = []
        for k in range(self.n_encoders):
            pooled = cols.get(f"e{k}.pooled")
            outs.append((cols[f"e{k}.states"].float(), cols[f"e{k}.mask"],
                         None if pooled is None else pooled.float()))
        return join_outputs(self.kinds, outs, self.dim)


def find_text_cache(manifest_path: Path) -> dict | None:
    """The `text` section of a latent manifest, or None."""
    return json.loads(Path(manifest_path).read_text()).get("text")


def attach_text_cache(conditioner, shard_specs: list, require: bool | None) -> TextCache | None:
    """Give `conditioner` the text cache of latent shards (train and val specs) when they have one and `require`
    is not False, after checking its key; None when there is none (an error when `require` is True)."""
    from ldm_lightning.data.shards import find_manifest
    if require is False or conditioner.text_encoders is None:
        return None
    manifests = [m for m in (find_manifest(s) for s in shard_specs if s is not None) if m is not None]
    sections = [(m, find_text_cache(m)) for m in manifests]
    sections = [(m, s) for m, s in sections if s is not None]
    if not sections:
        if require:
            raise TextCacheMismatch(f"conditioning.text_cache is true, but the latent shards {shard_specs} have no "
                                    "text-embedding cache; write one with `ldm-lightning data encode ... "
                                    "--text-encoders ...`, or set conditioning.text_cache: null")
        return None
    want = conditioner.text_encoders.identity()
    for m, s in sections:
        check_text_cache(s, want, str(m))
    cache = TextCache(sections[0][1], [m.parent for m, _ in sections])
    conditioner.use_text_cache(cache)
    print(f"text cache: {len(cache.rows)} captions' embeddings from {', '.join(str(m.parent) for m, _ in sections)}; "
          "the text encoders are not loaded for training", flush=True)
    return cache


def text_encoders_from_option(value: str, max_length: int) -> TextEncoders:
    """`data encode --text-encoders`: YAML of conditioning.text_encoders, or 'default' (the bundled MiniLM)."""
    import yaml

    from ldm_lightning.encoders.text import TextEncoderConfig
    if value.strip() == "default":
        return TextEncoders([TextEncoderConfig()], max_length)
    try:
        entries = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise UserError(f"--text-encoders {value!r} is not YAML ({e}); give a list such as "
                        "'[{path: models/clip, layer: penultimate}]' or 'default'") from None
    if isinstance(entries, (str, dict)):
        entries = [entries]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"--text-encoders {value!r}: give a list of {{path, layer, max_length, ...}} entries")
    return TextEncoders([TextEncoderConfig(path=e) if isinstance(e, str) else TextEncoderConfig(**e)
                         for e in entries], max_length)
