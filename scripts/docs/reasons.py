"""The quarantine reasons reference: every reason code collect can give a record.

Codes are found in the code that decides them (vitrine/ingest/*.py and vitrine/images.py):
`Rejected("code", ...)`, the readers' `reject(...)`, the downloader's `Outcome(...)` and
`FetchResult(url, "code", ...)`, and `("code", detail)` pairs; a new code appears here without
an edit. Meanings come from the tables those modules document (their "Quarantine reasons"
lists, the downloader's code table).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from scripts.docs import markdown as md
from scripts.docs.source import Module, call_name, load, template

# Modules whose docstrings document reasons, in the order a reader meets them in collect.
DOCUMENTED = (
    "vitrine.ingest.records",
    "vitrine.ingest.archives",
    "vitrine.ingest.catalogs",
    "vitrine.ingest.download",
    "vitrine.ingest.sources",
    "vitrine.images",
)
# Calls that give a record its reason, and the position of the code among their arguments.
CODE_ARGUMENT = {"Rejected": 0, "reject": 0, "_reject": 0, "Outcome": 0, "FetchResult": 1}
_CODE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9<>]+)+$|^[a-z]+$")
_PAIR_CODE = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)+$")  # ("bad_row", detail): with a _


@dataclass
class Reason:
    code: str
    meanings: dict[str, str] = field(default_factory=dict)  # documenting module -> meaning
    details: list[str] = field(default_factory=list)  # message templates, as written
    where: list[str] = field(default_factory=list)  # modules that decide it

    @property
    def meaning(self) -> str:
        """The documented meaning; where several modules give the code, each documenting
        module's, named."""
        if len(self.meanings) == 1 and len(self.where) == 1:
            return next(iter(self.meanings.values()))
        return " ".join(f"{_short(m)}: {text}" for m, text in self.meanings.items())


def _short(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def modules(root: Path) -> list[Module]:
    names = [f"vitrine.ingest.{p.stem}" for p in sorted((root / "vitrine/ingest").glob("*.py"))]
    found = [load(root, n) for n in [*names, "vitrine.images"] if not n.endswith("__init__")]
    return [m for m in found if m is not None]


def harvest(module: Module) -> list[tuple[str, str]]:
    """(code, detail template) of every reason `module` gives."""
    found = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Call) and call_name(node) in CODE_ARGUMENT:
            at = CODE_ARGUMENT[call_name(node)]
            if len(node.args) > at:
                code = template(node.args[at])
                detail = template(node.args[at + 1]) if len(node.args) > at + 1 else ""
                if _CODE.match(code):
                    found.append((code, detail))
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2:
            first, second = node.elts
            text = isinstance(second, ast.JoinedStr) or (
                isinstance(second, ast.Constant) and isinstance(second.value, str)
            )
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and text:
                # ("bad_row", "..."), ("undecodable", f"..."): not ("RGB", "...") and the like
                pattern = _CODE if isinstance(second, ast.JoinedStr) else _PAIR_CODE
                if pattern.match(first.value):
                    found.append((first.value, template(second)))
    return found


def documented(module: Module, known: set[str]) -> dict[str, str]:
    """code -> meaning, from the module docstring's bullet list and code table."""
    doc = module.docstring
    meanings = _table(doc)
    for item in _bullets(doc):
        for code, meaning in _split_codes(item, known):
            meanings.setdefault(code, meaning)
    return meanings


def _bullets(doc: str) -> list[str]:
    """The items of the docstring's `- name: text` lists, continuation lines joined."""
    items: list[str] = []
    for line in doc.splitlines():
        if re.match(r"^- [a-z][\w<>]*: ", line):
            items.append(line[2:].strip())
        elif items and line.startswith("  ") and line.strip():
            items[-1] += " " + line.strip()
        elif not line.strip() or not line.startswith("  "):
            items.append("") if items and items[-1] else None
    return [i for i in items if i]


def _split_codes(item: str, known: set[str]) -> list[tuple[str, str]]:
    """'missing_id: no id. duplicate_id: an id ...' -> two entries (known codes only after the
    first)."""
    parts = re.split(r"(?:(?<=\. )|^)([a-z][\w<>]*): ", item)
    out: list[tuple[str, str]] = []
    for i in range(1, len(parts) - 1, 2):
        code, text = parts[i], parts[i + 1].strip()
        if out and code not in known:
            out[-1] = (out[-1][0], f"{out[-1][1]} {code}: {text}")
        else:
            out.append((code, text))
    return out


def _table(doc: str) -> dict[str, str]:
    """A reStructuredText simple table (==== rules) of code, meaning and more columns."""
    lines = doc.splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*=+( +=+)+\s*", line)]
    if len(rules) < 3:
        return {}
    starts = [m.start() for m in re.finditer(r"=+", lines[rules[0]])]
    header = _cells(lines[rules[0] + 1], starts)
    rows: list[list[str]] = []
    for line in lines[rules[1] + 1 : rules[2]]:
        cells = _cells(line, starts)
        if cells[0]:
            rows.append(cells)
        elif rows:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
    out = {}
    for cells in rows:
        extra = "; ".join(f"{h}: {c}" for h, c in zip(header[2:], cells[2:], strict=True) if c)
        out[cells[0]] = cells[1] + (f" ({extra})" if extra else "")
    return out


def _cells(line: str, starts: list[int]) -> list[str]:
    """Each word to the column it starts in (a word may overrun its column's rule, as
    "408, 425," does in the downloader's table)."""
    cells: list[list[str]] = [[] for _ in starts]
    for word in re.finditer(r"\S+", line):
        column = max(i for i, start in enumerate(starts) if start <= word.start() or i == 0)
        cells[column].append(word.group())
    return [" ".join(c) for c in cells]


def reasons(root: Path) -> list[Reason]:
    found: dict[str, Reason] = {}
    for module in modules(root):
        for code, detail in harvest(module):
            reason = found.setdefault(code, Reason(code))
            if detail and detail not in reason.details:
                reason.details.append(detail)
            if module.name not in reason.where:
                reason.where.append(module.name)
    for name in DOCUMENTED:
        documenting = load(root, name)
        if documenting is None:
            continue
        for code, meaning in documented(documenting, set(found)).items():
            reason = found.setdefault(code, Reason(code))
            reason.meanings[name] = meaning
            if name not in reason.where:
                reason.where.append(name)
    return sorted(found.values(), key=lambda r: r.code)


def page(root: Path) -> str:
    """A short index of the codes, then each code's meaning, detail and deciding modules."""
    found = reasons(root)
    rows = [
        [md.code(r.code), ", ".join(md.code(w.removeprefix("vitrine.")) for w in r.where)]
        for r in found
    ]
    entries = []
    for r in found:
        meaning = md.paragraph(r.meaning, "    ").lstrip() if r.meaning else "Not documented."
        detail = f"Detail, e.g.: {md.code(r.details[0])}." if r.details else ""
        where = ", ".join(md.code(w) for w in r.where)
        entries.append(
            f"{md.code(r.code)}\n:   {meaning}\n\n"
            + md.paragraph(f"{detail} Decided in {where}.".strip(), "    ")
        )
    return md.section(
        md.table(["reason", "decided in"], rows),
        "## Each reason",
        "\n\n".join(entries),
    )
