"""Caption likelihood in bits per byte, conditioned on the visual tokens.

Bits per byte do not depend on the tokenizer, so LMs with different vocabularies are
compared on one scale. The byte-level score sums over every valid tokenization of the
caption (`mmalign.loops.bytelevel`); the token-level score uses the canonical
tokenization only, as the training loss does. Both include the end-of-text token.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mmalign.adapters.base import Adapter
from mmalign.adapters.compose import PromptTemplate, compose
from mmalign.capture import caption_loss
from mmalign.lm import LanguageModel
from mmalign.probes.metrics import MetricValue, bootstrap_counts, mean_with_ci


@torch.no_grad()
def caption_bits_per_byte(
    lm: LanguageModel, adapter: Adapter, vision_tokens: torch.Tensor, captions: list[str], prompt: PromptTemplate,
    max_caption_tokens: int, n_images: int, n_bootstrap: int, ci_level: float, seed: int,
) -> dict[str, MetricValue]:
    """Return byte-level and token-level caption bits per byte over the first `n_images` images.

    Only the plain prompt style is supported (the byte-level LM starts with the start
    token, then the visual tokens, then the prompt text). Captions are not truncated,
    unlike in training, so long captions are scored whole.
    """
    from mmalign.loops.bytelevel import ByteLevelLM

    if len(prompt.before_image) != 1:
        raise ValueError("caption bits per byte need the plain prompt style (adapter.prompt_style: plain)")
    count = min(n_images, len(captions))
    prefix_text = lm.tokenizer.decode(list(prompt.after_image)).encode("utf-8")
    byte_bits, token_bits = np.zeros(count), np.zeros(count)
    adapter.eval()
    for row in range(count):
        visual = adapter(vision_tokens[row : row + 1].to(lm.model.device))[0]  # [V, D]
        text = (prompt.caption_separator + captions[row].strip()).encode("utf-8")
        byte_lm = ByteLevelLM(lm.model, lm.tokenizer, prefix_embeds=visual, start_token_id=prompt.before_image[0],
                              eot_token_id=prompt.end_id)
        log_probability = byte_lm.score(text, prompt=prefix_text, add_eot=True)  # natural log
        byte_bits[row] = -log_probability / math.log(2) / len(text)
        batch = compose(lm, [captions[row]], prompt, 10**6, visual[None])
        loss, _ = caption_loss(lm, batch)
        token_bits[row] = float(loss) / math.log(2) / len(text)
    counts = bootstrap_counts(count, n_bootstrap, seed)
    return {
        "caption_bits_per_byte": mean_with_ci(byte_bits, counts, ci_level),
        "caption_bits_per_byte_canonical": mean_with_ci(token_bits, counts, ci_level),
    }
