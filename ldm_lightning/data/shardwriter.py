"""Writing WebDataset shards: the one place `data pack` and `data encode` write tars and their manifests.

A shard is written to a temporary name beside its final one, fsynced and renamed
(`ldm_lightning.fileio.atomic_write`), so an interrupted writer never leaves a truncated shard under a
final name. Tar headers carry fixed metadata (mtime 0, uid 0, mode 0644), so the same samples give
byte-identical shards and a reproducible sha256. Member names are checked before they are written: a
sample key that is absolute or climbs out with `..` (e.g. copied from a hostile input shard) is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

from ldm_lightning.data.shard_check import shard_stamp
from ldm_lightning.data.shards import unsafe_reason
from ldm_lightning.fileio import atomic_write, atomic_write_json

__all__ = ["ShardWriter", "UnsafeName", "atomic_write_json", "check_key", "manifest_entry", "sha256_file",
           "shard_record"]
MANIFEST_FIELDS = ("name", "num_samples", "bytes", "mtime_ns", "head_tail_sha256", "sha256")
"""A shard's fields in manifest.json (`mtime_ns` and `head_tail_sha256`: the loader's start-up check)."""


class UnsafeName(ValueError):
    """A sample key that would put a tar member outside its shard folder."""


def check_key(key: str) -> str:
    """A sample key that is safe to write as a tar member prefix (raises UnsafeName otherwise)."""
    why = unsafe_reason(key)
    if why:
        raise UnsafeName(f"unsafe sample key {key!r} ({why}): refused, tar member names must stay inside the shard")
    return key


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_record(path: Path, num_samples: int) -> dict:
    """The manifest entry of a finished shard: {name, num_samples, bytes, mtime_ns, head_tail_sha256, sha256}."""
    return {"name": path.name, "num_samples": num_samples, **shard_stamp(path), "sha256": sha256_file(path)}


def manifest_entry(record: dict) -> dict:
    """A shard record's manifest fields (records of older runs may lack the start-up check's)."""
    return {k: record[k] for k in MANIFEST_FIELDS if k in record}


class ShardWriter:
    """Write samples ({ext: bytes} under a key) into `path` atomically:

        with ShardWriter(out / "shard-000000.tar") as w:
            w.add("mnist-train-000000", {"png": ..., "cls": b"3"})
        w.record  # {name, num_samples, bytes, mtime_ns, head_tail_sha256, sha256}

    Members are written in a fixed order (json last), so a sample's bytes do not depend on dict order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.num_samples = 0
        self.record: dict | None = None

    def __enter__(self) -> "ShardWriter":
        self._file_cm = atomic_write(self.path, "wb")
        self._tar = tarfile.open(fileobj=self._file_cm.__enter__(), mode="w", format=tarfile.USTAR_FORMAT)
        return self

    def add(self, key: str, sample: dict[str, bytes]) -> None:
        check_key(key)
        for ext in sorted(sample, key=lambda e: (e == "json", e)):
            self._member(f"{key}.{ext}", sample[ext])
        self.num_samples += 1

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            self._tar.close()
        finally:
            # atomic_write renames the temp file over `path` only on a clean exit; else removes it
            self._file_cm.__exit__(exc_type, exc, tb)
        if exc_type is None:
            self.record = shard_record(self.path, self.num_samples)
        return False
