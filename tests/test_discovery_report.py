"""Tests for treatment tables in the report and the loss-discovery archive tables."""

from __future__ import annotations

import json

import pytest

from mmalign.loops.discovery_report import CODE_PREVIEW_CHARS, archive_tables, read_archive_tables
from mmalign.reports.treatments import parse_treatments
from test_report_full import HOSTILE, TREATMENTS, make_full_results, render_full, section_html

ARCHIVE = {
    "baseline": {"fitness": 0.25},
    "rounds": [
        {"round": 0, "strategy": "free", "n_proposals": 3, "n_valid": 1, "valid_rate": 1 / 3,
         "categories": {"ok": 1, "rejected_static": 1, "unparseable": 1}, "best_fitness": 0.5,
         "mean_runtime_ms": 2.0, "wall_seconds": 10.0},
    ],
    "entries": [
        {"round": 0, "index": 1, "name": "escape", "thought": HOSTILE, "code": "import os", "category": "rejected_static",
         "reason": "import is not allowed", "fitness": None, "runtime_ms": None},
        {"round": 0, "index": 0, "name": "margin", "thought": "a margin", "code": "x" * (CODE_PREVIEW_CHARS + 50),
         "category": "ok", "reason": "", "fitness": 0.5, "runtime_ms": 2.0},
        {"round": 0, "index": 2, "name": "unparsed_r0_2", "thought": "", "code": "", "raw": "no json here",
         "category": "unparseable", "reason": "no_json: nothing", "fitness": None, "runtime_ms": None},
    ],
}


def test_archive_tables_rounds_and_candidates() -> None:
    rounds, candidates = archive_tables(ARCHIVE)
    assert rounds["rows"] == [["0", "free", 3, 1, 1 / 3, "rejected_static 1, unparseable 1", 0.5, 2.0, 10.0]]
    assert "0.2500" in rounds["note"]
    assert [row[0] for row in candidates["rows"]] == ["margin", "escape", "unparsed_r0_2"]
    assert candidates["rows"][0][4].endswith(" ...")
    assert len(candidates["rows"][0][4]) == CODE_PREVIEW_CHARS + 4
    assert candidates["rows"][2][4] == "no json here"


def test_read_archive_tables_missing_file(tmp_path) -> None:
    assert read_archive_tables(tmp_path / "archive.json") == []


def test_read_archive_tables_from_file(tmp_path) -> None:
    path = tmp_path / "archive.json"
    path.write_text(json.dumps(ARCHIVE), encoding="utf-8")
    assert [table["title"] for table in read_archive_tables(path)] == ["Discovery rounds", "Discovery archive"]


def test_treatment_tables_rendered_and_escaped() -> None:
    treatments = [{**TREATMENTS[0], "tables": archive_tables(ARCHIVE)}]
    section = section_html(render_full(make_full_results(), treatments=treatments), "treatments")
    assert "<h4>Discovery archive</h4>" in section
    assert 'id="treatment-1-table-2"' in section
    assert "<td>rejected_static</td>" in section
    assert "<script>" not in section
    assert "&lt;script&gt;" in section


def test_treatment_table_row_length_checked() -> None:
    bad = [{**TREATMENTS[0], "tables": [{"title": "t", "columns": ["a", "b"], "rows": [[1]]}]}]
    with pytest.raises(ValueError, match="row 0 of table 't' has 1 cells for 2 columns"):
        parse_treatments(bad)


def test_treatment_table_fields_checked() -> None:
    bad = [{**TREATMENTS[0], "tables": [{"title": "t", "rows": []}]}]
    with pytest.raises(ValueError, match="table 0 must be a dict with title, columns and rows"):
        parse_treatments(bad)
