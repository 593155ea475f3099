"""Per-layer evaluation of checkpoints: one LM pass per batch captures every probed layer.

Token groups: `image` (visual-token positions), `caption` (caption positions after the
image) and `text` (the same caption run through the LM alone). Metrics that compare two
groups use `pair` (image-token means against text-only caption means); `image/text` rows
hold the ratio of an SAE metric on image tokens to its value on text tokens. The `text`
group does not depend on the checkpoint, so an `Evaluator` computes it once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sae_lens import SAE

from mmalign.adapters.base import Adapter
from mmalign.adapters.compose import PromptTemplate, compose
from mmalign.capture import capture_resid_post, capture_resid_post_with_loss
from mmalign.config import EvalConfig
from mmalign.lm import LanguageModel
from mmalign.probes.fidelity import FidelityStats, _fidelity_ratios, fidelity_metrics, feature_overlap, topk_features
from mmalign.probes.linear import linear_probe_metrics
from mmalign.probes.metrics import MetricValue, _interval, bootstrap_counts, mean_with_ci
from mmalign.probes.similarity import (
    cknna_with_ci,
    linear_cka_with_ci,
    modality_gap,
    mutual_knn_with_ci,
    norm_ratio,
    retrieval_recall,
    svcca_with_ci,
    unbiased_cka_with_ci,
    with_ci,
)
from mmalign.progress import progress
from mmalign.splice import splice_metrics, splice_sums

logger = logging.getLogger("mmalign.evaluate")

RESULT_COLUMNS = ["checkpoint", "treatment", "layer", "token_group", "metric", "value", "ci_low", "ci_high", "n"]
RATIO_METRICS = ("sae_mse", "sae_fvu", "sae_explained_variance", "sae_cosine", "sae_l0", "sae_l2_ratio")


@dataclass
class _Group:
    """Per-image SAE statistics, mean hidden states and top SAE features of one (layer, token group)."""

    stats: FidelityStats
    means: np.ndarray  # [N, D]
    top_index: np.ndarray  # [N, k]
    top_mass: np.ndarray  # [N, k]


@dataclass
class _GroupBuilder:
    """Accumulates one (layer, token group) batch by batch.

    Mean hidden states are kept only for the images in `mean_rows` (all when None), so the
    memory for pairwise metrics stays bounded however many images are evaluated.
    """

    n_images: int
    sae: SAE
    top_k: int
    mean_rows: np.ndarray | None = None
    stats: FidelityStats = field(init=False)
    means: np.ndarray = field(init=False)
    top_index: np.ndarray = field(init=False)
    top_mass: np.ndarray = field(init=False)
    position: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        d_model, d_sae = int(self.sae.cfg.d_in), int(self.sae.cfg.d_sae)
        self.stats = FidelityStats.zeros(self.n_images, d_model, d_sae)
        rows = np.arange(self.n_images) if self.mean_rows is None else np.asarray(self.mean_rows)
        self.position = np.full(self.n_images, -1)
        self.position[rows] = np.arange(len(rows))
        self.means = np.zeros((len(rows), d_model))
        self.top_index = np.full((self.n_images, self.top_k), -1)
        self.top_mass = np.zeros((self.n_images, self.top_k))

    def add(self, hidden: torch.Tensor, mask: torch.Tensor, first_image: int) -> None:
        """Add one batch: `hidden` `[B, L, D]`, `mask` `[B, L]` selecting the group's positions."""
        hidden, mask = hidden.detach().float().cpu(), mask.cpu()
        n_batch = hidden.shape[0]
        tokens = hidden[mask]  # [M, D]
        local = torch.arange(n_batch).unsqueeze(1).expand_as(mask)[mask]  # [M]
        with torch.no_grad():
            latents = self.sae.encode(tokens)
            reconstruction = self.sae.decode(latents)
        self.stats.update(tokens, reconstruction, latents, local + first_image)
        positions = self.position[first_image : first_image + n_batch]  # [B]
        sampled = positions >= 0
        if sampled.any():
            counts = mask[sampled].sum(dim=1, keepdim=True).clamp(min=1).double()
            means = (hidden[sampled].double() * mask[sampled].unsqueeze(-1)).sum(dim=1) / counts  # [B_sampled, D]
            self.means[positions[sampled]] = means.numpy()
        rows = slice(first_image, first_image + n_batch)
        self.top_index[rows], self.top_mass[rows] = topk_features(latents, local, n_batch, self.top_k)

    def build(self) -> _Group:
        return _Group(self.stats, self.means, self.top_index, self.top_mass)


