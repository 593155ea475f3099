"""Adapter training on cached vision features with a frozen LM.

Training uses AdamW with linear warmup and cosine decay, gradient clipping and
accumulation, and bf16 autocast on GPU. It saves checkpoints and logs the validation loss
and sample captions every N steps. The data order and dropout noise of step s are derived
from (seed, s), so a resumed run repeats an uninterrupted one bit for bit on CPU.
Multi-process data parallelism runs under Hugging Face Accelerate.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup

from mmalign.adapters.base import Adapter
from mmalign.adapters.checkpoint import load_checkpoint, save_checkpoint
from mmalign.adapters.compose import PromptTemplate, compose, generate_captions, tokenize_captions
from mmalign.adapters.training_state import has_training_state, read_training_state, write_training_state
from mmalign.capture import caption_loss
from mmalign.config import TrainConfig
from mmalign.lm import LanguageModel
from mmalign.progress import progress

logger = logging.getLogger("mmalign.train")

STEP_PATTERN = re.compile(r"^step_(\d{6,})$")


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT arrived; the current step finished and a checkpoint was saved."""


@torch.no_grad()
def validation_loss(
    lm: LanguageModel,
    adapter: Adapter,
    vision_tokens: torch.Tensor,
    captions: list[str],
    prompt: PromptTemplate,
    max_caption_tokens: int,
    batch_size: int,
    image_order: torch.Tensor | None = None,
) -> float:
    """Return the mean caption cross-entropy (nats per token) over a split.

    Args:
        vision_tokens: `[N, T, D]` cached encoder outputs.
        captions: N captions; caption i is scored after image `image_order[i]` (default i).
        image_order: A permutation that pairs captions with other images (the shuffled control).
    """
    was_training = adapter.training
    adapter.eval()
    order = torch.arange(len(captions)) if image_order is None else image_order
    total, count = 0.0, 0
    device = lm.model.device
    for start in range(0, len(captions), batch_size):
        rows = list(range(start, min(start + batch_size, len(captions))))
        visual = adapter(vision_tokens[order[rows]].to(device))
        batch = compose(lm, [captions[i] for i in rows], prompt, max_caption_tokens, visual)
        loss, n_tokens = caption_loss(lm, batch)
        total += float(loss)
        count += n_tokens
    adapter.train(was_training)
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


