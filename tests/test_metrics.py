"""Closed-form cases for the per-layer metric functions."""

import numpy as np
import pytest
import torch

from mmalign.probes.metrics import (
    bootstrap_counts,
    linear_cka,
    mean_with_ci,
    retrieval_hits,
    sae_metrics,
    sae_token_stats,
)
from mmalign.probes.similarity import linear_cka_with_ci


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_cka_identical_inputs_is_one():
    x = _rng().normal(size=(50, 8))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_rotation_and_scale():
    x = _rng().normal(size=(40, 6))
    rotation, _ = np.linalg.qr(_rng(1).normal(size=(6, 6)))
    assert linear_cka(x, 3.5 * x @ rotation) == pytest.approx(1.0, abs=1e-10)


def test_cka_one_dimensional_is_squared_correlation():
    x = _rng().normal(size=(30, 1))
    y = 0.5 * x + _rng(2).normal(size=(30, 1))
    correlation = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert linear_cka(x, y) == pytest.approx(correlation**2, rel=1e-10)


def test_cka_destroyed_by_shuffling_rows():
    x = _rng().normal(size=(200, 5))
    shuffled = x[_rng(3).permutation(200)]
    assert linear_cka(x, shuffled) < 0.1


def test_cka_rejects_unpaired_rows():
    with pytest.raises(ValueError, match="same items"):
        linear_cka(np.zeros((3, 2)), np.zeros((4, 2)))


def test_cka_interval_contains_point_estimate():
    x = _rng().normal(size=(60, 4))
    y = x + 0.5 * _rng(4).normal(size=(60, 4))
    value = linear_cka_with_ci(x, y, bootstrap_counts(60, 200, seed=0), 0.95)
    assert value.ci_low <= value.value <= value.ci_high
    assert value.n == 60


def _stats(x, x_hat, latents, image_index, n_images):
    return sae_token_stats(torch.tensor(x), torch.tensor(x_hat), torch.tensor(latents), torch.tensor(image_index), n_images)


def test_sae_metrics_perfect_reconstruction():
    x = _rng().normal(size=(12, 4))
    latents = np.zeros((12, 6))
    latents[:, 0] = 1.0
    stats = _stats(x, x, latents, np.arange(12) % 3, 3)
    result = sae_metrics(stats, bootstrap_counts(3, 50, 0), 0.95)
    assert result["sae_mse"].value == 0.0
    assert result["sae_fvu"].value == 0.0
    assert result["sae_l0"].value == 1.0


def test_sae_fvu_of_mean_reconstruction_is_one():
    x = _rng().normal(size=(20, 3))
    x_hat = np.broadcast_to(x.mean(axis=0), x.shape).copy()
    stats = _stats(x, x_hat, np.zeros((20, 2)), np.arange(20) % 4, 4)
    result = sae_metrics(stats, bootstrap_counts(4, 20, 0), 0.95)
    assert result["sae_fvu"].value == pytest.approx(1.0, abs=1e-12)


def test_sae_mse_and_l0_hand_computed():
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    x_hat = np.array([[1.0, 0.0], [3.0, 5.0]])  # squared errors 4 and 1 over 4 entries
    latents = np.array([[1.0, 0.0, 2.0], [0.0, 0.0, 0.5]])  # 2 and 1 non-zero latents
    stats = _stats(x, x_hat, latents, np.array([0, 1]), 2)
    result = sae_metrics(stats, bootstrap_counts(2, 10, 0), 0.95)
    assert result["sae_mse"].value == pytest.approx(5.0 / 4.0)
    assert result["sae_l0"].value == pytest.approx(1.5)
    # total variance: mean (2, 3); squared deviations 1+1 and 1+1
    assert result["sae_fvu"].value == pytest.approx(5.0 / 4.0)


def test_retrieval_identity_and_reversal():
    queries = np.eye(5)
    assert retrieval_hits(queries, queries).mean() == 1.0
    assert retrieval_hits(queries, queries[::-1]).sum() == 1.0  # only the middle row maps to itself


def test_mean_interval_of_constant_is_degenerate():
    value = mean_with_ci(np.full(10, 0.3), bootstrap_counts(10, 100, 0), 0.95)
    assert value.value == pytest.approx(0.3)
    assert value.ci_low == pytest.approx(0.3)
    assert value.ci_high == pytest.approx(0.3)


def test_bootstrap_counts_resample_every_item_total():
    counts = bootstrap_counts(7, 30, seed=5)
    assert counts.shape == (30, 7)
    assert (counts.sum(axis=1) == 7).all()
    assert np.array_equal(counts, bootstrap_counts(7, 30, seed=5))
