"""Measured sample quality on MNIST: class accuracy of conditioned samples, MNIST-FID, and a sample grid.

- Class accuracy: a sample generated for class k counts as correct when the project's MNIST classifier
  (`mnist_classifier.py`) predicts k. Reported overall and per class.
- MNIST-FID: the Fréchet distance (Heusel et al., 2017, arXiv 1706.08500) between Gaussians fitted to the
  classifier's penultimate features of two image sets, computed by torchmetrics'
  `FrechetInceptionDistance` with the classifier as a custom `feature` module (Inception-v3 weights are
  ImageNet features and cannot be downloaded here). Only comparable to other MNIST-FIDs computed with the
  same classifier file; `reference_fid` gives the real-train-vs-real-test value to read it against.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from ldm_lightning.evaluation.mnist_classifier import NUM_CLASSES, MNISTClassifier, prepare_images
from ldm_lightning.evaluation.mnist_data import load_mnist_32


def class_accuracy(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> dict:
    """Overall and per-class accuracy of `predictions` against the `labels` the samples were conditioned on.

    Returns {"accuracy": float, "per_class": [float | None] * num_classes, "count_per_class": [int]}; a
    class with no samples has accuracy None (not 0: it was not measured). Overall accuracy is the mean over
    samples, not over classes.
    """
    predictions, labels = torch.as_tensor(predictions).long().cpu(), torch.as_tensor(labels).long().cpu()
    if predictions.shape != labels.shape or predictions.dim() != 1:
        raise ValueError(
            f"predictions and labels must both be 1-D of equal length; got {tuple(predictions.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("class_accuracy needs at least one sample; got 0")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must be class ids in 0..{num_classes - 1}; got range "
                         f"{labels.min().item()}..{labels.max().item()}")
    correct = (predictions == labels).float()  # (N,)
    counts = torch.bincount(labels, minlength=num_classes)  # (K,)
    hits = torch.bincount(labels, weights=correct, minlength=num_classes)  # (K,)
    per_class = [hits[k].item() / counts[k].item() if counts[k] > 0 else None for k in range(num_classes)]
    return {"accuracy": correct.mean().item(), "per_class": per_class, "count_per_class": counts.tolist()}


@torch.no_grad()
def sample_accuracy(classifier: MNISTClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """`class_accuracy` of `classifier`'s predictions on `images` (any input convention it accepts)."""
    return class_accuracy(classifier.predict(images), labels)


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate layer as a torchmetrics FID `feature` module: images → (B, feature_dim).

    torchmetrics calls `feature(imgs)` and reads `num_features`; the classifier is frozen and kept in eval
    mode (BatchNorm running statistics, no dropout) so the features of an image do not depend on its batch.
    """

    def __init__(self, classifier: MNISTClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.config.feature_dim

    def train(self, mode: bool = True) -> "ClassifierFeatures":
        super().train(False)  # always eval: see the class docstring
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)  # (B, feature_dim)


def _fid_metric(classifier: MNISTClassifier):
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = classifier.head.weight.device
    return FrechetInceptionDistance(feature=ClassifierFeatures(classifier), reset_real_features=False).to(device)


def _update(metric, images: torch.Tensor, real: bool, batch_size: int) -> None:
    device = next(metric.inception.parameters()).device
    for i in range(0, len(images), batch_size):
        metric.update(prepare_images(images[i : i + batch_size]).to(device), real=real)


@torch.no_grad()
def mnist_fid(classifier: MNISTClassifier, fake: torch.Tensor, real: torch.Tensor, batch_size: int = 1000) -> float:
    """MNIST-FID between image sets `fake` and `real` (each (N, 1|3, 32|28, 32|28) in [-1, 1], N ≥ 2).

    FID is biased upwards for small N (Chong & Forsyth, 2020, arXiv 1911.07023): compare values only at
    equal sample counts.
    """
    for name, images in (("fake", fake), ("real", real)):
        if len(images) < 2:
            raise ValueError(f"mnist_fid needs at least 2 {name} images to estimate a covariance; got {len(images)}")
    metric = _fid_metric(classifier)
    _update(metric, real, True, batch_size)
    _update(metric, fake, False, batch_size)
    value = metric.compute().item()
    return max(value, 0.0)  # tiny negative values are round-off in the matrix square root


@torch.no_grad()
def reference_fid(classifier: MNISTClassifier, num_train: int = 10000, num_test: int | None = None) -> float:
    """MNIST-FID of the first `num_train` real train images vs the real test split (the first `num_test`
    images, all 10k when None): the value a perfect generator would get at this sample count."""
    train_x, _ = load_mnist_32("train", limit=num_train)  # (N, 1, 32, 32)
    test_x, _ = load_mnist_32("test", limit=num_test)  # (M, 1, 32, 32)
    return mnist_fid(classifier, train_x, test_x)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 10, padding: int = 2) -> Path:
    """Save images (N, 1|3, H, W) in [-1, 1] as one PNG, `nrow` images per row, filled row by row.

    Pass samples sorted by class with `nrow` = samples per class to get one row per class.
    """
    from PIL import Image

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid expects (N, 1|3, H, W) images; got shape {tuple(images.shape)}")
    if nrow < 1:
        raise ValueError(f"save_grid nrow must be >= 1; got {nrow}")
    n, c, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), -1.0)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i].detach().float().cpu()
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (C, H', W')
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


__all__ = ["ClassifierFeatures", "class_accuracy", "mnist_fid", "reference_fid", "sample_accuracy", "save_grid"]
