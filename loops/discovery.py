"""Discovery of preference losses by a proposer and short adapter trainings (treatment "loss-discovery").

After Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
Language Models" (arXiv 2406.08414). Each round:

1. a proposer (:mod:`mmalign.loops.proposers`) writes candidate losses as JSON
   ``{"thought", "name", "code"}``, seeing the archive of earlier candidates with their
   fitness or error;
2. each candidate is parsed, checked statically and validated in the sandbox worker, and its
   runtime is measured there on fixed tensors;
3. a valid candidate trains a copy of the starting adapter for a few steps on preference
   pairs, with the loss and its gradients computed in the sandbox worker
   (:func:`mmalign.loops.sandbox.evaluate_in_sandbox`), so proposal code never runs in this
   process;
4. the fitness weights caption loss and pair alignment metrics of the trained adapter;
5. the archive, with every outcome and the round's valid rate and failure counts, is
   written to ``archive.json``, so a rerun resumes after the last finished round.

Preference pairs come from training images: the chosen caption is the reference caption and
the rejected one another image's caption or one decoded from the starting adapter. The
fitness is measured on other training images, held out from the pairs, so the validation
split stays unseen until `mmalign treat` evaluates the returned checkpoints.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import random
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mmalign.adapters.base import Adapter
from mmalign.adapters.checkpoint import CONFIG_NAME, load_checkpoint, save_checkpoint
from mmalign.adapters.compose import generate_captions
from mmalign.evaluate import Evaluator
from mmalign.io import stable_hash, write_atomic
from mmalign.lm import describe_lm, load_lm
from mmalign.loops.base import TreatedCheckpoint, Treatment, TreatmentContext, register_treatment, validate_options
from mmalign.loops.discovery_report import read_archive_tables
from mmalign.loops.losses import PREFERENCE_LOSSES, save_preference_loss
from mmalign.loops.proposers import (
    ArchiveEntry, HTTPProposer, LMProposer, MutationProposer, ProposalParseError, Proposer, extract_proposal,
)
from mmalign.loops.sampling import sample_captions
from mmalign.loops.sandbox import SIGNATURE, Proposal, Sandbox, SandboxError, ValidationResult, evaluate_in_sandbox
from mmalign.loops.self_rewarding import caption_logprobs
from mmalign.pipeline import probe_stage

logger = logging.getLogger("mmalign.loops")

ARCHIVE_NAME = "archive.json"
RUNTIME_BATCH_SIZE = 65_536
PAIR_METRICS = frozenset({
    "cka_linear", "cka_unbiased", "mutual_knn", "cknna", "svcca", "retrieval_i2t_r1", "retrieval_i2t_r5",
    "retrieval_t2i_r1", "retrieval_t2i_r5", "modality_gap", "norm_ratio",
})
FITNESS_METRICS = PAIR_METRICS | {"caption_loss"}


class LossDiscoveryOptions(BaseModel):
    """Settings of the loss-discovery treatment, read from the config's `treatment:` mapping."""

    model_config = ConfigDict(extra="forbid")

    proposer: Literal["mutation", "lm", "http"] = Field("mutation", description="Source of candidate losses.")
    lm_spec: str | None = Field(None, description="LM proposer: LM spec (see mmalign.lm.load_lm); null uses the run's LM.")
    url: str | None = Field(None, description="HTTP proposer: base URL of an OpenAI-compatible server.")
    api_key_env: str | None = Field(None, description="HTTP proposer: environment variable containing the API key.")
    model: str | None = Field(None, description="HTTP proposer: model name sent in each request.")
    timeout_s: float = Field(120.0, gt=0.0, description="HTTP proposer: timeout of each request in seconds.")
    temperature: float = Field(0.8, gt=0.0, description="LM and HTTP proposers: sampling temperature.")
    max_new_tokens: int = Field(384, ge=16, description="LM and HTTP proposers: length cap of each output in tokens.")
    context_entries: int = Field(6, ge=0, description="LM and HTTP proposers: latest archive entries shown.")
    rounds: int = Field(3, ge=1, description="Proposal rounds.")
    proposals_per_round: int = Field(4, ge=1, description="Candidates per round.")
    strategy: Literal["free", "refine"] = Field("free", description="free: propose anew; refine: improve the previous round's best code.")
    beta: float = Field(0.1, gt=0.0, description="beta passed to every candidate loss.")
    inner_steps: int = Field(6, ge=1, description="Optimizer steps of each candidate's training.")
    inner_lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate of the inner training.")
    inner_batch_size: int = Field(8, ge=1, description="Preference pairs per inner step.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Gradient clipping by global norm; null disables it.")
    pairs: int = Field(32, ge=2, description="Training images that give preference pairs.")
    rejected: Literal["shuffled", "greedy", "sampled"] = Field(
        "sampled", description="Rejected caption: another image's caption, or one decoded from the starting adapter.")
    sample_temperature: float = Field(1.0, gt=0.0, description="Temperature of sampled rejected captions.")
    max_caption_tokens: int = Field(24, ge=1, description="Length cap of decoded rejected captions in tokens.")
    fitness_images: int = Field(32, ge=4, description="Held-out training images the fitness is measured on.")
    fitness_layers: list[int] | None = Field(None, description="Probed layers averaged in the fitness; null: 3 spread over the probed layers.")
    fitness_weights: dict[str, float] = Field(
        default_factory=lambda: {"caption_loss": -1.0, "cka_linear": 1.0, "retrieval_i2t_r1": 1.0},
        description="Weight of each metric in the fitness, a weighted sum; pair metrics are averaged over fitness_layers.")
    save_best: int = Field(2, ge=1, description="Best losses saved to losses/ and returned as treated checkpoints.")
    seed: int | None = Field(None, description="Seed of the treatment; null uses the treatment context's seed.")

    @field_validator("fitness_weights")
    @classmethod
    def _check_weights(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - FITNESS_METRICS)
        if unknown or not weights:
            raise ValueError(f"invalid fitness metric(s) {unknown}; accepted: {sorted(FITNESS_METRICS)}")
        return weights

    @field_validator("api_key_env")
    @classmethod
    def _check_env_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"invalid environment variable name {name!r}")
        return name

    @model_validator(mode="after")
    def _check_http(self) -> LossDiscoveryOptions:
        if self.proposer == "http" and (not self.url or not self.model):
            raise ValueError("proposer: http needs url and model")
        return self


