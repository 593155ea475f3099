"""Self-correction training of the adapter: two attempts per image, a verifier reward, two stages.

Adapted from Kumar et al. 2024, "Training Language Models to Self-Correct via Reinforcement
Learning" (SCoRe, arXiv 2409.12917). The prompts are images, the attempts are captions and
only the adapter trains; the LM stays frozen. One iteration:

1. Attempt 1: sample `samples_per_image` captions y1 per training image from the current
   adapter and the LM (`loops/sampling.py`).
2. Attempt 2: for each y1, sample one caption y2 after the prompt
   `[image prompt] [y1] [correction instruction] [caption prompt]` (`CorrectionPrompt`).
   Each attempt is cut at its first line break (`first_line`).
3. A verifier scores both attempts against the image's reference caption. The reward
   source is chosen by name from `REWARD_SOURCES` (default `minilm`: all-MiniLM-L6-v2 cosine
   similarity). A score at or above `threshold` counts as correct, and the training reward
   is 1 for correct and 0 for incorrect (the raw score when `binary_reward` is false). The
   verifier serves training and the metrics only; the adapter never receives it as input.
4. REINFORCE with the mean reward of the image's group of attempts as the baseline, and an
   exact token-level KL divergence to the starting adapter M0:
   - Stage I (`S1-<i>`): loss = -A(r2) log pi(y2 | x, y1, p) + beta2 KL on the positions of y1.
   - Stage II (`S2-<i>`): loss = -A(r1) log pi(y1 | x) - A(r2 + alpha (r2 - r1)) log pi(y2 | x, y1, p)
     + beta1 (KL on y1 + KL on y2).
   A(.) subtracts the group mean. At every caption position the KL is exact over the whole
   vocabulary, sum_v pi(v) (log pi(v) - log pi_ref(v)), and it is summed over the caption's
   tokens and end token. It costs one extra forward pass with M0 per batch.

Each iteration is then measured on a fixed, seeded set of validation images with greedy
decoding and the same verifier: Acc@t1, Acc@t2, delta = Acc@t2 - Acc@t1, delta_i_to_c
(incorrect then correct) and delta_c_to_i (correct then incorrect), as fractions of images.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmalign.adapters.base import Adapter
from mmalign.adapters.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
from mmalign.adapters.compose import IGNORE_INDEX, IMAGE_PLACEHOLDER, PromptTemplate, tokenize_captions
from mmalign.io import stable_hash
from mmalign.lm import LanguageModel, describe_lm
from mmalign.loops.base import TreatedCheckpoint, Treatment, TreatmentContext, register_treatment, validate_options
from mmalign.loops.judge import MAX_SCORE, CaptionJudge
from mmalign.loops.sampling import rng_devices, sample_captions
from mmalign.loops.self_rewarding import from_json, json_ready
from mmalign.progress import progress
from mmalign.sentence_encoder import SentenceEncoder

logger = logging.getLogger("mmalign.loops")

METRICS_NAME = "self_correcting.json"
ATTEMPTS_NAME = "attempts.jsonl"
N_SAMPLE_CAPTIONS = 8  # evaluation images whose two greedy attempts are kept as samples
DEFAULT_INSTRUCTION = "That description may contain a mistake. Find it, then describe the image again, correctly."
_CAPTION_PLACEHOLDER = "<mmalign-first-caption>"


# Reward sources: a small registry of verifiers, each scoring captions against reference captions.

class RewardSource(Protocol):
    """A verifier. `score` returns one number per caption, or None for a caption it could not score."""

    default_threshold: float

    def score(self, captions: list[str], references: list[str], seed: int) -> list[float | None]: ...


REWARD_SOURCES: dict[str, Callable[[LanguageModel, "SelfCorrectingOptions"], RewardSource]] = {}


def register_reward_source(name: str):
    """Return a class decorator that registers a reward source under `name`. The class is built with `(lm, options)`."""
    def register(cls):
        REWARD_SOURCES[name] = cls
        return cls
    return register


@register_reward_source("minilm")
class MiniLMReward:
    """Cosine similarity of all-MiniLM-L6-v2 sentence embeddings of caption and reference, in [-1, 1]."""

    # NOTE: 0.5 is a guess. Short captions of unrelated objects ("A bee." for "A rat.") reach
    # about 0.4 with this encoder, and a matching object usually well above 0.5.
    default_threshold = 0.5

    def __init__(self, lm: LanguageModel, options: "SelfCorrectingOptions") -> None:
        self.encoder = SentenceEncoder(device=lm.model.device)

    def score(self, captions: list[str], references: list[str], seed: int) -> list[float | None]:
        return self.encoder.similarity(captions, references).tolist()


@register_reward_source("judge")
class JudgeReward:
    """The additive 5-point LM judge of `loops/judge.py` (the run's LM), scaled to [0, 1].

    A caption none of whose judgements parsed is unscored (None), and counts as incorrect.
    """

    default_threshold = 0.6  # 3 of 5 points

    def __init__(self, lm: LanguageModel, options: "SelfCorrectingOptions") -> None:
        self.judge = CaptionJudge(lm, options.judge_samples, max_new_tokens=options.judge_max_new_tokens,
                                  response_prefix=options.judge_response_prefix)

    def score(self, captions: list[str], references: list[str], seed: int) -> list[float | None]:
        result = self.judge.score(references, captions, seed)
        return [None if value is None else value / MAX_SCORE for value in result.scores]


class SelfCorrectingOptions(BaseModel):
    """Settings of the self-correcting treatment, read from the config's `treatment:` mapping.

    The sizes are chosen for a 135M LM on CPU.
    NOTE: alpha 10, beta1 0.01 and beta2 0.1 are the values of Kumar et al. 2024 as recalled,
    not checked against the paper's text.
    """

    model_config = ConfigDict(extra="forbid")

    stage1_iterations: int = Field(1, ge=0, description="Stage I iterations S1-1..S1-k (attempt 2 trained, attempt 1 held near M0).")
    stage2_iterations: int = Field(2, ge=0, description="Stage II iterations S2-1..S2-m (both attempts, shaped bonus).")
    images_per_iteration: int | None = Field(32, ge=1, description="Training images sampled per iteration; null uses all.")
    samples_per_image: int = Field(2, ge=2, description="First attempts per image; they form the group whose mean reward is the baseline.")
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature of both attempts.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus (top-p) mass of both attempts.")
    max_new_tokens: int = Field(24, ge=1, description="Length cap of each attempt in tokens.")
    correction_instruction: str = Field(DEFAULT_INSTRUCTION, min_length=1, description="Instruction between attempt 1 and attempt 2.")
    reward_source: str = Field("minilm", description="Verifier name from REWARD_SOURCES.")
    threshold: float | None = Field(None, description="Score at or above which a caption is correct; null uses the source's default.")
    binary_reward: bool = Field(True, description="Train on 1/0 correctness; false trains on the raw verifier score.")
    judge_samples: int = Field(3, ge=1, description="reward_source judge: judgements averaged per caption.")
    judge_max_new_tokens: int = Field(6, ge=1, description="reward_source judge: length cap of each judgement.")
    judge_response_prefix: str = Field("Score:", description="reward_source judge: text opening the judge's turn.")
    alpha: float = Field(10.0, ge=0.0, description="Stage II: weight of the bonus alpha (r2 - r1) on attempt 2.")
    beta1: float = Field(0.01, ge=0.0, description="Stage II: weight of the KL to M0 on both attempts.")
    beta2: float = Field(0.1, ge=0.0, description="Stage I: weight of the KL to M0 on attempt 1.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    epochs: int = Field(1, ge=1, description="Passes over one iteration's attempts (1 keeps training on-policy).")
    batch_size: int = Field(8, ge=1, description="Attempt pairs per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping by global norm; null disables it.")
    eval_images: int = Field(32, ge=1, description="Validation images (fixed, seeded) for Acc@t1 / Acc@t2.")
    generate_batch_size: int = Field(16, ge=1, description="Prompts per generate call of attempt 2 and of greedy decoding.")
    seed: int | None = Field(None, description="Seed of the treatment; null uses the treatment context's seed.")

    @field_validator("reward_source")
    @classmethod
    def _check_source(cls, name: str) -> str:
        if name not in REWARD_SOURCES:
            raise ValueError(f"reward source {name!r} not supported; accepted names: {sorted(REWARD_SOURCES)}")
        return name

    @model_validator(mode="after")
    def _check_iterations(self) -> "SelfCorrectingOptions":
        if self.stage1_iterations + self.stage2_iterations < 1:
            raise ValueError("stage1_iterations and stage2_iterations are both 0; set at least one to 1 or more")
        return self


def parse_options(options: dict[str, Any]) -> SelfCorrectingOptions:
    """Validate the `treatment:` mapping.

    Raises:
        ValueError: naming each invalid or unknown field and its value.
    """
    return validate_options(SelfCorrectingOptions, options, "self-correcting")


# Losses and metrics: pure functions on tensors.

def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Subtract each group's mean reward: `[k, n]` rewards of k images with n attempts each -> `[k, n]`."""
    return rewards - rewards.mean(dim=1, keepdim=True)


def shaped_reward(first: torch.Tensor, second: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return the stage II reward of attempt 2, r2 + alpha (r2 - r1), which pays for fixing a wrong attempt 1."""
    return second + alpha * (second - first)


def reinforce_loss(logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Return the per-sequence REINFORCE loss -A log pi(y). No gradient flows into `advantages`. Shapes `[B]`."""
    return -advantages.detach() * logps


def token_kl(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Return the exact KL(pi || pi_ref) over the vocabulary at each position: `[N, vocab]` logits -> `[N]`."""
    policy_logps = policy_logits.float().log_softmax(dim=-1)
    reference_logps = reference_logits.float().log_softmax(dim=-1)
    return (policy_logps.exp() * (policy_logps - reference_logps)).sum(dim=-1)


def per_sequence(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Sum per-token `values` `[N]` into their rows `[N]` (row index of each token) -> `[n_rows]`."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add(0, rows, values)


def stage_one_loss(logps2: torch.Tensor, advantages2: torch.Tensor, kl1: torch.Tensor, beta2: float) -> torch.Tensor:
    """Return the stage I loss per pair: REINFORCE on attempt 2 plus beta2 times attempt 1's KL to M0. Shapes `[B]`."""
    return reinforce_loss(logps2, advantages2) + beta2 * kl1


def stage_two_loss(
    logps1: torch.Tensor, advantages1: torch.Tensor, logps2: torch.Tensor, advantages2: torch.Tensor, kl: torch.Tensor, beta1: float
) -> torch.Tensor:
    """Return the stage II loss per pair: REINFORCE on both attempts plus beta1 times their summed KL to M0. Shapes `[B]`."""
    return reinforce_loss(logps1, advantages1) + reinforce_loss(logps2, advantages2) + beta1 * kl


def correction_metrics(correct1: torch.Tensor, correct2: torch.Tensor) -> dict[str, float]:
    """Compute Acc@t1, Acc@t2, their difference and the two transition fractions from `[n]` boolean verdicts."""
    if correct1.shape != correct2.shape or correct1.numel() == 0:
        raise ValueError(f"need two non-empty verdict vectors of one shape, got {tuple(correct1.shape)} and {tuple(correct2.shape)}")
    first, second = correct1.bool(), correct2.bool()
    return {
        "acc@t1": float(first.float().mean()),
        "acc@t2": float(second.float().mean()),
        "delta": float(second.float().mean() - first.float().mean()),
        "delta_i_to_c": float((~first & second).float().mean()),
        "delta_c_to_i": float((first & ~second).float().mean()),
    }


def verdicts(scores: list[float | None], threshold: float) -> torch.Tensor:
    """Return the correctness of each score: at or above `threshold` is correct, and an unscored caption (None) is not."""
    return torch.tensor([score is not None and score >= threshold for score in scores], dtype=torch.bool)


# The second attempt's prompt, composition and generation with a context per row.

@dataclass(frozen=True)
class CorrectionPrompt:
    """Token ids of both attempts' prompts.

    Attempt 1 is the run's prompt. Attempt 2 reads
    `before_image [visual tokens] after_image [attempt 1] between [attempt 2] end`, where
    `between` closes attempt 1, gives the correction instruction and opens the caption again.
    """

    prompt: PromptTemplate
    between: tuple[int, ...]

    def first_context(self) -> list[int]:
        return list(self.prompt.after_image)

    def second_context(self, first_ids: list[int]) -> list[int]:
        return list(self.prompt.after_image) + first_ids + list(self.between)


def build_correction_prompt(lm: LanguageModel, prompt: PromptTemplate, style: str, instruction: str,
                            chat_instruction: str = "Describe the image.") -> CorrectionPrompt:
    """Build the second attempt's prompt for the run's prompt style.

    `chat`: attempt 1 is the assistant's first turn, the correction instruction the user's
    second turn, and attempt 2 the assistant's second turn (the LM's chat template).
    `plain`: a new line, the instruction, a new line, then the caption prefix again.
    """
    tokenizer = lm.tokenizer
    if style == "chat":
        messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{chat_instruction}"},
                    {"role": "assistant", "content": _CAPTION_PLACEHOLDER}, {"role": "user", "content": instruction}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tail = text.partition(_CAPTION_PLACEHOLDER)[2]
        return CorrectionPrompt(prompt, tuple(tokenizer(tail, add_special_tokens=False).input_ids))
    if style == "plain":
        ids = tokenizer(f"\n{instruction.strip()}\n", add_special_tokens=False).input_ids
        return CorrectionPrompt(prompt, tuple(ids) + prompt.after_image)
    raise ValueError(f"unknown prompt style {style!r}; accepted styles: plain, chat")


def caption_token_logits(
    lm: LanguageModel, adapter: Adapter, vision_tokens: torch.Tensor, contexts: list[list[int]], captions: list[str],
    prompt: PromptTemplate, max_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the LM's logits at each position that predicts a caption or end token.

    Each row is `before_image [visual tokens] context [caption] end`, right-padded. Gradients
    flow into the adapter.

    Args:
        vision_tokens: `[B, T, d_vision]` encoder outputs, one row per caption.
        contexts: B lists of token ids between the visual tokens and the caption.
        captions: B captions, truncated to `max_tokens` tokens including the end token.

    Returns:
        `[N, vocab]` float32 logits, `[N]` target token ids and `[N]` row of each target.
    """
    device = lm.model.device
    visual = adapter(vision_tokens.to(device))  # [B, V, d_lm]
    caption_ids = tokenize_captions(lm, captions, prompt.caption_separator, max_tokens)
    n_before, n_visual = len(prompt.before_image), visual.shape[1]
    rows = [list(prompt.before_image) + [prompt.end_id] * n_visual + context + ids + [prompt.end_id]
            for context, ids in zip(contexts, caption_ids)]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), prompt.end_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for index, (row, ids) in enumerate(zip(rows, caption_ids)):
        input_ids[index, : len(row)] = torch.tensor(row)
        attention_mask[index, : len(row)] = 1
        labels[index, len(row) - len(ids) - 1 : len(row)] = input_ids[index, len(row) - len(ids) - 1 : len(row)]
    embeds = lm.embed(input_ids.to(device))  # [B, L, d_lm]
    embeds = torch.cat([embeds[:, :n_before], visual.to(embeds.dtype), embeds[:, n_before + n_visual :]], dim=1)
    hidden = lm.model.model(inputs_embeds=embeds, attention_mask=attention_mask.to(device)).last_hidden_state  # [B, L, d_lm]
    targets = labels[:, 1:].to(device)  # position t predicts token t + 1
    predicting = targets != IGNORE_INDEX  # [B, L-1]
    logits = lm.model.lm_head(hidden[:, :-1][predicting]).float()  # [N, vocab]
    return logits, targets[predicting], predicting.nonzero()[:, 0]


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the log-probability of each target token: `[N, vocab]`, `[N]` -> `[N]`."""
    return logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def generate_after_context(
    lm: LanguageModel, visual_tokens: torch.Tensor, contexts: list[list[int]], prompt: PromptTemplate, max_new_tokens: int,
    *, sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
) -> list[str]:
    """Decode one caption per row after `before_image [visual tokens] context`, greedily or by sampling.

    Rows are left-padded to one length; generate derives position ids from the attention
    mask, so padding does not shift the positions of a row. Sampling is seeded inside
    `torch.random.fork_rng`, leaving the caller's random state unchanged.

    Args:
        visual_tokens: `[B, V, D]` adapter outputs, one row per caption.
        contexts: B lists of token ids after the visual tokens.
    """
    device, dtype = lm.model.device, lm.model.dtype
    before = lm.embed(torch.tensor([list(prompt.before_image)], dtype=torch.long, device=device))[0]  # [n_before, D]
    pad = lm.embed(torch.tensor([prompt.end_id], device=device))[0]  # [D]
    captions: list[str] = []
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {"do_sample": False}
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        for start in progress(range(0, len(contexts), batch_size), "decoding captions", "batch"):
            pieces = []
            for row in range(start, min(start + batch_size, len(contexts))):
                context = lm.embed(torch.tensor(contexts[row], dtype=torch.long, device=device).reshape(-1))  # [c, D]
                pieces.append(torch.cat([before, visual_tokens[row].to(device=device, dtype=dtype), context]))
            length = max(piece.shape[0] for piece in pieces)
            embeds = pad.expand(len(pieces), length, -1).clone()  # [b, L, D], left padding
            attention_mask = torch.zeros((len(pieces), length), dtype=torch.long, device=device)
            for index, piece in enumerate(pieces):
                embeds[index, length - piece.shape[0] :] = piece
                attention_mask[index, length - piece.shape[0] :] = 1
            output = lm.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                       eos_token_id=prompt.end_id, pad_token_id=prompt.end_id, **options)
            captions.extend(first_line(text) for text in lm.tokenizer.batch_decode(output, skip_special_tokens=True))
    return captions


def first_line(text: str) -> str:
    """Return a decoded caption's first non-empty line, stripped.

    A caption is one line, so the text an LM goes on to write after a line break (a second
    description, a dialogue) is dropped. Training then scores the end token right after
    the first line, which teaches the adapter to stop there.
    """
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# Training on one iteration's attempts.

@dataclass
class Attempts:
    """The pairs of attempts of one iteration, flattened image-major (the n attempts of an image are adjacent)."""

    images: list[int]  # index into the iteration's images, per pair
    contexts1: list[list[int]]
    captions1: list[str]
    contexts2: list[list[int]]
    captions2: list[str]


def _attempt_terms(
    lm: LanguageModel, policy: Adapter, reference: Adapter, vision_tokens: torch.Tensor, contexts: list[list[int]],
    captions: list[str], prompt: PromptTemplate, max_tokens: int, with_kl: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `[b]` log pi(caption | context) and `[b]` exact KL to `reference` (zeros unless `with_kl`)."""
    logits, targets, rows = caption_token_logits(lm, policy, vision_tokens, contexts, captions, prompt, max_tokens)
    logps = per_sequence(token_logps(logits, targets), rows, len(captions))
    if not with_kl:
        return logps, torch.zeros_like(logps)
    with torch.no_grad():
        reference_logits = caption_token_logits(lm, reference, vision_tokens, contexts, captions, prompt, max_tokens)[0]
    return logps, per_sequence(token_kl(logits, reference_logits), rows, len(captions))


def train_on_attempts(
    lm: LanguageModel, policy: Adapter, reference: Adapter, vision_tokens: torch.Tensor, attempts: Attempts,
    advantages1: torch.Tensor, advantages2: torch.Tensor, stage: int, prompt: PromptTemplate, max_tokens: int,
    options: SelfCorrectingOptions, seed: int,
) -> dict[str, float]:
    """Train `policy` in place for `options.epochs` epochs with AdamW on the stage's loss.

    Args:
        vision_tokens: `[P, T, d_vision]` encoder outputs of each pair's image.
        advantages1: `[P]` attempt 1 advantages (used in stage II).
        advantages2: `[P]` attempt 2 advantages.
        stage: 1 or 2.

    Returns:
        Mean loss of the first and last epoch, and the last epoch's mean KL per attempt.
    """
    n_pairs = len(attempts.captions1)
    policy.eval()  # adapter dropout off, matching the reference
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    kl_means: dict[str, float] = {}
    steps, skipped = 0, 0
    for epoch in range(options.epochs):
        total, kl_totals = 0.0, {"kl_t1": 0.0, "kl_t2": 0.0}
        for batch in torch.randperm(n_pairs, generator=generator).split(options.batch_size):
            rows, tokens = batch.tolist(), vision_tokens[batch]
            first = [[attempts.contexts1[i] for i in rows], [attempts.captions1[i] for i in rows]]
            second = [[attempts.contexts2[i] for i in rows], [attempts.captions2[i] for i in rows]]
            logps1, kl1 = _attempt_terms(lm, policy, reference, tokens, *first, prompt, max_tokens, with_kl=True)
            logps2, kl2 = _attempt_terms(lm, policy, reference, tokens, *second, prompt, max_tokens, with_kl=stage == 2)
            if stage == 1:
                losses = stage_one_loss(logps2, advantages2[batch], kl1, options.beta2)
            else:
                losses = stage_two_loss(logps1, advantages1[batch], logps2, advantages2[batch], kl1 + kl2, options.beta1)
            signal = (advantages2[batch] != 0).any() or (stage == 2 and (advantages1[batch] != 0).any())
            if not signal and float(kl1.detach().sum() + kl2.detach().sum()) == 0.0:
                # The policy still equals M0 and no pair carries a reward signal, so the gradient is zero up to
                # rounding. Adam would scale that rounding noise into a full step, so the step is skipped.
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            if options.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), options.max_grad_norm)
            optimizer.step()
            steps += 1
            total += float(losses.detach().sum())
            kl_totals["kl_t1"] += float(kl1.detach().sum())
            kl_totals["kl_t2"] += float(kl2.detach().sum())
        if not math.isfinite(total):
            raise FloatingPointError(f"self-correcting loss became {total}; lower lr ({options.lr}) or alpha ({options.alpha})")
        epoch_losses.append(total / n_pairs)
        kl_means = {key: value / n_pairs for key, value in kl_totals.items()}
        logger.info("self-correcting stage %d epoch %d/%d: loss %.4f, KL t1 %.4f", stage, epoch + 1, options.epochs,
                    epoch_losses[-1], kl_means["kl_t1"])
    return {"loss_first_epoch": epoch_losses[0], "loss_last_epoch": epoch_losses[-1], "optimizer_steps": float(steps),
            "skipped_steps": float(skipped), **kl_means}


# The treatment.



def _mean_words(captions: list[str]) -> float:
    return float(np.mean([len(caption.split()) for caption in captions])) if captions else math.nan


def _mean_score(scores: list[float | None]) -> float:
    scored = [score for score in scores if score is not None]
    return float(np.mean(scored)) if scored else math.nan


@dataclass
class _Setup:
    """The state every iteration shares: run, options, verifier, prompts, reference adapter and evaluation images."""

    run: Any
    options: SelfCorrectingOptions
    source: RewardSource
    threshold: float
    correction: CorrectionPrompt
    reference: Adapter
    eval_rows: list[int]
    max_tokens: int
    seed: int


def _attempt_pair(setup: _Setup, adapter: Adapter, rows: list[int], seed: int) -> tuple[list[str], list[str]]:
    """Decode attempt 1 and attempt 2 greedily for each image row."""
    run, options, correction = setup.run, setup.options, setup.correction
    with torch.no_grad():
        visual = adapter.eval()(run.tokens[rows].to(run.lm.model.device))  # [k, V, d_lm]
    decode = dict(batch_size=options.generate_batch_size, seed=seed)
    first = generate_after_context(run.lm, visual, [correction.first_context()] * len(rows), correction.prompt,
                                   options.max_new_tokens, **decode)
    first_ids = tokenize_captions(run.lm, first, correction.prompt.caption_separator, setup.max_tokens)
    second = generate_after_context(run.lm, visual, [correction.second_context(ids) for ids in first_ids], correction.prompt,
                                    options.max_new_tokens, **decode)
    return first, second


def evaluate_correction(setup: _Setup, adapter: Adapter, seed: int) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Caption the evaluation images greedily with two attempts and score both with the verifier.

    Returns:
        Acc@t1, Acc@t2, delta, the transitions, mean scores and caption lengths, and samples.
    """
    rows = setup.eval_rows
    references = [setup.run.dataset.items[row].caption for row in rows]
    first, second = _attempt_pair(setup, adapter, rows, seed)
    scores = setup.source.score(first + second, references + references, seed)
    scores1, scores2 = scores[: len(rows)], scores[len(rows) :]
    metrics = correction_metrics(verdicts(scores1, setup.threshold), verdicts(scores2, setup.threshold))
    metrics.update({
        "mean_score_t1": _mean_score(scores1), "mean_score_t2": _mean_score(scores2),
        "mean_words_t1": _mean_words(first), "mean_words_t2": _mean_words(second),
        "identical_attempts": float(np.mean([a == b for a, b in zip(first, second)])),
        "unscored_eval_captions": float(sum(score is None for score in scores)),
    })
    samples = [{"reference": reference, "caption": f"t1: {a} | t2: {b}"}
               for reference, a, b in list(zip(references, first, second))[:N_SAMPLE_CAPTIONS]]
    return metrics, samples


def _run_iteration(
    setup: _Setup, policy: Adapter, stage: int, iteration_seed: int
) -> tuple[Adapter, dict[str, float], dict[str, float], list[dict[str, Any]], list[dict[str, str]]]:
    """Sample both attempts, score them, train a copy of `policy`, and measure it.

    Returns:
        The trained adapter, its metrics, the cost, the scored training attempts and greedy samples.
    """
    started = time.perf_counter()
    run, options, correction = setup.run, setup.options, setup.correction
    lm, n = run.lm, options.samples_per_image
    n_images = min(options.images_per_iteration or len(run.train_rows), len(run.train_rows))
    rows = sorted(random.Random(iteration_seed).sample(list(run.train_rows), n_images))
    references = [run.dataset.items[row].caption for row in rows]

    # 1. Attempt 1: n samples per image from the current adapter.
    with torch.no_grad():
        visual = policy.eval()(run.tokens[rows].to(lm.model.device))  # [k, V, d_lm]
    grouped = sample_captions(lm, visual, correction.prompt, n, options.temperature, options.top_p, options.max_new_tokens, iteration_seed)
    captions1 = [first_line(caption) for group in grouped for caption in group]
    images = [image for image in range(n_images) for _ in range(n)]
    # 2. Attempt 2: one sample after each attempt 1 and the correction instruction.
    first_ids = tokenize_captions(lm, captions1, correction.prompt.caption_separator, setup.max_tokens)
    contexts2 = [correction.second_context(ids) for ids in first_ids]
    captions2 = generate_after_context(lm, visual[images], contexts2, correction.prompt, options.max_new_tokens, sample=True,
                                       temperature=options.temperature, top_p=options.top_p, seed=iteration_seed + 1,
                                       batch_size=options.generate_batch_size)
    sampled = time.perf_counter()

    # 3. Verify both attempts.
    pair_references = [references[image] for image in images]
    scores = setup.source.score(captions1 + captions2, pair_references + pair_references, iteration_seed + 2)
    scores1, scores2 = scores[: len(images)], scores[len(images) :]
    correct1, correct2 = verdicts(scores1, setup.threshold), verdicts(scores2, setup.threshold)
    if options.binary_reward:
        rewards1, rewards2 = correct1.float(), correct2.float()
    else:
        rewards1, rewards2 = (torch.tensor([0.0 if s is None else s for s in part]) for part in (scores1, scores2))
    scored = time.perf_counter()

    # 4. Advantages against the group mean, then train a copy of the policy.
    train_rewards2 = rewards2 if stage == 1 else shaped_reward(rewards1, rewards2, options.alpha)
    advantages1 = group_advantages(rewards1.reshape(n_images, n)).reshape(-1)
    advantages2 = group_advantages(train_rewards2.reshape(n_images, n)).reshape(-1)
    attempts = Attempts(images, [correction.first_context()] * len(images), captions1, contexts2, captions2)
    updated = copy.deepcopy(policy).requires_grad_(True)
    metrics = {f"train_{key}": value for key, value in correction_metrics(correct1, correct2).items()}
    metrics.update({
        "stage": float(stage), "n_images": float(n_images), "n_pairs": float(len(images)),
        "mean_reward_t1": float(rewards1.mean()), "mean_reward_t2": float(rewards2.mean()),
        "mean_train_reward_t2": float(train_rewards2.mean()),
        "zero_advantage_pairs": float((advantages2 == 0).sum()),
        "unscored_attempts": float(sum(score is None for score in scores)),
        "train_mean_words_t1": _mean_words(captions1), "train_mean_words_t2": _mean_words(captions2),
    })
    metrics.update(train_on_attempts(lm, updated, setup.reference, run.tokens[[rows[i] for i in images]], attempts, advantages1,
                                     advantages2, stage, correction.prompt, setup.max_tokens, options, iteration_seed + 3))
    updated.eval().requires_grad_(False)
    trained = time.perf_counter()

    # 5. Measure the trained adapter on the fixed evaluation images.
    evaluation, samples = evaluate_correction(setup, updated, setup.seed)
    metrics.update(evaluation)
    cost = {"samples_generated": float(2 * len(images) + 2 * len(setup.eval_rows)), "sampling_seconds": sampled - started,
            "verifier_seconds": scored - sampled, "training_seconds": trained - scored,
            "evaluation_seconds": time.perf_counter() - trained, "wall_seconds": time.perf_counter() - started}
    records = [{"reference": pair_references[i], "attempt1": captions1[i], "attempt2": captions2[i], "score1": scores1[i],
                "score2": scores2[i], "advantage1": float(advantages1[i]), "advantage2": float(advantages2[i])} for i in range(len(images))]
    logger.info("self-correcting stage %d: train Acc@t1 %.3f, Acc@t2 %.3f; eval Acc@t1 %.3f, Acc@t2 %.3f (delta %+.3f)", stage,
                metrics["train_acc@t1"], metrics["train_acc@t2"], metrics["acc@t1"], metrics["acc@t2"], metrics["delta"])
    return updated, metrics, cost, records, samples


@register_treatment
class SelfCorrecting(Treatment):
    """Two-stage self-correction training of the adapter; see the module docstring.

    Options come from `context.options` (`SelfCorrectingOptions`). Each iteration writes
    `S<stage>-<i>/` (adapter checkpoint, `self_correcting.json` with metrics, cost and
    samples, and `attempts.jsonl` with the scored training attempts) in one atomic rename.
    On a rerun with the same options, finished iterations are read back, not run again.
    """

    name = "self-correcting"

    def apply(self, checkpoint: Path, context: TreatmentContext) -> list[TreatedCheckpoint]:
        """Run stage I then stage II from `checkpoint` (M0) and return the treated checkpoints in order.

        Raises:
            ValueError: for invalid options, or existing results made with other options.
        """
        options = parse_options(context.options)
        run = context.run
        seed = options.seed if options.seed is not None else context.seed
        start, _ = load_checkpoint(Path(checkpoint), expect_vision=run.encoder.describe(), expect_lm=describe_lm(run.lm))
        start.eval().requires_grad_(False)
        # Raising stage2_iterations extends a finished treatment. Stage I's length changes what stage II starts from,
        # so it is part of stage II's fingerprint.
        base = stable_hash([options.model_dump(exclude={"stage1_iterations", "stage2_iterations"}), str(Path(checkpoint).resolve()), seed])
        fingerprints = {1: base, 2: stable_hash([base, options.stage1_iterations])}
        plan = [(1, i) for i in range(1, options.stage1_iterations + 1)] + [(2, i) for i in range(1, options.stage2_iterations + 1)]

        setup: _Setup | None = None
        start_metrics: dict[str, float] = {}
        policy, treated = start, []
        for position, (stage, index) in enumerate(plan, start=1):
            label = f"S{stage}-{index}"
            directory = context.output_dir / label
            if (directory / METRICS_NAME).is_file() and (directory / CONFIG_NAME).is_file():
                record = json.loads((directory / METRICS_NAME).read_text(encoding="utf-8"))
                if record.get("fingerprint") != fingerprints[stage]:
                    raise ValueError(f"{directory} was made from another checkpoint, seed or options; "
                                     "delete the treatment directory or use another output directory")
                policy, _ = load_checkpoint(directory)
                policy.eval().requires_grad_(False)
                treated.append(self._treated(label, directory, record))
                logger.info("self-correcting %s: found at %s; not run again", label, directory)
                continue

            if setup is None:
                setup = self._setup(run, options, start, seed)
                start_metrics, _ = evaluate_correction(setup, start, seed)
                logger.info("self-correcting M0: Acc@t1 %.3f, Acc@t2 %.3f", start_metrics["acc@t1"], start_metrics["acc@t2"])
            updated, metrics, cost, attempts, samples = _run_iteration(setup, policy, stage, seed * 1000 + position)
            metrics.update({f"{key}_start": value for key, value in start_metrics.items() if key.startswith(("acc@", "delta"))})
            record = {"iteration": label, "fingerprint": fingerprints[stage], "metrics": json_ready(metrics),
                      "cost": cost, "samples": samples}
            metadata = {**run.checkpoint_metadata(),
                        "treatment": {"name": self.name, "iteration": label, "source": str(checkpoint),
                                      "options": options.model_dump(), "fingerprint": fingerprints[stage]}}

            def write_records(staging: Path, record=record, attempts=attempts) -> None:
                (staging / METRICS_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
                (staging / ATTEMPTS_NAME).write_text("".join(json.dumps(item) + "\n" for item in attempts), encoding="utf-8")

            save_checkpoint(updated, directory, metadata, write_extra=write_records)
            policy = updated
            treated.append(self._treated(label, directory, record))
        return treated

    @staticmethod
    def _setup(run, options: SelfCorrectingOptions, start: Adapter, seed: int) -> _Setup:
        source = REWARD_SOURCES[options.reward_source](run.lm, options)
        threshold = options.threshold if options.threshold is not None else source.default_threshold
        adapter_config = run.config.adapter
        correction = build_correction_prompt(run.lm, run.prompt, adapter_config.prompt_style, options.correction_instruction,
                                             adapter_config.chat_instruction)
        n_eval = min(options.eval_images, len(run.val_rows))
        eval_rows = sorted(random.Random(seed).sample(list(run.val_rows), n_eval))
        return _Setup(run, options, source, threshold, correction, start, eval_rows, run.config.train.max_caption_tokens, seed)

    def _treated(self, label: str, directory: Path, record: dict[str, Any]) -> TreatedCheckpoint:
        return TreatedCheckpoint(name=f"{self.name}/{label}", directory=directory, metrics=from_json(record["metrics"]),
                                 samples=record.get("samples", []), cost=record["cost"])
