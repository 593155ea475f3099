"""The `mmalign report` command: render results files or run directories into one HTML page.

A run directory contributes its `results.parquet` and, when present, `controls.json`,
`manifest.json`, `config.yaml`, the sample captions logged in `train_metrics.jsonl` and
the top SAE features of example images in `feature_examples.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmalign.reports.features import FEATURES_FILE, read_feature_examples
from mmalign.reports.html import render_full_report, write_report
from mmalign.reports.results_io import ResultsFormatError, read_many

logger = logging.getLogger("mmalign.reports")

RESULTS_FILE = "results.parquet"


@dataclass
class ReportInputs:
    """Results files and the run files found next to them, keyed by run name."""

    results_paths: list[Path] = field(default_factory=list)
    controls: dict[str, dict[str, float]] = field(default_factory=dict)
    manifests: dict[str, Any] = field(default_factory=dict)
    configs: dict[str, Any] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    feature_examples: dict[str, Any] = field(default_factory=dict)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `report` subcommand to an argparse subparsers object.

    The subcommand sets `handler` to `command_report`, which takes the parsed arguments
    and returns an exit code: 0 on success, 2 for missing or invalid input.
    """
    parser = subparsers.add_parser(
        "report",
        help="Render results files or run directories into one self-contained HTML report.",
        description=(
            "Render one HTML report from results files or run directories. A run directory "
            "contributes its results.parquet and, when present, controls.json, manifest.json, "
            "config.yaml, the sample captions in train_metrics.jsonl and the feature examples in "
            "feature_examples.json."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="RESULTS",
        help="results.parquet files or run directories; a quoted glob pattern such as 'runs/*' is expanded.",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="HTML file to write; its directory must exist.")
    parser.add_argument("--title", default=None, help="Page title (default: 'mmalign report: ' and the input names).")
    parser.add_argument(
        "--heatmaps",
        default=None,
        metavar="METRICS",
        help="Comma-separated metrics that get layer x checkpoint heatmaps, or 'all' (default: a few headline metrics).",
    )
    parser.add_argument(
        "--max-curves",
        type=int,
        default=7,
        metavar="N",
        help="Most checkpoints drawn as curves in one plot; more are thinned evenly in training order (default 7).",
    )
    parser.set_defaults(handler=command_report)


def command_report(args: argparse.Namespace) -> int:
    """Render the report that `args` describes and write it to `args.output`.

    Returns:
        0 on success. 2 after printing one `mmalign: error: ...` line to stderr when an
        input is missing or invalid or the report cannot be written.
    """
    try:
        inputs = collect_inputs(args.inputs)
        results = read_many(inputs.results_paths)
        title = args.title or "mmalign report: " + ", ".join(str(path) for path in args.inputs)
        heatmaps: list[str] | str | None = None
        if args.heatmaps and args.heatmaps.strip() == "all":
            heatmaps = "all"
        elif args.heatmaps:
            heatmaps = [name.strip() for name in args.heatmaps.split(",") if name.strip()]
        document = render_full_report(
            results,
            title=title,
            controls=_single_or_keyed(inputs.controls) or None,
            config=_single_or_keyed(inputs.configs),
            manifest=_single_or_keyed(inputs.manifests),
            samples=inputs.samples or None,
            heatmap_metrics=heatmaps,
            max_curve_checkpoints=args.max_curves,
            feature_examples=_single_or_keyed(inputs.feature_examples) or None,
        )
        write_report(args.output, document)
    except (ResultsFormatError, ValueError, OSError) as error:
        message = " ".join(str(error).split())
        print(f"mmalign: error: {message}", file=sys.stderr)
        return 2
    print(f"report: {args.output}")
    return 0


def collect_inputs(arguments: Sequence[str]) -> ReportInputs:
    """Resolve command-line inputs into results files and the run files beside them.

    Args:
        arguments: Results files, run directories or glob patterns.

    Returns:
        The results paths and the controls, manifests, configs, samples and feature
        examples of every run directory, keyed by run name.

    Raises:
        ResultsFormatError: If no input is given, a pattern matches nothing, a path does
            not exist, or a run directory has no results.parquet.
        ValueError: If a run file is not valid JSON or YAML, or `feature_examples.json`
            lacks fields the report reads.
    """
    if not arguments:
        raise ResultsFormatError("no results files given. Pass results.parquet files or run directories.")
    paths: list[Path] = []
    for argument in arguments:
        if Path(argument).exists():
            paths.append(Path(argument))
        elif glob.has_magic(argument):
            matches = sorted(glob.glob(argument))
            if not matches:
                raise ResultsFormatError(f"no results file or run directory matches {argument!r}")
            paths.extend(Path(match) for match in matches)
        else:
            raise ResultsFormatError(f"results file or run directory {argument} not found")

    inputs = ReportInputs()
    run_directories = [path for path in paths if path.is_dir()]
    names = [path.name or str(path) for path in run_directories]
    # Two runs with the same directory name are labelled by their full paths instead.
    names = [name if names.count(name) == 1 else str(path) for name, path in zip(names, run_directories)]
    for path in paths:
        if not path.is_dir():
            inputs.results_paths.append(path)
            continue
        name = names[run_directories.index(path)]
        results = path / RESULTS_FILE
        if not results.is_file():
            raise ResultsFormatError(f"run directory {path} has no {RESULTS_FILE}. Run `mmalign evaluate` on it first.")
        inputs.results_paths.append(results)
        _load_run_files(path, name, inputs, prefix_samples=len(run_directories) > 1)
    return inputs


def _load_run_files(directory: Path, name: str, inputs: ReportInputs, *, prefix_samples: bool) -> None:
    controls = directory / "controls.json"
    if controls.is_file():
        losses = _read_json(controls)
        if not isinstance(losses, dict):
            raise ValueError(f"{controls} must contain a JSON object of control name -> loss, got {type(losses).__name__}")
        inputs.controls[name] = losses
    manifest = directory / "manifest.json"
    if manifest.is_file():
        inputs.manifests[name] = _read_json(manifest)
    config = directory / "config.yaml"
    if config.is_file():
        try:
            inputs.configs[name] = yaml.safe_load(config.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ValueError(f"{config} is not valid YAML: {error}") from error
    metrics = directory / "train_metrics.jsonl"
    if metrics.is_file():
        inputs.samples.extend(read_samples(metrics, prefix=f"{name}/" if prefix_samples else ""))
    features = directory / FEATURES_FILE
    if features.is_file():
        inputs.feature_examples[name] = read_feature_examples(features)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_samples(path: Path, *, prefix: str = "") -> list[dict[str, str]]:
    """Collect the sample captions logged in a `train_metrics.jsonl` file.

    Each record with a `samples` list gives samples labelled with the checkpoint name of
    its step, `step_NNNNNN`. Lines that are not JSON objects, such as a line cut short by
    an interrupted run, are skipped and counted in a warning.

    Args:
        path: The JSON Lines file written during training.
        prefix: Text put before each checkpoint label, such as the run name.

    Returns:
        Dicts with `checkpoint`, `reference` and `generated`.
    """
    samples: list[dict[str, str]] = []
    skipped = 0
    with path.open(encoding="utf-8") as stream:
        for line in stream:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
                continue
            if not isinstance(record.get("samples"), list):
                continue
            step = record.get("step")
            checkpoint = f"{prefix}step_{step:06d}" if isinstance(step, int) else f"{prefix}step {step}"
            for sample in record["samples"]:
                if isinstance(sample, dict) and "reference" in sample and "generated" in sample:
                    reference, generated = str(sample["reference"]), str(sample["generated"])
                    samples.append({"checkpoint": checkpoint, "reference": reference, "generated": generated})
                else:
                    skipped += 1
    if skipped:
        logger.warning("skipped %d unreadable lines or samples in %s", skipped, path)
    return samples


def _single_or_keyed(by_run: dict[str, Any]) -> Any:
    """Return the only run's value as is, or all values keyed by run name."""
    if len(by_run) == 1:
        return next(iter(by_run.values()))
    return by_run
