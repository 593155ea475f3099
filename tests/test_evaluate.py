"""Tests for the evaluator's bounded sample of images for pairwise metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from mmalign.config import EvalConfig
from mmalign.evaluate import _GroupBuilder, pair_sample


def tiny_sae() -> StandardSAE:
    torch.manual_seed(0)
    return StandardSAE(StandardSAEConfig(d_in=4, d_sae=8))


def test_pair_sample_all_images_below_limit() -> None:
    assert pair_sample(10, 10, seed=0) is None


def test_pair_sample_sorted_distinct_and_seeded() -> None:
    rows = pair_sample(100, 7, seed=3)
    assert len(rows) == 7
    assert len(set(rows.tolist())) == 7
    assert (np.diff(rows) > 0).all()
    assert (rows == pair_sample(100, 7, seed=3)).all()


def test_builder_keeps_means_of_sampled_rows_only() -> None:
    hidden = torch.randn(6, 3, 4)  # [B, L, D]
    mask = torch.tensor([[1, 1, 0]] * 6, dtype=torch.bool)
    full = _GroupBuilder(6, tiny_sae(), top_k=2)
    sampled = _GroupBuilder(6, tiny_sae(), top_k=2, mean_rows=np.array([1, 4]))
    for builder in (full, sampled):
        builder.add(hidden[:3], mask[:3], 0)
        builder.add(hidden[3:], mask[3:], 3)
    expected = hidden[:, :2].double().mean(dim=1).numpy()  # [6, D]
    assert full.means.shape == (6, 4)
    assert sampled.means.shape == (2, 4)
    np.testing.assert_allclose(full.means, expected)
    np.testing.assert_allclose(sampled.means, expected[[1, 4]])


def test_builder_fidelity_stats_cover_every_image() -> None:
    hidden = torch.randn(6, 3, 4)
    mask = torch.ones(6, 3, dtype=torch.bool)
    sampled = _GroupBuilder(6, tiny_sae(), top_k=2, mean_rows=np.array([0, 5]))
    sampled.add(hidden, mask, 0)
    assert sampled.stats.n_images == 6
    assert (sampled.top_index >= 0).all()


def test_max_pair_images_below_four_rejected() -> None:
    with pytest.raises(ValueError, match="max_pair_images"):
        EvalConfig(max_pair_images=2)


def test_saved_sae_metrics_match_sae_lens_outputs(tmp_path) -> None:
    """Metrics of a sae-lens SAE reloaded from disk equal formulas applied to its own encode/decode."""
    from sae_lens import SAE

    from mmalign.probes.fidelity import fidelity_metrics

    source = tiny_sae()
    with torch.no_grad():
        source.b_enc.uniform_(-0.5, 0.5)
    source.save_model(tmp_path / "sae")
    sae = SAE.load_from_disk(tmp_path / "sae")
    hidden = 3.0 + torch.randn(5, 4, 4)  # [B, L, D]
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[:, 3] = False
    builder = _GroupBuilder(5, sae, top_k=2)
    builder.add(hidden, mask, 0)
    ours = {name: value.value for name, value in fidelity_metrics(builder.stats, np.ones((1, 5)), 0.95).items()}

    x = hidden[mask].double()  # [M, D]
    with torch.no_grad():
        latents = sae.encode(hidden[mask]).double()
        x_hat = sae.decode(sae.encode(hidden[mask])).double()
    sse = ((x - x_hat) ** 2).sum()
    variance = ((x - x.mean(dim=0)) ** 2).sum()
    assert ours["sae_mse"] == pytest.approx(float(sse / x.numel()), rel=1e-6)
    assert ours["sae_fvu"] == pytest.approx(float(sse / variance), rel=1e-6)
    assert ours["sae_l0"] == pytest.approx(float((latents > 0).sum(dim=1).double().mean()), rel=1e-6)
    cosine = torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean()
    assert ours["sae_cosine"] == pytest.approx(float(cosine), rel=1e-6)
