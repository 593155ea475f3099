"""Self-rewarding preference training of the adapter, with the frozen LM as caption judge.

Adapted from Yuan et al. 2024, "Self-Rewarding Language Models" (arXiv 2401.10020). The
prompts are images, the responses are captions and only the adapter trains. Iteration i:

1. Sample `n_samples` captions per image from adapter M(i-1) and the LM, token by token
   (`loops/sampling.py`), or byte by byte through the exact byte-level LM with
   `sampler: bytelevel` (`loops/bytelevel_treatment.py`).
2. Score every caption with the judge LM on the additive 5-point prompt, averaging
   `judge_samples` judgements (`loops/judge.py`). The judge is text-only and reads the
   image's reference caption in place of the image.
3. Pair the highest- and the lowest-scored caption of each image. Images whose scores tie
   give no pair, and an iteration without pairs is recorded and skipped.
4. Train a copy of M(i-1) on the pairs with a preference loss from `loops/losses.py`
   (default DPO); the reference policy is the starting adapter M0 unless
   `reference: previous`. The result, M(i), is saved to `<output_dir>/M<i>/`.

Two differences from the paper follow from the frozen, text-only LM: the judge never
improves, and the judge reads a reference caption in place of the image. Judge quality is measured each iteration as
the correlation between judge scores and the all-MiniLM-L6-v2 cosine similarity of each
caption to the reference caption.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmalign.adapters.base import Adapter
from mmalign.adapters.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
from mmalign.adapters.compose import IGNORE_INDEX, PromptTemplate, compose, generate_captions
from mmalign.adapters.train import validation_loss
from mmalign.io import stable_hash, write_atomic
from mmalign.lm import LanguageModel, describe_lm, load_lm
from mmalign.loops.base import TreatedCheckpoint, Treatment, TreatmentContext, register_treatment, validate_options
from mmalign.loops.bytelevel_ensemble import ByteModelConfig
from mmalign.loops.judge import CaptionJudge, judge_agreement
from mmalign.loops.losses import PREFERENCE_LOSSES, get_preference_loss, preference_reward_stats
from mmalign.loops.sampling import sample_captions
from mmalign.sentence_encoder import SentenceEncoder

logger = logging.getLogger("mmalign.loops")

METRICS_NAME = "self_rewarding.json"
PAIRS_NAME = "pairs.jsonl"
N_SAMPLE_CAPTIONS = 8  # validation images captioned greedily by each treated checkpoint


class SelfRewardingOptions(BaseModel):
    """Settings of the self-rewarding treatment, read from the config's `treatment:` mapping.

    Five defaults are the values of Yuan et al. 2024: 3 iterations, 4 samples, temperature
    0.7, top-p 0.9 and 3 judge samples. The others are sized for a 135M LM.
    """

    model_config = ConfigDict(extra="forbid")

    iterations: int = Field(3, ge=1, description="Treated checkpoints M1..Mk to train.")
    n_samples: int = Field(4, ge=2, description="Captions sampled per image.")
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature of captions and of judgements.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus (top-p) mass of captions and of judgements.")
    max_new_tokens: int = Field(24, ge=1, description="Caption length cap in tokens.")
    judge_samples: int = Field(3, ge=1, description="Judgements averaged per caption.")
    judge_lm: str | None = Field(None, description="Judge LM spec (see mmalign.lm.load_lm); null uses the run's LM.")
    judge_max_new_tokens: int = Field(64, ge=1, description="Length cap of each judgement in tokens.")
    judge_response_prefix: str = Field("", description="Text that opens the judge's turn, e.g. 'Score:' for the score alone.")
    judge_batch_size: int = Field(8, ge=1, description="Captions per judge generate call.")
    loss: str = Field("dpo", description="Preference loss name from mmalign.loops.losses.")
    beta: float = Field(0.1, gt=0.0, description="Scale of the log-ratio margin in the preference loss.")
    reference: Literal["start", "previous"] = Field("start", description="Reference policy: the starting adapter M0, or M(i-1).")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate.")
    epochs: int = Field(2, ge=1, description="Passes over the pairs of one iteration.")
    batch_size: int = Field(8, ge=1, description="Pairs per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping by global norm; null disables it.")
    images_per_iteration: int | None = Field(64, ge=1, description="Training images sampled per iteration; null uses all.")
    seed: int | None = Field(None, description="Seed of the treatment; null uses the treatment context's seed.")
    sampler: Literal["token", "bytelevel"] = Field(
        "token", description="token: the LM's generate; bytelevel: byte by byte through the exact byte-level LM (slower)."
    )
    max_new_bytes: int = Field(96, ge=1, description="bytelevel sampler: caption length cap in bytes.")
    byte_model: ByteModelConfig = Field(
        default_factory=ByteModelConfig, description="bytelevel sampler: the run's LM alone, an ensemble or proxy-tuning."
    )

    @field_validator("loss")
    @classmethod
    def _check_loss(cls, loss: str) -> str:
        if loss not in PREFERENCE_LOSSES:
            raise ValueError(f"preference loss {loss!r} not supported; accepted names: {sorted(PREFERENCE_LOSSES)}")
        return loss


def caption_logprobs(
    lm: LanguageModel, adapter: Adapter, vision_tokens: torch.Tensor, captions: list[str], prompt: PromptTemplate, max_tokens: int
) -> torch.Tensor:
    """Return the log-probability of each caption and its end token given its image.

    Gradients flow into the adapter. The log-softmax runs only at the positions that predict
    a caption or end token, like `mmalign.capture.caption_loss`, so for one caption the result
    equals minus that loss.

    Args:
        vision_tokens: `[B, T, d_vision]` encoder outputs, one row per caption.
        captions: B captions, truncated to `max_tokens` tokens including the end token.

    Returns:
        `[B]` float32 summed token log-probabilities.
    """
    visual = adapter(vision_tokens.to(lm.model.device))  # [B, V, d_lm]
    batch = compose(lm, captions, prompt, max_tokens, visual)
    hidden = lm.model.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).last_hidden_state  # [B, L, d_lm]
    targets = batch.labels[:, 1:]  # position t predicts token t + 1
    predicting = targets != IGNORE_INDEX  # [B, L-1]
    logits = lm.model.lm_head(hidden[:, :-1][predicting]).float()  # [N, vocab]
    token_logps = logits.log_softmax(dim=-1).gather(-1, targets[predicting].unsqueeze(-1)).squeeze(-1)  # [N]
    rows = predicting.nonzero()[:, 0]  # [N] row of each predicted token
    return torch.zeros(len(captions), dtype=token_logps.dtype, device=token_logps.device).index_add(0, rows, token_logps)


@dataclass(frozen=True)
class PreferencePair:
    """The highest- and lowest-scored caption of one image, by index into its samples."""

    image: int
    chosen: int
    rejected: int


def select_pairs(scores: list[list[float | None]]) -> tuple[list[PreferencePair], int]:
    """Pair each image's highest-scored caption with its lowest-scored one.

    Unscored captions (every judgement failed to parse) are left out. An image gives no pair
    when fewer than two captions are scored or all scored captions tie. Among equal maxima or
    minima the first caption is taken.

    Returns:
        The pairs, and the number of images that gave none.
    """
    pairs = []
    for image, image_scores in enumerate(scores):
        scored = [(score, index) for index, score in enumerate(image_scores) if score is not None]
        if len(scored) < 2:
            continue
        high = max(scored, key=lambda item: (item[0], -item[1]))
        low = min(scored, key=lambda item: (item[0], item[1]))
        if high[0] > low[0]:
            pairs.append(PreferencePair(image, high[1], low[1]))
    return pairs, len(scores) - len(pairs)


def train_on_pairs(
    lm: LanguageModel, policy: Adapter, reference: Adapter, vision_tokens: torch.Tensor, chosen: list[str], rejected: list[str],
    prompt: PromptTemplate, max_tokens: int, options: SelfRewardingOptions, seed: int,
) -> dict[str, float]:
    """Train `policy` in place on preference pairs for `options.epochs` epochs with AdamW.

    Args:
        vision_tokens: `[P, T, d_vision]` encoder outputs of each pair's image.
        chosen: P preferred captions.
        rejected: P dispreferred captions.

    Returns:
        Mean loss of the first and of the last epoch, and last-epoch implicit-reward statistics.
    """
    loss_fn = get_preference_loss(options.loss, beta=options.beta)
    n_pairs = len(chosen)
    with torch.no_grad():  # [P] reference log-probabilities, fixed for the iteration
        reference_chosen = caption_logprobs(lm, reference, vision_tokens, chosen, prompt, max_tokens)
        reference_rejected = caption_logprobs(lm, reference, vision_tokens, rejected, prompt, max_tokens)

    # NOTE: the policy stays in eval mode, so adapter dropout is off and matches the reference.
    policy.eval()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=options.lr)
    generator = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    reward_stats: dict[str, float] = {}
    for epoch in range(options.epochs):
        total, epoch_logps = 0.0, []
        for batch in torch.randperm(n_pairs, generator=generator).split(options.batch_size):
            rows = batch.tolist()
            tokens = vision_tokens[rows]
            logps = caption_logprobs(
                lm, policy, torch.cat([tokens, tokens]), [chosen[i] for i in rows] + [rejected[i] for i in rows], prompt, max_tokens
            )  # [2b]: chosen rows, then rejected rows
            policy_chosen, policy_rejected = logps[: len(rows)], logps[len(rows) :]
            losses = loss_fn(policy_chosen, policy_rejected, reference_chosen[batch], reference_rejected[batch])
            optimizer.zero_grad(set_to_none=True)
            losses.mean().backward()
            if options.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), options.max_grad_norm)
            optimizer.step()
            total += float(losses.detach().sum())
            epoch_logps.append((policy_chosen.detach(), policy_rejected.detach(), reference_chosen[batch], reference_rejected[batch]))
        if not math.isfinite(total):
            raise FloatingPointError(f"preference loss {options.loss!r} became {total}; lower lr ({options.lr}) or beta ({options.beta})")
        epoch_losses.append(total / n_pairs)
        reward_stats = preference_reward_stats(*(torch.cat(parts) for parts in zip(*epoch_logps)), beta=options.beta)
        logger.info("preference epoch %d/%d: loss %.4f", epoch + 1, options.epochs, epoch_losses[-1])
    return {"preference_loss_first_epoch": epoch_losses[0], "preference_loss_last_epoch": epoch_losses[-1], **reward_stats}


# Options that only the byte-level sampler reads; with `sampler: token` they stay out of the
# fingerprint, so treatments made before these options existed still resume.
BYTELEVEL_SAMPLER_OPTIONS = {"sampler", "max_new_bytes", "byte_model"}


def parse_options(
    options: dict[str, Any], model: type[SelfRewardingOptions] = SelfRewardingOptions, treatment: str = "self-rewarding"
) -> SelfRewardingOptions:
    """Validate the `treatment:` mapping.

    Raises:
        ValueError: naming each invalid or unknown field and its value.
    """
    return validate_options(model, options, treatment)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def read_record(path: Path, fingerprint: str) -> dict[str, Any]:
    """Read an iteration's record and check it was made with the same checkpoint, seed and options.

    Raises:
        ValueError: when the fingerprint differs, naming the file and what to do.
    """
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path} was made from another checkpoint, seed or options; "
            "delete the treatment directory or use another output directory"
        )
    return record


def json_ready(values: dict[str, float]) -> dict[str, float | None]:
    """Replace NaN metric values with None, which JSON can store."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in values.items()}


