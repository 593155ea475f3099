"""Tests of the self-correcting treatment: losses, KL, shaping, metrics, prompts, options, resume, end to end."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from mmalign.adapters.checkpoint import save_checkpoint
from mmalign.adapters.compose import build_prompt, tokenize_captions
from mmalign.lm import describe_lm
from mmalign.loops import self_correcting
from mmalign.loops.base import TreatmentContext, get_treatment
from mmalign.loops.self_correcting import (
    REWARD_SOURCES, Attempts, SelfCorrecting, build_correction_prompt, caption_token_logits, correction_metrics, first_line,
    generate_after_context, group_advantages, parse_options, per_sequence, reinforce_loss, shaped_reward,
    stage_one_loss, stage_two_loss, token_kl, token_logps, train_on_attempts, verdicts,
)
from mmalign.loops.self_rewarding import caption_logprobs
from small_adapter import D_VISION, random_tokens, small_adapter

CAPTIONS = ["a red apple", "a blue car on a road", "a small dog", "a wooden chair", "a green tree", "a yellow sun"]


# Losses, KL and shaping on fixed tensors.

def test_group_advantages_subtract_group_mean():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.5]])
    expected = torch.tensor([[0.5, -0.5], [0.0, 0.0], [-0.25, 0.25]])
    assert torch.allclose(group_advantages(rewards), expected)


def test_shaped_reward_pays_for_fixing():
    first, second = torch.tensor([0.0, 1.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    # incorrect -> correct: 1 + 10; correct -> incorrect: 0 - 10; unchanged: r2
    assert torch.equal(shaped_reward(first, second, alpha=10.0), torch.tensor([11.0, -10.0, 1.0, 0.0]))
    assert torch.equal(shaped_reward(first, second, alpha=0.0), second)


def test_reinforce_loss_values_and_gradients():
    logps = torch.tensor([-2.0, -1.0], requires_grad=True)
    advantages = torch.tensor([0.5, -1.0], requires_grad=True)
    losses = reinforce_loss(logps, advantages)
    assert torch.allclose(losses, torch.tensor([1.0, -1.0]))
    losses.sum().backward()
    assert torch.allclose(logps.grad, torch.tensor([-0.5, 1.0]))  # d/dlogp = -A
    assert advantages.grad is None


def test_token_kl_hand_computed():
    policy = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])  # first row: p = (0.25, 0.75)
    reference = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # first row: q = (0.5, 0.5); second row equals the policy
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl = token_kl(policy, reference)
    assert kl[0].item() == pytest.approx(expected, abs=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)
    assert token_kl(policy + 5.0, reference - 2.0)[0].item() == pytest.approx(expected, abs=1e-6)  # logits are shift-invariant
    assert token_kl(reference, policy)[0].item() != pytest.approx(expected, abs=1e-3)  # KL is not symmetric


def test_per_sequence_and_token_logps():
    assert torch.equal(per_sequence(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0, 0, 2, 2]), 3), torch.tensor([3.0, 0.0, 7.0]))
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    assert torch.allclose(token_logps(logits, torch.tensor([1, 0])), torch.tensor([math.log(0.75), math.log(0.5)]))


def test_stage_losses_on_fixed_tensors():
    logps1, logps2 = torch.tensor([-4.0, -1.0]), torch.tensor([-3.0, -2.0])
    advantages1, advantages2 = torch.tensor([-0.5, 0.5]), torch.tensor([1.0, -1.0])
    kl1, kl2 = torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.0])
    # stage I: -A2 logp2 + beta2 KL1
    assert torch.allclose(stage_one_loss(logps2, advantages2, kl1, beta2=0.1), torch.tensor([3.05, -1.8]))
    # stage II: -A1 logp1 - A2 logp2 + beta1 (KL1 + KL2)
    expected = torch.tensor([-2.0 + 3.0 + 0.01 * 1.5, 0.5 - 2.0 + 0.01 * 2.0])
    assert torch.allclose(stage_two_loss(logps1, advantages1, logps2, advantages2, kl1 + kl2, beta1=0.01), expected)


def test_correction_metrics_on_fixed_verdicts():
    first = torch.tensor([True, True, False, False, False])
    second = torch.tensor([True, False, True, True, False])
    metrics = correction_metrics(first, second)
    assert metrics == pytest.approx({"acc@t1": 0.4, "acc@t2": 0.6, "delta": 0.2, "delta_i_to_c": 0.4, "delta_c_to_i": 0.2})
    assert metrics["delta"] == pytest.approx(metrics["delta_i_to_c"] - metrics["delta_c_to_i"])
    with pytest.raises(ValueError, match="one shape"):
        correction_metrics(first, second[:3])


def test_verdicts_threshold_and_unscored():
    assert verdicts([0.7, None, 0.5, 0.49], 0.5).tolist() == [True, False, True, False]


@pytest.mark.parametrize("text, expected", [
    ("A red apple.", "A red apple."),
    ("  A bee.\nThe bee is an insect.", "A bee."),
    ("\n\nThe answer is: A rat.\nA:", "The answer is: A rat."),
    ("\n  \n", ""),
])
def test_first_line_keeps_one_line(text, expected):
    assert first_line(text) == expected


# Options.

@pytest.mark.parametrize("options, message", [
    ({"alpah": 10}, "alpah"),
    ({"reward_source": "bleu"}, "reward source 'bleu' not supported; accepted names"),
    ({"stage1_iterations": 0, "stage2_iterations": 0}, "set at least one"),
    ({"samples_per_image": 1}, "samples_per_image = 1"),
    ({"top_p": 1.5}, "top_p = 1.5"),
    ({"beta2": -0.1}, "beta2 = -0.1"),
])
def test_options_errors_name_the_field(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_options(options)


def test_options_defaults_follow_the_paper():
    options = parse_options({})
    assert (options.alpha, options.beta1, options.beta2) == (10.0, 0.01, 0.1)
    assert options.reward_source == "minilm"


def test_treatment_registered():
    assert isinstance(get_treatment("self-correcting"), SelfCorrecting)


# Prompts, log-probabilities, decoding and training with the real SmolLM2 on random vision features.

def test_correction_prompt_chat_turns(smollm2):
    prompt = build_prompt(smollm2, "chat", instruction="Describe the image.")
    correction = build_correction_prompt(smollm2, prompt, "chat", "Fix any mistake.", "Describe the image.")
    first_ids = tokenize_captions(smollm2, ["a red apple"], prompt.caption_separator, 16)[0]
    text = smollm2.tokenizer.decode(list(prompt.before_image) + correction.second_context(first_ids))
    assert text.index("Describe the image.") < text.index("a red apple") < text.index("Fix any mistake.")
    assert text.rstrip().endswith("assistant")
    assert text.count("<|im_start|>assistant") == 2


def test_correction_prompt_plain_repeats_prefix(smollm2):
    prompt = build_prompt(smollm2, "plain", prefix="A picture of")
    correction = build_correction_prompt(smollm2, prompt, "plain", "Fix any mistake.")
    text = smollm2.tokenizer.decode(correction.second_context([]))
    assert text == "A picture of\nFix any mistake.\nA picture of"
    with pytest.raises(ValueError, match="unknown prompt style 'free'"):
        build_correction_prompt(smollm2, prompt, "free", "Fix any mistake.")


def test_token_logits_match_caption_logprobs(smollm2):
    prompt = build_prompt(smollm2)
    adapter, tokens = small_adapter(), random_tokens(2)
    captions = ["a red apple on a table", "a dog"]
    with torch.no_grad():
        logits, targets, rows = caption_token_logits(smollm2, adapter, tokens, [list(prompt.after_image)] * 2, captions, prompt, 32)
        ours = per_sequence(token_logps(logits, targets), rows, 2)
        reference = caption_logprobs(smollm2, adapter, tokens, captions, prompt, 32)
    assert torch.allclose(ours, reference, atol=1e-3)


def test_token_logits_independent_of_padding(smollm2):
    prompt = build_prompt(smollm2)
    correction = build_correction_prompt(smollm2, prompt, "plain", "Fix any mistake.")
    adapter, tokens = small_adapter(), random_tokens(2)
    contexts = [correction.second_context(tokenize_captions(smollm2, [c], "", 32)[0]) for c in ["a dog", "a very long caption about a red car"]]
    with torch.no_grad():
        logits, targets, rows = caption_token_logits(smollm2, adapter, tokens, contexts, ["a cat", "a car"], prompt, 32)
        together = per_sequence(token_logps(logits, targets), rows, 2)
        logits, targets, rows = caption_token_logits(smollm2, adapter, tokens[:1], contexts[:1], ["a cat"], prompt, 32)
        alone = per_sequence(token_logps(logits, targets), rows, 1)
    assert together[0].item() == pytest.approx(alone[0].item(), abs=1e-3)


def test_generate_left_padding_matches_single_rows(smollm2):
    prompt = build_prompt(smollm2)
    correction = build_correction_prompt(smollm2, prompt, "plain", "Fix any mistake.")
    with torch.no_grad():
        visual = small_adapter()(random_tokens(3))  # [3, 5, 576]
    contexts = [correction.second_context(tokenize_captions(smollm2, [c], "", 32)[0]) for c in ["a dog", "a big red bus on a road", "sun"]]
    batched = generate_after_context(smollm2, visual, contexts, prompt, 6, batch_size=3)
    single = [generate_after_context(smollm2, visual[i : i + 1], contexts[i : i + 1], prompt, 6)[0] for i in range(3)]
    assert batched == single

    state = torch.get_rng_state()
    sampled = generate_after_context(smollm2, visual, contexts, prompt, 6, sample=True, temperature=0.7, top_p=0.9, seed=4)
    assert sampled == generate_after_context(smollm2, visual, contexts, prompt, 6, sample=True, temperature=0.7, top_p=0.9, seed=4)
    assert torch.equal(torch.get_rng_state(), state)


def _pair_logps(smollm2, adapter, tokens, attempts, prompt):
    with torch.no_grad():
        logits, targets, rows = caption_token_logits(smollm2, adapter, tokens, attempts.contexts2, attempts.captions2, prompt, 32)
    return per_sequence(token_logps(logits, targets), rows, len(attempts.captions2))


@pytest.mark.parametrize("stage", [1, 2])
def test_training_raises_rewarded_attempt(smollm2, stage):
    prompt = build_prompt(smollm2)
    correction = build_correction_prompt(smollm2, prompt, "plain", "Fix any mistake.")
    reference = small_adapter().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    tokens = random_tokens(1).expand(2, -1, -1)  # one image, two attempt pairs
    first = ["a red ball", "a red ball"]
    contexts2 = [correction.second_context(tokenize_captions(smollm2, [c], "", 32)[0]) for c in first]
    attempts = Attempts([0, 0], [list(prompt.after_image)] * 2, first, contexts2, ["a red apple", "a blue car"])
    before = _pair_logps(smollm2, reference, tokens, attempts, prompt)
    options = parse_options({"lr": 1e-3, "epochs": 3, "batch_size": 2})
    stats = train_on_attempts(smollm2, policy, reference, tokens, attempts, torch.zeros(2), torch.tensor([1.0, -1.0]), stage,
                              prompt, 32, options, seed=0)
    after = _pair_logps(smollm2, policy, tokens, attempts, prompt)
    assert (after[0] - after[1]) > (before[0] - before[1]) + 0.05
    # the first epoch starts at the reference, where the KL is 0: loss = mean(-A2 logp2)
    assert stats["loss_first_epoch"] == pytest.approx(-float(before[0] - before[1]) / 2, abs=1e-3)
    assert stats["kl_t1"] >= 0.0


def test_training_without_signal_keeps_start(smollm2):
    prompt = build_prompt(smollm2)
    reference = small_adapter().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    tokens = random_tokens(1).expand(2, -1, -1)
    attempts = Attempts([0, 0], [list(prompt.after_image)] * 2, ["a red ball", "a dog"], [list(prompt.after_image)] * 2, ["a", "b"])
    options = parse_options({"lr": 1e-3, "epochs": 2, "batch_size": 2})
    stats = train_on_attempts(smollm2, policy, reference, tokens, attempts, torch.tensor([1.0, -1.0]), torch.zeros(2), 1,
                              prompt, 32, options, seed=0)
    # stage I ignores attempt 1's advantages, so no pair carries a signal and Adam must not step on rounding noise
    assert stats["skipped_steps"] == 2
    assert stats["optimizer_steps"] == 0
    for trained, start in zip(policy.parameters(), reference.parameters()):
        assert torch.equal(trained, start)


# The treatment on a small stand-in run, with a fixed verifier.

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
        self.config = SimpleNamespace(train=SimpleNamespace(max_caption_tokens=16), eval=SimpleNamespace(batch_size=4),
                                      adapter=SimpleNamespace(prompt_style="plain", chat_instruction="Describe the image."))
        self.encoder = SimpleNamespace(describe=lambda: {"encoder_id": "random", "d_model": D_VISION})

    def checkpoint_metadata(self) -> dict[str, object]:
        return {"vision_encoder": self.encoder.describe(), "lm": describe_lm(self.lm)}


class WordCountReward:
    """Scores 1 for a caption with an even number of words, else 0."""

    default_threshold = 0.5

    def __init__(self, lm, options) -> None:
        pass

    def score(self, captions, references, seed):
        return [float(len(caption.split()) % 2 == 0) for caption in captions]


@pytest.fixture
def treatment_setup(smollm2, tmp_path, monkeypatch):
    monkeypatch.setitem(REWARD_SOURCES, "word-count", WordCountReward)
    run = StandInRun(smollm2, random_tokens(len(CAPTIONS)))
    start_dir = save_checkpoint(small_adapter(), tmp_path / "start", run.checkpoint_metadata())
    options = {"stage1_iterations": 1, "stage2_iterations": 0, "samples_per_image": 2, "max_new_tokens": 4,
               "images_per_iteration": 2, "eval_images": 2, "batch_size": 4, "lr": 1e-3, "reward_source": "word-count"}
    return run, start_dir, options, tmp_path / "treatment"


def test_treatment_writes_metrics_and_resumes(treatment_setup, monkeypatch):
    run, start_dir, options, output_dir = treatment_setup
    first = SelfCorrecting().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    assert [item.name for item in first] == ["self-correcting/S1-1"]
    metrics = first[0].metrics
    assert {"acc@t1", "acc@t2", "delta", "delta_i_to_c", "delta_c_to_i", "acc@t1_start", "kl_t1", "mean_reward_t2"} <= set(metrics)
    assert metrics["delta"] == pytest.approx(metrics["delta_i_to_c"] - metrics["delta_c_to_i"])
    assert metrics["n_pairs"] == 4
    assert first[0].cost["samples_generated"] == 2 * 4 + 2 * 2
    lines = (output_dir / "S1-1" / "attempts.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert {"attempt1", "attempt2", "score1", "score2", "advantage2"} <= set(json.loads(lines[0]))

    calls = []
    original = self_correcting._run_iteration
    monkeypatch.setattr(self_correcting, "_run_iteration", lambda *args: calls.append(args[2]) or original(*args))
    again = SelfCorrecting().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    assert calls == []
    assert again[0].metrics == pytest.approx(metrics, nan_ok=True)

    extended = SelfCorrecting().apply(start_dir, TreatmentContext(run, output_dir, {**options, "stage2_iterations": 1}, 0))
    assert calls == [2]
    assert [item.name for item in extended] == ["self-correcting/S1-1", "self-correcting/S2-1"]

    # The finished iterations were made with alpha 10, so other options are rejected, not mixed in.
    with pytest.raises(ValueError, match="another checkpoint, seed or options"):
        SelfCorrecting().apply(start_dir, TreatmentContext(run, output_dir, {**options, "alpha": 5.0}, 0))


# The quick preset end to end through `mmalign treat`.

@pytest.mark.slow
def test_quick_config_end_to_end(tmp_path):
    from pathlib import Path

    from mmalign.commands import run_treatment
    from mmalign.config import load_config
    from mmalign.pipeline import run_pipeline

    quick = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"
    run = run_pipeline(load_config(quick, {"output_dir": str(tmp_path)}))
    treatment = {"stage1_iterations": 1, "stage2_iterations": 0, "images_per_iteration": 2, "samples_per_image": 2,
                 "max_new_tokens": 6, "eval_images": 2}
    config = load_config(quick, {"output_dir": str(tmp_path), "treatment": treatment})
    results, treated, output_dir = run_treatment(config, "self-correcting", run.run_dir / "checkpoints" / "final")
    assert [item.name for item in treated] == ["self-correcting/S1-1"]
    assert "self-correcting/S1-1" in set(results["checkpoint"])
    assert (output_dir / "report.html").is_file()
    assert "acc@t1" in (output_dir / "report.html").read_text(encoding="utf-8")
