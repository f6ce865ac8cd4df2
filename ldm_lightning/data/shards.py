"""Shard specs → shards with their sample counts: local paths, globs, brace patterns, http(s) URLs (of a
shard or of a directory) and `pipe:` commands, each resolved against the `manifest.json` next to it
(the stream needs every shard's sample count for an exact, equal epoch length)."""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

from ldm_lightning.errors import UserError


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


def size_problems(shards: list[Shard]) -> list[str]:
    """Local shards that are missing, empty, or not the size their manifest records (one stat each)."""
    out = []
    for s in shards:
        if re.match(r"^(https?|pipe):", s.url):
            continue
        try:
            size = os.path.getsize(s.url)
        except OSError:
            out.append(f"{s.url}: missing")
            continue
        if size == 0 and s.num_samples:
            out.append(f"{s.url}: 0 bytes, but the manifest lists {s.num_samples} samples")
        elif s.bytes is not None and size != s.bytes:
            out.append(f"{s.url}: {size} bytes, the manifest says {s.bytes}")
    return out


def _braceexpand(s: str) -> list[str]:
    import braceexpand

    return list(braceexpand.braceexpand(s))


def _read_text(url: str) -> str:
    if re.match(r"^(https?|pipe):", url):
        from webdataset.gopen import gopen

        with gopen(url, "rb") as f:
            return f.read().decode("utf-8")
    with open(url, encoding="utf-8") as f:
        return f.read()


def _manifest_counts(base: str) -> dict[str, tuple[int, int | None]]:
    """{shard name: (num_samples, bytes)} from `base/manifest.json` (base: a local dir or a URL prefix)."""
    url = base.rstrip("/") + "/manifest.json"  # not cached: a re-pack in place must be seen
    try:
        man = json.loads(_read_text(url))
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(
            f"cannot read {url} ({type(e).__name__}: {e}); the loader needs the manifest's per-shard sample "
            "counts for an exact, equal epoch length — keep manifest.json next to the shards "
            "(`ldm-lightning data pack` writes it)") from None
    try:
        return {check_shard_name(s["name"], url): (int(s["num_samples"]), s.get("bytes")) for s in man["shards"]}
    except (KeyError, TypeError) as e:
        raise ShardSpecError(f"{url}: not a shard manifest (each entry of 'shards' needs 'name' and 'num_samples': "
                         f"{type(e).__name__}: {e}); re-create it with `ldm-lightning data pack`") from None


def _shard(url: str, base: str, name: str, spec: str) -> Shard:
    counts = _manifest_counts(base)
    if name not in counts:
        raise ShardSpecError(f"shard {name!r} (from {spec!r}) is not listed in {base}/manifest.json")
    return Shard(url, *counts[name])


def resolve_shards(spec: str | list[str]) -> list[Shard]:
    """A directory, file, glob, brace pattern, http(s) URL (of a shard or a directory) or `pipe:` command
    (or a list of them) → shards with their manifest sample counts."""
    if isinstance(spec, (list, tuple)):
        return [s for one in spec for s in resolve_shards(one)]
    spec = str(spec)
    if spec.startswith("pipe:"):
        shards = []
        for cmd in _braceexpand(spec):
            paths = [t for t in cmd[5:].split() if t.endswith(".tar")]
            if len(paths) != 1:
                raise ShardSpecError(f"pipe: command {cmd!r} must name exactly one .tar shard (to find its manifest count)")
            base, name = paths[0].rsplit("/", 1) if "/" in paths[0] else (".", paths[0])
            shards.append(_shard(cmd, base, name, spec))
        return shards
    if re.match(r"^https?://", spec):
        if not spec.rstrip("/").endswith(".tar") and "{" not in spec:  # a directory URL
            base = spec.rstrip("/")
            return [Shard(f"{base}/{n}", *c) for n, c in _manifest_counts(base).items()]
        return [_shard(u, u.rsplit("/", 1)[0], u.rsplit("/", 1)[1], spec) for u in _braceexpand(spec)]
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return [Shard(os.path.join(path, n), *c) for n, c in _manifest_counts(path).items()]
    files = sorted(f for pat in _braceexpand(path) for f in (glob.glob(pat) or [pat]))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"shard spec {spec!r}: no such file {missing[0]!r} (give a directory with "
                                "manifest.json, a glob, a brace pattern, an http(s) URL or a pipe: command)")
    counts = {d: _manifest_counts(d) for d in {os.path.dirname(os.path.abspath(f)) for f in files}}
    out = []
    for f in files:
        d, name = os.path.dirname(os.path.abspath(f)), os.path.basename(f)
        if name not in counts[d]:
            raise ShardSpecError(f"shard {name!r} (from {spec!r}) is not listed in {d}/manifest.json")
        out.append(Shard(f, *counts[d][name]))
    return out
