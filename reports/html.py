"""Render a results table into one self-contained HTML report, and write it atomically.

The report needs no network: CSS is inline, plots are inline SVG (see
`mmalign.reports.plots` and `mmalign.reports.heatmap`), the table script is inline, and a
Content-Security-Policy in the page blocks every request. Every string that comes from
the results, the config, the manifest, captions or notes is HTML-escaped.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmalign.reports.features import features_section
from mmalign.reports.markup import Section, json_block, render_page
from mmalign.reports.metric_info import (
    DELTA_PREFIX,
    METRIC_INFO,
    SHUFFLED_SUFFIX,
    MetricInfo,
    describe_metric,
    order_metrics,
)
from mmalign.reports.metric_sections import (
    DEFAULT_HEATMAP_METRICS,
    RATIO_GROUP,
    PlotOptions,
    claimed_as_null,
    image_text_section,
    metric_section,
    slug,
)
from mmalign.reports.results_frame import REQUIRED_COLUMNS, order_series, validate_results
from mmalign.reports.sections import (
    TRAINED_ADAPTER_KEY,
    controls_section,
    errors_section,
    notes_section,
    samples_section,
    stage_times_section,
    summary_section,
)
from mmalign.reports.table import TABLE_SCRIPT, results_table
from mmalign.reports.treatments import (
    comparison_section,
    delta_rows_mask,
    parse_treatments,
    treatment_section,
    validate_comparison,
)

__all__ = [
    "METRIC_INFO",
    "REQUIRED_COLUMNS",
    "TRAINED_ADAPTER_KEY",
    "MetricInfo",
    "render_full_report",
    "render_report",
    "write_report",
]

logger = logging.getLogger("mmalign.reports")

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
    "ranges in brackets are bootstrap 95% confidence intervals. Grey lines with hollow "
    "markers are null baselines: an untrained adapter, or captions shuffled across images."
)


def render_full_report(
    results: pd.DataFrame,
    *,
    title: str,
    controls: Mapping[str, float] | Mapping[str, Mapping[str, float]] | None,
    config: Mapping[str, Any],
    manifest: Mapping[str, Any],
    stage_times: Mapping[str, float] | None = None,
    notes: Sequence[str] | str | None = None,
    samples: Sequence[Mapping[str, object]] | None = None,
    treatments: Sequence[Mapping[str, object]] | None = None,
    comparison: pd.DataFrame | None = None,
    metric_info: Mapping[str, MetricInfo] | None = None,
    heatmap_metrics: Collection[str] | str | None = None,
    max_curve_checkpoints: int = 7,
    feature_examples: Mapping[str, Any] | None = None,
) -> str:
    """Render results, controls, samples, treatments, comparisons, config and manifest as one page.

    Args:
        results: Tidy results table with the columns in `REQUIRED_COLUMNS` and optionally
            `error`, one row per checkpoint x treatment x layer x token group x metric.
            `ci_low`, `ci_high` and `n` may be NaN. Rows with a non-empty `error` are
            listed in an Errors section and not plotted.
        title: Page title.
        controls: Validation caption loss in nats/token per adapter variant, such as
            `"trained adapter"` or `"untrained adapter"`, or a dict of such dicts keyed
            by run name. The `"trained adapter"` entry is compared with all the others.
        config: Resolved run config, shown as JSON.
        manifest: Run manifest (model, dataset, probe and checkpoint hashes, versions),
            shown as JSON.
        stage_times: Wall-clock seconds per pipeline stage.
        notes: Free-text notes listed near the end.
        samples: Sample captions, dicts with `checkpoint`, `reference` and `generated`.
        treatments: Dicts with `name`, `baseline`, `iterations`, and optionally `metrics`
            and `cost` (see `mmalign.reports.treatments.parse_treatments`). Rows named
            `delta:<metric>` whose checkpoint is an iteration are drawn as delta curves.
        comparison: Per-layer differences between two runs, with the columns in
            `mmalign.reports.treatments.COMPARISON_COLUMNS`.
        metric_info: Titles and descriptions that add to or override `METRIC_INFO`.
        heatmap_metrics: Metrics that get layer x checkpoint heatmaps, `"all"` for every
            metric with at least 2 non-null checkpoints, or None for the metrics in
            `DEFAULT_HEATMAP_METRICS` (see `select_heatmap_metrics`).
        max_curve_checkpoints: Most checkpoints drawn as curves in one plot. With more,
            the curves show this many, evenly spaced in training order.
        feature_examples: The contents of a run's `feature_examples.json`, or a dict of them
            keyed by run name. Adds a section that draws each example image's top SAE
            latents on its patch grid, and lets the page show `data:` images.

    Returns:
        The HTML document.

    Raises:
        TypeError: If `results` or `comparison` is not a DataFrame.
        ValueError: If `results` is empty, lacks required columns, has missing keys,
            non-numeric or non-integer values where numbers are needed, duplicate rows or
            `ci_low > ci_high`. Also if a control loss or stage time is not a number, or if
            samples, treatments or the comparison table are malformed.
        FeatureExamplesError: If `feature_examples` lacks fields the section reads.
    """
    started = time.perf_counter()
    frame, failed = validate_results(results)
    infos = {**METRIC_INFO, **(metric_info or {})}
    options = PlotOptions(
        max_curve_checkpoints=max_curve_checkpoints,
        heatmap_metrics=select_heatmap_metrics(heatmap_metrics, set(frame["metric"])),
    )
    # Cheap inputs are checked first, so a malformed one fails before any plotting.
    parsed_treatments = parse_treatments(treatments) if treatments is not None else []
    controls_body = controls_section(controls)
    samples_body = samples_section(samples) if samples is not None else None
    if comparison is not None:
        validate_comparison(comparison)
    stage_body = stage_times_section(stage_times) if stage_times else None
    features_body = features_section(feature_examples) if feature_examples else None
    if isinstance(notes, str):
        notes = [notes]

    series_order = order_series(frame)
    metrics = order_metrics(frame["metric"], infos)
    claimed = delta_rows_mask(frame, parsed_treatments)
    is_ratio = frame["token_group"] == RATIO_GROUP
    per_metric = frame[~claimed & ~is_ratio]
    section_metrics = order_metrics(per_metric["metric"], infos)
    section_metrics = [name for name in section_metrics if name not in claimed_as_null(set(section_metrics))]
    ratios = frame[~claimed & is_ratio]

    sections = [Section("summary", "Summary", summary_section(frame, metrics, series_order, failed))]
    if failed:
        sections.append(Section("errors", "Errors", errors_section(failed)))
    sections.append(Section("controls", "Control losses", controls_body))
    for index, metric in enumerate(section_metrics, start=1):
        info = describe_metric(metric, infos)
        anchor = f"metric-{index}-{slug(metric)}"
        body = metric_section(per_metric, metric, info, series_order, anchor, options)
        sections.append(Section(anchor, info.title, body))
    if not ratios.empty:
        body = image_text_section(ratios, order_metrics(ratios["metric"], infos), infos, series_order, options)
        sections.append(Section("image-vs-text", "Image vs text tokens", body))
    if features_body is not None:
        sections.append(Section("feature-examples", "Top SAE features on image tokens", features_body))
    if parsed_treatments:
        sections.append(Section("treatments", "Treatments", treatment_section(frame, parsed_treatments, infos, options)))
    if comparison is not None:
        sections.append(Section("comparison", "Run comparison", comparison_section(comparison, infos, options)))
    if samples_body is not None:
        sections.append(Section("samples", "Sample captions", samples_body))
    if not frame.empty:
        intro = (
            "<p>Every result row. Click a column heading to sort by it, and type words into the "
            "filter box to show only the rows that contain all of them.</p>"
        )
        sections.append(Section("all-results", "All results", intro + results_table(frame, metrics, series_order)))
    if stage_body is not None:
        sections.append(Section("stage-times", "Stage wall times", stage_body))
    if notes:
        sections.append(Section("notes", "Notes", notes_section(notes)))
    sections.append(Section("config", "Resolved config", json_block(config)))
    sections.append(Section("manifest", "Manifest", json_block(manifest)))

    # Text from the inputs is escaped, quotes included, so only a real data table matches.
    has_table = any('class="data-table' in section.body for section in sections)
    document = render_page(title, _INTRO, sections, scripts=[TABLE_SCRIPT] if has_table else [])
    if features_body is not None:
        document = _allow_data_images(document)
    logger.info(
        "rendered report %r: %d metrics, %d series, %d characters in %.1f s",
        title,
        len(metrics),
        len(series_order),
        len(document),
        time.perf_counter() - started,
    )
    return document


def _allow_data_images(document: str) -> str:
    """Add `img-src data:` to the page's Content-Security-Policy, so inline base64 images show.

    `data:` URLs are part of the page, so the page still makes no network request.
    """
    # NOTE: this edits the output of `render_page`; an image-source argument there would be cleaner.
    # The policy is HTML-escaped inside the meta tag's content attribute. Escaped text from
    # the inputs has `&quot;` in place of `"`, so only the real meta tag matches.
    marker = 'http-equiv="Content-Security-Policy" content="default-src &#x27;none&#x27;; '
    if document.count(marker) != 1:
        raise ValueError("cannot find the Content-Security-Policy's default-src in the rendered page")
    return document.replace(marker, marker + "img-src data:; ", 1)


def select_heatmap_metrics(requested: Collection[str] | str | None, present: set[str]) -> frozenset[str] | None:
    """Resolve the `heatmap_metrics` argument into the set of metrics that get heatmaps.

    Args:
        requested: `"all"`, a collection of metric names, or None for the headline metrics
            in `DEFAULT_HEATMAP_METRICS`. When none of those is present, None picks the
            first 6 metrics in report order, leaving out `@shuffled` and `delta:` names.
        present: Metrics in the results.

    Returns:
        The metric names, or None for every metric.
    """
    if requested == "all":
        return None
    if isinstance(requested, str):
        requested = [requested]
    if requested is None:
        chosen = [name for name in DEFAULT_HEATMAP_METRICS if name in present]
        if not chosen:
            plain = [name for name in present if SHUFFLED_SUFFIX not in name and not name.startswith(DELTA_PREFIX)]
            chosen = order_metrics(plain, METRIC_INFO)[:6]
        return frozenset(chosen)
    unknown = sorted(set(requested) - present)
    if unknown:
        logger.warning("heatmap metrics not in the results, so they get no heatmap: %s", ", ".join(unknown))
    return frozenset(requested)


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

    Calls `render_full_report` without samples, treatments or a comparison, and takes the
    same arguments and raises the same errors.
    """
    return render_full_report(
        results,
        title=title,
        controls=controls,
        config=config,
        manifest=manifest,
        stage_times=stage_times,
        notes=notes,
        metric_info=metric_info,
    )


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
