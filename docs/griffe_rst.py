"""griffe extension: read the reStructuredText habits of our docstrings as Markdown.

The docstrings are written for ``help()`` and IDEs, in Sphinx style (``:param x:``, which
mkdocstrings parses itself, ``:class:`Name```, ``Example::`` blocks and simple ``===`` tables,
which it does not). Rewriting them here keeps the source readable in a terminal while the site
shows code spans and tables instead of raw markup.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|obj|exc|const):`~?([^`]+)`")
_BORDER = re.compile(r"^\s*=+(?:\s+=+)+\s*$")


def _role(match: re.Match[str]) -> str:
    text = match.group(0)
    target = match.group(1)
    # ``~a.b.C`` shows only ``C``, as Sphinx does.
    return f"`{target.rsplit('.', 1)[-1] if '`~' in text else target}`"


def _columns(border: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in re.finditer(r"=+", border)]


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    cells = []
    for index, (start, end) in enumerate(spans):
        stop = spans[index + 1][0] if index + 1 < len(spans) else len(line)
        cells.append(line[start:stop].strip() if end else "")
    return cells


def _tables(text: str) -> str:
    """Turn RST simple tables (border, header, border, rows, border) into Markdown tables."""
    lines = text.split("\n")
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if not (_BORDER.match(line) and index + 2 < len(lines) and _BORDER.match(lines[index + 2])):
            out.append(line)
            index += 1
            continue
        spans = _columns(line)
        rows = [_cells(lines[index + 1], spans)]
        index += 3
        while index < len(lines) and not _BORDER.match(lines[index]):
            cells = _cells(lines[index], spans)
            if not cells[0] and len(rows) > 1:  # a continuation line of the previous row
                rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
            elif any(cells):
                rows.append(cells)
            index += 1
        index += 1  # the closing border
        out.append("| " + " | ".join(rows[0]) + " |")
        out.append("|" + "---|" * len(spans))
        out.extend("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows[1:])
    return "\n".join(out)


def markdown_from_rst(text: str) -> str:
    text = _ROLE.sub(_role, text)
    # ``Example::`` introduces an indented literal block, which Markdown already reads as code.
    text = re.sub(r"::$", ":", text, flags=re.M)
    text = re.sub(r"\s*# doctest: \+SKIP$", "", text, flags=re.M)
    return _tables(text)


class RstToMarkdown(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_from_rst(obj.docstring.value)
