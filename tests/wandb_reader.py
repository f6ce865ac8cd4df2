"""Read back an offline W&B run (`run-<id>.wandb`) — wandb 0.31 ships no public reader for it.

File layout (W&B's LevelDB-style log, as written by wandb-core):
  header  7 bytes: b":W&B", a 2-byte magic, 1-byte version
  then 32 KiB blocks of chunks: crc32 (4, LE) | length (2, LE) | type (1: FULL, 2: FIRST, 3: MIDDLE,
  4: LAST) | payload. A record that does not fit the block is split FIRST..MIDDLE..LAST; a block tail
  shorter than a chunk header (7 bytes) is zero padding. Each reassembled payload is one protobuf
  `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass, field

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
CHUNK_HEADER = 7
FILE_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str):
    data = open(path, "rb").read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos, pending = FILE_HEADER, b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # zero padding at a block's end
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        payload = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            pending = b""
            yield _parse(payload)
        elif kind in (FIRST, MIDDLE):
            pending = (b"" if kind == FIRST else pending) + payload
        elif kind == LAST:
            yield _parse(pending + payload)
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _parse(payload: bytes) -> pb.Record:
    record = pb.Record()
    record.ParseFromString(payload)
    return record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    run_id: str
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    media_files: list[str] = field(default_factory=list)

    def values(self, key: str) -> list:
        """Every logged value of `key`, in order."""
        return [row[key] for row in self.history if key in row]


def read_run(run_dir: str) -> OfflineRun:
    """History rows, config and summary of the offline run in `run_dir` (an `offline-run-*` folder)."""
    files = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb in {run_dir}, found {files}")
    run = OfflineRun(run_id=os.path.basename(files[0])[4:-6])
    for record in iter_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            for item in record.config.update:
                value = json.loads(item.value_json)
                run.config[_key(item)] = value.get("value", value) if isinstance(value, dict) else value
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
    media = os.path.join(run_dir, "files", "media")
    run.media_files = sorted(glob.glob(os.path.join(media, "**", "*.*"), recursive=True))
    return run


def find_runs(wandb_root: str) -> list[str]:
    """`offline-run-*` folders under `<save_dir>/wandb`, oldest first."""
    return sorted(glob.glob(os.path.join(wandb_root, "wandb", "offline-run-*")))
