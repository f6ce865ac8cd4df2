"""Shard specs → shards with their sample counts: local paths, globs, brace patterns, http(s) URLs (of a
shard or of a directory), `pipe:` commands and manifest files (the stream needs every shard's sample count
for an exact, equal epoch length).

Where the counts come from, first found wins:
1. `manifest.json` next to the shards (`data pack` / `data encode` / `data index` write it), or a manifest
   named directly (`.../manifest.json`, e.g. one `data index --out` wrote elsewhere for read-only data:
   its `shards_dir` says where the shards are);
2. img2dataset's `{shard}_stats.json` (`successes`) beside each shard;
3. a `sizes.json` ({shard name: count}, the WebDataset / open_clip convention) in the shards' folder;
4. img2dataset's `{shard}.parquet` (rows with status == "success"), when pyarrow is installed.
Without any, a `ShardSpecError` names `ldm-lightning data index DIR`, which scans the tar headers.
Only a manifest from `data index` knows samples split across two tars (see `tario.shard_blocks`); the
other sources describe writers (img2dataset) that never split one."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ldm_lightning.errors import UserError

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


def is_http(spec: str) -> bool:
    """An http(s) URL (read over the network: no seek, no listing)."""
    return re.match(r"^https?://", spec) is not None


def is_streamed(spec: str) -> bool:
    """An http(s) URL or a `pipe:` command: bytes that can only be read front to back."""
    return is_http(spec) or spec.startswith("pipe:")


class ShardSpecError(UserError, ValueError):
    """A shard spec or manifest that cannot be used as given (the message names it and the fix)."""


@dataclass(frozen=True)
class Shard:
    url: str
    """Local path, http(s) URL or `pipe:` command that yields the tar bytes."""
    num_samples: int
    """From the manifest; drives the exact epoch length."""
    bytes: int | None = None
    """File size from the manifest (None when it has none): a cheap start-up check of local shards."""
    mtime_ns: int | None = None
    """Modification time from the manifest (None in older manifests): see shard_check.py."""
    head_tail_sha256: str | None = None
    """sha256 of the size and both 64 KiB ends, from the manifest (None in older manifests): see shard_check.py."""
    head_key: str | None = None
    """Key of this shard's first sample when it is the rest of the previous shard's last one (skipped here)."""
    tail_url: str | None = None
    """The next shard, when its first sample is the rest of this shard's last one (joined here)."""


def find_manifest(shards) -> Path | None:
    """The manifest.json next to a shard spec (directory, file, glob, or a list: its first entry)."""
    if isinstance(shards, (list, tuple)):
        shards = shards[0] if shards else None
    if shards is None or is_streamed(str(shards)):
        return None
    p = Path(os.path.expanduser(str(shards)))
    cand = p / MANIFEST if p.is_dir() else Path(os.path.dirname(os.path.abspath(str(p)))) / MANIFEST
    return cand if cand.is_file() else None


def unsafe_reason(name: str) -> str | None:
    """Why `name` (a tar member key, or a name relative to a shard folder) would point outside it, or None."""
    if not name:
        return "empty name"
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "'..' path component"
    if "\x00" in name:
        return "NUL byte"
    return None


def check_shard_name(name: str, where: str) -> str:
    """A manifest's shard name must be a plain file name in the manifest's own folder."""
    why = unsafe_reason(name) or ("a path separator" if "/" in name or "\\" in name else None)
    if why or name == ".":
        raise ShardSpecError(f"{where}: shard name {name!r} is refused ({why or 'not a file name'}); a manifest may only "
                         "name shard files in its own folder (e.g. 'shard-000000.tar'): fix or re-create the manifest")
    return name


def braceexpand(s: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(s))


def _read_text(url: str) -> str:
    if is_streamed(url):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as f:
            return f.read().decode("utf-8")
    with open(url, encoding="utf-8") as f:
        return f.read()


def _read_manifest(url: str) -> dict:
    try:
        return json.loads(_read_text(url))  # not cached: a re-pack in place must be seen
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"cannot read {url} ({type(e).__name__}: {e}); the loader needs the manifest's per-shard sample "
            "counts for an exact, equal epoch length — keep manifest.json next to the shards "
            "(`ldm-lightning data pack` writes it, `ldm-lightning data index DIR` makes one for shards you "
            "already have)") from None


def _entries(man: dict, url: str) -> dict[str, dict]:
    """{shard name: Shard keyword arguments, with `tail_url` still a shard name} of a parsed manifest."""
    try:
        out = {}
        for s in man["shards"]:
            kw = {"num_samples": int(s["num_samples"]), "bytes": s.get("bytes"), "head_key": s.get("head_key"),
                  "mtime_ns": s.get("mtime_ns"), "head_tail_sha256": s.get("head_tail_sha256")}
            tail = s.get("tail_continues_in")
            kw["tail_url"] = check_shard_name(tail, url) if tail else None
            out[check_shard_name(s["name"], url)] = kw
        return out
    except (KeyError, TypeError) as e:
        raise ShardSpecError(f"{url}: not a shard manifest (each entry of 'shards' needs 'name' and 'num_samples': "
                             f"{type(e).__name__}: {e}); re-create it with `ldm-lightning data pack` or "
                             "`ldm-lightning data index`") from None


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_http(base) else os.path.join(base, name)


def _manifest_counts(base: str) -> dict[str, dict]:
    """{shard name: Shard keyword arguments} from `base/manifest.json` (base: a local dir or a URL prefix)."""
    url = _join(base, MANIFEST)
    return _entries(_read_manifest(url), url)


