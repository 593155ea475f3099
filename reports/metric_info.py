"""Titles, descriptions and the better direction of each metric that the report describes.

Metric names follow the results table of `mmalign.evaluate`. Two name forms are derived
from a base metric: `<metric>@shuffled` is the same pair metric with captions shuffled
across images (a null baseline), and `delta:<metric>` is a paired difference between a
treatment iteration and its baseline. Unknown names are shown under their own name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SHUFFLED_SUFFIX = "@shuffled"
DELTA_PREFIX = "delta:"


@dataclass(frozen=True)
class MetricInfo:
    """Human-readable title and description of a metric, and which direction is better."""

    title: str
    description: str
    # "lower", "higher", "closer to 1", or None when neither direction is better.
    better: str | None = None


_COMPARE_WITH_TEXT = "Neither direction is better by itself, so compare the image line with the text line."

_SAE_DEAD = MetricInfo(
    "SAE dead latents",
    "Number of SAE latents that fire on no token of this group in the evaluation set. "
    "Many more dead latents on image tokens than on text tokens means image tokens use "
    "few of the LM's text features. " + _COMPARE_WITH_TEXT,
)
_SAE_DENSE = MetricInfo(
    "SAE dense latents",
    "Number of SAE latents that fire on more than a set share of this group's tokens "
    "(10% by default in `mmalign.probes.fidelity.fidelity_metrics`). " + _COMPARE_WITH_TEXT,
)
_SAE_RELATIVE_BIAS = MetricInfo(
    "SAE relative reconstruction bias",
    "Sum of squared reconstruction norms divided by the sum of the dot products between "
    "each hidden state and its reconstruction. It is 1 for a reconstruction without "
    "systematic scaling and below 1 when the SAE shrinks its outputs.",
    "closer to 1",
)

# Known metrics, shown in this order. Other metrics follow alphabetically under their own names.
METRIC_INFO: dict[str, MetricInfo] = {
    "sae_mse": MetricInfo(
        "SAE reconstruction MSE",
        "Mean squared error of the SAE reconstruction of each token's hidden state. The SAE "
        "was fitted on text activations, so a low error means the LM's text features "
        "describe these tokens well.",
        "lower",
    ),
    "sae_fvu": MetricInfo(
        "SAE fraction of variance unexplained",
        "Squared reconstruction error divided by the total variance of the hidden states. "
        "0 is a perfect reconstruction and 1 is no better than predicting the mean.",
        "lower",
    ),
    "sae_explained_variance": MetricInfo(
        "SAE explained variance",
        "One minus the fraction of variance unexplained: the share of the hidden states' "
        "variance that the SAE reconstruction explains. 1 is a perfect reconstruction.",
        "higher",
    ),
    "sae_cosine": MetricInfo(
        "SAE reconstruction cosine similarity",
        "Mean cosine similarity between each token's hidden state and its SAE reconstruction.",
        "higher",
    ),
    "sae_l2_ratio": MetricInfo(
        "SAE reconstruction norm ratio",
        "Mean ratio of the reconstruction's L2 norm to the hidden state's L2 norm. Below 1 "
        "means the SAE shrinks the tokens.",
        "closer to 1",
    ),
    "sae_relative_reconstruction_bias": _SAE_RELATIVE_BIAS,
    "sae_relative_bias": _SAE_RELATIVE_BIAS,
    "sae_l0": MetricInfo(
        "SAE L0",
        "Mean number of SAE latents active per token. A gap between the image and the text "
        "lines means image tokens activate the SAE's text features differently. " + _COMPARE_WITH_TEXT,
    ),
    "sae_l1": MetricInfo(
        "SAE L1",
        "Mean L1 norm of the SAE latent activations per token. " + _COMPARE_WITH_TEXT,
    ),
    "sae_frac_active": MetricInfo(
        "SAE fraction of latents active",
        "Mean share of the SAE's latents active per token: L0 divided by the SAE width. " + _COMPARE_WITH_TEXT,
    ),
    "sae_dead_latents": _SAE_DEAD,
    "sae_dead": _SAE_DEAD,
    "sae_dense_latents": _SAE_DENSE,
    "sae_dense": _SAE_DENSE,
    "ce_loss_recovered": MetricInfo(
        "CE loss recovered with the SAE spliced in",
        "The SAE reconstruction replaces the caption tokens' hidden states at this layer: "
        "(CE_zero - CE_SAE) / (CE_zero - CE_clean), from the caption's next-token "
        "cross-entropy. 1 means splicing in the SAE costs nothing and 0 means it is as bad "
        "as zero ablation.",
        "higher",
    ),
    "kl_score": MetricInfo(
        "KL score with the SAE spliced in",
        "(KL_zero - KL_SAE) / KL_zero, where each KL divergence is from the clean to the "
        "patched next-token distribution on the caption tokens. 1 means the SAE "
        "reconstruction leaves the predictions unchanged.",
        "higher",
    ),
    "ce_delta_sae": MetricInfo(
        "CE loss increase with the SAE spliced in",
        "Increase of the caption's next-token cross-entropy, in nats/token, when the SAE "
        "reconstruction replaces the caption tokens' hidden states at this layer.",
        "lower",
    ),
    "feature_jaccard": MetricInfo(
        "Top-k SAE feature Jaccard overlap, image vs text",
        "Jaccard overlap of the top-k SAE latents of each image's tokens and of its caption "
        "run through the LM alone, averaged over images.",
        "higher",
    ),
    "feature_weighted_overlap": MetricInfo(
        "Top-k SAE feature weighted overlap, image vs text",
        "Like the Jaccard overlap, but each latent counts by its share of the activation "
        "mass: the sum of the smaller share over the sum of the larger share.",
        "higher",
    ),
    "cka_linear": MetricInfo(
        "Linear CKA, image vs text",
        "Linear centered kernel alignment between the image-token and the text hidden "
        "states of the same examples. 1 means the two are identical up to a rotation and "
        "an isotropic scaling.",
        "higher",
    ),
    "cka_unbiased": MetricInfo(
        "Unbiased linear CKA, image vs text",
        "Linear CKA computed with the unbiased HSIC estimator, which removes the upward "
        "drift that plain linear CKA shows when there are few examples relative to the "
        "feature dimension.",
        "higher",
    ),
    "mutual_knn": MetricInfo(
        "Mutual k-NN alignment, image vs text",
        "Mean share of each example's k nearest neighbours among the image-token "
        "representations that are also its k nearest neighbours among the text "
        "representations. 1 means identical neighbourhoods.",
        "higher",
    ),
    "cknna": MetricInfo(
        "CKNNA, image vs text",
        "Centered kernel nearest-neighbour alignment: CKA restricted to pairs of examples "
        "that are among each other's k nearest neighbours in both spaces, so it measures "
        "local agreement.",
        "higher",
    ),
    "svcca": MetricInfo(
        "SVCCA, image vs text",
        "Mean canonical correlation between the top singular directions of the image-token "
        "and of the text representations.",
        "higher",
    ),
    "retrieval_i2t_r1": MetricInfo(
        "Image to caption retrieval, recall@1",
        "Share of images whose own caption is the nearest caption by cosine similarity at this layer.",
        "higher",
    ),
    "retrieval_i2t_r5": MetricInfo(
        "Image to caption retrieval, recall@5",
        "Share of images whose own caption is among the 5 nearest captions by cosine similarity.",
        "higher",
    ),
    "retrieval_t2i_r1": MetricInfo(
        "Caption to image retrieval, recall@1",
        "Share of captions whose own image is the nearest image by cosine similarity at this layer.",
        "higher",
    ),
    "retrieval_t2i_r5": MetricInfo(
        "Caption to image retrieval, recall@5",
        "Share of captions whose own image is among the 5 nearest images by cosine similarity.",
        "higher",
    ),
    "retrieval_top1": MetricInfo(
        "Image to caption retrieval, top-1 accuracy",
        "Fraction of images whose nearest caption at this layer is their own caption.",
        "higher",
    ),
    "modality_gap": MetricInfo(
        "Modality gap",
        "Distance between the centroids of the L2-normalised image-token and text "
        "representations, between 0 and 2. 0 means both modalities are centred on the same direction.",
        "lower",
    ),
    "norm_ratio": MetricInfo(
        "Norm ratio, image / text",
        "Mean L2 norm of the image-token representations divided by the mean L2 norm of the "
        "text representations. 1 means both have the same scale.",
        "closer to 1",
    ),
    "linear_probe_accuracy": MetricInfo(
        "Linear probe accuracy on image categories",
        "Cross-validated accuracy of a logistic-regression probe that predicts each image's "
        "category from its mean image-token hidden state. The grey line is the majority-class rate.",
        "higher",
    ),
    "linear_probe_majority": MetricInfo(
        "Majority-class rate of the image categories",
        "Share of images in the most common category: the accuracy of always predicting it.",
    ),
}

# Metrics that are null baselines of another metric: name -> (calibrated metric, legend label).
NULL_BASELINE_METRICS: dict[str, tuple[str, str]] = {
    "linear_probe_majority": ("linear_probe_accuracy", "null: majority class"),
}


def describe_metric(name: str, infos: Mapping[str, MetricInfo] | None = None) -> MetricInfo:
    """Look up a metric's description, deriving one for `@shuffled` and `delta:` names.

    Args:
        name: Metric name from the results table.
        infos: Descriptions to search, `METRIC_INFO` when None.

    Returns:
        The stored description, a derived one for `<metric>@shuffled` and
        `delta:<metric>`, or a description with the bare name as title for an unknown metric.
    """
    infos = METRIC_INFO if infos is None else infos
    if name in infos:
        return infos[name]
    if name.endswith(SHUFFLED_SUFFIX) and len(name) > len(SHUFFLED_SUFFIX):
        base_name = name[: -len(SHUFFLED_SUFFIX)]
        base = describe_metric(base_name, infos)
        return MetricInfo(
            f"{base.title}, captions shuffled",
            f"{base_name} with captions shuffled across images, so no image is paired with "
            "its own caption. It estimates the value that chance pairing gives, a null baseline.",
        )
    if name.startswith(DELTA_PREFIX) and len(name) > len(DELTA_PREFIX):
        base_name = name[len(DELTA_PREFIX) :]
        base = describe_metric(base_name, infos)
        direction = {"higher": "Positive is an improvement.", "lower": "Negative is an improvement."}
        return MetricInfo(
            f"Change in {base.title}",
            f"Paired difference of {base_name}: treatment iteration minus its baseline, with "
            f"a paired bootstrap interval. {direction.get(base.better or '', '')}".strip(),
            base.better if base.better in direction else None,
        )
    return MetricInfo(name, "")


def direction_sentence(info: MetricInfo) -> str:
    """Return "Lower is better." or the like, or "" when neither direction is better."""
    return f"{info.better[0].upper()}{info.better[1:]} is better." if info.better else ""


def order_metrics(names: Iterable[str], infos: Mapping[str, MetricInfo]) -> list[str]:
    """Sort distinct metric names into report order.

    Known metrics come in `infos` order and the others alphabetically after them. A
    `<metric>@shuffled` or `delta:<metric>` name sorts right after its base metric.
    """
    positions = {name: index for index, name in enumerate(infos)}

    def sort_key(name: str) -> tuple[int, str, int, str]:
        base, variant = name, 0
        if base.startswith(DELTA_PREFIX):
            base, variant = base[len(DELTA_PREFIX) :], 2
        if base.endswith(SHUFFLED_SUFFIX):
            base, variant = base[: -len(SHUFFLED_SUFFIX)], variant + 1
        if base in positions:
            return (positions[base], "", variant, name)
        return (len(positions), base, variant, name)

    return sorted(set(names), key=sort_key)
