"""Closed-form cases for the similarity metrics between paired per-image representations."""


import numpy as np
import pytest

from mmalign.probes.metrics import bootstrap_counts, linear_cka
from mmalign.probes.similarity import (
    _distinct_row_interval,
    centroid_distance,
    cknna,
    cknna_with_ci,
    linear_cka_with_ci,
    modality_gap,
    mutual_knn,
    mutual_knn_per_item,
    mutual_knn_with_ci,
    norm_ratio,
    retrieval_recall,
    svcca,
    svcca_with_ci,
    unbiased_cka,
    unbiased_cka_with_ci,
    with_ci,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _shared_signal(n: int, seed: int = 0, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Return paired [n, 40] and [n, 30] arrays that share a 5-dimensional signal."""
    rng = _rng(seed)
    signal = rng.normal(size=(n, 5))
    x = signal @ rng.normal(size=(5, 40)) + noise * rng.normal(size=(n, 40))
    y = signal @ rng.normal(size=(5, 30)) + noise * rng.normal(size=(n, 30))
    return x, y


def _naive_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Evaluate the unbiased HSIC formula term by term with explicit loops."""
    n = k.shape[0]
    kt = [[0.0 if i == j else k[i, j] for j in range(n)] for i in range(n)]
    lt = [[0.0 if i == j else l[i, j] for j in range(n)] for i in range(n)]
    trace = sum(kt[i][j] * lt[j][i] for i in range(n) for j in range(n))
    sum_k = sum(kt[i][j] for i in range(n) for j in range(n))
    sum_l = sum(lt[i][j] for i in range(n) for j in range(n))
    ones_kl_ones = sum(kt[i][j] * lt[j][m] for i in range(n) for j in range(n) for m in range(n))
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * ones_kl_ones) / (n * (n - 3))


# --- unbiased CKA --------------------------------------------------------------------------


def test_unbiased_cka_matches_naive_loop():
    rng = _rng(1)
    x, y = rng.normal(size=(12, 7)), rng.normal(size=(12, 4))
    k, l = x @ x.T, y @ y.T
    expected = _naive_unbiased_hsic(k, l) / np.sqrt(_naive_unbiased_hsic(k, k) * _naive_unbiased_hsic(l, l))
    assert unbiased_cka(x, y) == pytest.approx(expected, rel=1e-10)


def test_cka_identical_inputs_is_one():
    x = _rng(2).normal(size=(20, 8))
    assert unbiased_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_cka_invariant_to_rotation_and_scaling():
    x, y = _shared_signal(50)
    rotation, _ = np.linalg.qr(_rng(3).normal(size=(30, 30)))  # random orthogonal matrix
    transformed = 7.5 * y @ rotation
    assert unbiased_cka(x, transformed) == pytest.approx(unbiased_cka(x, y), rel=1e-9)
    assert linear_cka(x, transformed) == pytest.approx(linear_cka(x, y), rel=1e-9)


def test_unbiased_cka_near_zero_for_independent_wide_data():
    rng = _rng(4)
    x, y = rng.normal(size=(40, 500)), rng.normal(size=(40, 500))
    assert abs(unbiased_cka(x, y)) < 0.1
    assert linear_cka(x, y) > 0.5  # the biased estimator is far from 0 when d >> n


def test_unbiased_cka_rejects_small_or_unpaired_input():
    with pytest.raises(ValueError, match="at least 4"):
        unbiased_cka(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="same images"):
        unbiased_cka(np.ones((5, 2)), np.ones((6, 2)))


def test_unbiased_cka_ci_identity_counts_give_point():
    x, y = _shared_signal(30)
    value = unbiased_cka_with_ci(x, y, np.ones((3, 30)), 0.95)
    assert value.ci_low == pytest.approx(value.value)
    assert value.ci_high == pytest.approx(value.value)
    assert value.n == 30


def test_unbiased_cka_ci_covers_point_for_independent_data():
    # Without zeroing the copies' pairs, resamples drift towards the biased CKA and miss 0.
    rng = _rng(5)
    x, y = rng.normal(size=(60, 300)), rng.normal(size=(60, 300))
    value = unbiased_cka_with_ci(x, y, bootstrap_counts(60, 300, seed=0), 0.95)
    assert value.value == pytest.approx(unbiased_cka(x, y))
    assert value.ci_low < value.value < value.ci_high
    assert value.ci_high < 0.2


# --- mutual k-NN ---------------------------------------------------------------------------


def _circle(degrees: list[float]) -> np.ndarray:
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_mutual_knn_hand_case():
    # k=1 neighbours by angle: X gives [1, 0, 1, 4, 3], Y gives [2, 2, 1, 4, 3].
    x = _circle([0, 10, 25, 90, 100])
    y = _circle([0, 30, 25, 90, 100])
    np.testing.assert_allclose(mutual_knn_per_item(x, y, k=1), [0, 0, 1, 1, 1])
    assert mutual_knn(x, y, k=1) == pytest.approx(0.6)


def test_mutual_knn_identical_and_shuffled():
    rng = _rng(6)
    x = rng.normal(size=(200, 16))
    assert mutual_knn(x, x, k=10) == pytest.approx(1.0)
    assert mutual_knn(x, 3.0 * x, k=10) == pytest.approx(1.0)
    shuffled = x[rng.permutation(200)]
    assert mutual_knn(x, shuffled, k=10) < 3 * 10 / 199  # chance level is k / (n - 1)


def test_mutual_knn_rejects_k_not_below_n():
    x = np.eye(5)
    with pytest.raises(ValueError, match="k < n"):
        mutual_knn(x, x, k=5)
    with pytest.raises(ValueError, match="k < n"):
        cknna(x, x, k=0)


def test_mutual_knn_ci_per_item_mean():
    x, y = _shared_signal(50)
    counts = bootstrap_counts(50, 200, seed=1)
    value = mutual_knn_with_ci(x, y, counts, 0.95, k=5)
    per_item = mutual_knn_per_item(x, y, k=5)
    assert value.value == pytest.approx(per_item.mean())
    assert value.ci_low <= value.value <= value.ci_high


# --- CKNNA ---------------------------------------------------------------------------------


def _clip_normalize_for_test(x: np.ndarray) -> np.ndarray:
    bound = np.sort(np.abs(x).ravel())
    bound = np.interp(0.95 * (bound.size - 1), np.arange(bound.size), bound)
    clipped = np.minimum(np.maximum(x, -bound), bound)
    return clipped / np.sqrt((clipped**2).sum(axis=1, keepdims=True))


def test_cknna_identical_is_one():
    x = _rng(7).normal(size=(30, 6))
    assert cknna(x, x, k=5) == pytest.approx(1.0)


def test_cknna_with_all_neighbours_is_offdiagonal_cka():
    x, y = _shared_signal(25)
    n = x.shape[0]
    fx, fy = _clip_normalize_for_test(x), _clip_normalize_for_test(y)
    centering = np.eye(n) - 1.0 / n
    k, l = centering @ fx @ fx.T @ centering, centering @ fy @ fy.T @ centering
    off = ~np.eye(n, dtype=bool)
    expected = (k * l)[off].sum() / np.sqrt((k * k)[off].sum() * (l * l)[off].sum())
    assert cknna(x, y, k=n - 1) == pytest.approx(expected, rel=1e-10)


def test_cknna_bounded_and_scale_invariant():
    x, y = _shared_signal(60, seed=8, noise=3.0)
    value = cknna(x, y, k=10)
    assert -1.0 <= value <= 1.0
    assert cknna(4.0 * x, 0.1 * y, k=10) == pytest.approx(value)


def test_cknna_ci_identity_counts_give_point():
    x, y = _shared_signal(40)
    value = cknna_with_ci(x, y, np.ones((2, 40)), 0.95, k=5)
    assert value.value == pytest.approx(cknna(x, y, k=5))
    assert value.ci_low == pytest.approx(value.value)
    assert value.ci_high == pytest.approx(value.value)


# --- SVCCA ---------------------------------------------------------------------------------


def test_svcca_invertible_map_full_rank_is_one():
    rng = _rng(9)
    x = rng.normal(size=(50, 6))
    mapped = x @ rng.normal(size=(6, 6)) + 3.0
    assert svcca(x, mapped, n_components=6) == pytest.approx(1.0)


def test_svcca_low_rank_signal_under_linear_map():
    rng = _rng(10)
    x = rng.normal(size=(80, 4)) @ rng.normal(size=(4, 30)) + 1e-3 * rng.normal(size=(80, 30))
    mapped = x @ rng.normal(size=(30, 30))
    assert svcca(x, mapped, n_components=4) > 0.999
    unrelated = rng.normal(size=(80, 30))
    assert svcca(x, unrelated, n_components=4) < 0.6


def test_svcca_rejects_too_many_components():
    x = np.eye(6)[:, :5]
    with pytest.raises(ValueError, match="n_components"):
        svcca(x, x, n_components=6)


def test_svcca_ci_point_and_coverage():
    x, y = _shared_signal(108, noise=2.0)
    identity = svcca_with_ci(x, y, np.ones((2, 108)), 0.95, n_components=10)
    assert identity.value == pytest.approx(svcca(x, y, n_components=10))
    assert identity.ci_low == pytest.approx(identity.value)
    resampled = svcca_with_ci(x, y, bootstrap_counts(108, 500, seed=2), 0.95, n_components=10)
    assert resampled.ci_low < resampled.value < resampled.ci_high


# --- retrieval and geometry ----------------------------------------------------------------


def test_retrieval_identical_and_reversed():
    x = _rng(11).normal(size=(10, 5))
    np.testing.assert_array_equal(retrieval_recall(x, x, k=1), np.ones(10))
    reversed_gallery = x[::-1]
    np.testing.assert_array_equal(retrieval_recall(x, reversed_gallery, k=1), np.zeros(10))
    np.testing.assert_array_equal(retrieval_recall(x, reversed_gallery, k=10), np.ones(10))


def test_retrieval_ties_count_against_query():
    constant = np.ones((4, 3))
    np.testing.assert_array_equal(retrieval_recall(constant, constant, k=1), np.zeros(4))
    with pytest.raises(ValueError, match="k <= n"):
        retrieval_recall(constant, constant, k=5)


def test_modality_gap_and_centroid_distance():
    x = _rng(12).normal(size=(15, 4)) + 2.0
    assert modality_gap(x, x) == 0.0
    assert modality_gap(x, 5.0 * x) == pytest.approx(0.0, abs=1e-12)
    assert centroid_distance(x, 5.0 * x) == pytest.approx(4.0 * np.linalg.norm(x.mean(axis=0)))
    e1, e2 = np.tile([3.0, 0.0], (4, 1)), np.tile([0.0, 0.5], (6, 1))
    assert modality_gap(e1, e2) == pytest.approx(np.sqrt(2.0))
    assert centroid_distance(e1, e2) == pytest.approx(np.hypot(3.0, 0.5))


def test_norm_ratio_hand_case():
    y = np.array([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    assert norm_ratio(2.0 * y, y) == pytest.approx(2.0)
    assert norm_ratio(np.array([[6.0, 8.0]]), y) == pytest.approx(10.0 / 3.0)


def test_with_ci_identity_counts_and_shape_check():
    x, y = _shared_signal(20)
    x, y = x[:, :30], y
    value = with_ci(modality_gap, x, y, np.ones((4, 20)), 0.95)
    assert value.value == pytest.approx(modality_gap(x, y))
    assert value.ci_low == pytest.approx(value.value)
    resampled = with_ci(norm_ratio, x, y, bootstrap_counts(20, 200, seed=3), 0.95)
    assert resampled.ci_low <= resampled.value <= resampled.ci_high
    with pytest.raises(ValueError, match="counts must have shape"):
        with_ci(norm_ratio, x, y, np.ones((4, 19)), 0.95)


# --- bootstrap of pairwise metrics on distinct images --------------------------------------


def _duplicated_row_interval(statistic, x, y, counts):
    """The biased reference: the statistic on each resample with its copies kept, 2.5 and 97.5 percentiles."""
    values = [statistic(x[np.repeat(np.arange(len(x)), row.astype(int))], y[np.repeat(np.arange(len(y)), row.astype(int))])
              for row in counts]
    return np.percentile(values, [2.5, 97.5])


def test_distinct_row_interval_mean_spread():
    # For a mean, the ordinary bootstrap is right; the rescaled subsample spread must agree with it.
    values = _rng(20).exponential(size=200)
    counts = bootstrap_counts(200, 2000, seed=4)
    ordinary = (counts @ values) / 200
    rescaled = _distinct_row_interval(values.mean(), lambda index: values[index].mean(), counts, 0.95)
    assert rescaled.value == pytest.approx(values.mean())
    assert np.std(rescaled.samples) == pytest.approx(np.std(ordinary), rel=0.1)
    assert np.std(rescaled.samples) == pytest.approx(values.std() / np.sqrt(200), rel=0.1)


def test_linear_cka_interval_not_above_value():
    # Independent wide data: copies add identical rows to both Gram matrices, which raises CKA.
    rng = _rng(21)
    x, y = rng.normal(size=(40, 200)), rng.normal(size=(40, 200))
    counts = bootstrap_counts(40, 500, seed=5)
    old_low, old_high = _duplicated_row_interval(linear_cka, x, y, counts)
    new = linear_cka_with_ci(x, y, counts, 0.95)
    assert new.value == pytest.approx(linear_cka(x, y))
    assert old_low > new.value  # the whole duplicated-row interval lies above the estimate
    assert new.ci_low < new.value < new.ci_high
    assert new.ci_low < old_low
    assert new.ci_high < old_high


def test_unbiased_cka_interval_covers_zero_for_independent_data():
    rng = _rng(22)
    x, y = rng.normal(size=(80, 50)), rng.normal(size=(80, 50))
    counts = bootstrap_counts(80, 500, seed=6)
    value = unbiased_cka_with_ci(x, y, counts, 0.95)
    assert value.ci_low < 0.0 < value.ci_high
    duplicated_low, _ = _duplicated_row_interval(unbiased_cka, x, y, counts)
    assert duplicated_low > value.ci_high  # copies count as perfectly similar pairs


@pytest.mark.parametrize("metric", ["mutual_knn", "cknna"])
def test_neighbour_intervals_not_inflated_by_copies(metric):
    x, y = _shared_signal(60, seed=23, noise=3.0)
    counts = bootstrap_counts(60, 300, seed=7)
    statistic, with_interval = (mutual_knn, mutual_knn_with_ci) if metric == "mutual_knn" else (cknna, cknna_with_ci)
    value = with_interval(x, y, counts, 0.95, k=5)
    assert value.value == pytest.approx(statistic(x, y, k=5))
    assert value.ci_low < value.value < value.ci_high
    duplicated_low, _ = _duplicated_row_interval(lambda a, b: statistic(a, b, k=5), x, y, counts)
    assert duplicated_low > value.value  # a copy is its own nearest neighbour in both spaces


def test_pairwise_interval_samples_are_paired_across_metrics():
    x, y = _shared_signal(50, seed=24)
    counts = bootstrap_counts(50, 200, seed=8)
    same = unbiased_cka_with_ci(x, y, counts, 0.95)
    again = unbiased_cka_with_ci(x, y, counts, 0.95)
    np.testing.assert_array_equal(same.samples, again.samples)
    assert same.samples.shape == (200,)
