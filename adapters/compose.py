"""Composition of visual tokens with caption text into LM inputs, with token-group masks.

Row layout (right-padded), `plain` prompt style:

    image + caption:  [start] [visual tokens ...] [prefix ...] [caption ...] [end] [pad ...]
    text alone:       [start] [prefix ...] [caption ...] [end] [pad ...]

`chat` prompt style puts the visual tokens inside the user turn of the LM's chat template
and the caption in the assistant turn. The first position collects the attention-sink
activations of decoder LMs, so it belongs to no token group. The loss covers the caption
tokens and the end token only; padding and prompt positions carry no label.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.lm import LanguageModel

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<mmalign-image>"


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids around the visual tokens and the caption.

    Attributes:
        before_image: ids before the visual tokens (the start token, or the chat header).
        after_image: ids between the visual tokens and the caption (the prefix, or the chat tail).
        caption_separator: text put before each caption before tokenizing (" " after a prefix).
        end_id: the token that closes the caption; it is scored.
    """

    before_image: tuple[int, ...]
    after_image: tuple[int, ...]
    caption_separator: str
    end_id: int


def build_prompt(lm: LanguageModel, style: str = "plain", prefix: str = "", instruction: str = "Describe the image.") -> PromptTemplate:
    """Build the prompt template for a prompt style.

    Args:
        style: `plain` (captioning after an optional prefix such as "A picture of") or
            `chat` (the LM's chat template, image and instruction in the user turn).
        prefix: Plain style: text between the visual tokens and the caption.
        instruction: Chat style: the user's request after the image.

    Raises:
        ValueError: for an unknown style, or `chat` with a tokenizer that has no chat template.
    """
    tokenizer = lm.tokenizer
    if style == "plain":
        prefix_ids = tuple(tokenizer(prefix, add_special_tokens=False).input_ids) if prefix else ()
        return PromptTemplate((lm.start_token_id,), prefix_ids, " " if prefix else "", lm.end_token_id)
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{lm.lm_id} has no chat template; use adapter.prompt_style: plain")
        messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{instruction}"}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, _, after = text.partition(IMAGE_PLACEHOLDER)
        before_ids = tuple(tokenizer(before, add_special_tokens=False).input_ids)
        if not before_ids:
            before_ids = (lm.start_token_id,)
        after_ids = tuple(tokenizer(after, add_special_tokens=False).input_ids)
        return PromptTemplate(before_ids, after_ids, "", lm.end_token_id)
    raise ValueError(f"unknown prompt style {style!r}; accepted styles: plain, chat")


@dataclass
class ComposedBatch:
    """LM inputs for one batch, with masks of the token groups."""

    inputs_embeds: torch.Tensor  # [B, L, D]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], IGNORE_INDEX outside caption + end tokens
    image_mask: torch.Tensor  # [B, L] bool, visual-token positions
    caption_mask: torch.Tensor  # [B, L] bool, caption-token positions (end token excluded)


def tokenize_captions(lm: LanguageModel, captions: list[str], separator: str, max_caption_tokens: int) -> list[list[int]]:
    """Tokenize each caption, truncated to leave room for the end token.

    Results are memoized on the LM object, because training sees every caption once per
    epoch and tokenizing again each time is wasted work.
    """
    cache = lm.token_cache
    texts = [separator + caption.strip() for caption in captions]
    missing = [text for text in dict.fromkeys(texts) if text not in cache]
    if missing:
        for text, ids in zip(missing, lm.tokenizer(missing, add_special_tokens=False).input_ids):
            cache[text] = tuple(ids)
    return [list(cache[text][: max_caption_tokens - 1]) for text in texts]


def compose(
    lm: LanguageModel,
    captions: list[str],
    prompt: PromptTemplate,
    max_caption_tokens: int,
    visual_tokens: torch.Tensor | None,
) -> ComposedBatch:
    """Build LM inputs for captions, after visual tokens when given (else the text-only run).

    Args:
        lm: The frozen LM.
        captions: One caption per row.
        prompt: Token ids around the image and the caption.
        max_caption_tokens: Caption length cap, the end token included.
        visual_tokens: `[B, V, D]` adapter outputs, or None for the text-only token group.
    """
    caption_ids = tokenize_captions(lm, captions, prompt.caption_separator, max_caption_tokens)
    n_rows = len(captions)
    n_visual = 0 if visual_tokens is None else visual_tokens.shape[1]
    n_before, n_after = len(prompt.before_image), len(prompt.after_image)
    text_start = n_before + n_visual + n_after
    length = text_start + max(len(ids) for ids in caption_ids) + 1
    pad_id = lm.end_token_id
    device = lm.model.device

    input_ids = torch.full((n_rows, length), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, length), dtype=torch.long)
    image_mask = torch.zeros((n_rows, length), dtype=torch.bool)
    caption_mask = torch.zeros((n_rows, length), dtype=torch.bool)
    head = list(prompt.before_image) + [pad_id] * n_visual + list(prompt.after_image)
    for row, ids in enumerate(caption_ids):
        tokens = head + ids + [prompt.end_id]
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
        image_mask[row, n_before : n_before + n_visual] = True
        caption_mask[row, text_start : text_start + len(ids)] = True
        labels[row, text_start : len(tokens)] = input_ids[row, text_start : len(tokens)]

    inputs_embeds = lm.embed(input_ids.to(device))  # [B, L, D]
    if visual_tokens is not None:
        inputs_embeds = torch.cat(
            [inputs_embeds[:, :n_before], visual_tokens.to(inputs_embeds.dtype), inputs_embeds[:, n_before + n_visual :]], dim=1
        )
    return ComposedBatch(
        inputs_embeds, attention_mask.to(device), labels.to(device), image_mask.to(device), caption_mask.to(device)
    )


@torch.no_grad()
def generate_captions(
    lm: LanguageModel, visual_tokens: torch.Tensor, prompt: PromptTemplate, max_new_tokens: int = 20
) -> list[str]:
    """Greedy-decode a caption after each image's visual tokens (one image at a time, no padding)."""
    captions = []
    head_before = torch.tensor([list(prompt.before_image)], device=lm.model.device)
    head_after = torch.tensor([list(prompt.after_image)], dtype=torch.long, device=lm.model.device)
    for row in range(visual_tokens.shape[0]):
        pieces = [lm.embed(head_before), visual_tokens[row : row + 1].to(lm.model.dtype)]
        if head_after.shape[1]:
            pieces.append(lm.embed(head_after))
        embeds = torch.cat(pieces, dim=1)
        output = lm.model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=prompt.end_id, pad_token_id=prompt.end_id,
        )
        captions.append(lm.tokenizer.decode(output[0], skip_special_tokens=True).strip())
    return captions
