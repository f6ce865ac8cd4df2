"""Measured sample quality on MNIST: class accuracy of conditioned samples and MNIST-FID.

- Class accuracy: a sample generated for class k counts as correct when the project's MNIST classifier
  (`encoders/mnist_classifier.py`) predicts k. Reported overall and per class.
- MNIST-FID: the Fréchet distance (Heusel et al., 2017, arXiv 1706.08500) between Gaussians fitted to the
  classifier's penultimate features of two image sets — the project's one FID code (`scores.py`) with the
  `mnist` extractor (`extractors.py`), as `ldm-lightning evaluate --extractor mnist` computes it. Only
  comparable to other MNIST-FIDs computed with the same classifier file; `reference_fid` gives the
  real-train-vs-real-test value to read it against.
"""

from __future__ import annotations

import torch

from ldm_lightning.evaluation.extractors import MNISTExtractor, extract
from ldm_lightning.encoders.mnist_classifier import NUM_CLASSES, MNISTClassifier
from ldm_lightning.encoders.mnist_data import load_mnist_32
from ldm_lightning.evaluation.scores import feature_statistics, fid_from_features
from ldm_lightning.images import to_uint8


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


@torch.no_grad()
def mnist_fid(classifier: MNISTClassifier, fake: torch.Tensor, real: torch.Tensor, batch_size: int = 1000) -> float:
    """MNIST-FID between image sets `fake` and `real` (each (N, 1|3, 32|28, 32|28) in [-1, 1] or uint8, N ≥ 2).

    The same FID as `ldm-lightning evaluate --extractor mnist`: the images as uint8 (as saved), features
    of the `mnist` extractor, `scores.frechet_distance`. FID is biased upwards for small N (Chong &
    Forsyth, 2020, arXiv 1911.07023): compare values only at equal sample counts.
    """
    for name, images in (("fake", fake), ("real", real)):
        if len(images) < 2:
            raise ValueError(f"mnist_fid needs at least 2 {name} images to estimate a covariance; got {len(images)}")
    extractor = MNISTExtractor(classifier)
    fake_features = extract(extractor, to_uint8(fake), batch_size)[0]  # (N, 128)
    real_stats = feature_statistics(extract(extractor, to_uint8(real), batch_size)[0])
    return max(fid_from_features(fake_features, *real_stats), 0.0)  # tiny negative values are round-off


@torch.no_grad()
def reference_fid(classifier: MNISTClassifier, num_train: int = 10000, num_test: int | None = None) -> float:
    """MNIST-FID of the first `num_train` real train images vs the real test split (the first `num_test`
    images, all 10k when None): the value a perfect generator would get at this sample count."""
    train_x, _ = load_mnist_32("train", limit=num_train)  # (N, 1, 32, 32)
    test_x, _ = load_mnist_32("test", limit=num_test)  # (M, 1, 32, 32)
    return mnist_fid(classifier, train_x, test_x)


__all__ = ["class_accuracy", "mnist_fid", "reference_fid", "sample_accuracy"]
