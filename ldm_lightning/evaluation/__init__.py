"""Measuring instruments for generated MNIST: a project-trained classifier, class accuracy, MNIST-FID."""

from ldm_lightning.evaluation.metrics import (
    ClassifierFeatures,
    class_accuracy,
    mnist_fid,
    reference_fid,
    sample_accuracy,
    save_grid,
)
from ldm_lightning.evaluation.mnist_classifier import (
    MNISTClassifier,
    get_or_train_classifier,
    load_mnist_classifier,
    train_mnist_classifier,
)
from ldm_lightning.evaluation.mnist_data import load_mnist, load_mnist_32

__all__ = [
    "ClassifierFeatures",
    "MNISTClassifier",
    "class_accuracy",
    "get_or_train_classifier",
    "load_mnist",
    "load_mnist_32",
    "load_mnist_classifier",
    "mnist_fid",
    "reference_fid",
    "sample_accuracy",
    "save_grid",
    "train_mnist_classifier",
]
