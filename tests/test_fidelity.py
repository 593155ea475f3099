"""Closed-form cases for SAE fidelity statistics, downstream CE/KL scores and feature overlap."""

import logging

import numpy as np
import pytest
import torch

from mmalign.probes.fidelity import (
    FidelityStats,
    ce_loss_recovered,
    feature_density,
    feature_overlap,
    fidelity_metrics,
    image_text_ratio,
    kl_score,
    token_kl,
    topk_features,
)
from mmalign.probes.metrics import bootstrap_counts


def _stats(x, x_hat, latents, image_index, n_images, **kwargs) -> FidelityStats:
    x, x_hat, latents = (torch.as_tensor(np.array(a, dtype=np.float64)) for a in (x, x_hat, latents))
    stats = FidelityStats.zeros(n_images, x.shape[1], latents.shape[1], **kwargs)
    stats.update(x, x_hat, latents, torch.as_tensor(image_index))
    return stats


def _point(stats: FidelityStats, **kwargs) -> dict[str, float]:
    metrics = fidelity_metrics(stats, np.ones((1, stats.n_images)), 0.95, **kwargs)
    return {name: value.value for name, value in metrics.items()}


def _random_tokens(seed: int, n_tokens: int = 40, d_model: int = 6, d_sae: int = 12, offset: float = 5.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_tokens, d_model)) + offset
    x_hat = x + 0.3 * rng.normal(size=(n_tokens, d_model))
    latents = np.maximum(rng.normal(size=(n_tokens, d_sae)) - 0.5, 0.0)
    image_index = rng.integers(0, 4, size=n_tokens)
    return x, x_hat, latents, image_index


# --- reconstruction metrics ----------------------------------------------------------------


def test_perfect_reconstruction():
    x, _, latents, image_index = _random_tokens(0)
    metrics = _point(_stats(x, x, latents, image_index, 4))
    assert metrics["sae_explained_variance"] == pytest.approx(1.0)
    assert metrics["sae_fvu"] == pytest.approx(0.0)
    assert metrics["sae_mse"] == pytest.approx(0.0)
    assert metrics["sae_cosine"] == pytest.approx(1.0)
    assert metrics["sae_l2_ratio"] == pytest.approx(1.0)
    assert metrics["sae_relative_reconstruction_bias"] == pytest.approx(1.0)


