"""Tests for the HTML report renderer in mmalign.reports.html and its plots."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mmalign.reports.html import METRIC_INFO, REQUIRED_COLUMNS, render_report, write_report
from mmalign.reports.table import TABLE_SCRIPT

LAYERS = range(6)
GROUP_METRICS = ("sae_mse", "sae_fvu", "sae_l0")
PAIR_METRICS = ("cka_linear", "retrieval_top1")
GROUP_OFFSETS = {"image": 0.5, "caption": 0.2, "text": 0.1}
CONTROLS = {"trained adapter": 2.5, "untrained adapter": 4.0, "trained adapter, shuffled images": 3.75}


def expected_value(layer: int, group: str) -> float:
    """Value stored in the synthetic table: known, so cells can be checked."""
    return round(1.0 + GROUP_OFFSETS.get(group, 0.0) - 0.125 * layer, 4)


def make_results(checkpoints: tuple[str, ...] = ("ckpt-a",), *, with_ci: bool = True) -> pd.DataFrame:
    rows = []
    for checkpoint in checkpoints:
        for layer in LAYERS:
            for metric in GROUP_METRICS + PAIR_METRICS:
                groups = ("pair",) if metric in PAIR_METRICS else tuple(GROUP_OFFSETS)
                for group in groups:
                    value = expected_value(layer, group)
                    rows.append(
                        {
                            "checkpoint": checkpoint,
                            "treatment": "none",
                            "layer": layer,
                            "token_group": group,
                            "metric": metric,
                            "value": value,
                            "ci_low": value - 0.05 if with_ci else math.nan,
                            "ci_high": value + 0.05 if with_ci else math.nan,
                            "n": 128,
                        }
                    )
    return pd.DataFrame(rows)


def render(results: pd.DataFrame, **overrides) -> str:
    arguments = {
        "title": "Demo run",
        "controls": CONTROLS,
        "config": {"lm": "bundled:smollm2-135m", "batch_size": 8},
        "manifest": {"mmalign_version": "0.1.0", "dataset": "synthetic"},
    }
    arguments.update(overrides)
    return render_report(results, **arguments)


def section_html(document: str, anchor: str) -> str:
    return document.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]


def svg_elements(document: str) -> list[str]:
    return re.findall(r"<svg\b.*?</svg>", document, flags=re.DOTALL)


def assert_only_table_script(document: str) -> None:
    """Check that the page's one script is the table script, inline and without attributes."""
    assert document.lower().count("<script") == 1
    assert "<script>" + TABLE_SCRIPT + "</script>" in document


@pytest.fixture(scope="module")
def basic_report() -> str:
    return render(
        make_results(),
        stage_times={"cache vision features": 12.5, "evaluate": 3725.0},
        notes=["Synthetic numbers for a test."],
    )


def test_render_report_has_section_per_metric(basic_report: str) -> None:
    for metric in GROUP_METRICS + PAIR_METRICS:
        assert f"<code>{metric}</code>" in basic_report
        assert METRIC_INFO[metric].title in basic_report
        assert re.search(rf'<section id="metric-\d+-{metric.replace("_", "-")}">', basic_report)
    assert len(svg_elements(basic_report)) == len(GROUP_METRICS + PAIR_METRICS)


def test_render_report_has_fixed_sections(basic_report: str) -> None:
    for anchor in ("summary", "controls", "stage-times", "notes", "config", "manifest"):
        assert f'<section id="{anchor}">' in basic_report
    assert "<h1>Demo run</h1>" in basic_report
    assert "Synthetic numbers for a test." in basic_report
    assert "1 h 02 min 05 s" in basic_report
    assert "&quot;lm&quot;: &quot;bundled:smollm2-135m&quot;" in basic_report
    assert "@media print" in basic_report


def test_render_report_table_shows_values_and_ci(basic_report: str) -> None:
    value = expected_value(3, "image")
    assert value == 1.125
    assert f"<td>{value:.4g}<br>" in basic_report
    assert f'<span class="ci">[{value - 0.05:.4g}, {value + 0.05:.4g}]</span>' in basic_report
    assert "<th>image (n=128)</th>" in basic_report
    assert "<th>pair (n=128)</th>" in basic_report