def parse_options(options: dict[str, Any]) -> LossDiscoveryOptions:
    """Validate the `treatment:` mapping.

    Raises:
        ValueError: naming each invalid or unknown field and its value.
    """
    return validate_options(LossDiscoveryOptions, options, "loss-discovery")


@dataclass
class CandidateResult:
    """Fitness of a trained candidate and the metrics behind it."""

    fitness: float
    metrics: dict[str, float]


CandidateTrainer = Callable[[Proposal], CandidateResult]
"""Train and score one validated proposal; raises SandboxError when the loss fails in training."""


def measure_runtime(code: str, sandbox: Sandbox, beta: float, batch_size: int = RUNTIME_BATCH_SIZE, repeats: int = 3) -> float:
    """Return the median milliseconds of one sandboxed loss and gradient evaluation on fixed inputs.

    The time includes the transfer to and from the worker, which is the same for every loss.

    Raises:
        SandboxError: If the loss fails at this batch size.
    """
    generator = torch.Generator().manual_seed(0)
    logps = -1.0 - 99.0 * torch.rand(4, batch_size, generator=generator, dtype=torch.float64)  # [4, B]
    tensors = dict(zip(SIGNATURE[:4], logps, strict=True))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        sandbox.evaluate(code, tensors, beta=beta)
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def unique_name(name: str, used_names: set[str]) -> str:
    """Return ``name``, or the first free one of ``name_2``, ``name_3``, ... when it is used."""
    if name not in used_names:
        return name
    suffix = 2
    while f"{name}_{suffix}" in used_names:
        suffix += 1
    return f"{name}_{suffix}"


def previous_proposal(entries: list[ArchiveEntry], round_index: int) -> Proposal | None:
    """Return the proposal the refine strategy improves in ``round_index``.

    That is the highest-fitness entry of the previous round or, when none of its proposals
    was valid, its last parsed proposal, so the proposer is asked to fix it. None in round 0.
    """
    last_round = [entry for entry in entries if entry.round == round_index - 1 and entry.code]
    if not last_round:
        return None
    valid = [entry for entry in last_round if entry.ok]
    chosen = max(valid, key=lambda entry: entry.fitness) if valid else last_round[-1]
    return Proposal(chosen.thought, chosen.name, chosen.code)