def pair_sample(n_images: int, limit: int, seed: int) -> np.ndarray | None:
    """Return the sorted, seeded sample of images for pairwise metrics, or None to use all `n_images`."""
    if n_images <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_images, size=limit, replace=False))


def _derangement(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        if not (order == np.arange(n)).any():
            return order


def pair_metrics(image: np.ndarray, text: np.ndarray, counts: np.ndarray, ci_level: float, knn_k: int) -> dict[str, MetricValue]:
    """Similarity of paired image-token and caption representations `[N, D]` each."""
    n = image.shape[0]
    k = max(1, min(knn_k, n - 2))
    metrics = {"cka_linear": linear_cka_with_ci(image, text, counts, ci_level)}
    if n >= 4:
        metrics["cka_unbiased"] = unbiased_cka_with_ci(image, text, counts, ci_level)
    if n >= 3:
        metrics["mutual_knn"] = mutual_knn_with_ci(image, text, counts, ci_level, k=k)
        metrics["cknna"] = cknna_with_ci(image, text, counts, ci_level, k=k)
        metrics["svcca"] = svcca_with_ci(image, text, counts, ci_level, n_components=min(10, n - 1, image.shape[1]))
    for direction, (queries, gallery) in {"i2t": (image, text), "t2i": (text, image)}.items():
        for recall_k in (1, 5):
            if recall_k < n:
                metrics[f"retrieval_{direction}_r{recall_k}"] = mean_with_ci(retrieval_recall(queries, gallery, recall_k), counts, ci_level)
    metrics["modality_gap"] = with_ci(modality_gap, image, text, counts, ci_level)
    metrics["norm_ratio"] = with_ci(norm_ratio, image, text, counts, ci_level)
    return metrics


def ratio_metrics(image: FidelityStats, text: FidelityStats, counts: np.ndarray, ci_level: float) -> dict[str, MetricValue]:
    """Image-to-text ratio of each SAE metric at one layer, resampling images jointly in both groups."""
    ones = np.ones((1, image.n_images))
    point_image, point_text = _fidelity_ratios(image, ones, 0.1), _fidelity_ratios(text, ones, 0.1)
    boot_image, boot_text = _fidelity_ratios(image, counts, 0.1), _fidelity_ratios(text, counts, 0.1)
    results = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in RATIO_METRICS:
            replicates = boot_image[name] / boot_text[name]
            low, high = _interval(replicates, ci_level)
            results[name] = MetricValue(float(point_image[name][0] / point_text[name][0]), low, high, image.n_images, samples=replicates)
    return results


class Evaluator:
    """Evaluates checkpoints on one validation split with fixed probes.

    Frozen models, probes, the text-only group and the bootstrap resamples are set up
    once; `evaluate` then costs one LM pass per batch (plus the splice passes on a subset).
    """

    def __init__(
        self, lm: LanguageModel, probes: dict[int, SAE], prompt: PromptTemplate, captions: list[str],
        categories: list[str], max_caption_tokens: int, config: EvalConfig, seed: int,
    ) -> None:
        self.lm, self.probes, self.prompt = lm, probes, prompt
        self.captions, self.categories = captions, categories
        self.max_caption_tokens, self.config, self.seed = max_caption_tokens, config, seed
        self.layers = sorted(probes)
        self.counts = bootstrap_counts(len(captions), config.n_bootstrap, seed)
        # Pairwise metrics (CKA, k-NN, retrieval, linear probe) need every image's mean state
        # at once, so they use a bounded sample with its own resamples when there are many images.
        self.pair_rows = pair_sample(len(captions), config.max_pair_images, seed)
        if self.pair_rows is None:
            self.pair_counts, self.pair_categories = self.counts, list(categories)
        else:
            self.pair_counts = bootstrap_counts(len(self.pair_rows), config.n_bootstrap, seed + 1)
            self.pair_categories = [categories[row] for row in self.pair_rows]
            logger.info("pairwise metrics use a seeded sample of %d of %d images (eval.max_pair_images)",
                        len(self.pair_rows), len(captions))
        n_pair = len(captions) if self.pair_rows is None else len(self.pair_rows)
        self.shuffled = _derangement(n_pair, seed) if n_pair >= 2 else None
        self.text = self._text_groups()
        # checkpoint -> (layer, token group, metric) -> bootstrap replicates, for paired differences
        self.replicates: dict[str, dict[tuple[int, str, str], np.ndarray]] = {}

    def _batches(self) -> list[tuple[int, int]]:
        size, n = self.config.batch_size, len(self.captions)
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def _text_groups(self) -> dict[int, _Group]:
        builders = {layer: _GroupBuilder(len(self.captions), self.probes[layer], self.config.top_k, self.pair_rows)
                    for layer in self.layers}
        for start, stop in progress(self._batches(), "text group", "batch"):
            batch = compose(self.lm, self.captions[start:stop], self.prompt, self.max_caption_tokens, None)
            hidden = capture_resid_post(self.lm, batch, self.layers)
            for layer in self.layers:
                builders[layer].add(hidden[layer], batch.caption_mask, start)
        return {layer: builder.build() for layer, builder in builders.items()}

    def evaluate(self, adapter: Adapter, vision_tokens: torch.Tensor, checkpoint: str, treatment: str = "none") -> tuple[pd.DataFrame, float]:
        """Compute every per-layer metric of one adapter.

        Args:
            vision_tokens: `[N, T, D]` cached encoder outputs of the validation images.

        Returns:
            Tidy results (columns `RESULT_COLUMNS`) and the validation caption loss (nats
            per token) from the same forward passes.
        """
        adapter.eval()
        lm, device = self.lm, self.lm.model.device
        n_images = len(self.captions)
        image_builders = {layer: _GroupBuilder(n_images, self.probes[layer], self.config.top_k, self.pair_rows) for layer in self.layers}
        caption_builders = {layer: _GroupBuilder(n_images, self.probes[layer], self.config.top_k, self.pair_rows) for layer in self.layers}
        splice_rows = min(self.config.splice_images, n_images)
        splice = {layer: [] for layer in self.layers}
        loss_sum, token_count = 0.0, 0
        for start, stop in progress(self._batches(), f"evaluate {checkpoint}", "batch"):
            with torch.no_grad():
                visual = adapter(vision_tokens[start:stop].to(device))
            batch = compose(lm, self.captions[start:stop], self.prompt, self.max_caption_tokens, visual)
            hidden, loss, n_tokens = capture_resid_post_with_loss(lm, batch, self.layers)
            loss_sum += float(loss)
            token_count += n_tokens
            for layer in self.layers:
                image_builders[layer].add(hidden[layer], batch.image_mask, start)
                caption_builders[layer].add(hidden[layer], batch.caption_mask, start)
                if start < splice_rows:
                    splice[layer].append(splice_sums(lm, batch, layer, self.probes[layer]))

        rows: list[list] = []
        replicates: dict[tuple[int, str, str], np.ndarray] = {}
        self.replicates[checkpoint] = replicates

        def add(layer: int, group: str, metrics: dict[str, MetricValue]) -> None:
            for name, value in metrics.items():
                rows.append([checkpoint, treatment, layer, group, name, value.value, value.ci_low, value.ci_high, value.n])
                if value.samples is not None and value.samples.shape[0] == self.counts.shape[0]:
                    replicates[(layer, group, name)] = value.samples

        ci = self.config.ci_level
        for layer in self.layers:
            image, caption, text = image_builders[layer].build(), caption_builders[layer].build(), self.text[layer]
            for group_name, group in (("image", image), ("caption", caption), ("text", text)):
                add(layer, group_name, fidelity_metrics(group.stats, self.counts, ci))
            add(layer, "image/text", ratio_metrics(image.stats, text.stats, self.counts, ci))
            jaccard, weighted = feature_overlap(image.top_index, text.top_index, image.top_mass, text.top_mass)
            add(layer, "pair", {
                "feature_jaccard": mean_with_ci(np.nan_to_num(jaccard), self.counts, ci),
                "feature_weighted_overlap": mean_with_ci(np.nan_to_num(weighted), self.counts, ci),
            })
            add(layer, "pair", pair_metrics(image.means, text.means, self.pair_counts, ci, self.config.knn_k))
            if self.shuffled is not None:
                shuffled = pair_metrics(image.means, text.means[self.shuffled], self.pair_counts, ci, self.config.knn_k)
                add(layer, "pair", {f"{name}@shuffled": value for name, value in shuffled.items()})
            if splice[layer]:
                sums = {key: np.concatenate([part[key] for part in splice[layer]])[:splice_rows] for key in splice[layer][0]}
                add(layer, "caption", splice_metrics(sums, bootstrap_counts(splice_rows, self.config.n_bootstrap, self.seed), ci))
            probe = linear_probe_metrics(image.means, self.pair_categories, self.pair_counts, ci, self.seed)
            if probe:
                add(layer, "image", probe)
        if self.config.bits_per_byte_images and len(self.prompt.before_image) == 1:
            from mmalign.bytes_metric import caption_bits_per_byte

            add(-1, "caption", caption_bits_per_byte(
                lm, adapter, vision_tokens, self.captions, self.prompt, self.max_caption_tokens,
                self.config.bits_per_byte_images, self.config.n_bootstrap, self.config.ci_level, self.seed,
            ))
        return pd.DataFrame(rows, columns=RESULT_COLUMNS), loss_sum / max(token_count, 1)


def paired_deltas(
    evaluator: Evaluator, results: pd.DataFrame, checkpoint: str, baseline: str, treatment: str = "none"
) -> pd.DataFrame:
    """Return `delta:<metric>` rows: checkpoint minus baseline, with paired bootstrap intervals.

    Both checkpoints must have been evaluated by the same `evaluator`, so each bootstrap
    replicate resamples the same images for both and the difference is paired.
    """
    if checkpoint not in evaluator.replicates or baseline not in evaluator.replicates:
        raise ValueError(f"paired deltas need {checkpoint!r} and {baseline!r} evaluated in this process by the same evaluator")
    ours, theirs = evaluator.replicates[checkpoint], evaluator.replicates[baseline]
    values = results.set_index(["checkpoint", "layer", "token_group", "metric"])["value"]
    tail = (1.0 - evaluator.config.ci_level) / 2.0
    rows = []
    for key in sorted(ours.keys() & theirs.keys()):
        layer, group, metric = key
        difference = ours[key] - theirs[key]
        finite = difference[np.isfinite(difference)]
        low, high = np.quantile(finite, [tail, 1.0 - tail]) if finite.size else (np.nan, np.nan)
        point = values.get((checkpoint, layer, group, metric), np.nan) - values.get((baseline, layer, group, metric), np.nan)
        rows.append([checkpoint, treatment, layer, group, f"delta:{metric}", float(point), float(low), float(high), len(evaluator.captions)])
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)
