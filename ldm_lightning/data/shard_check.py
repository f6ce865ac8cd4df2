"""The start-up check of local shards against their manifest (`data.init_args.shard_check`), and the stamp
that `data pack`, `data encode` and `data index` record for it.

Reading every byte (sha256) is `ldm-lightning data verify`'s job: minutes for a large dataset. At start-up
only what is cheap is compared, per local shard:

- it exists, and its size is the manifest's `bytes` (one stat);
- its `head_tail_sha256` (sha256 of the file size as 8 little-endian bytes, its first 64 KiB and its last
  64 KiB; the whole file when it is smaller than 128 KiB): 128 KiB read per shard. A tar replaced by
  another of the same size differs there: the first members' names and data, the last members and the
  end-of-archive padding;
- its modification time (`mtime_ns`). A shard whose time differs but whose size and head_tail_sha256 match
  was copied without its times (`cp -r`, `rsync` without `-t`) or touched: it is accepted with a note,
  since refusing every copied dataset would train users to turn the check off. Without a recorded
  head_tail_sha256 a different time counts as a change.

What is not checked: bytes in the middle of a same-size shard whose time and ends match (only `data
verify` finds that); http(s) and `pipe:` shards (nothing local to stat; `data verify` needs local files);
manifests written before these fields existed (sizes only, said once at start-up); shards counted from
img2dataset's stats or a sizes.json (only that they exist).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ldm_lightning.data.shards import Shard, is_streamed
from ldm_lightning.errors import UserError

SAMPLED_BYTES = 64 * 1024
"""Bytes hashed at each end of a shard by `head_tail_sha256`."""
SHARD_CHECKS = ("strict", "warn", "off")


class ShardChangedError(UserError):
    """Local shards that differ from their manifest, under `shard_check: strict` (the message names them)."""


def head_tail_sha256(path: str | os.PathLike, size: int | None = None) -> str:
    """sha256 of (size as 8 little-endian bytes, the first and the last SAMPLED_BYTES) of a file."""
    size = os.path.getsize(path) if size is None else size
    h = hashlib.sha256(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= 2 * SAMPLED_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(SAMPLED_BYTES))
            f.seek(size - SAMPLED_BYTES)
            h.update(f.read(SAMPLED_BYTES))
    return h.hexdigest()


def shard_stamp(path: str | os.PathLike) -> dict:
    """What the start-up check compares, for a manifest entry: {bytes, mtime_ns, head_tail_sha256}."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "head_tail_sha256": head_tail_sha256(path, st.st_size)}


@dataclass
class ShardCheck:
    """What `check_shards` found among a list of shards."""

    changed: list[str] = field(default_factory=list)
    """'<url>: <what differs>' for each missing, resized or rewritten local shard."""
    retimed: list[str] = field(default_factory=list)
    """Local shards whose time differs from the manifest's while size and head_tail_sha256 match (accepted)."""
    size_only: int = 0
    """Local shards whose manifest records a size but no time and no head_tail_sha256 (older manifests)."""
    unrecorded: int = 0
    """Local shards whose manifest records no size at all (counts from img2dataset stats, a sizes.json)."""
    remote: int = 0
    """http(s) / pipe: shards: not checked."""
    local: int = 0


def merge_checks(parts: list[ShardCheck]) -> ShardCheck:
    """One ShardCheck from the parts that ranks checked (shards r::world each), in shard order by name."""
    out = ShardCheck()
    for p in parts:
        out.changed += p.changed
        out.retimed += p.retimed
        out.size_only += p.size_only
        out.unrecorded += p.unrecorded
        out.remote += p.remote
        out.local += p.local
    out.changed.sort()
    out.retimed.sort()
    return out


