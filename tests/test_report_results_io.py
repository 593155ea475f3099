"""Tests for mmalign.reports.results_io: versioned, atomic parquet results files."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmalign.reports.results_io import (
    MMALIGN_VERSION_KEY,
    RESULTS_SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    ResultsFormatError,
    read_many,
    read_results,
    write_results,
)


def make_results(checkpoint: str = "final", *, with_error: bool = False) -> pd.DataFrame:
    rows = [
        {
            "checkpoint": checkpoint,
            "treatment": "none",
            "layer": layer,
            "token_group": group,
            "metric": "sae_fvu",
            "value": 0.5 + 0.1 * layer,
            "ci_low": 0.45 + 0.1 * layer,
            "ci_high": math.nan if layer == 1 else 0.55 + 0.1 * layer,
            "n": 64,
        }
        for layer in range(3)
        for group in ("image", "text")
    ]
    frame = pd.DataFrame(rows)
    if with_error:
        frame["error"] = None
        failed = {column: math.nan for column in frame.columns}
        failed.update(checkpoint="step_000040", treatment="none", error="out of memory")
        frame = pd.concat([frame, pd.DataFrame([failed])], ignore_index=True)
    return frame


def write_with_metadata(frame: pd.DataFrame, path: Path, metadata: dict[bytes, bytes]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    pq.write_table(table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata}), path)


def test_write_results_round_trip(tmp_path: Path) -> None:
    frame = make_results(with_error=True)
    path = tmp_path / "nested" / "results.parquet"
    write_results(frame, path)
    actual = read_results(path)
    # pandas 3 reads text columns back with its string dtype, so dtypes and the form of a
    # missing error (None or NaN) may differ from the frame written.
    pd.testing.assert_frame_equal(actual.drop(columns="error"), frame.drop(columns="error"), check_dtype=False)
    assert actual["error"].isna().tolist() == frame["error"].isna().tolist()
    assert actual["error"].dropna().tolist() == ["out of memory"]


def test_write_results_stores_versions(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    write_results(make_results(), path)
    metadata = pq.read_schema(path).metadata
    assert metadata[SCHEMA_VERSION_KEY] == str(RESULTS_SCHEMA_VERSION).encode()
    assert metadata[MMALIGN_VERSION_KEY]
    assert b"pandas" in metadata  # pandas' own metadata is kept


def test_write_results_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    write_results(make_results("a"), path)
    write_results(make_results("b"), path)
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["results.parquet"]
    assert set(read_results(path)["checkpoint"]) == {"b"}


def test_write_results_failed_replace_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "results.parquet"
    write_results(make_results("old"), path)

    def fail_replace(source: str, destination: str) -> None:
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="simulated"):
        write_results(make_results("new"), path)
    monkeypatch.undo()
    assert set(read_results(path)["checkpoint"]) == {"old"}
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["results.parquet"]


def test_write_results_missing_columns_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing required columns ci_low, n"):
        write_results(make_results().drop(columns=["ci_low", "n"]), tmp_path / "results.parquet")


def test_read_results_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.parquet"
    with pytest.raises(ResultsFormatError, match=re.escape(f"results file {path} not found")):
        read_results(path)


def test_read_results_directory(tmp_path: Path) -> None:
    with pytest.raises(ResultsFormatError, match="is a directory"):
        read_results(tmp_path)


def test_read_results_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    path.write_text("checkpoint,value\nfinal,0.5\n", encoding="utf-8")
    with pytest.raises(ResultsFormatError, match="is not a readable parquet file") as error:
        read_results(path)
    assert str(path) in str(error.value)


def test_read_results_without_version(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    make_results().to_parquet(path, index=False)
    with pytest.raises(ResultsFormatError) as error:
        read_results(path)
    message = str(error.value)
    assert str(path) in message
    assert "no results schema version" in message
    assert "reads v1" in message
    assert "mmalign evaluate" in message


def test_read_results_other_version(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    write_with_metadata(make_results(), path, {SCHEMA_VERSION_KEY: b"2", MMALIGN_VERSION_KEY: b"9.9.0"})
    expected = (
        f"{path} was written by mmalign 9.9.0 with results schema v2; this mmalign reads v1. "
        "Re-run `mmalign evaluate` to write it again."
    )
    with pytest.raises(ResultsFormatError, match=re.escape(expected)):
        read_results(path)


def test_read_results_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "results.parquet"
    metadata = {SCHEMA_VERSION_KEY: b"1", MMALIGN_VERSION_KEY: b"0.1.0"}
    write_with_metadata(make_results().drop(columns=["token_group", "n"]), path, metadata)
    with pytest.raises(ResultsFormatError, match=re.escape(f"{path} is missing required columns: token_group, n")):
        read_results(path)


def test_results_format_error_is_value_error() -> None:
    assert issubclass(ResultsFormatError, ValueError)


def test_read_many_concatenates(tmp_path: Path) -> None:
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_results(make_results("step_000040"), first)
    write_results(make_results("final", with_error=True), second)
    combined = read_many([first, second])
    assert len(combined) == 2 * len(make_results()) + 1
    assert list(dict.fromkeys(combined["checkpoint"])) == ["step_000040", "final"]
    assert combined["error"].notna().sum() == 1


def test_read_many_no_paths() -> None:
    with pytest.raises(ResultsFormatError, match="no results files were given"):
        read_many([])


def test_read_many_duplicate_rows_across_files(tmp_path: Path) -> None:
    first, second = tmp_path / "run-a.parquet", tmp_path / "run-b.parquet"
    write_results(make_results("final"), first)
    write_results(make_results("final"), second)
    with pytest.raises(ResultsFormatError, match="both contain results") as error:
        read_many([first, second])
    assert str(first) in str(error.value)
    assert str(second) in str(error.value)
    assert "checkpoint='final'" in str(error.value)


def test_read_many_names_bad_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    write_results(make_results(), good)
    bad.write_bytes(b"\x00not parquet")
    with pytest.raises(ResultsFormatError, match=re.escape(str(bad))):
        read_many([good, bad])
