"""Tests for render_full_report: null baselines, heatmaps, ratios, samples, treatments, comparisons."""

from __future__ import annotations

import base64
import hashlib
import html
import math
import re
import time

import numpy as np
import pandas as pd
import pytest

from mmalign.reports.html import render_full_report, render_report, select_heatmap_metrics
from mmalign.reports.markup import CELL_TEXT_LIMIT
from mmalign.reports.metric_info import METRIC_INFO, describe_metric, order_metrics
from mmalign.reports.metric_sections import pick_evenly
from mmalign.reports.results_frame import checkpoint_sort_key
from mmalign.reports.table import PRINT_ROW_LIMIT, TABLE_SCRIPT

LAYERS = (0, 1, 2)
TREATMENT = "self-rewarding"
CHECKPOINTS = (
    ("null:untrained", "none"),
    ("step_000040", "none"),
    ("step_000080", "none"),
    ("final", "none"),
    ("self-rewarding/M1", TREATMENT),
    ("self-rewarding/M2", TREATMENT),
)
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
LONG_CAPTION = "A small grey cat sleeps on a red sofa next to a window. " * 10 + "END-OF-CAPTION"
NON_LATIN = ("猫がソファで寝ている 🐈", "قطة نائمة على الأريكة", "सोफ़े पर सोती बिल्ली", "family 👩‍👩‍👧 emoji")


def result_row(checkpoint: str, layer: float, group: str, metric: str, value: float, treatment: str = "none") -> dict:
    return {
        "checkpoint": checkpoint,
        "treatment": treatment,
        "layer": layer,
        "token_group": group,
        "metric": metric,
        "value": value,
        "ci_low": value - 0.01,
        "ci_high": value + 0.01,
        "n": 64,
    }


def cka_value(index: int, layer: int) -> float:
    """Linear CKA of the index-th checkpoint in CHECKPOINTS: known, so heatmap cells can be checked."""
    return round(0.1 * index + 0.01 * layer, 4)


def make_full_results() -> pd.DataFrame:
    rows = []
    for index, (checkpoint, treatment) in enumerate(CHECKPOINTS):
        is_null = checkpoint.startswith("null:")
        for layer in LAYERS:
            image_fvu = 0.9 - 0.1 * index
            rows.append(result_row(checkpoint, layer, "image", "sae_fvu", image_fvu, treatment))
            rows.append(result_row(checkpoint, layer, "caption", "sae_fvu", 0.5 - 0.05 * index, treatment))
            # The text group does not depend on the checkpoint.
            rows.append(result_row(checkpoint, layer, "text", "sae_fvu", 0.2 + 0.01 * layer, treatment))
            rows.append(result_row(checkpoint, layer, "image/text", "sae_fvu", image_fvu / (0.2 + 0.01 * layer), treatment))
            rows.append(result_row(checkpoint, layer, "pair", "cka_linear", cka_value(index, layer), treatment))
            rows.append(result_row(checkpoint, layer, "image", "linear_probe_accuracy", 0.4 + 0.05 * index, treatment))
            rows.append(result_row(checkpoint, layer, "image", "linear_probe_majority", 0.25, treatment))
            if not is_null:
                rows.append(result_row(checkpoint, layer, "pair", "cka_linear@shuffled", 0.02, treatment))
    for step, iteration in enumerate(("self-rewarding/M1", "self-rewarding/M2"), start=1):
        for layer in LAYERS:
            rows.append(result_row(iteration, layer, "pair", "delta:cka_linear", 0.05 * step, TREATMENT))
    frame = pd.DataFrame(rows)
    frame["error"] = None
    failed = {column: math.nan for column in frame.columns}
    failed.update(checkpoint="step_000120", treatment="none", error=f"CUDA out of memory {HOSTILE}")
    return pd.concat([frame, pd.DataFrame([failed, {**failed, "metric": "sae_fvu"}])], ignore_index=True)


