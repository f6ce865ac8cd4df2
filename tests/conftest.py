"""Shared fixtures, made once per test session: `mnist_shards` (a small real-MNIST pack) and `tiny_ae`
(an untrained tiny-mnist autoencoder export)."""

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


@pytest.fixture(scope="session")
def tiny_ae(tmp_path_factory) -> str:
    """An untrained tiny-mnist autoencoder (32x32x1 -> 8x8x4, torch seed 0) exported to a folder: enough for
    stage-2 plumbing, DDP/DeepSpeed and resume tests, which need a frozen autoencoder but not a good one."""
    import torch

    from ldm_lightning.autoencoder import Autoencoder, get_preset
    from ldm_lightning.export import export_autoencoder
    torch.manual_seed(0)
    return str(export_autoencoder(Autoencoder(get_preset("tiny-mnist")), tmp_path_factory.mktemp("ae") / "tiny"))
