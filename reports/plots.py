"""Per-layer metric plots for the HTML report, rendered by matplotlib as inline SVG strings.

The figures are built with the object-oriented API (`matplotlib.figure.Figure`) and saved
straight to SVG, so no pyplot state is created and the process-wide backend is never
switched. Text stays as SVG `<text>` elements, which matplotlib's SVG writer escapes.
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

logger = logging.getLogger("mmalign.reports")

# Known token groups come first, in this order. Any other group follows alphabetically.
GROUP_ORDER: tuple[str, ...] = ("image", "caption", "text", "pair")

# Okabe-Ito colours, which stay distinguishable under the common colour-vision deficiencies.
# Markers and line styles vary as well, so the lines also stay apart in black-and-white
# print. 7 markers x 4 line styles give 28 distinct combinations before styles repeat.
_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", ":", "-.")

_FIGURE_WIDTH_IN = 7.0
_MAX_PANEL_COLUMNS = 3

_RC_PARAMS = {
    "svg.fonttype": "none",
    # A fixed salt makes the hashed clip-path and marker ids, and so the report,
    # identical for identical input.
    "svg.hashsalt": "mmalign-report",
    # Data strings such as checkpoint names may contain "$" and must not be parsed as math.
    "text.parse_math": False,
    "font.size": 9,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
}

# Metadata keys set to None are left out of the SVG, along with their URL attributes.
_SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}


@dataclass(frozen=True)
class LineStyle:
    """Colour, marker and dash pattern of one plotted line."""

    color: str
    marker: str
    linestyle: str


def line_style(index: int) -> LineStyle:
    """Pick the style of the `index`-th line in a plot.

    Args:
        index: Position of the line among the lines styled by the same key (0-based).

    Returns:
        The style. Two indices below 28 never share marker and line style together.
    """
    return LineStyle(
        color=_COLORS[index % len(_COLORS)],
        marker=_MARKERS[index % len(_MARKERS)],
        linestyle=_LINESTYLES[index % len(_LINESTYLES)],
    )


def order_token_groups(groups: Iterable[str]) -> list[str]:
    """Sort token groups into report order.

    Args:
        groups: Token group names, possibly repeated.

    Returns:
        The distinct names: `image`, `caption`, `text`, `pair` first, then the rest sorted.
    """
    distinct = set(groups)
    known = [group for group in GROUP_ORDER if group in distinct]
    return known + sorted(distinct - set(GROUP_ORDER))


def render_metric_svg(
    frame: pd.DataFrame,
    *,
    series_order: Sequence[str],
    y_label: str,
    id_prefix: str,
) -> str:
    """Plot one metric against the LM layer and return the figure as an inline SVG element.

    A metric with one series (checkpoint) or one token group is drawn in a single panel
    with one line per series x token group. A metric with several series and several token
    groups gets one panel per series, sharing both axes, so the token groups keep the same
    style in every panel.

    Args:
        frame: Rows of one metric with columns `series`, `token_group`, `layer`, `value`,
            `ci_low` and `ci_high`. NaN CI bounds leave the band out at those layers.
        series_order: Order of the series labels in panels and legend.
        y_label: Y-axis label.
        id_prefix: Prefix for every `id` in the SVG, unique within the HTML document, so
            several inline figures do not share clip-path or marker ids.

    Returns:
        An `<svg>` element without XML declaration, doctype or fixed size, for inlining.

    Raises:
        ValueError: If `frame` is empty or `id_prefix` is not a valid id prefix.
    """
    if frame.empty:
        raise ValueError("cannot plot an empty metric frame")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", id_prefix):
        raise ValueError(f"invalid SVG id prefix {id_prefix!r}: use letters, digits, '-' and '_'")

    present = set(frame["series"])
    series = [label for label in series_order if label in present]
    groups = order_token_groups(frame["token_group"])

    with matplotlib.rc_context(_RC_PARAMS):
        if len(series) > 1 and len(groups) > 1:
            figure = _draw_panels(frame, series, groups, y_label)
        else:
            figure = _draw_single_panel(frame, series, groups, y_label)

        # Around one or two layers the automatic limits fall between integers and the
        # ticks show fractional layers, so the range is widened to neighbouring layers.
        first_layer, last_layer = frame["layer"].min(), frame["layer"].max()
        if last_layer - first_layer < 2:
            for axes in figure.axes:
                axes.set_xlim(first_layer - 1, last_layer + 1)

        buffer = io.StringIO()
        with warnings.catch_warnings():
            # The text stays as <text> and the browser draws it with its own fonts, so a
            # glyph missing from matplotlib's layout font (CJK, emoji) only shifts its
            # width estimate.
            warnings.filterwarnings("ignore", message=r"Glyph .* missing from font", category=UserWarning)
            figure.savefig(buffer, format="svg", metadata=_SVG_METADATA)

    svg = _inline_svg(buffer.getvalue(), id_prefix)
    logger.debug("plotted %r: %d series, %d token groups, %d characters", y_label, len(series), len(groups), len(svg))
    return svg


def _draw_single_panel(frame: pd.DataFrame, series: list[str], groups: list[str], y_label: str) -> Figure:
    figure = Figure(figsize=(_FIGURE_WIDTH_IN, 3.4), layout="constrained")
    axes = figure.add_subplot()
    handles: list[Line2D] = []
    labels: list[str] = []

    # Lines are styled by whichever key varies: token group, else series.
    style_by_group = len(groups) > 1 or len(series) == 1
    for series_index, label in enumerate(series):
        for group_index, group in enumerate(groups):
            part = frame[(frame["series"] == label) & (frame["token_group"] == group)]
            if part.empty:
                continue
            style = line_style(group_index if style_by_group else series_index)
            handles.append(_draw_line(axes, part, style))
            if len(series) == 1:
                labels.append(group)
            elif len(groups) == 1:
                labels.append(label)
            else:
                labels.append(f"{label}: {group}")

    _format_axes(axes, y_label)
    _add_legend(figure, handles, labels)
    return figure


def _draw_panels(frame: pd.DataFrame, series: list[str], groups: list[str], y_label: str) -> Figure:
    n_columns = min(_MAX_PANEL_COLUMNS, len(series))
    n_rows = math.ceil(len(series) / n_columns)
    figure = Figure(figsize=(_FIGURE_WIDTH_IN, 2.4 * n_rows + 0.7), layout="constrained")
    grid = figure.subplots(n_rows, n_columns, sharex=True, sharey=True, squeeze=False)
    handles_by_group: dict[str, Line2D] = {}

    for panel_index, axes in enumerate(grid.flat):
        if panel_index >= len(series):
            axes.set_visible(False)
            continue
        label = series[panel_index]
        for group_index, group in enumerate(groups):
            part = frame[(frame["series"] == label) & (frame["token_group"] == group)]
            if part.empty:
                continue
            handle = _draw_line(axes, part, line_style(group_index))
            handles_by_group.setdefault(group, handle)
        axes.set_title(label)
        _format_axes(axes, y_label if panel_index % n_columns == 0 else "")

    legend_groups = [group for group in groups if group in handles_by_group]
    _add_legend(figure, [handles_by_group[group] for group in legend_groups], legend_groups)
    return figure


def _draw_line(axes: Axes, part: pd.DataFrame, style: LineStyle) -> Line2D:
    part = part.sort_values("layer")
    layers = part["layer"].to_numpy(dtype=float)
    values = part["value"].to_numpy(dtype=float)
    ci_low = part["ci_low"].to_numpy(dtype=float)
    ci_high = part["ci_high"].to_numpy(dtype=float)
    has_band = np.isfinite(ci_low) & np.isfinite(ci_high)

    (line,) = axes.plot(
        layers,
        values,
        color=style.color,
        marker=style.marker,
        linestyle=style.linestyle if len(layers) > 1 else "none",
        linewidth=1.4,
        markersize=4,
    )
    if len(layers) == 1:
        # A band needs two layers, so a single layer gets a vertical CI bar.
        if has_band[0]:
            axes.vlines(layers, ci_low, ci_high, color=style.color, linewidth=1.4)
    elif has_band.any():
        axes.fill_between(layers, ci_low, ci_high, where=has_band, color=style.color, alpha=0.18, linewidth=0)
    return line


def _format_axes(axes: Axes, y_label: str) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("LM layer")
    axes.set_ylabel(y_label)
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    if not any(np.isfinite(line.get_ydata()).any() for line in axes.get_lines()):
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")


def _add_legend(figure: Figure, handles: list[Line2D], labels: list[str]) -> None:
    if not handles:
        return
    # Handles and labels are passed explicitly because the automatic collection skips
    # labels that start with "_", which a checkpoint name may do.
    figure.legend(handles, labels, loc="outside lower center", ncols=min(4, len(handles)), frameon=False)


def _inline_svg(svg: str, id_prefix: str) -> str:
    """Strip the XML prolog, fixed size and namespace URLs, and prefix every id and id reference."""
    svg = svg[svg.index("<svg") :]

    def fix_tag(match: re.Match[str]) -> str:
        tag = match.group(0)
        tag = re.sub(r'(\s)id="', rf'\1id="{id_prefix}-', tag)
        tag = tag.replace('xlink:href="#', f'xlink:href="#{id_prefix}-')
        return tag.replace("url(#", f"url(#{id_prefix}-")

    # Only tags are rewritten: text content cannot contain "<" or ">" because the SVG
    # writer escapes them, and it escapes quotes inside attribute values.
    svg = re.sub(r"<[^<>]+>", fix_tag, svg)

    def fix_root(match: re.Match[str]) -> str:
        root = re.sub(r'\s(?:xmlns(?::\w+)?|width|height|version)="[^"]*"', "", match.group(0))
        return root.replace("<svg", '<svg class="plot"', 1)

    # Inline SVG in HTML5 gets the SVG and xlink namespaces from the parser, so the
    # namespace URLs can go and the report holds no URL of its own.
    return re.sub(r"<svg\b[^>]*>", fix_root, svg, count=1)
