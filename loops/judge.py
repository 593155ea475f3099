"""An LM judge that scores image captions on an additive 5-point scale (LLM-as-a-judge).

Self-rewarding training (Yuan et al. 2024, "Self-Rewarding Language Models", arXiv
2401.10020) has the model judge its own responses with an additive 5-point prompt and
averages several sampled judgements. Here the responses are image captions and the judge
is a text-only LM, so it cannot see the image. Each judge prompt therefore gives the
image's reference caption as the description of the image, then the candidate caption to
score. The judge rates how well the candidate matches that description, which is a weaker
signal than judging the image itself.

A judgement counts only when its text contains exactly one `Score: <n>` with an integer n
from 0 to 5. Any other output is a parse failure: it is counted by reason and skipped, and
never scored as 0.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import stats
from transformers import DynamicCache

from mmalign.lm import LanguageModel
from mmalign.loops.sampling import rng_devices
from mmalign.progress import progress

logger = logging.getLogger("mmalign.loops")

MAX_SCORE = 5
# The number runs to its last digit, separators included, so "1,500" or "3.5" is read whole and rejected.
SCORE_PATTERN = re.compile(r"\bScore:\s*(-?\d+(?:[.,]\d+)*)")

# The instruction comes first and the caption last, so every judge prompt shares one
# token prefix whose key-value cache is computed once.
JUDGE_INSTRUCTION = """\
You will rate a caption written for an image. You cannot see the image, so a reference \
description of it is given instead.

Count points on this additive scale from 0 to 5:
- 1 point if the caption is about the image at all, even if it is incomplete or partly wrong.
- 1 more point if it covers a large part of what the image shows.
- 1 more point if it names the main things in the image in a way that helps someone who cannot see it.
- 1 more point if it reads clearly and is well formed.
- 1 more point if it is exact and perceptive, with nothing wrong or superfluous.

Explain your count in at most two sentences. End with a line of the form "Score: <points>".