def _when(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _difference(s: Shard) -> tuple[str | None, bool]:
    """(what differs between a local shard and its manifest entry or None, whether only the time differs)."""
    try:
        st = os.stat(s.url)
    except OSError as e:
        return f"missing ({e.strerror})", False
    if st.st_size == 0 and s.num_samples:
        return f"0 bytes, but the manifest lists {s.num_samples} samples", False
    if s.bytes is not None and st.st_size != s.bytes:
        return f"{st.st_size} bytes, the manifest says {s.bytes}", False
    retimed = s.mtime_ns is not None and st.st_mtime_ns != s.mtime_ns
    when = f"modified {_when(st.st_mtime_ns)}, the manifest says {_when(s.mtime_ns)}" if retimed else ""
    if s.head_tail_sha256 is not None:
        try:
            same = head_tail_sha256(s.url, st.st_size) == s.head_tail_sha256
        except OSError as e:
            return f"unreadable ({e.strerror})", False
        if not same:
            return "same size, but its first or last 64 KiB differ from the manifest's" + (
                f" ({when})" if when else " (same modification time)"), False
        return None, retimed
    if retimed:  # nothing else to tell a copy from a replacement by
        return f"same size, but {when}", False
    return None, False


def check_shards(shards: list[Shard]) -> ShardCheck:
    """Compare every local shard with its manifest entry (one stat, plus 128 KiB read where the manifest has
    a head_tail_sha256); see the module docstring for what is and is not checked."""
    out = ShardCheck()
    for s in shards:
        if is_streamed(s.url):
            out.remote += 1
            continue
        out.local += 1
        what, retimed = _difference(s)
        if what is not None:
            out.changed.append(f"{s.url}: {what}")
        elif retimed:
            out.retimed.append(s.url)
        elif s.bytes is None:
            out.unrecorded += 1
        elif s.mtime_ns is None and s.head_tail_sha256 is None:
            out.size_only += 1
    return out


def _folder(url: str) -> str:
    return os.path.dirname(url) or "."


def _listed(items: list[str], n: int = 5) -> str:
    return "; ".join(items[:n]) + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def changed_message(check: ShardCheck, mode: str) -> str:
    """The paragraph naming changed shards and the fixes (an error under strict, a warning under warn)."""
    folder = _folder(check.changed[0].split(": ", 1)[0])
    head = (f"{len(check.changed)} of {check.local} local shard(s) differ from their manifest: "
            f"{_listed(check.changed)}. These are not the files the manifest describes (its sample counts, sizes and checksums)")
    fixes = (f"`ldm-lightning data verify {folder}` reads every byte and names what is wrong; then re-run the "
             "command that wrote the shards (`data pack` with the same arguments redoes the shards that no longer "
             "match; `data encode`; `data index DIR` for shards written elsewhere)")
    if mode == "strict":
        return (f"{head}. Fix: {fixes}, or set data.init_args.shard_check: warn to train on them as they are "
                "(their unreadable samples then count as bad samples, up to data.init_args.max_bad_fraction)")
    return f"warning: {head}; training anyway (shard_check: warn): their unreadable samples count as bad samples. " \
           f"Check: {fixes}"


def notes(check: ShardCheck) -> list[str]:
    """One line for each kind of shard that was checked only in part or not at all (never skipped silently)."""
    out = []
    if check.retimed:
        out.append(f"note: {len(check.retimed)} shard(s) have another modification time than their manifest "
                   f"records but the same size and first and last 64 KiB (copied without keeping times, or "
                   f"touched), e.g. {check.retimed[0]}: accepted; `ldm-lightning data verify "
                   f"{_folder(check.retimed[0])}` reads every byte")
    if check.size_only:
        out.append(f"note: the manifest of {check.size_only} local shard(s) records no modification time and no "
                   "head_tail_sha256 (written by an older ldm-lightning): only their sizes are checked at start-up, "
                   "so a replacement of the same size goes unnoticed; re-create the manifest (re-run `data pack` or "
                   "`data encode`, or `data index DIR`) to record them; `data verify` reads every byte")
    if check.unrecorded:
        out.append(f"note: {check.unrecorded} local shard(s) have no recorded size (counts from img2dataset stats "
                   "or a sizes.json): only that they exist is checked at start-up; `ldm-lightning data index DIR` "
                   "records sizes, times and head_tail_sha256")
    if check.remote:
        out.append(f"note: {check.remote} http(s) / pipe: shard(s) are not compared with their manifest at "
                   "start-up (nothing local to check)")
    return out