def from_json(values: dict[str, float | None]) -> dict[str, float]:
    """Turn the None values of a stored record back into NaN."""
    return {key: math.nan if value is None else value for key, value in values.items()}


@dataclass
class _IterationOutcome:
    """Result of one iteration; `adapter` is None when no pair was found and nothing trained."""

    adapter: Adapter | None
    metrics: dict[str, float]
    cost: dict[str, float | str]  # seconds and counts, plus the sampler's name
    pairs: list[dict[str, Any]]


@register_treatment
class SelfRewarding(Treatment):
    """Self-rewarding preference training of the adapter; see the module docstring.

    Options come from `context.options` (`SelfRewardingOptions`). Each iteration writes
    `M<i>/` (adapter checkpoint, `self_rewarding.json` with metrics, cost and samples, and
    `pairs.jsonl` with the judged pairs) in one atomic rename. An iteration without pairs
    writes `M<i>.skipped.json` instead, and the next iteration continues from M(i-1). On a
    rerun, iterations with either record are read back, not run again.
    """

    name = "self-rewarding"
    options_model: type[SelfRewardingOptions] = SelfRewardingOptions

    def apply(self, checkpoint: Path, context: TreatmentContext) -> list[TreatedCheckpoint]:
        """Run the iterations from `checkpoint` (M0) and return the trained checkpoints M1..Mk.

        Raises:
            ValueError: for invalid options, or existing results made with other options.
        """
        options = parse_options(context.options, self.options_model, self.name)
        run, lm = context.run, context.run.lm
        seed = options.seed if options.seed is not None else context.seed
        start, _ = load_checkpoint(Path(checkpoint), expect_vision=run.encoder.describe(), expect_lm=describe_lm(lm))
        start.eval().requires_grad_(False)
        # Raising `iterations` later extends a finished treatment, so it is not part of the fingerprint.
        unused = BYTELEVEL_SAMPLER_OPTIONS if options.sampler == "token" else set()
        fingerprint = stable_hash([options.model_dump(exclude={"iterations", *unused}), str(Path(checkpoint).resolve()), seed])
        judge: CaptionJudge | None = None
        encoder: SentenceEncoder | None = None
        start_loss = math.nan

        policy, treated = start, []
        for iteration in range(1, options.iterations + 1):
            directory = context.output_dir / f"M{iteration}"
            skip_record = context.output_dir / f"M{iteration}.skipped.json"
            if (directory / METRICS_NAME).is_file() and (directory / CONFIG_NAME).is_file():
                record = read_record(directory / METRICS_NAME, fingerprint)
                policy, _ = load_checkpoint(directory)
                policy.eval().requires_grad_(False)
                treated.append(self._treated(iteration, directory, record))
                logger.info("self-rewarding M%d: found at %s; not run again", iteration, directory)
                continue
            if skip_record.is_file():
                read_record(skip_record, fingerprint)
                logger.info("self-rewarding M%d: skipped before (no preference pairs); not run again", iteration)
                continue

            if judge is None:
                judge_lm = lm if options.judge_lm is None else load_lm(options.judge_lm)
                judge = CaptionJudge(
                    judge_lm, options.judge_samples, options.temperature, options.top_p,
                    options.judge_max_new_tokens, options.judge_batch_size, options.judge_response_prefix,
                )
                encoder = SentenceEncoder(device=lm.model.device)
                start_loss = _validation_loss(run, start)
            reference = start if options.reference == "start" else policy
            outcome = _run_iteration(run, policy, reference, judge, encoder, options, iteration, seed)
            outcome.metrics["val_caption_loss_start"] = start_loss
            record = {"iteration": iteration, "fingerprint": fingerprint, "metrics": json_ready(outcome.metrics), "cost": outcome.cost}
            if outcome.adapter is None:
                logger.warning("self-rewarding M%d: every image's captions tied or were unscored; iteration skipped", iteration)
                write_atomic(skip_record, json.dumps({**record, "skipped": "no preference pairs"}, indent=2))
                continue

            record["samples"] = greedy_samples(run, outcome.adapter)
            self.add_records(run, outcome.adapter, options, seed * 1000 + iteration, record)
            metadata = {
                **run.checkpoint_metadata(),
                "treatment": {"name": self.name, "iteration": iteration, "source": str(checkpoint),
                              "options": options.model_dump(), "fingerprint": fingerprint},
            }

            def write_records(staging: Path, record=record, pairs=outcome.pairs) -> None:
                (staging / METRICS_NAME).write_text(json.dumps(record, indent=2), encoding="utf-8")
                (staging / PAIRS_NAME).write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")

            save_checkpoint(outcome.adapter, directory, metadata, write_extra=write_records)
            policy = outcome.adapter
            treated.append(self._treated(iteration, directory, record))
        return treated

    def add_records(self, run, adapter: Adapter, options: SelfRewardingOptions, seed: int, record: dict[str, Any]) -> None:
        """Add a subclass's own measurements of a trained checkpoint to its record before it is written."""

    def _treated(self, iteration: int, directory: Path, record: dict[str, Any]) -> TreatedCheckpoint:
        return TreatedCheckpoint(
            name=f"{self.name}/M{iteration}", directory=directory, metrics=from_json(record["metrics"]),
            samples=record.get("samples", []), cost=record["cost"],
        )