def test_mean_reconstruction_explains_nothing():
    x, _, latents, image_index = _random_tokens(1)
    x_hat = np.broadcast_to(x.mean(axis=0), x.shape)
    metrics = _point(_stats(x, x_hat, latents, image_index, 4))
    assert metrics["sae_explained_variance"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["sae_fvu"] == pytest.approx(1.0)


def test_hand_computed_tiny_case():
    x = [[1.0, 0.0], [3.0, 0.0], [2.0, 2.0]]  # mean [2, 2/3], sum ||x - mean||^2 = 14/3
    x_hat = [[1.0, 0.0], [3.0, 0.0], [2.0, 0.0]]  # squared error 4
    latents = [[0.0, 2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    metrics = _point(_stats(x, x_hat, latents, [0, 0, 1], 2))
    assert metrics["sae_explained_variance"] == pytest.approx(1.0 / 7.0)
    assert metrics["sae_fvu"] == pytest.approx(6.0 / 7.0)
    assert metrics["sae_mse"] == pytest.approx(4.0 / 6.0)
    assert metrics["sae_cosine"] == pytest.approx((2.0 + 1.0 / np.sqrt(2.0)) / 3.0)
    assert metrics["sae_l2_ratio"] == pytest.approx((2.0 + 1.0 / np.sqrt(2.0)) / 3.0)
    assert metrics["sae_relative_reconstruction_bias"] == pytest.approx(14.0 / 14.0)
    assert metrics["sae_l0"] == pytest.approx(1.0)
    assert metrics["sae_l1"] == pytest.approx(4.0 / 3.0)
    assert metrics["sae_frac_active"] == pytest.approx(1.0 / 3.0)


def test_shrunk_reconstruction_bias_and_l2_ratio():
    x, _, latents, image_index = _random_tokens(2)
    metrics = _point(_stats(x, 0.5 * x, latents, image_index, 4))
    assert metrics["sae_relative_reconstruction_bias"] == pytest.approx(0.5)
    assert metrics["sae_l2_ratio"] == pytest.approx(0.5)
    assert metrics["sae_cosine"] == pytest.approx(1.0)


def test_zero_norm_token_conventions():
    x = [[0.0, 0.0], [1.0, 0.0]]
    x_hat = [[0.5, 0.0], [1.0, 0.0]]
    metrics = _point(_stats(x, x_hat, np.zeros((2, 3)), [0, 0], 1))
    assert metrics["sae_cosine"] == pytest.approx(0.5)  # the zero token contributes 0
    assert metrics["sae_l2_ratio"] == pytest.approx(0.75)  # the zero token contributes 0.5 / 1


def test_explained_variance_uses_true_variance():
    x, x_hat, latents, image_index = _random_tokens(3, offset=5.0)
    metrics = _point(_stats(x, x_hat, latents, image_index, 4))
    sse = ((x - x_hat) ** 2).sum()
    two_pass = 1.0 - sse / ((x - x.mean(axis=0)) ** 2).sum()
    assert metrics["sae_explained_variance"] == pytest.approx(two_pass, rel=1e-12)
    # Contrast formula: total variance taken as E||x||^2 - (mean_d E[x_d^2])^2 per token.
    mean_sq_norm = (x**2).sum(axis=1).mean()
    contrast_total = x.shape[0] * (mean_sq_norm - (mean_sq_norm / x.shape[1]) ** 2)
    contrast = 1.0 - sse / contrast_total
    assert abs(metrics["sae_explained_variance"] - contrast) > 0.05


def test_explained_variance_stable_with_large_mean():
    x, x_hat, latents, image_index = _random_tokens(4, offset=1e5)
    metrics = _point(_stats(x, x_hat, latents, image_index, 4))
    two_pass = 1.0 - ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
    assert metrics["sae_explained_variance"] == pytest.approx(two_pass, rel=1e-9)


# --- streaming -----------------------------------------------------------------------------


def test_two_batches_equal_one_batch():
    x, x_hat, latents, image_index = _random_tokens(5)
    whole = _stats(x, x_hat, latents, image_index, 4)
    split = FidelityStats.zeros(4, x.shape[1], latents.shape[1])
    for part in (slice(0, 17), slice(17, None)):  # images straddle the split
        split.update(*(torch.as_tensor(a[part]) for a in (x, x_hat, latents, image_index)))
    counts = bootstrap_counts(4, 50, seed=0)
    expected, actual = fidelity_metrics(whole, counts, 0.95), fidelity_metrics(split, counts, 0.95)
    for name, value in expected.items():
        assert actual[name].value == pytest.approx(value.value, rel=1e-10), name
        assert actual[name].ci_low == pytest.approx(value.ci_low, rel=1e-10), name
    np.testing.assert_array_equal(feature_density(split), feature_density(whole))


def test_merge_equals_single_pass():
    x, x_hat, latents, image_index = _random_tokens(6)
    whole = _stats(x, x_hat, latents, image_index, 4)
    first = _stats(x[:25], x_hat[:25], latents[:25], image_index[:25], 4)
    second = _stats(x[25:], x_hat[25:], latents[25:], image_index[25:], 4)
    merged = first.merge(second)
    np.testing.assert_allclose(merged.mean_x, whole.mean_x, rtol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-10)
    assert _point(merged) == pytest.approx(_point(whole), rel=1e-10)
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(FidelityStats.zeros(3, x.shape[1], latents.shape[1]))


def test_update_rejects_bad_input():
    stats = FidelityStats.zeros(2, 3, 4)
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="image_index must lie"):
        stats.update(x, x, torch.zeros(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="latents must be"):
        stats.update(x, x, torch.zeros(5, 5), torch.zeros(5, dtype=torch.long))


# --- density and bootstrap -----------------------------------------------------------------


def test_dead_and_dense_latents():
    latents = np.zeros((20, 5))
    latents[:1, 1] = 1.0  # 5 % of tokens
    latents[:2, 2] = 1.0  # 10 %, not above the 10 % threshold
    latents[:3, 3] = 1.0  # 15 %
    x = np.ones((20, 2))
    stats = _stats(x, x, latents, np.arange(20) % 2, 2)
    np.testing.assert_allclose(feature_density(stats), [0.0, 0.05, 0.10, 0.15, 0.0])
    assert _point(stats)["sae_dead_latents"] == 2
    assert _point(stats)["sae_dense_latents"] == 1
    assert _point(stats, dense_threshold=0.04)["sae_dense_latents"] == 3


def test_density_tracking_can_be_skipped():
    x, x_hat, latents, image_index = _random_tokens(7)
    stats = _stats(x, x_hat, latents, image_index, 4, track_density=False)
    assert "sae_dead_latents" not in _point(stats)
    with pytest.raises(ValueError, match="track_density"):
        feature_density(stats)


def test_bootstrap_identity_counts_and_shape_check():
    x, x_hat, latents, image_index = _random_tokens(8)
    stats = _stats(x, x_hat, latents, image_index, 4)
    for name, value in fidelity_metrics(stats, np.ones((3, 4)), 0.95).items():
        assert value.ci_low == pytest.approx(value.value), name
        assert value.ci_high == pytest.approx(value.value), name
        assert value.n == 4
    with pytest.raises(ValueError, match="counts must have shape"):
        fidelity_metrics(stats, np.ones((3, 5)), 0.95)


# --- downstream scores ---------------------------------------------------------------------


def test_ce_loss_recovered_endpoints(caplog):
    assert ce_loss_recovered(2.0, 2.0, 6.0) == pytest.approx(1.0)
    assert ce_loss_recovered(2.0, 6.0, 6.0) == pytest.approx(0.0)
    assert ce_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    np.testing.assert_allclose(ce_loss_recovered(np.array([2.0, 1.0]), 2.0, 6.0), [1.0, 0.8])
    with caplog.at_level(logging.WARNING, logger="mmalign.probes.fidelity"):
        assert np.isnan(ce_loss_recovered(2.0, 2.5, 2.0))
    assert "denominator is zero" in caplog.text


def test_kl_score_hand_case():
    assert kl_score(0.5, 2.0) == pytest.approx(0.75)
    assert kl_score(0.0, 2.0) == pytest.approx(1.0)
    assert np.isnan(kl_score(0.5, 0.0))


def test_token_kl_identical_and_hand_case():
    logits = torch.randn(2, 5, 11)
    np.testing.assert_allclose(token_kl(logits, logits).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(token_kl(logits, logits + 3.0).numpy(), 0.0, atol=1e-12)
    clean = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    patched = torch.tensor([[np.log(3.0), 0.0]])  # q = (3/4, 1/4)
    kl = token_kl(clean, patched)
    assert kl.dtype == torch.float64
    assert kl.shape == (1,)
    assert float(kl[0]) == pytest.approx(0.5 * np.log(4.0 / 3.0), rel=1e-12)


def test_token_kl_chunking_and_sign():
    clean, patched = torch.randn(3, 7, 13), torch.randn(3, 7, 13)
    full = token_kl(clean, patched)
    assert full.shape == (3, 7)
    assert bool((full >= 0).all())
    torch.testing.assert_close(token_kl(clean, patched, chunk_size=2), full)


def test_image_text_ratio(caplog):
    assert image_text_ratio(3.0, 2.0) == pytest.approx(1.5)
    with caplog.at_level(logging.WARNING, logger="mmalign.probes.fidelity"):
        assert np.isnan(image_text_ratio(3.0, 0.0))
    assert "image/text ratio" in caplog.text


# --- top-k feature overlap -----------------------------------------------------------------


def test_topk_features_hand_case():
    latents = torch.tensor([[1.0, 0.0, 3.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    indices, mass = topk_features(latents, torch.tensor([0, 0, 1]), n_images=3, k=2)
    np.testing.assert_array_equal(indices, [[2, 0], [1, -1], [-1, -1]])
    np.testing.assert_allclose(mass, [[3.0, 2.0], [5.0, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="k must lie"):
        topk_features(latents, torch.tensor([0, 0, 1]), n_images=3, k=4)


def test_feature_overlap_hand_case():
    image_top = np.array([[1, 2, 3], [5, 6, -1], [7, 8, 9], [-1, -1, -1]])
    caption_top = np.array([[2, 3, 4], [5, 6, -1], [1, 2, 3], [-1, -1, -1]])
    image_weights = np.array([[1.0, 1.0, 2.0], [3.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    caption_weights = np.array([[2.0, 1.0, 1.0], [6.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    jaccard, weighted = feature_overlap(image_top, caption_top, image_weights, caption_weights)
    np.testing.assert_allclose(jaccard[:3], [0.5, 1.0, 0.0])
    np.testing.assert_allclose(weighted[:3], [1.0 / 3.0, 1.0, 0.0])  # row 1: same shares after normalising
    assert np.isnan(jaccard[3])
    assert np.isnan(weighted[3])


def test_feature_overlap_without_weights():
    jaccard, weighted = feature_overlap(np.array([[1, 2]]), np.array([[2, 3]]))
    np.testing.assert_allclose(jaccard, [1.0 / 3.0])
    assert weighted is None
    with pytest.raises(ValueError, match="both image_weights and caption_weights"):
        feature_overlap(np.array([[1, 2]]), np.array([[2, 3]]), image_weights=np.ones((1, 2)))
