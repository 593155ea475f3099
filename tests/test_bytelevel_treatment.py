"""Tests of byte-level caption sampling, byte models from config, the `bytes` command and the `bytelevel` treatment."""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmalign.adapters.checkpoint import save_checkpoint
from mmalign.adapters.compose import build_prompt
from mmalign.cli import main
from mmalign.loops.base import TreatmentContext, get_treatment
from mmalign.loops.bytelevel import ByteEnsemble, ByteLevelLM, ByteModel, ProxyTuned
from mmalign.loops.bytelevel_ensemble import ByteModelConfig
from mmalign.loops.bytelevel_treatment import (
    ByteLevelOptions, ByteLevelTreatment, ByteModelBuilder, decode_sampled, image_conditioning, sample_captions_bytelevel,
)
from mmalign.loops.judge import CaptionJudge, JudgeResult
from mmalign.loops.self_rewarding import SelfRewardingOptions, parse_options

QUICK = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"
BYTELEVEL_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bytelevel.yaml"


class FixedBytes(ByteModel):
    """A byte model whose next-byte distribution is `table[len(prefix)]`, or `table[-1]` past its end."""

    def __init__(self, table: list[dict[int, float]]) -> None:
        self.table = []
        for probabilities in table:
            logprobs = torch.full((257,), -math.inf, dtype=torch.float64)
            for index, probability in probabilities.items():
                logprobs[index] = math.log(probability)
            self.table.append(logprobs)
        self.calls: list[bytes] = []

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        self.calls.append(prefix)
        return self.table[min(len(prefix), len(self.table) - 1)]


class RandomBytes(ByteModel):
    """A byte model with a different random distribution after every prefix."""

    def next_byte_logprobs(self, prefix: bytes) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(prefix))
        logits = torch.randn(257, generator=generator, dtype=torch.float64) * 3
        logits[256] = -math.inf  # no end of text, so the sample runs to max_bytes
        return logits - torch.logsumexp(logits, dim=0)


# Byte-level sampling on fixed distributions.

def test_sample_greedy_is_argmax_each_step():
    model = RandomBytes()
    greedy = model.sample(b"ab", max_bytes=6, temperature=0)
    expected = b""
    for _ in range(6):
        expected += bytes([int(torch.argmax(model.next_byte_logprobs(b"ab" + expected)))])
    assert greedy == expected


def test_sample_top_p_keeps_nucleus():
    model = FixedBytes([{ord("a"): 0.5, ord("b"): 0.3, ord("c"): 0.15, ord("d"): 0.05}])
    drawn = Counter(model.sample(b"", max_bytes=1, top_p=0.7, seed=seed) for seed in range(300))
    assert set(drawn) == {b"a", b"b"}
    # Inside the nucleus the probabilities are renormalized: 0.5 / 0.8 for "a".
    assert abs(drawn[b"a"] / 300 - 0.625) < 0.1


def test_sample_top_p_below_top_byte_is_greedy():
    model = FixedBytes([{ord("a"): 0.5, ord("b"): 0.3, ord("c"): 0.2}])
    drawn = {model.sample(b"", max_bytes=1, top_p=0.5, seed=seed) for seed in range(50)}
    assert drawn == {b"a"}


def test_sample_temperature_before_top_p():
    # Temperature 3 flattens 0.6/0.3/0.1 to about 0.43/0.34/0.23, so a 0.85 nucleus takes all three bytes.
    model = FixedBytes([{ord("a"): 0.6, ord("b"): 0.3, ord("c"): 0.1}])
    cold = {model.sample(b"", max_bytes=1, top_p=0.85, seed=seed) for seed in range(200)}
    hot = {model.sample(b"", max_bytes=1, temperature=3.0, top_p=0.85, seed=seed) for seed in range(200)}
    assert cold == {b"a", b"b"}
    assert hot == {b"a", b"b", b"c"}


