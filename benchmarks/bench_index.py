"""`data index` cost: the tar-header scan (`tario.scan_keys`, what `ldm-lightning data index` runs) against
the loader's full keys-only read (`tario.iter_blocks(path, ())`, which touches every byte), on one synthetic
img2dataset-like shard (2000 samples of a 30 kB jpg + txt + json; random bytes, nothing is decoded).

    python benchmarks/bench_index.py [--samples 2000]

Prints bytes read and the best of 3 warm-cache times of each. On a cold cache or a network file system the
bytes read decide; the warm times show the per-member Python cost of the header scan.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

import numpy as np

from ldm_lightning.data.tario import iter_blocks, scan_keys


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "00000.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
            for i in range(args.samples):
                for ext, n in (("jpg", 30000), ("txt", 60), ("json", 400)):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = n
                    t.addfile(info, io.BytesIO(rng.bytes(n)))
        size = os.path.getsize(path)
        rows = [("header scan (data index)", lambda: len(scan_keys(path)), 3 * args.samples * 512),
                ("full keys-only read (loader)", lambda: sum(len(k) for k, _ in iter_blocks(path, ())), size)]
        print(f"| shard: {size / 1e6:.1f} MB, {args.samples} samples | samples | MB read | best of 3 (ms) |")
        print("|---|---|---|---|")
        for name, f, nbytes in rows:
            f()
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                n = f()
                times.append(time.perf_counter() - t0)
            print(f"| {name} | {n} | {nbytes / 1e6:.1f} | {min(times) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
