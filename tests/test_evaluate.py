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