def _validation_loss(run, adapter: Adapter) -> float:
    """Return the adapter's mean caption cross-entropy on the validation split, in nats per token."""
    config = run.config
    return validation_loss(
        run.lm, adapter, run.tokens[run.val_rows], run.val_captions, run.prompt, config.train.max_caption_tokens, config.eval.batch_size
    )


def greedy_samples(run, adapter: Adapter) -> list[dict[str, str]]:
    """Caption the first validation images greedily with the treated adapter."""
    rows = run.val_rows[:N_SAMPLE_CAPTIONS]
    with torch.no_grad():
        visual = adapter(run.tokens[rows].to(run.lm.model.device))  # [n, V, d_lm]
    captions = generate_captions(run.lm, visual, run.prompt)
    return [{"reference": run.dataset.items[row].caption, "caption": caption} for row, caption in zip(rows, captions)]


def _run_iteration(
    run, policy: Adapter, reference: Adapter, judge: CaptionJudge, encoder: SentenceEncoder,
    options: SelfRewardingOptions, iteration: int, seed: int,
) -> _IterationOutcome:
    """Sample, judge, pair and train once; returns the trained copy of `policy` with the metrics."""
    started = time.perf_counter()
    lm, prompt, max_tokens = run.lm, run.prompt, run.config.train.max_caption_tokens
    iteration_seed = seed * 1000 + iteration
    n_images = min(options.images_per_iteration or len(run.train_rows), len(run.train_rows))
    rows = sorted(random.Random(iteration_seed).sample(list(run.train_rows), n_images))
    references = [run.dataset.items[row].caption for row in rows]
    vision_tokens = run.tokens[rows]  # [k, T, d_vision]

    # 1. Sample captions from M(i-1).
    with torch.no_grad():
        visual = policy.eval()(vision_tokens.to(lm.model.device))  # [k, V, d_lm]
    if options.sampler == "bytelevel":
        # Imported here because that module subclasses this one's treatment.
        from mmalign.loops.bytelevel_treatment import sample_for_iteration

        captions, sampler_metrics, sampler_cost = sample_for_iteration(run, visual, options, iteration_seed)
    else:
        captions = sample_captions(lm, visual, prompt, options.n_samples, options.temperature, options.top_p,
                                   options.max_new_tokens, iteration_seed)
        sampler_metrics, sampler_cost = {}, {}
    flat_captions = [caption for group in captions for caption in group]
    flat_references = [reference_caption for reference_caption, group in zip(references, captions) for _ in group]
    sampled = time.perf_counter()

    # 2. Judge them, and measure each caption's similarity to its reference.
    judged = judge.score(flat_references, flat_captions, iteration_seed + 1)
    judged_at = time.perf_counter()
    similarities = encoder.similarity(flat_captions, flat_references).tolist()
    n = options.n_samples
    score_grid = [judged.scores[image * n : (image + 1) * n] for image in range(n_images)]
    scored = [score for score in judged.scores if score is not None]

    # 3. Pair best and worst caption per image; identical texts give no training signal.
    pairs, n_without_pair = select_pairs(score_grid)
    identical = [pair for pair in pairs if captions[pair.image][pair.chosen] == captions[pair.image][pair.rejected]]
    pairs = [pair for pair in pairs if pair not in identical]
    chosen = [captions[pair.image][pair.chosen] for pair in pairs]
    rejected = [captions[pair.image][pair.rejected] for pair in pairs]

    metrics: dict[str, float] = {
        "iteration": float(iteration),
        "n_images": float(n_images),
        "mean_caption_words": float(np.mean([len(caption.split()) for caption in flat_captions])),
        "empty_captions": float(sum(not caption for caption in flat_captions)),
        "mean_reference_similarity": float(np.mean(similarities)),
        "mean_judge_score": _mean(scored),
        "unscored_captions": float(len(flat_captions) - len(scored)),
        "judge_outputs": float(judged.n_outputs),
        "judge_parse_failures": float(judged.n_failures),
        **{f"judge_parse_failures/{reason}": float(count) for reason, count in sorted(judged.failures.items())},
        **judge_agreement(judged.scores, similarities),
        "n_pairs": float(len(pairs)),
        "n_images_without_pair": float(n_without_pair),
        "n_identical_pairs_dropped": float(len(identical)),
        "chosen_reference_similarity": _mean([similarities[p.image * n + p.chosen] for p in pairs]),
        "rejected_reference_similarity": _mean([similarities[p.image * n + p.rejected] for p in pairs]),
        **sampler_metrics,
    }
    cost = {"sampler": options.sampler, "samples_generated": float(len(flat_captions)), "judge_generations": float(judged.n_outputs),
            "sampling_seconds": sampled - started, "judge_seconds": judged_at - sampled, **sampler_cost}
    logger.info(
        "self-rewarding M%d: %d pairs from %d images; judge agreement pearson %.3f, spearman %.3f; %d parse failures",
        iteration, len(pairs), n_images, metrics["judge_pearson"], metrics["judge_spearman"], judged.n_failures,
    )
    pair_records = [
        {"reference": references[p.image], "chosen": chosen[k], "rejected": rejected[k],
         "chosen_score": judged.scores[p.image * n + p.chosen], "rejected_score": judged.scores[p.image * n + p.rejected]}
        for k, p in enumerate(pairs)
    ]
    if not pairs:
        cost["wall_seconds"] = time.perf_counter() - started
        return _IterationOutcome(None, metrics, cost, pair_records)

    # 4. Preference-train a copy of M(i-1) into M(i).
    trained_from = time.perf_counter()
    updated = copy.deepcopy(policy).requires_grad_(True)
    pair_tokens = vision_tokens[[pair.image for pair in pairs]]  # [P, T, d_vision]
    metrics.update(train_on_pairs(lm, updated, reference, pair_tokens, chosen, rejected, prompt, max_tokens, options, iteration_seed + 2))
    updated.eval().requires_grad_(False)
    cost["training_seconds"] = time.perf_counter() - trained_from
    metrics["val_caption_loss"] = _validation_loss(run, updated)
    cost["wall_seconds"] = time.perf_counter() - started
    return _IterationOutcome(updated, metrics, cost, pair_records)
