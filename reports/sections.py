"""Report sections around the metrics: summary, errors, control losses, samples, stage times."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from mmalign.reports.markup import escape, format_duration, format_number, key_value_table, text_cell
from mmalign.reports.plots import order_token_groups
from mmalign.reports.results_frame import FailedCheckpoint, checkpoint_sort_key
from mmalign.reports.table import data_table

# The `controls` entry that the other control losses are compared against.
TRAINED_ADAPTER_KEY = "trained adapter"
SAMPLE_KEYS: tuple[str, ...] = ("checkpoint", "reference", "generated")


def summary_section(
    frame: pd.DataFrame, metrics: list[str], series_order: list[str], failed: list[FailedCheckpoint]
) -> str:
    """Render a two-column table of what the results contain."""
    if frame.empty:
        rows = [("rows", "0, because every checkpoint failed to evaluate (see Errors)")]
    else:
        nulls = [label for label in series_order if frame.loc[frame["series"] == label, "is_null"].any()]
        layers = sorted(frame["layer"].unique())
        rows = [
            ("checkpoints", ", ".join(label for label in series_order if label not in nulls)),
            ("null baselines", ", ".join(nulls) or "none"),
            ("treatments", ", ".join(sorted(frame["treatment"].unique()))),
            ("layers", f"{layers[0]} to {layers[-1]} ({len(layers)} layers)"),
            ("token groups", ", ".join(order_token_groups(frame["token_group"]))),
            ("metrics", ", ".join(metrics)),
            ("rows", str(len(frame))),
        ]
    if failed:
        names = ", ".join(dict.fromkeys(failure.checkpoint for failure in failed))
        rows.append(("failed checkpoints", f"{len(failed)}: {names}"))
    return key_value_table(rows)


def errors_section(failed: list[FailedCheckpoint]) -> str:
    """Render the checkpoints that failed to evaluate, with their error messages."""
    intro = (
        "<p>These checkpoints failed to evaluate. Their rows contain no values, so they are left "
        "out of every plot, heatmap and table of values in this report.</p>"
    )
    rows = [
        text_cell(failure.checkpoint, limit=80, css_class="name")
        + text_cell(failure.treatment, limit=80, css_class="name")
        + f"<td>{failure.n_rows}</td>"
        + text_cell(failure.error, css_class="text error")
        for failure in failed
    ]
    header = '<tr><th class="name">checkpoint</th><th class="name">treatment</th><th>rows</th><th class="name">error</th></tr>'
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    return f'{intro}<div class="scroll"><table>{header}{body}</table></div>'


def controls_section(controls: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None) -> str:
    """Render the control losses and the verdict, one table per run when `controls` is nested.

    Raises:
        ValueError: If a control loss is not a number.
    """
    if not controls:
        return "<p>No control losses were given, so the trained adapter is not checked against controls.</p>"
    if all(isinstance(value, Mapping) for value in controls.values()):
        parts = []
        for run, run_controls in controls.items():
            parts.append(f"<h3>{escape(run)}</h3>{_controls_table(run_controls)}")
        return "".join(parts)
    return _controls_table(controls)


def _controls_table(controls: Mapping[str, float]) -> str:
    if not controls:
        return "<p>No control losses were given for this run.</p>"
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
        difference = "" if name == trained_name else format_number(loss - trained)
        cells = f"<td>{format_number(loss)}</td><td>{difference}</td>"
        rows.append(f'<tr><td class="name">{escape(name)}</td>{cells}</tr>')
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
    trained_text = f"The trained adapter's loss ({format_number(trained)} nats/token)"
    sentences = []
    if not not_below and not not_finite:
        verdict = f"{trained_text} is lower than all {len(others)} controls."
        sentences.append(f'<strong class="verdict-pass">{verdict}</strong>')
    elif not_below:
        listed = ", ".join(f"{escape(name)} ({format_number(others[name])})" for name in not_below)
        sentences.append(
            f'<strong class="verdict-fail">{trained_text} is not lower than {len(not_below)} of '
            f"{len(others)} controls: {listed}.</strong> The adapter may not pass image "
            "information that helps the LM predict the caption."
        )
    else:
        sentences.append(f"{trained_text} is lower than every control with a finite loss.")
    if not_finite:
        listed = ", ".join(escape(name) for name in not_finite)
        sentences.append(f"These controls have no finite loss and were not compared: {listed}.")
    return " ".join(sentences)


def samples_section(samples: Sequence[Mapping[str, object]]) -> str:
    """Render sample captions as a sortable table, ordered by checkpoint in training order.

    Args:
        samples: Dicts with the keys `checkpoint`, `reference` and `generated`, and
            optionally `treatment`.

    Raises:
        ValueError: If `samples` is not a list of such dicts.
    """
    if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
        raise ValueError(f"samples must be a list of dicts with keys {', '.join(SAMPLE_KEYS)}, got {type(samples).__name__}")
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise ValueError(f"sample {index} must be a dict with keys {', '.join(SAMPLE_KEYS)}, got {type(sample).__name__}")
        missing = [key for key in SAMPLE_KEYS if key not in sample]
        if missing:
            raise ValueError(f"sample {index} is missing the keys {', '.join(missing)}")
    if not samples:
        return "<p>No sample captions were given.</p>"

    ordered = sorted(
        samples, key=lambda sample: checkpoint_sort_key(str(sample["checkpoint"]), str(sample.get("treatment", "none")))
    )
    rows = [
        text_cell(sample["checkpoint"], limit=80) + text_cell(sample["reference"]) + text_cell(sample["generated"])
        for sample in ordered
    ]
    intro = (
        "<p>Captions generated from validation images during training, next to the reference "
        "captions. Long captions are cut; hover over a cell to read the full text.</p>"
    )
    table = data_table("samples-table", ("checkpoint", "reference", "generated"), rows, text_columns=3, label="Filter samples")
    return intro + table


def stage_times_section(stage_times: Mapping[str, float]) -> str:
    """Render wall-clock seconds per pipeline stage and their total.

    Raises:
        ValueError: If a stage time is not a number.
    """
    seconds: dict[str, float] = {}
    for stage, value in stage_times.items():
        try:
            seconds[str(stage)] = float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"stage time {stage!r} must be a number of seconds, got {value!r}") from error
    total = sum(value for value in seconds.values() if math.isfinite(value))
    rows = [
        f'<tr><td class="name">{escape(stage)}</td><td>{format_duration(value)}</td></tr>'
        for stage, value in seconds.items()
    ]
    rows.append(f'<tr><th class="name">total</th><th>{format_duration(total)}</th></tr>')
    return f'<table><tr><th class="name">stage</th><th>wall time</th></tr>{"".join(rows)}</table>'


def notes_section(notes: Sequence[str]) -> str:
    """Render free-text notes as an escaped list."""
    items = "".join(f"<li>{escape(note)}</li>" for note in notes)
    return f"<ul>{items}</ul>"
