"""Shared fixtures, made once per test session (per worker under pytest-xdist): `mnist_shards` (a small
real-MNIST pack), `tiny_ae` (an untrained tiny-mnist autoencoder export), `installed_package`, and
`classifier_cache` (one folder for every worker). Also the settings for running the suite on several
workers (`scripts/setup_and_test.sh` runs `pytest -n 2 --dist loadgroup`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config):
    # Under pytest-xdist each worker is one process meant for one core: torch in the worker, and every
    # subprocess a test starts (they inherit this environment), get one thread. Two workers with torch's
    # default of one thread per core would put 4+ spinning OpenMP threads on 2 cores, which slowed training
    # steps 3-5x here; one thread each keeps both cores busy without that.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # The longest tests go first, so that on several workers they overlap the rest instead of running alone
    # at the end (a stable sort: the order is otherwise the collection order, the same on every worker).
    items.sort(key=lambda item: 0 if item.get_closest_marker("longest") else 1)
    for item in items:
        if item.get_closest_marker("slurm"):  # the emulated cluster has few CPUs: its jobs run one test at a time
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory) -> Path:
    """The MNIST-classifier cache folder shared by the whole run (the demo and evaluation tests): under xdist
    the parent of the workers' temp folders, so the classifier is trained once, not once per worker
    (`get_or_train_classifier` holds a file lock while it trains)."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "mnist_classifier_cache"


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
    from ldm_lightning.autoencoder.export import export_autoencoder
    torch.manual_seed(0)
    return str(export_autoencoder(Autoencoder(get_preset("tiny-mnist")), tmp_path_factory.mktemp("ae") / "tiny"))


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
    """(venv, env, workdir): a wheel of this checkout installed non-editable into a fresh venv that reuses the
    test venv's dependencies (nothing is downloaded), and a working directory outside the repository."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    def run(cmd, cwd):
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "configs", src / "configs")
    shutil.copytree(root / "ldm_lightning", src / "ldm_lightning", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "whl"),
         str(src)], tmp)
    wheel = next((tmp / "whl").glob("ldm_lightning-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp)
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after its own packages
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    work = tmp / "elsewhere"
    work.mkdir()
    return venv, env, work
