"""Measuring instruments: FID / KID / IS / precision-recall with named feature extractors (`ldm-lightning
evaluate`, the in-training `SampleQualityCallback`), and for MNIST a project-trained classifier, class
accuracy and MNIST-FID (the same FID code with the `mnist` extractor).

`SampleQualityCallback` is resolved lazily so that importing this package does not import Lightning.
"""

import importlib

from ldm_lightning.evaluation.extractors import EXTRACTORS, build_extractor
from ldm_lightning.evaluation.mnist_metrics import class_accuracy, mnist_fid, reference_fid, sample_accuracy
from ldm_lightning.encoders.mnist_classifier import MNISTClassifier, load_mnist_classifier
from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
from ldm_lightning.encoders.mnist_classifier_training import train_mnist_classifier
from ldm_lightning.encoders.mnist_data import load_mnist, load_mnist_32
from ldm_lightning.evaluation.reference import ReferenceStats, load_reference, save_reference
from ldm_lightning.evaluation.scores import (
    METRICS,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_distance,
    precision_recall,
    score_features,
)
from ldm_lightning.images import save_grid  # the one image grid (images.py), kept in this package's API

_LAZY = {"SampleQualityCallback": "ldm_lightning.evaluation.callback"}

__all__ = [
    "EXTRACTORS",
    "METRICS",
    "MNISTClassifier",
    "ReferenceStats",
    "SampleQualityCallback",
    "build_extractor",
    "class_accuracy",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "get_or_train_classifier",
    "inception_score",
    "kernel_distance",
    "load_mnist",
    "load_mnist_32",
    "load_mnist_classifier",
    "load_reference",
    "mnist_fid",
    "precision_recall",
    "reference_fid",
    "sample_accuracy",
    "save_grid",
    "save_reference",
    "score_features",
    "train_mnist_classifier",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ldm_lightning.evaluation' has no attribute {name!r}")
