"""Layer x checkpoint heatmaps of one metric and token group, as inline SVG.

The colour map is cividis, whose lightness rises monotonically from low to high values,
so the cells keep their order when printed in greyscale and under the common colour-vision
deficiencies. Small grids also print each cell's value. Cells are vector paths, not an
embedded raster image, so the SVG contains no data URL.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from mmalign.reports.plots import RC_PARAMS, check_id_prefix, figure_to_svg

logger = logging.getLogger("mmalign.reports")

COLOR_MAP = "cividis"
# Colours in the map. matplotlib draws a colour bar of 50 or more colours as an embedded
# PNG (matplotlib 3.11, `Colorbar.n_rasterize`), and the report must contain no data URL.
COLOR_LEVELS = 48
# Grids with more cells or columns than these get no numbers in the cells, which would
# be too small to read.
MAX_ANNOTATED_CELLS = 224
MAX_ANNOTATED_COLUMNS = 14

_FIGURE_WIDTH_IN = 7.0
_MISSING_COLOR = "#e4e4e4"


def render_heatmap_svg(
    frame: pd.DataFrame,
    *,
    series_order: Sequence[str],
    title: str,
    colorbar_label: str,
    id_prefix: str,
    annotate: bool | None = None,
) -> str:
    """Draw one value per layer (rows) and checkpoint (columns) as a heatmap with a colour bar.

    Args:
        frame: Rows of one metric and one token group with columns `series`, `layer` and
            `value`, at most one row per series and layer.
        series_order: Column order, in training order. Series absent from `frame` are skipped.
        title: Axes title.
        colorbar_label: Label of the colour bar, such as the metric title and its better direction.
        id_prefix: Prefix for every `id` in the SVG, unique within the HTML document.
        annotate: Whether to print each value in its cell. None prints them when the grid
            has at most `MAX_ANNOTATED_CELLS` cells and `MAX_ANNOTATED_COLUMNS` columns.

    Returns:
        An `<svg>` element for inlining. Missing cells are light grey and marked "n/a"
        when values are printed.

    Raises:
        ValueError: If `frame` is empty, has two rows for one cell, or `id_prefix` is invalid.
    """
    if frame.empty:
        raise ValueError("cannot draw a heatmap of an empty frame")
    check_id_prefix(id_prefix)
    present = set(frame["series"])
    columns = [label for label in series_order if label in present]
    layers = sorted(frame["layer"].unique())
    grid = frame.pivot(index="layer", columns="series", values="value").reindex(index=layers, columns=columns)
    values = grid.to_numpy(dtype=float)  # [n_layers, n_checkpoints]
    if annotate is None:
        annotate = values.size <= MAX_ANNOTATED_CELLS and len(columns) <= MAX_ANNOTATED_COLUMNS

    with matplotlib.rc_context(RC_PARAMS):
        figure = _draw(values, columns, layers, title, colorbar_label, annotate)
    svg = figure_to_svg(figure, id_prefix)
    logger.debug("heatmap %r: %d layers x %d checkpoints, %d characters", title, len(layers), len(columns), len(svg))
    return svg


def _draw(
    values: np.ndarray, columns: list[str], layers: list[int], title: str, colorbar_label: str, annotate: bool
) -> Figure:
    longest_label = max(len(label) for label in columns)
    rotate = len(columns) > 6 or longest_label > 10
    # Rotated tick labels need room below the grid, about 0.05 in per character.
    label_room = min(1.8, 0.05 * longest_label) if rotate else 0.2
    grid_height = max(1.6, 0.26 * len(layers))
    height = 1.1 + grid_height + label_room
    figure = Figure(figsize=(_FIGURE_WIDTH_IN, height), layout="constrained")
    axes = figure.add_subplot()

    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
    else:
        low, high = 0.0, 1.0
    if low == high:
        # A constant grid still needs a non-empty colour range.
        low, high = low - 0.5, high + 0.5
    norm = Normalize(vmin=low, vmax=high)
    color_map = matplotlib.colormaps[COLOR_MAP].resampled(COLOR_LEVELS).with_extremes(bad=_MISSING_COLOR)
    mesh = axes.pcolormesh(
        np.ma.masked_invalid(values), cmap=color_map, norm=norm, edgecolors="white", linewidth=0.6
    )
    # A long label is wrapped to the grid's height, about 14 characters per inch at 9 pt.
    label = textwrap.fill(colorbar_label, width=max(16, int(14 * grid_height)))
    colorbar = figure.colorbar(mesh, ax=axes, label=label, fraction=0.05, pad=0.02)
    colorbar.solids.set_rasterized(False)
    # Without edges in the face colour, SVG viewers show seams between the colour levels.
    colorbar.solids.set_edgecolor("face")

    axes.set_xticks(np.arange(len(columns)) + 0.5, labels=columns)
    if rotate:
        for label in axes.get_xticklabels():
            label.set_rotation(40)
            label.set_horizontalalignment("right")
            label.set_rotation_mode("anchor")
    # With many layers every second label is kept, so they stay apart.
    step = 1 if len(layers) <= 16 else 2
    axes.set_yticks(np.arange(0, len(layers), step) + 0.5, labels=[str(layer) for layer in layers[::step]])
    axes.set_xlabel("checkpoint, in training order")
    axes.set_ylabel("LM layer")
    axes.set_title(title)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    if not finite.size:
        axes.text(0.5, 0.5, "no finite values", transform=axes.transAxes, ha="center", va="center")

    if annotate:
        font_size = 7 if len(columns) <= 10 else 6
        for row, column in np.ndindex(values.shape):
            value = values[row, column]
            if np.isfinite(value):
                # cividis is dark at the low end, so low cells get white text.
                color = "white" if norm(value) < 0.55 else "black"
                text = f"{value:.3g}"
            else:
                color, text = "#555555", "n/a"
            label = axes.text(column + 0.5, row + 0.5, text, ha="center", va="center", fontsize=font_size, color=color)
            # The labels sit inside the axes, so the layout need not measure each one.
            label.set_in_layout(False)
    return figure
