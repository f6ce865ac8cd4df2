"""Loader throughput on img2dataset-style shards (256² JPEG, no manifest: counts from `_stats.json`), side by side:

    nice -n 10 python benchmarks/bench_loader_foreign.py              # 400 samples, 3 paired repeats: ~1 min
    nice -n 10 python benchmarks/bench_loader_foreign.py --samples 2000 --repeats 5
    python benchmarks/bench_loader_foreign.py --quick                 # what run_all.py --quick runs

Shards: `{00000}.tar` with `{key}.jpg` / `.txt` / `.json` and `{00000}_stats.json`, as img2dataset writes them,
made from random crops of the `skimage.data` photos resized to 256² (JPEG quality 90).
(a) ours: one epoch of `ShardDataModule` (tar reading, shuffle buffer, JPEG decode, center crop, batch of 32;
    uint8 batches, as the training loop gets them), in this process (num_workers=0: one core each, so the
    ratios compare per-core work on this shared 2-core machine).
(b) decode-only limit: PIL decoding the same JPEG bytes, already in memory, nothing else.
(c) webdataset: the reference library's own pipeline on the same shards:
    `WebDataset(urls).shuffle(100).decode("rgb8").to_tuple("jpg").batched(32)`.
(d) decoders: PIL vs `torchvision.io.decode_jpeg` on the same bytes (time per image and the largest pixel
    difference between the two).
Each repeat measures all of them back to back and every ratio is taken within its repeat (the machine's speed
drifts); the table shows the median over repeats.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_shards(out: Path, samples: int, per_shard: int, size: int = 256, seed: int = 0) -> list[bytes]:
    """img2dataset layout from real photos; returns every image's JPEG bytes."""
    from skimage import data as skd
    photos = [np.asarray(f()) for f in (skd.astronaut, skd.coffee, skd.chelsea, skd.rocket, skd.immunohistochemistry,
                                        skd.hubble_deep_field, skd.retina, skd.cat)]
    rng, jpgs = np.random.default_rng(seed), []
    out.mkdir(parents=True, exist_ok=True)
    for s, start in enumerate(range(0, samples, per_shard)):
        n = min(per_shard, samples - start)
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(n):
                p = photos[int(rng.integers(len(photos)))]
                side = int(rng.integers(min(p.shape[:2]) // 2, min(p.shape[:2]) + 1))
                y, x = int(rng.integers(0, p.shape[0] - side + 1)), int(rng.integers(0, p.shape[1] - side + 1))
                img = Image.fromarray(p[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                key = f"{s:05d}{i:04d}"
                meta = {"url": f"https://example.com/{key}.jpg", "caption": f"photo {key}", "width": size,
                        "height": size, "original_width": side, "original_height": side, "status": "success"}
                for ext, data in (("jpg", buf.getvalue()), ("txt", meta["caption"].encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                jpgs.append(buf.getvalue())
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed_to_download": 0}))
    return jpgs


def decode_pil(jpgs: list[bytes]) -> float:
    t = time.perf_counter()
    for b in jpgs:
        np.asarray(Image.open(io.BytesIO(b), formats=("JPEG",)).convert("RGB"))
    return len(jpgs) / (time.perf_counter() - t)


def decode_torchvision(jpgs: list[bytes]) -> float:
    from torchvision.io import decode_jpeg
    t = time.perf_counter()
    for b in jpgs:
        decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))  # (3, H, W) uint8
    return len(jpgs) / (time.perf_counter() - t)


def ours(root: Path, batch: int, decoder: str) -> float:
    from ldm_lightning.data import ShardDataModule
    dm = ShardDataModule(str(root), batch_size=batch, num_workers=0, image_size=256, channels=3,
                         resize_mode="center_crop", shuffle_buffer=100, rank=0, world_size=1, val_samples=1,
                         jpeg_decoder=decoder)
    t, n = time.perf_counter(), 0
    for b in dm.train_dataloader():
        n += b["image"].shape[0]  # (B, 3, 256, 256) uint8
    return n / (time.perf_counter() - t)


def webdataset_pipeline(root: Path, batch: int) -> float:
    import webdataset as wds
    urls = sorted(str(p) for p in root.glob("*.tar"))
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(100).decode("rgb8") \
        .to_tuple("jpg").batched(batch, partial=False)
    t, n = time.perf_counter(), 0
    for (imgs,) in ds:
        n += len(imgs)  # (B, 256, 256, 3) uint8
    return n / (time.perf_counter() - t)


def max_pixel_difference(jpgs: list[bytes]) -> tuple[int, float]:
    from torchvision.io import decode_jpeg
    worst, mean = 0, 0.0
    for b in jpgs:
        a = np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).transpose(2, 0, 1).astype(np.int16)
        c = decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)).numpy().astype(np.int16)
        d = np.abs(a - c)
        worst, mean = max(worst, int(d.max())), mean + float(d.mean()) / len(jpgs)
    return worst, mean


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=400)
    p.add_argument("--per-shard", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="200 samples, 2 repeats (run_all.py --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats = 200, 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "i2d"
        jpgs = make_shards(root, args.samples, args.per_shard)
        worst, mean = max_pixel_difference(jpgs)
        rates: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}
        ours(root, args.batch, "torchvision"), webdataset_pipeline(root, args.batch)  # warm-up: imports, page cache
        for r in range(args.repeats):
            limit = decode_pil(jpgs)
            rep = {"decode-only limit (PIL)": limit,
                   "decode-only, torchvision.io.decode_jpeg": decode_torchvision(jpgs),
                   "ours (ShardDataModule, jpeg_decoder=torchvision: default)": ours(root, args.batch, "torchvision"),
                   "ours (ShardDataModule, jpeg_decoder=pil)": ours(root, args.batch, "pil"),
                   "webdataset pipeline (PIL)": webdataset_pipeline(root, args.batch)}
            fast, pil = rep["ours (ShardDataModule, jpeg_decoder=torchvision: default)"], \
                rep["ours (ShardDataModule, jpeg_decoder=pil)"]
            for k, v in rep.items():
                rates.setdefault(k, []).append(v)
            for k, v in (("ours (default) / decode-only limit (PIL)", fast / limit),
                         ("ours (jpeg_decoder=pil) / decode-only limit (PIL)", pil / limit),
                         ("ours (default) / webdataset", fast / rep["webdataset pipeline (PIL)"]),
                         ("ours (jpeg_decoder=pil) / webdataset", pil / rep["webdataset pipeline (PIL)"]),
                         ("ours: jpeg_decoder torchvision / pil", fast / pil),
                         ("decode only: torchvision / PIL", rep["decode-only, torchvision.io.decode_jpeg"] / limit)):
                ratios.setdefault(k, []).append(v)
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rep.items()),
                  file=sys.stderr, flush=True)
    print(f"{args.samples} img2dataset-style samples, 256² JPEG q90, batch {args.batch}, one process, "
          f"torch threads 1; median of {args.repeats} paired repeats")
    print("| measure | value |\n|---|---|")
    for k, v in rates.items():
        print(f"| {k} | {statistics.median(v):.0f} images/s |")
    for k, v in ratios.items():
        print(f"| {k} | {statistics.median(v):.2f} |")
    print(f"| torchvision vs PIL pixels: max abs difference / mean | {worst} / {mean:.3f} |")
    for k in ("ours (default) / decode-only limit (PIL)", "ours (default) / webdataset",
              "decode only: torchvision / PIL"):  # the lines run_all.py collects
        print(f"ratio img2dataset JPEG 256², {k} = {statistics.median(ratios[k]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