def test_sample_stops_at_stop_byte():
    model = FixedBytes([{ord("x"): 1.0}, {ord("y"): 1.0}, {ord("\n"): 1.0}])
    assert model.sample(b"", max_bytes=10, stop=b"\n") == b"xy"
    assert model.sample(b"", max_bytes=10, stop=b"y") == b"x"


def test_sample_stops_at_end_of_text():
    model = FixedBytes([{ord("x"): 1.0}, {256: 1.0}])
    assert model.sample(b"", max_bytes=10) == b"x"


def test_sample_respects_max_bytes():
    model = FixedBytes([{ord("x"): 1.0}])
    assert model.sample(b"", max_bytes=4, stop=b"\n") == b"xxxx"
    assert len(model.calls) == 4
    assert model.sample(b"", max_bytes=0) == b""


def test_decode_sampled_drops_cut_character():
    assert decode_sampled("café".encode()) == ("café", False)
    assert decode_sampled("caf".encode() + "é".encode()[:1]) == ("caf", False)
    text, invalid = decode_sampled(b"a\xffb")
    assert text == "a\ufffdb"
    assert invalid


def test_sample_captions_bytelevel_counts_and_stops(smollm2):
    builder = ByteModelBuilder(ByteModelConfig(members=["bundled:smollm2-135m"]), lm=smollm2)
    builder.build = lambda visual=None: FixedBytes([{ord("a"): 1.0}, {ord(" "): 1.0}, {ord("\n"): 1.0}])
    sampled = sample_captions_bytelevel(builder, torch.zeros(2, 1, 4), n=3, temperature=1.0, top_p=1.0, max_new_bytes=8, seed=0)
    assert sampled.captions == [["a"] * 3, ["a"] * 3]
    assert sampled.bytes_sampled == 12
    assert sampled.n_at_byte_cap == 0
    capped = sample_captions_bytelevel(builder, torch.zeros(1, 1, 4), n=1, temperature=1.0, top_p=1.0, max_new_bytes=1, seed=0)
    assert capped.n_at_byte_cap == 1


def test_sample_captions_bytelevel_rejects_settings(smollm2):
    builder = ByteModelBuilder(ByteModelConfig(members=["bundled:smollm2-135m"]), lm=smollm2)
    with pytest.raises(ValueError, match="temperature must be 0 or more"):
        sample_captions_bytelevel(builder, torch.zeros(1, 1, 4), n=1, temperature=-1.0, top_p=1.0, max_new_bytes=4, seed=0)
    with pytest.raises(ValueError, match="max_new_bytes must be at least 1"):
        sample_captions_bytelevel(builder, torch.zeros(1, 1, 4), n=1, temperature=1.0, top_p=1.0, max_new_bytes=0, seed=0)


# Byte models on the real LM.

def test_real_greedy_sample_is_argmax(smollm2):
    byte_lm = ByteLevelLM(smollm2.model, smollm2.tokenizer)
    greedy = byte_lm.sample(b"The quick br", max_bytes=3, temperature=0, stop=b"\n")
    expected = b""
    for _ in range(3):
        expected += bytes([int(torch.argmax(byte_lm.next_byte_logprobs(b"The quick br" + expected)))])
    assert greedy == expected
    assert greedy.startswith(b"o")


def test_image_conditioning_plain_and_chat(smollm2):
    visual = torch.randn(5, smollm2.d_model) * 0.01
    plain = build_prompt(smollm2, "plain", prefix="A picture of")
    prefix_embeds, start, prompt_bytes = image_conditioning(smollm2, plain, visual)
    assert prefix_embeds is visual
    assert start == smollm2.start_token_id
    assert prompt_bytes == b"A picture of "
    chat = build_prompt(smollm2, "chat")
    prefix_embeds, start, prompt_bytes = image_conditioning(smollm2, chat, visual)
    assert prefix_embeds.shape == (len(chat.before_image) - 1 + 5 + len(chat.after_image), smollm2.d_model)
    assert torch.equal(prefix_embeds[len(chat.before_image) - 1 : len(chat.before_image) + 4], visual)
    assert start == chat.before_image[0]
    assert prompt_bytes == b""


