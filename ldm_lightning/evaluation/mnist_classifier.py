"""A small MNIST CNN used as a measuring instrument: class accuracy of generated digits and MNIST-FID.

FID (Heusel et al., 2017, arXiv 1706.08500) needs a feature extractor trained on the data domain; the
usual Inception-v3 weights are ImageNet features (and cannot be downloaded here). For MNIST the common
substitute is a LeNet-style classifier's penultimate layer (e.g. the "MNIST-FID" of Binkowski et al.,
2018, arXiv 1801.01401, and of many GAN papers). This file trains one on the real train split, once,
and caches it: `get_or_train_classifier(cache_dir)`.

Architecture: three conv-BN-ReLU-maxpool stages (32→16→8→4 px), then a 128-d ReLU feature layer
(`features(x)`, used by FID) and a linear 10-way head (`logits(x)`).

Input convention (what `prepare_images` accepts): (B, 1, 32, 32) float in [-1, 1] — the project's MNIST
convention (28×28 padded with a 2-px black border). Also accepted: (B, H, W) without a channel axis,
28×28 images (padded here with -1), 3-channel images (averaged to gray), uint8 images in [0, 255].
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from ldm_lightning.evaluation.mnist_data import load_mnist, to_model_range
from ldm_lightning.fileio import atomic_write_bytes, atomic_write_json

FORMAT = "ldm-lightning/mnist-classifier"
FORMAT_VERSION = 1
NUM_CLASSES = 10


@dataclass
class ClassifierConfig:
    """Shape of the MNIST classifier."""

    widths: tuple[int, int, int] = (16, 32, 64)
    """Channels of the three conv stages (at 32, 16 and 8 px)."""
    feature_dim: int = 128
    """Size of the penultimate (feature) layer that FID is computed on."""
    dropout: float = 0.1
    """Dropout on the feature layer during training (features for FID are taken in eval mode)."""

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or any(w <= 0 for w in self.widths):
            raise ValueError(f"classifier.widths must be 3 positive channel counts, got {self.widths}")
        if self.feature_dim <= 0:
            raise ValueError(f"classifier.feature_dim must be > 0, got {self.feature_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"classifier.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ClassifierTrainConfig:
    """How the classifier is trained (on the real MNIST train split)."""

    epochs: int = 3
    """Passes over the training images."""
    seed: int = 0
    """Seeds the initialisation, the shuffling, dropout and the augmentation."""
    batch_size: int = 128
    """Images per optimizer step."""
    lr: float = 3e-3
    """Peak AdamW learning rate (one-cycle: linear warmup then cosine decay to 0)."""
    warmup_fraction: float = 0.1
    """Fraction of all steps spent warming the learning rate up from 0."""
    weight_decay: float = 1e-4
    """AdamW decoupled weight decay."""
    max_shift: int = 2
    """Random translation augmentation of up to this many pixels in x and y (0 disables it); makes the
    classifier less sensitive to the small misplacements generated digits have."""
    train_subset: int | None = None
    """Train on only the first N training images (tests use this for speed); None = all 60k."""
    channels_last: bool = True
    """Use the channels-last memory format (≈1.5× faster convolutions on CPU, measured here)."""

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"train.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.max_shift <= 4:
            raise ValueError(f"train.max_shift must be in 0..4 pixels, got {self.max_shift}")
        if self.train_subset is not None and not 0 < self.train_subset <= 60000:
            raise ValueError(f"train.train_subset must be None or in 1..60000, got {self.train_subset}")


def prepare_images(x: torch.Tensor) -> torch.Tensor:
    """Bring images to the classifier's input convention: float (B, 1, 32, 32) in [-1, 1]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MNIST classifier input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3:
        x = x[:, None]  # (B, 1, H, W)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"MNIST classifier input must be (B, 1|3, 32|28, 32|28) or (B, H, W); got shape {tuple(x.shape)}"
        )
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1.0  # [0, 255] → [-1, 1]
    elif not x.is_floating_point():
        raise TypeError(f"MNIST classifier input must be float in [-1, 1] or uint8 in [0, 255], got {x.dtype}")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)  # (B, 1, H, W): RGB → gray
    if tuple(x.shape[-2:]) == (28, 28):
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (B, 1, 32, 32): the project's 2-px black border
    elif tuple(x.shape[-2:]) != (32, 32):
        raise ValueError(
            f"MNIST classifier input must be 32×32 (or 28×28, padded here); got {tuple(x.shape[-2:])}. "
            "Fix: resize/crop generated images to 32×32."
        )
    return x


class MNISTClassifier(nn.Module):
    """conv-BN-ReLU-pool ×3 → Linear-ReLU (features) → Linear (logits)."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        c1, c2, c3 = config.widths
        layers: list[nn.Module] = []
        for c_in, c_out in ((1, c1), (c1, c2), (c2, c3)):
            # Bias-free conv: BatchNorm's shift makes a conv bias redundant.
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
        self.trunk = nn.Sequential(*layers)
        self.feature = nn.Sequential(nn.Flatten(), nn.Linear(c3 * 4 * 4, config.feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.feature_dim, NUM_CLASSES)
        # Read by torchmetrics' FrechetInceptionDistance to size its statistics without a dummy forward.
        self.num_features = config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer activations, (B, feature_dim). Call in eval mode for FID."""
        x = prepare_images(x).to(self.head.weight.dtype)  # (B, 1, 32, 32)
        h = self.trunk(x)  # (B, c3, 4, 4)
        return self.feature(h)  # (B, feature_dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores, (B, 10)."""
        return self.head(self.dropout(self.features(x)))  # (B, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Predicted class per image, int64 (B,), in batches and in eval mode."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        preds = [self.logits(x[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


