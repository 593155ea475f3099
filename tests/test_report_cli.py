"""Tests for the `mmalign report` subcommand in mmalign.reports.cli, on a parser of their own."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from mmalign.reports.cli import read_samples, register_cli
from mmalign.reports.results_io import MMALIGN_VERSION_KEY, SCHEMA_VERSION_KEY, write_results

HOSTILE_CAPTION = "<script>alert(1)</script> a cat"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmalign")
    commands = parser.add_subparsers(dest="command", required=True)
    register_cli(commands)
    return parser


def run_report(argv: list[str]) -> int:
    args = build_parser().parse_args(["report", *argv])
    return args.handler(args)


def make_results(checkpoints: tuple[str, ...] = ("final",)) -> pd.DataFrame:
    rows = [
        {
            "checkpoint": checkpoint,
            "treatment": "none",
            "layer": layer,
            "token_group": "pair",
            "metric": "cka_linear",
            "value": 0.1 * layer + 0.01 * index,
            "ci_low": math.nan,
            "ci_high": math.nan,
            "n": 16,
        }
        for index, checkpoint in enumerate(checkpoints)
        for layer in range(2)
    ]
    return pd.DataFrame(rows)


def make_run(directory: Path, checkpoints: tuple[str, ...] = ("final",)) -> Path:
    directory.mkdir(parents=True)
    write_results(make_results(checkpoints), directory / "results.parquet")
    (directory / "controls.json").write_text(json.dumps({"trained adapter": 2.0, "untrained adapter": 3.5}))
    (directory / "manifest.json").write_text(json.dumps({"dataset": {"name": "coco-mini 字幕"}}))
    (directory / "config.yaml").write_text(yaml.safe_dump({"name": directory.name, "seed": 7}))
    records = [
        {"step": 1, "loss": 3.0},
        {"step": 40, "loss": 2.5, "val_loss": 2.6, "samples": [{"reference": "a cat on a sofa", "generated": HOSTILE_CAPTION}]},
    ]
    lines = [json.dumps(record) for record in records] + ['{"step": 41, "loss": 2.4']  # cut short by an interrupt
    (directory / "train_metrics.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def test_report_cli_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "demo")
    output = tmp_path / "report.html"
    assert run_report([str(run), "-o", str(output), "--title", "Demo 😀"]) == 0
    document = output.read_text(encoding="utf-8")
    assert "<h1>Demo 😀</h1>" in document
    assert "verdict-pass" in document
    assert "coco-mini 字幕" in document
    assert "&quot;seed&quot;: 7" in document
    assert "step_000040" in document
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a cat" in document
    assert capsys.readouterr().out == f"report: {output}\n"


def test_report_cli_results_file(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    write_results(make_results(), path)
    output = tmp_path / "report.html"
    assert run_report([str(path), "-o", str(output)]) == 0
    document = output.read_text(encoding="utf-8")
    assert f"mmalign report: {path}" in document
    assert "No control losses were given" in document


def test_report_cli_two_runs_and_glob(tmp_path: Path) -> None:
    make_run(tmp_path / "runs" / "alpha", ("alpha-final",))
    make_run(tmp_path / "runs" / "beta", ("beta-final", "beta-extra"))
    output = tmp_path / "report.html"
    assert run_report([str(tmp_path / "runs" / "*"), "-o", str(output), "--heatmaps", "all"]) == 0
    document = output.read_text(encoding="utf-8")
    assert "<h3>alpha</h3>" in document
    assert "<h3>beta</h3>" in document
    assert "alpha/step_000040" in document
    assert "-heat-0-figure_1" in document  # two checkpoints give a heatmap


def test_read_samples_skips_cut_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = make_run(tmp_path / "demo")
    samples = read_samples(run / "train_metrics.jsonl", prefix="demo/")
    assert samples == [{"checkpoint": "demo/step_000040", "reference": "a cat on a sofa", "generated": HOSTILE_CAPTION}]
    assert "skipped 1 unreadable lines or samples" in caplog.text


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mmalign: error: ")
    return lines[0]


def test_report_cli_no_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_report(["-o", str(tmp_path / "report.html")]) == 2
    assert "no results files given" in error_line(capsys)
    assert not (tmp_path / "report.html").exists()


def test_report_cli_empty_glob(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pattern = str(tmp_path / "runs" / "*" / "results.parquet")
    assert run_report([pattern, "-o", str(tmp_path / "report.html")]) == 2
    assert f"no results file or run directory matches '{pattern}'" in error_line(capsys)


def test_report_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_report([str(tmp_path / "absent.parquet"), "-o", str(tmp_path / "report.html")]) == 2
    assert "absent.parquet not found" in error_line(capsys)


def test_report_cli_run_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty-run").mkdir()
    assert run_report([str(tmp_path / "empty-run"), "-o", str(tmp_path / "report.html")]) == 2
    assert "has no results.parquet" in error_line(capsys)


def test_report_cli_other_schema_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.parquet"
    table = pa.Table.from_pandas(make_results(), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: b"7", MMALIGN_VERSION_KEY: b"2.0.0"}), path)
    assert run_report([str(path), "-o", str(tmp_path / "report.html")]) == 2
    line = error_line(capsys)
    assert "written by mmalign 2.0.0 with results schema v7; this mmalign reads v1" in line


def test_report_cli_missing_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.parquet"
    table = pa.Table.from_pandas(make_results().drop(columns=["metric"]), preserve_index=False)
    pq.write_table(table.replace_schema_metadata({SCHEMA_VERSION_KEY: b"1"}), path)
    assert run_report([str(path), "-o", str(tmp_path / "report.html")]) == 2
    assert "missing required columns: metric" in error_line(capsys)


def test_report_cli_invalid_controls(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "demo")
    (run / "controls.json").write_text("{not json")
    assert run_report([str(run), "-o", str(tmp_path / "report.html")]) == 2
    assert "controls.json is not valid JSON" in error_line(capsys)


def test_report_cli_output_directory_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "results.parquet"
    write_results(make_results(), path)
    assert run_report([str(path), "-o", str(tmp_path / "absent" / "report.html")]) == 2
    assert "does not exist" in error_line(capsys)


def test_report_cli_output_required() -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["report", "results.parquet"])
    assert exit_info.value.code == 2
