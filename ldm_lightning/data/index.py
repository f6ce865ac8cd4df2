"""`ldm-lightning data index DIR_OR_GLOB_OR_URLS [--out DIR]`: count the samples of WebDataset shards you already
have (img2dataset, LAION, Hugging Face, any tar writer) and write the `manifest.json` the loader needs.

    ldm-lightning data index /data/laion/                      # manifest.json beside the shards
    ldm-lightning data index '/ro/laion/{00000..00099}.tar' --out ~/laion-index   # read-only data
    ldm-lightning data index 'https://host/laion/{00000..00099}.tar' --out ~/laion-index   # remote shards
    # then: train_shards: /data/laion   (or ~/laion-index/manifest.json)

Local shards: reads only the tar headers (512 bytes per member, seeking past the data): no image is
decoded or read. http(s) shards cannot be seeked, so each is streamed once (keys only, nothing decoded);
their manifest goes to --out and its `shards_dir` is the URLs' common base.
A sample's key is its member name's basename up to the first dot (`a.b.jpg`: key `a`, extension `b.jpg`),
as in webdataset. Shards are taken in name order (gaps in the numbering are fine); when one shard ends
with the key the next one starts with, the sample was split across the two: it counts in the shard it
starts in, and the manifest records `tail_continues_in` there and `head_key` in the next one, so the
stream reads the continuation with it and skips it in the next shard (`tario.shard_blocks`): every
sample once, the exact epoch length unchanged.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

from ldm_lightning.data.shard_check import shard_stamp
from ldm_lightning.data.shards import MANIFEST, ShardSpecError, braceexpand, check_shard_name, is_http, unsafe_reason
from ldm_lightning.data.shardwriter import atomic_write_json
from ldm_lightning.data.tario import iter_blocks, scan_keys

def _shard_files(spec: str) -> list[Path]:
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(path.glob("*.tar"))
    else:
        files = sorted({Path(f) for pat in braceexpand(str(path)) for f in glob.glob(pat)})
    if not files:
        raise ShardSpecError(f"data index: no .tar shards in {spec!r} (give a folder of shards or a glob such as "
                             "'/data/laion/*.tar')")
    folders = {f.parent.resolve() for f in files}
    if len(folders) > 1:
        raise ShardSpecError(f"data index: {spec!r} matches shards in {len(folders)} folders; index one folder at a "
                             "time (a manifest describes the shards of one folder)")
    return files


def _shard_urls(spec: str) -> tuple[str, list[str]]:
    """(common base, shard names) of an http(s) URL or brace pattern of URLs."""
    urls = braceexpand(spec)
    bases = {u.rsplit("/", 1)[0] for u in urls}
    if len(bases) > 1:
        raise ShardSpecError(f"data index: {spec!r} names shards under {len(bases)} base URLs; index one folder at a "
                             "time (a manifest describes the shards of one folder)")
    return bases.pop(), [u.rsplit("/", 1)[1] for u in urls]


def _stream_keys(url: str) -> list[str]:
    """The sample keys of a shard that can only be streamed (no member kept, nothing decoded)."""
    return [k for keys, _ in iter_blocks(url, exts=()) for k in keys]


def index(files: list[Path] | list[str], base: str | None = None) -> list[dict]:
    """Manifest entries {name, num_samples[, bytes, mtime_ns, head_tail_sha256, head_key, tail_continues_in,
    unsafe_samples]} of shards in name order: local paths, or (with `base`) shard names under an http(s) base
    URL. `unsafe_samples`: how many of num_samples have a key that is absolute or climbs with '..'; they stay
    counted (the count describes the tar, as `data verify` reads it) but the loader never uses them: each is
    a bad sample (`data.max_bad_fraction`)."""
    entries, keys = [], []
    for f in files:
        name = f if base is not None else f.name
        check_shard_name(name, str(f))
        try:
            k = _stream_keys(f"{base}/{name}") if base is not None else scan_keys(str(f))
        except (EOFError, ValueError, OSError) as e:
            raise ShardSpecError(f"data index: {f if base is None else base + '/' + name} is not a readable tar "
                                 f"({e}); remove or repair it, or index a pattern that leaves it out") from None
        keys.append(k)
        entries.append({"name": name, "num_samples": len(k)} | ({} if base else shard_stamp(f)))
        unsafe = sum(unsafe_reason(key) is not None for key in k)
        if unsafe:
            entries[-1]["unsafe_samples"] = unsafe
    for i in range(1, len(files)):
        prev, cur = keys[i - 1], keys[i]
        if prev and cur and prev[-1] == cur[0]:  # the same sample at the end of one tar and the start of the next
            entries[i - 1]["tail_continues_in"] = entries[i]["name"]
            entries[i]["head_key"] = cur[0]
            entries[i]["num_samples"] -= 1  # it counts once, in the shard it starts in
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning data index", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a folder of .tar shards, a glob / brace pattern of them, or an http(s) URL "
                                  "(brace pattern) of shards (quote it)")
    p.add_argument("--out", type=Path, default=None,
                   help="write manifest.json into this folder instead of beside the shards (read-only data); "
                        "point the loader at OUT/manifest.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    remote = is_http(args.shards)
    if remote and args.out is None:
        print("ldm-lightning data index: a manifest cannot be written beside http(s) shards; add --out DIR and "
              "give the loader DIR/manifest.json", file=sys.stderr)
        return 2
    try:
        if remote:
            folder, files = _shard_urls(args.shards)
            entries = index(files, base=folder)
        else:
            files = _shard_files(args.shards)
            folder = files[0].parent.resolve()
            entries = index(files)
    except ShardSpecError as e:
        print(f"ldm-lightning data index: {e}", file=sys.stderr)
        return 2
    out = (args.out or folder).expanduser().resolve()
    manifest = {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries,
                "written_by": "ldm-lightning data index"}
    if out != folder:
        manifest["shards_dir"] = str(folder)
    out.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write_json(out / MANIFEST, manifest, indent=1)
    except OSError as e:
        print(f"ldm-lightning data index: cannot write {out / MANIFEST} ({e}); the shards' folder may be read-only: "
              "add --out DIR and give the loader DIR/manifest.json", file=sys.stderr)
        return 2
    split = sum("head_key" in e for e in entries)
    unsafe = {e["name"]: e["unsafe_samples"] for e in entries if e.get("unsafe_samples")}
    print(f"indexed {manifest['num_samples']} samples in {len(entries)} shards of {folder}"
          + (f" ({split} samples split across two shards, each counted once)" if split else "")
          + f"; wrote {out / MANIFEST}")
    if unsafe:
        n = sum(unsafe.values())
        shards = ", ".join(f"{k} ({v})" for k, v in list(unsafe.items())[:5]) + (" ..." if len(unsafe) > 5 else "")
        print(f"warning: {n} of the {manifest['num_samples']} samples have member names that are absolute or "
              f"climb with '..' (in {shards}): they are counted (the manifest describes the tars as they are) "
              f"but never used: the loader refuses each one as a bad sample, which counts against "
              f"data.max_bad_fraction ({n / max(manifest['num_samples'], 1):.2%} of the data here). Fix: re-write "
              "those shards without them (`ldm-lightning data verify` lists the shards)", file=sys.stderr)
    if out != folder:
        print(f"train with: train_shards: {out / MANIFEST}")
    return 0