SAMPLES = [
    {"checkpoint": "final", "reference": LONG_CAPTION, "generated": HOSTILE},
    {"checkpoint": "step_000040", "reference": NON_LATIN[0], "generated": NON_LATIN[1]},
    {"checkpoint": "step_000080", "reference": NON_LATIN[2], "generated": NON_LATIN[3]},
]
TREATMENTS = [
    {
        "name": TREATMENT,
        "baseline": "final",
        "iterations": ["self-rewarding/M1", "self-rewarding/M2"],
        "metrics": {
            "self-rewarding/M1": {"judge agreement": 0.625, "caption length": 11.5},
            "self-rewarding/M2": {"judge agreement": 0.75, "caption length": 13.25},
        },
        "cost": {"gpu hours": 3.5, "judge calls": 1200},
    }
]


def make_comparison() -> pd.DataFrame:
    rows = []
    for layer in LAYERS:
        for metric, difference in (("cka_linear", 0.1), ("sae_fvu", -0.002)):
            rows.append(
                {
                    "layer": layer,
                    "token_group": "pair" if metric == "cka_linear" else "image",
                    "metric": metric,
                    "run_a": "run-b16",
                    "run_b": "run-b8",
                    "difference": difference,
                    "ci_low": difference - 0.05,
                    "ci_high": difference + 0.05,
                    "n": 64,
                }
            )
    return pd.DataFrame(rows)


def render_full(results: pd.DataFrame, **overrides) -> str:
    arguments = {
        "title": "Full demo",
        "controls": {"trained adapter": 2.5, "untrained adapter": 4.0},
        "config": {"lm": "bundled:smollm2-135m"},
        "manifest": {"mmalign_version": "0.1.0"},
    }
    arguments.update(overrides)
    return render_full_report(results, **arguments)


def section_html(document: str, anchor: str) -> str:
    return document.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]


def svg_with_prefix(document: str, prefix: str) -> str:
    for svg in re.findall(r"<svg\b.*?</svg>", document, flags=re.DOTALL):
        if f'id="{prefix}-figure_1"' in svg:
            return svg
    raise AssertionError(f"no SVG with id prefix {prefix}")


def svg_ids(document: str) -> list[str]:
    return re.findall(r'<g id="([A-Za-z0-9-]+)-figure_1"', document)


def text_elements(svg: str) -> list[str]:
    return [html.unescape(text) for text in re.findall(r"<text\b[^>]*>([^<]*)</text>", svg)]


@pytest.fixture(scope="module")
def full_report() -> str:
    return render_full(
        make_full_results(),
        samples=SAMPLES,
        treatments=TREATMENTS,
        comparison=make_comparison(),
        notes=[f"feature 1234 description: {HOSTILE}"],
        metric_info={"cka_linear": METRIC_INFO["cka_linear"].__class__("Linear CKA", f"Feature text {HOSTILE}", "higher")},
        heatmap_metrics="all",
    )


def test_full_report_has_every_section(full_report: str) -> None:
    anchors = re.findall(r'<section id="([^"]+)">', full_report)
    assert anchors == [
        "summary",
        "errors",
        "controls",
        "metric-1-sae-fvu",
        "metric-2-cka-linear",
        "metric-3-linear-probe-accuracy",
        "image-vs-text",
        "treatments",
        "comparison",
        "samples",
        "all-results",
        "notes",
        "config",
        "manifest",
    ]


def test_full_report_draws_nulls_on_metric_axes(full_report: str) -> None:
    cka = svg_with_prefix(full_report, "metric-2-cka-linear")
    texts = text_elements(cka)
    assert "null: captions shuffled" in texts
    assert "null: untrained" in texts
    assert "#707070" in cka
    assert "fill-opacity: 0.12" in cka
    probe = svg_with_prefix(full_report, "metric-3-linear-probe-accuracy")
    assert "null: majority class" in text_elements(probe)


