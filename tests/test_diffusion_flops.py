"""Honest MFU: trainable networks cost 3x their forward, frozen encoders 1x (training/flops.py)."""

from __future__ import annotations

import pytest
import torch

from ldm_lightning.training.flops import count_flops, training_flops_per_sample


class _TinyStage2(torch.nn.Module):
    """A frozen 'encoder' held outside the module tree (as the autoencoder is) and a trainable head."""

    def __init__(self, a=6, b=5, c=3):
        super().__init__()
        self._frozen = [torch.nn.Linear(a, b).requires_grad_(False)]
        self.head = torch.nn.Linear(b, c)
        self.training_mode_seen = None

    def compute_loss(self, batch):
        with torch.no_grad():
            z = self._frozen[0](batch["x"])  # (B, b), no backward
        return self.head(z).pow(2).mean()


def test_training_flops_count_trainable_3x_and_frozen_1x_by_hand():
    a, b, c = 6, 5, 3
    m = _TinyStage2(a, b, c).eval()
    flops = training_flops_per_sample(m, {"x": torch.randn(4, a)})
    frozen, trainable = 2 * a * b, 2 * b * c  # per sample: 2 FLOPs per multiply-add
    assert flops == 3 * trainable + 1 * frozen  # not 3 * (trainable + frozen)
    assert not m.training and all(p.grad is None for p in m.parameters())  # mode kept, no gradient stored


def test_diffusion_module_counts_the_frozen_autoencoder_once(tiny_ae):
    """On the real stage-2 module: 3 x the denoiser forward + 1 x the autoencoder encoder, counted apart."""
    from ldm_lightning.diffusion.module import DiffusionModule
    m = DiffusionModule(str(tiny_ae), backbone="dit-tiny", backbone_config={"depth": 1, "hidden_size": 64},
                        conditioning={"kind": "class", "num_classes": 10}, val_num=0, ema={"enabled": False})
    img = torch.rand(2, 1, 32, 32) * 2 - 1
    batch = {"image": img, "cls": torch.tensor([3, 5])}
    ae = m.autoencoder
    enc = count_flops(lambda: ae.encode(img[:1]))
    z = m.latents({"image": img[:1]})
    den = count_flops(lambda: m.denoiser(z, torch.tensor([500]), {"y": torch.tensor([3])}))
    assert enc > 0 and den > 0
    assert training_flops_per_sample(m, batch) == pytest.approx(3 * den + enc, rel=1e-9)


def test_dit_counted_flops_match_its_analytic_count():
    """flops.py's claim: the counter counts DiT's adaLN path once per image, as DiT.flops_per_image does."""
    from ldm_lightning.diffusion import DiT, DiTConfig
    dit = DiT(DiTConfig(input_size=16, in_channels=4, patch_size=2, hidden_size=128, depth=2, num_heads=4,
                        num_classes=10))
    counted = count_flops(lambda: dit(torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.tensor([1])))
    assert counted == pytest.approx(dit.flops_per_image(), rel=0.01)