def test_builder_ensemble_mode_and_weights(smollm2):
    config = ByteModelConfig(members=["run", "bundled:smollm2-135m"], mode="product", weights=[3.0, 1.0])
    builder = ByteModelBuilder(config, smollm2, build_prompt(smollm2))
    assert builder.text_lms["bundled:smollm2-135m"] is smollm2  # the run's LM is reused, not loaded again
    model = builder.build(torch.zeros(4, smollm2.d_model))
    assert isinstance(model, ByteEnsemble)
    assert model.mode == "product"
    assert torch.allclose(model.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))
    image_member, text_member = model.members
    assert image_member.tree.root_length == 1 + 4  # start token and visual tokens
    assert text_member.tree.root_length == 1  # the text member does not see the image
    assert config.kind == "product"


def test_builder_proxy_and_single(smollm2):
    proxy = ByteModelBuilder(
        ByteModelConfig(members=["run", "bundled:smollm2-135m", "bundled:smollm2-135m"], mode="proxy", alpha=0.5),
        smollm2, build_prompt(smollm2),
    ).build(torch.zeros(2, smollm2.d_model))
    assert isinstance(proxy, ProxyTuned)
    assert proxy.alpha == 0.5
    single = ByteModelBuilder(ByteModelConfig(), smollm2, build_prompt(smollm2)).build(torch.zeros(2, smollm2.d_model))
    assert isinstance(single, ByteLevelLM)


def test_builder_run_member_needs_run():
    with pytest.raises(ValueError, match="needs a run"):
        ByteModelBuilder(ByteModelConfig(members=["run"]))


def test_options_parse_byte_model_from_mapping():
    options = parse_options(
        {"byte_model": {"members": ["run", "bundled:gemma3-270m"], "mode": "mixture", "weights": [1, 3]}}, ByteLevelOptions, "bytelevel"
    )
    assert options.sampler == "bytelevel"
    assert options.byte_model.kind == "mixture"
    assert options.byte_model.weights == [1.0, 3.0]


