"""A tiny TrainingModule + synthetic image data for the Scale tests (importable by CLI subprocesses:
the tests put this directory on PYTHONPATH and use `class_path: scale_tiny.TinyModule`)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ldm_lightning.training.base import EMAConfig, OptimConfig, TrainingModule
from ldm_lightning.training.speed import compile_network


class TinyNet(nn.Module):
    def __init__(self, channels: int = 1, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x):
        return self.out(torch.nn.functional.silu(self.conv(x)))  # (B, C, H, W)


class TinyModule(TrainingModule):
    """Denoises `image` with a 2-layer conv net; logs one image at the first validation."""

    def __init__(self, width: int = 16, compile: bool = False, log_image: bool = False,
                 optim: OptimConfig | None = None, ema: EMAConfig | None = None, seed: int = 0):
        super().__init__(optim=optim or OptimConfig(lr=1e-3), ema=ema or EMAConfig(enabled=False), seed=seed)
        self.save_hyperparameters()
        self.net = compile_network(TinyNet(1, width), compile)
        self.setup_ema(self.net)
        self.log_image = log_image

    def compute_loss(self, batch):
        x = batch["image"]  # (B, 1, H, W)
        # dtype=x.dtype: DeepSpeed bf16 casts weights AND inputs to bf16 (no autocast), so noise must follow.
        noise = torch.randn(x.shape, generator=self.step_generator("noise", x.device), device=x.device, dtype=x.dtype)
        pred = self.net(x + 0.3 * noise)
        loss = (pred - x).pow(2).mean()
        return loss, {"mse": loss}

    def validation_step(self, batch, batch_idx):
        loss, _ = self.compute_loss(batch)
        self.log("val/loss", loss, sync_dist=True)
        if self.log_image and batch_idx == 0 and self.global_rank == 0:
            from lightning.pytorch.loggers import WandbLogger
            for lg in self.loggers:
                if isinstance(lg, WandbLogger):
                    img = ((self.net(batch["image"][:4]).clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
                    lg.log_image("val/samples", [i[0].cpu().numpy() for i in img], step=self.global_step)


class _Synthetic(Dataset):
    def __init__(self, n: int, size: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, size, size, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "cls": torch.tensor(-1)}


class TinyData(L.LightningDataModule):
    def __init__(self, n: int = 64, size: int = 8, batch_size: int = 4):
        super().__init__()
        self.n, self.size, self.batch_size = n, size, batch_size

    def train_dataloader(self):
        return DataLoader(_Synthetic(self.n, self.size), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        return DataLoader(_Synthetic(8, self.size), batch_size=self.batch_size)
