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
import textwrap
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
GROUP_ORDER: tuple[str, ...] = ("image", "caption", "text", "pair", "image/text")

# Okabe-Ito colours, which stay distinguishable under the common colour-vision deficiencies.
# Markers and line styles vary as well, so the lines also stay apart in black-and-white
# print. 7 markers x 4 line styles give 28 distinct combinations before styles repeat.
_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
_LINESTYLES = ("-", "--", ":", "-.")

# Null baselines are grey with hollow markers. Each kind of null baseline gets its own
# dash pattern, so two kinds stay apart in print too.
_NULL_COLOR = "#707070"
_NULL_DASHES = ((0, (5, 2)), (0, (1, 1.5)), (0, (7, 2, 1.5, 2)), (0, (9, 3)))
_NULL_MARKER = "x"

_FIGURE_WIDTH_IN = 7.0
_MAX_PANEL_COLUMNS = 3
_Y_LABEL_WIDTH = 30  # characters per line

RC_PARAMS = {
    "svg.fonttype": "none",
    # A fixed salt makes the hashed clip-path and marker ids, and so the report,
    # identical for identical input.
    "svg.hashsalt": "mmalign-report",
    # Data strings such as checkpoint names may contain "$" and must not be parsed as math.
    "text.parse_math": False,
    # One named font, so each SVG <text> lists two families instead of eleven. Browsers
    # without DejaVu Sans use their default sans-serif font.
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans"],
    "font.size": 9,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
}

# Metadata keys set to None are left out of the SVG, along with their URL attributes.
_SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}

NULL_COLUMNS: tuple[str, ...] = ("series", "null_label", "token_group", "layer", "value", "ci_low", "ci_high")


@dataclass(frozen=True)
class LineStyle:
    """Colour, marker and dash pattern of one plotted line."""

    color: str
    marker: str
    linestyle: str | tuple
    hollow: bool = False


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
        The distinct names: `image`, `caption`, `text`, `pair`, `image/text` first, then
        the rest sorted.
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
    nulls: pd.DataFrame | None = None,
    reference: float | None = None,
) -> str:
    """Plot one metric against the LM layer and return the figure as an inline SVG element.

    A metric with one series (checkpoint) or one token group is drawn in a single panel
    with one line per series x token group. A metric with several series and several token
    groups gets one panel per series when there are no more series than groups, and one
    panel per token group otherwise. Panels share both axes, and a line keeps its style
    in every panel.

    Args:
        frame: Rows of one metric with columns `series`, `token_group`, `layer`, `value`,
            `ci_low` and `ci_high`. NaN CI bounds leave the band out at those layers.
        series_order: Order of the series labels in panels and legend.
        y_label: Y-axis label.
        id_prefix: Prefix for every `id` in the SVG, unique within the HTML document, so
            several inline figures do not share clip-path or marker ids.
        nulls: Null-baseline rows drawn in grey on the same axes, with the columns in
            `NULL_COLUMNS`. `null_label` is the legend text. `series` is the series the
            row calibrates, or "" for a baseline that applies to every series. Rows of a
            token group or series absent from `frame` are not drawn.
        reference: Y value of a thin dotted horizontal line, such as 0 for differences
            or 1 for ratios, or None for no line.

    Returns:
        An `<svg>` element without XML declaration, doctype or fixed size, for inlining.

    Raises:
        ValueError: If `frame` is empty or `id_prefix` is not a valid id prefix.
    """
    if frame.empty:
        raise ValueError("cannot plot an empty metric frame")
    check_id_prefix(id_prefix)

    present = set(frame["series"])
    series = [label for label in series_order if label in present]
    groups = order_token_groups(frame["token_group"])
    if nulls is not None:
        nulls = nulls[nulls["token_group"].isin(groups) & nulls["series"].isin(["", *series])]

    with matplotlib.rc_context(RC_PARAMS):
        if len(series) > 1 and len(groups) > 1:
            if len(series) <= len(groups):
                figure = _draw_panels(frame, "series", series, "token_group", groups, y_label, nulls, reference)
            else:
                figure = _draw_panels(frame, "token_group", groups, "series", series, y_label, nulls, reference)
        else:
            figure = _draw_single_panel(frame, series, groups, y_label, nulls, reference)

        # Around one or two layers the automatic limits fall between integers and the
        # ticks show fractional layers, so the range is widened to neighbouring layers.
        first_layer, last_layer = frame["layer"].min(), frame["layer"].max()
        if last_layer - first_layer < 2:
            for axes in figure.axes:
                axes.set_xlim(first_layer - 1, last_layer + 1)

    svg = figure_to_svg(figure, id_prefix)
    logger.debug("plotted %r: %d series, %d token groups, %d characters", y_label, len(series), len(groups), len(svg))
    return svg


