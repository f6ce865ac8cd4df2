"""Posteriors returned by `Autoencoder.encode`.

`DiagonalGaussian` is the KL autoencoder's q(z|x) (Kingma & Welling 2014; LDM, Rombach et al. 2022).
`PointPosterior` wraps a deterministic latent (VQ codes, plain DC-AE) in the same interface, so the
diffusion stage and the latent-shard writer never need to know which regulariser produced it.
"""

from __future__ import annotations

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; `moments` is mean ‖ logvar along dim 1."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments                                   # (B, 2c, h, w)
        mean, logvar = moments.chunk(2, dim=1)                   # (B, c, h, w) each
        self.mean = mean
        # Clamp as LDM does: a collapsed or exploding variance would give inf/NaN in exp().
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)                 # (B, c, h, w)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (c, h, w) -> (B,)."""
        m, v, lv = self.mean.float(), self.var.float(), self.logvar.float()
        return 0.5 * (m.pow(2) + v - 1.0 - lv).sum(dim=(1, 2, 3))


class PointPosterior(DiagonalGaussian):
    """A point mass at `z`: sample() == mode() == z, kl() == 0. `logvar` is the clamp floor, so
    `moments` stay a valid mean ‖ logvar pair for latent shards. VQ adds `vq_loss` and code stats."""

    def __init__(self, z: torch.Tensor, **extras):
        super().__init__(torch.cat([z, torch.full_like(z, LOGVAR_MIN)], dim=1))
        self.mean = z                                            # keep the graph to z exactly
        for k, v in extras.items():
            setattr(self, k, v)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], device=self.mean.device)