def batch_rows(step: int, n_items: int, batch_size: int, seed: int) -> torch.Tensor:
    """Return the item indices of optimizer step `step` (1-based): epochs of seeded permutations, last partial batch dropped."""
    per_epoch = n_items // batch_size
    if per_epoch == 0:
        raise ValueError(f"train.batch_size {batch_size} is larger than the {n_items} training images; lower it")
    epoch, offset = divmod(step - 1, per_epoch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[offset * batch_size : (offset + 1) * batch_size]


def list_step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Return `(step, path)` of every complete `step_NNNNNN/` checkpoint, oldest first."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = STEP_PATTERN.match(path.name)
            if match and has_training_state(path):
                found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass
class TrainingSetup:
    """Inputs of training besides the config: frozen LM, cached features, captions and provenance."""

    lm: LanguageModel
    train_tokens: torch.Tensor  # [N, T, D] cached encoder outputs
    train_captions: list[str]
    val_tokens: torch.Tensor
    val_captions: list[str]
    prompt: PromptTemplate
    checkpoint_dir: Path
    metadata: dict[str, Any]
    seed: int


class _SigintGuard:
    """Turn the first SIGINT into a flag so the current step can finish and be saved."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_SigintGuard":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def _handle(self, _signum, _frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("SIGINT: finishing the current step, then saving a checkpoint")

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _autocast(device: torch.device, mixed_precision: str):
    use_bf16 = mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def train_adapter(adapter: Adapter, setup: TrainingSetup, config: TrainConfig, resume: bool = False, accelerator=None) -> Adapter:
    """Train the adapter and save `step_NNNNNN/` checkpoints plus `final/` under `setup.checkpoint_dir`.

    Args:
        adapter: The adapter, freshly initialized from the seed (its weights are replaced on resume).
        setup: Frozen LM, cached features, captions and provenance.
        config: Optimization settings.
        resume: Continue from the newest complete step checkpoint when one exists.
        accelerator: An `accelerate.Accelerator` for multi-process data parallelism, or None.

    Returns:
        The trained adapter (unwrapped from DDP).

    Raises:
        TrainingDivergedError: when the loss becomes NaN or infinite, naming the step and
            the last good checkpoint.
        TrainingInterrupted: after SIGINT, once a checkpoint of the finished step is saved.
    """
    lm = setup.lm
    is_main = accelerator is None or accelerator.is_main_process
    rank = 0 if accelerator is None else accelerator.process_index
    world = 1 if accelerator is None else accelerator.num_processes
    device = lm.model.device
    metrics_path = setup.checkpoint_dir.parent / "train_metrics.jsonl"

    optimizer = torch.optim.AdamW(adapter.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = math.ceil(config.warmup_fraction * config.steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, config.steps)
    start_step, last_good = 1, None
    if resume:
        checkpoints = list_step_checkpoints(setup.checkpoint_dir)
        if checkpoints:
            step, path = checkpoints[-1]
            loaded, _ = load_checkpoint(path)
            adapter.load_state_dict(loaded.state_dict())
            read_training_state(path, optimizer, scheduler)
            start_step, last_good = step + 1, path
            logger.info("resuming from %s at step %d", path, start_step)
        else:
            logger.info("--resume: no step checkpoint in %s; starting from step 1", setup.checkpoint_dir)
    elif is_main:
        metrics_path.unlink(missing_ok=True)

    model = adapter
    if accelerator is not None:
        model, optimizer = accelerator.prepare(adapter, optimizer)

    def save(step: int, name: str) -> Path:
        target = setup.checkpoint_dir / name
        if is_main:
            unwrapped = adapter if accelerator is None else accelerator.unwrap_model(model)
            save_checkpoint(
                unwrapped, target, {**setup.metadata, "step": step},
                write_extra=lambda staging: write_training_state(staging, optimizer, scheduler, step, {"seed": setup.seed}),
            )
            logger.info("saved checkpoint %s", target)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return target

    def log(record: dict[str, Any]) -> None:
        if is_main:
            with metrics_path.open("a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    micro_batches = config.grad_accum_steps
    start_time = time.perf_counter()
    with _SigintGuard() as sigint:
        bar = progress(range(start_step, config.steps + 1), "train adapter", "step")
        for step in bar:
            torch.manual_seed(setup.seed * 1_000_003 + step)  # dropout noise of this step
            rows = batch_rows(step, len(setup.train_captions), config.batch_size, setup.seed)
            captions = [setup.train_captions[i] for i in rows]
            # Normalize by the whole batch's label count so accumulation and data
            # parallelism give the gradient of the token-mean loss over the global batch.
            total_labels = sum(len(ids) + 1 for ids in tokenize_captions(lm, captions, setup.prompt.caption_separator, config.max_caption_tokens))
            model.train()
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            local_rows = list(range(rank, len(rows), world))
            chunks = [local_rows[i::micro_batches] for i in range(micro_batches)]
            for index, chunk in enumerate(chunks):
                if not chunk:
                    continue
                sync = accelerator is None or index == len(chunks) - 1
                context = nullcontext() if sync else accelerator.no_sync(model)
                with context, _autocast(device, config.mixed_precision):
                    visual = model(setup.train_tokens[rows[chunk]].to(device))
                    batch = compose(lm, [captions[i] for i in chunk], setup.prompt, config.max_caption_tokens, visual)
                    loss_sum, _ = caption_loss(lm, batch)
                    loss = loss_sum.float() * world / total_labels  # DDP averages gradients over processes
                    if accelerator is None:
                        loss.backward()
                    else:
                        accelerator.backward(loss)
                step_loss += loss.item() / world
            if accelerator is not None:
                step_loss = accelerator.reduce(torch.tensor(step_loss, device=device), reduction="sum").item()
            if not math.isfinite(step_loss):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved yet"
                raise TrainingDivergedError(f"training loss is {step_loss} at step {step}; {where}; lower train.lr (now {config.lr})")
            grad_norm = None
            if config.max_grad_norm is not None:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{step_loss:.3f}")

            record: dict[str, Any] = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                                      "grad_norm": grad_norm, "seconds": time.perf_counter() - start_time}
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps) and is_main:
                record.update(_evaluate_now(lm, adapter if accelerator is None else accelerator.unwrap_model(model), setup, config))
            if step % max(1, config.steps // 20) == 0 or "val_loss" in record:
                logger.info("step %d/%d  loss %.4f  lr %.2e%s", step, config.steps, step_loss, record["lr"],
                            f"  val_loss {record['val_loss']:.4f}" if "val_loss" in record else "")
            log(record)
            if config.save_every and step % config.save_every == 0:
                last_good = save(step, f"step_{step:06d}")
            if sigint.requested:
                last_good = save(step, f"step_{step:06d}")
                raise TrainingInterrupted(f"stopped after step {step}; checkpoint {last_good}; continue with --resume")
    final = adapter if accelerator is None else accelerator.unwrap_model(model)
    save(config.steps, "final")
    final.eval()
    return final


def _evaluate_now(lm: LanguageModel, adapter: Adapter, setup: TrainingSetup, config: TrainConfig) -> dict[str, Any]:
    adapter.eval()
    val_loss = validation_loss(lm, adapter, setup.val_tokens, setup.val_captions, setup.prompt, config.max_caption_tokens, 16)
    samples = []
    if config.n_sample_captions:
        count = min(config.n_sample_captions, len(setup.val_captions))
        with torch.no_grad():
            visual = adapter(setup.val_tokens[:count].to(lm.model.device))
        generated = generate_captions(lm, visual, setup.prompt)
        samples = [{"reference": setup.val_captions[i], "generated": generated[i]} for i in range(count)]
        for sample in samples:
            logger.info("sample caption: %r (reference %r)", sample["generated"], sample["reference"])
    adapter.train()
    return {"val_loss": val_loss, "samples": samples}
