"""Report sections of the per-layer metrics: curves with null baselines, heatmaps and tables.

Each metric gets curves per checkpoint with confidence bands. Null baselines are drawn on
the same axes in grey: `null:*` checkpoints, the `<metric>@shuffled` variant of a pair
metric, and metrics in `NULL_BASELINE_METRICS`. `image/text` ratio rows go to their own
section, because a ratio does not share a y scale with the metric's values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from mmalign.reports.heatmap import render_heatmap_svg
from mmalign.reports.markup import escape, format_number
from mmalign.reports.metric_info import (
    DELTA_PREFIX,
    NULL_BASELINE_METRICS,
    SHUFFLED_SUFFIX,
    MetricInfo,
    describe_metric,
    direction_sentence,
)
from mmalign.reports.plots import NULL_COLUMNS, order_token_groups, render_metric_svg
from mmalign.reports.results_frame import null_label

RATIO_GROUP = "image/text"
SHUFFLED_LABEL = "null: captions shuffled"

# Metrics that get heatmaps unless the caller chooses. Heatmaps take most of the render
# time: 20 checkpoints x 11 layers x 30 metrics took 85 s with every heatmap and 8 MB of
# SVG, measured on 2 shared CPU cores with matplotlib 3.11.
DEFAULT_HEATMAP_METRICS: tuple[str, ...] = (
    "sae_fvu",
    "ce_loss_recovered",
    "feature_jaccard",
    "cka_linear",
    "mutual_knn",
    "retrieval_i2t_r1",
)


@dataclass(frozen=True)
class PlotOptions:
    """How much the metric sections draw.

    Attributes:
        max_curve_checkpoints: Most checkpoints drawn as curves per plot. With more, the curves
            show this many, evenly spaced in training order, and the heatmaps show all.
        max_table_series: Most series for which a metric section gets its own
            layer-by-series table. With more, the table of all results lists the values.
        heatmap_metrics: Metrics that get layer x checkpoint heatmaps, or None for every
            metric with at least 2 non-null checkpoints.
    """

    max_curve_checkpoints: int = 7
    max_table_series: int = 6
    heatmap_metrics: Collection[str] | None = None

    def __post_init__(self) -> None:
        if self.max_curve_checkpoints < 2:
            raise ValueError(f"max_curve_checkpoints must be at least 2, got {self.max_curve_checkpoints}")


def slug(text: str) -> str:
    """Return a lowercase id fragment of letters, digits and '-' for `text`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "metric"


def pick_evenly(items: Sequence[str], limit: int) -> list[str]:
    """Return at most `limit` items evenly spaced over `items`, always with the first and the last."""
    if len(items) <= limit:
        return list(items)
    positions = sorted({round(index * (len(items) - 1) / (limit - 1)) for index in range(limit)})
    return [items[position] for position in positions]


