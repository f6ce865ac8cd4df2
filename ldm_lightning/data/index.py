"""`ldm-lightning data index DIR_OR_GLOB [--out DIR]`: count the samples of WebDataset shards you already
have (img2dataset, LAION, Hugging Face, any tar writer) and write the `manifest.json` the loader needs.

    ldm-lightning data index /data/laion/                      # manifest.json beside the shards
    ldm-lightning data index '/ro/laion/{00000..00099}.tar' --out ~/laion-index   # read-only data
    # then: train_shards: /data/laion   (or ~/laion-index/manifest.json)

Reads only the tar headers (512 bytes per member, seeking past the data): no image is decoded or read.
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

from ldm_lightning.data.shards import MANIFEST, ShardSpecError, _braceexpand, check_shard_name
from ldm_lightning.data.shardwriter import atomic_write_json
from ldm_lightning.data.tario import scan_keys


def _shard_files(spec: str) -> list[Path]:
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        files = sorted(path.glob("*.tar"))
    else:
        files = sorted({Path(f) for pat in _braceexpand(str(path)) for f in glob.glob(pat)})
    if not files:
        raise ShardSpecError(f"data index: no .tar shards in {spec!r} (give a folder of shards or a glob such as "
                             "'/data/laion/*.tar')")
    folders = {f.parent.resolve() for f in files}
    if len(folders) > 1:
        raise ShardSpecError(f"data index: {spec!r} matches shards in {len(folders)} folders; index one folder at a "
                             "time (a manifest describes the shards of one folder)")
    return files


def index(files: list[Path]) -> list[dict]:
    """Manifest entries {name, num_samples, bytes[, head_key, tail_continues_in]} of shards in name order."""
    entries, keys = [], []
    for f in files:
        check_shard_name(f.name, str(f))
        try:
            k = scan_keys(str(f))
        except (EOFError, ValueError, OSError) as e:
            raise ShardSpecError(f"data index: {f} is not a readable tar ({e}); remove or repair it, or index a glob "
                                 "that leaves it out") from None
        keys.append(k)
        entries.append({"name": f.name, "num_samples": len(k), "bytes": f.stat().st_size})
    for i in range(1, len(files)):
        prev, cur = keys[i - 1], keys[i]
        if prev and cur and prev[-1] == cur[0]:  # the same sample at the end of one tar and the start of the next
            entries[i - 1]["tail_continues_in"] = files[i].name
            entries[i]["head_key"] = cur[0]
            entries[i]["num_samples"] -= 1  # it counts once, in the shard it starts in
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning data index", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="a folder of .tar shards, or a glob / brace pattern of them (quote it)")
    p.add_argument("--out", type=Path, default=None,
                   help="write manifest.json into this folder instead of beside the shards (read-only data); "
                        "point the loader at OUT/manifest.json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        files = _shard_files(args.shards)
        entries = index(files)
    except ShardSpecError as e:
        print(f"ldm-lightning data index: {e}", file=sys.stderr)
        return 2
    folder = files[0].parent.resolve()
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
    print(f"indexed {manifest['num_samples']} samples in {len(entries)} shards of {folder}"
          + (f" ({split} samples split across two shards, each counted once)" if split else "")
          + f"; wrote {out / MANIFEST}")
    if out != folder:
        print(f"train with: train_shards: {out / MANIFEST}")
    return 0