def summarize_round(entries: list[ArchiveEntry], round_index: int, wall_seconds: float) -> dict[str, Any]:
    """Count the outcomes of one round: valid rate, failure categories, parse failures, runtimes."""
    own = [entry for entry in entries if entry.round == round_index]
    valid = [entry for entry in own if entry.ok]
    runtimes = [entry.runtime_ms for entry in own if entry.runtime_ms is not None]
    return {
        "round": round_index,
        "n_proposals": len(own),
        "n_valid": len(valid),
        "valid_rate": len(valid) / len(own) if own else 0.0,
        "categories": dict(Counter(entry.category for entry in own)),
        "parse_failures": dict(Counter(entry.reason.partition(":")[0] for entry in own if entry.category == "unparseable")),
        "best_fitness": max((entry.fitness for entry in valid), default=None),
        "mean_runtime_ms": statistics.mean(runtimes) if runtimes else None,
        "wall_seconds": wall_seconds,
    }


def best_entries(entries: list[ArchiveEntry], k: int) -> list[ArchiveEntry]:
    """Return the ``k`` valid entries of highest fitness, best first."""
    return sorted((entry for entry in entries if entry.ok), key=lambda entry: -entry.fitness)[:k]


def save_best_losses(entries: list[ArchiveEntry], directory: Path, k: int) -> list[Path]:
    """Save the ``k`` best losses as ``<directory>/<name>.json`` for `load_preference_loss`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for entry in best_entries(entries, k):
        path = directory / f"{entry.name}.json"
        save_preference_loss(path, entry.name, entry.code)
        paths.append(path)
    return paths


class DiscoveryLoop:
    """The propose, validate, train and score rounds, with the archive written after each round.

    An existing archive is read at construction. Its finished rounds are not run again, and
    it must carry the same ``fingerprint``.

    Args:
        train_candidate: Trains and scores one validated proposal.
        sandbox: Worker that validates, times and evaluates the proposals.
        archive_path: Where the archive JSON is written, atomically.
        rounds: Rounds to reach, counting those already in the archive.
        strategy: ``free``, or ``refine`` to pass the previous round's best proposal.
        beta: Passed to every loss.
        fingerprint: Identifies the settings; a mismatching archive raises.
        on_round_end: Called with the entries after each round is written.

    Raises:
        ValueError: If the archive at ``archive_path`` was made with another fingerprint.
    """

    def __init__(self, train_candidate: CandidateTrainer, sandbox: Sandbox, archive_path: Path, *, rounds: int,
                 strategy: str = "free", beta: float = 0.1, fingerprint: str = "",
                 on_round_end: Callable[[list[ArchiveEntry]], None] | None = None):
        self.train_candidate, self.sandbox, self.archive_path = train_candidate, sandbox, Path(archive_path)
        self.rounds, self.strategy, self.beta, self.fingerprint = rounds, strategy, beta, fingerprint
        self.on_round_end = on_round_end
        self.state: dict[str, Any] = {"fingerprint": fingerprint, "completed_rounds": 0, "rounds": [], "entries": []}
        if self.archive_path.is_file():
            state = json.loads(self.archive_path.read_text(encoding="utf-8"))
            if state.get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.archive_path} was made from another checkpoint, seed or options; "
                    "delete the treatment directory or use another output directory"
                )
            self.state = state
        self.entries = [ArchiveEntry.from_json(record) for record in self.state["entries"]]

    @property
    def pending_rounds(self) -> list[int]:
        return list(range(self.state["completed_rounds"], self.rounds))

    def run(self, proposer: Proposer | None) -> list[ArchiveEntry]:
        """Run the pending rounds with ``proposer`` and return all entries; ``proposer`` may be None when none is pending."""
        if self.state["completed_rounds"]:
            logger.info("loss discovery: %d rounds found in %s; not run again", self.state["completed_rounds"], self.archive_path)
        for round_index in self.pending_rounds:
            started = time.perf_counter()
            previous = previous_proposal(self.entries, round_index) if self.strategy == "refine" else None
            outputs = proposer.propose(list(self.entries), previous, round_index)
            for index, text in enumerate(outputs):
                entry = self._evaluate(text, round_index, index)
                self.entries.append(entry)
                logger.info("loss discovery round %d, proposal %d (%s): %s%s", round_index, index, entry.name,
                            entry.category, f", fitness {entry.fitness:.4f}" if entry.ok else f": {entry.reason[:200]}")
            summary = summarize_round(self.entries, round_index, time.perf_counter() - started)
            summary["strategy"] = self.strategy
            self.state["rounds"].append(summary)
            self.state["completed_rounds"] = round_index + 1
            self.save()
            logger.info("loss discovery round %d: %d of %d valid, categories %s, best fitness %s", round_index,
                        summary["n_valid"], summary["n_proposals"], summary["categories"], summary["best_fitness"])
            if self.on_round_end is not None:
                self.on_round_end(self.entries)
        return self.entries

    def save(self) -> None:
        """Write the archive atomically."""
        self.state["entries"] = [entry.to_json() for entry in self.entries]
        write_atomic(self.archive_path, json.dumps(self.state, indent=2, default=str))

    def _evaluate(self, text: str, round_index: int, index: int) -> ArchiveEntry:
        """Parse, validate, time, train and score one raw output."""
        try:
            proposal = extract_proposal(text)
        except ProposalParseError as error:
            return ArchiveEntry(round_index, index, f"unparsed_r{round_index}_{index}", "", "", "unparseable",
                                f"{error.kind}: {error}", raw=(text or "")[:2000])
        used_names = {entry.name for entry in self.entries} | set(PREFERENCE_LOSSES)
        proposal = Proposal(proposal.thought, unique_name(proposal.name, used_names), proposal.code)
        entry = ArchiveEntry(round_index, index, proposal.name, proposal.thought, proposal.code, "ok")

        result = self.sandbox.validate(proposal.code, beta=self.beta)
        if not result.ok:
            entry.category, entry.reason = result.category, result.reason
            return entry
        try:
            entry.runtime_ms = measure_runtime(proposal.code, self.sandbox, self.beta)
        except SandboxError as error:
            entry.category = error.result.category
            entry.reason = f"at {RUNTIME_BATCH_SIZE} examples: {error.result.reason}"
            return entry
        try:
            outcome = self.train_candidate(proposal)
        except SandboxError as error:
            entry.category, entry.reason = error.result.category, f"in training: {error.result.reason}"
            return entry
        entry.fitness, entry.metrics = outcome.fitness, outcome.metrics
        return entry


def prune_candidates(directory: Path, keep: set[str]) -> None:
    """Delete candidate checkpoints under ``directory`` whose loss name is not in ``keep``."""
    if not directory.is_dir():
        return
    for path in directory.iterdir():
        if path.is_dir() and path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


@dataclass
class PreferencePairs:
    """Fixed preference pairs shared by every candidate, with reference log-probabilities."""

    rows: list[int]  # dataset rows of the images
    vision_tokens: torch.Tensor  # [P, T, d_vision]
    chosen: list[str]
    rejected: list[str]
    reference_chosen: torch.Tensor  # [P]
    reference_rejected: torch.Tensor  # [P]


def split_rows(train_rows: list[int], n_pairs: int, n_fitness: int, seed: int) -> tuple[list[int], list[int]]:
    """Draw disjoint training rows for the preference pairs and for the fitness.

    Raises:
        ValueError: If the training split has fewer than ``n_pairs + n_fitness`` images.
    """
    if n_pairs + n_fitness > len(train_rows):
        raise ValueError(f"pairs ({n_pairs}) + fitness_images ({n_fitness}) exceed the {len(train_rows)} training images; lower them")
    shuffled = random.Random(seed).sample(list(train_rows), n_pairs + n_fitness)
    return sorted(shuffled[:n_pairs]), sorted(shuffled[n_pairs:])


def build_pairs(run, start: Adapter, rows: list[int], options: LossDiscoveryOptions, seed: int) -> PreferencePairs:
    """Pair each image's reference caption with a rejected caption; identical pairs are dropped and counted."""
    lm, prompt, max_tokens = run.lm, run.prompt, run.config.train.max_caption_tokens
    chosen = [run.dataset.items[row].caption for row in rows]
    tokens = run.tokens[rows]  # [P, T, d_vision]
    if options.rejected == "shuffled":
        shift = random.Random(seed).randrange(1, len(rows))
        rejected = chosen[shift:] + chosen[:shift]
    else:
        with torch.no_grad():
            visual = start(tokens.to(lm.model.device))  # [P, V, d_lm]
        if options.rejected == "greedy":
            rejected = generate_captions(lm, visual, prompt, options.max_caption_tokens)
        else:
            rejected = [group[0] for group in sample_captions(
                lm, visual, prompt, 1, options.sample_temperature, 1.0, options.max_caption_tokens, seed)]
    keep = [i for i in range(len(rows)) if rejected[i].strip().lower() != chosen[i].strip().lower()]
    if len(keep) < len(rows):
        logger.info("loss discovery: dropped %d of %d pairs whose rejected caption equals the chosen one", len(rows) - len(keep), len(rows))
    if not keep:
        raise ValueError("every rejected caption equals its chosen caption; use rejected: shuffled")
    rows, tokens = [rows[i] for i in keep], tokens[keep]
    chosen, rejected = [chosen[i] for i in keep], [rejected[i] for i in keep]
    with torch.no_grad():
        reference = [
            caption_logprobs(lm, start, tokens[i : i + options.inner_batch_size], captions[i : i + options.inner_batch_size], prompt, max_tokens)
            for captions in (chosen, rejected) for i in range(0, len(rows), options.inner_batch_size)
        ]
    half = len(reference) // 2
    return PreferencePairs(rows, tokens, chosen, rejected, torch.cat(reference[:half]).cpu(), torch.cat(reference[half:]).cpu())


