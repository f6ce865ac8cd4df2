"""The generation-quality scores, computed from features alone (float64 numpy; no model in this file).

- FID (Heusel et al., 2017, arXiv 1706.08500): Fréchet distance between Gaussians (mu, sigma) fitted to the
  features of two image sets. `trace sqrt(sigma1 sigma2)` is taken as the sum of the square roots of the
  eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1) (symmetric PSD, so `eigvalsh`, negatives clipped): the
  same number as pytorch-fid's `scipy.linalg.sqrtm` and torch-fidelity's `eigvals(sigma1 @ sigma2)`, but
  stable when N < feature dim makes sigma singular, and an (N, N) problem when the N ≤ D features are at hand.
- KID (Binkowski et al., 2018, arXiv 1801.01401): unbiased MMD² with the cubic polynomial kernel
  k(x, y) = (x·y / d + 1)³, averaged over `subsets` random subsets of `subset_size` (torch-fidelity's
  defaults and draw order: seed 2020, generated subset drawn before the real one).
- IS (Salimans et al., 2016, arXiv 1606.03498): exp E_x KL(p(y|x) || p(y)) from classifier logits, mean and
  std over `splits` splits of a seeded permutation (torch-fidelity's convention).
- Improved precision / recall (Kynkäänniemi et al., 2019, arXiv 1904.06991): a sample is "covered" by a set
  when it lies inside some member's ball of radius = that member's distance to its k-th nearest neighbour
  in its own set (k = 3). Precision = fraction of generated samples covered by the real set; recall =
  fraction of real samples covered by the generated set.

`score_features` computes all requested scores of one generated feature set against one reference as a flat
dict (the JSON of `evaluate`, the callback's log). A score that cannot be computed from what is at hand is left
out with the reason under `skipped` (e.g. KID against a file with only mu/sigma, IS with an extractor that has
no classifier head) rather than failing the whole run or printing a made-up number.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_features(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"{name} must be (N >= 2, D) features; got shape {a.shape}")
    return a


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of (N, D) features: the mean and the unbiased (N - 1) covariance."""
    f = _as_features(features, "features")  # (N, D)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, features1: np.ndarray | None) -> float:
    """tr sqrt(sigma1 sigma2) = Σ sqrt(eigenvalues of a symmetric PSD matrix with the same nonzero spectrum)."""
    if features1 is not None and len(features1) <= len(sigma1):
        # sigma1 = aᵀa with a the centred features / sqrt(N - 1), so sigma1 sigma2 has the nonzero eigenvalues
        # of a sigma2 aᵀ: an (N, N) problem instead of (D, D) — K = 1000 samples of 2048-d Inception features.
        a = (features1 - features1.mean(axis=0)) / np.sqrt(len(features1) - 1)  # (N, D)
        inner = a @ sigma2 @ a.T  # (N, N)
    else:
        w, v = np.linalg.eigh(sigma1)  # sigma1 is PSD: tiny negative eigenvalues are round-off
        root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D) = sqrt(sigma1)
        inner = root1 @ sigma2 @ root1  # (D, D), same eigenvalues as sigma1 sigma2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, features1=None) -> float:
    """‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2 tr sqrt(sigma1 sigma2).

    `features1`: the (N, D) features (mu1, sigma1) were computed from, when at hand — with N ≤ D the
    matrix square root is then taken of an (N, N) matrix (same value, much faster)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"FID statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (were both made with the same feature extractor?)")
    f1 = None if features1 is None else _as_features(features1, "features1")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2, f1))


def fid_from_features(features, mu2, sigma2) -> float:
    """FID of (N, D) `features` against the Gaussian (mu2, sigma2)."""
    f = _as_features(features, "features")
    return frechet_distance(*feature_statistics(f), mu2, sigma2, features1=f)


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3  # (m, m)
    k_yy = (y @ y.T / d + 1) ** 3  # (m, m)
    k_xy = (x @ y.T / d + 1) ** 3  # (m, m)
    m = len(x)
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_distance(fake, real, subsets: int = 100, subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """KID (mean, std over subsets). `subset_size` is capped at the smaller set's size."""
    x, y = _as_features(fake, "fake features"), _as_features(real, "real features")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID features disagree in width: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1:
        raise ValueError(f"KID subsets must be >= 1; got {subsets}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        xi = x[rng.choice(len(x), m, replace=False)]  # (m, D)
        yi = y[rng.choice(len(y), m, replace=False)]  # (m, D)
        mmds.append(_mmd2_unbiased(xi, yi))
    return float(np.mean(mmds)), float(np.std(mmds))


def inception_score(logits, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS (mean, std over `splits`) of (N, K) classifier logits (unnormalised; softmax taken here)."""
    lg = torch.as_tensor(_as_features(logits, "logits"))  # (N, K) float64
    n = len(lg)
    if not 1 <= splits <= n:
        raise ValueError(f"IS splits must be in 1..N={n}; got {splits}")
    lg = lg[torch.from_numpy(np.random.RandomState(seed).permutation(n))]
    log_p = lg.log_softmax(dim=1)  # (N, K)
    scores = []
    for i in range(splits):
        chunk = log_p[i * n // splits:(i + 1) * n // splits]  # (n_i, K)
        log_q = chunk.exp().mean(dim=0, keepdim=True).log()  # (1, K): the split's marginal p(y)
        scores.append((chunk.exp() * (chunk - log_q)).sum(dim=1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radius(f: torch.Tensor, k: int) -> torch.Tensor:
    # kthvalue(k + 1): the smallest distance of each point is 0, to itself.
    return torch.cdist(f, f).kthvalue(k + 1, dim=1).values  # (N,)


def precision_recall(fake, real, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall of generated `fake` against `real` features (k-NN balls, k = 3)."""
    x = torch.from_numpy(_as_features(fake, "fake features"))  # (N, D)
    y = torch.from_numpy(_as_features(real, "real features"))  # (M, D)
    if min(len(x), len(y)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set; got {len(x)} fake, "
                         f"{len(y)} real")
    d = torch.cdist(x, y)  # (N, M)
    precision = (d <= _kth_neighbour_radius(y, k)[None, :]).any(dim=1).double().mean().item()
    recall = (d.T <= _kth_neighbour_radius(x, k)[None, :]).any(dim=1).double().mean().item()
    return precision, recall


# ---------------------------------------------------------------- every requested score of one run, as the JSON
METRICS = ("fid", "kid", "is", "pr")


def score_features(fake: torch.Tensor, logits: torch.Tensor | None, reference,
                   metrics: tuple[str, ...] = METRICS, kid_subsets: int = 100, kid_subset_size: int = 1000,
                   is_splits: int = 10, pr_k: int = 3, seed: int = 2020) -> dict:
    """{fid, kid_mean, kid_std, is_mean, is_std, precision, recall, num_fake, num_real, skipped: {...}}.

    fake: (N, D) generated features; logits: (N, K) or None; reference: the real set's statistics, a
    `reference.ReferenceStats` or None (not imported here: reference.py builds on this file)."""
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"metrics must be among {METRICS}; got {bad}")
    out: dict = {"num_fake": int(len(fake))}
    skipped: dict[str, str] = {}
    if reference is not None:
        out["num_real"] = reference.num_images if reference.features is None else int(len(reference.features))
    need_ref = [m for m in metrics if m != "is"]
    if reference is None and need_ref:
        skipped.update({m: "no reference given" for m in need_ref})
        need_ref = []
    if "fid" in need_ref:
        out["fid"] = fid_from_features(fake, reference.mu, reference.sigma)
    for m in ("kid", "pr"):
        if m in need_ref and reference.features is None:
            skipped[m] = (f"{reference.path or 'the reference'} holds only mu/sigma; {m.upper()} needs the real "
                          "features (make the file with --save-stats, or give the real images)")
    if "kid" in need_ref and "kid" not in skipped:
        out["kid_mean"], out["kid_std"] = kernel_distance(fake, reference.features, kid_subsets, kid_subset_size, seed)
    if "pr" in need_ref and "pr" not in skipped:
        out["precision"], out["recall"] = precision_recall(fake, reference.features, pr_k)
    if "is" in metrics:
        if logits is None:
            skipped["is"] = "this feature extractor has no classifier head (Inception Score needs class logits)"
        else:
            out["is_mean"], out["is_std"] = inception_score(logits, min(is_splits, len(logits)), seed)
    if skipped:
        out["skipped"] = skipped
    return out


def table_line(result: dict) -> str:
    """One line: `FID 12.34 | KID 0.0123 ± 0.0010 | IS 3.21 ± 0.05 | P 0.712 R 0.634 | 1000 vs 10000`."""
    parts = []
    if "fid" in result:
        parts.append(f"FID {result['fid']:.4g}")
    if "kid_mean" in result:
        parts.append(f"KID {result['kid_mean']:.4g} ± {result['kid_std']:.2g}")
    if "is_mean" in result:
        parts.append(f"IS {result['is_mean']:.4g} ± {result['is_std']:.2g}")
    if "precision" in result:
        parts.append(f"P {result['precision']:.3f} R {result['recall']:.3f}")
    parts.append(f"{result['num_fake']} vs {result.get('num_real', '-')}")
    return " | ".join(parts)


__all__ = ["METRICS", "feature_statistics", "fid_from_features", "frechet_distance", "inception_score",
           "kernel_distance", "precision_recall", "score_features", "table_line"]
