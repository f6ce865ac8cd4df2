"""The persistent per-shard header cache of the aspect-bucket counting pass (`data.bucketing.header_cache`).

Bucketing (bucket_stream.py) needs, at every start, each reader group's samples per bucket. Reading every
sample's image header for that is a full read of the data by every rank; with preemption and requeue it would
be paid again at every restart. What the count needs of one shard does not depend on the bucket set, the world
size or the seed: the multiset of image (width, height) of its samples, plus how many are bad at the header
level and how many the json filters leave out. This file stores exactly that, one small JSON file per shard,
so a group's counts are sums over its shards' entries with whatever bucket set is configured.

Entry key (stored inside the file and compared on read; a mismatch re-reads the shard and rewrites the entry):
the shard's URL, and for a local file its absolute path, size and mtime (a rewritten shard is re-read); for an
http(s) / `pipe:` shard, its manifest's sample count and byte size. Also: the manifest count, the split-sample
fields (head_key, tail shard and its size/mtime), the member options (`MemberSpec`: which member is the image,
the class/caption parsing and the json filters decide "bad" and "left out") and FORMAT_VERSION. A shard that
could not be read to its end (missing samples, a network error) is never stored: that may be transient.

Where: `header_cache: auto` (the default) keeps entries in a `.ldm-bucket-headers/` folder beside the shards
when that folder can be written (shared by every node that sees the data), else in
`$LDM_LIGHTNING_CACHE/bucket-headers` (default `~/.cache/ldm-lightning/bucket-headers`), where http(s) and
`pipe:` shards always go; a path puts every entry there; null turns the cache off (the pass is then paid at
every start). Files are written atomically (fileio.atomic_write, without fsync: a lost entry is only a
miss), so ranks writing the same entry at once leave one complete file; an unreadable or malformed file is
reported with a warning and re-read, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ldm_lightning.data.shards import Shard, is_streamed
from ldm_lightning.fileio import atomic_write_json

FORMAT_VERSION = 1
BESIDE = ".ldm-bucket-headers"
log = logging.getLogger(__name__)
_MEMO: dict[tuple, Any] = {}  # (entry key, tally tag) -> tallied row: a second stream in this process reads none


class ShardHeaders:
    """What the counting pass needs of one shard: image sizes with their sample counts (int64 arrays w, h, n
    of equal length, one entry per distinct size), and how many samples are bad or left out by the filters."""

    def __init__(self, w: np.ndarray, h: np.ndarray, n: np.ndarray, bad: int, filtered: int, complete: bool = True):
        self.w, self.h, self.n, self.bad, self.filtered = w, h, n, bad, filtered
        self.complete = complete
        """False when the shard could not be read to its end (then it is not stored)."""

    @classmethod
    def from_sizes(cls, sizes: dict[tuple[int, int], int], bad: int, filtered: int,
                   complete: bool = True) -> "ShardHeaders":
        wh = sorted(sizes)
        w, h = (np.array([p[i] for p in wh], np.int64) for i in (0, 1))
        return cls(w, h, np.array([sizes[p] for p in wh], np.int64), bad, filtered, complete)

    def to_json(self) -> dict:
        return {"w": self.w.tolist(), "h": self.h.tolist(), "n": self.n.tolist(), "bad": self.bad,
                "filtered": self.filtered}

    @classmethod
    def from_json(cls, d: dict) -> "ShardHeaders":
        cols = [np.asarray(d[k]) for k in ("w", "h", "n")]
        if any(c.ndim != 1 or len(c) != len(cols[0]) or (len(c) and c.dtype.kind != "i") for c in cols) or \
                (len(cols[2]) and cols[2].min() < 1):
            raise ValueError("malformed w / h / n columns")
        bad, filtered = d["bad"], d["filtered"]
        if type(bad) is not int or type(filtered) is not int or bad < 0 or filtered < 0:
            raise ValueError(f"malformed bad/filtered counts {bad!r}, {filtered!r}")
        return cls(*(c.astype(np.int64) for c in cols), bad, filtered)


def user_cache_dir() -> Path:
    """`$LDM_LIGHTNING_CACHE/bucket-headers`, default `~/.cache/ldm-lightning/bucket-headers`."""
    return Path(os.environ.get("LDM_LIGHTNING_CACHE", Path.home() / ".cache" / "ldm-lightning")) / "bucket-headers"


def _stat(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def entry_key(shard: Shard, members: str) -> dict | None:
    """The key an entry must match to be used; None when the shard cannot be keyed (a missing local file)."""
    key = {"version": FORMAT_VERSION, "num_samples": shard.num_samples, "head_key": shard.head_key,
           "members": members}
    if is_streamed(shard.url):
        key.update(url=shard.url, bytes=shard.bytes, tail=shard.tail_url)
        return key
    st = _stat(shard.url)
    if st is None:
        return None
    key.update(url=os.path.abspath(shard.url), **st)
    if shard.tail_url is not None:  # its first sample's members join this shard's last sample
        key["tail"] = {"url": os.path.abspath(shard.tail_url), **(_stat(shard.tail_url) or {})}
    return key


class HeaderCache:
    """Entries of one configuration (`folder`: 'auto', a path, or None = off); counts its hits and misses."""

    def __init__(self, folder: str | None):
        self.folder = None if folder in (None, "auto") else os.path.expanduser(folder)
        self.enabled = folder is not None
        self.hits = self.scanned = 0
        self.where: set[str] = set()
        self._writable: dict[str, bool] = {}
        self._warned_write = False

    def path(self, shard: Shard, key: dict) -> Path:
        tars = [t for t in shard.url.split() if ".tar" in t] or [shard.url]  # a pipe: command names its shard
        name = os.path.basename(tars[-1].strip("'\"").split("?")[0])
        name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80] or "shard"  # a URL's query string, a pipe's quotes
        digest = hashlib.sha256(json.dumps([key["url"], key["members"], key["version"]]).encode()).hexdigest()[:16]
        return self._dir(shard) / f"{name}.{digest}.json"

    def _dir(self, shard: Shard) -> Path:
        if self.folder is not None:
            return Path(self.folder)
        if is_streamed(shard.url):
            return user_cache_dir()
        beside = os.path.join(os.path.dirname(os.path.abspath(shard.url)), BESIDE)
        if beside not in self._writable:
            try:
                os.makedirs(beside, exist_ok=True)
                self._writable[beside] = os.access(beside, os.W_OK)
            except OSError:
                self._writable[beside] = False
        return Path(beside) if self._writable[beside] else user_cache_dir()

    def tally(self, shard: Shard, members: str, scan: Callable[[Shard], ShardHeaders],
              tally: Callable[[ShardHeaders], Any], tag: Any) -> Any:
        """`tally` of a shard's entry (e.g. its samples per bucket; `tag` names what tally computes): from this
        process's memory, else from the cache folder, else from `scan(shard)` (which reads its headers), stored
        when the shard was read to its end. Memory keeps only tallies: entries can be large."""
        key = entry_key(shard, members)
        if key is None:  # a missing local file: its samples are all missing (bad), nothing to key by
            self.scanned += 1
            return tally(scan(shard))
        memo = (json.dumps(key, sort_keys=True), tag)
        if memo in _MEMO:
            self.hits += 1
            return _MEMO[memo]
        headers = self.load(shard, key) if self.enabled else None
        if headers is not None:
            self.hits += 1
        else:
            self.scanned += 1
            headers = scan(shard)
            if not headers.complete:
                return tally(headers)  # maybe transient (a network error): read again next time
            if self.enabled:
                self.store(shard, key, headers)
        _MEMO[memo] = row = tally(headers)
        return row

    def load(self, shard: Shard, key: dict) -> ShardHeaders | None:
        """The stored entry, or None (absent, stale, or unreadable: the latter with a warning)."""
        path = self.path(shard, key)
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
            if not isinstance(d, dict) or not isinstance(d.get("key"), dict):
                raise ValueError("not a header-cache entry")
            if d["key"] != key:
                return None  # stale: the shard (or the member options) changed; re-read and rewrite it
            headers = ShardHeaders.from_json(d)
            self.where.add(str(path.parent))
            return headers
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001  (truncated, hand-edited, not JSON: recompute, never crash)
            log.warning("data: bucketing: ignoring the unreadable header-cache file %s (%s: %s); re-reading the "
                        "headers of %s", path, type(e).__name__, e, shard.url)
            return None

    def store(self, shard: Shard, key: dict, headers: ShardHeaders) -> None:
        path = self.path(shard, key)
        try:
            # no fsync: a lost or emptied entry is only a miss (read again), and syncs cost ~12 ms a shard
            atomic_write_json(path, {"key": key, **headers.to_json()}, indent=None, durable=False)
            self.where.add(str(path.parent))
        except OSError as e:
            if not self._warned_write:
                self._warned_write = True
                log.warning("data: bucketing: cannot write the header cache %s (%s); the header pass will be "
                            "paid again at the next start: set data.bucketing.header_cache to a writable folder",
                            path.parent, e)
