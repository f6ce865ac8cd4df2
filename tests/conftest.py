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
