"""Shared fixtures. `mnist_shards`: a small real-MNIST pack made once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> dict[str, str]:
    """{"train": dir, "test": dir}: the first 2,000 train images in 8 shards of 250 and the first 500 test
    images in 4 shards of 125, packed with `ldm-lightning data pack` (each dir has a manifest.json)."""
    from ldm_lightning.data import pack

    root = tmp_path_factory.mktemp("mnist_shards")
    dirs = {}
    for split, n, per in (("train", 2000, 250), ("test", 500, 125)):
        out = root / split
        rc = pack.main(["--source", "mnist", "--split", split, "--out", str(out), "--limit", str(n),
                        "--samples-per-shard", str(per), "--no-progress"])
        assert rc == 0, f"packing MNIST {split} failed (rc={rc})"
        dirs[split] = str(out)
    return dirs