def test_full_report_nulls_get_no_own_section(full_report: str) -> None:
    assert "cka-linear-shuffled" not in full_report
    assert "linear-probe-majority" not in full_report
    # They are still listed in the table of all results.
    table = section_html(full_report, "all-results")
    assert "<td>cka_linear@shuffled</td>" in table
    assert "<td>linear_probe_majority</td>" in table


def test_full_report_null_checkpoint_not_in_heatmap(full_report: str) -> None:
    heatmap = svg_with_prefix(full_report, "metric-2-cka-linear-heat-0")
    assert "null:untrained" not in heatmap


def test_full_report_heatmap_orders_checkpoints(full_report: str) -> None:
    texts = text_elements(svg_with_prefix(full_report, "metric-2-cka-linear-heat-0"))
    order = [
        "step_000040",
        "step_000080",
        "final",
        "self-rewarding/M1 [self-rewarding]",
        "self-rewarding/M2 [self-rewarding]",
    ]
    assert [text for text in texts if text in order] == order


def test_full_report_heatmap_prints_cell_values(full_report: str) -> None:
    texts = text_elements(svg_with_prefix(full_report, "metric-2-cka-linear-heat-0"))
    for index in range(1, len(CHECKPOINTS)):
        for layer in LAYERS:
            assert f"{cka_value(index, layer):.3g}" in texts
    assert "cividis" not in full_report  # the colour map shows as colours, not a name
    assert "higher is better" in texts


def test_full_report_skips_constant_group_heatmap(full_report: str) -> None:
    section = section_html(full_report, "metric-1-sae-fvu")
    assert "The text token group gets no heatmap" in section
    prefixes = [prefix for prefix in svg_ids(section) if "-heat-" in prefix]
    assert prefixes == ["metric-1-sae-fvu-heat-0", "metric-1-sae-fvu-heat-1"]


def test_full_report_image_text_ratio_section(full_report: str) -> None:
    section = section_html(full_report, "image-vs-text")
    assert "SAE fraction of variance unexplained, image / text" in section
    assert svg_ids(section) == ["ratio-1-sae-fvu", "ratio-1-sae-fvu-heat"]
    # Ratio rows are not drawn in the metric's own section, whose scale differs.
    assert "image/text" not in " ".join(text_elements(svg_with_prefix(full_report, "metric-1-sae-fvu")))


def test_full_report_errors_listed_not_plotted(full_report: str) -> None:
    errors = section_html(full_report, "errors")
    assert "step_000120" in errors
    assert "<td>2</td>" in errors
    assert "CUDA out of memory &lt;script&gt;" in errors
    for svg in re.findall(r"<svg\b.*?</svg>", full_report, flags=re.DOTALL):
        assert "step_000120" not in svg
    assert "failed checkpoints" in section_html(full_report, "summary")


def test_full_report_escapes_hostile_strings(full_report: str) -> None:
    assert full_report.lower().count("<script") == 1
    assert "<script>" + TABLE_SCRIPT + "</script>" in full_report
    assert "<img" not in full_report.lower()
    assert "Feature text &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in full_report
    assert "feature 1234 description: &lt;script&gt;" in section_html(full_report, "notes")
    assert "&lt;img src=x onerror=alert(1)&gt;" in section_html(full_report, "samples")


def test_full_report_csp_allows_only_table_script(full_report: str) -> None:
    digest = base64.b64encode(hashlib.sha256(TABLE_SCRIPT.encode()).digest()).decode()
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', full_report).group(1)
    policy = html.unescape(policy)
    assert "default-src 'none'" in policy
    assert f"script-src 'sha256-{digest}'" in policy
    assert "unsafe-inline'; script" not in policy.replace("style-src 'unsafe-inline'; ", "")


