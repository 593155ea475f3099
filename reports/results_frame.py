"""Validation of the tidy results table, series labels and the training order of checkpoints.

A results table has one row per checkpoint x treatment x layer x token group x metric.
An optional `error` column marks the rows of a checkpoint that failed to evaluate with a
non-empty message. Those rows are split off and listed, never plotted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = (
    "checkpoint",
    "treatment",
    "layer",
    "token_group",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
)
KEY_COLUMNS: tuple[str, ...] = ("checkpoint", "treatment", "layer", "token_group", "metric")
ERROR_COLUMN = "error"
NULL_CHECKPOINT_PREFIX = "null:"
UNTREATED = ("none", "")

_STEP_PATTERN = re.compile(r"step[_-]?(\d+)")


@dataclass(frozen=True)
class FailedCheckpoint:
    """A checkpoint x treatment whose evaluation failed, with its error message."""

    checkpoint: str
    treatment: str
    error: str
    n_rows: int


def validate_results(results: pd.DataFrame) -> tuple[pd.DataFrame, list[FailedCheckpoint]]:
    """Check a results table and split off the rows of failed checkpoints.

    Args:
        results: Tidy results table with the columns in `REQUIRED_COLUMNS` and optionally
            `error`. `ci_low`, `ci_high` and `n` may be NaN. Rows with a non-empty `error`
            need only a checkpoint.

    Returns:
        The valid rows with typed columns plus `series` (the label of the checkpoint x
        treatment) and `is_null` (a `null:*` checkpoint), and one entry per failed
        checkpoint x treatment x error message. The frame is empty when every row failed.

    Raises:
        TypeError: If `results` is not a DataFrame.
        ValueError: If `results` is empty, lacks required columns, has missing keys,
            non-numeric or non-integer values where numbers are needed, duplicate rows or
            `ci_low > ci_high`.
    """
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [column for column in REQUIRED_COLUMNS if column not in results.columns]
    if missing:
        raise ValueError(f"results table is missing required columns: {', '.join(missing)}")
    if results.empty:
        raise ValueError("results table is empty, so there is nothing to report. Run the evaluation first.")

    failed_mask = _failed_rows(results)
    failed = _summarize_failures(results[failed_mask])
    frame = results.loc[~failed_mask, list(REQUIRED_COLUMNS)].copy()
    for column in ("checkpoint", "treatment", "token_group", "metric", "layer", "value"):
        n_missing = int(frame[column].isna().sum())
        if n_missing:
            raise ValueError(
                f"results column {column!r} has {n_missing} missing values, but every row needs one. "
                f"Mark the rows of a checkpoint that failed to evaluate with a non-empty {ERROR_COLUMN!r}."
            )
    for column in ("checkpoint", "treatment", "token_group", "metric"):
        frame[column] = frame[column].astype(str)
    for column in ("layer", "value", "ci_low", "ci_high", "n"):
        try:
            frame[column] = pd.to_numeric(frame[column]).astype(float)
        except (TypeError, ValueError) as error:
            raise ValueError(f"results column {column!r} must be numeric: {error}") from error
    fractional = frame.loc[frame["layer"] % 1 != 0, "layer"]
    if not fractional.empty:
        raise ValueError(f"results column 'layer' must hold integer layer indices, got {float(fractional.iloc[0])}")
    frame["layer"] = frame["layer"].astype(int)

    duplicated = frame[frame.duplicated(subset=list(KEY_COLUMNS), keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        key = ", ".join(f"{column}={first[column]!r}" for column in KEY_COLUMNS if column != "layer")
        key += f", layer={first['layer']}"
        raise ValueError(f"results table has {len(duplicated)} rows with a repeated key, such as {key}")
    reversed_ci = frame[frame["ci_low"] > frame["ci_high"]]
    if not reversed_ci.empty:
        first = reversed_ci.iloc[0]
        raise ValueError(
            f"results row for metric {first['metric']!r}, layer {first['layer']} has "
            f"ci_low {first['ci_low']} > ci_high {first['ci_high']}"
        )

    # One series per checkpoint and treatment. The untreated baseline keeps its bare name
    # unless that makes two series share a label.
    labelled = frame["checkpoint"] + " [" + frame["treatment"] + "]"
    frame["series"] = frame["checkpoint"].where(frame["treatment"].isin(UNTREATED), labelled)
    if _has_label_collision(frame):
        frame["series"] = labelled
    if _has_label_collision(frame):
        raise ValueError("checkpoint and treatment names give two series the same label. Rename the checkpoints.")
    frame["is_null"] = frame["checkpoint"].str.startswith(NULL_CHECKPOINT_PREFIX)
    return frame.reset_index(drop=True), failed


def _failed_rows(results: pd.DataFrame) -> pd.Series:
    if ERROR_COLUMN not in results.columns:
        return pd.Series(False, index=results.index)
    errors = results[ERROR_COLUMN]
    return errors.notna() & (errors.astype(str).str.strip() != "")


def _summarize_failures(rows: pd.DataFrame) -> list[FailedCheckpoint]:
    if rows.empty:
        return []
    rows = rows.assign(
        checkpoint=rows["checkpoint"].fillna("(no checkpoint name)").astype(str),
        treatment=rows["treatment"].fillna("none").astype(str),
        error=rows[ERROR_COLUMN].astype(str).str.strip(),
    )
    counts = rows.groupby(["checkpoint", "treatment", "error"], sort=False).size()
    failures = [
        FailedCheckpoint(checkpoint, treatment, error, int(count))
        for (checkpoint, treatment, error), count in counts.items()
    ]
    return sorted(failures, key=lambda failure: checkpoint_sort_key(failure.checkpoint, failure.treatment))


def _has_label_collision(frame: pd.DataFrame) -> bool:
    pairs = frame[["series", "checkpoint", "treatment"]].drop_duplicates()
    return bool(pairs["series"].duplicated().any())


def natural_sort_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Split text into digit and non-digit runs so that "M2" sorts before "M10"."""
    parts = re.split(r"(\d+)", text)
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in parts if part)


def checkpoint_sort_key(checkpoint: str, treatment: str = "none") -> tuple:
    """Return a sort key that puts checkpoints in training order.

    The order is: null baselines (`null:*`), untreated `step_NNNNNN` checkpoints by step,
    untreated `final`, other untreated names in natural order, then treated checkpoints
    by treatment and checkpoint name in natural order.
    """
    if checkpoint.startswith(NULL_CHECKPOINT_PREFIX):
        return (0, natural_sort_key(checkpoint), natural_sort_key(treatment))
    if treatment not in UNTREATED:
        return (4, natural_sort_key(treatment), natural_sort_key(checkpoint))
    step = _STEP_PATTERN.fullmatch(checkpoint)
    if step:
        return (1, (int(step.group(1)),), ())
    if checkpoint == "final":
        return (2, (), ())
    return (3, natural_sort_key(checkpoint), ())


def order_series(frame: pd.DataFrame) -> list[str]:
    """Return the distinct series labels of a validated frame in training order."""
    pairs = frame[["series", "checkpoint", "treatment"]].drop_duplicates()
    ordered = sorted(pairs.itertuples(index=False), key=lambda row: checkpoint_sort_key(row.checkpoint, row.treatment))
    return [row.series for row in ordered]


def null_label(series: str) -> str:
    """Return the legend label of a null series: "null: untrained" for "null:untrained"."""
    return f"null: {series[len(NULL_CHECKPOINT_PREFIX):].strip()}"
