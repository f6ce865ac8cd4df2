"""Reads single rows of a text-cache table (a safetensors file) from disk, so the cache costs RAM per batch, not
per cached caption.

A safetensors file is an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
data_offsets}}, `__metadata__`) and the tensors' bytes, each C-contiguous. Row r of an (N, ...) tensor is one
contiguous byte range, so a batch's captions are read with one `os.pread` per row and tensor: nothing is
memory-mapped (mapped pages would count in the process's RSS once touched) and nothing but the header stays in
memory. The page cache keeps the hot rows warm, and the kernel may drop them under memory pressure.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "BOOL": torch.bool}


class TableRows:
    """One table's header (tensor names, dtypes, shapes, byte offsets) and its metadata; rows read on demand."""

    def __init__(self, path: Path):
        self.path = str(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors = {}  # name -> (dtype, row shape, first byte, bytes per row)
        for name, t in header.items():
            dtype = DTYPES[t["dtype"]]
            shape = tuple(t["shape"])
            begin, end = t["data_offsets"]
            rows = shape[0] if shape else 1
            self.tensors[name] = (dtype, shape[1:], self.data_start + begin, (end - begin) // max(rows, 1))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def rows(self, name: str, index: list[int], fd: int) -> torch.Tensor:
        """Rows `index` of tensor `name`, stacked (len(index), ...), read from the open file `fd`."""
        dtype, row_shape, start, row_bytes = self.tensors[name]
        buf = bytearray(len(index) * row_bytes)
        view = memoryview(buf)
        for i, r in enumerate(index):
            got = os.preadv(fd, [view[i * row_bytes:(i + 1) * row_bytes]], start + r * row_bytes)
            if got != row_bytes:
                raise OSError(f"{self.path}: short read of {name} row {r} ({got} of {row_bytes} bytes); the text "
                              "cache is truncated: re-run `ldm-lightning data encode ... --text-encoders ...`")
        if not buf:
            return torch.empty((0, *row_shape), dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(len(index), *row_shape)

    def row_bytes(self) -> int:
        """Bytes of one row over all its tensors (what one cached caption costs on disk)."""
        return sum(b for _, _, _, b in self.tensors.values())
