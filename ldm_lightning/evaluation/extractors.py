"""Feature extractors for the quality scores, chosen by name, each from a local weights file (never downloaded).

| name      | weights (`--weights`)                                   | features            | logits (for IS) |
|-----------|---------------------------------------------------------|---------------------|-----------------|
| inception | torch-fidelity's `weights-inception-2015-12-05-*.pth`   | pool3, 2048-d       | 1008 (unbiased) |
|           | (the TF `pt_inception-2015-12-05` graph of FID/ADM)     |                     |                 |
| dinov2    | a local Hugging Face `Dinov2Model` folder (FD-DINOv2,   | CLS token after the | none            |
|           | EDM2: e.g. facebook/dinov2-large saved to disk)         | final LayerNorm     |                 |
| mnist     | the project's MNIST classifier (`.safetensors` + .json) | penultimate, 128-d  | 10 digits       |

Every extractor takes uint8 images (B, 1|3, H, W) in [0, 255] — what image files hold — and returns
(features (B, D) float32, logits (B, K) float32 or None). Inception is torch-fidelity's own module (its
TF1-compatible bilinear resize to 299 inside), so its features are torch-fidelity's bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EXTRACTORS = ("inception", "dinov2", "mnist")


def _check_uint8(x: torch.Tensor) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError("feature extractors take uint8 images (B, 1|3, H, W) in [0, 255]; got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    return x


def _rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # (B, 3, H, W): gray as 3 equal channels


class FeatureExtractor(nn.Module):
    """Frozen, always in eval mode; `forward(uint8 images) -> (features, logits | None)`."""

    name: str = ""
    dim: int = 0
    has_logits: bool = False

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # BatchNorm statistics / dropout must not depend on the batch

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class InceptionExtractor(FeatureExtractor):
    name, dim, has_logits = "inception", 2048, True

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        # 'logits_unbiased': the 1008 logits without the final bias, as torch-fidelity's IS uses them.
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        features, logits = self.net(_rgb(_check_uint8(x)).to(self.device))  # (B, 2048), (B, 1008)
        return features.float(), logits.float()


class DinoV2Extractor(FeatureExtractor):
    name, has_logits = "dinov2", False

    def __init__(self, folder: str | os.PathLike, resolution: int = 224):
        super().__init__()
        from ldm_lightning.encoders.dinov2 import DINOv2
        self.net = DINOv2(folder)  # ImageNet normalisation (that of EDM2's FD-DINOv2 detector) inside
        self.dim = self.net.dim
        self.resolution = resolution
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        x = _rgb(_check_uint8(x)).to(self.device).float()  # (B, 3, H, W) in [0, 255]
        # EDM2's detector: bicubic (antialiased) resize to 224², then ImageNet normalisation.
        x = F.interpolate(x, size=(self.resolution,) * 2, mode="bicubic", antialias=True)  # (B, 3, 224, 224)
        return self.net.cls(x / 255).float(), None  # (B, D): CLS after the final LayerNorm


class MNISTExtractor(FeatureExtractor):
    name, has_logits = "mnist", True

    def __init__(self, weights: "str | os.PathLike | nn.Module"):
        """`weights`: the classifier file, or an already loaded `MNISTClassifier` (the demo's)."""
        super().__init__()
        from ldm_lightning.encoders.mnist_classifier import load_mnist_classifier
        self.net = weights if isinstance(weights, nn.Module) else load_mnist_classifier(weights)
        self.dim = int(self.net.config.feature_dim)
        self.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor):
        x = _check_uint8(x).to(self.device)  # the classifier takes uint8 (RGB is averaged to gray)
        features = self.net.features(x)  # (B, 128)
        return features.float(), self.net.head(features).float()  # (B, 128), (B, 10)


def check_weights(name: str, weights: str | os.PathLike | None, flag: str = "--weights") -> Path:
    """The local weights path of extractor `name`, or an error naming `flag` and what the file must be."""
    if name not in EXTRACTORS:
        raise ValueError(f"feature extractor must be one of {EXTRACTORS}; got {name!r}")
    hint = {"inception": "torch-fidelity's weights-inception-2015-12-05-6726825d.pth (the FID Inception)",
            "dinov2": "a folder saved by transformers' Dinov2Model.save_pretrained (e.g. facebook/dinov2-large)",
            "mnist": "an MNIST classifier .safetensors (+ .json) from train_mnist_classifier / the demo cache"}[name]
    if weights is None:
        raise FileNotFoundError(f"the {name} feature extractor needs local weights: pass {flag} PATH to {hint}; "
                                "nothing is downloaded")
    path = Path(weights)
    if not (path.is_dir() if name == "dinov2" else path.is_file()):
        raise FileNotFoundError(f"{flag} {path}: no such {'folder' if name == 'dinov2' else 'file'}; the {name} "
                                f"extractor needs {hint} (nothing is downloaded)")
    return path


def build_extractor(name: str, weights: str | os.PathLike | None, device: str | torch.device = "cpu",
                    flag: str = "--weights") -> FeatureExtractor:
    """The extractor `name` (one of EXTRACTORS) from the local `weights` path; `flag` names the option that
    set it in error messages (`--weights` on the command line, the callback's `weights` in a config)."""
    path = check_weights(name, weights, flag)
    cls = {"inception": InceptionExtractor, "dinov2": DinoV2Extractor, "mnist": MNISTExtractor}[name]
    return cls(path).to(device)


@torch.no_grad()
def extract(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int = 64):
    """(features (N, D), logits (N, K) | None) on the CPU of uint8 `images` (N, C, H, W), in batches."""
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f, lg = extractor(images[i:i + batch_size])
        feats.append(f.cpu())
        if lg is not None:
            logits.append(lg.cpu())
    return torch.cat(feats), (torch.cat(logits) if logits else None)


__all__ = ["EXTRACTORS", "DinoV2Extractor", "FeatureExtractor", "InceptionExtractor", "MNISTExtractor",
           "build_extractor", "check_weights", "extract"]
