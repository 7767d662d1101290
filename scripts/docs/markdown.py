"""Markdown building blocks of the generated pages: escaped text, tables whose cells stay short
(a longer text goes to a definition list below the table), wrapped paragraphs."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

CELL_MAX = 100  # characters of text in a table cell; longer text goes below the table
WIDTH = 100  # wrapped paragraphs (Markdown source lines stay readable)
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# A wrapped line must not begin with what Markdown reads as a list item, quote or heading.
_BLOCK_START = re.compile(r"^([-+*>#]|\d+[.)])(\s|$)")


def code(text: object) -> str:
    """`text` as an inline code span (double backticks when it holds one)."""
    s = str(text)
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def text(s: str) -> str:
    """Plain text (a comment, a docstring) made safe for Markdown: `<`, `>`, `&` and `*` stay
    literal outside code spans; code spans are kept."""
    out, last = [], 0
    for m in _CODE_SPAN.finditer(s):
        out.append(_escape(s[last : m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(_escape(s[last:]))
    return "".join(out)


def _escape(s: str) -> str:
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([*\\_\[\]])", r"\\\1", s)


def cell(s: str) -> str:
    """Text for a table cell: escaped, one line, `|` not taken for a column break."""
    return text(" ".join(s.split())).replace("|", "\\|")


def code_cell(s: object) -> str:
    """A code span for a table cell (a `|` inside a code span is no column break)."""
    return code(" ".join(str(s).split()))


def paragraph(s: str, indent: str = "") -> str:
    """Escaped text wrapped at WIDTH, never inside a code span, no line starting a list, quote
    or heading by accident."""
    escaped = text(" ".join(s.split()))
    kept = _CODE_SPAN.sub(lambda m: m.group(0).replace(" ", "\0"), escaped)
    lines: list[str] = []
    for line in textwrap.wrap(
        kept, WIDTH - len(indent), break_on_hyphens=False, break_long_words=False
    ):
        line = line.replace("\0", " ")
        if lines and _BLOCK_START.match(line):
            head, _, rest = line.partition(" ")
            lines[-1] += " " + head
            line = rest
        if line:
            lines.append(line)
    return "\n".join(indent + line for line in lines)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table; cells must already be escaped (cell, code_cell)."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


@dataclass
class Notes:
    """Texts too long for a table cell, rendered as a definition list under the table."""

    entries: list[tuple[str, str, bool]] = field(default_factory=list)  # term, text, is YAML

    def cell(self, term: str, s: str) -> str:
        """`s` for a cell when short; else kept for the list below, the cell pointing there."""
        s = " ".join(s.split())
        if len(s) <= CELL_MAX:
            return cell(s) if s else "—"
        self.entries.append((term, s, False))
        return "see below"

    def block(self, term: str, yaml: str) -> str:
        """A value too long for a cell, shown below as a YAML block; the cell points there."""
        self.entries.append((term, yaml, True))
        return "see below"

    def render(self) -> str:
        out = []
        for term, s, is_yaml in self.entries:
            if is_yaml:
                body = "\n".join("    " + line for line in s.splitlines())
                out.append(f"{term}\n:   In full:\n\n    ```yaml\n{body}\n    ```")
            else:
                out.append(f"{term}\n:   {paragraph(s, '    ').lstrip()}")
        return "\n\n".join(out)


def section(*parts: str) -> str:
    """Blocks joined by blank lines, empty ones left out."""
    return "\n\n".join(p.strip("\n") for p in parts if p and p.strip()) + "\n"


def fenced(body: str, lang: str = "text") -> str:
    return f"```{lang}\n{body.rstrip()}\n```"


def blocks(parts: Sequence[tuple[str, str]]) -> str:
    """Docstring blocks (scripts.docs.source.docstring_markdown) as paragraphs and text fences."""
    out = []
    for kind, body in parts:
        if kind == "code":
            out.append(fenced(body))
        elif kind == "list":
            out.append(
                "\n".join("- " + paragraph(item[2:], "  ").lstrip() for item in body.splitlines())
            )
        else:
            out.append(paragraph(body))
    return section(*out)
