"""Tests of the self-rewarding treatment: judge parsing, pairing, log-probabilities, DPO, resume."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from mmalign.adapters.checkpoint import save_checkpoint
from mmalign.adapters.compose import build_prompt, compose
from mmalign.capture import caption_loss
from mmalign.lm import describe_lm
from mmalign.loops import self_rewarding
from mmalign.loops.base import TreatmentContext, get_treatment
from mmalign.loops.judge import CaptionJudge, JudgeResult, judge_agreement, parse_score
from mmalign.loops.losses import get_preference_loss
from mmalign.loops.sampling import sample_captions
from mmalign.loops.self_rewarding import (
    SelfRewarding, SelfRewardingOptions, caption_logprobs, parse_options, select_pairs, train_on_pairs,
)
from small_adapter import D_VISION, random_tokens, small_adapter

CAPTIONS = ["a red apple", "a blue car on a road", "a small dog", "a wooden chair", "a green tree", "a yellow sun"]


# Score parsing, pairing and agreement: no model needed.

@pytest.mark.parametrize("text, expected", [
    ("Relevant and clear.\nScore: 4", 4),
    ("Score:5", 5),
    ("It says nothing right. Score: 0", 0),
    ("Score: 4/5", 4),
])
def test_parse_score_valid(text, expected):
    parsed = parse_score(text)
    assert parsed.score == expected
    assert parsed.failure is None


@pytest.mark.parametrize("text, reason", [
    ("I would give it four points.", "missing"),
    ("score: 3", "missing"),
    ("Score: 7", "out of range"),
    ("Score: 3.5", "out of range"),
    ("Score: 1,500", "out of range"),
    ("Score: -1", "out of range"),
    ("Score: 2\nScore: 3", "several scores"),
    ("Score: 3 because ... Score: 3", "several scores"),
])
def test_parse_score_rejects(text, reason):
    parsed = parse_score(text)
    assert parsed.score is None
    assert parsed.failure == reason


def test_select_pairs_drops_ties():
    scores = [[3.0, 3.0, 3.0, 3.0], [5.0, 1.0, None, 2.0], [None, None, 4.0, None], [2.0, 2.0, 4.0, 4.0]]
    pairs, n_without = select_pairs(scores)
    assert [(pair.image, pair.chosen, pair.rejected) for pair in pairs] == [(1, 0, 1), (3, 2, 0)]
    assert n_without == 2


def test_select_pairs_all_tied():
    pairs, n_without = select_pairs([[2.0, 2.0], [None, 4.0], [None, None]])
    assert pairs == []
    assert n_without == 3


def test_judge_agreement_monotonic_and_constant():
    agreement = judge_agreement([1.0, 2.0, None, 3.0, 4.0], [0.1, 0.2, 0.9, 0.3, 0.5])
    assert agreement["judge_spearman"] == pytest.approx(1.0)
    assert agreement["n_agreement"] == 4
    assert math.isnan(judge_agreement([2.0, 2.0, 2.0], [0.1, 0.2, 0.3])["judge_pearson"])


def test_options_reject_unknown_field_and_loss():
    with pytest.raises(ValueError, match="n_sample"):
        parse_options({"n_sample": 4})
    with pytest.raises(ValueError, match="not supported"):
        parse_options({"loss": "kto"})
    assert parse_options({}).n_samples == 4


def test_treatment_registered():
    assert isinstance(get_treatment("self-rewarding"), SelfRewarding)


# Real SmolLM2 on random vision features.

def test_judge_averages_parsed_and_counts_failures(smollm2, monkeypatch):
    judge = CaptionJudge(smollm2, samples=3)
    apple_outputs = ["Score: 4", "no score here", "Score: 2"]
    truck_outputs = ["nothing", "Score: 9", "still nothing"]

    def generate(prompts):
        texts = [smollm2.tokenizer.decode(ids) for ids in prompts]
        return [output for text in texts for output in (apple_outputs if "apple" in text else truck_outputs)]

    monkeypatch.setattr(judge, "_generate", generate)
    result = judge.score(["an apple", "a car"], ["a red apple", "a truck"], seed=0)
    assert result.scores == [3.0, None]
    assert result.failures == {"missing": 3, "out of range": 1}
    assert result.n_outputs == 6


def test_judge_shared_prefix_matches_full_prompt(smollm2):
    outputs = []
    for share_prefix in (True, False):
        judge = CaptionJudge(smollm2, samples=2, max_new_tokens=4, response_prefix="Score:", share_prefix=share_prefix)
        outputs.append(judge.score(["a red apple", "a school bus"], ["an apple", "a yellow bus on a road"], seed=3).outputs)
    assert outputs[0] == outputs[1]


def test_judge_prompt_contains_reference_and_candidate(smollm2):
    judge = CaptionJudge(smollm2)
    text = smollm2.tokenizer.decode(judge.prompt_ids("a red apple", "a blue car"))
    assert "Reference description of the image: a red apple" in text
    assert "Caption to rate: a blue car" in text
    assert text.rstrip().endswith("assistant")


def test_sample_captions_shape_and_seed(smollm2):
    prompt = build_prompt(smollm2)
    with torch.no_grad():
        visual = small_adapter()(random_tokens(3))  # [3, 5, 576]
    state = torch.get_rng_state()
    first = sample_captions(smollm2, visual, prompt, n=2, temperature=0.7, top_p=0.9, max_new_tokens=4, seed=1, batch_size=2)
    again = sample_captions(smollm2, visual, prompt, n=2, temperature=0.7, top_p=0.9, max_new_tokens=4, seed=1, batch_size=2)
    assert [len(group) for group in first] == [2, 2, 2]
    assert first == again
    assert torch.equal(torch.get_rng_state(), state)


def test_caption_logprobs_matches_caption_loss(smollm2):
    prompt = build_prompt(smollm2)
    adapter, tokens = small_adapter(), random_tokens(1)
    logps = caption_logprobs(smollm2, adapter, tokens, ["a red apple on a table"], prompt, 32)
    with torch.no_grad():
        loss, _ = caption_loss(smollm2, compose(smollm2, ["a red apple on a table"], prompt, 32, adapter(tokens)))
    assert logps.shape == (1,)
    assert logps.requires_grad
    assert float(logps[0].detach()) == pytest.approx(-float(loss), rel=1e-4)


def test_caption_logprobs_rows_independent_of_batch(smollm2):
    prompt = build_prompt(smollm2)
    adapter, tokens = small_adapter(), random_tokens(2)
    with torch.no_grad():
        together = caption_logprobs(smollm2, adapter, tokens, ["a dog", "a very long caption about a red car"], prompt, 32)
        alone = caption_logprobs(smollm2, adapter, tokens[:1], ["a dog"], prompt, 32)
    assert float(together[0]) == pytest.approx(float(alone[0]), abs=1e-3)


def test_dpo_training_lowers_loss(smollm2):
    prompt = build_prompt(smollm2)
    reference = small_adapter().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    tokens = random_tokens(4)
    chosen = CAPTIONS[:4]
    rejected = [CAPTIONS[5], CAPTIONS[4], CAPTIONS[0], CAPTIONS[1]]
    options = SelfRewardingOptions(lr=1e-3, epochs=2, batch_size=4, beta=0.1)
    stats = train_on_pairs(smollm2, policy, reference, tokens, chosen, rejected, prompt, 32, options, seed=0)
    assert stats["preference_loss_first_epoch"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1

    loss_fn = get_preference_loss("dpo", beta=0.1)
    with torch.no_grad():
        after = loss_fn(
            caption_logprobs(smollm2, policy, tokens, chosen, prompt, 32), caption_logprobs(smollm2, policy, tokens, rejected, prompt, 32),
            caption_logprobs(smollm2, reference, tokens, chosen, prompt, 32), caption_logprobs(smollm2, reference, tokens, rejected, prompt, 32),
        ).mean()
    assert float(after) < math.log(2) - 0.01
    assert stats["preference_loss_last_epoch"] < stats["preference_loss_first_epoch"]


def test_sentence_encoder_ranks_similar_captions():
    from mmalign.sentence_encoder import SentenceEncoder

    encoder = SentenceEncoder()
    embeddings = encoder.encode(["A red apple on a table.", "A red apple sitting on a wooden table.", "The stock market fell sharply today."])
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    similar, unrelated = float(embeddings[0] @ embeddings[1]), float(embeddings[0] @ embeddings[2])
    assert similar > unrelated + 0.3


# The treatment end to end on a small stand-in run, with the judge's scores fixed.

@dataclass
class StandInRun:
    """The parts of `mmalign.pipeline.RunContext` the treatment reads."""

    lm: object
    tokens: torch.Tensor
    train_rows: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    val_rows: list[int] = field(default_factory=lambda: [4, 5])

    def __post_init__(self) -> None:
        self.prompt = build_prompt(self.lm)
        self.dataset = SimpleNamespace(items=[SimpleNamespace(caption=caption) for caption in CAPTIONS])
        self.config = SimpleNamespace(train=SimpleNamespace(max_caption_tokens=16), eval=SimpleNamespace(batch_size=4))
        self.encoder = SimpleNamespace(describe=lambda: {"encoder_id": "random", "d_model": D_VISION})

    @property
    def val_captions(self) -> list[str]:
        return [CAPTIONS[row] for row in self.val_rows]

    def checkpoint_metadata(self) -> dict[str, object]:
        return {"vision_encoder": self.encoder.describe(), "lm": describe_lm(self.lm)}


def fixed_scores(grid_of: Callable[[int], float | None]):
    """Return a stand-in for `CaptionJudge.score` whose per-caption scores come from `grid_of(index)`."""
    def score(self, references, candidates, seed):
        scores = [grid_of(index) for index in range(len(candidates))]
        return JudgeResult(scores=scores, sample_scores=[[s] for s in scores], outputs=[[""] for _ in scores])
    return score


@pytest.fixture
def treatment_setup(smollm2, tmp_path):
    run = StandInRun(smollm2, random_tokens(len(CAPTIONS)))
    start_dir = save_checkpoint(small_adapter(), tmp_path / "start", run.checkpoint_metadata())
    options = {"iterations": 1, "n_samples": 2, "max_new_tokens": 4, "images_per_iteration": 2, "epochs": 1, "batch_size": 2, "lr": 1e-3}
    return run, start_dir, options, tmp_path / "treatment"


def test_treatment_skips_all_tied_iteration(treatment_setup, monkeypatch):
    run, start_dir, options, output_dir = treatment_setup
    monkeypatch.setattr(CaptionJudge, "score", fixed_scores(lambda index: 3.0))
    treated = SelfRewarding().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    assert treated == []
    assert not (output_dir / "M1").exists()
    record = json.loads((output_dir / "M1.skipped.json").read_text())
    assert record["metrics"]["n_pairs"] == 0


def test_treatment_resume_skips_existing(treatment_setup, monkeypatch):
    run, start_dir, options, output_dir = treatment_setup
    monkeypatch.setattr(CaptionJudge, "score", fixed_scores(lambda index: float(index % 2)))
    first = SelfRewarding().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    assert [item.name for item in first] == ["self-rewarding/M1"]
    assert first[0].metrics["n_pairs"] == 2
    assert (output_dir / "M1" / "pairs.jsonl").is_file()

    calls = []
    original = self_rewarding._run_iteration
    monkeypatch.setattr(self_rewarding, "_run_iteration", lambda *args: calls.append(args[6]) or original(*args))
    second = SelfRewarding().apply(start_dir, TreatmentContext(run, output_dir, {**options, "iterations": 2}, 0))
    assert calls == [2]
    assert [item.name for item in second] == ["self-rewarding/M1", "self-rewarding/M2"]
    assert second[0].metrics["n_pairs"] == first[0].metrics["n_pairs"]


def test_treatment_rejects_results_of_other_options(treatment_setup, monkeypatch):
    run, start_dir, options, output_dir = treatment_setup
    monkeypatch.setattr(CaptionJudge, "score", fixed_scores(lambda index: float(index % 2)))
    SelfRewarding().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    with pytest.raises(ValueError, match="another checkpoint, seed or options"):
        SelfRewarding().apply(start_dir, TreatmentContext(run, output_dir, {**options, "beta": 0.2}, 0))
