"""The trained-once MNIST classifier cache: one file per recipe (a hash of it in the name), and a file lock
so that concurrent callers (several DDP ranks) train it once."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from ldm_lightning.encoders.mnist_classifier import (
    FORMAT_VERSION,
    ClassifierConfig,
    MNISTClassifier,
    load_mnist_classifier,
)
from ldm_lightning.encoders.mnist_classifier_training import ClassifierTrainConfig, train_mnist_classifier


def default_cache_dir() -> Path:
    """`$LDM_LIGHTNING_CACHE` if set, else `~/.cache/ldm-lightning`."""
    return Path(os.environ.get("LDM_LIGHTNING_CACHE", Path.home() / ".cache" / "ldm-lightning"))


def _cache_key(model_config: ClassifierConfig, train_config: ClassifierTrainConfig) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "model": asdict(model_config), "train": asdict(train_config)},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def get_or_train_classifier(
    cache_dir: str | os.PathLike | None = None,
    epochs: int = 3,
    seed: int = 0,
    *,
    model_config: ClassifierConfig | None = None,
    device: str | torch.device = "cpu",
    verbose: bool = True,
    **train_options,
) -> MNISTClassifier:
    """Load the cached classifier for this recipe, training it first if it is not in `cache_dir` yet.

    The file name carries a hash of the full recipe, so a changed recipe trains a new classifier instead
    of silently reusing an old one. An exclusive file lock makes concurrent callers (e.g. several DDP
    ranks) train it once: the others wait and then load it.
    """
    model_config = model_config or ClassifierConfig()
    train_config = ClassifierTrainConfig(epochs=epochs, seed=seed, **train_options)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"mnist_classifier-{_cache_key(model_config, train_config)}.safetensors"
    with open(cache_dir / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not path.is_file():
                train_mnist_classifier(path, model_config=model_config, verbose=verbose, **asdict(train_config))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return load_mnist_classifier(path, device=device)


__all__ = ["default_cache_dir", "get_or_train_classifier"]
