"""REPA: representation alignment (Yu et al. 2024, arXiv 2410.06940; sihyun-yu/REPA).

An MLP projector maps the tokens after an intermediate block of the trained transformer (DiT blocks, or a
DDT's condition-encoder blocks) to the width of a frozen encoder's patch features; the loss is the negative
cosine similarity, averaged over tokens and images (-1 when aligned), added to the diffusion loss with
weight lambda. The target features are computed from the CLEAN images of the batch; their grid is resized
to the transformer's token grid (bilinear, antialiased when shrinking) so each token has one target.

Frozen encoders (`ldm_lightning/encoders/`; held outside the module tree, as the autoencoder: not trained, not
in checkpoints):
- a local Hugging Face DINOv2 folder (`Dinov2Model.save_pretrained`; `encoders/dinov2.py`, offline):
  images resized to `encoder_resolution` (default REPA's 224 px for /14: 256 tokens), ImageNet-normalised, CLS
  token dropped;
- `mnist-classifier[:PATH]` (the project's MNIST classifier, encoders/mnist_classifier.py): its conv map
  before the last pooling, (64, 8, 8) on 32 px digits — a small in-domain target for MNIST measurements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.finite import check_finite_fields
from ldm_lightning.errors import UserError

MNIST_PREFIX = "mnist-classifier:"
REPA_GRID = 16
"""Default DINOv2 token grid side: REPA's 224 px input to a /14 DINOv2 (256 tokens)."""


class REPAError(UserError):
    """A REPA setting that cannot work (missing encoder, block out of range, no pixels in the batch)."""


@dataclass
class REPAConfig:
    """Representation alignment; off unless `encoder` is set."""

    encoder: str | None = None
    """Frozen target encoder: a local DINOv2 folder (Hugging Face `save_pretrained` layout) or
    'mnist-classifier:PATH' (a classifier .safetensors of `train_mnist_classifier`), or 'mnist-classifier'
    (the project's cached MNIST classifier, `get_or_train_classifier()`, trained once on first use);
    None = REPA off."""
    block: int = 2
    """Align the tokens output by this block (1-based; REPA aligns block 8 of SiT-XL's 28). For a DDT it
    counts condition-encoder blocks."""
    weight: float = 0.5
    """lambda: loss = diffusion loss + weight * REPA loss (REPA's 0.5)."""
    projector_dim: int = 2048
    """Hidden width of the 3-layer SiLU MLP projector (REPA's 2048)."""
    encoder_resolution: int | None = None
    """DINOv2 input side in pixels. None = REPA's recipe: 16 patches a side, 256 tokens (224 px for DINOv2 /14,
    what REPA feeds it for 256 px images), NOT the encoder config's image_size (518 in the published DINOv2
    configs: 1369 tokens, 5.3x the encoder cost). REPA scales it with the image (448 for 512 px): set it then.
    Ignored for the MNIST classifier (32 px)."""

    def __post_init__(self):
        check_finite_fields(self, "repa")  # NaN/inf pass every comparison below
        if self.block < 1:
            raise REPAError(f"repa.block must be >= 1 (1-based block index), got {self.block}")
        if self.weight < 0:
            raise REPAError(f"repa.weight must be >= 0, got {self.weight}")
        if self.projector_dim < 1:
            raise REPAError(f"repa.projector_dim must be >= 1, got {self.projector_dim}")

    @property
    def enabled(self) -> bool:
        return self.encoder is not None


