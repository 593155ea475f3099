"""Linear probes: cross-validated logistic regression decoding an image's category from a layer."""

from __future__ import annotations

import logging
import warnings
from collections import Counter

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmalign.probes.metrics import MetricValue, mean_with_ci

logger = logging.getLogger("mmalign.probes")


def linear_probe_metrics(
    features: np.ndarray, categories: list[str], counts: np.ndarray, ci_level: float, seed: int, max_folds: int = 5
) -> dict[str, MetricValue]:
    """Return cross-validated category accuracy of a logistic regression, and the majority-class rate.

    Categories with fewer members than folds are left out (too few to stratify); the
    probe needs at least two categories left. Intervals bootstrap the per-image
    out-of-fold correctness over the images, with the same resamples as other metrics.

    Args:
        features: `[N, D]` per-image representations (mean image-token states of a layer).
        categories: N category labels ("" when unknown).
        counts: `[n_boot, N]` image multiplicities from `bootstrap_counts`.

    Returns:
        `linear_probe_accuracy` and `linear_probe_majority`, or {} when fewer than two
        categories have enough images.
    """
    sizes = Counter(categories)
    folds = min(max_folds, max((size for label, size in sizes.items() if label), default=0))
    usable = {label for label, size in sizes.items() if label and size >= max(folds, 2)}
    if folds < 2 or len(usable) < 2:
        return {}
    keep = np.array([label in usable for label in categories])
    x, y = features[keep], np.array(categories)[keep]
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=1.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        predicted = cross_val_predict(model, x, y, cv=splitter)
    correct = (predicted == y).astype(np.float64)
    majority = (y == Counter(y).most_common(1)[0][0]).astype(np.float64)
    kept_counts = counts[:, keep]
    if (~keep).any():
        logger.debug("linear probe: %d images in categories with fewer than %d members left out", int((~keep).sum()), folds)
    return {
        "linear_probe_accuracy": mean_with_ci(correct, kept_counts, ci_level),
        "linear_probe_majority": mean_with_ci(majority, kept_counts, ci_level),
    }
