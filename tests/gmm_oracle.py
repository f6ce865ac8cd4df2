"""A data distribution with a closed-form ideal denoiser: an isotropic Gaussian mixture.

For x0 ~ sum_k pi_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, each component gives
x_t | k ~ N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I), so the posterior responsibilities w_k(x_t) are a
softmax of Gaussian log-likelihoods and (Tweedie / Bayes)

    E[x0 | x_t] = sum_k w_k [mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)].

This is the exact minimiser of the x0-MSE, i.e. a perfectly trained network, so sampler error against
it is pure discretisation error (tests/test_diffusion_samplers.py, benchmarks/bench_samplers.py).

A test oracle, not a model: it lives beside the tests (benchmarks/bench_samplers.py puts tests/ on sys.path).
"""

from __future__ import annotations

import torch

from ldm_lightning.diffusion.denoiser import Prediction, expand_like


class GaussianMixture:
    """means (K, D), stds (K,), weights (K,) (normalised here). Works in any float dtype (float64 for references)."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor | None = None):
        self.means = means.double()  # (K, D)
        self.stds = stds.double()  # (K,)
        w = torch.ones(len(means), dtype=torch.float64) if weights is None else weights.double()
        if self.means.ndim != 2 or self.stds.shape != w.shape or len(w) != len(self.means):
            raise ValueError("GaussianMixture needs means (K, D), stds (K,) and weights (K,)")
        if (self.stds <= 0).any() or (w <= 0).any():
            raise ValueError("GaussianMixture stds and weights must be > 0")
        self.weights = w / w.sum()

    @classmethod
    def default(cls, dim: int = 2) -> "GaussianMixture":
        """Three separated, unequal components (stds 0.5 / 0.7 / 0.4): a multimodal target with a curved denoiser."""
        means = torch.zeros(3, dim, dtype=torch.float64)
        means[0, 0], means[1, 0], means[2, 1 % dim] = 2.0, -1.5, 1.5
        return cls(means, torch.tensor([0.5, 0.7, 0.4]), torch.tensor([0.5, 0.3, 0.2]))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)  # (n, D)
        return self.means[k] + self.stds[k, None] * z  # (n, D)

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mixture mean (D,) and covariance (D, D)."""
        m = (self.weights[:, None] * self.means).sum(0)
        D = self.means.shape[1]
        second = sum(w * (torch.outer(mu, mu) + s ** 2 * torch.eye(D, dtype=torch.float64))
                     for w, mu, s in zip(self.weights, self.means, self.stds))
        return m, second - torch.outer(m, m)

    def x0_hat(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t = x]: x (B, D); alpha, sigma (B,) or scalars. Computed in float64, returned in x's dtype."""
        xd = x.double()
        a, s = expand_like(torch.as_tensor(alpha, dtype=torch.float64), xd), \
            expand_like(torch.as_tensor(sigma, dtype=torch.float64), xd)  # (B, 1)
        var = a ** 2 * self.stds[None] ** 2 + s ** 2  # (B, K)
        diff = xd[:, None, :] - a[:, :, None] * self.means[None]  # (B, K, D)
        logp = self.weights.log()[None] - 0.5 * x.shape[1] * var.log() - diff.pow(2).sum(-1) / (2 * var)  # (B, K)
        w = logp.softmax(-1)  # (B, K) responsibilities
        post = self.means[None] + (a * self.stds[None] ** 2 / var)[:, :, None] * diff  # (B, K, D)
        return (w[:, :, None] * post).sum(1).to(x.dtype)  # (B, D)

    def denoiser(self, schedule):
        """fn(x, t) -> Prediction on `schedule`, the exact (oracle) denoiser samplers take."""
        def fn(x: torch.Tensor, t: torch.Tensor) -> Prediction:
            alpha, sigma = schedule.alpha_sigma(t)  # (B,) float64
            x0 = self.x0_hat(x, alpha, sigma)
            a, s = expand_like(alpha, x), expand_like(sigma, x)
            eps = (x - a * x0) / s.clamp_min(1e-12)  # sigma > 0 on every grid point a sampler evaluates
            return Prediction(x0=x0, eps=eps, alpha=a, sigma=s)
        return fn


def gaussian_w2(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """2-Wasserstein distance between the Gaussians with the moments of samples x (N, D) and (mean, cov)
    (closed form; a moment-matching score, blind to structure beyond second order)."""
    x = x.double()
    m, c = x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])

    def sqrtm(a):
        e, v = torch.linalg.eigh(a)
        return v @ torch.diag(e.clamp_min(0).sqrt()) @ v.T

    rc = sqrtm(cov)
    cross = sqrtm(rc @ c @ rc)
    return float(((m - mean).pow(2).sum() + torch.trace(c + cov - 2 * cross)).clamp_min(0).sqrt())
