"""Representational similarity between paired per-image representations, with bootstrap intervals.

Every function takes X `[n, d1]` and Y `[n, d2]` whose row i describes image i (for
example the mean visual-token state and the mean caption state at one LM layer). Every
interval reuses the `[n_boot, n]` multiplicity matrix from `bootstrap_counts`, so all
metrics of one evaluation share their resamples and differences between them are paired.
Each `*_with_ci` docstring states how its statistic is recomputed on a resample.

Mean-type metrics (SVCCA's correlations of fixed variates, the modality gap, norm ratios)
use the ordinary percentile bootstrap: a duplicated image acts as a weight. Pairwise
metrics (linear and unbiased CKA, mutual k-NN, CKNNA) do not. In a resample with
replacement, the copies of one image form identical pairs: the image becomes its own
nearest neighbour, and its Gram rows are repeated, so the resampled values sit above the
full-sample value and the interval is biased upwards. `_distinct_row_interval` evaluates
each resample on its distinct images only, a subsample without replacement of about
0.632 n, and rescales the spread to the full sample size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmalign.probes.metrics import MetricValue, _interval

_EPS = 1e-12


def _as_float64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _check_paired(x: np.ndarray, y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float64(x), _as_float64(y)
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"{name} needs 2-D arrays [n, d], got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} needs the same images in both spaces, got {x.shape[0]} and {y.shape[0]} rows")
    return x, y


def _check_counts(counts: np.ndarray, n: int) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != n:
        raise ValueError(f"counts must have shape [n_boot, {n}] (one column per image), got {counts.shape}")
    return counts


def _resample_index(multiplicity: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(multiplicity.shape[0]), multiplicity.astype(int))


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), _EPS)


def _distinct_row_interval(
    point: float, statistic: Callable[[np.ndarray], float], counts: np.ndarray, ci_level: float
) -> MetricValue:
    """Interval of a pairwise statistic from its values on the distinct images of each resample.

    The distinct images of a resample are a subsample of m_b images drawn without
    replacement. For a statistic that is asymptotically linear in the images (a smooth
    function of U-statistics such as HSIC), Var(T_m - T_n) is about (1/m - 1/n) sigma^2,
    while Var(T_n) is about sigma^2 / n. So each deviation is multiplied by
    sqrt(m_b / (n - m_b)) (about 1.31), which gives it the spread of T_n. Deviations are
    taken from the mean of the subsample values rather than from `point`, because
    statistics such as biased CKA and mutual k-NN also shift with the number of images,
    and that shift is not uncertainty. The replicates are `point` plus the rescaled
    deviations. Their percentiles give the interval. Differences between the replicates of
    two metrics computed from the same resamples give paired intervals.

    NOTE: when X and Y are independent, HSIC is a degenerate U-statistic whose deviations
    shrink like 1/m rather than 1/sqrt(m). By the same variance argument, the rescaled
    interval is then about 1.6 times wider than needed.

    Args:
        point: The statistic on all n images.
        statistic: Maps an index array of distinct images to the statistic on them. It returns
            NaN when the statistic is undefined for so few images, and such resamples are left out.
        counts: `[n_boot, n]` multiplicities from `bootstrap_counts`.
        ci_level: Coverage of the interval.
    """
    n = counts.shape[1]
    sizes = (counts > 0).sum(axis=1)
    partial = sizes < n  # a resample with every image is the full sample, so its replicate is `point`
    raw = np.full(counts.shape[0], np.nan)
    for row in np.flatnonzero(partial):
        raw[row] = statistic(np.flatnonzero(counts[row]))
    replicates = np.full(counts.shape[0], point)
    finite = partial & np.isfinite(raw)
    replicates[partial & ~finite] = np.nan
    if finite.any():
        factor = np.sqrt(sizes[finite] / (n - sizes[finite]))
        replicates[finite] = point + factor * (raw[finite] - raw[finite].mean())
    low, high = _interval(replicates, ci_level)
    return MetricValue(point, low, high, n, samples=replicates)


def _centred(gram: np.ndarray) -> np.ndarray:
    """Return H K H for a `[m, m]` Gram matrix, with H = I - 11^T / m."""
    return gram - gram.mean(axis=0, keepdims=True) - gram.mean(axis=1, keepdims=True) + gram.mean()


# --- linear CKA ----------------------------------------------------------------------------


def _linear_cka_from_grams(k: np.ndarray, l: np.ndarray) -> float:
    k, l = _centred(k), _centred(l)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


def linear_cka_with_ci(x: np.ndarray, y: np.ndarray, counts: np.ndarray, ci_level: float) -> MetricValue:
    """Linear CKA, HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with K = X X^T, L = Y Y^T, and its interval.

    The point value is CKA on all n images. The interval comes from `_distinct_row_interval`:
    both Gram matrices are computed once, and each resample centres the block of its
    distinct images.
    """
    x, y = _check_paired(x, y, "linear CKA")
    n = x.shape[0]
    counts = _check_counts(counts, n)
    gram_x, gram_y = x @ x.T, y @ y.T  # [n, n] each

    def on_rows(index: np.ndarray) -> float:
        return _linear_cka_from_grams(gram_x[np.ix_(index, index)], gram_y[np.ix_(index, index)])

    return _distinct_row_interval(_linear_cka_from_grams(gram_x, gram_y), on_rows, counts, ci_level)


# --- unbiased CKA --------------------------------------------------------------------------


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC of two `[n, n]` Gram matrices whose diagonals are already zero."""
    n = k.shape[0]
    trace_term = (k * l).sum()  # tr(K~ L~) for symmetric matrices
    sum_term = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (k.sum(axis=1) @ l.sum(axis=1))  # 1^T K~ L~ 1
    return float((trace_term + sum_term - cross_term) / (n * (n - 3)))


