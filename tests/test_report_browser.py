"""Open a generated report in headless Chromium: no console errors, no injected script, no requests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browser import Chromium, find_chromium
from test_report_features import make_examples
from test_report_full import SAMPLES, TREATMENTS, make_comparison, make_full_results, render_full

# Each payload would set a flag or send a request if the report let it through unescaped.
INJECTIONS = (
    "<script>window.__injected = 'script'</script>",
    "<img src=x onerror=\"window.__injected = 'onerror'\">",
    "<img src=\"http://127.0.0.1:9/leak.png\">",
    "\"><svg onload=\"window.__injected = 'svg'\">",
    "javascript:window.__injected = 'link'",
)
ARTIFACTS = Path(os.environ.get("MMALIGN_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("chromium is not installed; scripts/setup.sh installs Debian's chromium package")
    with Chromium(executable) as chromium:
        yield chromium


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory) -> Path:
    samples = SAMPLES + [{"checkpoint": "final", "reference": text, "generated": text} for text in INJECTIONS]
    notes = [f"feature description: {text}" for text in INJECTIONS]
    document = render_full(
        make_full_results(), samples=samples, treatments=TREATMENTS, comparison=make_comparison(), notes=notes,
        title=f"report {INJECTIONS[0]}", feature_examples=make_examples(captions=INJECTIONS),
    )
    path = tmp_path_factory.mktemp("report") / "report.html"
    path.write_text(document, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def page(browser, hostile_report):
    record = browser.open_page(hostile_report, expressions={
        "injected": "String(window.__injected)",
        "sections": "document.querySelectorAll('section').length",
        "tables": "document.querySelectorAll('table.data-table').length",
        "thumbnails": "Array.from(document.querySelectorAll('#feature-examples image, #feature-examples img'))"
                      ".filter(node => (node.getAttribute('href') || node.getAttribute('src') || '').startsWith('data:')).length",
    })
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "report_screenshot.png").write_bytes(record.screenshot)
    return record


def test_report_no_console_errors(page) -> None:
    assert page.console_errors == []


def test_report_no_injected_script_ran(page) -> None:
    assert page.evaluated["injected"] == "undefined"


def test_report_no_request_left_page(page) -> None:
    assert page.requests == []


def test_report_rendered_sections(page) -> None:
    assert page.evaluated["sections"] >= 5
    assert page.evaluated["tables"] >= 1


def test_report_feature_thumbnails_load(page) -> None:
    assert page.evaluated["thumbnails"] >= 1


def test_report_screenshot_saved(page) -> None:
    saved = (ARTIFACTS / "report_screenshot.png").read_bytes()
    assert saved.startswith(b"\x89PNG")
    assert len(saved) > 10_000


def test_browser_sees_unescaped_script(browser, tmp_path) -> None:
    """The checks can fail: an unescaped payload is caught."""
    path = tmp_path / "bad.html"
    path.write_text(f"<html><body>{INJECTIONS[0]}{INJECTIONS[2]}<script>console.error('boom')</script></body></html>",
                    encoding="utf-8")
    record = browser.open_page(path, expressions={"injected": "String(window.__injected)"})
    assert record.evaluated["injected"] == "script"
    assert record.requests == ["http://127.0.0.1:9/leak.png"]
    assert any("boom" in message for message in record.console_errors)
