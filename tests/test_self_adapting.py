"""Tests of the self-adapting treatment: ReST-EM selection, held-out sets, options, LM LoRA drift, resume."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from mmalign.adapters.checkpoint import save_checkpoint
from mmalign.adapters.compose import build_prompt
from mmalign.config import EvalConfig, ProbesConfig
from mmalign.lm import describe_lm
from mmalign.loops import self_adapting
from mmalign.loops.base import TreatmentContext, get_treatment
from mmalign.loops.self_adapting import (
    LM_LORA_DIR, LmLora, SelfAdapting, SelfAdaptingOptions, evaluate_with_lm_lora, held_out_rows, lm_lora_applied,
    measure_drift, parse_options, retention_metrics, select_self_edits,
)
from mmalign.probes.sae import fit_sae_probes
from mmalign.reports.retention import retention_matrix, retention_table, retention_tables
from small_adapter import D_VISION, N_ENCODER_TOKENS, small_adapter

ITEMS = [  # (caption, category)
    ("a red apple", "food"), ("a green pear", "food"), ("a slice of bread", "food"),
    ("a small dog", "animals"), ("a black cat", "animals"), ("a small dog", "animals"),
    ("a wooden chair", "furniture"),
    ("a yellow sun", "sky"), ("a white cloud", "sky"),
]
TEXTS = ["a red apple on a table", "a small dog runs in the park", "the sun sets over the sea", "a wooden chair by a window"]



def lm_weights(lm) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in lm.model.state_dict().items()}


def assert_original_lm(lm, weights: dict[str, torch.Tensor]) -> None:
    current = lm.model.state_dict()
    assert current.keys() == weights.keys()
    assert all(torch.equal(current[name], weights[name]) for name in weights)
    assert not [name for name, _ in lm.model.named_modules() if "lora" in name]


# ReST-EM selection and held-out sets: no model needed.

def test_select_self_edits_keeps_best_positive_per_image():
    rewards = [[0.1, 0.3, 0.2], [-0.1, 0.0, -0.5], [0.2, 0.2, None], [None, math.nan, 0.05]]
    kept, n_without = select_self_edits(rewards)
    assert [(edit.image, edit.edit) for edit in kept] == [(0, 1), (2, 0), (3, 2)]
    assert [edit.reward for edit in kept] == [0.3, 0.2, 0.05]
    assert n_without == 1


def test_select_self_edits_keep_two_ties():
    kept, n_without = select_self_edits([[0.2, 0.5, 0.5, 0.1], [0.4, -0.2, 0.0, 0.0]], keep=2)
    assert [(edit.image, edit.edit) for edit in kept] == [(0, 1), (0, 2), (1, 0)]
    assert n_without == 0


def test_select_self_edits_none_positive():
    kept, n_without = select_self_edits([[0.0, -1.0], [None, None], [-0.1, 0.0]])
    assert kept == []
    assert n_without == 3
    with pytest.raises(ValueError, match="keep must be at least 1"):
        select_self_edits([[1.0]], keep=0)


def test_held_out_rows_exclusions():
    captions = [caption for caption, _ in ITEMS]
    categories = [category for _, category in ITEMS]
    everything = list(range(len(ITEMS)))
    assert held_out_rows(0, everything, categories, captions, 8, 0) == [1, 2]
    # Row 5 repeats row 3's caption, so it is no held-out pair for row 3 (and vice versa).
    assert held_out_rows(3, everything, categories, captions, 8, 0) == [4]
    assert held_out_rows(5, everything, categories, captions, 8, 0) == [4]
    assert held_out_rows(6, everything, categories, captions, 8, 0) == []
    assert held_out_rows(0, [0, 2, 3], categories, captions, 8, 0) == [2]  # only the candidate rows


def test_held_out_rows_capped_and_seeded():
    categories = ["a"] * 20
    captions = [f"caption {i}" for i in range(20)]
    first = held_out_rows(0, range(20), categories, captions, 5, seed=3)
    assert len(first) == 5
    assert 0 not in first
    assert first == held_out_rows(0, range(20), categories, captions, 5, seed=3)
    assert first != held_out_rows(0, range(20), categories, captions, 5, seed=4)


def test_options_reject_bad_values_with_field_names():
    with pytest.raises(ValueError, match="n_edits"):
        parse_options({"n_edits": 3})
    with pytest.raises(ValueError, match="prompt_kinds"):
        parse_options({"prompt_kinds": ["summaries"]})
    with pytest.raises(ValueError, match="must be distinct"):
        parse_options({"prompt_kinds": ["paraphrases", "paraphrases"]})
    with pytest.raises(ValueError, match=r"keep_per_image \(3\) exceeds n_self_edits \(2\)"):
        parse_options({"n_self_edits": 2, "keep_per_image": 3})
    with pytest.raises(ValueError, match="rounds"):
        parse_options({"rounds": 0})
    assert parse_options({}) == SelfAdaptingOptions()


def test_treatment_registered():
    assert isinstance(get_treatment("self-adapting"), SelfAdapting)


def test_retention_metrics_round_trip_and_table():
    matrix = [[0.3], [0.2, 0.4], [0.1, 0.3, 0.5]]
    metrics = retention_metrics(matrix)
    assert metrics["retention_after_3_edit_1"] == 0.1
    assert metrics["retention_forgetting"] == pytest.approx(((0.3 - 0.1) + (0.4 - 0.3)) / 2)
    assert retention_matrix({**metrics, "n_kept": 3.0}) == matrix
    tables = retention_tables({"self-adapting/R1": metrics, "self-adapting/R2": {"n_kept": 0.0}})
    assert len(tables) == 1
    assert tables[0]["title"] == "Retention of sequential edits: self-adapting/R1"
    assert tables[0]["columns"] == ["after edit", "edit 1", "edit 2", "edit 3"]
    assert tables[0]["rows"][0] == ["after edit 1", 0.3, "", ""]
    assert tables[0]["rows"][2] == ["after edit 3", 0.1, 0.3, 0.5]
    assert retention_tables({"R1": {"n_kept": 1.0}}) == []
    with pytest.raises(ValueError, match="invalid retention metric .*edit 2 after edit 1"):
        retention_matrix({"retention_after_1_edit_2": 0.1})


def test_retention_table_renders_escaped_in_report():
    from mmalign.reports.treatments import parse_treatments, treatment_section
    from mmalign.reports.metric_sections import PlotOptions

    import pandas as pd

    table = retention_table([[0.25], [0.125, 0.5]], "Retention of sequential edits: R1 <b>")
    entry = {"name": "self-adapting", "baseline": "baseline", "iterations": ["R1"], "tables": [table]}
    frame = pd.DataFrame(columns=["checkpoint", "treatment", "layer", "token_group", "metric", "value", "ci_low", "ci_high", "n", "series"])
    html = treatment_section(frame, parse_treatments([entry]), {}, PlotOptions())
    assert "R1 &lt;b&gt;" in html
    assert "0.125" in html


# The LM LoRA on the real SmolLM2 with small SAE probes.

@pytest.fixture(scope="module")
def tiny_probes(smollm2, tmp_path_factory):
    config = ProbesConfig(layers=[3, 29], d_sae=64, steps=20, batch_tokens=64)
    texts = TEXTS * 4 + [caption for caption, _ in ITEMS]
    return fit_sae_probes(smollm2, texts, [3, 29], config, 0, tmp_path_factory.mktemp("probes"))


def test_lora_unknown_target_module_names_the_linear_modules(smollm2):
    weights = lm_weights(smollm2)
    with pytest.raises(ValueError, match=r"\['qproj'\] are not modules of .*q_proj"):
        LmLora.new(smollm2, SelfAdaptingOptions(lora_target_modules=["qproj"]))
    assert_original_lm(smollm2, weights)


def test_drift_zero_and_nonzero_lora(smollm2, tiny_probes, caplog):
    weights = lm_weights(smollm2)
    prompt = build_prompt(smollm2)
    lora = LmLora.new(smollm2, SelfAdaptingOptions(lora_r=4))
    try:
        with caplog.at_level(logging.INFO, logger="mmalign.loops"):
            zero, zero_record = measure_drift(smollm2, lora, tiny_probes, TEXTS, prompt, 16, 2)
        assert zero["lm_lora_delta_norm"] == 0.0
        assert all(abs(zero[f"drift_{kind}_layer_{layer}"]) < 1e-9 for kind in ("fvu", "mse") for layer in (3, 29))
        assert "LM changed by LoRA" not in caplog.text
        assert zero_record["layers"]["3"]["original"]["fvu"] > 0

        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            for parameter in lora.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        with caplog.at_level(logging.INFO, logger="mmalign.loops"):
            changed, record = measure_drift(smollm2, lora, tiny_probes, TEXTS, prompt, 16, 2)
        assert changed["lm_lora_delta_norm"] > 0
        assert max(abs(changed[f"drift_fvu_layer_{layer}"]) for layer in (3, 29)) > 1e-3
        assert changed["drift_fvu_layer_29"] == pytest.approx(
            record["layers"]["29"]["changed"]["fvu"] - record["layers"]["29"]["original"]["fvu"])
        # The original side is unchanged by the LoRA: it is measured with the LoRA switched off.
        assert record["layers"]["3"]["original"] == pytest.approx(zero_record["layers"]["3"]["original"])
        assert "LM changed by LoRA: drift" in caplog.text
    finally:
        lora.remove()
    assert_original_lm(smollm2, weights)


def test_saved_lora_applied_for_evaluation_then_removed(smollm2, tiny_probes, tmp_path):
    weights = lm_weights(smollm2)
    lora = LmLora.new(smollm2, SelfAdaptingOptions(lora_r=4))
    with torch.no_grad():
        for parameter in lora.parameters():
            parameter.add_(0.05)
    lora.save(tmp_path / LM_LORA_DIR)
    lora.remove()
    assert_original_lm(smollm2, weights)

    from mmalign.evaluate import Evaluator

    captions = [caption for caption, _ in ITEMS[:4]]
    config = EvalConfig(batch_size=4, n_bootstrap=20, splice_images=0, bits_per_byte_images=0, knn_k=2)
    evaluator = Evaluator(smollm2, tiny_probes, build_prompt(smollm2), captions, ["a", "a", "b", "b"], 16, config, 0)
    adapter, tokens = small_adapter(), torch.randn(4, N_ENCODER_TOKENS, D_VISION, generator=torch.Generator().manual_seed(0))
    plain, plain_loss = evaluator.evaluate(adapter, tokens, "baseline")
    changed, changed_loss = evaluate_with_lm_lora(evaluator, tmp_path / LM_LORA_DIR, adapter, tokens, "treated", "self-adapting")
    assert_original_lm(smollm2, weights)
    assert changed_loss != pytest.approx(plain_loss, rel=1e-6)
    text = changed[(changed["token_group"] == "text") & (changed["metric"] == "sae_fvu")]["value"].to_numpy()
    text_plain = plain[(plain["token_group"] == "text") & (plain["metric"] == "sae_fvu")]["value"].to_numpy()
    assert (abs(text - text_plain) > 1e-6).any()  # the text group is measured with the changed LM
    assert set(evaluator.replicates) == {"baseline", "treated"}
    # Batch evaluation of the checkpoint folder applies the same LoRA.
    from mmalign.batch_eval import evaluate_adapter

    _, batch_loss = evaluate_adapter(evaluator, tmp_path, adapter, tokens, "treated-again", "self-adapting")
    assert batch_loss == pytest.approx(changed_loss, rel=1e-6)
    assert_original_lm(smollm2, weights)
    with pytest.raises(FileNotFoundError, match="LM LoRA not found in"):
        with lm_lora_applied(smollm2, tmp_path / "missing"):
            pass
    assert_original_lm(smollm2, weights)


# The treatment on a small stand-in run, with the held-out loss fixed so every self-edit helps.

@dataclass
class StandInRun:
    """The parts of `mmalign.pipeline.RunContext` the treatment reads."""

    lm: object
    tokens: torch.Tensor
    train_rows: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5, 6])
    val_rows: list[int] = field(default_factory=lambda: [7, 8])

    def __post_init__(self) -> None:
        self.prompt = build_prompt(self.lm)
        self.dataset = SimpleNamespace(items=[SimpleNamespace(caption=caption, category=category, image_id=f"img{i}")
                                              for i, (caption, category) in enumerate(ITEMS)])
        self.config = SimpleNamespace(train=SimpleNamespace(max_caption_tokens=16), eval=SimpleNamespace(batch_size=4),
                                      adapter=SimpleNamespace(prompt_style="plain"))
        self.encoder = SimpleNamespace(describe=lambda: {"encoder_id": "random", "d_model": D_VISION})

    @property
    def val_captions(self) -> list[str]:
        return [ITEMS[row][0] for row in self.val_rows]

    def checkpoint_metadata(self) -> dict[str, object]:
        return {"vision_encoder": self.encoder.describe(), "lm": describe_lm(self.lm)}


@pytest.fixture
def treatment_setup(smollm2, tiny_probes, tmp_path, monkeypatch):
    run = StandInRun(smollm2, torch.randn(len(ITEMS), N_ENCODER_TOKENS, D_VISION, generator=torch.Generator().manual_seed(0)))
    start_dir = save_checkpoint(small_adapter(), tmp_path / "start", run.checkpoint_metadata())
    monkeypatch.setattr(self_adapting, "probe_stage", lambda context: (tiny_probes, tmp_path / "probes", 0))
    # The start adapter scores 1.0 on every held-out set and any fine-tuned copy 0.6, so every reward is 0.4.
    monkeypatch.setattr(self_adapting._Round, "held_out_loss", lambda self, adapter, rows, texts=None: 1.0 if adapter is self.adapter else 0.6)
    options = {"rounds": 1, "images_per_round": 3, "n_self_edits": 2, "max_new_tokens": 6, "inner_steps": 1,
               "lora_r": 2, "generator_epochs": 1, "adapter_epochs": 1, "retention_edits": 2, "drift_texts": 2}
    return run, start_dir, options, tmp_path / "treatment"


def test_treatment_round_saves_lora_and_resumes(treatment_setup, monkeypatch):
    run, start_dir, options, output_dir = treatment_setup
    weights = lm_weights(run.lm)
    first = SelfAdapting().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    assert_original_lm(run.lm, weights)  # the LoRA is removed before apply returns
    assert [item.name for item in first] == ["self-adapting/R1"]
    metrics = first[0].metrics
    assert metrics["n_images"] == 3
    assert metrics["n_kept"] == 3
    assert metrics["n_images_without_kept"] == 0
    assert metrics["train_images_without_held_out"] == 1  # the only furniture image
    assert metrics["retention_after_2_edit_1"] == pytest.approx(0.4)
    assert metrics["lm_lora_delta_norm"] > 0
    assert metrics["generator_loss_after"] < metrics["generator_loss_before"]
    round_dir = output_dir / "R1"
    for name in ("adapter.safetensors", "lm_lora/adapter_config.json", "self_edits.jsonl", "drift.json", "retention.json"):
        assert (round_dir / name).is_file(), name
    edits = [json.loads(line) for line in (round_dir / "self_edits.jsonl").read_text().splitlines()]
    assert len(edits) == 6
    assert sum(edit["kept"] for edit in edits) == 3
    assert json.loads((round_dir / "retention.json").read_text())["rewards"] == [[pytest.approx(0.4)], [pytest.approx(0.4)] * 2]
    tables = SelfAdapting().report_tables(output_dir)
    assert [table["title"] for table in tables] == ["Retention of sequential edits: self-adapting/R1"]

    rounds = []
    original = self_adapting._Round.run_round
    monkeypatch.setattr(self_adapting._Round, "run_round", lambda self: rounds.append(self.index) or original(self))
    loaded = []
    original_load = LmLora.load.__func__
    monkeypatch.setattr(LmLora, "load", classmethod(lambda cls, lm, directory, trainable=True: loaded.append(directory)
                                                    or original_load(cls, lm, directory, trainable)))
    second = SelfAdapting().apply(start_dir, TreatmentContext(run, output_dir, {**options, "rounds": 2}, 0))
    assert rounds == [2]
    assert loaded == [round_dir / LM_LORA_DIR]  # round 2 continues from round 1's generator
    assert [item.name for item in second] == ["self-adapting/R1", "self-adapting/R2"]
    assert second[0].metrics["n_kept"] == metrics["n_kept"]
    assert_original_lm(run.lm, weights)


def test_inner_lora_trains_then_restored(treatment_setup):
    run, _, options, _ = treatment_setup
    parsed = parse_options({**options, "inner_lm_lora": True})
    lora = LmLora.new(run.lm, parsed)
    try:
        before = lora.state()
        scoring = self_adapting._Round(run, small_adapter(), lora, {}, parsed, 1, 0)
        scored, _ = scoring.sample_rows()
        for item in scored:
            item.base_loss = 1.0
        scoring.inner_update(scoring.adapter, scored[0].row, "a red fruit on a plate", 0)
        assert any(not torch.equal(before[name], value) for name, value in lora.state().items())  # the inner step trained it
        lora.load_state(before)
        matrix = scoring.retention([(scored[0], "a red fruit"), (scored[1], "a green fruit")])
        assert matrix == [[pytest.approx(0.4)], [pytest.approx(0.4)] * 2]
        assert all(torch.equal(before[name], value) for name, value in lora.state().items())  # restored after the edits
    finally:
        lora.remove()


def test_treatment_skips_round_without_positive_reward(treatment_setup, monkeypatch):
    run, start_dir, options, output_dir = treatment_setup
    monkeypatch.setattr(self_adapting._Round, "held_out_loss", lambda self, adapter, rows, texts=None: 1.0)
    weights = lm_weights(run.lm)
    assert SelfAdapting().apply(start_dir, TreatmentContext(run, output_dir, options, 0)) == []
    record = json.loads((output_dir / "R1.skipped.json").read_text())
    assert record["metrics"]["n_kept"] == 0
    assert record["metrics"]["n_images_without_kept"] == 3
    assert not (output_dir / "R1").exists()
    assert_original_lm(run.lm, weights)


def test_treatment_rejects_results_of_other_options(treatment_setup):
    run, start_dir, options, output_dir = treatment_setup
    SelfAdapting().apply(start_dir, TreatmentContext(run, output_dir, options, 0))
    with pytest.raises(ValueError, match="another checkpoint, seed or options"):
        SelfAdapting().apply(start_dir, TreatmentContext(run, output_dir, {**options, "inner_lr": 1e-2}, 0))


# The whole `mmalign treat` path on the quick preset: a real run, its probes and the report.

@pytest.mark.slow
def test_treat_quick_run_end_to_end(tmp_path):
    from pathlib import Path

    from mmalign.commands import run_treatment
    from mmalign.config import load_config
    from mmalign.pipeline import run_pipeline

    config = load_config(Path(__file__).parent.parent / "configs" / "quick.yaml", {"output_dir": str(tmp_path)})
    run_pipeline(config)
    options = {"rounds": 1, "images_per_round": 4, "n_self_edits": 3, "max_new_tokens": 8, "inner_steps": 2,
               "lora_r": 2, "generator_epochs": 1, "adapter_epochs": 1, "retention_edits": 2, "drift_texts": 4}
    treat_config = config.model_copy(update={"treatment": options})
    results, treated, output_dir = run_treatment(treat_config, "self-adapting", tmp_path / "quick" / "checkpoints" / "final")
    summary = json.loads((output_dir / "treatment.json").read_text())
    if not treated:  # every self-edit raised the held-out loss: the round is recorded as skipped
        assert (output_dir / "R1.skipped.json").is_file()
        assert summary == []
        pytest.skip("no self-edit had a positive reward on the quick run; the saved-round path was not reached")
    assert [item.name for item in treated] == ["self-adapting/R1"]
    assert (output_dir / "R1" / LM_LORA_DIR / "adapter_config.json").is_file()
    assert {"drift_fvu_layer_3", "drift_fvu_layer_29", "lm_lora_delta_norm"} <= summary[0]["metrics"].keys()
    deltas = results[(results["checkpoint"] == "self-adapting/R1") & results["metric"].str.startswith("delta:")]
    assert not deltas.empty
    report = (output_dir / "report.html").read_text()
    assert "self-adapting/R1" in report
    if "retention_after_1_edit_1" in summary[0]["metrics"]:
        assert "Retention of sequential edits: self-adapting/R1" in report