def _manifest_file(path: str) -> list[Shard]:
    """A manifest named directly: its shards live in its `shards_dir` (relative to the manifest) or beside it."""
    man = _read_manifest(path)
    where = os.path.dirname(path) or "."
    base = man.get("shards_dir")
    if not base:
        base = where
    elif not is_http(base) and not os.path.isabs(base) and not is_http(where):
        base = os.path.join(where, base)  # a relative shards_dir is relative to the manifest's folder
    return _shards(base, _entries(man, path))


def _shards(base: str, entries: dict[str, dict], names: list[str] | None = None) -> list[Shard]:
    out = []
    for name in (entries if names is None else names):
        kw = dict(entries[name])
        if kw.get("tail_url"):
            kw["tail_url"] = _join(base, kw["tail_url"])
        out.append(Shard(_join(base, name), **kw))
    return out


def _try_json(url: str):
    try:
        return json.loads(_read_text(url))
    except Exception:  # noqa: BLE001 - absent or unreadable: the next source is tried
        return None


def _parquet_successes(path: str) -> int | None:
    if is_streamed(path) or not os.path.isfile(path):
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    try:
        status = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    except Exception as e:  # noqa: BLE001
        log.warning("data: %s: no usable status column (%s); not used for the shard's count", path, e)
        return None
    return sum(s == "success" for s in status)


def foreign_counts(base: str, names: list[str]) -> dict[str, dict]:
    """{shard name: Shard keyword arguments} for shards without our manifest, from img2dataset's
    `_stats.json` / a `sizes.json` / img2dataset's parquet. A shard none of them counts is refused with the
    `data index` fix."""
    sizes = _try_json(_join(base, "sizes.json"))
    out, missing = {}, []
    for name in names:
        stem = name[:-4] if name.endswith(".tar") else name
        stats = _try_json(_join(base, f"{stem}_stats.json"))
        n = None
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            n = stats["successes"]
        elif isinstance(sizes, dict) and name in sizes:
            n = int(sizes[name])
        else:
            n = _parquet_successes(_join(base, f"{stem}.parquet"))
        if n is None:
            missing.append(name)
        else:
            out[name] = {"num_samples": n}
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ShardSpecError(
            f"no sample count for shard(s) {', '.join(missing[:3])}{more} in {base}: there is no {MANIFEST}, no "
            f"img2dataset _stats.json or .parquet beside them (parquet needs pyarrow) and no sizes.json. The loader "
            f"needs exact counts for an exact, equal epoch. Fix: `ldm-lightning data index {base}` (scans the tar "
            "headers, writes manifest.json; add `--out DIR` for read-only data and give the loader DIR/manifest.json)")
    return out


def _counts(base: str, names: list[str]) -> dict[str, dict]:
    """Our manifest when the folder has one, else the foreign sources for `names`."""
    try:
        return _manifest_counts(base)
    except FileNotFoundError:
        return foreign_counts(base, names)


def _shard(url: str, base: str, name: str, spec: str) -> Shard:
    counts = _counts(base, [name])
    if name not in counts:
        raise ShardSpecError(f"shard {name!r} (from {spec!r}) is not listed in {base}/{MANIFEST}")
    return replace(_shards(base, counts, [name])[0], url=url)  # a pipe: command or the URL as given


def resolve_shards(spec: str | list[str]) -> list[Shard]:
    """A directory, file, glob, brace pattern, http(s) URL (of a shard or a directory), `pipe:` command or
    manifest file (or a list of them) → shards with their sample counts (see the module docstring)."""
    if isinstance(spec, (list, tuple)):
        return [s for one in spec for s in resolve_shards(one)]
    spec = str(spec)
    if spec.startswith("pipe:"):
        shards = []
        for cmd in braceexpand(spec):
            paths = [t for t in cmd[5:].split() if t.endswith(".tar")]
            if len(paths) != 1:
                raise ShardSpecError(f"pipe: command {cmd!r} must name exactly one .tar shard (to find its manifest count)")
            base, name = paths[0].rsplit("/", 1) if "/" in paths[0] else (".", paths[0])
            shards.append(_shard(cmd, base, name, spec))
        return shards
    if spec.endswith(".json"):
        return _manifest_file(os.path.expanduser(spec) if not is_http(spec) else spec)
    if is_http(spec):
        if not spec.rstrip("/").endswith(".tar") and "{" not in spec:  # a directory URL
            base = spec.rstrip("/")
            return _shards(base, _manifest_counts(base))
        return [_shard(u, u.rsplit("/", 1)[0], u.rsplit("/", 1)[1], spec) for u in braceexpand(spec)]
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST)):  # (its `shards_dir`, if any, says where the shards are)
            return _manifest_file(os.path.join(path, MANIFEST))
        names = sorted(os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(path), "*.tar")))
        if not names:
            raise FileNotFoundError(f"shard folder {path!r} has no {MANIFEST} and no .tar shards")
        return _shards(path, foreign_counts(path, names), names)
    files = sorted(f for pat in braceexpand(path) for f in (glob.glob(pat) or [pat]))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"shard spec {spec!r}: no such file {missing[0]!r} (give a directory with "
                                "manifest.json, a glob, a brace pattern, an http(s) URL, a pipe: command or a "
                                "manifest file)")
    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(os.path.dirname(os.path.abspath(f)), []).append(os.path.basename(f))
    counts = {d: _counts(d, names) for d, names in by_dir.items()}
    out = []
    for f in files:
        d, name = os.path.dirname(os.path.abspath(f)), os.path.basename(f)
        if name not in counts[d]:
            raise ShardSpecError(f"shard {name!r} (from {spec!r}) is not listed in {d}/{MANIFEST}")
        out.append(replace(_shards(d, counts[d], [name])[0], url=f))
    return out