@pytest.mark.parametrize("options, message", [
    ({"byte_model": {"members": ["run", "bundled:smollm2-135m"], "mode": "average"}}, r"byte_model\.mode = 'average'"),
    ({"byte_model": {"members": ["run", "bundled:smollm2-135m"], "weights": [1.0]}}, r"weights \[1\.0\] must be 2 positive numbers"),
    ({"byte_model": {"members": ["run", "bundled:smollm2-135m"], "weights": [1.0, -1.0]}}, "must be 2 positive numbers"),
    ({"byte_model": {"members": ["run", "bundled:smollm2-135m"], "mode": "proxy"}}, "proxy mode needs 3 members"),
    ({"byte_model": {"members": []}}, r"byte_model\.members = \[\]"),
    ({"byte_model": {"member": ["run"]}}, r"byte_model\.member = \['run'\]: Extra inputs"),
    ({"temperature": 0.0}, r"temperature = 0\.0: Input should be greater than 0"),
    ({"caption_temperature": -0.5}, r"caption_temperature = -0\.5"),
    ({"max_new_bytes": 0}, r"max_new_bytes = 0"),
    ({"sampler": "token"}, "sampler 'token' is not supported"),
])
def test_bytelevel_options_reject_bad_values(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(options, ByteLevelOptions, "bytelevel")


def test_self_rewarding_sampler_option():
    assert SelfRewardingOptions().sampler == "token"
    assert parse_options({"sampler": "bytelevel", "max_new_bytes": 40}).max_new_bytes == 40
    with pytest.raises(ValueError, match=r"invalid self-rewarding treatment options: sampler = 'bytes'"):
        parse_options({"sampler": "bytes"})


def test_bytelevel_treatment_registered():
    assert isinstance(get_treatment("bytelevel"), ByteLevelTreatment)


def test_bytelevel_config_validates():
    from mmalign.config import load_config

    config = load_config(BYTELEVEL_CONFIG)
    options = parse_options(dict(config.treatment), ByteLevelOptions, "bytelevel")
    assert options.sampler == "bytelevel"


# The `bytes` command.

def test_cli_bytes_score_prints_finite_bits(capsys):
    assert main(["bytes", "score", "A red apple.", "A cat.", "--model", "bundled:smollm2-135m"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["A red apple.", "A cat."]
    for line in lines:
        bits = float(line.split("\t")[0])
        assert math.isfinite(bits)
        assert 0 < bits < 8


def test_cli_bytes_sample_greedy(capsys):
    assert main(["bytes", "sample", "The quick br", "--model", "bundled:smollm2-135m", "--temperature", "0", "--max-bytes", "3"]) == 0
    assert capsys.readouterr().out.startswith("o")


def test_cli_bytes_rejects_bad_weights_and_run(capsys):
    assert main(["bytes", "score", "A cat.", "--model", "bundled:smollm2-135m", "--model", "bundled:smollm2-135m", "--weights", "1"]) == 2
    assert "weights [1.0] must be 2 positive numbers" in capsys.readouterr().err
    assert main(["bytes", "score", "A cat.", "--model", "run"]) == 2
    assert "reads text only" in capsys.readouterr().err


def test_cli_bytes_rejects_negative_temperature(capsys):
    with pytest.raises(SystemExit):
        main(["bytes", "sample", "A", "--model", "bundled:smollm2-135m", "--temperature", "-1"])
    assert "temperature -1 is negative" in capsys.readouterr().err


# The treatment end to end on the quick preset, with the judge's scores fixed.

@pytest.fixture(scope="module")
def quick_context(tmp_path_factory):
    from mmalign.config import load_config
    from mmalign.pipeline import prepare_run

    output = tmp_path_factory.mktemp("runs")
    context = prepare_run(load_config(QUICK, {"output_dir": str(output)}))
    start = save_checkpoint(context.new_adapter(), output / "start", context.checkpoint_metadata())
    return context, start


def alternating_scores(self, references, candidates, seed):
    scores = [float(index % 2) for index in range(len(candidates))]
    return JudgeResult(scores=scores, sample_scores=[[score] for score in scores], outputs=[[""] for _ in scores])


@pytest.mark.slow
def test_bytelevel_treatment_one_iteration(quick_context, tmp_path, monkeypatch):
    context, start = quick_context
    monkeypatch.setattr(CaptionJudge, "score", alternating_scores)
    options = {"iterations": 1, "n_samples": 2, "images_per_iteration": 2, "temperature": 1.0, "max_new_bytes": 12,
               "epochs": 1, "batch_size": 2, "caption_images": 1}
    treated = ByteLevelTreatment().apply(start, TreatmentContext(context, tmp_path / "bytelevel", options, 0))
    assert [item.name for item in treated] == ["bytelevel/M1"]
    record = json.loads((tmp_path / "bytelevel" / "M1" / "self_rewarding.json").read_text())
    assert record["cost"]["sampler"] == "bytelevel"
    assert 0 < record["cost"]["bytes_sampled"] <= 2 * 2 * 12
    assert record["cost"]["sampling_lm_forward_calls"] > 0
    assert record["metrics"]["n_pairs"] == 2
    first = record["samples"][0]
    assert first["sampler"] == "bytelevel"
    assert 0 < first["reference_bits_per_byte"] < 20
    assert record["metrics"]["bytelevel_reference_bits_per_byte"] == pytest.approx(first["reference_bits_per_byte"])
    assert record["cost"]["bytelevel_caption_lm_forward_calls"] > 0
    assert record["samples"][1]["sampler"] == "token"

    again = ByteLevelTreatment().apply(start, TreatmentContext(context, tmp_path / "bytelevel", options, 0))
    assert again[0].metrics["n_pairs"] == treated[0].metrics["n_pairs"]
