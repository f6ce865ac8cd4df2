"""FID's matrix square root two ways, side by side: the (D, D) route (eigh of sigma1, then eigvalsh of
sqrt(sigma1) sigma2 sqrt(sigma1)) against the (N, N) route `fid_from_features` takes when the N generated
features are at hand and N <= D (eigvalsh of a sigma2 aᵀ). Same value; the in-training callback scores
K = 1000 samples of 2048-d Inception features, where the second route is the one that runs.

    python benchmarks/bench_fid.py [--quick] [--dim 2048] [--num 1000] [--repeats 3]

Prints the median seconds of each route, their ratio, and the relative difference of the two values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from ldm_lightning.evaluation.scores import feature_statistics, frechet_distance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="D = 512, N = 256, 2 repeats")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--num", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    d, n, reps = (512, 256, 2) if a.quick else (a.dim, a.num, a.repeats)
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)  # (D, D) shared correlation
    fake = np.maximum(rng.standard_normal((n, d)) @ mix + 0.1, 0)  # (N, D)
    real = np.maximum(rng.standard_normal((4 * d, d)) @ mix, 0)  # (4D, D): a full-rank reference
    s1, s2 = feature_statistics(fake), feature_statistics(real)
    times: dict[str, list[float]] = {"DxD": [], "NxN": []}
    values = {}
    for _ in range(reps):
        for name, extra in (("DxD", {}), ("NxN", {"features1": fake})):
            t = time.perf_counter()
            values[name] = frechet_distance(*s1, *s2, **extra)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"FID, D = {d}, N = {n} generated vs {4 * d} real, median of {reps}:")
    print(f"  (D, D) route {med['DxD']:.3f} s   (N, N) route {med['NxN']:.3f} s")
    print(f"  speedup of the (N, N) route = {med['DxD'] / med['NxN']:.2f}x; "
          f"values {values['DxD']:.6f} / {values['NxN']:.6f} (rel. diff {abs(values['DxD'] / values['NxN'] - 1):.1e})")


if __name__ == "__main__":
    main()
