"""SAE reconstruction fidelity of one token group, from per-image float64 sums accumulated batch by batch.

`FidelityStats` keeps sums per image, so any set of images, including a bootstrap resample
given as a row of `bootstrap_counts`, yields its metrics as ratios of weighted sums. The
reconstruction metrics have the definitions of SAELens 6.54 `evals.py` (explained variance,
MSE, cosine, L0, L1, l2 ratio, relative reconstruction bias). Explained variance uses the
true variance sum ||x - mean(x)||^2 over the token set. It is merged from per-image
moments with the pairwise variance update, so a large mean does not cancel digits. The
module also provides the arithmetic for downstream CE and KL scores and for top-k feature
overlap between an image and its caption.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from mmalign.probes.metrics import MetricValue, _interval

logger = logging.getLogger("mmalign.probes.fidelity")

_EPS = 1e-12
_SMALL_NORM = 1e-4  # l2 ratio divides by 1 below this input norm, as SAELens 6.54 does
_DENSITY_CHUNK = 64  # bootstrap rows per [rows, d_sae] density block


# FidelityStats fields that are plain per-image sums of a per-token term.
_PER_TOKEN_SUMS = ("sse", "dot", "sq_norm_hat", "cosine_sum", "l2_ratio_sum", "l0_sum", "l1_sum")


def _combine_moments(
    n_a: np.ndarray, mean_a: np.ndarray, m2_a: np.ndarray, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge token counts `[k]`, means `[k, D]` and sums of squared deviations `[k]` of two token sets.

    With delta = mean_b - mean_a: m2 = m2_a + m2_b + ||delta||^2 n_a n_b / (n_a + n_b).
    """
    n = n_a + n_b
    share_b = np.divide(n_b, n, out=np.zeros_like(n), where=n > 0)
    delta = mean_b - mean_a
    mean = mean_a + delta * share_b[:, None]
    m2 = m2_a + m2_b + (delta**2).sum(axis=1) * n_a * share_b
    return n, mean, m2


