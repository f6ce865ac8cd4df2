"""The measuring instruments on real MNIST: classifier accuracy, class-accuracy math, MNIST-FID, grid PNG.

A short-schedule classifier (trained once per module on a 12k real-train subset, ~10 s) drives the fast
tests; the full-recipe classifier (all 60k, ≥ 98% test accuracy) is a slow test.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from float_paths import assert_close_for, sum_length

from ldm_lightning.evaluation import (
    class_accuracy,
    get_or_train_classifier,
    load_mnist_32,
    load_mnist_classifier,
    mnist_fid,
    sample_accuracy,
    save_grid,
    train_mnist_classifier,
)
from ldm_lightning.encoders.mnist_classifier import ClassifierConfig, prepare_images
from ldm_lightning.encoders.mnist_classifier_training import ClassifierTrainConfig
from ldm_lightning.encoders.mnist_data import load_mnist, to_padded_model_range

QUICK = dict(epochs=1, seed=0, train_subset=12000)


@pytest.fixture(scope="module")
def quick_classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "quick.safetensors"
    t0 = time.perf_counter()
    metrics = train_mnist_classifier(path, **QUICK)
    print(f"\nquick classifier: test accuracy {metrics['test_accuracy']:.4f}, "
          f"train {metrics['train_seconds']:.1f}s, total {time.perf_counter() - t0:.1f}s")
    return load_mnist_classifier(path), metrics, path


@pytest.fixture(scope="module")
def test_images():
    return load_mnist_32("test", limit=2000)  # (2000, 1, 32, 32) in [-1, 1], labels (2000,)


# ------------------------------------------------------------------------------------------ data + conventions


def test_mnist_data_is_real_mnist():
    train_x, train_y = load_mnist("train")
    test_x, test_y = load_mnist("test")
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert torch.bincount(train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x = to_padded_model_range(test_x[:4])  # (4, 1, 32, 32)
    assert x.shape == (4, 1, 32, 32) and x.min() == -1 and x.max() == 1
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()  # the 2-px black border


def test_prepare_images_accepts_every_documented_convention():
    x32, _ = load_mnist_32("test", limit=3)  # (3, 1, 32, 32)
    raw = load_mnist("test")[0][:3]  # (3, 28, 28) uint8
    assert torch.allclose(prepare_images(raw), x32)  # uint8 28×28 without channel axis
    assert torch.allclose(prepare_images(raw.float() / 127.5 - 1), x32)  # float 28×28
    assert torch.allclose(prepare_images(x32.repeat(1, 3, 1, 1)), x32)  # RGB → gray
    with pytest.raises(ValueError, match="32×32"):
        prepare_images(torch.zeros(2, 1, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        prepare_images(torch.zeros(2, 2, 32, 32))
    with pytest.raises(TypeError, match="int32"):
        prepare_images(torch.zeros(2, 1, 32, 32, dtype=torch.int32))


def test_configs_name_the_bad_field():
    with pytest.raises(ValueError, match="train.epochs"):
        ClassifierTrainConfig(epochs=0)
    with pytest.raises(ValueError, match="train.max_shift"):
        ClassifierTrainConfig(max_shift=9)
    with pytest.raises(ValueError, match="classifier.widths"):
        ClassifierConfig(widths=(8, 8))


# ------------------------------------------------------------------------------------------ class accuracy math


def test_class_accuracy_hand_made():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    preds = torch.tensor([0, 0, 0, 5, 1, 0, 2, 2, 2, 2])
    out = class_accuracy(preds, labels)
    assert out["accuracy"] == pytest.approx(8 / 10)  # mean over samples
    assert out["per_class"][:3] == pytest.approx([3 / 4, 1 / 2, 1.0])
    assert out["per_class"][3:] == [None] * 7  # not measured ≠ 0
    assert out["count_per_class"] == [4, 2, 4] + [0] * 7
    perfect = class_accuracy(torch.arange(10).repeat(3), torch.arange(10).repeat(3))
    assert perfect["accuracy"] == 1.0 and perfect["per_class"] == [1.0] * 10
    wrong = class_accuracy((torch.arange(10) + 1) % 10, torch.arange(10))
    assert wrong["accuracy"] == 0.0 and wrong["per_class"] == [0.0] * 10


def test_class_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        class_accuracy(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="0..9"):
        class_accuracy(torch.zeros(2), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="at least one"):
        class_accuracy(torch.zeros(0), torch.zeros(0))


def test_save_grid(tmp_path):
    from PIL import Image

    x, _ = load_mnist_32("test", limit=20)  # (20, 1, 32, 32)
    path = save_grid(x, tmp_path / "g" / "grid.png", nrow=10, padding=2)
    img = torch.from_numpy(__import__("numpy").array(Image.open(path)))
    assert img.shape == (2 * 34 + 2, 10 * 34 + 2)
    # the first tile is exactly the first image in uint8
    tile = img[2:34, 2:34].float() / 127.5 - 1
    assert torch.allclose(tile, x[0, 0], atol=1 / 127.5)
    with pytest.raises(ValueError, match="nrow"):
        save_grid(x, tmp_path / "bad.png", nrow=0)


# ------------------------------------------------------------------------------------------ trained classifier


def test_quick_classifier_accuracy_and_roundtrip(quick_classifier, test_images):
    model, metrics, path = quick_classifier
    # 1 epoch on 12k real digits: measured ≈ 0.97 on the full test split; a broken trainer gets ~0.1.
    assert metrics["test_accuracy"] >= 0.95, metrics
    assert len(metrics["test_accuracy_per_class"]) == 10
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    x, y = test_images
    # the metric function agrees with the accuracy recorded at training (same first 2000 test images ⊂ 10k)
    acc = sample_accuracy(model, x, y)
    assert acc["accuracy"] >= 0.95 and all(a >= 0.85 for a in acc["per_class"])
    # features for FID: 128-d, independent of the batch they are computed in (eval-mode BatchNorm), up to the
    # fp32 rounding of the batch size's kernels (tests/float_paths.py)
    f_all = model.features(x[:64])  # (64, 128)
    f_one = model.features(x[:1])  # (1, 128)
    assert f_all.shape == (64, 128)
    assert_close_for(f_one, f_all[:1], sum_length(model), "features of one image vs in a batch of 64")


def test_training_is_deterministic(tmp_path):
    a = train_mnist_classifier(tmp_path / "a.safetensors", epochs=1, seed=3, train_subset=1024)
    b = train_mnist_classifier(tmp_path / "b.safetensors", epochs=1, seed=3, train_subset=1024)
    assert a["final_train_loss"] == b["final_train_loss"]
    ma, mb = load_mnist_classifier(tmp_path / "a.safetensors"), load_mnist_classifier(tmp_path / "b.safetensors")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_cache_trains_once(tmp_path, monkeypatch):
    import ldm_lightning.encoders.mnist_classifier_cache as mc

    calls = []
    real_train = mc.train_mnist_classifier
    monkeypatch.setattr(mc, "train_mnist_classifier", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    opts = dict(epochs=1, seed=0, train_subset=512, verbose=False)
    m1 = get_or_train_classifier(tmp_path, **opts)
    m2 = get_or_train_classifier(tmp_path, **opts)
    assert len(calls) == 1 and not m2.training
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    get_or_train_classifier(tmp_path, **{**opts, "seed": 1})  # another recipe → another file
    assert len(calls) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


def test_load_missing_classifier_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="get_or_train_classifier"):
        load_mnist_classifier(tmp_path / "nope.safetensors")


# ------------------------------------------------------------------------------------------ MNIST-FID


def test_fid_real_vs_real_small_and_wrong_distributions_large(quick_classifier, test_images):
    model = quick_classifier[0]
    test_x, test_y = test_images
    train_x, train_y = load_mnist_32("train", limit=2000)
    g = torch.Generator().manual_seed(0)
    real = mnist_fid(model, train_x, test_x)
    same = mnist_fid(model, test_x, test_x)
    noise = mnist_fid(model, torch.rand(2000, 1, 32, 32, generator=g) * 2 - 1, test_x)
    ones = train_x[train_y == 1][:1000]  # the right kind of image, but only one class (mode collapse)
    one_digit = mnist_fid(model, ones, test_x)
    blurred = mnist_fid(model, F.avg_pool2d(train_x, 3, stride=1, padding=1, count_include_pad=False), test_x)
    print(f"\nMNIST-FID (2k vs 2k test): self {same:.3f}, train {real:.3f}, blurred {blurred:.2f}, "
          f"only-ones {one_digit:.2f}, noise {noise:.2f}")
    assert same < 1e-3  # identical sets: distance 0 up to round-off
    assert all(math.isfinite(v) for v in (real, noise, one_digit, blurred))
    assert noise > 20 * real and one_digit > 10 * real and blurred > 2 * real
    # FID is symmetric in its two arguments
    assert mnist_fid(model, test_x, train_x) == pytest.approx(real, rel=1e-3, abs=1e-3)


def test_fid_rejects_too_few_images(quick_classifier, test_images):
    with pytest.raises(ValueError, match="at least 2 fake"):
        mnist_fid(quick_classifier[0], test_images[0][:1], test_images[0])


# ------------------------------------------------------------------------------------------ full recipe (slow)


@pytest.mark.slow
def test_full_classifier_reaches_98_percent(classifier_cache):
    """The recipe the demo uses (all 60k real train digits): ≥ 98% on the 10k real test digits."""
    # The folder test_demo.py's demo run uses too: the full classifier trains once per session.
    model = get_or_train_classifier(classifier_cache, verbose=True)
    test_x, test_y = load_mnist_32("test")  # (10000, 1, 32, 32)
    acc = sample_accuracy(model, test_x, test_y)
    print(f"\nfull classifier: test accuracy {acc['accuracy']:.4f}, per class "
          f"{[round(a, 4) for a in acc['per_class']]}, train {model.metrics['train_seconds']:.1f}s")
    assert acc["accuracy"] >= 0.98
    assert acc["accuracy"] == pytest.approx(model.metrics["test_accuracy"], abs=1e-6)
    assert min(acc["per_class"]) >= 0.95
