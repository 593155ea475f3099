"""Retention matrices of sequential edits (self-adapting treatment) as report tables.

A treatment that applies K edits one after another and, after edit j, re-measures every
earlier edit i <= j reports the entries as per-iteration metrics named
`retention_after_J_edit_I` (1-based). This module rebuilds the lower-triangular matrix from
those names and turns it into a table for a treatment's report section (the dicts that
`Treatment.report_tables` returns): one row per "after edit j", one column per edit i.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

RETENTION_METRIC = re.compile(r"^retention_after_(\d+)_edit_(\d+)$")
RETENTION_NOTE = (
    "The edits are applied one after another, and after edit j the reward of every earlier edit i "
    "is measured again (decrease of the held-out caption loss, nats per token). Values that shrink "
    "down a column show forgetting."
)


def retention_matrix(metrics: Mapping[str, object]) -> list[list[float]]:
    """Return the lower-triangular matrix contained in `metrics`, or [] when there is none.

    Row j (0-based) contains the values of edits 1..j+1 after edit j+1. A missing entry is NaN.

    Raises:
        ValueError: when an entry lies above the diagonal (edit i > after j).
    """
    entries: dict[tuple[int, int], float] = {}
    for name, value in metrics.items():
        match = RETENTION_METRIC.match(str(name))
        if match is None:
            continue
        after, edit = int(match.group(1)), int(match.group(2))
        if edit > after or edit < 1:
            raise ValueError(
                f"invalid retention metric {name!r}: edit {edit} after edit {after}; only edits 1..{after} are re-measured after edit {after}"
            )
        entries[(after, edit)] = float(value) if isinstance(value, (int, float)) else math.nan
    if not entries:
        return []
    size = max(after for after, _ in entries)
    return [[entries.get((after, edit), math.nan) for edit in range(1, after + 1)] for after in range(1, size + 1)]


def retention_table(matrix: list[list[float]], title: str) -> dict[str, object]:
    """Return a report table (`title`, `columns`, `rows`, `note`) of a lower-triangular matrix.

    Cells above the diagonal are empty strings.
    """
    size = len(matrix)
    columns = ["after edit", *(f"edit {edit}" for edit in range(1, size + 1))]
    rows = [[f"after edit {after}", *row, *([""] * (size - len(row)))] for after, row in enumerate(matrix, start=1)]
    return {"title": title, "columns": columns, "rows": rows, "note": RETENTION_NOTE}


def retention_tables(iteration_metrics: Mapping[str, Mapping[str, object]]) -> list[dict[str, object]]:
    """Return one retention table per iteration whose metrics contain a matrix."""
    tables = []
    for iteration, metrics in iteration_metrics.items():
        matrix = retention_matrix(metrics)
        if matrix:
            tables.append(retention_table(matrix, f"Retention of sequential edits: {iteration}"))
    return tables
