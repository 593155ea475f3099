"""The `evaluate`, `compare` and `treat` commands: batch evaluation, paired run comparison, treatments."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import yaml

from mmalign.adapters.checkpoint import load_checkpoint
from mmalign.batch_eval import evaluate_adapter
from mmalign.config import ConfigError, RunConfig, load_config, parse_config
from mmalign.evaluate import Evaluator, paired_deltas
from mmalign.reports.results_io import write_results
from mmalign.io import write_atomic, write_parquet_atomic
from mmalign.lm import describe_lm
from mmalign.pipeline import RunContext, evaluate_stage, prepare_run, probe_stage

logger = logging.getLogger("mmalign")


def _evaluator(context: RunContext, probes: dict) -> Evaluator:
    config = context.config
    categories = [context.dataset.items[i].category for i in context.val_rows]
    return Evaluator(context.lm, probes, context.prompt, context.val_captions, categories,
                     config.train.max_caption_tokens, config.eval, config.seed)


def run_evaluate(config: RunConfig, checkpoints: list[Path], executor: str = "local", workers: int = 2,
                 ray_address: str | None = None) -> Path:
    """Evaluate checkpoints with the run's probes into its results store; return `results.parquet`.

    Args:
        executor: `local` (this process) or `ray` (Ray actors, each loading the models once).
        workers: Ray actors to start.
        ray_address: A running Ray cluster; None starts a local instance on 127.0.0.1.
    """
    from mmalign.batch_eval import ResultsStore, checkpoint_hash, metric_set_hash
    from mmalign.pipeline import build_manifest

    context = prepare_run(config)
    probes, probe_dir, n_fit_texts = probe_stage(context)
    run_dir = context.run_dir.resolve()
    named = []
    for path in checkpoints:
        resolved = path.resolve()
        name = resolved.name if resolved.parent == run_dir / "checkpoints" else str(path)
        named.append((name, path, "none"))
    if executor == "ray":
        from mmalign.ray_executor import evaluate_with_ray

        with context.timer.stage("evaluate"):
            evaluate_with_ray(config, context.run_dir, named, workers, ray_address)
        metric_set = metric_set_hash(config, probe_dir, context.dataset.fingerprint(), context.val_rows)
        results = ResultsStore(context.run_dir / "results").combined(metric_set)
        write_results(results, context.run_dir / "results.parquet")
        manifest = build_manifest(context, probe_dir, n_fit_texts,
                                  {name: {"path": str(path), "hash": checkpoint_hash(path)} for name, path, _ in named})
        write_atomic(context.run_dir / "manifest.json", json.dumps({**manifest, "executor": "ray"}, indent=2, default=str))
    elif executor == "local":
        results, _, _ = evaluate_stage(context, probes, probe_dir, n_fit_texts, named)
    else:
        raise ValueError(f"unknown executor {executor!r}; accepted: local, ray")
    errors = results[results["error"].fillna("") != ""] if "error" in results else results.iloc[0:0]
    for _, row in errors.iterrows():
        logger.error("checkpoint %s: %s", row["checkpoint"], row["error"])
    return context.run_dir / "results.parquet"


def _run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (config.yaml not found)")
    return parse_config(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))


def run_compare(run_a: Path, run_b: Path, output: Path) -> pd.DataFrame:
    """Compare the final adapters of two runs on run A's validation images and probes.

    Differences are B minus A with paired bootstrap intervals (the same image resamples
    for both). The runs must share the vision encoder, the LM and the dataset.

    Raises:
        ValueError: when the runs use different models or data.
    """
    config_a, config_b = _run_config(run_a), _run_config(run_b)
    for section in ("vision_encoder", "lm", "data"):
        if getattr(config_a, section) != getattr(config_b, section):
            raise ValueError(
                f"cannot compare {run_a} and {run_b}: their {section} settings differ; "
                "compare runs that share the vision encoder, the LM and the dataset"
            )
    context = prepare_run(config_a, run_a)
    probes, _, _ = probe_stage(context)
    evaluator = _evaluator(context, probes)
    tokens = context.tokens[context.val_rows]
    frames = []
    for label, run in (("A", run_a), ("B", run_b)):
        adapter, _ = load_checkpoint(run / "checkpoints" / "final", context.encoder.describe(), describe_lm(context.lm))
        frame, _ = evaluator.evaluate(adapter, tokens, label)
        frames.append(frame)
    results = pd.concat(frames, ignore_index=True)
    deltas = paired_deltas(evaluator, results, "B", "A")
    comparison = deltas.rename(columns={"value": "difference"})
    comparison["metric"] = comparison["metric"].str.removeprefix("delta:")
    values = results.pivot_table(index=["layer", "token_group", "metric"], columns="checkpoint", values="value").reset_index()
    comparison = comparison.merge(values.rename(columns={"A": "run_a", "B": "run_b"}), on=["layer", "token_group", "metric"], how="left")
    comparison = comparison[["layer", "token_group", "metric", "run_a", "run_b", "difference", "ci_low", "ci_high", "n"]]
    output.mkdir(parents=True, exist_ok=True)
    from mmalign.reports.html import render_full_report, write_report

    html = render_full_report(results, title=f"mmalign comparison: {run_b.name} minus {run_a.name}", controls=None,
                              config=config_a.model_dump(), manifest={"A": str(run_a), "B": str(run_b)}, comparison=comparison)
    write_report(output / "report.html", html)
    write_parquet_atomic(comparison, output / "comparison.parquet")
    write_atomic(output / "comparison.csv", comparison.to_csv(index=False))
    write_atomic(output / "runs.json", json.dumps({"A": str(run_a), "B": str(run_b)}, indent=2))
    return comparison


def run_treatment(config: RunConfig, name: str, checkpoint: Path) -> tuple[pd.DataFrame, list, Path]:
    """Apply a treatment, then evaluate the baseline and every treated checkpoint with the same probes.

    Returns the results (with `delta:*` rows against the baseline), the treated
    checkpoints and the treatment's directory.
    """
    from mmalign.loops.base import TreatmentContext, get_treatment

    treatment = get_treatment(name)
    # A checkpoint inside a run (RUN/checkpoints/NAME) is treated in that run, so its
    # probes are reused and the treated checkpoints land beside the baseline.
    inside_run = checkpoint.resolve().parent.name == "checkpoints"
    run_dir = checkpoint.resolve().parent.parent if inside_run else None
    context = prepare_run(config, run_dir, write_config=not inside_run)
    output_dir = context.run_dir / "treatments" / name
    treated = treatment.apply(checkpoint, TreatmentContext(context, output_dir, dict(config.treatment), config.seed))
    probes, _, _ = probe_stage(context)
    evaluator = _evaluator(context, probes)
    tokens = context.tokens[context.val_rows]
    frames = []
    with context.timer.stage("evaluate treatment"):
        baseline, _ = load_checkpoint(checkpoint, context.encoder.describe(), describe_lm(context.lm))
        frame, _ = evaluator.evaluate(baseline, tokens, "baseline", "none")
        frames.append(frame)
        for item in treated:
            adapter, _ = load_checkpoint(item.directory, context.encoder.describe(), describe_lm(context.lm))
            frame, loss = evaluate_adapter(evaluator, item.directory, adapter, tokens, item.name, name)
            item.metrics.setdefault("validation_caption_loss", loss)
            frames.append(frame)
        results = pd.concat(frames, ignore_index=True)
        deltas = [paired_deltas(evaluator, results, item.name, "baseline", name) for item in treated]
        results = pd.concat([results, *deltas], ignore_index=True)
    results["error"] = ""
    write_results(results, output_dir / "results.parquet")
    summary = [{"name": item.name, "directory": str(item.directory), "metrics": item.metrics, "cost": item.cost,
                "samples": item.samples} for item in treated]
    write_atomic(output_dir / "treatment.json", json.dumps(summary, indent=2, default=str))
    _treatment_report(context, name, results, treated, output_dir, treatment.report_tables(output_dir))
    return results, treated, output_dir


def _numeric(values: dict) -> dict[str, float]:
    return {key: float(value) for key, value in values.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _treatment_report(context: RunContext, name: str, results: pd.DataFrame, treated: list, output_dir: Path,
                      tables: list[dict] | None = None) -> Path:
    """Write `report.html` of a treatment: per-layer deltas, per-iteration metrics, cost and samples."""
    from mmalign.reports.html import render_full_report, write_report

    cost: dict[str, float] = {}
    for item in treated:
        for key, value in _numeric(item.cost).items():
            cost[key] = cost.get(key, 0.0) + value
    entry = {
        "name": name, "baseline": "baseline", "iterations": [item.name for item in treated],
        "metrics": {item.name: _numeric(item.metrics) for item in treated}, "cost": cost,
        "tables": tables or [],
    }
    samples = [{"checkpoint": item.name, "reference": sample.get("reference", ""), "generated": sample.get("caption", sample.get("generated", ""))}
               for item in treated for sample in item.samples[:5]]
    html = render_full_report(
        results, title=f"mmalign treatment report: {name} on {context.config.name}", controls=None,
        config=context.config.model_dump(), manifest={"treatment": name, "checkpoints": entry["iterations"]},
        stage_times=dict(context.timer.seconds), samples=samples or None, treatments=[entry],
    )
    path = output_dir / "report.html"
    write_report(path, html)
    return path


def load_run_config(path: Path, output: Path | None) -> RunConfig:
    return load_config(path, {"output_dir": str(output)} if output else None)
