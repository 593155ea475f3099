"""Sortable, filterable HTML tables for the report, including the table of all results.

The table is plain HTML and reads without JavaScript. The one inline script,
`TABLE_SCRIPT`, adds sorting on a header click and shows a text filter box, which stays
hidden when scripts are off. The script reads the table from the DOM and writes only
`textContent` and attributes, so no result string is ever parsed as HTML.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pandas as pd

from mmalign.reports.markup import MAX_TEXT_COLUMNS, escape, format_number
from mmalign.reports.plots import order_token_groups

# Tables with more rows than this are left out of the printout, with a note in their place.
PRINT_ROW_LIMIT = 400

TABLE_SCRIPT = """
(function () {
  "use strict";
  function sortKey(cell) {
    var text = cell ? cell.textContent.trim() : "";
    var number = Number(text);
    if (text !== "" && !isNaN(number)) { return { number: number, text: text }; }
    return { number: null, text: text.toLowerCase() };
  }
  function compareKeys(a, b) {
    if (a.number !== null && b.number !== null) { return a.number - b.number; }
    if (a.number !== null) { return -1; }
    if (b.number !== null) { return 1; }
    return a.text < b.text ? -1 : (a.text > b.text ? 1 : 0);
  }
  function sortTable(table, headers, header, index) {
    var body = table.tBodies[0];
    var descending = header.getAttribute("aria-sort") === "ascending";
    var keyed = Array.prototype.map.call(body.rows, function (row, position) {
      return { row: row, key: sortKey(row.cells[index]), position: position };
    });
    keyed.sort(function (a, b) {
      var order = compareKeys(a.key, b.key);
      if (descending) { order = -order; }
      return order || a.position - b.position;
    });
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (item) { fragment.appendChild(item.row); });
    body.appendChild(fragment);
    headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
    header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  }
  function rowText(row) {
    if (row.searchText === undefined) {
      var titles = Array.prototype.map.call(row.querySelectorAll("[title]"), function (cell) {
        return cell.getAttribute("title");
      });
      row.searchText = (row.textContent + " " + titles.join(" ")).toLowerCase();
    }
    return row.searchText;
  }
  function filterTable(table, query, counter) {
    var terms = query.toLowerCase().split(/\\s+/).filter(Boolean);
    var rows = table.tBodies[0].rows;
    var shown = 0;
    Array.prototype.forEach.call(rows, function (row) {
      var text = rowText(row);
      var match = terms.every(function (term) { return text.indexOf(term) !== -1; });
      row.hidden = !match;
      if (match) { shown += 1; }
    });
    counter.textContent = "showing " + shown + " of " + rows.length + " rows";
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.data-table"), function (table) {
    var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
    headers.forEach(function (header, index) {
      var button = document.createElement("button");
      button.type = "button";
      while (header.firstChild) { button.appendChild(header.firstChild); }
      header.appendChild(button);
      button.addEventListener("click", function () { sortTable(table, headers, header, index); });
    });
    var tools = document.getElementById(table.id + "-tools");
    if (!tools) { return; }
    var input = tools.querySelector("input");
    var counter = tools.querySelector("output");
    input.addEventListener("input", function () { filterTable(table, input.value, counter); });
    tools.hidden = false;
  });
}());
"""

def data_table(
    table_id: str,
    headers: Sequence[str],
    rows: Sequence[str],
    *,
    text_columns: int = 0,
    label: str = "Filter rows",
) -> str:
    """Render a sortable, filterable table with a filter box that the script shows.

    Args:
        table_id: Id of the `<table>`, unique in the document. The filter box gets
            `<table_id>-tools`.
        headers: Column headings, escaped here.
        rows: Rendered `<td>` cells of each row, concatenated, without the `<tr>`.
        text_columns: Number of leading columns that contain text, which are left-aligned.
        label: Label of the filter box.

    Returns:
        The filter box and the table. A table of more than `PRINT_ROW_LIMIT` rows is
        marked to be left out of print, with a note shown in its place.

    Raises:
        ValueError: If `table_id` is not a plain id or `text_columns` is out of range.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", table_id):
        raise ValueError(f"invalid table id {table_id!r}: use letters, digits, '-' and '_'")
    if not 0 <= text_columns <= MAX_TEXT_COLUMNS:
        raise ValueError(f"text_columns must be between 0 and {MAX_TEXT_COLUMNS}, got {text_columns}")
    classes = "data-table" + (f" text-cols-{text_columns}" if text_columns else "")
    head = "".join(f"<th>{escape(header)}</th>" for header in headers)
    body = "\n".join(f"<tr>{row}</tr>" for row in rows)
    tools = (
        f'<div class="table-tools" id="{table_id}-tools" hidden><label>{escape(label)} '
        f'<input type="search" placeholder="words that every shown row contains"></label> '
        f'<output>showing {len(rows)} of {len(rows)} rows</output></div>'
    )
    table = (
        f'<div class="scroll"><table class="{classes}" id="{table_id}">'
        f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>"
    )
    if len(rows) > PRINT_ROW_LIMIT:
        note = (
            f'<p class="print-only">This table of {len(rows)} rows is left out of the printout. '
            "Open the HTML file to read, sort and filter it.</p>"
        )
        table = f'<div class="no-print">{table}</div>{note}'
    return tools + table


def results_table(frame: pd.DataFrame, metric_order: Sequence[str], series_order: Sequence[str]) -> str:
    """Render every row of a validated results frame as one sortable, filterable table.

    Rows are ordered by metric, token group, series (training order) and layer.
    """
    metric_rank = {name: index for index, name in enumerate(metric_order)}
    group_rank = {name: index for index, name in enumerate(order_token_groups(frame["token_group"]))}
    series_rank = {name: index for index, name in enumerate(series_order)}
    ordered = frame.assign(
        _metric=frame["metric"].map(metric_rank).fillna(len(metric_rank)),
        _group=frame["token_group"].map(group_rank),
        _series=frame["series"].map(series_rank),
    ).sort_values(["_metric", "metric", "_group", "_series", "layer"])

    rows = []
    for row in ordered.itertuples(index=False):
        count = "" if pd.isna(row.n) else format_number(row.n)
        rows.append(
            f"<td>{escape(row.checkpoint)}</td><td>{escape(row.treatment)}</td><td>{escape(row.metric)}</td>"
            f"<td>{escape(row.token_group)}</td><td>{row.layer}</td><td>{format_number(row.value)}</td>"
            f"<td>{format_number(row.ci_low)}</td><td>{format_number(row.ci_high)}</td><td>{count}</td>"
        )
    headers = ("checkpoint", "treatment", "metric", "token group", "layer", "value", "CI low", "CI high", "n")
    return data_table("results-table", headers, rows, text_columns=4)