def train_with_loss(run, policy: Adapter, pairs: PreferencePairs, code: str, options: LossDiscoveryOptions,
                    sandbox: Sandbox, seed: int) -> dict[str, float]:
    """Train ``policy`` in place for ``inner_steps`` AdamW steps on the mean of a sandboxed loss.

    The worker returns the per-example losses and their gradients with respect to the policy
    log-probabilities, and those gradients are backpropagated into the adapter here.

    Returns:
        Mean loss of the first and the last step.

    Raises:
        SandboxError: If the loss fails in the worker, or the adapter weights become non-finite.
    """
    lm, device = run.lm, run.lm.model.device
    policy.eval()  # dropout stays off, so at step 0 the policy equals the reference
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=options.inner_lr)
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    step_losses = []
    for step in range(options.inner_steps):
        if not batches:
            batches = list(torch.randperm(len(pairs.rows), generator=generator).split(options.inner_batch_size))
        batch = batches.pop(0)
        rows = batch.tolist()
        tokens = pairs.vision_tokens[rows]
        captions = [pairs.chosen[i] for i in rows] + [pairs.rejected[i] for i in rows]
        logps = caption_logprobs(lm, policy, torch.cat([tokens, tokens]), captions, run.prompt, run.config.train.max_caption_tokens)
        policy_chosen, policy_rejected = logps[: len(rows)], logps[len(rows) :]  # [b] each
        tensors = dict(zip(SIGNATURE[:4], (policy_chosen, policy_rejected, pairs.reference_chosen[batch].to(device),
                                           pairs.reference_rejected[batch].to(device))))
        losses, (grad_chosen, grad_rejected) = evaluate_in_sandbox(code, tensors, beta=options.beta, sandbox=sandbox)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward([policy_chosen, policy_rejected], [grad_chosen / len(rows), grad_rejected / len(rows)])
        if options.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), options.max_grad_norm)
        optimizer.step()
        step_losses.append(float(losses.mean()))
        if not all(torch.isfinite(parameter).all() for parameter in policy.parameters()):
            raise SandboxError(ValidationResult(False, f"adapter weights became non-finite at step {step}", "non_finite"))
    return {"preference_loss_first_step": step_losses[0], "preference_loss_last_step": step_losses[-1]}


