"""A small MNIST CNN used as a measuring instrument: class accuracy of generated digits and MNIST-FID —
the model, its input convention and its file format (training: `mnist_classifier_training.py`; the
trained-once cache: `mnist_classifier_cache.py`).

FID (Heusel et al., 2017, arXiv 1706.08500) needs a feature extractor trained on the data domain; the
usual Inception-v3 weights are ImageNet features. For MNIST the common substitute is a LeNet-style
classifier's penultimate layer (e.g. the "MNIST-FID" of Binkowski et al., 2018, arXiv 1801.01401, and of
many GAN papers): the `mnist` extractor of `ldm-lightning evaluate`.

Architecture: three conv-BN-ReLU-maxpool stages (32→16→8→4 px), then a 128-d ReLU feature layer
(`features(x)`, used by FID) and a linear 10-way head (`logits(x)`).

Input convention (what `prepare_images` accepts): (B, 1, 32, 32) float in [-1, 1] — the project's MNIST
convention (28×28 padded with a 2-px black border). Also accepted: (B, H, W) without a channel axis,
28×28 images (padded here with -1), 3-channel images (averaged to gray), uint8 images in [0, 255].
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from ldm_lightning.finite import check_finite_fields
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
        check_finite_fields(self, "classifier")  # NaN/inf pass every comparison below
        self.widths = tuple(int(w) for w in self.widths)
        if len(self.widths) != 3 or any(w <= 0 for w in self.widths):
            raise ValueError(f"classifier.widths must be 3 positive channel counts, got {self.widths}")
        if self.feature_dim <= 0:
            raise ValueError(f"classifier.feature_dim must be > 0, got {self.feature_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"classifier.dropout must be in [0, 1), got {self.dropout}")


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


# ------------------------------------------------------------------------------------------------ save / load


def _json_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_mnist_classifier(
    model: MNISTClassifier,
    path: str | os.PathLike,
    train_config=None,
    metrics: dict | None = None,
) -> None:
    """Weights to `path` (safetensors), config + training metrics to `path` with suffix `.json`.

    `train_config`: the `ClassifierTrainConfig` it was trained with (recorded in the .json), or None.

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


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "NUM_CLASSES",
    "ClassifierConfig",
    "MNISTClassifier",
    "load_mnist_classifier",
    "prepare_images",
    "save_mnist_classifier",
]
