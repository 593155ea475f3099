"""LM forward passes: caption loss and hidden-state capture of every probed layer in one pass."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from mmalign.adapters.compose import IGNORE_INDEX, ComposedBatch
from mmalign.lm import LanguageModel


def caption_loss(lm: LanguageModel, batch: ComposedBatch) -> tuple[torch.Tensor, int]:
    """Return the summed next-token cross-entropy over caption and end tokens, and their count.

    The LM head runs only on positions that predict a labelled token, because the
    vocabulary projection over visual-token positions would be wasted work.
    """
    outputs = lm.model.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    hidden = outputs.last_hidden_state  # [B, L, D], after the final norm
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    predicting = targets != IGNORE_INDEX  # [B, L-1]
    logits = lm.model.lm_head(hidden[:, :-1][predicting])  # [N, vocab]
    loss = F.cross_entropy(logits.float(), targets[predicting], reduction="sum")
    return loss, int(predicting.sum())


@contextmanager
def _capture_layers(lm: LanguageModel, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    captured: dict[int, torch.Tensor] = {}
    modules = lm.layer_modules()
    handles = []
    for layer in layers:
        if not 0 <= layer < len(modules):
            raise ValueError(f"layer {layer} is out of range for {lm.lm_id}, which has layers 0..{len(modules) - 1}")

        def hook(_module, _inputs, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output

        handles.append(modules[layer].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def capture_resid_post(lm: LanguageModel, batch: ComposedBatch, layers: list[int]) -> dict[int, torch.Tensor]:
    """Run the LM once and return the residual stream after each requested layer.

    Returns:
        layer -> `[B, L, D]` hidden states (the output of decoder block `layer`, which is
        TransformerLens's `blocks.{layer}.hook_resid_post`; for the last layer this is
        before the final norm, unlike `output_hidden_states[-1]` in transformers).
    """
    with _capture_layers(lm, layers) as captured:
        lm.model.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask)
    return dict(captured)


@torch.no_grad()
def capture_resid_post_with_loss(
    lm: LanguageModel, batch: ComposedBatch, layers: list[int]
) -> tuple[dict[int, torch.Tensor], torch.Tensor, int]:
    """Capture the probed layers and compute the caption loss from the same forward pass."""
    with _capture_layers(lm, layers) as captured:
        loss, n_tokens = caption_loss(lm, batch)
    return dict(captured), loss, n_tokens
