"""`ldm-lightning data verify DIR`: check a shard folder against its manifest.json.

    ldm-lightning data verify data/mnist/train

For every shard the manifest lists: the file exists, its size and sha256 match the manifest, the tar
reads to its end, and it holds the manifest's sample count with safe member names. Prints one table row
per shard and exits 1 when any shard does not match (2 when DIR has no readable manifest), 0 otherwise.
The training loader does the cheap part at start-up (sizes, times, the first and last 64 KiB:
shard_check.py); this reads every byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ldm_lightning.data.shard_check import head_tail_sha256
from ldm_lightning.data.shards import check_shard_name, unsafe_reason
from ldm_lightning.data.shardwriter import sha256_file
from ldm_lightning.data.tario import iter_blocks


def check_shard(path: Path, entry: dict, hash_files: bool = True) -> dict:
    """{name, expected, read, bytes_ok, sha256_ok, problems: [...]} for one manifest entry."""
    row = {"name": entry["name"], "expected": int(entry["num_samples"]), "read": 0, "bytes_ok": None,
           "sha256_ok": None, "problems": []}
    if not path.is_file():
        row["problems"].append("missing")
        return row
    size = path.stat().st_size
    if entry.get("bytes") is not None:
        row["bytes_ok"] = size == entry["bytes"]
        if not row["bytes_ok"]:
            row["problems"].append(f"{size} bytes, manifest {entry['bytes']}")
    if hash_files and entry.get("sha256"):
        row["sha256_ok"] = sha256_file(path) == entry["sha256"]
        if not row["sha256_ok"]:
            row["problems"].append("sha256 differs")
    elif entry.get("head_tail_sha256"):  # `data index` records no full sha256: the sampled one is what there is
        row["sha256_ok"] = head_tail_sha256(path) == entry["head_tail_sha256"]
        if not row["sha256_ok"]:
            row["problems"].append("first or last 64 KiB differ (head_tail_sha256)")
    unsafe, first = 0, True
    try:
        for keys, _ in iter_blocks(str(path), ()):  # keys only: no member is copied out
            if first and keys and keys[0] == entry.get("head_key"):  # the rest of the previous shard's last
                keys = keys[1:]  # sample (`data index`): counted there
            first = False
            row["read"] += len(keys)
            unsafe += sum(unsafe_reason(k) is not None for k in keys)
    except (EOFError, ValueError, OSError) as e:
        row["problems"].append(f"unreadable after {row['read']} samples: {e}".replace(str(path) + ": ", ""))
    if unsafe:
        row["problems"].append(f"{unsafe} samples with unsafe member names (absolute or '..')")
    if row["read"] != row["expected"]:
        row["problems"].append(f"{row['read']} samples, manifest {row['expected']}")
    return row


def verify(folder: Path, hash_files: bool = True) -> list[dict]:
    manifest = folder / "manifest.json"
    man = json.loads(manifest.read_text())
    shards_dir = folder / man.get("shards_dir", ".")  # `data index --out`: the shards live elsewhere
    rows = []
    for entry in man["shards"]:
        check_shard_name(entry["name"], str(manifest))
        rows.append(check_shard(shards_dir / entry["name"], entry, hash_files))
    return rows


def table(rows: list[dict]) -> str:
    def mark(v):
        return "-" if v is None else ("ok" if v else "BAD")

    head = ("shard", "manifest", "read", "bytes", "sha256", "status")
    body = [(r["name"], str(r["expected"]), str(r["read"]), mark(r["bytes_ok"]), mark(r["sha256_ok"]),
             "; ".join(r["problems"]) or "ok") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ldm-lightning data verify", description=__doc__.split("\n\n")[0])
    p.add_argument("dir", type=Path, help="a shard folder holding manifest.json")
    p.add_argument("--no-sha256", action="store_true", help="skip the checksums (sizes and counts only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = verify(args.dir, not args.no_sha256)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {args.dir}: cannot read its manifest.json ({type(e).__name__}: {e}); give a folder written "
              "by `ldm-lightning data pack` or `data encode`", file=sys.stderr)
        return 2
    print(table(rows))
    bad = [r for r in rows if r["problems"]]
    total = sum(r["read"] for r in rows)
    if bad:
        print(f"\n{len(bad)} of {len(rows)} shards do not match the manifest ({total} of "
              f"{sum(r['expected'] for r in rows)} samples readable); re-pack them (`ldm-lightning data pack`)",
              file=sys.stderr)
        return 1
    print(f"\nall {len(rows)} shards match the manifest ({total} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
