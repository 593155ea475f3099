"""Batched sampling of several captions per image from the adapter's visual tokens and the frozen LM.

Every image's prompt has the same layout and length (`[before_image] [visual tokens]
[after_image]`), so a batch of images stacks into one `inputs_embeds` tensor without padding,
and Hugging Face `generate` draws `n` continuations of each row in one call.
"""

from __future__ import annotations

import logging
import time

import torch

from mmalign.adapters.compose import PromptTemplate
from mmalign.lm import LanguageModel
from mmalign.progress import progress

logger = logging.getLogger("mmalign.loops")


def prompt_embeddings(lm: LanguageModel, visual_tokens: torch.Tensor, prompt: PromptTemplate) -> torch.Tensor:
    """Embed the prompt around each image's visual tokens.

    Args:
        lm: The frozen LM.
        visual_tokens: `[B, V, D]` adapter outputs.
        prompt: Token ids before and after the visual tokens.

    Returns:
        `[B, n_before + V + n_after, D]` input embeddings, in the LM's dtype and on its device.
    """
    device, dtype = lm.model.device, lm.model.dtype
    n_rows = visual_tokens.shape[0]
    before = torch.tensor([list(prompt.before_image)], dtype=torch.long, device=device)
    pieces = [lm.embed(before).expand(n_rows, -1, -1), visual_tokens.to(device=device, dtype=dtype)]
    if prompt.after_image:
        after = torch.tensor([list(prompt.after_image)], dtype=torch.long, device=device)
        pieces.append(lm.embed(after).expand(n_rows, -1, -1))
    return torch.cat(pieces, dim=1)


def rng_devices(device: torch.device) -> list[int]:
    """Return the CUDA device indices whose random state `torch.random.fork_rng` must save for `device`."""
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


@torch.no_grad()
def sample_captions(
    lm: LanguageModel,
    visual_tokens: torch.Tensor,
    prompt: PromptTemplate,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
) -> list[list[str]]:
    """Sample `n` captions per image with temperature and nucleus (top-p) sampling.

    Sampling is seeded inside `torch.random.fork_rng`, so the caller's global random state is
    left unchanged. The captions are reproducible for a given `seed` and `batch_size`, and
    another batch size may give other captions, because the batches share one random stream.

    Args:
        lm: The frozen LM.
        visual_tokens: `[B, V, D]` adapter outputs, one row per image.
        prompt: Token ids before and after the visual tokens.
        n: Captions per image.
        temperature: Softmax temperature, above 0.
        top_p: Nucleus probability mass in (0, 1].
        max_new_tokens: Caption length cap in tokens, the end token included.
        seed: Seed of the random stream.
        batch_size: Images per `generate` call (each call decodes `batch_size * n` sequences).

    Returns:
        `B` lists of `n` captions, stripped of the end token and surrounding whitespace.

    Raises:
        ValueError: if `n`, `temperature`, `top_p`, `max_new_tokens` or `batch_size` is out of range.
    """
    if n < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_new_tokens and batch_size must be at least 1, got {n}, {max_new_tokens}, {batch_size}")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be above 0 and top_p in (0, 1], got {temperature} and {top_p}")

    n_images = visual_tokens.shape[0]
    captions: list[list[str]] = []
    start_time = time.perf_counter()
    device = lm.model.device
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        for start in progress(range(0, n_images, batch_size), "sampling captions", "batch"):
            embeds = prompt_embeddings(lm, visual_tokens[start : start + batch_size], prompt)  # [b, L, D]
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
            # top_k=0 switches off the LM's default top-k filter, so top-p alone truncates.
            output = lm.model.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, do_sample=True, num_return_sequences=n,
                temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                eos_token_id=prompt.end_id, pad_token_id=prompt.end_id,
            )  # [b * n, new tokens]; rows of one image are adjacent
            texts = lm.tokenizer.batch_decode(output, skip_special_tokens=True)
            for row in range(embeds.shape[0]):
                captions.append([text.strip() for text in texts[row * n : (row + 1) * n]])
    elapsed = time.perf_counter() - start_time
    logger.info("sampled %d captions for %d images in %.1f s", n * n_images, n_images, elapsed)
    return captions