def check_id_prefix(id_prefix: str) -> None:
    """Raise ValueError unless `id_prefix` can start an SVG id: a letter, then letters, digits, '-' or '_'."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", id_prefix):
        raise ValueError(f"invalid SVG id prefix {id_prefix!r}: use letters, digits, '-' and '_'")


def figure_to_svg(figure: Figure, id_prefix: str) -> str:
    """Save a figure as SVG and return it as an `<svg>` element with ids prefixed by `id_prefix`."""
    buffer = io.StringIO()
    with matplotlib.rc_context(RC_PARAMS), warnings.catch_warnings():
        # The text stays as <text> and the browser draws it with its own fonts, so a
        # glyph missing from matplotlib's layout font (CJK, emoji) only shifts its
        # width estimate.
        warnings.filterwarnings("ignore", message=r"Glyph .* missing from font", category=UserWarning)
        figure.savefig(buffer, format="svg", metadata=_SVG_METADATA)
    return _inline_svg(buffer.getvalue(), id_prefix)


def _draw_single_panel(
    frame: pd.DataFrame,
    series: list[str],
    groups: list[str],
    y_label: str,
    nulls: pd.DataFrame | None,
    reference: float | None,
) -> Figure:
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

    null_handles: dict[str, Line2D] = {}
    if nulls is not None:
        line_column, line_values = ("token_group", groups) if style_by_group else ("series", series)
        _draw_nulls(axes, nulls, line_column, line_values, null_handles)
    _format_axes(axes, y_label, reference)
    _add_legend(figure, handles + list(null_handles.values()), labels + list(null_handles))
    return figure


def _draw_panels(
    frame: pd.DataFrame,
    panel_column: str,
    panels: list[str],
    line_column: str,
    lines: list[str],
    y_label: str,
    nulls: pd.DataFrame | None,
    reference: float | None,
) -> Figure:
    """Draw one panel per value of `panel_column`, each with one line per value of `line_column`."""
    n_columns = min(_MAX_PANEL_COLUMNS, len(panels))
    n_rows = math.ceil(len(panels) / n_columns)
    figure = Figure(figsize=(_FIGURE_WIDTH_IN, 2.4 * n_rows + 0.7), layout="constrained")
    grid = figure.subplots(n_rows, n_columns, sharex=True, sharey=True, squeeze=False)
    handles_by_line: dict[str, Line2D] = {}
    null_handles: dict[str, Line2D] = {}

    for panel_index, axes in enumerate(grid.flat):
        if panel_index >= len(panels):
            axes.set_visible(False)
            continue
        panel = panels[panel_index]
        in_panel = frame[frame[panel_column] == panel]
        for line_index, line in enumerate(lines):
            part = in_panel[in_panel[line_column] == line]
            if part.empty:
                continue
            handle = _draw_line(axes, part, line_style(line_index))
            handles_by_line.setdefault(line, handle)
        if nulls is not None:
            if panel_column == "series":
                # A null checkpoint (series "") calibrates every panel.
                panel_nulls = nulls[nulls["series"].isin(["", panel])]
            else:
                panel_nulls = nulls[nulls[panel_column] == panel]
            _draw_nulls(axes, panel_nulls, line_column, lines, null_handles)
        axes.set_title(panel)
        _format_axes(axes, y_label if panel_index % n_columns == 0 else "", reference)

    legend_lines = [line for line in lines if line in handles_by_line]
    handles = [handles_by_line[line] for line in legend_lines] + list(null_handles.values())
    _add_legend(figure, handles, legend_lines + list(null_handles))
    return figure


def _draw_nulls(
    axes: Axes, nulls: pd.DataFrame, line_column: str, line_values: list[str], handles: dict[str, Line2D]
) -> None:
    """Draw null-baseline rows in grey and add one legend handle per distinct legend label.

    A null line takes the hollow marker of the line it belongs to (same token group or
    series), so a reader can match the two, and the dash pattern of its kind.
    """
    kinds = list(dict.fromkeys(nulls["null_label"]))
    for (kind, line_value), part in nulls.groupby(["null_label", line_column], sort=False):
        if line_value in line_values:
            marker = line_style(line_values.index(line_value)).marker
        else:
            marker = _NULL_MARKER
        style = LineStyle(_NULL_COLOR, marker, _NULL_DASHES[kinds.index(kind) % len(_NULL_DASHES)], hollow=True)
        handle = _draw_line(axes, part, style)
        # Per token group the grey lines differ only by marker, so the legend names the group.
        legend = f"{kind} ({line_value})" if line_column == "token_group" and len(line_values) > 1 else str(kind)
        handles.setdefault(legend, handle)


def _draw_line(axes: Axes, part: pd.DataFrame, style: LineStyle) -> Line2D:
    part = part.sort_values("layer")
    layers = part["layer"].to_numpy(dtype=float)
    values = part["value"].to_numpy(dtype=float)
    ci_low = part["ci_low"].to_numpy(dtype=float)
    ci_high = part["ci_high"].to_numpy(dtype=float)
    has_band = np.isfinite(ci_low) & np.isfinite(ci_high)
    band_alpha = 0.12 if style.hollow else 0.18

    (line,) = axes.plot(
        layers,
        values,
        color=style.color,
        marker=style.marker,
        linestyle=style.linestyle if len(layers) > 1 else "none",
        linewidth=1.2 if style.hollow else 1.4,
        markersize=4,
        markerfacecolor="white" if style.hollow else style.color,
    )
    if len(layers) == 1:
        # A band needs two layers, so a single layer gets a vertical CI bar.
        if has_band[0]:
            axes.vlines(layers, ci_low, ci_high, color=style.color, linewidth=1.4)
    elif has_band.any():
        axes.fill_between(layers, ci_low, ci_high, where=has_band, color=style.color, alpha=band_alpha, linewidth=0)
    return line


def _format_axes(axes: Axes, y_label: str, reference: float | None = None) -> None:
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("LM layer")
    # Long metric titles are wrapped, so they fit beside a panel of 2.4 in.
    axes.set_ylabel(textwrap.fill(y_label, width=_Y_LABEL_WIDTH))
    axes.grid(True, color="#dddddd", linewidth=0.6)
    axes.set_axisbelow(True)
    if not any(np.isfinite(line.get_ydata()).any() for line in axes.get_lines()):
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")
    if reference is not None:
        # Drawn after the finite-value check, which would otherwise count this line.
        axes.axhline(reference, color="#333333", linewidth=0.8, linestyle=":", zorder=1)


def _add_legend(figure: Figure, handles: list[Line2D], labels: list[str]) -> None:
    if not handles:
        return
    # Handles and labels are passed explicitly because the automatic collection skips
    # labels that start with "_", which a checkpoint name may do.
    # The legend is as wide as the figure at most: an entry takes about 0.6 in for the
    # handle plus 0.065 in per character of its label at 8 pt.
    longest = max(len(label) for label in labels)
    fitting = int(_FIGURE_WIDTH_IN // (0.6 + 0.065 * longest))
    ncols = max(1, min(4, len(handles), fitting))
    figure.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False)


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