def _cka_from_zeroed_grams(k: np.ndarray, l: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(_hsic_unbiased(k, l) / np.sqrt(_hsic_unbiased(k, k) * _hsic_unbiased(l, l)))


def unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA from the unbiased HSIC estimator (Song et al., 2012).

    With K = X X^T and L = Y Y^T, K~ and L~ are K and L with their diagonals set to zero, and

        HSIC_u(K, L) = [tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) / ((n-1)(n-2))
                        - 2/(n-2) 1^T K~ L~ 1] / (n(n-3)),
        CKA_u = HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)).

    Unlike the biased linear CKA, the value does not drift upwards when n is small relative
    to the feature dimension. It can be slightly negative for unrelated representations.

    Args:
        x: `[n, d1]` representations of n images.
        y: `[n, d2]` representations of the same images.

    Raises:
        ValueError: if the row counts differ or n < 4 (the estimator divides by n - 3).
    """
    x, y = _check_paired(x, y, "unbiased CKA")
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"unbiased CKA needs at least 4 images, got {n}")
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    return _cka_from_zeroed_grams(k, l)


def unbiased_cka_with_ci(x: np.ndarray, y: np.ndarray, counts: np.ndarray, ci_level: float) -> MetricValue:
    """Unbiased CKA with an interval from the distinct images of each resample.

    Both Gram matrices are computed once, and each resample applies the estimator to the
    block of its distinct images (`_distinct_row_interval`). Zeroing only the pairs of
    copies inside a resample with replacement would not be enough, because the
    estimator's normalisation would still count the copies.
    """
    x, y = _check_paired(x, y, "unbiased CKA")
    n = x.shape[0]
    counts = _check_counts(counts, n)
    gram_x, gram_y = x @ x.T, y @ y.T  # [n, n] each
    np.fill_diagonal(gram_x, 0.0)
    np.fill_diagonal(gram_y, 0.0)

    def on_rows(index: np.ndarray) -> float:
        if index.shape[0] < 4:
            return float("nan")
        return _cka_from_zeroed_grams(gram_x[np.ix_(index, index)], gram_y[np.ix_(index, index)])

    return _distinct_row_interval(unbiased_cka(x, y), on_rows, counts, ci_level)


# --- nearest-neighbour metrics -------------------------------------------------------------


def _clip_and_normalize(x: np.ndarray, percentile: float = 95.0) -> np.ndarray:
    """Clip entries to +-(the given percentile of |x| over the whole matrix), then L2-normalise rows."""
    bound = np.percentile(np.abs(x), percentile)
    return _normalize_rows(np.clip(x, -bound, bound))


def _knn_mask(features: np.ndarray, k: int) -> np.ndarray:
    """Return a boolean `[n, n]` mask whose row i marks the k rows with the largest inner product with row i, excluding i."""
    return _knn_mask_from_gram(features @ features.T, k)


def _knn_mask_from_gram(gram: np.ndarray, k: int) -> np.ndarray:
    """Return the k-nearest-neighbour mask `[m, m]` of a Gram matrix of inner products (self excluded)."""
    similarity = gram.copy()
    np.fill_diagonal(similarity, -np.inf)
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # [n, k], unordered
    mask = np.zeros(similarity.shape, dtype=bool)
    np.put_along_axis(mask, neighbours, True, axis=1)
    return mask


def _check_k(k: int, n: int, name: str) -> None:
    if not 1 <= k < n:
        raise ValueError(f"{name} needs 1 <= k < n, got k={k} for n={n} images; pass a smaller k")


def mutual_knn_per_item(x: np.ndarray, y: np.ndarray, k: int = 10) -> np.ndarray:
    """Return, per image i, |kNN_X(i) ∩ kNN_Y(i)| / k as a `[n]` array.

    Each matrix is clipped at the 95th percentile of its absolute entries and its rows are
    L2-normalised. kNN_S(i) is the set of k other images with the largest inner product
    with image i in space S. Ties are broken arbitrarily by `np.argpartition`.

    Raises:
        ValueError: if the row counts differ or k is not in 1..n-1.
    """
    x, y = _check_paired(x, y, "mutual k-NN")
    _check_k(k, x.shape[0], "mutual k-NN")
    mask_x = _knn_mask(_clip_and_normalize(x), k)
    mask_y = _knn_mask(_clip_and_normalize(y), k)
    return (mask_x & mask_y).sum(axis=1) / k


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """Mutual k-NN alignment: (1/n) Σ_i |kNN_X(i) ∩ kNN_Y(i)| / k (see `mutual_knn_per_item`).

    The value is 1 when both spaces give every image the same neighbours. For unrelated
    spaces it is k / (n - 1) in expectation.
    """
    return float(mutual_knn_per_item(x, y, k).mean())


def mutual_knn_with_ci(x: np.ndarray, y: np.ndarray, counts: np.ndarray, ci_level: float, k: int = 10) -> MetricValue:
    """Mutual k-NN with an interval from the distinct images of each resample.

    Resampling rows with replacement would make each copy of an image the nearest
    neighbour of the others. Each resample instead recomputes the neighbour sets among its
    distinct images (`_distinct_row_interval`), so the interval covers the choice of the
    neighbour pool as well as of the query images. The features are clipped and
    normalised once, with the clipping bound of all n images. A resample with k or fewer
    distinct images is left out.

    NOTE: neighbour sets change less smoothly with the images than Gram sums do. In a
    simulation (150 datasets of 60 images, k = 5) this interval was about 25 % wider
    than the 95 % spread of the estimate across datasets, so it errs on the wide side.
    """
    x, y = _check_paired(x, y, "mutual k-NN")
    n = x.shape[0]
    _check_k(k, n, "mutual k-NN")
    counts = _check_counts(counts, n)
    features_x, features_y = _clip_and_normalize(x), _clip_and_normalize(y)
    gram_x, gram_y = features_x @ features_x.T, features_y @ features_y.T  # [n, n] each
    point = float(((_knn_mask_from_gram(gram_x, k) & _knn_mask_from_gram(gram_y, k)).sum(axis=1) / k).mean())

    def on_rows(index: np.ndarray) -> float:
        if index.shape[0] <= k:
            return float("nan")
        mask_x = _knn_mask_from_gram(gram_x[np.ix_(index, index)], k)
        mask_y = _knn_mask_from_gram(gram_y[np.ix_(index, index)], k)
        return float((mask_x & mask_y).sum() / (k * index.shape[0]))

    return _distinct_row_interval(point, on_rows, counts, ci_level)


def _cknna_terms(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return per-image sums `[n]` of M⊙K̃⊙L̃, M⊙K̃⊙K̃ and M⊙L̃⊙L̃ over j."""
    x, y = _check_paired(x, y, "CKNNA")
    n = x.shape[0]
    _check_k(k, n, "CKNNA")
    features_x, features_y = _clip_and_normalize(x), _clip_and_normalize(y)
    mask = _knn_mask(features_x, k) & _knn_mask(features_y, k)  # [n, n], diagonal always False
    centering = np.eye(n) - np.full((n, n), 1.0 / n)
    k_centered = centering @ (features_x @ features_x.T) @ centering
    l_centered = centering @ (features_y @ features_y.T) @ centering
    cross = (mask * k_centered * l_centered).sum(axis=1)
    self_x = (mask * k_centered**2).sum(axis=1)
    self_y = (mask * l_centered**2).sum(axis=1)
    return cross, self_x, self_y