class FitnessScorer:
    """Scores adapters on held-out training images with an `Evaluator` built once.

    The evaluator runs with 10 bootstrap resamples and no splice or bits-per-byte scores,
    and without categories, so no linear probe is fitted. The fitness is
    ``sum(weight[m] * value[m])``, where ``caption_loss`` is in nats per token and each pair
    metric is averaged over ``layers``.
    """

    def __init__(self, run, probes: dict, rows: list[int], layers: list[int], weights: dict[str, float], seed: int):
        missing = sorted(set(layers) - set(probes))
        if missing:
            raise ValueError(f"fitness_layers {missing} have no SAE probe; probed layers: {sorted(probes)}")
        eval_config = run.config.eval.model_copy(update={"n_bootstrap": 10, "splice_images": 0, "bits_per_byte_images": 0})
        captions = [run.dataset.items[row].caption for row in rows]
        self.evaluator = Evaluator(run.lm, {layer: probes[layer] for layer in layers}, run.prompt, captions,
                                   [""] * len(rows), run.config.train.max_caption_tokens, eval_config, seed)
        self.vision_tokens = run.tokens[rows]  # [n, T, d_vision]
        self.weights = weights

    def score(self, adapter: Adapter, name: str) -> CandidateResult:
        frame, caption_loss = self.evaluator.evaluate(adapter, self.vision_tokens, name)
        self.evaluator.replicates.pop(name, None)
        pair = frame[frame["token_group"] == "pair"]
        metrics = {"caption_loss": float(caption_loss)}
        for metric in self.weights:
            if metric != "caption_loss":
                metrics[metric] = float(pair.loc[pair["metric"] == metric, "value"].mean())
        fitness = sum(weight * metrics[metric] for metric, weight in self.weights.items())
        return CandidateResult(float(fitness), metrics)


