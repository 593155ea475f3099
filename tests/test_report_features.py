"""Tests for mmalign.reports.features: the feature examples section, its escaping, and its wiring."""

from __future__ import annotations

import argparse
import base64
import copy
import html
import io
import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmalign.reports.cli import register_cli
from mmalign.reports.features import (
    FEATURES_FILE,
    FeatureExamplesError,
    encode_thumbnail,
    features_section,
    read_feature_examples,
    validate_feature_examples,
)
from mmalign.reports.html import render_full_report
from mmalign.reports.results_io import write_results

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'
LONG_CAPTION = "A small grey cat sleeps on a red sofa next to a window. " * 10 + "END-OF-CAPTION"
NON_LATIN = "猫がソファで寝ている 🐈 قطة نائمة सोफ़े पर"
LAYERS = [3, 29]
GRID = 2


def thumbnail() -> str:
    return encode_thumbnail(Image.new("RGB", (40, 20), (200, 30, 30)))


def make_examples(captions: tuple[str, ...] = (HOSTILE, NON_LATIN, LONG_CAPTION)) -> dict:
    latents = {
        str(layer): {
            "7": {"description": f"{HOSTILE} description", "density": 0.01, "dead": False, "firing": 3,
                  "contexts": [{"left": "the <b>big", "token": " dog", "right": "</b> ran", "activation": 2.5}]},
            "11": {"description": "\"🐈\", \"猫\"; e.g. \"[[猫]]\"", "density": 0.02, "dead": False, "firing": 5, "contexts": []},
            "12": {"description": "dead: never fires on the 10 fitting texts", "density": 0.0, "dead": True, "firing": 0, "contexts": []},
            "13": {"description": "\"the\"", "density": 0.4, "dead": False, "dense": True, "firing": 40, "contexts": []},
        }
        for layer in LAYERS
    }
    tokens = [{"strongest": 12, "activation": 0.5, "l0": 4}]  # CLS
    tokens += [{"strongest": 7, "activation": 2.0, "l0": 3}, {"strongest": 11, "activation": 1.0, "l0": 2},
               {"strongest": None, "activation": 0.0, "l0": 0}, {"strongest": 7, "activation": 1.5, "l0": 1}]
    entry = {"top": [{"latent": 7, "activation": 3.5}, {"latent": 11, "activation": 1.0}, {"latent": 13, "activation": 9.0}],
             "tokens": tokens, "n_dense_active": 2}
    images = [
        {"image_id": f"img{index}.png", "caption": caption, "thumbnail_png_base64": thumbnail(),
         "layers": {str(layer): copy.deepcopy(entry) for layer in LAYERS}}
        for index, caption in enumerate(captions)
    ]
    return {"format": 1, "key": "abc", "checkpoint": "final", "layout": {"cls": True, "grid": GRID, "n_visual_tokens": 1 + GRID * GRID},
            "layers": LAYERS, "top_k": 5, "max_density": 0.1, "images": images, "latents": latents}


def make_results() -> pd.DataFrame:
    rows = [
        {"checkpoint": "final", "treatment": "none", "layer": layer, "token_group": "pair", "metric": "cka_linear",
         "value": 0.1 * layer, "ci_low": math.nan, "ci_high": math.nan, "n": 16}
        for layer in LAYERS
    ]
    return pd.DataFrame(rows)


def render(examples: dict | None) -> str:
    return render_full_report(make_results(), title="features", controls=None, config={"name": "t"}, manifest={},
                              feature_examples=examples)


def section_html(document: str) -> str:
    match = re.search(r'<section id="feature-examples">(.*?)</section>', document, re.S)
    assert match, "no feature examples section"
    return match.group(1)


def test_encode_thumbnail_pads_to_square_png() -> None:
    data = base64.b64decode(thumbnail())
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert image.size == (128, 128)
    assert image.convert("RGB").getpixel((64, 5)) == (255, 255, 255)  # white padding above a wide image
    assert image.convert("RGB").getpixel((64, 64)) == (200, 30, 30)


def test_features_section_escapes_captions_and_descriptions() -> None:
    section = features_section(make_examples())
    assert "<script" not in section.lower()
    assert "<img" not in section.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in section
    assert "the &lt;b&gt;big<mark> dog</mark>&lt;/b&gt; ran" in section


def test_features_section_renders_emoji_and_non_latin() -> None:
    section = features_section(make_examples())
    assert NON_LATIN in section
    assert "&quot;🐈&quot;, &quot;猫&quot;" in section


def test_features_section_cuts_long_captions() -> None:
    section = features_section(make_examples())
    heading = re.search(r'<h3 title="([^"]*)">Image 3: ([^<]*)</h3>', section)
    assert heading is not None
    assert html.unescape(heading.group(1)) == LONG_CAPTION
    assert "END-OF-CAPTION" not in heading.group(2)
    assert heading.group(2).endswith("\u2026")


def test_features_section_labels_every_patch() -> None:
    section = features_section(make_examples())
    layer_block = re.search(r'<div class="fx-layer fx-l-3">(.*?)</table></div></div>', section, re.S).group(1)
    svg = re.search(r"<svg viewBox.*?</svg>", layer_block, re.S).group(0)
    assert svg.count("<rect") == 1 + GRID * GRID  # CLS box and the patches
    labels = re.findall(r'paint-order="stroke">([^<]*)</text>', svg)
    # Legend keys: A, B, C = latents 7, 11, 13 (the top latents), D = latent 12 (strongest on CLS only).
    assert labels == ["A", "B", "\u2013", "A", "CLS: D"]
    assert "strongest on a token only" in layer_block
    assert "40.00 % (dense)" in layer_block


