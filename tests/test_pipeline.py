"""The quick preset end to end: every stage runs and the run directory contains its outputs."""

import json
from pathlib import Path

import pandas as pd
import pytest

from mmalign.cli import main
from mmalign.config import load_config
from mmalign.evaluate import RESULT_COLUMNS
from mmalign.pipeline import run_pipeline

QUICK = Path(__file__).resolve().parent.parent / "configs" / "quick.yaml"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    config = load_config(QUICK, {"output_dir": str(output)})
    return run_pipeline(config)


def test_quick_run_writes_report_and_results(quick_run):
    assert quick_run.report_path.is_file()
    results = pd.read_parquet(quick_run.results_path)
    assert list(results.columns[: len(RESULT_COLUMNS)]) == RESULT_COLUMNS
    assert set(results["token_group"]) == {"image", "caption", "text", "pair", "image/text"}
    assert set(results["layer"]) == {-1, 3, 29}  # -1: caption bits per byte, not layer-specific
    expected = {"sae_mse", "sae_fvu", "sae_explained_variance", "sae_cosine", "sae_l0", "sae_l2_ratio", "sae_dead_latents",
                "cka_linear", "cka_unbiased", "mutual_knn", "cknna", "svcca", "retrieval_i2t_r1", "retrieval_t2i_r5",
                "modality_gap", "norm_ratio", "feature_jaccard", "ce_loss_recovered", "kl_score", "cka_linear@shuffled"}
    assert expected <= set(results["metric"])
    assert {"final", "null:untrained", "step_000004"} <= set(results["checkpoint"])
    assert (results["error"] == "").all()


def test_quick_run_rerun_skips_done_checkpoints(quick_run, caplog):
    import logging

    config = load_config(QUICK, {"output_dir": str(quick_run.run_dir.parent)})
    with caplog.at_level(logging.INFO, logger="mmalign"):
        run_pipeline(config)
    assert "final already done" in caplog.text
    assert "null:untrained already done" in caplog.text


def test_quick_run_records_three_control_losses(quick_run):
    controls = json.loads((quick_run.run_dir / "controls.json").read_text())
    assert set(controls) == {"trained adapter", "untrained adapter", "trained adapter, shuffled images"}
    assert all(value > 0 for value in controls.values())
    html = quick_run.report_path.read_text(encoding="utf-8")
    assert "shuffled images" in html


