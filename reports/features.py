"""Report section: the top SAE latents of example images, drawn on their visual-token patch grid.

The artifact is `feature_examples.json` in a run directory (written by the pipeline from
`mmalign.probes.descriptions.image_feature_examples`, plus captions and thumbnails). Each
image is drawn once as an inline base64 PNG and reused by every layer's SVG through
`<use>`. A CSS-only layer selector (radio buttons, no script) shows one layer at a time,
and print shows the selected layer. Patches carry a letter key as well as a colour from
the Okabe-Ito palette, so the figure reads in greyscale. Every string from the artifact
is escaped.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from mmalign.reports.markup import escape, format_number
from mmalign.vision import pad_to_square

FEATURES_FILE = "feature_examples.json"
FEATURES_FORMAT = 1
THUMBNAIL_SIZE = 128  # pixels per side of the stored thumbnails
DRAWN_SIZE = 256  # SVG units per side of the drawn image
CAPTION_LIMIT = 300  # characters of a caption shown in a heading; the full text is in its title
CONTEXTS_SHOWN = 3
# Okabe-Ito colours (without black): distinct for common colour-vision deficiencies.
PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7")
OTHER_COLOUR = "#999999"

FEATURES_CSS = """
.fx-radio { position: absolute; opacity: 0; }
label.fx-pick { display: inline-block; border: 1px solid #888; padding: 0 0.4rem; margin: 0 0.15rem 0.3rem 0;
                 cursor: pointer; font-size: 0.85rem; }