def default_fitness_layers(probed: list[int]) -> list[int]:
    """Return up to 3 probed layers at a quarter, half and three quarters of the list."""
    probed = sorted(probed)
    return sorted({probed[(len(probed) * quarter) // 4] for quarter in (1, 2, 3)})


class CandidateRunner:
    """Trains and scores candidates from the starting adapter (a `CandidateTrainer`).

    The pairs, the probes and the evaluator are built on first use, so a resumed run whose
    rounds are all finished loads none of them. Each valid candidate's adapter is saved to
    ``<directory>/<name>/`` with its loss as ``loss.json``.
    """

    def __init__(self, run, start: Adapter, options: LossDiscoveryOptions, sandbox: Sandbox, seed: int,
                 directory: Path, metadata: dict[str, Any]):
        self.run, self.start, self.options, self.sandbox, self.seed = run, start, options, sandbox, seed
        self.directory, self.metadata = directory, metadata
        self.pair_rows, self.fitness_rows = split_rows(run.train_rows, options.pairs, options.fitness_images, seed)

    @functools.cached_property
    def pairs(self) -> PreferencePairs:
        pairs = build_pairs(self.run, self.start, self.pair_rows, self.options, self.seed)
        records = [{"row": row, "chosen": chosen, "rejected": rejected} for row, chosen, rejected in zip(pairs.rows, pairs.chosen, pairs.rejected)]
        write_atomic(self.directory.parent / "pairs.json", json.dumps(records, indent=2))
        return pairs

    @functools.cached_property
    def scorer(self) -> FitnessScorer:
        probes, _, _ = probe_stage(self.run)
        layers = self.options.fitness_layers or default_fitness_layers(list(probes))
        return FitnessScorer(self.run, probes, self.fitness_rows, layers, self.options.fitness_weights, self.seed)

    def baseline(self) -> CandidateResult:
        """Score the starting adapter, before any inner training."""
        return self.scorer.score(self.start, "baseline")

    def __call__(self, proposal: Proposal) -> CandidateResult:
        policy = copy.deepcopy(self.start).requires_grad_(True)
        stats = train_with_loss(self.run, policy, self.pairs, proposal.code, self.options, self.sandbox, self.seed)
        policy.requires_grad_(False)
        result = self.scorer.score(policy, proposal.name)
        if not math.isfinite(result.fitness):
            raise SandboxError(ValidationResult(False, f"fitness is {result.fitness} (metrics {result.metrics})", "non_finite"))
        metadata = {**self.metadata, "loss": {"name": proposal.name, "fitness": result.fitness}}
        save_checkpoint(policy, self.directory / proposal.name, metadata,
                        write_extra=lambda staging: save_preference_loss(staging / "loss.json", proposal.name, proposal.code))
        return CandidateResult(result.fitness, {**result.metrics, **stats})


def build_proposer(options: LossDiscoveryOptions, run, seed: int) -> Proposer:
    """Build the proposer the options name; the LM proposer loads ``lm_spec`` or reuses the run's LM."""
    n = options.proposals_per_round
    if options.proposer == "mutation":
        return MutationProposer(n, seed)
    if options.proposer == "lm":
        lm = run.lm if options.lm_spec is None else load_lm(options.lm_spec)
        return LMProposer(lm, n, options.temperature, options.max_new_tokens, options.context_entries, seed)
    return HTTPProposer(options.url, options.model, options.api_key_env, n, options.timeout_s, options.temperature,
                        options.max_new_tokens, options.context_entries)


@register_treatment
class LossDiscovery(Treatment):
    """Discovery of preference losses; see the module docstring.

    Options come from `context.options` (`LossDiscoveryOptions`). Writes ``archive.json``,
    ``pairs.json``, the best losses as ``losses/<name>.json`` and their adapters under
    ``candidates/<name>/``, and returns those adapters best first.
    """

    name = "loss-discovery"

    def report_tables(self, output_dir: Path) -> list[dict[str, Any]]:
        """Return the round summaries and the whole archive as report tables."""
        return read_archive_tables(output_dir / ARCHIVE_NAME)

    def apply(self, checkpoint: Path, context: TreatmentContext) -> list[TreatedCheckpoint]:
        """Run the pending rounds from `checkpoint` and return the best losses' adapters.

        Raises:
            ValueError: for invalid options, or an archive made with other options.
        """
        options = parse_options(context.options)
        run = context.run
        seed = options.seed if options.seed is not None else context.seed
        start, _ = load_checkpoint(Path(checkpoint), expect_vision=run.encoder.describe(), expect_lm=describe_lm(run.lm))
        start.eval().requires_grad_(False)
        # More rounds or a larger save_best extend a finished run, so neither is part of the fingerprint.
        fingerprint = stable_hash([options.model_dump(exclude={"rounds", "save_best"}), str(Path(checkpoint).resolve()), seed])
        output_dir, keep = context.output_dir, options.save_best
        candidates = output_dir / "candidates"
        metadata = {**run.checkpoint_metadata(), "treatment": {
            "name": self.name, "source": str(checkpoint), "options": options.model_dump(), "fingerprint": fingerprint}}

        with Sandbox() as sandbox:
            runner = CandidateRunner(run, start, options, sandbox, seed, candidates, metadata)
            loop = DiscoveryLoop(
                runner, sandbox, output_dir / ARCHIVE_NAME, rounds=options.rounds, strategy=options.strategy,
                beta=options.beta, fingerprint=fingerprint,
                on_round_end=lambda entries: prune_candidates(candidates, {entry.name for entry in best_entries(entries, keep)}),
            )
            if loop.pending_rounds and "baseline" not in loop.state:
                baseline = runner.baseline()
                loop.state["baseline"] = {"fitness": baseline.fitness, "metrics": baseline.metrics}
                logger.info("loss discovery: fitness of the starting adapter %.4f", baseline.fitness)
            entries = loop.run(build_proposer(options, run, seed) if loop.pending_rounds else None)
            save_best_losses(entries, output_dir / "losses", keep)
            valid_rate = sum(entry.ok for entry in entries) / max(len(entries), 1)
            wall_seconds = sum(summary["wall_seconds"] for summary in loop.state["rounds"])
            treated = []
            for entry in best_entries(entries, keep):
                directory = candidates / entry.name
                if not (directory / CONFIG_NAME).is_file():
                    logger.warning("loss discovery: adapter of %s is missing from %s; training it again", entry.name, directory)
                    runner(Proposal(entry.thought, entry.name, entry.code))
                metrics = {"fitness": entry.fitness, "round": float(entry.round), "runtime_ms": entry.runtime_ms,
                           "valid_rate": valid_rate, **entry.metrics}
                treated.append(TreatedCheckpoint(name=f"{self.name}/{entry.name}", directory=directory, metrics=metrics,
                                                 cost={"proposals": float(len(entries)), "wall_seconds": wall_seconds}))
        return treated
