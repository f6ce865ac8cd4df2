"""VQ-VAE-2's two-level hierarchical quantiser (Razavi et al. 2019, arXiv 1906.00446), as a regulariser.

The encoder's output h (B, e, h, w) is the bottom level. A small top encoder halves it once more and
quantises it: top codes at f/2 resolution of the bottom (h/2, w/2) hold global structure. A top decoder
brings the top codes back to (h, w), and the bottom level quantises h *conditioned* on them (a 1x1 conv
over [h, dec_top(q_top)]), so the bottom codes only carry what the top ones missed.

The latent (what `encode` returns and what stage 2 consumes) is ONE tensor at the bottom resolution:

    z = concat([q_bottom, nearest_upsample_x2(q_top)], dim=1)      (B, 2e, h, w)

so a diffusion model sees an ordinary (2e, h, w) latent; the decoder reads both levels from it. The top
half is constant over each 2x2 block, and `snap` reads it back exactly with a 2x2 average. Both levels
are decodable from their code indices: `embed_codes(bottom, top)` rebuilds z from the two index maps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm_lightning.autoencoder.kl import Downsample, ResnetBlock, Upsample
from ldm_lightning.autoencoder.vq import VectorQuantizer


class HierarchicalQuantizer(nn.Module):
    def __init__(self, dim: int, width: int, groups: int, codebook_size: int, **vq_kwargs):
        super().__init__()
        self.dim = dim
        self.enc_top = nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), Downsample(width),
                                     ResnetBlock(width, width, groups), nn.Conv2d(width, dim, 1))
        self.dec_top = nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), ResnetBlock(width, width, groups),
                                     Upsample(width), nn.Conv2d(width, dim, 1))
        self.bottom_in = nn.Conv2d(2 * dim, dim, 1)
        self.quantize_top = VectorQuantizer(codebook_size, dim, **vq_kwargs)
        self.quantize_bottom = VectorQuantizer(codebook_size, dim, **vq_kwargs)

    def forward(self, h: torch.Tensor, generator: torch.Generator | None = None):
        """h (B, e, h, w) -> (z (B, 2e, h, w) with straight-through gradients, vq loss, stats)."""
        t_pre = self.enc_top(h)                                  # (B, e, h/2, w/2)
        qt, loss_t, st = self.quantize_top(t_pre, generator=generator)
        b_pre = self.bottom_in(torch.cat([h, self.dec_top(qt)], 1))  # (B, e, h, w)
        qb, loss_b, sb = self.quantize_bottom(b_pre, generator=generator)
        z = torch.cat([qb, F.interpolate(qt, scale_factor=2.0, mode="nearest")], 1)  # (B, 2e, h, w)
        pre = torch.cat([b_pre, F.interpolate(t_pre, scale_factor=2.0, mode="nearest")], 1)
        stats = {"perplexity": sb["perplexity"], "usage": sb["usage"], "indices": sb["indices"],
                 "perplexity_top": st["perplexity"], "usage_top": st["usage"], "indices_top": st["indices"],
                 "pre_quant": pre}
        return z, loss_t + loss_b, stats

    def _split(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t_up = z.split(self.dim, dim=1)                       # (B, e, h, w) each
        return b, F.avg_pool2d(t_up, 2)                          # exact inverse of the nearest x2 upsample

    def snap(self, z: torch.Tensor) -> torch.Tensor:
        """Any (B, 2e, h, w) latent (e.g. a diffusion sample) -> the nearest codes of both levels."""
        b, t = self._split(z)
        return self.embed_codes(self.quantize_bottom.lookup(b), self.quantize_top.lookup(t)).to(z.dtype)

    def embed_codes(self, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Index maps (B, h, w) and (B, h/2, w/2) -> the latent z (B, 2e, h, w) the decoder reads."""
        qb, qt = self.quantize_bottom.embed(bottom), self.quantize_top.embed(top)
        return torch.cat([qb, F.interpolate(qt, scale_factor=2.0, mode="nearest")], 1)
