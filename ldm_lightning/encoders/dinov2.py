"""One frozen DINOv2 (Oquab et al. 2023, arXiv 2304.07193), read from a local Hugging Face folder.

Three users, one wrapper: the RAE encoder (`autoencoder/rae.py`: the patch-token grid is the latent), REPA's
alignment target (`diffusion/repa.py`: the patch-token grid, resized to the transformer's token grid) and the
FD-DINOv2 feature extractor (`evaluation/extractors.py`: the CLS token after the final LayerNorm).

Input: images in [0, 1], (B, 1|C, H, W), already at the size the caller wants (each user resizes its own way:
RAE not at all, REPA bicubic to its 224 px recipe, FD-DINOv2 antialiased bicubic as EDM2's detector); grey is
repeated to RGB, then the ImageNet normalisation DINOv2 was trained with is applied here. The model is never
trained: `train()` keeps it in eval mode (no dropout / drop-path) and it has no gradients.
"""

from __future__ import annotations

import os

import torch
from torch import nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class DINOv2(nn.Module):
    """A frozen Hugging Face `Dinov2Model`: `patch_grid(x)` -> (B, D, H/p, W/p), `cls(x)` -> (B, D).

    `path`: a local folder written by `Dinov2Model.save_pretrained` (nothing is downloaded). Without a folder,
    `config` (the folder's config.json as a dict) rebuilds the network with untrained weights; the RAE
    autoencoder does that when its own state dict brings the encoder weights. The network is `self.model`
    (the RAE checkpoints' `encoder.model.*` keys)."""

    def __init__(self, path: str | os.PathLike | None = None, config: dict | None = None):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model
        if path is not None:
            self.model = Dinov2Model.from_pretrained(os.path.expanduser(str(path)), local_files_only=True)
        elif config is not None:
            self.model = Dinov2Model(Dinov2Config.from_dict(config))
        else:
            raise ValueError("DINOv2 needs a local folder (path) or its config.json as a dict (config)")
        self.model.eval().requires_grad_(False)
        cfg = self.model.config
        self.patch = int(cfg.patch_size)
        self.channels = int(getattr(cfg, "num_channels", 3))
        self.dim = int(cfg.hidden_size)
        # ImageNet statistics for RGB; a model of another channel count gets the plain [-1, 1] mapping.
        mean = IMAGENET_MEAN if self.channels == 3 else (0.5,) * self.channels
        std = IMAGENET_STD if self.channels == 3 else (0.5,) * self.channels
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DINOv2:
        super().train(mode)
        self.model.eval()  # frozen: no dropout / drop-path, ever
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 1|C, H, W) in [0, 1] -> the model's input: grey repeated to RGB, ImageNet-normalised."""
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.pixel_mean) / self.pixel_std

    def patch_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens of images in [0, 1] as a grid (B, D, H/p, W/p); the CLS token is dropped."""
        B, _, H, W = x.shape
        tokens = self.model(pixel_values=self.normalize(x)).last_hidden_state[:, 1:]  # (B, N, D)
        return tokens.transpose(1, 2).reshape(B, -1, H // self.patch, W // self.patch)

    def cls(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token after the final LayerNorm (B, D) of images in [0, 1] (FD-DINOv2's feature)."""
        return self.model(pixel_values=self.normalize(x)).pooler_output


__all__ = ["DINOv2", "IMAGENET_MEAN", "IMAGENET_STD"]
