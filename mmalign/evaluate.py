"""Per-layer evaluation of one checkpoint: one LM pass per batch captures every probed layer.

Token groups: `image` (visual-token positions), `caption` (caption positions after the
image) and `text` (the same caption run through the LM alone). Metrics comparing two
groups (CKA, retrieval) use the token group `pair`.
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
from mmalign.lm import LanguageModel
from mmalign.probes.metrics import (
    SaeTokenStats,
    bootstrap_counts,
    linear_cka_with_ci,
    mean_with_ci,
    retrieval_hits,
    sae_metrics,
    sae_token_stats,
)
from mmalign.progress import progress

logger = logging.getLogger("mmalign.evaluate")

RESULT_COLUMNS = ["checkpoint", "treatment", "layer", "token_group", "metric", "value", "ci_low", "ci_high", "n"]


@dataclass
class _GroupAccumulator:
    """Per-image SAE statistics and mean hidden states of one (layer, token group)."""

    stats: list[SaeTokenStats] = field(default_factory=list)
    means: list[np.ndarray] = field(default_factory=list)

    def add(self, hidden: torch.Tensor, mask: torch.Tensor, sae: SAE) -> None:
        """Add one batch: `hidden` is `[B, L, D]`, `mask` selects the group's positions."""
        hidden, mask = hidden.detach().float().cpu(), mask.cpu()
        n_images = hidden.shape[0]
        tokens = hidden[mask]  # [M, D]
        image_index = torch.arange(n_images).unsqueeze(1).expand_as(mask)[mask]  # [M]
        with torch.no_grad():
            latents = sae.encode(tokens)
            reconstruction = sae.decode(latents)
        self.stats.append(sae_token_stats(tokens, reconstruction, latents, image_index, n_images))
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1).double()
        sums = (hidden.double() * mask.unsqueeze(-1)).sum(dim=1)
        self.means.append((sums / counts).numpy())

    def merged(self) -> tuple[SaeTokenStats, np.ndarray]:
        stats = SaeTokenStats(
            sse=np.concatenate([s.sse for s in self.stats]),
            n_tokens=np.concatenate([s.n_tokens for s in self.stats]),
            sum_x=np.concatenate([s.sum_x for s in self.stats]),
            sum_sq_norm=np.concatenate([s.sum_sq_norm for s in self.stats]),
            l0_sum=np.concatenate([s.l0_sum for s in self.stats]),
        )
        return stats, np.concatenate(self.means)


@dataclass
class TextGroupStates:
    """The `text` token group: captions run alone. It does not depend on the checkpoint."""

    groups: dict[int, _GroupAccumulator]


def collect_text_group(
    lm: LanguageModel, captions: list[str], probes: dict[int, SAE], prompt: PromptTemplate, max_caption_tokens: int, batch_size: int
) -> TextGroupStates:
    """Run each caption through the LM without an image and accumulate the `text` group."""
    layers = sorted(probes)
    groups = {layer: _GroupAccumulator() for layer in layers}
    for start in progress(range(0, len(captions), batch_size), "text group", "batch"):
        batch = compose(lm, captions[start : start + batch_size], prompt, max_caption_tokens, visual_tokens=None)
        hidden = capture_resid_post(lm, batch, layers)
        for layer in layers:
            groups[layer].add(hidden[layer], batch.caption_mask, probes[layer])
    return TextGroupStates(groups)


def evaluate_checkpoint(
    lm: LanguageModel,
    adapter: Adapter,
    vision_tokens: torch.Tensor,
    captions: list[str],
    probes: dict[int, SAE],
    text_states: TextGroupStates,
    *,
    checkpoint: str,
    prompt: PromptTemplate,
    max_caption_tokens: int,
    batch_size: int,
    n_bootstrap: int,
    ci_level: float,
    seed: int,
    treatment: str = "none",
) -> tuple[pd.DataFrame, float]:
    """Compute every per-layer metric of one checkpoint on the validation split.

    Args:
        vision_tokens: `[N, T, D]` cached encoder outputs of the N validation images.
        captions: The N validation captions.
        probes: layer -> SAE probe; the layers to evaluate.
        text_states: The `text` group, from `collect_text_group` on the same captions.

    Returns:
        The tidy results (columns `RESULT_COLUMNS`) and the validation caption loss
        (nats per token) from the same forward passes.
    """
    layers = sorted(probes)
    adapter.eval()
    image_groups = {layer: _GroupAccumulator() for layer in layers}
    caption_groups = {layer: _GroupAccumulator() for layer in layers}
    loss_sum, token_count = 0.0, 0
    for start in progress(range(0, len(captions), batch_size), f"evaluate {checkpoint}", "batch"):
        stop = min(start + batch_size, len(captions))
        with torch.no_grad():
            visual = adapter(vision_tokens[start:stop].to(lm.model.device))
        batch = compose(lm, captions[start:stop], prompt, max_caption_tokens, visual)
        hidden, loss, n_tokens = capture_resid_post_with_loss(lm, batch, layers)
        loss_sum += float(loss)
        token_count += n_tokens
        for layer in layers:
            image_groups[layer].add(hidden[layer], batch.image_mask, probes[layer])
            caption_groups[layer].add(hidden[layer], batch.caption_mask, probes[layer])

    counts = bootstrap_counts(len(captions), n_bootstrap, seed)
    rows = []

    def add_row(layer: int, group: str, metric: str, value) -> None:
        rows.append([checkpoint, treatment, layer, group, metric, value.value, value.ci_low, value.ci_high, value.n])

    for layer in layers:
        merged = {
            "image": image_groups[layer].merged(),
            "caption": caption_groups[layer].merged(),
            "text": text_states.groups[layer].merged(),
        }
        for group, (stats, _) in merged.items():
            for metric, value in sae_metrics(stats, counts, ci_level).items():
                add_row(layer, group, metric, value)
        image_means, text_means = merged["image"][1], merged["text"][1]
        add_row(layer, "pair", "cka_linear", linear_cka_with_ci(image_means, text_means, counts, ci_level))
        add_row(layer, "pair", "retrieval_top1", mean_with_ci(retrieval_hits(image_means, text_means), counts, ci_level))

    results = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    return results, loss_sum / max(token_count, 1)
