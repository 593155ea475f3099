"""Composition of visual tokens with caption text into LM inputs, with token-group masks.

Row layout (right-padded):

    image + caption:  [start] [visual tokens ...] [prefix ...] [caption ...] [end] [pad ...]
    text alone:       [start] [prefix ...] [caption ...] [end] [pad ...]

The `start` token absorbs the attention-sink activations of position 0, so it belongs to
no token group. The loss covers the caption tokens and the end token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.lm import LanguageModel

IGNORE_INDEX = -100


@dataclass
class ComposedBatch:
    """LM inputs for one batch, with masks of the token groups."""

    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX outside caption + end tokens
    image_mask: torch.Tensor  # [B, L] bool, visual-token positions
    caption_mask: torch.Tensor  # [B, L] bool, caption-token positions (end token excluded)


def tokenize_captions(lm: LanguageModel, captions: list[str], prefix: str, max_caption_tokens: int) -> tuple[list[int], list[list[int]]]:
    """Tokenize the prompt prefix and each caption (truncated, without the end token)."""
    tokenizer = lm.tokenizer
    prefix_ids = tokenizer(prefix, add_special_tokens=False).input_ids if prefix else []
    separator = " " if prefix else ""
    caption_ids = []
    for caption in captions:
        ids = tokenizer(separator + caption.strip(), add_special_tokens=False).input_ids
        caption_ids.append(ids[: max_caption_tokens - 1])
    return prefix_ids, caption_ids


def compose(
    lm: LanguageModel,
    captions: list[str],
    prefix: str,
    max_caption_tokens: int,
    visual_tokens: torch.Tensor | None,
) -> ComposedBatch:
    """Build LM inputs for captions, after visual tokens when given (else the text-only run).

    Args:
        lm: The frozen LM.
        captions: One caption per row.
        prefix: Prompt text between the visual tokens and the caption.
        max_caption_tokens: Caption length cap, the end token included.
        visual_tokens: `[B, V, D]` adapter outputs, or None for the text-only token group.
    """
    prefix_ids, caption_ids = tokenize_captions(lm, captions, prefix, max_caption_tokens)
    n_rows = len(captions)
    n_visual = 0 if visual_tokens is None else visual_tokens.shape[1]
    lengths = [1 + n_visual + len(prefix_ids) + len(ids) + 1 for ids in caption_ids]
    length = max(lengths)
    pad_id = lm.end_token_id

    input_ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, length), dtype=torch.long)
    image_mask = torch.zeros((n_rows, length), dtype=torch.bool)
    caption_mask = torch.zeros((n_rows, length), dtype=torch.bool)
    for row, ids in enumerate(caption_ids):
        text_start = 1 + n_visual + len(prefix_ids)
        tokens = [lm.start_token_id] + [pad_id] * n_visual + prefix_ids + ids + [lm.end_token_id]
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        image_mask[row, 1 : 1 + n_visual] = True
        caption_mask[row, text_start : text_start + len(ids)] = True
        labels[row, text_start : len(tokens)] = input_ids[row, text_start : len(tokens)]

    inputs_embeds = lm.embed(input_ids)  # [B, L, D]
    if visual_tokens is not None:
        inputs_embeds = torch.cat(
            [inputs_embeds[:, :1], visual_tokens.to(inputs_embeds.dtype), inputs_embeds[:, 1 + n_visual :]], dim=1
        )
    return ComposedBatch(inputs_embeds, attention_mask, labels, image_mask, caption_mask)
