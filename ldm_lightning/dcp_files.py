"""Sharded checkpoint folders (PyTorch Distributed Checkpoint, DCP), read without running code from them.

`ldm-lightning fit` with the `fsdp2` strategy (training/fsdp2.py) writes each checkpoint as a folder named like
a file (`last.ckpt/`, `step=00000010.ckpt/`):
  * `__<rank>_0.distcp` — every rank's shards of the weights and optimizer states (DCP's files);
  * `.metadata`         — DCP's index of them: which tensor chunk lies at which offset of which file;
  * `meta.pt`           — the rest of the Lightning checkpoint (step, loops, callbacks, hyper-parameters, the
                          `ldm_lightning` tag), a plain torch file read with `weights_only=True`.

DCP itself reads `.metadata` with `pickle.load` and its non-tensor items with `torch.load(weights_only=False)`;
both could run code from a crafted folder. Here `.metadata` is read by an unpickler that builds only DCP's own
metadata classes and torch's dtype / layout / size values, and non-tensor items load with `weights_only=True`.
`SafeReader` / `SafeLoadPlanner` give DCP those readers, so a resume and an export go through them.

`validate_sharded_checkpoint` is what resume and export check before loading: the metadata parses, every
chunk it names lies inside an existing file (a truncated shard fails here), and `meta.pt` loads. It does not
catch bit flips inside tensor data. `read_full_state_dict` gathers the full (unsharded) tensors on one CPU
process, with no process group: what `ldm-lightning export` and `load_denoiser` read.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = ".metadata"  # DCP's index
META_FILE = "meta.pt"  # Lightning's non-tensor checkpoint part (lightning.fabric.utilities.load._METADATA_FILENAME)


class ShardedCheckpointError(RuntimeError):
    """A sharded checkpoint folder that is incomplete, truncated, or names objects it should not."""


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a sharded (DCP) checkpoint folder: a directory with `meta.pt` in it."""
    p = Path(path)
    return p.is_dir() and (p / META_FILE).is_file()


# What DCP's `.metadata` pickle may name besides its own metadata classes (torch.distributed.checkpoint.metadata):
# the storage index entry, torch's Size / dtype values, the layout lookup torch uses for them, the checkpoint path.
_ALSO_ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                 ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and the few values of `_ALSO_ALLOWED`; refuses anything else."""

    def find_class(self, module: str, name: str):
        import importlib
        if module == "torch.distributed.checkpoint.metadata":
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module:  # its dataclasses and enums, never a function
                return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALSO_ALLOWED:
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name} in a DCP .metadata file")


def read_metadata(path: str | os.PathLike):
    """DCP's `Metadata` of folder `path`, through the restricted unpickler."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise ShardedCheckpointError(f"checkpoint folder {path} has no {METADATA_FILE} (an unfinished save)")
    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        if "unsupported GLOBAL" in str(e):
            raise ShardedCheckpointError(f"checkpoint {file} refused: loading it could run code ({e})") from e
        raise ShardedCheckpointError(f"checkpoint {file} is truncated or corrupt ({e})") from e
    except Exception as e:  # EOFError, AttributeError, ...: a damaged file
        raise ShardedCheckpointError(f"checkpoint {file} is truncated or corrupt ({type(e).__name__}: {e})") from e


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.pt` of folder `path` (weights_only=True)."""
    file = Path(path) / META_FILE
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ShardedCheckpointError(f"checkpoint {file} cannot be loaded safely: {reason}") from e
    if not isinstance(meta, dict):
        raise ShardedCheckpointError(f"checkpoint {file} holds a {type(meta).__name__}, not a checkpoint dict")
    return meta


def validate_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a DCP folder's files (see the module docstring); returns its `meta.pt` dict. Raises
    `ShardedCheckpointError` naming the file and what is wrong."""
    p = Path(path)
    if not (p / META_FILE).is_file():
        raise ShardedCheckpointError(f"checkpoint folder {p} has no {META_FILE} (an unfinished save)")
    metadata = read_metadata(p)
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or os.sep in rel or rel.startswith("."):
            raise ShardedCheckpointError(f"checkpoint {p / METADATA_FILE} names a shard file {rel!r} outside its folder")
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    if not ends:
        raise ShardedCheckpointError(f"checkpoint {p / METADATA_FILE} lists no shard files")
    for rel, end in sorted(ends.items()):
        size = (p / rel).stat().st_size if (p / rel).is_file() else None
        if size is None:
            raise ShardedCheckpointError(f"checkpoint folder {p} lacks the shard file {rel}")
        if size < end:
            raise ShardedCheckpointError(f"checkpoint shard {p / rel} is truncated ({size} bytes; its index needs {end})")
    return read_meta(p)


def _safe_reader_and_planner(path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner

    class SafeReader(FileSystemReader):
        """DCP's file reader with `.metadata` read through the restricted unpickler."""

        def read_metadata(self, *args, **kwargs):
            from torch.distributed.checkpoint.metadata import StorageMeta
            metadata = read_metadata(self.path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    def load_bytes(self, read_item, value):  # DCP's default, but weights_only=True (it unpickles with False)
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:  # nested entries (optimizer param_groups' lr, betas...) go back where they were
            from torch.distributed.checkpoint._traverse import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj

    safe_planner = type("SafeLoadPlanner", (DefaultLoadPlanner,), {"load_bytes": load_bytes})
    safe_empty = type("SafeEmptyLoadPlanner", (_EmptyStateDictLoadPlanner,), {"load_bytes": load_bytes})
    return SafeReader(os.fspath(path)), safe_planner, safe_empty


def load_into(state: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.distributed.checkpoint.load(state, path)` (in place; every rank calls it) through the safe reader."""
    from torch.distributed.checkpoint import load
    reader, planner, _ = _safe_reader_and_planner(path)
    load(state, storage_reader=reader, planner=planner())


def read_full_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint as one plain checkpoint dict on the CPU: `meta.pt`'s entries plus `state_dict` with the
    full (gathered) model tensors. Optimizer states are left out. One process, no process group needed."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    ckpt = validate_sharded_checkpoint(path)
    reader, _, empty_planner = _safe_reader_and_planner(path)
    full: dict[str, Any] = {}
    _load_state_dict(full, storage_reader=reader, planner=empty_planner(), no_dist=True)
    model = full.get("state_dict")
    if not isinstance(model, dict):
        raise ShardedCheckpointError(f"checkpoint folder {path} holds no model state_dict")
    ckpt["state_dict"] = {k: v for k, v in model.items() if isinstance(v, torch.Tensor)}
    return ckpt


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file of folder `path`, then the folder (before the rename that publishes it)."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["ShardedCheckpointError", "is_sharded_checkpoint", "validate_sharded_checkpoint", "read_metadata",
           "read_meta", "load_into", "read_full_state_dict", "fsync_tree"]