def test_quick_run_checkpoint_and_probes_on_disk(quick_run):
    final = quick_run.run_dir / "checkpoints" / "final"
    assert (final / "adapter.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["lm"]["lm_id"] == "bundled:smollm2-135m"
    assert config["vision_encoder"]["encoder_id"] == "bundled:dinov2-small"
    probe_dirs = sorted(quick_run.run_dir.glob("probes/*/layer_*"))
    assert [p.name for p in probe_dirs] == ["layer_03", "layer_29"]
    assert all((p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file() for p in probe_dirs)


def test_sae_probe_opens_with_sae_lens(quick_run):
    from sae_lens import SAE

    probe = sorted(quick_run.run_dir.glob("probes/*/layer_03"))[0]
    sae = SAE.load_from_disk(probe)
    assert sae.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert sae.cfg.metadata.model_name == "bundled:smollm2-135m"


def test_cli_reports_invalid_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("probes:\n  layers: []\n")
    assert main(["run", str(bad)]) == 2
    assert "probes.layers" in capsys.readouterr().err


def test_limber_preset_adapter_trains_briefly(tmp_path):
    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "limber.yaml", {"output_dir": str(tmp_path)})
    config = config.model_copy(update={
        "data": config.data.model_copy(update={"spec": "samples"}),
        "vision_encoder": config.vision_encoder.model_copy(update={"image_size": 112}),
        "train": config.train.model_copy(update={"steps": 2, "batch_size": 4, "eval_every": 0, "save_every": 0}),
    })
    from mmalign.pipeline import prepare_run, train_stage

    context = prepare_run(config)
    adapter = train_stage(context)
    assert adapter.kind == "linear-prefix"
    assert adapter.n_visual_tokens == 4
    assert (tmp_path / "limber" / "checkpoints" / "final" / "adapter_config.json").is_file()


def test_evaluate_broken_checkpoint_becomes_error_row(quick_run, tmp_path):
    from mmalign.batch_eval import expand_checkpoints
    from mmalign.commands import run_evaluate

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    config = load_config(QUICK, {"output_dir": str(quick_run.run_dir.parent)})
    final = quick_run.run_dir / "checkpoints" / "final"
    results = pd.read_parquet(run_evaluate(config, expand_checkpoints([str(broken), str(final)], None)))
    errors = results[results["error"] != ""]
    assert list(errors["checkpoint"]) == [str(broken)]
    assert "missing adapter.safetensors" in errors["error"].iloc[0]
    assert (results[results["checkpoint"] == "final"]["error"] == "").all()


def test_evaluate_with_probes_loaded_from_disk(quick_run, tmp_path):
    """SAEs saved in sae-lens's format load through probes.source and run the whole evaluation."""
    from mmalign.batch_eval import expand_checkpoints
    from mmalign.commands import run_evaluate

    import yaml

    probe_root = sorted(quick_run.run_dir.glob("probes/*/layer_03"))[0].parent
    probes = {**yaml.safe_load(QUICK.read_text())["probes"], "source": f"disk:{probe_root}/layer_{{layer:02d}}"}
    config = load_config(QUICK, {"output_dir": str(quick_run.run_dir.parent), "probes": probes})
    final = quick_run.run_dir / "checkpoints" / "final"
    results = pd.read_parquet(run_evaluate(config, expand_checkpoints([str(final)], None)))
    assert (results["error"] == "").all()
    fvu = results[(results["metric"] == "sae_fvu") & (results["token_group"] == "image")]
    assert sorted(fvu["layer"]) == [3, 29]
    assert fvu["value"].notna().all()


def test_evaluate_empty_glob_is_an_error():
    from mmalign.batch_eval import expand_checkpoints

    with pytest.raises(ValueError, match="matched no checkpoint"):
        expand_checkpoints([], "/nonexistent/step_*")
    with pytest.raises(ValueError, match="no checkpoints given"):
        expand_checkpoints([], None)


def test_compare_run_with_itself_is_zero(quick_run, tmp_path):
    from mmalign.commands import run_compare

    comparison = run_compare(quick_run.run_dir, quick_run.run_dir, tmp_path / "compare")
    assert len(comparison) > 0
    finite = comparison.dropna(subset=["difference"])
    assert (finite["difference"].abs() < 1e-9).all()
    assert (finite["ci_low"].abs() < 1e-9).all() and (finite["ci_high"].abs() < 1e-9).all()
    assert (tmp_path / "compare" / "comparison.csv").is_file()


@pytest.mark.slow
def test_ray_executor_matches_local(quick_run, tmp_path):
    pytest.importorskip("ray")
    import shutil

    from mmalign.commands import run_evaluate

    copy = tmp_path / "quick"
    shutil.copytree(quick_run.run_dir, copy, ignore=shutil.ignore_patterns("results", "results.parquet"))
    checkpoints = sorted((copy / "checkpoints").glob("step_*")) + [copy / "checkpoints" / "final"]
    config = load_config(QUICK, {"output_dir": str(tmp_path)})
    result = pd.read_parquet(run_evaluate(config, checkpoints, executor="ray", workers=2))
    local = pd.read_parquet(quick_run.results_path)
    assert {"final", "step_000004"} <= set(result["checkpoint"])
    merged = result.merge(local, on=["checkpoint", "layer", "token_group", "metric"], suffixes=("_ray", "_local"))
    assert len(merged) > 100
    assert (merged["value_ray"] - merged["value_local"]).abs().max() < 1e-5


def test_quick_run_has_bits_per_byte(quick_run):
    results = pd.read_parquet(quick_run.results_path)
    final = results[(results["checkpoint"] == "final") & (results["layer"] == -1)].set_index("metric")["value"]
    # the byte-level likelihood sums over all tokenizations, so it is at least the canonical one
    assert final["caption_bits_per_byte"] <= final["caption_bits_per_byte_canonical"] + 1e-9
    assert 0 < final["caption_bits_per_byte"] < 8
