"""Per-layer metric functions: SAE fidelity, linear CKA and retrieval, with bootstrap intervals.

Every interval is a percentile bootstrap over images: the unit of resampling is the image,
so tokens of one image are never split across resamples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class MetricValue:
    """A metric's point estimate over all images with its bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    samples: np.ndarray | None = field(default=None, repr=False)  # bootstrap replicates, for paired differences


def bootstrap_counts(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    """Return `[n_boot, n_items]` multiplicities of each item in each bootstrap resample."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_items, np.full(n_items, 1.0 / n_items), size=n_boot).astype(np.float64)


def _interval(samples: np.ndarray, ci_level: float) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - ci_level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


# --- SAE fidelity -------------------------------------------------------------------------


@dataclass
class SaeTokenStats:
    """Per-image sums over one token group, in float64, from which SAE metrics are ratios.

    Attributes:
        sse: `[N]` summed squared reconstruction error over tokens and dimensions.
        n_tokens: `[N]` token counts.
        sum_x: `[N, D]` summed activations (for the true variance).
        sum_sq_norm: `[N]` summed squared norms ||x||^2.
        l0_sum: `[N]` summed count of non-zero latents.
    """

    sse: np.ndarray
    n_tokens: np.ndarray
    sum_x: np.ndarray
    sum_sq_norm: np.ndarray
    l0_sum: np.ndarray

    @property
    def d_model(self) -> int:
        return int(self.sum_x.shape[1])


def sae_token_stats(x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor, image_index: torch.Tensor, n_images: int) -> SaeTokenStats:
    """Accumulate per-image sums from flattened tokens.

    Args:
        x: `[M, D]` hidden states of M tokens.
        x_hat: `[M, D]` SAE reconstructions.
        latents: `[M, d_sae]` SAE latent activations.
        image_index: `[M]` which image each token belongs to, in `0..n_images-1`.
        n_images: Number of images.
    """
    x64, x_hat64 = x.double(), x_hat.double()
    index = image_index.long()
    dim = x.shape[1]
    sse = torch.zeros(n_images, dtype=torch.float64).index_add_(0, index, ((x64 - x_hat64) ** 2).sum(dim=1))
    n_tokens = torch.zeros(n_images, dtype=torch.float64).index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    sum_x = torch.zeros(n_images, dim, dtype=torch.float64).index_add_(0, index, x64)
    sum_sq_norm = torch.zeros(n_images, dtype=torch.float64).index_add_(0, index, (x64**2).sum(dim=1))
    l0_sum = torch.zeros(n_images, dtype=torch.float64).index_add_(0, index, (latents != 0).sum(dim=1).double())
    return SaeTokenStats(sse.numpy(), n_tokens.numpy(), sum_x.numpy(), sum_sq_norm.numpy(), l0_sum.numpy())


def _sae_ratios(stats: SaeTokenStats, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Compute the SAE metrics for each row of image weights `[R, N]`."""
    sse = weights @ stats.sse
    n_tokens = weights @ stats.n_tokens
    sum_x = weights @ stats.sum_x  # [R, D]
    sum_sq_norm = weights @ stats.sum_sq_norm
    with np.errstate(divide="ignore", invalid="ignore"):
        total_variance = sum_sq_norm - (sum_x**2).sum(axis=1) / n_tokens  # sum ||x - mean||^2
        return {
            "sae_mse": sse / (n_tokens * stats.d_model),
            "sae_fvu": sse / total_variance,
            "sae_l0": (weights @ stats.l0_sum) / n_tokens,
        }


def sae_metrics(stats: SaeTokenStats, counts: np.ndarray, ci_level: float) -> dict[str, MetricValue]:
    """Return raw MSE, fraction of variance unexplained and L0 with bootstrap intervals.

    MSE is the mean of (x_hat - x)^2 over tokens and dimensions. FVU is
    sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the group's tokens (the true variance,
    in float64). L0 is the mean count of non-zero latents per token.
    """
    n_images = stats.sse.shape[0]
    point = _sae_ratios(stats, np.ones((1, n_images)))
    resampled = _sae_ratios(stats, counts)
    results = {}
    for name, value in point.items():
        replicates = resampled[name]
        low, high = _interval(replicates, ci_level)
        results[name] = MetricValue(float(value[0]), low, high, n_images, samples=replicates)
    return results


# --- representational similarity -----------------------------------------------------------


def _centered_gram(features: np.ndarray) -> np.ndarray:
    gram = features @ features.T
    n = gram.shape[0]
    centering = np.eye(n) - np.full((n, n), 1.0 / n)
    return centering @ gram @ centering


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T.

    Args:
        x: `[n, d1]` representations of n items.
        y: `[n, d2]` representations of the same n items.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same items in both spaces, got {x.shape[0]} and {y.shape[0]} rows")
    k = _centered_gram(np.asarray(x, dtype=np.float64))
    l = _centered_gram(np.asarray(y, dtype=np.float64))
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def retrieval_hits(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Return, per query i, 1.0 when gallery item i is its most cosine-similar item, else 0.0."""
    if queries.shape[0] != gallery.shape[0]:
        raise ValueError(f"retrieval needs paired rows, got {queries.shape[0]} queries and {gallery.shape[0]} gallery items")
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
    similarity = q @ g.T
    return (similarity.argmax(axis=1) == np.arange(queries.shape[0])).astype(np.float64)


def mean_with_ci(per_item: np.ndarray, counts: np.ndarray, ci_level: float) -> MetricValue:
    """Mean of per-item values with a bootstrap interval over items."""
    per_item = np.asarray(per_item, dtype=np.float64)
    samples = (counts @ per_item) / counts.sum(axis=1)
    replicates = samples
    low, high = _interval(replicates, ci_level)
    return MetricValue(float(per_item.mean()), low, high, int(per_item.shape[0]), samples=replicates)