def test_features_section_prefix_tokens_drawn_as_strip() -> None:
    examples = make_examples(("a prefix adapter",))
    examples["layout"] = {"cls": False, "grid": None, "n_visual_tokens": 3}
    for entry in examples["images"][0]["layers"].values():
        entry["tokens"] = entry["tokens"][1:4]
    section = features_section(examples)
    svg = re.search(r"<svg viewBox.*?</svg>", section, re.S).group(0)
    assert svg.count("<rect") == 3
    assert re.findall(r'paint-order="stroke">([^<]*)</text>', svg) == ["A", "B", "\u2013"]


def test_features_section_one_image_copy_per_image() -> None:
    section = features_section(make_examples())
    assert section.count("data:image/png;base64,") == 3
    assert section.count('<use href="#fx0-img-1"/>') == len(LAYERS)


def test_features_section_layer_selector_checks_middle_layer() -> None:
    section = features_section(make_examples())
    checked = re.findall(r'<input type="radio" class="fx-radio" name="fx0-layer" id="([^"]+)" checked>', section)
    assert checked == ["fx0-pick-29"]


def test_full_report_with_features_makes_no_network_request() -> None:
    document = render(make_examples())
    assert "http://" not in document
    assert "https://" not in document
    tags = " ".join(re.findall(r"<[^>]+>", document))  # escaped text such as &lt;img src=x&gt; is no tag
    targets = re.findall(r"""\b(?:src|href|xlink:href|action|srcset)\s*=\s*["']?([^"'\s>]*)""", tags)
    assert targets
    for target in targets:
        assert target.startswith(("#", "data:image/png;base64,")), target
    assert not re.search(r"url\(", section_html(document))
    policy = html.unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', document).group(1))
    assert policy.startswith("default-src 'none'; img-src data:; ")


def test_full_report_ids_unique_with_features() -> None:
    document = render(make_examples())
    ids = re.findall(r'\sid="([^"]+)"', document)
    assert len(ids) == len(set(ids))


def test_full_report_without_features_keeps_strict_policy() -> None:
    document = render(None)
    assert 'id="feature-examples"' not in document
    assert "img-src" not in document


def test_full_report_features_keyed_by_run() -> None:
    document = render({"run a": make_examples(), "run <b>": make_examples(("one",))})
    section = section_html(document)
    assert "<h3>run &lt;b&gt;</h3>" in section
    assert 'name="fx1-layer"' in section


def test_validate_feature_examples_names_missing_field() -> None:
    broken = make_examples()
    del broken["latents"]
    with pytest.raises(FeatureExamplesError, match="'latents'"):
        validate_feature_examples(broken, "run/feature_examples.json")


def test_validate_feature_examples_checks_token_count() -> None:
    broken = make_examples()
    broken["layout"]["n_visual_tokens"] = 9
    with pytest.raises(FeatureExamplesError, match="must list 9 visual tokens"):
        validate_feature_examples(broken)


def test_read_feature_examples_rejects_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / FEATURES_FILE
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(FeatureExamplesError, match="not valid JSON"):
        read_feature_examples(path)


def test_report_command_picks_up_run_feature_examples(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_results(make_results(), run / "results.parquet")
    (run / FEATURES_FILE).write_text(json.dumps(make_examples(), ensure_ascii=False), encoding="utf-8")
    parser = argparse.ArgumentParser(prog="mmalign")
    register_cli(parser.add_subparsers(dest="command", required=True))
    output = tmp_path / "report.html"
    args = parser.parse_args(["report", str(run), "-o", str(output)])
    assert args.handler(args) == 0
    document = output.read_text(encoding="utf-8")
    assert 'id="feature-examples"' in document
    assert NON_LATIN in document


def test_report_command_rejects_broken_feature_examples(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    write_results(make_results(), run / "results.parquet")
    (run / FEATURES_FILE).write_text(json.dumps({"format": 1}), encoding="utf-8")
    parser = argparse.ArgumentParser(prog="mmalign")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(run), "-o", str(tmp_path / "report.html")])
    assert args.handler(args) == 2
    assert "feature_examples.json" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_run_writes_feature_examples(tmp_path: Path) -> None:
    from mmalign.config import load_config
    from mmalign.pipeline import run_pipeline

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "quick.yaml", {"output_dir": str(tmp_path)})
    result = run_pipeline(config)
    examples = read_feature_examples(result.run_dir / FEATURES_FILE)
    assert examples["layers"] == [3, 29]
    assert examples["layout"] == {"cls": True, "grid": 2, "n_visual_tokens": 5}
    assert 1 <= len(examples["images"]) <= 4
    for layer in (3, 29):
        descriptions = list(result.run_dir.glob(f"probes/*/layer_{layer:02d}/descriptions.json"))
        assert len(descriptions) == 1
        assert len(json.loads(descriptions[0].read_text(encoding="utf-8"))["latents"]) == config.probes.d_sae
    document = result.report_path.read_text(encoding="utf-8")
    assert 'id="feature-examples"' in document
    assert "http://" not in document
    assert "https://" not in document
    assert result.stage_seconds["feature descriptions"] > 0