def cknna(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """CKA restricted to mutual k-nearest-neighbour pairs (CKNNA).

    Both matrices are preprocessed as in `mutual_knn` (clipped at the 95th percentile of
    |entries|, rows L2-normalised) into F_X and F_Y. The kernels are K = F_X F_X^T and
    L = F_Y F_Y^T, and K̃ = H K H, L̃ = H L H are centred with H = I - 11^T/n. The mask is
    M_ij = 1 if i != j, j ∈ kNN_X(i) and j ∈ kNN_Y(i), where the neighbours come from the
    uncentred rows of K and L. Then

        CKNNA = Σ_ij M_ij K̃_ij L̃_ij / sqrt(Σ_ij M_ij K̃_ij² · Σ_ij M_ij L̃_ij²).

    M is not symmetric, so ordered pairs are summed. By Cauchy-Schwarz the value lies in
    [-1, 1]. With k = n - 1 the mask keeps every off-diagonal pair, and CKNNA is linear CKA
    on F_X, F_Y without the diagonal terms. The result is NaN when no pair is a mutual
    neighbour.

    Args:
        x: `[n, d1]` representations of n images.
        y: `[n, d2]` representations of the same images.
        k: Neighbourhood size, 1 <= k < n.
    """
    cross, self_x, self_y = _cknna_terms(x, y, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(cross.sum() / np.sqrt(self_x.sum() * self_y.sum()))


def cknna_with_ci(x: np.ndarray, y: np.ndarray, counts: np.ndarray, ci_level: float, k: int = 10) -> MetricValue:
    """CKNNA with an interval from the distinct images of each resample.

    As in `mutual_knn_with_ci`, each resample recomputes the mutual-neighbour mask among
    its distinct images, and it also recentres their kernels (`_distinct_row_interval`).
    A resample with k or fewer distinct images is left out.
    """
    cross, self_x, self_y = _cknna_terms(x, y, k)
    n = cross.shape[0]
    counts = _check_counts(counts, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(cross.sum() / np.sqrt(self_x.sum() * self_y.sum()))
    features_x, features_y = _clip_and_normalize(_as_float64(x)), _clip_and_normalize(_as_float64(y))
    gram_x, gram_y = features_x @ features_x.T, features_y @ features_y.T  # [n, n] each

    def on_rows(index: np.ndarray) -> float:
        if index.shape[0] <= k:
            return float("nan")
        k_sub, l_sub = gram_x[np.ix_(index, index)], gram_y[np.ix_(index, index)]
        mask = _knn_mask_from_gram(k_sub, k) & _knn_mask_from_gram(l_sub, k)
        k_centred, l_centred = _centred(k_sub), _centred(l_sub)
        with np.errstate(divide="ignore", invalid="ignore"):
            return float((mask * k_centred * l_centred).sum()
                         / np.sqrt((mask * k_centred**2).sum() * (mask * l_centred**2).sum()))

    return _distinct_row_interval(point, on_rows, counts, ci_level)


# --- SVCCA ---------------------------------------------------------------------------------


def _top_left_singular_vectors(x: np.ndarray, n_components: int) -> np.ndarray:
    """Z-score the columns of `[n, d]` x and return its top left singular vectors `[n, n_components]`."""
    std = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)  # constant columns become zero
    u, _, _ = np.linalg.svd(z, full_matrices=False)
    return u[:, :n_components]


def _svcca_bases(x: np.ndarray, y: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    x, y = _check_paired(x, y, "SVCCA")
    n = x.shape[0]
    limit = min(n - 1, x.shape[1], y.shape[1])
    if not 1 <= n_components <= limit:
        raise ValueError(f"SVCCA needs 1 <= n_components <= min(n - 1, d1, d2) = {limit}, got {n_components}")
    return _top_left_singular_vectors(x, n_components), _top_left_singular_vectors(y, n_components)


def _mean_canonical_correlation(u_x: np.ndarray, u_y: np.ndarray) -> float:
    correlations = np.linalg.svd(u_x.T @ u_y, compute_uv=False)
    return float(np.clip(correlations, 0.0, 1.0).mean())


def svcca(x: np.ndarray, y: np.ndarray, n_components: int = 10) -> float:
    """SVCCA: mean canonical correlation between the top singular subspaces of X and Y.

    Each column is z-scored, and the top `n_components` left singular vectors U_X, U_Y
    `[n, c]` span the kept directions of each space. Because they are orthonormal, the
    canonical correlations between the two reduced representations are the singular values
    of U_X^T U_Y. This avoids inverting covariance matrices. The value lies in [0, 1].
    A score of 1 means the two kept subspaces coincide.

    Args:
        x: `[n, d1]` representations of n images.
        y: `[n, d2]` representations of the same images.
        n_components: Directions kept per space, at most min(n - 1, d) for each space.
    """
    u_x, u_y = _svcca_bases(x, y, n_components)
    return _mean_canonical_correlation(u_x, u_y)


def svcca_with_ci(x: np.ndarray, y: np.ndarray, counts: np.ndarray, ci_level: float, n_components: int = 10) -> MetricValue:
    """SVCCA with a bootstrap interval over images.

    Rerunning the SVD or the CCA on a resample biases the value upwards. The copies of an
    image pull the top directions of both spaces towards it, and maximising a correlation
    over fewer distinct images overfits more. So the canonical variates A = U_X W and
    B = U_Y V (from U_X^T U_Y = W S V^T) come from all n images, and each resample
    recomputes the weighted Pearson correlation of every pair (A_j, B_j) and averages them.
    Those correlations are smooth functions of means over images, so a duplicate acts as a
    weight. With all weights 1 they equal the canonical correlations S, and the mean is `svcca`.
    """
    u_x, u_y = _svcca_bases(x, y, n_components)
    n = u_x.shape[0]
    counts = _check_counts(counts, n)
    rotation_x, _, rotation_y_t = np.linalg.svd(u_x.T @ u_y)  # W, S, V^T
    variates_x, variates_y = u_x @ rotation_x, u_y @ rotation_y_t.T  # [n, c] each

    total = counts.sum(axis=1, keepdims=True)  # [n_boot, 1]
    mean_x, mean_y = counts @ variates_x / total, counts @ variates_y / total  # [n_boot, c]
    covariance = counts @ (variates_x * variates_y) / total - mean_x * mean_y
    variance_x = counts @ variates_x**2 / total - mean_x**2
    variance_y = counts @ variates_y**2 / total - mean_y**2
    with np.errstate(divide="ignore", invalid="ignore"):
        samples = (covariance / np.sqrt(variance_x * variance_y)).mean(axis=1)
    replicates = samples
    low, high = _interval(replicates, ci_level)
    return MetricValue(_mean_canonical_correlation(u_x, u_y), low, high, n, samples=replicates)


# --- retrieval and geometry ----------------------------------------------------------------


def retrieval_recall(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Return per-query Recall@k hits `[n]` (1.0 or 0.0) by cosine similarity.

    Gallery row i is the match of query i. The match's rank is the number of gallery items
    whose similarity is at least that of the match, so ties count against the query and a
    constant representation does not score as perfect. Swap the arguments for the other
    retrieval direction. The mean over images, with an interval, is `mean_with_ci(hits, ...)`.

    Raises:
        ValueError: if the row counts differ or k is not in 1..n.
    """
    queries, gallery = _check_paired(queries, gallery, "retrieval")
    n = queries.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"Recall@k needs 1 <= k <= n, got k={k} for n={n} images")
    similarity = _normalize_rows(queries) @ _normalize_rows(gallery).T  # [n, n]
    match = np.diagonal(similarity)[:, None]
    rank = (similarity >= match).sum(axis=1)
    return (rank <= k).astype(np.float64)


def modality_gap(x: np.ndarray, y: np.ndarray) -> float:
    """Return the Euclidean distance between the centroids of the L2-normalised rows of X and Y.

    This follows the convention of "Mind the Gap" (Liang et al., 2022), which measures the
    gap between normalised embeddings, so the value lies in [0, 2] whatever the scale of
    either space. X and Y need the same dimension d but may differ in row count.
    `centroid_distance` returns the gap between the raw centroids.
    """
    x, y = _as_float64(x), _as_float64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"modality gap needs the same dimension in both spaces, got {x.shape[1]} and {y.shape[1]}")
    return float(np.linalg.norm(_normalize_rows(x).mean(axis=0) - _normalize_rows(y).mean(axis=0)))


def centroid_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Return ||mean_i x_i - mean_i y_i|| on the raw, unnormalised rows (same d, any row counts)."""
    x, y = _as_float64(x), _as_float64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"centroid distance needs the same dimension in both spaces, got {x.shape[1]} and {y.shape[1]}")
    return float(np.linalg.norm(x.mean(axis=0) - y.mean(axis=0)))


def norm_ratio(x: np.ndarray, y: np.ndarray) -> float:
    """Return mean_i ||x_i|| / mean_i ||y_i||, the scale of X relative to Y (any d, any row counts)."""
    x, y = _as_float64(x), _as_float64(y)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.linalg.norm(x, axis=1).mean() / np.linalg.norm(y, axis=1).mean())


# --- generic bootstrap ---------------------------------------------------------------------


def with_ci(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    x: np.ndarray,
    y: np.ndarray,
    counts: np.ndarray,
    ci_level: float,
) -> MetricValue:
    """Evaluate `statistic(x, y)` with a percentile bootstrap interval over paired rows.

    Each row of `counts` gives the multiplicity of every image in one resample. The
    statistic is recomputed on X and Y with those rows repeated. Use it for statistics
    that are smooth functions of means over images, where a duplicated row acts as a
    weight: `modality_gap`, `centroid_distance` and `norm_ratio`. Do not use it for Gram,
    neighbour or subspace metrics, because the copies of an image would match each other
    and inflate the value. Those metrics have their own `*_with_ci` functions.

    Args:
        statistic: Function of paired `[m, d1]`, `[m, d2]` arrays returning a float.
        x: `[n, d1]` representations of n images.
        y: `[n, d2]` representations of the same images.
        counts: `[n_boot, n]` multiplicities from `bootstrap_counts`.
        ci_level: Coverage of the interval, for example 0.95.
    """
    x, y = _check_paired(x, y, "bootstrap")
    n = x.shape[0]
    counts = _check_counts(counts, n)
    samples = np.empty(counts.shape[0])
    for row, multiplicity in enumerate(counts):
        index = _resample_index(multiplicity)
        samples[row] = statistic(x[index], y[index])
    replicates = samples
    low, high = _interval(replicates, ci_level)
    return MetricValue(float(statistic(x, y)), low, high, n, samples=replicates)