class DinoFeatures(nn.Module):
    """The frozen DINOv2 (encoders/dinov2.py) -> patch feature maps (B, C, g, g) of images in [-1, 1]."""

    def __init__(self, path: str, resolution: int | None = None):
        super().__init__()
        from ldm_lightning.encoders.dinov2 import DINOv2
        try:
            self.dino = DINOv2(path)
        except (OSError, ValueError) as err:
            raise REPAError(f"repa.encoder={path!r}: not a loadable DINOv2 folder ({err}); give a local folder "
                            "written by Dinov2Model.save_pretrained (nothing is downloaded)") from None
        self.patch = self.dino.patch
        # REPA's 224 px for /14 = 16 patches a side; the config's image_size (518) is DINOv2's own pre-training.
        self.resolution = (int(resolution or REPA_GRID * self.patch) // self.patch) * self.patch
        if self.resolution < self.patch:
            raise REPAError(f"repa.encoder_resolution={resolution} is below the encoder's patch size {self.patch}")
        self.feature_dim = self.dino.dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x  # (B, 3, H, W): grey digits as RGB
        x = F.interpolate((x + 1) / 2, size=(self.resolution,) * 2, mode="bicubic", align_corners=False)
        return self.dino.patch_grid(x)  # (B, C, g, g), ImageNet-normalised inside as DINOv2 was trained


class MNISTClassifierFeatures(nn.Module):
    """The MNIST classifier's third conv stage before its last pooling: (B, 64, 8, 8) for 32 px digits."""

    def __init__(self, path: str | None):
        super().__init__()
        from ldm_lightning.encoders.mnist_classifier import load_mnist_classifier, prepare_images
        if path is None:  # the measuring classifier itself (trained once into the cache on first use)
            from ldm_lightning.encoders.mnist_classifier_cache import get_or_train_classifier
            clf = get_or_train_classifier(verbose=False)
        else:
            try:
                clf = load_mnist_classifier(path)
            except (FileNotFoundError, ValueError) as err:
                raise REPAError(f"repa.encoder={MNIST_PREFIX}{path}: {err}") from None
        self._prepare = prepare_images
        self.trunk = clf.trunk[:-1]  # (conv-BN-ReLU-pool) x 2, conv-BN-ReLU
        self.feature_dim = int(clf.config.widths[2])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(self._prepare(images.float()))  # (B, 64, 8, 8)


def load_repa_encoder(spec: str, resolution: int | None = None) -> nn.Module:
    """The frozen target encoder named by REPAConfig.encoder, in eval mode without gradients."""
    if spec == MNIST_PREFIX[:-1]:
        enc = MNISTClassifierFeatures(None)
    elif spec.startswith(MNIST_PREFIX):
        enc = MNISTClassifierFeatures(spec[len(MNIST_PREFIX):])
    elif Path(spec).is_dir():
        enc = DinoFeatures(spec, resolution)
    else:
        raise REPAError(f"repa.encoder={spec!r}: no such folder; give a local DINOv2 folder "
                        f"(Dinov2Model.save_pretrained) or '{MNIST_PREFIX}PATH' (an MNIST classifier .safetensors)")
    return enc.eval().requires_grad_(False)


def match_grid(features: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Target feature maps (B, C, hf, wf) -> (B, h*w, C) on the transformer's token grid."""
    if features.shape[-2:] != (h, w):
        shrink = features.shape[-2] > h or features.shape[-1] > w
        features = F.interpolate(features, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return features.flatten(2).transpose(1, 2)  # (B, h*w, C)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity per token, mean over tokens and batch: -1 when aligned. (B, N, C) each."""
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


class REPAProjector(nn.Module):
    """The trained part of REPA: MLP width -> projector_dim -> projector_dim -> feature_dim (SiLU)."""

    def __init__(self, width: int, feature_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, feature_dim))

    def forward(self, tokens: torch.Tensor, features: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """REPA loss of image tokens (B, h*w, width) against target feature maps (B, C, hf, wf)."""
        return repa_loss(self.mlp(tokens), match_grid(features, h, w))


class BlockTap:
    """Captures a block's output during one forward (a forward hook, removed on exit): the tokens REPA aligns
    come from the very forward pass whose diffusion loss is trained, so no second pass is needed."""

    def __init__(self, block: nn.Module):
        self.block, self.tokens, self._handle = block, None, None

    def __enter__(self) -> BlockTap:
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output) -> None:
        self.tokens = output  # (B, N [+ L], D)

    def __exit__(self, *exc) -> None:
        self._handle.remove()
