"""Start-up of aspect-ratio bucketing: the header counting pass with and without `data.bucketing.header_cache`.

    nice -n 10 python benchmarks/bench_bucket_headers.py             # 16 shards x 500 JPEGs, 3 repeats: ~1 min
    python benchmarks/bench_bucket_headers.py --quick                 # what run_all.py --quick runs

Shards: JPEG crops (quality 90) of the `skimage.data` photos, 96-320 px high, at six aspect ratios from 1:2 to
3:1, written with the project's ShardWriter (manifest included). Each repeat, back to back in this process,
builds the bucketed stream (one rank, 2 workers: the counting pass runs in its constructor) three ways:
(a) cache off (`header_cache: null`): every shard's tar bytes read, every header parsed, as at every start
    before the cache; (b) first start with the cache (read + write one entry per shard); (c) a later start
    (restart, requeue): every shard from the cache. The process's in-memory entries are dropped before each.
Every build's counts are asserted equal. Times are medians over repeats; the ratio is taken within a repeat.
The shards sit in the page cache here: on network storage (b) and (a) also pay the transfer of every byte,
(c) one small file per shard.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm_lightning.data import header_cache
from ldm_lightning.data.bucket_stream import BucketStream
from ldm_lightning.data.buckets import BucketConfig, Buckets
from ldm_lightning.data.shards import resolve_shards
from ldm_lightning.data.shardwriter import ShardWriter
from ldm_lightning.data.transforms import ImageTransform

ASPECTS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def make_shards(out: Path, shards: int, per: int, seed: int = 0) -> None:
    from skimage import data as skd
    photos = [np.asarray(f()) for f in (skd.astronaut, skd.coffee, skd.chelsea, skd.rocket)]
    rng, records = np.random.default_rng(seed), []
    out.mkdir(parents=True)
    for s in range(shards):
        with ShardWriter(out / f"shard-{s:06d}.tar") as w:
            for i in range(per):
                p = photos[int(rng.integers(len(photos)))]
                h = int(rng.integers(96, 321))
                wd = min(p.shape[1], round(h * ASPECTS[int(rng.integers(len(ASPECTS)))]))
                h = min(h, p.shape[0])
                y, x = int(rng.integers(0, p.shape[0] - h + 1)), int(rng.integers(0, p.shape[1] - wd + 1))
                buf = io.BytesIO()
                Image.fromarray(p[y:y + h, x:x + wd]).save(buf, "JPEG", quality=90)
                w.add(f"s{s}-{i:05d}", {"jpg": buf.getvalue(), "cls": b"0"})
        records.append(w.record)
    (out / "manifest.json").write_text(json.dumps({"num_samples": shards * per, "shards": records}))


def build(shards, cache: str | None) -> tuple[float, BucketStream]:
    header_cache._MEMO.clear()  # as in a fresh process
    buckets = Buckets(BucketConfig(256 * 256, 32, 3.0, header_cache=cache), 3, True, True)
    t = time.perf_counter()
    st = BucketStream(shards, 8, num_workers=2, rank=0, world_size=1, buckets=buckets,
                      transform=ImageTransform(256, 3, "random_crop", True))
    return time.perf_counter() - t, st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 shards x 100 samples, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.shards, args.per_shard, args.repeats = 8, 100, 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "data", Path(tmp) / "headers"
        make_shards(data, args.shards, args.per_shard)
        shards = resolve_shards(str(data))
        mib = sum(Path(s.url).stat().st_size for s in shards) / 2 ** 20
        rows = []
        for _ in range(args.repeats):
            shutil.rmtree(cache, ignore_errors=True)
            (off, a), (first, b), (later, c) = build(shards, None), build(shards, str(cache)), build(shards, str(cache))
            assert (a.counts == b.counts).all() and (a.counts == c.counts).all()
            assert (b.header_scanned, c.header_hits) == (len(shards), len(shards))
            rows.append((off, first, later, off / later))
        kib = sum(f.stat().st_size for f in cache.iterdir()) / 1024
    med = [statistics.median(r[i] for r in rows) for i in range(4)]
    print(f"{args.shards} shards x {args.per_shard} JPEGs ({mib:.0f} MiB of tar, page cache warm); "
          f"cache: {kib:.0f} KiB in {args.shards} files; median of {args.repeats} repeats, 1 rank")
    print("| start-up header pass | seconds | tar bytes read |")
    print("|---|---|---|")
    print(f"| (a) cache off | {med[0]:.3f} | {mib:.0f} MiB |")
    print(f"| (b) first start, cache written | {med[1]:.3f} | {mib:.0f} MiB |")
    print(f"| (c) later start, from the cache | {med[2]:.3f} | 0 |")
    print(f"speedup later start (cache) vs cache off = {med[3]:.1f}x")


if __name__ == "__main__":
    main()