def test_full_report_samples_truncate_long_captions(full_report: str) -> None:
    samples = section_html(full_report, "samples")
    cell = re.search(r'<td class="text" title="([^"]*)">([^<]*)</td>', samples)
    assert cell is not None
    title, shown = html.unescape(cell.group(1)), html.unescape(cell.group(2))
    assert title == LONG_CAPTION
    assert len(shown) <= CELL_TEXT_LIMIT
    assert shown.endswith("\u2026")
    assert "END-OF-CAPTION" not in shown


def test_full_report_samples_show_non_latin_text(full_report: str) -> None:
    samples = section_html(full_report, "samples")
    for text in NON_LATIN:
        assert text in samples
    # Samples are ordered by training step, not by input order.
    assert samples.index("step_000040") < samples.index("step_000080") < samples.index(">final<")


def test_full_report_results_table_lists_every_row(full_report: str) -> None:
    table = section_html(full_report, "all-results")
    valid_rows = make_full_results()["error"].isna().sum()
    body = table.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr>") == valid_rows
    assert 'id="results-table-tools" hidden' in table
    assert '<input type="search"' in table
    assert '<table class="data-table text-cols-4" id="results-table">' in table


def test_full_report_treatment_section(full_report: str) -> None:
    section = section_html(full_report, "treatments")
    assert "judge agreement" in section
    assert "<td>0.625</td>" in section
    assert "<td>13.25</td>" in section
    assert "gpu hours" in section
    assert "<td>1200</td>" in section
    delta = svg_with_prefix(full_report, "treatment-1-delta-cka-linear")
    texts = text_elements(delta)
    assert "self-rewarding/M1 [self-rewarding]" in texts
    assert "self-rewarding/M2 [self-rewarding]" in texts
    assert "Change in Linear CKA" in section
    # Claimed delta rows get no metric section of their own.
    assert "metric-4" not in full_report


def test_full_report_comparison_section(full_report: str) -> None:
    section = section_html(full_report, "comparison")
    assert svg_ids(section) == ["comparison-1-sae-fvu", "comparison-2-cka-linear"]
    assert "(run-b16 \u2212 run-b8)" in section
    body = section.split("<tbody>", 1)[1]
    assert body.count("<td>yes</td>") == len(LAYERS)  # cka_linear: [0.05, 0.15]
    assert body.count("<td>no</td>") == len(LAYERS)  # sae_fvu: [-0.052, 0.048]


def test_full_report_ids_unique_and_resolved(full_report: str) -> None:
    ids = re.findall(r'\sid="([^"]+)"', full_report)
    assert len(ids) == len(set(ids))
    for reference in re.findall(r'(?:xlink:href="#|url\(#|href="#)([^")]+)', full_report):
        assert reference in ids


def test_full_report_has_no_urls(full_report: str) -> None:
    # Escaped text cannot contain "<", so every match inside a tag is a real attribute.
    tags = " ".join(re.findall(r"<[^<>]+>", full_report))
    targets = re.findall(r"""\b(?:src|href|xlink:href|action|srcset)\s*=\s*["']?([^"'\s>]*)""", tags)
    assert targets
    for target in targets:
        assert target.startswith("#"), target
    assert "data:" not in full_report


def test_full_report_print_styles(full_report: str) -> None:
    print_css = full_report.split("@media print", 1)[1].split("</style>", 1)[0]
    assert ".table-tools" in print_css
    assert "break-inside: avoid" in print_css
    # Lines carry markers and dash patterns, which survive black-and-white print.
    cka = svg_with_prefix(full_report, "metric-2-cka-linear")
    assert "stroke-dasharray" in cka
    assert "<use" in cka


def test_render_report_wraps_full_report(monkeypatch: pytest.MonkeyPatch) -> None:
    import mmalign.reports.html as report_html

    calls = []
    monkeypatch.setattr(report_html, "render_full_report", lambda results, **kwargs: calls.append(kwargs) or "page")
    arguments = {"title": "t", "controls": None, "config": {"a": 1}, "manifest": {}, "notes": ["n"]}
    assert render_report(make_full_results(), **arguments) == "page"
    assert calls == [{**arguments, "stage_times": None, "metric_info": None}]


