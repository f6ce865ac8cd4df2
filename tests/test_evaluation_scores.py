"""The score math against torch-fidelity's own functions (and pytorch-fid's FID formula) on the same
features, hand-checked precision/recall and Inception Score cases, and the reference-statistics files."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from ldm_lightning.evaluation import (
    ReferenceStats,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_distance,
    load_reference,
    precision_recall,
    save_reference,
    score_features,
)


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(99)) / d ** 0.5  # shared correlation
    return (torch.randn(n, d, generator=g) @ mix + shift).relu()  # (n, d): non-negative like pooled activations


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """pytorch-fid's `calculate_frechet_distance` (scipy sqrtm, eps offset when it fails), written out."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n_fake,n_real,d", [(300, 400, 64), (40, 48, 256)])
def test_fid_equals_torch_fidelity_and_pytorch_fid(n_fake, n_real, d):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    fake, real = _features(n_fake, d, 1, shift=0.3), _features(n_real, d, 2)
    ours = frechet_distance(*feature_statistics(fake), *feature_statistics(real))
    s1, s2 = fid_features_to_statistics(fake), fid_features_to_statistics(real)
    theirs = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    print(f"\nFID N={n_fake}/{n_real} D={d}: ours {ours:.6f}, torch-fidelity {theirs:.6f}")
    assert ours == pytest.approx(theirs, rel=1e-3)
    if d <= 64:  # sqrtm of a full-rank product; pytorch-fid's route is unreliable for singular sigma
        ref = pytorch_fid_formula(*feature_statistics(fake), *feature_statistics(real))
        assert ours == pytest.approx(ref, rel=1e-3)
    # the (N, N) route for N <= D gives the same number as the (D, D) one
    assert fid_from_features(fake, *feature_statistics(real)) == pytest.approx(ours, rel=1e-6)
    self_fid = frechet_distance(*feature_statistics(real), *feature_statistics(real))
    assert abs(self_fid) < 1e-6 * np.trace(feature_statistics(real)[1])


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric
    fake, real = _features(60, 256, 3, shift=0.2), _features(70, 256, 4)
    ours = kernel_distance(fake, real, subsets=20, subset_size=50)
    theirs = kid_features_to_metric(fake, real, kid_subsets=20, kid_subset_size=50, verbose=False)
    print(f"\nKID ours {ours}, torch-fidelity {theirs}")
    assert ours[0] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert ours[1] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-3)
    same = kernel_distance(_features(70, 256, 10), real, subsets=20, subset_size=50)[0]
    assert abs(same) < 0.2 * ours[0]  # unbiased: ≈ 0 for two draws of one distribution


def test_inception_score_equals_torch_fidelity_and_hand_cases():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = torch.randn(57, 1008, generator=torch.Generator().manual_seed(5)) * 3
    ours = inception_score(logits, splits=10)
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert ours[0] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours[1] == pytest.approx(theirs["inception_score_std"], rel=1e-6)
    # by hand: every image certain of its class, classes balanced → IS = number of classes; all unsure → 1
    confident = torch.eye(10).repeat(4, 1) * 100  # (40, 10)
    assert inception_score(confident, splits=1)[0] == pytest.approx(10, rel=1e-6)
    assert inception_score(torch.zeros(40, 10), splits=1)[0] == pytest.approx(1.0)


def test_precision_recall_hand_checked():
    """1-D, k = 3. Real 0, 1, 2, 3 → 3rd-neighbour radii 3, 2, 2, 3. Fake: a cluster at 0.1..0.4 (radii 0.3,
    0.2, 0.2, 0.3) and one at 20..20.3. Precision: the 4 fakes near 0 lie in real balls, the 4 at 20 do
    not → 4/8. Recall: real 0 lies in the ball of fake 0.1 (0.1 ≤ 0.3); real 1, 2, 3 are farther than 0.3
    from every fake → 1/4."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.1], [0.2], [0.3], [0.4], [20.0], [20.1], [20.2], [20.3]])
    assert precision_recall(fake, real, k=3) == (0.5, 0.25)
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(fake, real[:3])


def test_precision_recall_equals_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric
    fake, real = _features(50, 32, 6, shift=0.4), _features(60, 32, 7)
    ours = precision_recall(fake, real)
    theirs = prc_features_to_metric(fake, real, prc_neighborhood=3, verbose=False)
    assert ours == pytest.approx((theirs["precision"], theirs["recall"]), abs=1e-6)  # theirs: a float32 mean
    assert 0 < ours[0] < 1 and 0 < ours[1] < 1


def test_reference_files_round_trip_and_foreign_formats(tmp_path):
    real, fake = _features(80, 16, 8), _features(60, 16, 9, shift=0.5)
    ref = ReferenceStats.from_features(real, "mnist")
    path = save_reference(ref, tmp_path / "ref.npz")
    back = load_reference(path, "mnist")
    assert back.extractor == "mnist" and back.num_images == 80 and back.features.shape == (80, 16)
    r1 = score_features(fake, None, back, ("fid", "kid", "pr"), kid_subset_size=50)
    r2 = score_features(fake, None, ReferenceStats.from_features(real, "mnist"), ("fid", "kid", "pr"),
                        kid_subset_size=50)
    assert r1["fid"] == pytest.approx(r2["fid"], rel=1e-6) and r1["kid_mean"] == pytest.approx(r2["kid_mean"], rel=1e-5)
    with pytest.raises(ValueError, match="made with the 'mnist' extractor"):
        load_reference(path, "inception")
    # an ADM / pytorch-fid style file: mu and sigma only (ADM's also carries the images as arr_0)
    mu, sigma = feature_statistics(real)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    adm = load_reference(tmp_path / "adm.npz", "inception")
    out = score_features(fake, torch.randn(60, 10), adm, ("fid", "kid", "is"))
    assert out["fid"] == pytest.approx(r1["fid"], rel=1e-6) and "kid_mean" not in out and "is_mean" in out
    assert "mu/sigma" in out["skipped"]["kid"]
    np.savez(tmp_path / "bad.npz", m=mu)
    with pytest.raises(ValueError, match="no 'mu'/'sigma'"):
        load_reference(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="--save-stats"):
        load_reference(tmp_path / "missing.npz")
