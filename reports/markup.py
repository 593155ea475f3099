"""HTML building blocks of the report: escaping, number formats, text cells and the page frame.

Every string that reaches the page from results, configs, manifests, captions or notes goes
through `escape`. The page carries a Content-Security-Policy that allows no network
request, inline styles, and only the inline scripts whose SHA-256 hashes it lists.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Captions and messages longer than this are cut in table cells. The full text stays in
# the cell's title attribute, which browsers show on hover.
CELL_TEXT_LIMIT = 200

# Number of leading text columns that a data table may declare. The CSS left-aligns them.
MAX_TEXT_COLUMNS = 6


@dataclass(frozen=True)
class Section:
    """One `<section>` of the report: its id, its heading and its HTML body."""

    anchor: str
    heading: str
    body: str


CSS = """
body { font-family: system-ui, sans-serif; line-height: 1.45; color: #1a1a1a;
       max-width: 60rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { margin-bottom: 0.3rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.5rem; }
code, pre { font-family: ui-monospace, monospace; font-size: 0.85rem; }
pre { background: #f6f6f6; padding: 0.75rem; overflow-x: auto; white-space: pre-wrap;
      word-break: break-word; }
table { border-collapse: collapse; font-size: 0.8rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.1rem 0.45rem; text-align: right;
         vertical-align: top; line-height: 1.15; }
th { background: #f0f0f0; } th.name, td.name { text-align: left; } th[colspan] { text-align: center; }
td.text { text-align: left; max-width: 26rem; overflow-wrap: anywhere; }
.ci { color: #555; font-size: 0.72rem; white-space: nowrap; }
.scroll { overflow-x: auto; }
figure { margin: 0.5rem 0; } figcaption { font-size: 0.8rem; color: #444; }
svg.plot { width: 100%; height: auto; max-width: 56rem; display: block; }
.verdict-pass { color: #1b6e1b; } .verdict-fail { color: #a31515; }
.error { color: #a31515; }
nav ul { columns: 2; font-size: 0.9rem; }
.table-tools { margin: 0.5rem 0; font-size: 0.85rem; }
.table-tools input { font: inherit; padding: 0.15rem 0.3rem; min-width: 18rem; }
.data-table th button { all: unset; cursor: pointer; }
.data-table th button:focus-visible { outline: 2px solid #0072B2; }
.data-table th[aria-sort="ascending"] button::after { content: " \\25B2"; }
.data-table th[aria-sort="descending"] button::after { content: " \\25BC"; }
.print-only { display: none; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  nav, .table-tools, .no-print { display: none; }
  .print-only { display: block; }
  svg.plot { max-width: 100%; }
  figure { break-inside: avoid; }
  h2, h3, h4 { break-after: avoid; }
  table { font-size: 7.5pt; } .ci { white-space: normal; }
  .scroll { overflow: visible; }
  pre { white-space: pre-wrap; background: none; border: 1px solid #ccc; }
  a { color: inherit; text-decoration: none; }
}
""" + "\n".join(
    f".text-cols-{count} td:nth-child(-n+{count}), .text-cols-{count} th:nth-child(-n+{count}) {{ text-align: left; }}"
    for count in range(1, MAX_TEXT_COLUMNS + 1)
)


def escape(value: object) -> str:
    """Return `str(value)` with `&`, `<`, `>` and both quote characters escaped for HTML."""
    return html.escape(str(value), quote=True)


def format_number(value: float | None) -> str:
    """Format a number with 4 significant digits, or "n/a" for None and NaN."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{float(value):.4g}"


def format_value(value: object) -> str:
    """Format a number like `format_number` and any other value as escaped text."""
    if isinstance(value, bool) or value is None:
        return escape(value)
    if isinstance(value, (int, float)):
        return format_number(float(value))
    return escape(value)


def format_duration(seconds: float) -> str:
    """Format seconds as "12.5 s", "3 min 05 s" or "1 h 02 min 05 s"."""
    if not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, remainder = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {remainder:02d} s" if hours else f"{minutes} min {remainder:02d} s"


def json_block(value: Mapping[str, Any] | Sequence[Any]) -> str:
    """Render a value as indented, escaped JSON in a `<pre>` block."""
    # default=str shows paths, enums and other non-JSON values by their string form.
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return f"<pre>{escape(text)}</pre>"


def text_cell(value: object, *, limit: int = CELL_TEXT_LIMIT, css_class: str = "text") -> str:
    """Render a `<td>` of free text, cut to `limit` characters with the full text in its title.

    Args:
        value: The text. None and NaN give an empty cell.
        limit: Maximum length of a text shown in full. A longer text shows its first `limit - 1`
            characters and an ellipsis.
        css_class: Class of the cell.

    Returns:
        The escaped cell.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f'<td class="{css_class}"></td>'
    text = str(value)
    if len(text) <= limit:
        return f'<td class="{css_class}">{escape(text)}</td>'
    shown = text[: limit - 1].rstrip() + "\u2026"
    return f'<td class="{css_class}" title="{escape(text)}">{escape(shown)}</td>'


def key_value_table(rows: Sequence[tuple[str, str]], *, header: tuple[str, str] | None = None) -> str:
    """Render (name, value) pairs as a two-column table. Both are escaped here."""
    head = ""
    if header:
        head = f'<tr><th class="name">{escape(header[0])}</th><th class="name">{escape(header[1])}</th></tr>'
    cells = [f'<tr><th class="name">{escape(name)}</th><td class="name">{escape(value)}</td></tr>' for name, value in rows]
    return f"<table>{head}{''.join(cells)}</table>"


def script_hash(script: str) -> str:
    """Return the CSP source expression `'sha256-...'` that allows exactly this inline script."""
    digest = hashlib.sha256(script.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode('ascii')}'"


def render_page(title: str, intro: str, sections: Sequence[Section], scripts: Sequence[str] = ()) -> str:
    """Assemble the HTML document: head with CSS and CSP, header, navigation, sections, scripts.

    Args:
        title: Page title, escaped here.
        intro: HTML of the introduction paragraph, inserted as is.
        sections: Sections in page order. Headings are escaped here and bodies are
            inserted as is.
        scripts: Inline scripts placed at the end of the body and allowed by hash.

    Returns:
        The HTML document.
    """
    script_sources = " ".join(script_hash(script) for script in scripts) or "'none'"
    policy = (
        "default-src 'none'; style-src 'unsafe-inline'; "
        f"script-src {script_sources}; base-uri 'none'; form-action 'none'"
    )
    nav = "".join(f'<li><a href="#{section.anchor}">{escape(section.heading)}</a></li>' for section in sections)
    body = "\n".join(
        f'<section id="{section.anchor}">\n<h2>{escape(section.heading)}</h2>\n{section.body}\n</section>'
        for section in sections
    )
    script_tags = "".join(f"\n<script>{script}</script>" for script in scripts)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{escape(policy)}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{escape(title)}</h1>\n<p>{intro}</p>\n</header>\n"
        f"<nav><ul>{nav}</ul></nav>\n{body}{script_tags}\n</body>\n</html>\n"
    )