def test_render_report_controls_verdict_pass(basic_report: str) -> None:
    assert "verdict-pass" in basic_report
    assert "is lower than all 2 controls" in basic_report


def test_render_report_controls_verdict_fail() -> None:
    controls = {"trained adapter": 4.5, "untrained adapter": 4.0, "trained adapter, shuffled images": 5.0}
    document = render(make_results(), controls=controls)
    assert "verdict-fail" in document
    assert "is not lower than 1 of 2 controls: untrained adapter (4)" in document


def test_render_report_controls_missing() -> None:
    document = render(make_results(), controls=None)
    assert "No control losses were given" in document


def test_render_report_rejects_non_numeric_control() -> None:
    with pytest.raises(ValueError, match="untrained adapter"):
        render(make_results(), controls={"trained adapter": 2.0, "untrained adapter": "high"})


def test_render_report_rejects_non_numeric_stage_time() -> None:
    with pytest.raises(ValueError, match="'evaluate'"):
        render(make_results(), stage_times={"evaluate": "slow"})


def test_render_report_escapes_hostile_strings() -> None:
    hostile = "<script>alert(1)</script>"
    results = make_results((hostile, "ckpt & \"quoted\" 'single' 😀 日本語"))
    results.loc[results["metric"] == "sae_l0", "metric"] = "l0 <b>bold</b> & \"x\""
    document = render(
        results,
        title=f"Run {hostile} 字幕",
        controls={"trained adapter": 2.0, hostile: 3.0},
        config={"caption_prefix": hostile, "nested": {"key & <tag>": ["a\"b", "🐈 猫"]}},
        manifest={hostile: hostile},
        stage_times={hostile: 1.0},
        notes=[f"note {hostile} & 🙂"],
    )

    assert_only_table_script(document)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in document
    assert "<b>bold</b>" not in document
    assert "l0 &lt;b&gt;bold&lt;/b&gt; &amp; &quot;x&quot;" in document
    assert "ckpt &amp; &quot;quoted&quot; &#x27;single&#x27; 😀 日本語" in document
    assert "🐈 猫" in document
    assert "字幕" in document

    svgs = svg_elements(document)
    assert svgs
    assert any("&lt;script&gt;alert(1)&lt;/script&gt;" in svg for svg in svgs)
    assert all("<script" not in svg.lower() for svg in svgs)


def test_render_report_has_no_external_resources() -> None:
    config = {"dataset_url": "https://example.org/data.tar", "mirror": "http://example.org/"}
    document = render(make_results(("a", "b")), config=config)
    attributes = re.findall(r"""\b(?:src|href|xlink:href|action|srcset)\s*=\s*["']?([^"'\s>]*)""", document)
    assert attributes, "the navigation links should be found"
    for target in attributes:
        assert target.startswith("#"), target
    assert_only_table_script(document)
    assert "default-src &#x27;none&#x27;" in document
    assert "<link" not in document.lower()
    assert "@import" not in document
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", document)
    # The config URLs are shown as escaped text only.
    assert "https://example.org/data.tar" in document


def test_render_report_svg_ids_are_unique() -> None:
    document = render(make_results(("a", "b")))
    ids = re.findall(r'\sid="([^"]+)"', document)
    assert len(ids) == len(set(ids))
    for reference in re.findall(r'(?:xlink:href="#|url\(#)([^")]+)', document):
        assert reference in ids


def test_render_report_leaves_pyplot_unloaded() -> None:
    # A fresh interpreter, because other tests in the same process may import pyplot.
    code = (
        "import sys\n"
        "import tests.test_report as test_report\n"
        "test_report.render(test_report.make_results())\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    repository = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=repository
    )
    assert completed.returncode == 0, completed.stderr


def test_render_report_is_deterministic() -> None:
    assert render(make_results()) == render(make_results())


