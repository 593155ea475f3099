"""Render a results table into one self-contained HTML report, and write it atomically.

The report needs no network: CSS is inline, plots are inline SVG (see
`mmalign.reports.plots`), and the page has no scripts. Every string that comes from the
results, the config or the manifest is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mmalign.reports.plots import order_token_groups, render_metric_svg

logger = logging.getLogger("mmalign.reports")

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
_KEY_COLUMNS = ("checkpoint", "treatment", "layer", "token_group", "metric")

# The `controls` entry that the other control losses are compared against.
TRAINED_ADAPTER_KEY = "trained adapter"


@dataclass(frozen=True)
class MetricInfo:
    """Human-readable title and description of a metric, and which direction is better."""

    title: str
    description: str
    better: str | None = None  # "lower", "higher" or None when neither direction is better


# Known metrics, shown in this order. Other metrics follow alphabetically under their own names.
METRIC_INFO: dict[str, MetricInfo] = {
    "sae_mse": MetricInfo(
        "SAE reconstruction MSE",
        "Mean squared error of the SAE reconstruction of each token's hidden state. The SAE "
        "was fitted on text activations, so a low error means the LM's text features "
        "describe these tokens well.",
        "lower",
    ),
    "sae_fvu": MetricInfo(
        "SAE fraction of variance unexplained",
        "Squared reconstruction error divided by the total variance of the hidden states. "
        "0 is a perfect reconstruction and 1 is no better than predicting the mean.",
        "lower",
    ),
    "sae_l0": MetricInfo(
        "SAE L0",
        "Mean number of SAE latents active per token. A gap between the image and the text "
        "lines means image tokens activate the SAE's text features differently.",
    ),
    "cka_linear": MetricInfo(
        "Linear CKA, image vs text",
        "Linear centered kernel alignment between the image-token and the text hidden "
        "states of the same examples. 1 means the two are identical up to a rotation and "
        "an isotropic scaling.",
        "higher",
    ),
    "retrieval_top1": MetricInfo(
        "Image to caption retrieval, top-1 accuracy",
        "Fraction of images whose nearest caption at this layer is their own caption.",
        "higher",
    ),
}

_INTRO = (
    "This report measures where a frozen vision encoder's tokens become language-like "
    "inside a frozen LM. A trained adapter maps the vision-encoder tokens into the LM's "
    "input embeddings, and the residual-stream output of every LM layer is probed "
    "separately for each token group: <em>image</em> (the visual-token positions), "
    "<em>caption</em> (the caption tokens that follow the image) and <em>text</em> (the "
    "same caption run through the LM alone). The SAE metrics use sparse autoencoders "
    "fitted on text activations, so a layer where image tokens reconstruct about as well "
    "as text tokens is one where they sit in the LM's language feature space. Metrics of "
    "the group <em>pair</em> compare two token groups directly. Shaded bands, bars and "
    "ranges in brackets are bootstrap 95% confidence intervals."
)

_CSS = """
body { font-family: system-ui, sans-serif; line-height: 1.45; color: #1a1a1a;
       max-width: 60rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { margin-bottom: 0.3rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.85rem; }
pre { background: #f6f6f6; padding: 0.75rem; overflow-x: auto; white-space: pre-wrap;
      word-break: break-word; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.1rem 0.45rem; text-align: right;
         vertical-align: top; line-height: 1.15; }
th { background: #f0f0f0; } th.name, td.name { text-align: left; } th[colspan] { text-align: center; }
.ci { color: #555; font-size: 0.72rem; white-space: nowrap; }
.scroll { overflow-x: auto; }
figure { margin: 0.5rem 0; } figcaption { font-size: 0.8rem; color: #444; }
svg.plot { width: 100%; height: auto; max-width: 56rem; display: block; }
.verdict-pass { color: #1b6e1b; } .verdict-fail { color: #a31515; }
nav ul { columns: 2; font-size: 0.9rem; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav { display: none; }
  svg.plot { max-width: 100%; }
  figure { break-inside: avoid; }
  table { font-size: 7.5pt; } .ci { white-space: normal; }
  .scroll { overflow: visible; }
  pre { white-space: pre-wrap; background: none; border: 1px solid #ccc; }
}
"""


def render_report(
    results: pd.DataFrame,
    *,
    title: str,
    controls: Mapping[str, float] | None,
    config: Mapping[str, Any],
    manifest: Mapping[str, Any],
    stage_times: Mapping[str, float] | None = None,
    notes: list[str] | None = None,
    metric_info: Mapping[str, MetricInfo] | None = None,
) -> str:
    """Render a results table, control losses, config and manifest into one HTML page.

    Args:
        results: Tidy results table with the columns in `REQUIRED_COLUMNS`, one row per
            checkpoint x treatment x layer x token group x metric. `ci_low`, `ci_high` and
            `n` may be NaN.
        title: Page title.
        controls: Validation caption loss in nats/token per adapter variant, such as
            `"trained adapter"`, `"untrained adapter"` or `"trained adapter, shuffled
            images"`. The `"trained adapter"` entry is compared with all the others.
        config: Resolved run config, shown as JSON.
        manifest: Run manifest (model, dataset, probe and checkpoint hashes, versions),
            shown as JSON.
        stage_times: Wall-clock seconds per pipeline stage.
        notes: Free-text notes listed at the end.
        metric_info: Titles and descriptions that add to or override `METRIC_INFO`.

    Returns:
        The HTML document.

    Raises:
        TypeError: If `results` is not a DataFrame.
        ValueError: If `results` is empty, lacks required columns, has missing keys,
            non-numeric or non-integer values where numbers are needed, duplicate rows or
            `ci_low > ci_high`, or if a control loss or stage time is not a number.
    """
    frame = _validate_results(results)
    infos = {**METRIC_INFO, **(metric_info or {})}
    metrics = [name for name in infos if name in set(frame["metric"])]
    metrics += sorted(set(frame["metric"]) - set(metrics))
    series_order = list(dict.fromkeys(frame.sort_values(["checkpoint", "treatment"])["series"]))

    sections: list[tuple[str, str, str]] = [("summary", "Summary", _summary_section(frame, metrics))]
    sections.append(("controls", "Control losses", _controls_section(controls)))
    for index, metric in enumerate(metrics, start=1):
        info = infos.get(metric, MetricInfo(metric, ""))
        anchor = f"metric-{index}-" + re.sub(r"[^a-z0-9]+", "-", metric.lower()).strip("-")
        body = _metric_section(frame[frame["metric"] == metric], metric, info, series_order, anchor)
        sections.append((anchor, info.title, body))
    if stage_times:
        sections.append(("stage-times", "Stage wall times", _stage_times_section(stage_times)))
    if isinstance(notes, str):
        notes = [notes]
    if notes:
        items = "".join(f"<li>{_escape(note)}</li>" for note in notes)
        sections.append(("notes", "Notes", f"<ul>{items}</ul>"))
    sections.append(("config", "Resolved config", _json_block(config)))
    sections.append(("manifest", "Manifest", _json_block(manifest)))

    nav = "".join(f'<li><a href="#{anchor}">{_escape(heading)}</a></li>' for anchor, heading, _ in sections)
    body = "\n".join(
        f'<section id="{anchor}">\n<h2>{_escape(heading)}</h2>\n{content}\n</section>'
        for anchor, heading, content in sections
    )
    document = (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{_escape(title)}</h1>\n<p>{_INTRO}</p>\n</header>\n"
        f"<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n"
    )
    logger.info(
        "rendered report %r: %d metrics, %d series, %d characters",
        title,
        len(metrics),
        len(series_order),
        len(document),
    )
    return document


def write_report(path: Path, html: str) -> None:
    """Write a report atomically: to a temporary file in the same directory, then `os.replace`.

    A reader sees either the old file or the complete new one, and a failed write leaves
    no temporary file behind.

    Args:
        path: Destination file. Its directory must exist.
        html: The document from `render_report`.

    Raises:
        FileNotFoundError: If the destination directory does not exist.
        OSError: If writing or renaming fails.
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"report directory {directory} does not exist. Create it before writing {path.name}.")

    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(html)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file with mode 0600, but a report is meant to be shared.
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote report to %s", path)


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _format_number(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{float(value):.4g}"


def _validate_results(results: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(results, pd.DataFrame):
        raise TypeError(f"results must be a pandas DataFrame, got {type(results).__name__}")
    missing = [column for column in REQUIRED_COLUMNS if column not in results.columns]
    if missing:
        raise ValueError(f"results table is missing required columns: {', '.join(missing)}")
    if results.empty:
        raise ValueError("results table is empty, so there is nothing to report. Run the evaluation first.")

    frame = results.loc[:, list(REQUIRED_COLUMNS)].copy()
    for column in ("checkpoint", "treatment", "token_group", "metric", "layer", "value"):
        n_missing = int(frame[column].isna().sum())
        if n_missing:
            raise ValueError(f"results column {column!r} has {n_missing} missing values, but every row needs one")
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

    duplicated = frame[frame.duplicated(subset=list(_KEY_COLUMNS), keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        key = ", ".join(f"{column}={first[column]!r}" for column in _KEY_COLUMNS if column != "layer")
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
    frame["series"] = frame["checkpoint"].where(frame["treatment"].isin(["none", ""]), labelled)
    if _has_label_collision(frame):
        frame["series"] = labelled
    if _has_label_collision(frame):
        raise ValueError("checkpoint and treatment names give two series the same label. Rename the checkpoints.")
    return frame


def _has_label_collision(frame: pd.DataFrame) -> bool:
    pairs = frame[["series", "checkpoint", "treatment"]].drop_duplicates()
    return bool(pairs["series"].duplicated().any())


def _summary_section(frame: pd.DataFrame, metrics: list[str]) -> str:
    layers = sorted(frame["layer"].unique())
    rows = [
        ("checkpoints", ", ".join(dict.fromkeys(frame["series"]))),
        ("treatments", ", ".join(sorted(frame["treatment"].unique()))),
        ("layers", f"{layers[0]} to {layers[-1]} ({len(layers)} layers)"),
        ("token groups", ", ".join(order_token_groups(frame["token_group"]))),
        ("metrics", ", ".join(metrics)),
        ("rows", str(len(frame))),
    ]
    cells = [f'<th class="name">{_escape(name)}</th><td class="name">{_escape(value)}</td>' for name, value in rows]
    return "<table>" + "".join(f"<tr>{row}</tr>" for row in cells) + "</table>"


def _controls_section(controls: Mapping[str, float] | None) -> str:
    if not controls:
        return "<p>No control losses were given, so the trained adapter is not checked against controls.</p>"

    losses: dict[str, float] = {}
    for name, loss in controls.items():
        try:
            losses[str(name)] = float(loss)
        except (TypeError, ValueError) as error:
            raise ValueError(f"control loss {name!r} must be a number in nats/token, got {loss!r}") from error

    trained_name = next((name for name in losses if name.strip().lower() == TRAINED_ADAPTER_KEY), None)
    trained = losses[trained_name] if trained_name is not None else math.nan
    rows = []
    for name, loss in losses.items():
        difference = "" if name == trained_name else _format_number(loss - trained)
        cells = f"<td>{_format_number(loss)}</td><td>{difference}</td>"
        rows.append(f'<tr><td class="name">{_escape(name)}</td>{cells}</tr>')
    table = (
        '<table><tr><th class="name">adapter</th><th>validation caption loss (nats/token)</th>'
        f"<th>difference from trained</th></tr>{''.join(rows)}</table>"
    )
    return table + f"<p>{_controls_verdict(losses, trained_name)}</p>"


def _controls_verdict(losses: dict[str, float], trained_name: str | None) -> str:
    if trained_name is None:
        return f"No entry is named &quot;{TRAINED_ADAPTER_KEY}&quot;, so the controls cannot be compared with it."
    trained = losses[trained_name]
    others = {name: loss for name, loss in losses.items() if name != trained_name}
    if not others:
        return "Only the trained adapter's loss was given, so there is no control to compare it with."
    if not math.isfinite(trained):
        return "The trained adapter's loss is not a finite number, so it cannot be compared with the controls."

    not_finite = [name for name, loss in others.items() if not math.isfinite(loss)]
    not_below = [name for name, loss in others.items() if math.isfinite(loss) and not trained < loss]
    trained_text = f"The trained adapter's loss ({_format_number(trained)} nats/token)"
    sentences = []
    if not not_below and not not_finite:
        verdict = f"{trained_text} is lower than all {len(others)} controls."
        sentences.append(f'<strong class="verdict-pass">{verdict}</strong>')
    elif not_below:
        listed = ", ".join(f"{_escape(name)} ({_format_number(others[name])})" for name in not_below)
        sentences.append(
            f'<strong class="verdict-fail">{trained_text} is not lower than {len(not_below)} of '
            f"{len(others)} controls: {listed}.</strong> The adapter may not pass image "
            "information that helps the LM predict the caption."
        )
    else:
        sentences.append(f"{trained_text} is lower than every control with a finite loss.")
    if not_finite:
        listed = ", ".join(_escape(name) for name in not_finite)
        sentences.append(f"These controls have no finite loss and were not compared: {listed}.")
    return " ".join(sentences)


def _metric_section(
    frame: pd.DataFrame, metric: str, info: MetricInfo, series_order: list[str], anchor: str
) -> str:
    direction = f" {info.better.capitalize()} is better." if info.better else ""
    text = f"{info.description}{direction}".strip()
    description = f"<p><code>{_escape(metric)}</code>" + (f": {_escape(text)}</p>" if text else "</p>")
    svg = render_metric_svg(frame, series_order=series_order, y_label=info.title, id_prefix=anchor)
    caption = f"{info.title} per LM layer, with bootstrap 95% confidence intervals where available."
    figure = f"<figure>{svg}<figcaption>{_escape(caption)}</figcaption></figure>"
    return description + figure + _metric_table(frame, series_order)


def _metric_table(frame: pd.DataFrame, series_order: list[str]) -> str:
    """Build a table with one row per layer and one column per series x token group."""
    groups = order_token_groups(frame["token_group"])
    columns = [
        (label, group)
        for label in series_order
        for group in groups
        if ((frame["series"] == label) & (frame["token_group"] == group)).any()
    ]
    show_series = len({label for label, _ in columns}) > 1
    indexed = frame.set_index(["series", "token_group", "layer"]).sort_index()

    header_cells = []
    for label, group in columns:
        counts = indexed.loc[(label, group), "n"].dropna()
        if counts.empty:
            count_text = ""
        elif counts.min() == counts.max():
            count_text = f" (n={_format_number(counts.min())})"
        else:
            count_text = f" (n={_format_number(counts.min())} to {_format_number(counts.max())})"
        header_cells.append(f"<th>{_escape(group + count_text)}</th>")

    rows = []
    for layer in sorted(frame["layer"].unique()):
        cells = [f"<th>{layer}</th>"]
        for label, group in columns:
            key = (label, group, layer)
            if key not in indexed.index:
                cells.append("<td></td>")
                continue
            row = indexed.loc[key]
            ci = ""
            if math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]):
                ci = f'<br><span class="ci">[{_format_number(row["ci_low"])}, {_format_number(row["ci_high"])}]</span>'
            cells.append(f"<td>{_format_number(row['value'])}{ci}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    if show_series:
        # A top header row names each series once, above its token-group columns.
        spans = [(label, sum(1 for column_label, _ in columns if column_label == label)) for label in series_order]
        series_cells = "".join(f'<th colspan="{span}">{_escape(label)}</th>' for label, span in spans if span)
        header = f'<tr><th rowspan="2">layer</th>{series_cells}</tr><tr>{"".join(header_cells)}</tr>'
    else:
        header = f"<tr><th>layer</th>{''.join(header_cells)}</tr>"
    return f'<div class="scroll"><table>{header}{"".join(rows)}</table></div>'


def _stage_times_section(stage_times: Mapping[str, float]) -> str:
    seconds: dict[str, float] = {}
    for stage, value in stage_times.items():
        try:
            seconds[str(stage)] = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"stage time {stage!r} must be a number of seconds, got {value!r}") from error
    total = sum(value for value in seconds.values() if math.isfinite(value))
    rows = [
        f'<tr><td class="name">{_escape(stage)}</td><td>{_format_duration(value)}</td></tr>'
        for stage, value in seconds.items()
    ]
    rows.append(f'<tr><th class="name">total</th><th>{_format_duration(total)}</th></tr>')
    return f'<table><tr><th class="name">stage</th><th>wall time</th></tr>{"".join(rows)}</table>'


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, remainder = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {remainder:02d} s" if hours else f"{minutes} min {remainder:02d} s"


def _json_block(value: Mapping[str, Any]) -> str:
    # default=str shows paths, enums and other non-JSON values by their string form.
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return f"<pre>{_escape(text)}</pre>"
