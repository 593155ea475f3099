"""Report sections for treatments (per-iteration deltas, metrics and cost) and run comparisons.

A treatment, such as self-rewarding fine-tuning, produces iteration checkpoints from a
baseline checkpoint. Paired bootstrap differences arrive in the results as metrics named
`delta:<metric>` whose checkpoint is the iteration. A comparison is a separate table of
per-layer differences between two runs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

from mmalign.reports.markup import MAX_TEXT_COLUMNS, escape, format_number, format_value
from mmalign.reports.metric_info import DELTA_PREFIX, MetricInfo, describe_metric, order_metrics
from mmalign.reports.metric_sections import PlotOptions, curves_figure, slug
from mmalign.reports.plots import NULL_COLUMNS
from mmalign.reports.table import data_table

COMPARISON_COLUMNS: tuple[str, ...] = (
    "layer",
    "token_group",
    "metric",
    "run_a",
    "run_b",
    "difference",
    "ci_low",
    "ci_high",
    "n",
)


@dataclass(frozen=True)
class Treatment:
    """A validated treatment entry: its iterations, per-iteration metrics and cost."""

    name: str
    baseline: str
    iterations: list[str]
    metrics: dict[str, dict[str, object]] = field(default_factory=dict)
    cost: dict[str, object] = field(default_factory=dict)
    tables: list["ExtraTable"] = field(default_factory=list)


@dataclass(frozen=True)
class ExtraTable:
    """A table a treatment adds to its section, such as a discovery archive or a retention matrix."""

    title: str
    columns: list[str]
    rows: list[list[object]]
    note: str = ""


def parse_treatments(treatments: Sequence[Mapping[str, object]]) -> list[Treatment]:
    """Validate the `treatments` argument of the report.

    Args:
        treatments: Dicts with `name`, `baseline` (a checkpoint name), `iterations` (a list
            of checkpoint names), and optionally `metrics` (iteration -> {name: value}, or
            a list of such dicts in iteration order), `cost` (a dict) and `tables` (a list
            of dicts with `title`, `columns`, `rows` and optionally `note`).

    Returns:
        One `Treatment` per entry.

    Raises:
        ValueError: If an entry is not a dict or a field is missing or has the wrong type.
            The message names the entry and the field.
    """
    if isinstance(treatments, (str, bytes, Mapping)) or not isinstance(treatments, Sequence):
        raise ValueError(f"treatments must be a list of dicts, got {type(treatments).__name__}")
    parsed = []
    for index, entry in enumerate(treatments):
        where = f"treatment {index}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict with name, baseline and iterations, got {type(entry).__name__}")
        missing = [key for key in ("name", "baseline", "iterations") if key not in entry]
        if missing:
            raise ValueError(f"{where} is missing {', '.join(missing)}")
        where = f"treatment {entry['name']!r}"
        iterations = entry["iterations"]
        if isinstance(iterations, (str, bytes)) or not isinstance(iterations, Sequence):
            raise ValueError(f"{where}: iterations must be a list of checkpoint names, got {iterations!r}")
        iterations = [str(iteration) for iteration in iterations]
        metrics = _parse_iteration_metrics(entry.get("metrics") or {}, iterations, where)
        cost = entry.get("cost") or {}
        if not isinstance(cost, Mapping):
            raise ValueError(f"{where}: cost must be a dict of name -> value, got {type(cost).__name__}")
        tables = _parse_tables(entry.get("tables") or [], where)
        parsed.append(Treatment(str(entry["name"]), str(entry["baseline"]), iterations, metrics, dict(cost), tables))
    return parsed


def _parse_tables(tables: object, where: str) -> list[ExtraTable]:
    if isinstance(tables, (str, bytes, Mapping)) or not isinstance(tables, Sequence):
        raise ValueError(f"{where}: tables must be a list of dicts with title, columns and rows, got {type(tables).__name__}")
    parsed = []
    for index, table in enumerate(tables):
        if not isinstance(table, Mapping) or not {"title", "columns", "rows"} <= set(table):
            raise ValueError(f"{where}: table {index} must be a dict with title, columns and rows, got {table!r:.200}")
        columns = [str(column) for column in table["columns"]]
        rows = [list(row) for row in table["rows"]]
        for number, row in enumerate(rows):
            if len(row) != len(columns):
                raise ValueError(
                    f"{where}: row {number} of table {table['title']!r} has {len(row)} cells for {len(columns)} columns"
                )
        parsed.append(ExtraTable(str(table["title"]), columns, rows, str(table.get("note", ""))))
    return parsed


def _parse_iteration_metrics(metrics: object, iterations: list[str], where: str) -> dict[str, dict[str, object]]:
    if isinstance(metrics, Sequence) and not isinstance(metrics, (str, bytes)):
        if len(metrics) != len(iterations):
            raise ValueError(
                f"{where}: metrics is a list of {len(metrics)} entries but there are {len(iterations)} iterations"
            )
        metrics = dict(zip(iterations, metrics))
    if not isinstance(metrics, Mapping):
        raise ValueError(f"{where}: metrics must map each iteration to a dict of name -> value, got {type(metrics).__name__}")
    parsed = {}
    for iteration, values in metrics.items():
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: metrics of iteration {iteration!r} must be a dict of name -> value, got {values!r}")
        parsed[str(iteration)] = dict(values)
    return parsed


def delta_rows_mask(frame: pd.DataFrame, treatments: list[Treatment]) -> pd.Series:
    """Mark the `delta:*` rows whose checkpoint is an iteration of one of `treatments`."""
    iterations = {iteration for treatment in treatments for iteration in treatment.iterations}
    return frame["metric"].str.startswith(DELTA_PREFIX) & frame["checkpoint"].isin(iterations)


def treatment_section(
    frame: pd.DataFrame,
    treatments: list[Treatment],
    infos: Mapping[str, MetricInfo],
    options: PlotOptions,
) -> str:
    """Render each treatment: iterations, per-iteration metrics and cost, and delta curves.

    Args:
        frame: Validated results, including the `delta:*` rows.
        treatments: Parsed treatments.
        infos: Metric descriptions.
        options: What to draw.
    """
    parts = []
    checkpoints = set(frame["checkpoint"])
    for index, treatment in enumerate(treatments, start=1):
        anchor = f"treatment-{index}"
        parts.append(f'<h3 id="{anchor}-heading">{escape(treatment.name)}</h3>')
        iterations = ", ".join(f"<code>{escape(name)}</code>" for name in treatment.iterations) or "none"
        parts.append(f"<p>Baseline <code>{escape(treatment.baseline)}</code>. Iterations: {iterations}.</p>")
        absent = [name for name in [treatment.baseline, *treatment.iterations] if name not in checkpoints]
        if absent:
            listed = ", ".join(f"<code>{escape(name)}</code>" for name in absent)
            parts.append(f"<p>These checkpoints have no rows in the results: {listed}.</p>")
        parts.append(_iteration_table(treatment))
        for number, table in enumerate(treatment.tables, start=1):
            parts.append(_extra_table(table, f"{anchor}-table-{number}"))
        parts.append(_delta_figures(frame, treatment, infos, options, anchor))
    return "".join(parts)


def _extra_table(table: ExtraTable, table_id: str) -> str:
    text_columns = 0
    for column in range(min(len(table.columns), MAX_TEXT_COLUMNS)):
        if not any(isinstance(row[column], str) for row in table.rows):
            break
        text_columns = column + 1
    rows = ["".join(f"<td>{format_value(value)}</td>" for value in row) for row in table.rows]
    note = f"<p>{escape(table.note)}</p>" if table.note else ""
    return f"<h4>{escape(table.title)}</h4>{note}" + data_table(table_id, table.columns, rows, text_columns=text_columns)


def _iteration_table(treatment: Treatment) -> str:
    cost_by_iteration = bool(treatment.cost) and all(
        key in treatment.iterations and isinstance(value, Mapping) for key, value in treatment.cost.items()
    )
    rows_by_iteration = {name: dict(values) for name, values in treatment.metrics.items()}
    if cost_by_iteration:
        for iteration, values in treatment.cost.items():
            rows_by_iteration.setdefault(iteration, {}).update({f"cost: {key}": value for key, value in values.items()})
    # The baseline gets a row too when metrics are given for it.
    names = [name for name in [treatment.baseline, *treatment.iterations] if name in rows_by_iteration]
    names += [name for name in rows_by_iteration if name not in names]
    parts = []
    if names:
        columns = list(dict.fromkeys(key for name in names for key in rows_by_iteration[name]))
        header = '<th class="name">checkpoint</th>' + "".join(f"<th>{escape(column)}</th>" for column in columns)
        rows = []
        for name in names:
            values = rows_by_iteration[name]
            cells = "".join(f"<td>{format_value(values[column])}</td>" if column in values else "<td></td>" for column in columns)
            rows.append(f'<tr><td class="name">{escape(name)}</td>{cells}</tr>')
        parts.append(f'<div class="scroll"><table><tr>{header}</tr>{"".join(rows)}</table></div>')
    if treatment.cost and not cost_by_iteration:
        rows = []
        for key, value in treatment.cost.items():
            if isinstance(value, (Mapping, list)):
                shown = escape(json.dumps(value, ensure_ascii=False, default=str))
            else:
                shown = format_value(value)
            rows.append(f'<tr><td class="name">{escape(key)}</td><td>{shown}</td></tr>')
        parts.append(f'<table><tr><th class="name">cost</th><th>value</th></tr>{"".join(rows)}</table>')
    if not parts:
        return "<p>No per-iteration metrics or cost were given.</p>"
    return "".join(parts)


def _delta_figures(
    frame: pd.DataFrame, treatment: Treatment, infos: Mapping[str, MetricInfo], options: PlotOptions, anchor: str
) -> str:
    rows = frame[frame["metric"].str.startswith(DELTA_PREFIX) & frame["checkpoint"].isin(treatment.iterations)]
    # An iteration checkpoint evaluated under several treatments keeps this treatment's rows.
    own = rows[rows["treatment"] == treatment.name]
    if not own.empty:
        rows = own

    if rows.empty:
        return (
            "<p>The results contain no paired differences for these iterations. Add rows named "
            "<code>delta:&lt;metric&gt;</code> with the iteration as checkpoint to draw them.</p>"
        )
    position = {name: index for index, name in enumerate(treatment.iterations)}
    pairs = rows[["series", "checkpoint"]].drop_duplicates()
    series_order = [row.series for row in sorted(pairs.itertuples(index=False), key=lambda row: position[row.checkpoint])]

    empty_nulls = pd.DataFrame(columns=list(NULL_COLUMNS))
    parts = [
        f"<p>Each curve is an iteration minus the baseline <code>{escape(treatment.baseline)}</code>, "
        "with paired bootstrap 95% confidence intervals.</p>"
    ]
    for metric in order_metrics(rows["metric"], infos):
        info = describe_metric(metric, infos)
        figure_anchor = f"{anchor}-{slug(metric)}"
        parts.append(f"<h4>{escape(info.title)} <code>{escape(metric)}</code></h4>")
        part = rows[rows["metric"] == metric]
        parts.append(
            curves_figure(
                part, empty_nulls, info.title, series_order, figure_anchor, options,
                reference=0.0, intervals="paired bootstrap 95% confidence intervals",
            )
        )
    return "".join(parts)


def validate_comparison(comparison: pd.DataFrame) -> pd.DataFrame:
    """Check a comparison table and return it with typed columns and a `series` label per run pair.

    Raises:
        TypeError: If `comparison` is not a DataFrame.
        ValueError: If columns are missing or numbers are not numeric.
    """
    if not isinstance(comparison, pd.DataFrame):
        raise TypeError(f"comparison must be a pandas DataFrame, got {type(comparison).__name__}")
    missing = [column for column in COMPARISON_COLUMNS if column not in comparison.columns]
    if missing:
        raise ValueError(f"comparison table is missing required columns: {', '.join(missing)}")
    frame = comparison.loc[:, list(COMPARISON_COLUMNS)].copy()
    for column in ("token_group", "metric", "run_a", "run_b"):
        frame[column] = frame[column].astype(str)
    for column in ("layer", "difference", "ci_low", "ci_high", "n"):
        try:
            frame[column] = pd.to_numeric(frame[column]).astype(float)
        except (TypeError, ValueError) as error:
            raise ValueError(f"comparison column {column!r} must be numeric: {error}") from error
    if frame["layer"].isna().any() or (frame["layer"] % 1 != 0).any():
        raise ValueError("comparison column 'layer' must hold integer layer indices in every row")
    frame["layer"] = frame["layer"].astype(int)
    frame["series"] = frame["run_a"] + " \u2212 " + frame["run_b"]
    frame["value"] = frame["difference"]
    frame["is_null"] = False
    return frame


def comparison_section(comparison: pd.DataFrame, infos: Mapping[str, MetricInfo], options: PlotOptions) -> str:
    """Render per-layer difference curves (run A minus run B) per metric and a table of every row."""
    frame = validate_comparison(comparison)
    if frame.empty:
        return "<p>The comparison table is empty.</p>"
    series_order = list(dict.fromkeys(frame["series"]))
    empty_nulls = pd.DataFrame(columns=list(NULL_COLUMNS))
    pairs = ", ".join(series_order)
    parts = [
        f"<p>Each curve is run A minus run B per LM layer ({escape(pairs)}), with the confidence "
        "intervals given in the comparison table. A layer whose interval excludes 0 (dotted "
        "line) is one where the runs differ.</p>"
    ]
    metrics = order_metrics(frame["metric"], infos)
    for index, metric in enumerate(metrics, start=1):
        info = describe_metric(metric, infos)
        anchor = f"comparison-{index}-{slug(metric)}"
        title = f"Difference in {info.title}"
        parts.append(f'<h3 id="{anchor}-heading">{escape(title)} <code>{escape(metric)}</code></h3>')
        part = frame[frame["metric"] == metric]
        parts.append(
            curves_figure(
                part, empty_nulls, title, series_order, anchor, options,
                reference=0.0, y_label="difference", intervals="the intervals of the comparison table",
            )
        )

    rows = []
    for row in frame.itertuples(index=False):
        if pd.isna(row.ci_low) or pd.isna(row.ci_high):
            excludes_zero = "n/a"
        else:
            excludes_zero = "yes" if row.ci_low > 0 or row.ci_high < 0 else "no"
        count = "" if pd.isna(row.n) else format_number(row.n)
        rows.append(
            f"<td>{escape(row.run_a)}</td><td>{escape(row.run_b)}</td><td>{escape(row.metric)}</td>"
            f"<td>{escape(row.token_group)}</td><td>{row.layer}</td><td>{format_number(row.difference)}</td>"
            f"<td>{format_number(row.ci_low)}</td><td>{format_number(row.ci_high)}</td><td>{count}</td>"
            f"<td>{excludes_zero}</td>"
        )
    headers = ("run A", "run B", "metric", "token group", "layer", "difference", "CI low", "CI high", "n", "CI excludes 0")
    parts.append(data_table("comparison-table", headers, rows, text_columns=4, label="Filter comparison rows"))
    return "".join(parts)
