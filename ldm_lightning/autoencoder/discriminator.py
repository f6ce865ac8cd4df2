"""PatchGAN discriminator (pix2pix, Isola et al. 2017; the `NLayerDiscriminator` of taming-transformers).

Output: one logit per overlapping patch, (B, 1, h', w'). BatchNorm (the original) couples samples
and needs SyncBatchNorm under DDP and special care under DeepSpeed; `norm='group'` (default here) or
'none' are per-sample and therefore identical on 1 or N devices.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

DiscNorm = Literal["batch", "group", "none"]
NORMS = get_args(DiscNorm)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(32, channels // 4) or 1, channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"loss.disc_norm must be one of {NORMS}; got {norm!r}")
        bias = norm == "none"                                    # a norm layer makes conv bias redundant
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1                    # last hidden layer keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=bias), _norm(norm, ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():                                 # DCGAN init, as taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)                                      # (B, 1, h', w')