.fx-radio:focus-visible + label { outline: 2px solid #0072B2; }
.fx-radio:checked + label { background: #1a1a1a; color: #fff; }
.fx-layer { display: none; }
.fx-row { display: flex; gap: 1rem; align-items: flex-start; flex-wrap: wrap; }
.fx-row svg { width: 16rem; height: auto; flex: none; print-color-adjust: exact; -webkit-print-color-adjust: exact; }
.fx-row table { flex: 1 1 24rem; }
.fx-layer td.text { max-width: 30rem; }
.fx-key { display: inline-block; min-width: 1.2rem; text-align: center; font-weight: bold; border: 1px solid #000;
          print-color-adjust: exact; -webkit-print-color-adjust: exact; }
.fx-context { display: block; color: #333; }
.fx-context mark { background: none; font-weight: bold; text-decoration: underline; }
.fx-defs { position: absolute; width: 0; height: 0; overflow: hidden; }
.fx-image h3, .fx-image h4 { overflow-wrap: anywhere; }
@media print { .fx-pick { display: none; } .fx-image { break-inside: avoid; } }
"""


class FeatureExamplesError(ValueError):
    """A feature examples artifact that is missing fields or has values of the wrong type."""


def encode_thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> str:
    """Pad an image to a white square (the vision encoder's preprocessing), resize it and return it as base64 PNG."""
    square = pad_to_square(image.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    square.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise FeatureExamplesError(f"feature examples {source}: {message}; rerun `mmalign run` to rewrite the file")


def validate_feature_examples(data: Any, source: str = "<dict>") -> dict[str, Any]:
    """Check the fields the report reads and return the artifact.

    Raises:
        FeatureExamplesError: naming the source, the field and what was expected.
    """
    _require(isinstance(data, Mapping), source, f"expected a JSON object, got {type(data).__name__}")
    _require(data.get("format") == FEATURES_FORMAT, source, f"format {data.get('format')!r} is not {FEATURES_FORMAT}")
    for key, kind in (("layout", Mapping), ("layers", list), ("images", list), ("latents", Mapping)):
        _require(isinstance(data.get(key), kind), source, f"field {key!r} is missing or not a {kind.__name__}")
    layout = data["layout"]
    _require(layout.get("grid") is None or isinstance(layout.get("grid"), int), source, "layout.grid must be an integer or null")
    n_tokens = int(layout.get("n_visual_tokens", -1))
    for index, image in enumerate(data["images"]):
        _require(isinstance(image, Mapping) and isinstance(image.get("layers"), Mapping), source, f"image {index} has no 'layers' object")
        for layer, entry in image["layers"].items():
            _require(str(layer) in data["latents"], source, f"image {index}, layer {layer} has no entry in 'latents'")
            tokens = entry.get("tokens")
            _require(isinstance(tokens, list) and len(tokens) == n_tokens, source,
                     f"image {index}, layer {layer} must list {n_tokens} visual tokens")
            _require(isinstance(entry.get("top"), list), source, f"image {index}, layer {layer} has no 'top' list")
    return dict(data)


def read_feature_examples(path: Path) -> dict[str, Any]:
    """Read and check a `feature_examples.json` file.

    Raises:
        FeatureExamplesError: when the file is not valid JSON or lacks fields the report reads.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FeatureExamplesError(f"{path} is not valid JSON ({error}); rerun `mmalign run` to rewrite it") from None
    return validate_feature_examples(data, str(path))


def _key_name(index: int) -> str:
    return chr(ord("A") + index) if index < 26 else str(index + 1)


def _colour(index: int) -> str:
    return PALETTE[index] if index < len(PALETTE) else OTHER_COLOUR


def _legend_order(entry: Mapping[str, Any]) -> list[int]:
    """Return the image's top latents, then latents that are strongest on some token but not in the top."""
    order = [int(item["latent"]) for item in entry["top"]]
    for token in entry["tokens"]:
        if token.get("strongest") is not None and int(token["strongest"]) not in order:
            order.append(int(token["strongest"]))
    return order


def _token_mark(token: Mapping[str, Any], keys: dict[int, int], latents: Mapping[str, Any], label: str) -> tuple[str, str, str]:
    """Return (fill colour, key text, tooltip) of one visual token."""
    strongest = token.get("strongest")
    if strongest is None:
        return "none", "\u2013", f"{label}: no latent below the density cut fires"
    key = keys[int(strongest)]
    description = latents.get(str(strongest), {}).get("description", "")
    tooltip = f"{label}: latent {strongest} (key {_key_name(key)}), activation {format_number(token.get('activation'))}: {description}"
    return _colour(key), _key_name(key), tooltip


def _cell(x: float, y: float, width: float, height: float, mark: tuple[str, str, str]) -> str:
    fill, key, tooltip = mark
    font = max(8.0, min(width, height) * 0.42)
    opacity = ' fill-opacity="0.45"' if fill != "none" else ""
    return (
        f'<g><title>{escape(tooltip)}</title>'
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" fill="{fill}"{opacity} '
        'stroke="#000" stroke-width="1"/>'
        f'<text x="{x + width / 2:.1f}" y="{y + height / 2:.1f}" font-size="{font:.1f}" font-weight="bold" '
        'text-anchor="middle" dominant-baseline="central" fill="#000" stroke="#fff" stroke-width="3" '
        f'paint-order="stroke">{escape(key)}</text></g>'
    )


def _image_svg(image_ref: str, layout: Mapping[str, Any], tokens: list[Mapping[str, Any]], keys: dict[int, int],
               latents: Mapping[str, Any], title: str) -> str:
    """Draw the image with its patch grid and, below it, the tokens that have no patch (CLS or prefix tokens)."""
    size = DRAWN_SIZE
    grid = layout.get("grid")
    has_cls = bool(layout.get("cls"))
    parts = [f'<use href="#{image_ref}"/>']
    if grid:
        side = size / grid
        patch_tokens = tokens[int(has_cls):]
        for index, token in enumerate(patch_tokens):
            row, column = divmod(index, grid)
            mark = _token_mark(token, keys, latents, f"patch row {row + 1}, column {column + 1}")
            parts.append(_cell(column * side, row * side, side, side, mark))
        strip = [("CLS", tokens[0])] if has_cls else []
    else:
        strip = [(f"token {index + 1}", token) for index, token in enumerate(tokens)]
    per_row = max(1, min(len(strip), 8))
    box_width, box_height = size / per_row, 28.0
    for index, (label, token) in enumerate(strip):
        row, column = divmod(index, per_row)
        y = size + 6 + row * (box_height + 4)
        fill, key, tooltip = _token_mark(token, keys, latents, label)
        key_text = f"CLS: {key}" if grid else key  # prefix tokens are numbered by their order in the strip
        parts.append(_cell(column * box_width, y, box_width, box_height, (fill, key_text, tooltip)))
    n_rows = math.ceil(len(strip) / per_row) if strip else 0
    height = size + (6 + n_rows * (box_height + 4) if n_rows else 0)
    return (
        f'<svg viewBox="0 0 {size} {height:.0f}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>{''.join(parts)}</svg>"
    )


def _collapse_spaces(text: object) -> str:
    """Replace each run of whitespace (newlines included) by one space, keeping word boundaries."""
    return re.sub(r"\s+", " ", str(text))


def _contexts_html(contexts: list[Mapping[str, Any]]) -> str:
    shown = []
    for context in contexts[:CONTEXTS_SHOWN]:
        token = str(context.get("token", ""))
        text = (
            f"{escape(_collapse_spaces(context.get('left', '')))}"
            f"<mark>{escape(_collapse_spaces(token) if token.strip() else repr(token))}</mark>"
            f"{escape(_collapse_spaces(context.get('right', '')))}"
        )
        shown.append(f'<span class="fx-context">\u2026{text}\u2026 ({format_number(context.get("activation"))})</span>')
    return "".join(shown)


def _legend(order: list[int], entry: Mapping[str, Any], latents: Mapping[str, Any]) -> str:
    summed = {int(item["latent"]): item.get("activation") for item in entry["top"]}
    rows = []
    for index, latent in enumerate(order):
        info = latents.get(str(latent), {})
        key = f'<span class="fx-key" style="background:{_colour(index)}">{escape(_key_name(index))}</span>'
        rank = format_number(summed[latent]) if latent in summed else "strongest on a token only"
        density = info.get("density")
        density_text = "n/a" if density is None else f"{100 * float(density):.2f} %"
        if info.get("dense"):
            density_text += " (dense)"
        rows.append(
            f'<tr><td class="name">{key}</td><td>{latent}</td><td>{rank}</td><td>{density_text}</td>'
            f'<td class="text">{escape(info.get("description", "no description"))}'
            f'{_contexts_html(info.get("contexts", []))}</td></tr>'
        )
    header = (
        '<tr><th class="name">key</th><th>latent</th><th>summed activation</th><th>text density</th>'
        '<th class="name">description and top text contexts</th></tr>'
    )
    if not rows:
        return "<p>No latent below the density cut fires on this image's visual tokens at this layer.</p>"
    return f"<table>{header}{''.join(rows)}</table>"


def _image_block(prefix: str, number: int, image: Mapping[str, Any], data: Mapping[str, Any], heading_level: int) -> str:
    caption = str(image.get("caption", ""))
    shown = caption if len(caption) <= CAPTION_LIMIT else caption[: CAPTION_LIMIT - 1].rstrip() + "\u2026"
    title_attribute = f' title="{escape(caption)}"' if shown != caption else ""
    heading = f"<h{heading_level}{title_attribute}>Image {number}: {escape(shown)}</h{heading_level}>"
    blocks = []
    for layer in data["layers"]:
        entry = image["layers"].get(str(layer))
        if entry is None:
            continue
        latents = data["latents"][str(layer)]
        order = _legend_order(entry)
        keys = {latent: index for index, latent in enumerate(order)}
        svg = _image_svg(f"{prefix}-img-{number}", data["layout"], entry["tokens"], keys, latents,
                         f"Image {number} at layer {layer}: strongest SAE latent per visual token")
        dense = entry.get("n_dense_active", 0)
        note = (
            f"<p>Layer {escape(layer)}. {int(dense)} dense latents fire on these tokens. They rank after "
            "every other latent that fires.</p>"
        )
        legend = _legend(order, entry, latents)
        blocks.append(f'<div class="fx-layer fx-l-{escape(layer)}">{note}<div class="fx-row">{svg}{legend}</div></div>')
    return f'<div class="fx-image">{heading}{"".join(blocks)}</div>'


def _default_layer(layers: list[Any]) -> Any:
    """Return the middle probed layer: early layers are rarely language-like, the last is a special case."""
    return layers[len(layers) // 2]


def _run_block(prefix: str, data: Mapping[str, Any], heading_level: int) -> str:
    layers = list(data["layers"])
    if not layers or not data["images"]:
        return "<p>The feature examples contain no images or no layers.</p>"
    chosen = _default_layer(layers)
    radios = []
    rules = []
    for layer in layers:
        radio_id = f"{prefix}-pick-{escape(layer)}"
        checked = " checked" if layer == chosen else ""
        radios.append(
            f'<input type="radio" class="fx-radio" name="{prefix}-layer" id="{radio_id}"{checked}>'
            f'<label class="fx-pick" for="{radio_id}">layer {escape(layer)}</label>'
        )
        rules.append(f"#{radio_id}:checked ~ .fx-images .fx-l-{escape(layer)} {{ display: block; }}")
    defs = "".join(
        f'<image id="{prefix}-img-{number}" width="{DRAWN_SIZE}" height="{DRAWN_SIZE}" '
        f'href="data:image/png;base64,{escape(image.get("thumbnail_png_base64", ""))}"/>'
        for number, image in enumerate(data["images"], start=1)
    )
    images = "".join(
        _image_block(prefix, number, image, data, heading_level) for number, image in enumerate(data["images"], start=1)
    )
    return (
        f"<style>{' '.join(rules)}</style>"
        f'<svg class="fx-defs" aria-hidden="true"><defs>{defs}</defs></svg>'
        f'<div class="fx-root"><span class="fx-pick">Show layer: </span>{"".join(radios)}'
        f'<div class="fx-images">{images}</div></div>'
    )


def features_section(examples: Mapping[str, Any]) -> str:
    """Render the feature examples of one run, or of several runs keyed by run name.

    Raises:
        FeatureExamplesError: when an artifact lacks fields the section reads.
    """
    runs = {"": examples} if "images" in examples else dict(examples)
    intro = (
        "<p>For a few validation images, the SAE latents that fire on the final adapter's visual "
        "tokens. Each patch of the pooled grid is marked with the key of its strongest latent, "
        "and the legend lists the image's top latents by activation summed over its visual "
        "tokens. Descriptions come from each latent's top-activating contexts in the text the "
        "SAE was fitted on (activating token in bold and underlined). Dense latents, which fire "
        "on many text tokens, rank after all other latents that fire, because they fire almost "
        "everywhere. Hover over a patch for its latent and activation.</p>"
    )
    parts = [f"<style>{FEATURES_CSS}</style>", intro]
    for index, (name, data) in enumerate(runs.items()):
        data = validate_feature_examples(data, name or "<dict>")
        if name:
            parts.append(f"<h3>{escape(name)}</h3>")
        parts.append(_run_block(f"fx{index}", data, 4 if name else 3))
    return "".join(parts)