"""
JUDGE_ITEM = "Reference description of the image: {reference}\nCaption to rate: {candidate}"
_ITEM_PLACEHOLDER = "<mmalign-judge-item>"


@dataclass(frozen=True)
class ParsedScore:
    """The score read from one judge output, or the reason none was read."""

    score: int | None
    failure: str | None  # "missing", "several scores" or "out of range"; None when parsed


def parse_score(text: str) -> ParsedScore:
    """Read the `Score: <n>` line of a judge output.

    Exactly one match of `SCORE_PATTERN` is accepted, and its value must be an integer from
    0 to `MAX_SCORE`. Several matches are rejected even when they agree, because the judge
    was asked for a single final score.
    """
    matches = SCORE_PATTERN.findall(text)
    if not matches:
        return ParsedScore(None, "missing")
    if len(matches) > 1:
        return ParsedScore(None, "several scores")
    value = matches[0]
    if not value.isdigit() or int(value) > MAX_SCORE:
        return ParsedScore(None, "out of range")
    return ParsedScore(int(value), None)


@dataclass
class JudgeResult:
    """Scores of a list of candidate captions.

    Attributes:
        scores: Per candidate, the mean of its parsed judge samples, or None when no sample parsed.
        sample_scores: Per candidate, each judge sample's score (None for a parse failure).
        outputs: Per candidate, the raw judge outputs (the response prefix included).
        failures: Parse failures by reason over all judge samples.
    """

    scores: list[float | None]
    sample_scores: list[list[int | None]]
    outputs: list[list[str]]
    failures: Counter = field(default_factory=Counter)

    @property
    def n_outputs(self) -> int:
        return sum(len(samples) for samples in self.sample_scores)

    @property
    def n_failures(self) -> int:
        return sum(self.failures.values())


class CaptionJudge:
    """Scores captions by sampling an LM's judgements under the additive 5-point prompt.

    Args:
        lm: The judge LM; it must have a chat template.
        samples: Judgements sampled per caption and averaged (Yuan et al. 2024 use 3).
        temperature: Sampling temperature of the judge.
        top_p: Nucleus probability mass of the judge.
        max_new_tokens: Length cap of each judgement in tokens.
        batch_size: Captions per `generate` call (each call decodes `batch_size * samples` sequences).
        response_prefix: Text put at the start of the judge's turn and prepended to its output
            before parsing, for example "Score:" to ask a small judge for the score only.
        share_prefix: Compute the key-value cache of the prompt head common to all captions
            once and reuse it, instead of running the whole prompt for every judgement.

    Raises:
        ValueError: if the judge LM has no chat template or a setting is out of range.
    """

    def __init__(
        self, lm: LanguageModel, samples: int = 3, temperature: float = 0.7, top_p: float = 0.9,
        max_new_tokens: int = 64, batch_size: int = 8, response_prefix: str = "", share_prefix: bool = True,
    ) -> None:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"judge LM {lm.lm_id} has no chat template; give an instruction-tuned judge LM")
        if samples < 1 or max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"samples, max_new_tokens and batch_size must be at least 1, got {samples}, {max_new_tokens}, {batch_size}")
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature must be above 0 and top_p in (0, 1], got {temperature} and {top_p}")
        self.lm = lm
        self.samples = samples
        self.temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.response_prefix = response_prefix
        self.share_prefix = share_prefix

        tokenizer = lm.tokenizer
        content = JUDGE_INSTRUCTION + _ITEM_PLACEHOLDER
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        head, _, self._tail = text.partition(_ITEM_PLACEHOLDER)
        self.head_ids: list[int] = list(tokenizer(head, add_special_tokens=False).input_ids)
        self._head_cache: DynamicCache | None = None

    def suffix_ids(self, reference: str, candidate: str) -> list[int]:
        """Tokenize the part of the judge prompt after the shared head: the item, the chat tail and the response prefix."""
        item = JUDGE_ITEM.format(reference=reference.strip(), candidate=candidate.strip())
        return list(self.lm.tokenizer(item + self._tail + self.response_prefix, add_special_tokens=False).input_ids)

    def prompt_ids(self, reference: str, candidate: str) -> list[int]:
        """Tokenize the whole chat prompt for judging `candidate` against `reference`."""
        return self.head_ids + self.suffix_ids(reference, candidate)

    def _head_cache_for(self, n_rows: int) -> DynamicCache:
        """Return a copy of the shared head's key-value cache, repeated for `n_rows` sequences."""
        if self._head_cache is None:
            cache = DynamicCache(config=self.lm.model.config)
            head = torch.tensor([self.head_ids], dtype=torch.long, device=self.lm.model.device)
            self.lm.model(input_ids=head, cache=cache, use_cache=True)
            self._head_cache = cache
        cache = copy.deepcopy(self._head_cache)
        cache.batch_repeat_interleave(n_rows)
        return cache

    @torch.no_grad()
    def _generate(self, suffixes: list[list[int]]) -> list[str]:
        """Sample `self.samples` judgements for each prompt suffix; returns `len(suffixes) * samples` texts.

        Each row is the shared head, left padding, then its suffix, so every row ends where
        decoding starts. Padding in the middle is masked out, and generate derives position
        ids from the attention mask, so the suffix positions continue the head's.
        """
        model, device = self.lm.model, self.lm.model.device
        pad_id = self.lm.end_token_id
        n_head, n_suffix = len(self.head_ids), max(len(ids) for ids in suffixes)
        input_ids = torch.full((len(suffixes), n_head + n_suffix), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        input_ids[:, :n_head] = torch.tensor(self.head_ids)
        attention_mask[:, :n_head] = 1
        for row, ids in enumerate(suffixes):
            input_ids[row, n_head + n_suffix - len(ids) :] = torch.tensor(ids)
            attention_mask[row, n_head + n_suffix - len(ids) :] = 1
        options = {}
        if self.share_prefix:  # generate expands the inputs by `samples`, but not a given cache
            options["cache"] = self._head_cache_for(len(suffixes) * self.samples)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
            num_return_sequences=self.samples, temperature=self.temperature, top_p=self.top_p, top_k=0,
            max_new_tokens=self.max_new_tokens, eos_token_id=self.lm.end_token_id, pad_token_id=pad_id, **options,
        )  # [len(suffixes) * samples, n_head + n_suffix + new tokens]
        return self.lm.tokenizer.batch_decode(output[:, n_head + n_suffix :], skip_special_tokens=True)

    def score(self, references: list[str], candidates: list[str], seed: int) -> JudgeResult:
        """Judge each candidate caption against the reference caption of its image.

        Args:
            references: Reference caption of the image of each candidate.
            candidates: Captions to score, as many as `references`.
            seed: Seed of the judge's sampling; the caller's global random state is left unchanged.

        Returns:
            The averaged scores, per-sample scores, raw outputs and parse-failure counts.
        """
        if len(references) != len(candidates):
            raise ValueError(f"got {len(references)} references for {len(candidates)} candidates; pass one per candidate")
        start_time = time.perf_counter()
        suffixes = [self.suffix_ids(reference, candidate) for reference, candidate in zip(references, candidates)]
        # Batches of similar length waste less compute on padding.
        order = sorted(range(len(suffixes)), key=lambda index: len(suffixes[index]))
        outputs: list[list[str]] = [[] for _ in suffixes]
        with torch.random.fork_rng(devices=rng_devices(self.lm.model.device)):
            torch.manual_seed(seed)
            for start in progress(range(0, len(order), self.batch_size), "judging captions", "batch"):
                rows = order[start : start + self.batch_size]
                texts = self._generate([suffixes[row] for row in rows])
                for position, row in enumerate(rows):
                    outputs[row] = [self.response_prefix + text for text in texts[position * self.samples : (position + 1) * self.samples]]

        result = JudgeResult(scores=[], sample_scores=[], outputs=outputs)
        for texts in outputs:
            parsed = [parse_score(text) for text in texts]
            result.failures.update(item.failure for item in parsed if item.failure is not None)
            valid = [item.score for item in parsed if item.score is not None]
            result.sample_scores.append([item.score for item in parsed])
            result.scores.append(sum(valid) / len(valid) if valid else None)
        logger.info(
            "judged %d captions (%d judgements) in %.1f s; parse failures: %d (%s)",
            len(candidates), result.n_outputs, time.perf_counter() - start_time, result.n_failures,
            ", ".join(f"{count} {reason}" for reason, count in sorted(result.failures.items())) or "none",
        )
        return result


def judge_agreement(judge_scores: list[float | None], similarities: list[float]) -> dict[str, float]:
    """Correlate judge scores with a reference signal over the scored captions.

    Returns:
        Pearson and Spearman correlation (NaN with fewer than 3 scored captions or a constant
        input) and the number of captions they cover.
    """
    scored_pairs = [(score, similarity) for score, similarity in zip(judge_scores, similarities) if score is not None]
    result = {"judge_pearson": math.nan, "judge_spearman": math.nan, "n_agreement": float(len(scored_pairs))}
    if len(scored_pairs) >= 3:
        x, y = np.array(scored_pairs, dtype=np.float64).T
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            result["judge_pearson"] = float(stats.pearsonr(x, y).statistic)
            result["judge_spearman"] = float(stats.spearmanr(x, y).statistic)
    return result
