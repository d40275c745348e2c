"""Small tables of rows (dicts) that print as text, render as HTML in a notebook and save as CSV; the
notebooks' and dashboards' tables, without pandas."""

from __future__ import annotations

import html
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from pancreas_mtl.files import write_csv


def format_value(value, digits: int = 4) -> str:
    """A cell as text: floats with ``digits`` significant decimals, None and NaN as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 10 ** 6 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " x ".join(format_value(v, digits) for v in value)
    return str(value)


class Table:
    """Rows with named columns (the union of the rows' keys in first-seen order unless ``columns`` is given).

    ``str(table)`` is a fixed-width text table, a notebook shows ``_repr_html_``, ``to_csv`` writes it,
    ``to_markdown`` is it for docs.
    """

    def __init__(self, rows: Sequence[Mapping], columns: Sequence[str] | None = None, title: str = ""):
        self.rows = [dict(row) for row in rows]
        if columns is None:
            columns = list(dict.fromkeys(key for row in self.rows for key in row))
        self.columns = list(columns)
        self.title = title

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[dict]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    def column(self, name: str) -> list:
        """The values of one column, None where a row lacks it."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        return [row.get(name) for row in self.rows]

    def _cells(self) -> list[list[str]]:
        return [[format_value(row.get(column)) for column in self.columns] for row in self.rows]

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max([len(column)] + [len(row[i]) for row in cells]) for i, column in enumerate(self.columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(column.rjust(width) for column, width in zip(self.columns, widths)))
        lines += ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in cells]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(column)}</th>" for column in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                       for row in self._cells())
        caption = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def to_csv(self, path: str | Path) -> Path:
        return write_csv(path, self.columns, self._cells())

    def to_markdown(self) -> str:
        """A GitHub-flavoured markdown table (for docs and reports); ``|`` in a cell is escaped."""
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

        return "\n".join([line(self.columns), line(["---"] * len(self.columns)), *map(line, self._cells())])
