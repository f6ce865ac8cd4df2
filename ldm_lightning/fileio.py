"""Files that are either complete or absent: the one temp-file + fsync + rename helper of the package.

A SIGKILL, node loss or full disk in the middle of a write must leave either the old file or the new one
under the real name, never half a file. Every writer of shards, manifests, checkpoints, caches and
exports goes through `atomic_write` (or its two shorthands). Standard library only: any subpackage may
import this leaf.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any


def _file_mode() -> int:
    # What a plain open() would give (mkstemp gives 0600). Read per call: os.umask has no getter, and
    # changing it at import time would be a process-wide side effect.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside `directory` durable (without it a power loss can forget the new entry)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return  # platforms without directory file descriptors
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on a clean exit flush, fsync and rename it over `path`.

    On an exception the temp file is removed and `path` is untouched. The temp file lives in the
    target's directory because `os.replace` is only atomic within one filesystem. `durable=False` skips
    both fsyncs (milliseconds a file; benchmarks/README.md): only for caches whose reader treats an
    unreadable file as a miss, since after a power loss some filesystems may keep the new name with
    empty contents. Concurrent writers still never expose half a file.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, durable: bool = True) -> None:
    with atomic_write(path, "w", durable) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
