"""SAE splicing: caption loss with a layer's output replaced by its SAE reconstruction or by zeros.

Fraction of CE loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), and the KL score
= (KL_zero - KL_sae) / KL_zero with KL(p_clean || p_patched), both at the positions that
predict caption tokens. Each layer needs two extra LM passes, so these run on a subset
of the validation images (`eval.splice_images`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sae_lens import SAE

from mmalign.adapters.compose import IGNORE_INDEX, ComposedBatch
from mmalign.lm import LanguageModel
from mmalign.probes.metrics import MetricValue, _interval


@contextmanager
def _patched_layer(lm: LanguageModel, layer: int, mask: torch.Tensor, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the residual stream after `layer` at the masked positions during the forward pass."""

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        patched = hidden.clone()
        patched[mask] = replace(hidden[mask]).to(hidden.dtype)
        return (patched, *output[1:]) if isinstance(output, tuple) else patched

    handle = lm.layer_modules()[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _per_row_logits(lm: LanguageModel, batch: ComposedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return log-probs at caption-predicting positions `[M, vocab]`, their targets `[M]` and rows `[M]`."""
    hidden = lm.model.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).last_hidden_state
    targets = batch.labels[:, 1:]
    predicting = targets != IGNORE_INDEX
    rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[predicting]
    logprobs = F.log_softmax(lm.model.lm_head(hidden[:, :-1][predicting]).double(), dim=-1)
    return logprobs, targets[predicting], rows


@torch.no_grad()
def splice_sums(lm: LanguageModel, batch: ComposedBatch, layer: int, sae: SAE) -> dict[str, np.ndarray]:
    """Return per-row sums over caption-predicting positions: CE clean / SAE / zero, KL SAE / zero, and counts.

    The patch covers the caption positions of the batch (`batch.caption_mask`).
    """
    clean, targets, rows = _per_row_logits(lm, batch)
    n_rows = batch.labels.shape[0]

    def row_sums(values: torch.Tensor) -> np.ndarray:
        return torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows.cpu(), values.cpu()).numpy()

    sums = {"ce_clean": row_sums(-clean.gather(1, targets[:, None]).squeeze(1)), "count": row_sums(torch.ones_like(targets, dtype=torch.float64))}
    for name, replace in (("sae", lambda x: sae.decode(sae.encode(x))), ("zero", torch.zeros_like)):
        with _patched_layer(lm, layer, batch.caption_mask, replace):
            patched, _, _ = _per_row_logits(lm, batch)
        sums[f"ce_{name}"] = row_sums(-patched.gather(1, targets[:, None]).squeeze(1))
        sums[f"kl_{name}"] = row_sums((clean.exp() * (clean - patched)).sum(dim=1))
    return sums


def splice_metrics(sums: dict[str, np.ndarray], counts: np.ndarray, ci_level: float) -> dict[str, MetricValue]:
    """Fraction of CE loss recovered and KL score from per-image sums, with bootstrap intervals."""

    def ratios(weights: np.ndarray) -> dict[str, np.ndarray]:
        total = {name: weights @ values for name, values in sums.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            return {
                "ce_loss_recovered": (total["ce_zero"] - total["ce_sae"]) / (total["ce_zero"] - total["ce_clean"]),
                "kl_score": (total["kl_zero"] - total["kl_sae"]) / total["kl_zero"],
                "ce_delta_sae": (total["ce_sae"] - total["ce_clean"]) / total["count"],
            }

    n_images = len(sums["count"])
    point = ratios(np.ones((1, n_images)))
    resampled = ratios(counts)
    results = {}
    for name, value in point.items():
        replicates = resampled[name]
        low, high = _interval(replicates, ci_level)
        results[name] = MetricValue(float(value[0]), low, high, n_images, samples=replicates)
    return results