# --------------------------------------------------------------------------------------------------- training


def _random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]², filling with black (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)  # (B, 1, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)  # (B,)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)  # (B,)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]  # (B, 1, H, W)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_accuracy(model: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of `model` on `images` (any accepted input convention) against `labels`."""
    return (model.predict(images) == labels.cpu()).float().mean().item()


def train_mnist_classifier(
    out_path: str | os.PathLike,
    epochs: int = 3,
    seed: int = 0,
    *,
    model_config: ClassifierConfig | None = None,
    verbose: bool = False,
    **train_options,
) -> dict:
    """Train on the real MNIST train split, measure on the test split, save to `out_path` (+ `.json`).

    `train_options` are further `ClassifierTrainConfig` fields (batch_size, lr, max_shift, train_subset, ...).
    Deterministic for a given seed and thread count (all randomness comes from the seed; CPU kernels
    are deterministic for a fixed number of threads). Returns the metrics that are also written to the json.
    """
    model_config = model_config or ClassifierConfig()
    cfg = ClassifierTrainConfig(epochs=epochs, seed=seed, **train_options)
    train_x, train_y = load_mnist("train")  # uint8 (60000, 28, 28), int64 (60000,)
    if cfg.train_subset is not None:
        train_x, train_y = train_x[: cfg.train_subset], train_y[: cfg.train_subset]
    test_x, test_y = load_mnist("test")
    n = len(train_x)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total_steps)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    t0 = time.perf_counter()
    # fork_rng: training must neither depend on nor disturb the caller's global RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # init + dropout
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # shuffling + augmentation
        model = MNISTClassifier(model_config).to(memory_format=memory_format).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step, last_loss = 0, float("nan")
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen)
            for i in range(0, n, cfg.batch_size):
                idx = order[i : i + cfg.batch_size]
                x = to_model_range(train_x[idx])  # (B, 1, 32, 32)
                if cfg.max_shift > 0:
                    x = _random_shift(x, cfg.max_shift, gen)
                x = x.contiguous(memory_format=memory_format)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(step, total_steps, cfg.lr, warmup)
                loss = F.cross_entropy(model.logits(x), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                last_loss = loss.item()
            if verbose:
                print(f"[mnist-classifier] epoch {epoch + 1}/{cfg.epochs} loss {last_loss:.4f} "
                      f"({time.perf_counter() - t0:.1f}s)", flush=True)
    train_seconds = time.perf_counter() - t0

    model = model.to(memory_format=torch.contiguous_format).eval()
    t1 = time.perf_counter()
    preds = model.predict(test_x)
    correct = preds == test_y
    per_class = [correct[test_y == c].float().mean().item() for c in range(NUM_CLASSES)]
    metrics = {
        "test_accuracy": correct.float().mean().item(),
        "test_accuracy_per_class": per_class,
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - t1,
        "train_images": n,
        "steps": total_steps,
        "final_train_loss": last_loss,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }
    save_mnist_classifier(model, out_path, train_config=cfg, metrics=metrics)
    if verbose:
        print(f"[mnist-classifier] test accuracy {metrics['test_accuracy']:.4f}, trained in {train_seconds:.1f}s "
              f"→ {out_path}", flush=True)
    return metrics


# ------------------------------------------------------------------------------------------- save / load / cache


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_mnist_classifier(
    model: MNISTClassifier,
    path: str | os.PathLike,
    train_config: ClassifierTrainConfig | None = None,
    metrics: dict | None = None,
) -> None:
    """Weights to `path` (safetensors), config + training metrics to `path` with suffix `.json`.

    Both are written to temporary files and renamed, so a reader never sees a half-written classifier.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # safetensors: contiguous
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": asdict(model.config),
        "train": asdict(train_config) if train_config is not None else None,
        "metrics": metrics or {},
    }
    atomic_write_json(_json_path(path), meta)
    atomic_write_bytes(path, save(state, metadata={"format": FORMAT}))  # weights last: they mark a complete pair


def load_mnist_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> MNISTClassifier:
    """Load a classifier saved by `train_mnist_classifier` / `save_mnist_classifier`: eval mode, frozen."""
    path = Path(path)
    if not path.is_file() or not _json_path(path).is_file():
        raise FileNotFoundError(
            f"No MNIST classifier at {path} (needs the .safetensors file and its .json). Fix: create it with "
            "train_mnist_classifier(path) or use get_or_train_classifier(cache_dir)."
        )
    meta = json.loads(_json_path(path).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{_json_path(path)} is not an {FORMAT} v{FORMAT_VERSION} file (got format={meta.get('format')!r}, "
            f"version={meta.get('version')!r}); fix: retrain it with train_mnist_classifier"
        )
    model = MNISTClassifier(ClassifierConfig(**meta["model"]))
    model.load_state_dict(load_file(str(path)))
    model.metrics = meta.get("metrics", {})  # the test accuracy etc. measured when it was trained
    return model.to(device).eval().requires_grad_(False)


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


__all__ = [
    "ClassifierConfig",
    "ClassifierTrainConfig",
    "MNISTClassifier",
    "default_cache_dir",
    "evaluate_accuracy",
    "get_or_train_classifier",
    "load_mnist_classifier",
    "prepare_images",
    "save_mnist_classifier",
    "train_mnist_classifier",
]