def test_full_report_all_checkpoints_failed() -> None:
    results = make_full_results()
    document = render_full(results[results["checkpoint"] == "step_000120"])
    assert '<section id="errors">' in document
    assert '<section id="all-results">' not in document
    assert "every checkpoint failed" in document
    assert "<script" not in document


def test_full_report_unclaimed_delta_gets_section() -> None:
    results = make_full_results()
    document = render_full(results[results["error"].isna()], heatmap_metrics=[])
    section = section_html(document, "metric-3-delta-cka-linear")
    assert "<h2>Change in Linear CKA, image vs text</h2>" in document
    assert "The dotted line marks 0." in section


def test_full_report_many_checkpoints_thin_curves() -> None:
    rows = []
    checkpoints = [f"step_{40 * (index + 1):06d}" for index in range(19)] + ["final"]
    rng = np.random.default_rng(0)
    for checkpoint in checkpoints:
        for layer in range(11):
            for metric, group in (("cka_linear", "pair"), ("sae_fvu", "image")):
                rows.append(result_row(checkpoint, layer, group, metric, float(rng.random())))
    document = render_full(pd.DataFrame(rows))
    section = section_html(document, "metric-2-cka-linear")
    assert "The curves show 7 of 20 checkpoints" in section
    curves = text_elements(svg_with_prefix(document, "metric-2-cka-linear"))
    assert "step_000040" in curves
    assert "final" in curves
    heatmap = text_elements(svg_with_prefix(document, "metric-2-cka-linear-heat-0"))
    assert "step_000400" in heatmap
    # 20 x 11 cells are too many to print values in, so only labels and ticks are text.
    assert len(heatmap) < 60
    assert "The <a href=\"#all-results\">table of all results</a>" in section
    assert len(document) < 1_500_000


def test_select_heatmap_metrics_defaults() -> None:
    assert select_heatmap_metrics(None, {"sae_fvu", "sae_l0", "cka_linear"}) == {"sae_fvu", "cka_linear"}
    assert select_heatmap_metrics(None, {"x1", "sae_l0"}) == {"sae_l0", "x1"}
    assert select_heatmap_metrics("all", {"sae_l0"}) is None
    assert select_heatmap_metrics("sae_l0", {"sae_l0"}) == {"sae_l0"}


def test_checkpoint_sort_key_training_order() -> None:
    names = [
        ("self-rewarding/M10", TREATMENT),
        ("final", "none"),
        ("self-rewarding/M2", TREATMENT),
        ("step_001000", "none"),
        ("null:untrained", "none"),
        ("step_000080", "none"),
        ("custom", "none"),
    ]
    ordered = sorted(names, key=lambda pair: checkpoint_sort_key(*pair))
    assert [name for name, _ in ordered] == [
        "null:untrained",
        "step_000080",
        "step_001000",
        "final",
        "custom",
        "self-rewarding/M2",
        "self-rewarding/M10",
    ]


def test_pick_evenly_keeps_ends() -> None:
    items = [str(index) for index in range(20)]
    picked = pick_evenly(items, 7)
    assert len(picked) == 7
    assert picked[0] == "0"
    assert picked[-1] == "19"
    assert pick_evenly(items[:3], 7) == items[:3]


def test_metric_info_known_names_have_direction() -> None:
    expected = {"sae_fvu": "lower", "cka_linear": "higher", "modality_gap": "lower", "norm_ratio": "closer to 1"}
    for name, better in expected.items():
        assert METRIC_INFO[name].better == better
    for name in ("sae_dead", "sae_dense", "sae_relative_bias", "retrieval_t2i_r5", "cknna", "kl_score"):
        assert name in METRIC_INFO


