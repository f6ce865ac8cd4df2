"""Issue 30: the design documents at full fidelity. Each defect has a test that failed before its fix (REPA's
encoder resolution, JiT's clamped v-loss, the latent scale factor), and the schedule options (SD3's loss weight,
RAE's dimension-dependent shift, a sampling-only timestep grid) are checked against their formulas and through
`ldm-lightning fit` with a shipped config."""

from __future__ import annotations

import math

import pytest
import torch


# --- REPA: the encoder's input resolution ----------------------------------------------------------


def test_repa_dinov2_defaults_to_repas_224_px_not_the_configs_518(tmp_path):
    """REPA feeds DINOv2 /14 224 px images (16x16 = 256 tokens); the published DINOv2 configs say 518 (1369)."""
    from transformers import Dinov2Config, Dinov2Model

    from ldm_lightning.diffusion.repa import load_repa_encoder
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       patch_size=14, image_size=518)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    enc = load_repa_encoder(str(tmp_path / "dino"))
    assert enc.resolution == 224
    assert enc(torch.rand(1, 3, 64, 64) * 2 - 1).shape == (1, 16, 16, 16)  # 256 tokens
    assert load_repa_encoder(str(tmp_path / "dino"), resolution=448).resolution == 448  # explicit: kept
