"""Training the MNIST classifier on the real train split (AdamW one-cycle, shift augmentation), measured on
the real test split and saved with `save_mnist_classifier`. Deterministic for a seed and a thread count."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm_lightning.finite import check_finite_fields
from ldm_lightning.encoders.mnist_classifier import (
    NUM_CLASSES,
    ClassifierConfig,
    MNISTClassifier,
    save_mnist_classifier,
)
from ldm_lightning.encoders.mnist_data import load_mnist, to_padded_model_range


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
    """Use the channels-last memory format (faster convolutions on CPU; benchmarks/README.md)."""

    def __post_init__(self):
        check_finite_fields(self, "train")  # NaN/inf pass every comparison below
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
                x = to_padded_model_range(train_x[idx])  # (B, 1, 32, 32)
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


__all__ = ["ClassifierTrainConfig", "evaluate_accuracy", "train_mnist_classifier"]
