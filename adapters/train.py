"""Adapter training on cached vision features with a frozen LM, and the validation caption loss."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from mmalign.adapters.compose import compose
from mmalign.adapters.linear import LinearAdapter
from mmalign.capture import caption_loss
from mmalign.config import AdapterConfig, TrainConfig
from mmalign.lm import LanguageModel

logger = logging.getLogger("mmalign.train")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@torch.no_grad()
def validation_loss(
    lm: LanguageModel,
    adapter: LinearAdapter,
    vision_tokens: torch.Tensor,
    captions: list[str],
    adapter_config: AdapterConfig,
    max_caption_tokens: int,
    batch_size: int,
    image_order: torch.Tensor | None = None,
) -> float:
    """Return the mean caption cross-entropy (nats per token) over a split.

    Args:
        vision_tokens: `[N, T, D]` cached encoder outputs.
        captions: N captions; caption i is scored after image `image_order[i]` (default i).
        image_order: A permutation to pair captions with other images (the shuffled control).
    """
    adapter.eval()
    order = torch.arange(len(captions)) if image_order is None else image_order
    total, count = 0.0, 0
    for start in range(0, len(captions), batch_size):
        rows = list(range(start, min(start + batch_size, len(captions))))
        visual = adapter(vision_tokens[order[rows]])
        batch = compose(lm, [captions[i] for i in rows], adapter_config.prompt_prefix, max_caption_tokens, visual)
        loss, n_tokens = caption_loss(lm, batch)
        total += float(loss)
        count += n_tokens
    return total / max(count, 1)


def shuffled_pairing(n: int, seed: int) -> torch.Tensor:
    """Return a permutation of range(n) with no fixed point (each caption gets another image)."""
    if n < 2:
        raise ValueError(f"a shuffled-image control needs at least 2 validation images, got {n}")
    generator = torch.Generator().manual_seed(seed)
    while True:  # rejection sampling; about 1/e of permutations are derangements
        permutation = torch.randperm(n, generator=generator)
        if not bool((permutation == torch.arange(n)).any()):
            return permutation


def train_adapter(
    lm: LanguageModel,
    adapter: LinearAdapter,
    vision_tokens: torch.Tensor,
    captions: list[str],
    adapter_config: AdapterConfig,
    train_config: TrainConfig,
    seed: int,
    metrics_path: Path | None = None,
) -> list[dict[str, float]]:
    """Train the adapter with AdamW, linear warmup and cosine decay; the LM stays frozen.

    Args:
        vision_tokens: `[N, T, D]` cached encoder outputs of the training split.
        captions: The N training captions.
        metrics_path: JSONL file that receives one line per logged step.

    Returns:
        The logged steps (step, loss, lr, seconds).

    Raises:
        TrainingDivergedError: when the loss becomes NaN or infinite, naming the step.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    warmup = math.ceil(train_config.warmup_fraction * train_config.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, train_config.steps)

    n_images = len(captions)
    order = torch.randperm(n_images, generator=generator)
    cursor = 0
    history: list[dict[str, float]] = []
    log_every = max(1, train_config.steps // 20)
    start_time = time.perf_counter()
    metrics_file = metrics_path.open("a", encoding="utf-8") if metrics_path else None
    progress = tqdm(range(1, train_config.steps + 1), desc="train adapter", unit="step", leave=False)
    try:
        for step in progress:
            if cursor + train_config.batch_size > n_images:  # new epoch, new order
                order = torch.randperm(n_images, generator=generator)
                cursor = 0
            rows = order[cursor : cursor + train_config.batch_size]
            cursor += train_config.batch_size

            adapter.train()
            visual = adapter(vision_tokens[rows])  # [B, V, D_lm]
            batch = compose(lm, [captions[i] for i in rows], adapter_config.prompt_prefix, train_config.max_caption_tokens, visual)
            loss_sum, n_tokens = caption_loss(lm, batch)
            loss = loss_sum / n_tokens
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"training loss is {float(loss)} at step {step}; lower train.lr (now {train_config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            progress.set_postfix(loss=f"{float(loss):.3f}")
            if step % log_every == 0 or step == train_config.steps:
                record = {
                    "step": step,
                    "loss": float(loss),
                    "lr": scheduler.get_last_lr()[0],
                    "seconds": time.perf_counter() - start_time,
                }
                history.append(record)
                logger.info("step %d/%d  loss %.4f  lr %.2e", step, train_config.steps, record["loss"], record["lr"])
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
    finally:
        if metrics_file:
            metrics_file.close()
    adapter.eval()
    return history