def test_render_report_nan_ci_draws_no_band() -> None:
    without_ci = render(make_results(with_ci=False))
    assert "fill-opacity: 0.18" not in without_ci
    assert 'class="ci"' not in without_ci
    with_ci = render(make_results())
    assert "fill-opacity: 0.18" in with_ci


def test_render_report_single_layer_metric() -> None:
    results = make_results()
    single = results[(results["metric"] == "cka_linear") & (results["layer"] == 2)].copy()
    single["metric"] = "cka_single_layer"
    single.loc[:, ["ci_low", "ci_high"]] = np.nan
    document = render(pd.concat([results, single], ignore_index=True))
    assert "<code>cka_single_layer</code>" in document
    assert len(svg_elements(document)) == len(GROUP_METRICS + PAIR_METRICS) + 1


def test_render_report_unknown_metric_uses_name() -> None:
    results = make_results()
    results.loc[results["metric"] == "sae_mse", "metric"] = "mystery_score"
    document = render(results)
    assert "<h2>mystery_score</h2>" in document
    assert "SAE reconstruction MSE" not in document


def test_render_report_several_checkpoints_panels() -> None:
    results = make_results(("baseline", "_underscored $x$"))
    treated = make_results(("baseline",))
    treated["treatment"] = "self-rewarding"
    document = render(pd.concat([results, treated], ignore_index=True))
    svg = svg_elements(document)[0]
    assert ">baseline</text>" in svg
    assert ">_underscored $x$</text>" in svg
    assert ">baseline [self-rewarding]</text>" in svg
    pair_svg = svg_elements(document)[-1]
    assert ">_underscored $x$</text>" in pair_svg
    assert '<th colspan="3">baseline [self-rewarding]</th>' in document
    assert '<th colspan="1">_underscored $x$</th>' in section_html(document, "metric-5-retrieval-top1")


@pytest.mark.parametrize("columns", [("ci_low",), ("n", "metric")])
def test_render_report_missing_columns_raise(columns: tuple[str, ...]) -> None:
    results = make_results().drop(columns=list(columns))
    with pytest.raises(ValueError, match="missing required columns") as error:
        render(results)
    for column in columns:
        assert column in str(error.value)


def test_render_report_empty_results_raise() -> None:
    with pytest.raises(ValueError, match="empty"):
        render(pd.DataFrame(columns=list(REQUIRED_COLUMNS)))


def test_render_report_rejects_non_dataframe() -> None:
    with pytest.raises(TypeError, match="DataFrame"):
        render(make_results().to_dict("records"))


@pytest.mark.parametrize(
    ("column", "bad_value", "message"),
    [
        ("layer", 1.5, "integer layer indices, got 1.5"),
        ("layer", "third", "'layer' must be numeric"),
        ("value", "high", "'value' must be numeric"),
        ("metric", None, "'metric' has 1 missing"),
        ("ci_low", 99.0, "ci_low 99.0 > ci_high"),
    ],
)
def test_render_report_invalid_cells_raise(column: str, bad_value: object, message: str) -> None:
    results = make_results().astype({column: object})
    results.loc[0, column] = bad_value
    with pytest.raises(ValueError, match=re.escape(message)):
        render(results)


def test_render_report_duplicate_rows_raise() -> None:
    results = make_results()
    with pytest.raises(ValueError, match="repeated key") as error:
        render(pd.concat([results, results.iloc[:1]], ignore_index=True))
    assert "checkpoint='ckpt-a'" in str(error.value)
    assert "layer=0" in str(error.value)


def test_write_report_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    write_report(target, "<p>first 日本</p>")
    write_report(target, "<p>second 😀</p>")
    assert target.read_text(encoding="utf-8") == "<p>second 😀</p>"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html"]
    assert target.stat().st_mode & 0o777 == 0o644


def test_write_report_failed_replace_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.html"
    write_report(target, "old")

    def fail_replace(source: str, destination: str) -> None:
        raise OSError("simulated rename failure")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OSError, match="simulated"):
        write_report(target, "new")
    assert target.read_text(encoding="utf-8") == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.html"]


def test_write_report_missing_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "absent" / "report.html", "<p></p>")
