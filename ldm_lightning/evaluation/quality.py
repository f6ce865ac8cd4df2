"""All requested scores of one generated feature set against one reference, as a flat dict (the JSON).

A score that cannot be computed from what is at hand is left out with the reason under `skipped`
(e.g. KID against a file with only mu/sigma, IS with an extractor that has no classifier head) rather
than failing the whole run or printing a made-up number.
"""

from __future__ import annotations

import torch

from .reference import ReferenceStats
from .scores import fid_from_features, inception_score, kernel_distance, precision_recall

METRICS = ("fid", "kid", "is", "pr")


def score_features(fake: torch.Tensor, logits: torch.Tensor | None, reference: ReferenceStats | None,
                   metrics: tuple[str, ...] = METRICS, kid_subsets: int = 100, kid_subset_size: int = 1000,
                   is_splits: int = 10, pr_k: int = 3, seed: int = 2020) -> dict:
    """{fid, kid_mean, kid_std, is_mean, is_std, precision, recall, num_fake, num_real, skipped: {...}}.

    fake: (N, D) generated features; logits: (N, K) or None; reference: the real set's statistics."""
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


__all__ = ["METRICS", "score_features", "table_line"]