def test_describe_metric_derived_names() -> None:
    shuffled = describe_metric("mutual_knn@shuffled")
    assert shuffled.title == "Mutual k-NN alignment, image vs text, captions shuffled"
    assert shuffled.better is None
    delta = describe_metric("delta:sae_fvu")
    assert delta.title == "Change in SAE fraction of variance unexplained"
    assert delta.better == "lower"
    assert describe_metric("brand_new").title == "brand_new"
    assert order_metrics(["delta:sae_mse", "zzz", "sae_mse@shuffled", "sae_mse"], METRIC_INFO) == [
        "sae_mse",
        "sae_mse@shuffled",
        "delta:sae_mse",
        "zzz",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"treatments": [{"name": "t", "baseline": "final"}]}, "treatment 0 is missing iterations"),
        ({"treatments": [{"name": "t", "baseline": "final", "iterations": "M1"}]}, "iterations must be a list"),
        ({"samples": [{"checkpoint": "final", "reference": "a"}]}, "sample 0 is missing the keys generated"),
        ({"comparison": make_comparison().drop(columns=["run_b"])}, "missing required columns: run_b"),
        ({"max_curve_checkpoints": 1}, "at least 2"),
    ],
)
def test_full_report_rejects_malformed_inputs(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        render_full(make_full_results(), **overrides)


def test_full_report_large_table_left_out_of_print() -> None:
    checkpoints = [f"step_{index:06d}" for index in range(40)]
    rows = [result_row(checkpoint, layer, "pair", "cka_linear", 0.5) for layer in range(11) for checkpoint in checkpoints]
    document = render_full(pd.DataFrame(rows), heatmap_metrics=[], max_curve_checkpoints=2)
    assert len(rows) > PRINT_ROW_LIMIT
    table = section_html(document, "all-results")
    assert '<div class="no-print"><div class="scroll"><table class="data-table' in table
    assert f"This table of {len(rows)} rows is left out of the printout" in table


@pytest.mark.slow
def test_full_report_twenty_checkpoints_time_and_size() -> None:
    """20 checkpoints x 11 layers x 30 metrics with default heatmaps.

    Measured 17.5 s and 5.2 MB on 2 shared CPU cores (load average about 7) with
    matplotlib 3.11; with every heatmap it took 85 s and 9 MB.
    """
    sae = ["sae_mse", "sae_fvu", "sae_explained_variance", "sae_cosine", "sae_l0", "sae_l1", "sae_frac_active",
           "sae_l2_ratio", "sae_relative_bias", "sae_dead", "sae_dense"]
    pair = ["feature_jaccard", "feature_weighted_overlap", "cka_linear", "cka_unbiased", "mutual_knn", "cknna",
            "svcca", "retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_t2i_r1", "retrieval_t2i_r5", "modality_gap",
            "norm_ratio", "cka_linear@shuffled", "mutual_knn@shuffled", "retrieval_i2t_r1@shuffled"]
    spec = [(metric, group) for metric in sae for group in ("image", "caption", "text")]
    spec += [(metric, "caption") for metric in ("ce_loss_recovered", "kl_score")]
    spec += [(metric, "pair") for metric in pair] + [("linear_probe_accuracy", "image")]
    spec += [(metric, "image/text") for metric in sae[:6]]
    checkpoints = ["null:untrained"] + [f"step_{40 * (index + 1):06d}" for index in range(19)] + ["final"]
    rng = np.random.default_rng(0)
    rows = [
        result_row(checkpoint, layer, group, metric, float(rng.random()))
        for checkpoint in checkpoints
        for layer in range(11)
        for metric, group in spec
    ]
    results = pd.DataFrame(rows)
    assert results["metric"].nunique() == 30

    started = time.perf_counter()
    document = render_full(results)
    seconds = time.perf_counter() - started
    assert seconds < 120
    assert len(document.encode()) < 12_000_000
