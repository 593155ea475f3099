"""Tables of the loss-discovery archive for the treatment's report section.

The archive (`archive.json`) contains every proposal with its outcome and one summary per
round. The report shows both: the candidates sorted by round with their fitness or the
reason they failed, and per round the valid rate and the kinds of failure.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CODE_PREVIEW_CHARS = 400


def archive_tables(archive: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the round summary and candidate tables of a discovery archive.

    Args:
        archive: The parsed `archive.json` (keys `entries`, `rounds`, optionally `baseline`).

    Returns:
        Two table dicts (`title`, `columns`, `rows`, `note`) for the report.
    """
    rounds = archive.get("rounds") or []
    baseline = (archive.get("baseline") or {}).get("fitness")
    round_rows = []
    for summary in rounds:
        categories = summary.get("categories") or {}
        failures = ", ".join(f"{name} {count}" for name, count in sorted(categories.items()) if name != "ok")
        round_rows.append([
            int(summary.get("round", 0)), str(summary.get("strategy", "")), int(summary.get("n_proposals", 0)),
            int(summary.get("n_valid", 0)), float(summary.get("valid_rate", 0.0)), failures or "none",
            summary.get("best_fitness"), summary.get("mean_runtime_ms"), float(summary.get("wall_seconds", 0.0)),
        ])
    entries = archive.get("entries") or []
    candidate_rows = []
    for entry in sorted(entries, key=lambda item: (item.get("round", 0), item.get("index", 0))):
        code = str(entry.get("code") or entry.get("raw") or "")
        if len(code) > CODE_PREVIEW_CHARS:
            code = code[:CODE_PREVIEW_CHARS] + " ..."
        candidate_rows.append([
            str(entry.get("name", "")), str(entry.get("category", "")), str(entry.get("reason", "")),
            str(entry.get("thought", "")), code, int(entry.get("round", 0)), entry.get("fitness"),
            entry.get("runtime_ms"),
        ])
    baseline_note = f" The starting adapter's fitness is {baseline:.4f}." if isinstance(baseline, (int, float)) else ""
    return [
        {
            "title": "Discovery rounds",
            "columns": ["round", "strategy", "proposals", "valid", "valid rate", "failures", "best fitness",
                        "mean runtime (ms)", "wall (s)"],
            "rows": [[str(row[0]), *row[1:]] for row in round_rows],
            "note": "Valid proposals parsed, passed the sandbox checks and trained to a finite fitness." + baseline_note,
        },
        {
            "title": "Discovery archive",
            "columns": ["name", "outcome", "reason", "thought", "code", "round", "fitness", "runtime (ms)"],
            "rows": candidate_rows,
            "note": "Every proposal with its outcome; code is cut after "
                    f"{CODE_PREVIEW_CHARS} characters (the whole archive is in archive.json).",
        },
    ]


def read_archive_tables(path: Path) -> list[dict[str, Any]]:
    """Return `archive_tables` of the archive at `path`, or no tables when it does not exist."""
    if not Path(path).is_file():
        return []
    return archive_tables(json.loads(Path(path).read_text(encoding="utf-8")))