def null_rows(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Collect the null-baseline rows that calibrate `metric`, in the layout of `NULL_COLUMNS`."""
    parts = []
    own = frame[(frame["metric"] == metric) & frame["is_null"]]
    if not own.empty:
        parts.append(own.assign(null_label=own["series"].map(null_label), series=""))
    shuffled = frame[(frame["metric"] == metric + SHUFFLED_SUFFIX) & ~frame["is_null"]]
    if not shuffled.empty:
        parts.append(shuffled.assign(null_label=SHUFFLED_LABEL))
    for baseline, (calibrated, label) in NULL_BASELINE_METRICS.items():
        rows = frame[(frame["metric"] == baseline) & ~frame["is_null"]]
        if calibrated == metric and not rows.empty:
            parts.append(rows.assign(null_label=label))
    if not parts:
        return pd.DataFrame(columns=list(NULL_COLUMNS))
    return pd.concat(parts, ignore_index=True).loc[:, list(NULL_COLUMNS)]


def claimed_as_null(metrics: Collection[str]) -> set[str]:
    """Return the metrics drawn as null baselines of another metric present in `metrics`."""
    claimed = {name for name in metrics if name.endswith(SHUFFLED_SUFFIX) and name[: -len(SHUFFLED_SUFFIX)] in metrics}
    claimed |= {name for name, (calibrated, _) in NULL_BASELINE_METRICS.items() if name in metrics and calibrated in metrics}
    return claimed


def metric_section(
    frame: pd.DataFrame,
    metric: str,
    info: MetricInfo,
    series_order: list[str],
    anchor: str,
    options: PlotOptions,
) -> str:
    """Render the body of one metric's section: description, curves, heatmaps and table.

    Args:
        frame: Validated results of every metric except `image/text` rows, so that the
            null baselines of `metric` can be found.
        metric: The metric to show.
        info: Its description.
        series_order: Series labels in training order.
        anchor: Section id, used as the prefix of the figures' SVG ids.
        options: What to draw.
    """
    rows = frame[frame["metric"] == metric]
    main = rows[~rows["is_null"]]
    nulls = null_rows(frame, metric)
    if main.empty:
        # Only null checkpoints have this metric, so they are the data.
        main, nulls = rows, nulls.iloc[0:0]
    reference = 0.0 if metric.startswith(DELTA_PREFIX) else None

    text = f"{info.description} {direction_sentence(info)}".strip()
    parts = [f"<p><code>{escape(metric)}</code>" + (f": {escape(text)}</p>" if text else "</p>")]
    parts.append(curves_figure(main, nulls, info.title, series_order, anchor, options, reference=reference))

    n_non_null = main.loc[~main["is_null"], "series"].nunique()
    if n_non_null >= 2 and (options.heatmap_metrics is None or metric in options.heatmap_metrics):
        constant_groups = []
        for index, group in enumerate(order_token_groups(main["token_group"])):
            part = main[(main["token_group"] == group) & ~main["is_null"]]
            if part["series"].nunique() < 2:
                continue
            if (part.groupby("layer")["value"].nunique() <= 1).all():
                constant_groups.append(group)
                continue
            parts.append(heatmap_figure(part, info, group, series_order, f"{anchor}-heat-{index}"))
        if constant_groups:
            listed = " and ".join(constant_groups)
            parts.append(
                f"<p>The {escape(listed)} token group gets no heatmap because every checkpoint has "
                "the same value at each layer.</p>"
            )

    table_rows = pd.concat([main, rows[rows["is_null"]]]).drop_duplicates(subset=["series", "token_group", "layer"])
    if table_rows["series"].nunique() <= options.max_table_series:
        parts.append(metric_table(table_rows, series_order))
    else:
        parts.append('<p>The <a href="#all-results">table of all results</a> lists every value of this metric.</p>')
    return "".join(parts)


def curves_figure(
    main: pd.DataFrame,
    nulls: pd.DataFrame,
    title: str,
    series_order: list[str],
    anchor: str,
    options: PlotOptions,
    *,
    reference: float | None = None,
    y_label: str | None = None,
    intervals: str = "bootstrap 95% confidence intervals where available",
) -> str:
    """Render per-layer curves of `main` with `nulls` in grey, as a `<figure>` with a caption.

    `intervals` names the bands in the caption, such as "paired bootstrap 95% confidence intervals".
    """
    present = [label for label in series_order if label in set(main["series"])]
    plotted = pick_evenly(present, options.max_curve_checkpoints)
    svg = render_metric_svg(
        main[main["series"].isin(plotted)],
        series_order=plotted,
        y_label=y_label or title,
        id_prefix=anchor,
        nulls=nulls if not nulls.empty else None,
        reference=reference,
    )
    sentences = [f"{title} per LM layer, with {intervals}."]
    if not nulls.empty:
        kinds = ", ".join(dict.fromkeys(nulls["null_label"]))
        sentences.append(f"Grey lines with hollow markers are null baselines ({kinds}).")
    if reference is not None:
        sentences.append(f"The dotted line marks {format_number(reference)}.")
    if len(plotted) < len(present):
        sentences.append(
            f"The curves show {len(plotted)} of {len(present)} checkpoints, evenly spaced in "
            "training order. The heatmaps and the table of all results show every checkpoint."
        )
    return f"<figure>{svg}<figcaption>{escape(' '.join(sentences))}</figcaption></figure>"


def heatmap_figure(part: pd.DataFrame, info: MetricInfo, group: str, series_order: list[str], anchor: str) -> str:
    """Render a layer x checkpoint heatmap of one token group as a `<figure>` with a caption."""
    if group == RATIO_GROUP:
        title = f"{info.title}, image / text"
        colorbar_label = "image / text ratio"
        caption = f"Ratio of {info.title} on image tokens to text tokens per LM layer and checkpoint."
    else:
        title = f"{info.title}: {group}"
        direction = direction_sentence(info)
        colorbar_label = direction[:-1].lower() if direction else "value"
        caption = f"{info.title} on {group} tokens per LM layer and checkpoint."
    svg = render_heatmap_svg(part, series_order=series_order, title=title, colorbar_label=colorbar_label, id_prefix=anchor)
    caption += " Lighter cells have higher values."
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def metric_table(frame: pd.DataFrame, series_order: list[str]) -> str:
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
            count_text = f" (n={format_number(counts.min())})"
        else:
            count_text = f" (n={format_number(counts.min())} to {format_number(counts.max())})"
        header_cells.append(f"<th>{escape(group + count_text)}</th>")

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
                ci = f'<br><span class="ci">[{format_number(row["ci_low"])}, {format_number(row["ci_high"])}]</span>'
            cells.append(f"<td>{format_number(row['value'])}{ci}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    if show_series:
        # A top header row names each series once, above its token-group columns.
        spans = [(label, sum(1 for column_label, _ in columns if column_label == label)) for label in series_order]
        series_cells = "".join(f'<th colspan="{span}">{escape(label)}</th>' for label, span in spans if span)
        header = f'<tr><th rowspan="2">layer</th>{series_cells}</tr><tr>{"".join(header_cells)}</tr>'
    else:
        header = f"<tr><th>layer</th>{''.join(header_cells)}</tr>"
    return f'<div class="scroll"><table>{header}{"".join(rows)}</table></div>'


_RATIO_INTRO = (
    "Each curve is the ratio of an SAE metric on image tokens to the same metric on text "
    "tokens (the caption run through the LM alone) at the same layer, with a bootstrap "
    "interval over images resampled jointly in both groups. The SAE was fitted on text, "
    "so a ratio of 1 (dotted line) means it treats image tokens the way it treats text."
)


def image_text_section(
    ratios: pd.DataFrame,
    metrics: list[str],
    infos: Mapping[str, MetricInfo],
    series_order: list[str],
    options: PlotOptions,
) -> str:
    """Render the image-vs-text section: one plot of `image/text` ratios per metric.

    Args:
        ratios: Validated rows with token group `image/text`.
        metrics: Metrics to show, in report order.
        infos: Metric descriptions.
        series_order: Series labels in training order.
        options: What to draw.
    """
    parts = [f"<p>{escape(_RATIO_INTRO)}</p>"]
    for index, metric in enumerate(metrics, start=1):
        info = describe_metric(metric, infos)
        anchor = f"ratio-{index}-{slug(metric)}"
        rows = ratios[ratios["metric"] == metric]
        main, nulls = rows[~rows["is_null"]], null_rows(rows, metric)
        if main.empty:
            main, nulls = rows, nulls.iloc[0:0]
        title = f"{info.title}, image / text"
        parts.append(f'<h3 id="{anchor}-heading">{escape(title)} <code>{escape(metric)}</code></h3>')
        parts.append(curves_figure(main, nulls, title, series_order, anchor, options, reference=1.0, y_label="image / text"))
        selected = options.heatmap_metrics is None or metric in options.heatmap_metrics
        if selected and main.loc[~main["is_null"], "series"].nunique() >= 2:
            parts.append(heatmap_figure(main[~main["is_null"]], info, RATIO_GROUP, series_order, f"{anchor}-heat"))
    return "".join(parts)