@dataclass
class FidelityStats:
    """Per-image float64 sums over one token group, from which every fidelity metric is a ratio.

    Create with `FidelityStats.zeros`, then call `update` once per batch. An image's tokens
    may be split across batches. `firing` costs n_images * d_sae * 4 bytes; pass
    `track_density=False` to `zeros` to skip it and the density metrics.

    Attributes:
        n_tokens: `[N]` token counts.
        mean_x: `[N, D]` mean activation of each image's tokens.
        m2: `[N]` sum over each image's tokens of ||x - mean_x[image]||^2.
        sse: `[N]` sum of ||x - x_hat||^2.
        dot: `[N]` sum of <x, x_hat>.
        sq_norm_hat: `[N]` sum of ||x_hat||^2.
        cosine_sum: `[N]` sum of cos(x, x_hat).
        l2_ratio_sum: `[N]` sum of ||x_hat|| / ||x||.
        l0_sum: `[N]` sum of the count of non-zero latents.
        l1_sum: `[N]` sum of the L1 norm of the latents.
        firing: `[N, d_sae]` int32 count of tokens on which each latent is non-zero, or None.
        d_sae: Number of SAE latents.
    """

    n_tokens: np.ndarray
    mean_x: np.ndarray
    m2: np.ndarray
    sse: np.ndarray
    dot: np.ndarray
    sq_norm_hat: np.ndarray
    cosine_sum: np.ndarray
    l2_ratio_sum: np.ndarray
    l0_sum: np.ndarray
    l1_sum: np.ndarray
    firing: np.ndarray | None
    d_sae: int

    @classmethod
    def zeros(cls, n_images: int, d_model: int, d_sae: int, track_density: bool = True) -> FidelityStats:
        """Return empty statistics for `n_images` images."""

        def vector() -> np.ndarray:
            return np.zeros(n_images, dtype=np.float64)

        firing = np.zeros((n_images, d_sae), dtype=np.int32) if track_density else None
        mean_x = np.zeros((n_images, d_model), dtype=np.float64)
        sums = {name: vector() for name in _PER_TOKEN_SUMS}
        return cls(n_tokens=vector(), mean_x=mean_x, m2=vector(), **sums, firing=firing, d_sae=d_sae)

    @property
    def n_images(self) -> int:
        return int(self.n_tokens.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.mean_x.shape[1])

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, latents: torch.Tensor, image_index: torch.Tensor) -> None:
        """Add one batch of tokens in place. Per-token terms are computed in float64 on the inputs' device.

        Args:
            x: `[M, D]` hidden states of M tokens.
            x_hat: `[M, D]` SAE reconstructions.
            latents: `[M, d_sae]` SAE latent activations.
            image_index: `[M]` image of each token, in `0..n_images-1`.
        """
        if x.shape != x_hat.shape or x.shape[1] != self.d_model:
            raise ValueError(f"x and x_hat must both be [M, {self.d_model}], got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        if latents.shape != (x.shape[0], self.d_sae) or image_index.shape != (x.shape[0],):
            raise ValueError(
                f"latents must be [{x.shape[0]}, {self.d_sae}] and image_index [{x.shape[0]}], "
                f"got {tuple(latents.shape)} and {tuple(image_index.shape)}"
            )
        if x.shape[0] == 0:
            return
        index = image_index.long()
        if int(index.min()) < 0 or int(index.max()) >= self.n_images:
            raise ValueError(f"image_index must lie in 0..{self.n_images - 1}, got {int(index.min())}..{int(index.max())}")
        images, local = torch.unique(index, return_inverse=True)  # [k], [M]
        n_local = images.shape[0]

        def per_image(values: torch.Tensor) -> np.ndarray:
            shape = (n_local, *values.shape[1:])
            return torch.zeros(shape, dtype=values.dtype, device=values.device).index_add_(0, local, values).cpu().numpy()

        x64, x_hat64 = x.double(), x_hat.double()
        norm_x, norm_hat = x64.norm(dim=1), x_hat64.norm(dim=1)  # [M]
        dot = (x64 * x_hat64).sum(dim=1)
        active = latents != 0  # [M, d_sae]
        terms = {
            "sse": ((x64 - x_hat64) ** 2).sum(dim=1),
            "dot": dot,
            "sq_norm_hat": norm_hat**2,
            "cosine_sum": dot / (norm_x * norm_hat).clamp(min=_EPS),
            "l2_ratio_sum": norm_hat / torch.where(norm_x < _SMALL_NORM, 1.0, norm_x),
            "l0_sum": active.sum(dim=1).double(),
            "l1_sum": torch.linalg.vector_norm(latents, ord=1, dim=1, dtype=torch.float64),
        }

        # Two-pass moments of this batch per image, then the pairwise update into the running ones.
        n_batch = per_image(torch.ones_like(norm_x))
        mean_batch = per_image(x64) / n_batch[:, None]
        centred = x64 - torch.as_tensor(mean_batch, device=x64.device)[local]
        m2_batch = per_image((centred**2).sum(dim=1))
        rows = images.cpu().numpy()
        self.n_tokens[rows], self.mean_x[rows], self.m2[rows] = _combine_moments(
            self.n_tokens[rows], self.mean_x[rows], self.m2[rows], n_batch, mean_batch, m2_batch
        )
        for name, values in terms.items():
            getattr(self, name)[rows] += per_image(values)
        if self.firing is not None:
            self.firing[rows] += per_image(active.to(torch.int32))

    def merge(self, other: FidelityStats) -> FidelityStats:
        """Return the statistics of both token sets, for the same images (for example two passes or workers)."""
        if (other.n_images, other.d_model, other.d_sae) != (self.n_images, self.d_model, self.d_sae):
            raise ValueError(
                f"cannot merge stats of shape (n_images, d_model, d_sae) = {(other.n_images, other.d_model, other.d_sae)} "
                f"into {(self.n_images, self.d_model, self.d_sae)}"
            )
        if (self.firing is None) != (other.firing is None):
            raise ValueError("cannot merge stats with and without density tracking; create both with the same track_density")
        n, mean, m2 = _combine_moments(self.n_tokens, self.mean_x, self.m2, other.n_tokens, other.mean_x, other.m2)
        sums = {name: getattr(self, name) + getattr(other, name) for name in _PER_TOKEN_SUMS}
        firing = None if self.firing is None else self.firing + other.firing
        return FidelityStats(n_tokens=n, mean_x=mean, m2=m2, **sums, firing=firing, d_sae=self.d_sae)


def _fidelity_ratios(stats: FidelityStats, weights: np.ndarray, dense_threshold: float) -> dict[str, np.ndarray]:
    """Compute every fidelity metric for each row of image weights `[R, N]`."""
    n_tokens = weights @ stats.n_tokens  # [R]

    # Total variance = sum of within-image m2 + between-image spread of the image means.
    # The means are shifted by the all-image centre first, so the subtraction below
    # cancels only small numbers.
    centre = (stats.n_tokens @ stats.mean_x) / max(stats.n_tokens.sum(), 1.0)
    shifted = stats.mean_x - centre  # [N, D]
    weighted_sum = weights @ (stats.n_tokens[:, None] * shifted)  # [R, D]
    between = weights @ (stats.n_tokens * (shifted**2).sum(axis=1))

    with np.errstate(divide="ignore", invalid="ignore"):
        total_variance = weights @ stats.m2 + between - (weighted_sum**2).sum(axis=1) / n_tokens
        sse = weights @ stats.sse
        l0 = (weights @ stats.l0_sum) / n_tokens
        ratios = {
            "sae_explained_variance": 1.0 - sse / total_variance,
            "sae_fvu": sse / total_variance,
            "sae_mse": sse / (n_tokens * stats.d_model),
            "sae_cosine": (weights @ stats.cosine_sum) / n_tokens,
            "sae_l2_ratio": (weights @ stats.l2_ratio_sum) / n_tokens,
            "sae_relative_reconstruction_bias": (weights @ stats.sq_norm_hat) / (weights @ stats.dot),
            "sae_l0": l0,
            "sae_l1": (weights @ stats.l1_sum) / n_tokens,
            "sae_frac_active": l0 / stats.d_sae,
        }

    if stats.firing is not None:
        dead, dense = np.empty(weights.shape[0]), np.empty(weights.shape[0])
        firing = stats.firing.astype(np.float64)
        for start in range(0, weights.shape[0], _DENSITY_CHUNK):
            block = slice(start, start + _DENSITY_CHUNK)
            fired = weights[block] @ firing  # [rows, d_sae] weighted firing counts
            dead[block] = (fired == 0).sum(axis=1)
            dense[block] = (fired > dense_threshold * n_tokens[block, None]).sum(axis=1)
        ratios["sae_dead_latents"] = dead
        ratios["sae_dense_latents"] = dense
    return ratios


def fidelity_metrics(
    stats: FidelityStats, counts: np.ndarray, ci_level: float, dense_threshold: float = 0.1
) -> dict[str, MetricValue]:
    """Return every SAE fidelity metric of the token group, each with a bootstrap interval over images.

    Over the token set T (all tokens of the images in a resample):

    - sae_explained_variance = 1 - Σ||x - x̂||² / Σ||x - mean_T(x)||², and sae_fvu = 1 - that.
    - sae_mse = Σ||x - x̂||² / (|T| d_model).
    - sae_cosine and sae_l2_ratio: token means of cos(x, x̂) and ||x̂|| / ||x||. A zero-norm
      token contributes 0 to the cosine. The l2 ratio divides by 1 instead of ||x|| when
      ||x|| < 1e-4.
    - sae_relative_reconstruction_bias = Σ||x̂||² / Σ<x, x̂>. It is 1 for an unbiased
      reconstruction and below 1 when the SAE shrinks its outputs.
    - sae_l0, sae_l1: token means of the count and the L1 norm of the latents.
      sae_frac_active = sae_l0 / d_sae.
    - sae_dead_latents: latents that fire on no token of T. sae_dense_latents: latents
      that fire on more than `dense_threshold` of the tokens of T. Both need density tracking.

    Args:
        stats: Per-image sums of the group.
        counts: `[n_boot, N]` image multiplicities from `bootstrap_counts`.
        ci_level: Coverage of the interval, for example 0.95.
        dense_threshold: Firing share above which a latent counts as dense.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != stats.n_images:
        raise ValueError(f"counts must have shape [n_boot, {stats.n_images}] (one column per image), got {counts.shape}")
    point = _fidelity_ratios(stats, np.ones((1, stats.n_images)), dense_threshold)
    resampled = _fidelity_ratios(stats, counts, dense_threshold)
    results = {}
    for name, value in point.items():
        replicates = resampled[name]
        low, high = _interval(replicates, ci_level)
        results[name] = MetricValue(float(value[0]), low, high, stats.n_images, samples=replicates)
    return results


def feature_density(stats: FidelityStats) -> np.ndarray:
    """Return the share of the group's tokens on which each latent is non-zero, `[d_sae]`."""
    if stats.firing is None:
        raise ValueError("feature density needs stats created with track_density=True")
    return stats.firing.sum(axis=0, dtype=np.float64) / max(stats.n_tokens.sum(), 1.0)


# --- downstream scores ---------------------------------------------------------------------


def _ratio_or_nan(numerator, denominator, metric_name: str):
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if np.any(denominator == 0):
        logger.warning("%s: denominator is zero, so the result is NaN there", metric_name)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.where(denominator == 0, np.nan, numerator / denominator)
    return float(result) if result.ndim == 0 else result


def ce_loss_recovered(ce_clean, ce_with_sae, ce_zero_ablation):
    """Return (CE_zero - CE_sae) / (CE_zero - CE_clean): 1 when splicing in the SAE costs nothing, 0 when it is as bad as zero ablation.

    Arguments are floats or broadcastable arrays of mean cross-entropy in nats. The result
    is NaN, with a logged warning, where CE_zero equals CE_clean.
    """
    return _ratio_or_nan(np.subtract(ce_zero_ablation, ce_with_sae), np.subtract(ce_zero_ablation, ce_clean), "CE loss recovered")


def kl_score(kl_sae, kl_zero):
    """Return (KL_zero - KL_sae) / KL_zero, where each KL is from the clean to the patched next-token distribution.

    The result is NaN, with a logged warning, where KL_zero is 0.
    """
    return _ratio_or_nan(np.subtract(kl_zero, kl_sae), kl_zero, "KL score")


def token_kl(logits_clean: torch.Tensor, logits_patched: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Return KL(p_clean || p_patched) per position in float64, shape `[...]` for logits `[..., vocab]`.

    KL = Σ_v p_clean(v) (log p_clean(v) - log p_patched(v)), with both log-probabilities from
    `log_softmax` in float64. Positions are processed `chunk_size` at a time to bound the
    float64 copies of the logits.
    """
    if logits_clean.shape != logits_patched.shape:
        raise ValueError(f"logits must have the same shape, got {tuple(logits_clean.shape)} and {tuple(logits_patched.shape)}")
    vocab = logits_clean.shape[-1]
    clean, patched = logits_clean.reshape(-1, vocab), logits_patched.reshape(-1, vocab)  # [P, vocab]
    kl = torch.empty(clean.shape[0], dtype=torch.float64, device=clean.device)
    for start in range(0, clean.shape[0], chunk_size):
        log_p = torch.log_softmax(clean[start : start + chunk_size].double(), dim=-1)
        log_q = torch.log_softmax(patched[start : start + chunk_size].double(), dim=-1)
        kl[start : start + chunk_size] = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return kl.reshape(logits_clean.shape[:-1])


def image_text_ratio(image_value: float, text_value: float) -> float:
    """Return image_value / text_value, a metric on visual tokens relative to the same metric on text.

    The result is NaN, with a logged warning, when text_value is 0.
    """
    return _ratio_or_nan(image_value, text_value, "image/text ratio")


# --- top-k feature overlap -----------------------------------------------------------------


def topk_features(latents: torch.Tensor, image_index: torch.Tensor, n_images: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank SAE latents per image by their activation summed over the image's tokens.

    Only latents with a positive summed activation are ranked. An image with fewer than k
    of them has its remaining slots filled with index -1 and mass 0.

    Args:
        latents: `[M, d_sae]` latent activations of M tokens.
        image_index: `[M]` image of each token, in `0..n_images-1`.
        n_images: Number of images.
        k: Latents kept per image, at most d_sae.

    Returns:
        `[n_images, k]` latent indices (int64) and their summed activations (float64),
        in descending order of activation.
    """
    if not 1 <= k <= latents.shape[1]:
        raise ValueError(f"k must lie in 1..d_sae={latents.shape[1]}, got {k}")
    sums = torch.zeros(n_images, latents.shape[1], dtype=torch.float64, device=latents.device)
    sums.index_add_(0, image_index.long(), latents.double())  # [n_images, d_sae]
    mass, indices = torch.topk(sums, k, dim=1)
    mass, indices = mass.cpu().numpy(), indices.cpu().numpy()
    positive = mass > 0
    return np.where(positive, indices, -1), np.where(positive, mass, 0.0)


def feature_overlap(
    image_top: np.ndarray,
    caption_top: np.ndarray,
    image_weights: np.ndarray | None = None,
    caption_weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Compare each image's top-k latents with its caption's.

    Jaccard = |A ∩ B| / |A ∪ B| for the latent sets A (image) and B (caption), ignoring
    -1 slots. The weighted overlap is Σ_f min(a_f, b_f) / Σ_f max(a_f, b_f) over f ∈ A ∪ B,
    where a and b are each set's activation masses divided by their total, and a latent
    outside a set has mass 0 there. The masses are divided by their totals because the image
    group usually has many more tokens than the caption. Raw sums would then measure the
    token count. Either score is NaN for an image whose two sets are both empty.

    Args:
        image_top: `[N, k]` latent indices from `topk_features` on the image tokens.
        caption_top: `[N, k2]` latent indices from `topk_features` on the caption tokens.
        image_weights: `[N, k]` matching masses, or None.
        caption_weights: `[N, k2]` matching masses, or None.

    Returns:
        Per-image Jaccard `[N]` and weighted overlap `[N]`, or None in place of the weighted
        overlap when no weights are given.
    """
    if (image_weights is None) != (caption_weights is None):
        raise ValueError("weighted overlap needs both image_weights and caption_weights, or neither")
    if image_top.shape[0] != caption_top.shape[0]:
        raise ValueError(f"need one row per image in both, got {image_top.shape[0]} and {caption_top.shape[0]} rows")
    weighted = image_weights is not None
    n_images = image_top.shape[0]
    jaccard = np.full(n_images, np.nan)
    overlap = np.full(n_images, np.nan) if weighted else None
    for i in range(n_images):
        image_mass = _normalized_masses(image_top[i], image_weights[i] if weighted else None)
        caption_mass = _normalized_masses(caption_top[i], caption_weights[i] if weighted else None)
        union = image_mass.keys() | caption_mass.keys()
        if not union:
            continue
        jaccard[i] = len(image_mass.keys() & caption_mass.keys()) / len(union)
        if weighted:
            low = sum(min(image_mass.get(f, 0.0), caption_mass.get(f, 0.0)) for f in union)
            high = sum(max(image_mass.get(f, 0.0), caption_mass.get(f, 0.0)) for f in union)
            overlap[i] = low / high if high > 0 else np.nan
    return jaccard, overlap


def _normalized_masses(indices: np.ndarray, masses: np.ndarray | None) -> dict[int, float]:
    """Map each valid latent index of one set to its share of the set's mass (0 when unweighted)."""
    valid = indices >= 0
    if masses is None:
        return {int(f): 0.0 for f in indices[valid]}
    total = float(masses[valid].sum())
    return {int(f): (float(m) / total if total > 0 else 0.0) for f, m in zip(indices[valid], masses[valid])}
