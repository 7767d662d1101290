"""The parameters reference: every key of params.yaml with its type, shipped value and meaning.

Types come from the config class each section is loaded into (SECTIONS, read with ast: see
scripts.docs.source); meanings from params.yaml's own comments (the comment on a key's line,
the comment lines aligned under it, and the comment block just above it), else from the
comment beside the class field. A key no class declares gets a type inferred from its value.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from scripts.docs import markdown as md
from scripts.docs.source import Field, Module, load, resolve

# Which type each top-level section of params.yaml is loaded as: (module, type expression in
# that module). The stages load their block with vitrine.config.stage_config or from_mapping;
# stage_config hands the top-level `classes` to every block with a `classes` field.
SECTIONS: dict[str, tuple[str, str]] = {
    "classes": ("stages.collect", "tuple[str, ...]"),
    "other_class": ("vitrine.config", "str"),
    "paths": ("vitrine.config", "Paths"),
    "collect": ("stages.collect", "CollectConfig"),
    "compute": ("stages.collect", "ComputeConfig"),
    "validate": ("stages.validate", "ValidateConfig"),
    "dedupe": ("stages.dedupe", "DedupeConfig"),
    "prepare": ("stages.prepare", "PrepareConfig"),
    "train": ("vitrine.model.training", "TrainConfig"),
    "candidates": ("vitrine.model.training", "dict[str, CandidateConfig]"),
    "evaluate": ("vitrine.evaluation.settings", "EvaluateConfig"),
    "package": ("stages.package", "PackageConfig"),
    "serve": ("vitrine.contracts", "ServeConfig"),
    "feedback": ("pipeline.feedback", "FeedbackConfig"),
    "flow": ("pipeline.config", "FlowConfig"),
    "monitor": ("pipeline.monitor", "MonitorConfig"),
    "score": ("pipeline.score", "ScoreConfig"),
}
# Keys inside a section whose type no field declares: serve.by_candidate's entries are merged
# over the serve: block and validated as ServeConfig (vitrine/packaging/bundle.py). Their
# entries are partial: a key left out takes the serve: block's value, not a default.
KEYS: dict[str, tuple[str, str]] = {
    "serve.by_candidate": ("vitrine.contracts", "dict[str, ServeConfig]"),
}
PARTIAL = {"serve.by_candidate"}
VALUE_MAX = 48  # characters of a shipped value shown in its cell; a longer one goes below


@dataclass(frozen=True)
class TypeRef:
    """A type expression, the module whose names it uses and the project root."""

    root: Path
    module: Module
    expr: ast.expr

    @property
    def text(self) -> str:
        return _short(ast.unparse(self.expr))

    def inner(self) -> ast.expr:
        """Without `| None`."""
        e = self.expr
        if isinstance(e, ast.BinOp) and isinstance(e.op, ast.BitOr):
            return e.left if _is_none(e.right) else e.right
        return e

    def parts(self) -> tuple[str, ast.expr | None]:
        """("dict", value type) | ("seq", item type) | ("other", None)."""
        e = self.inner()
        if isinstance(e, ast.Subscript) and isinstance(e.value, ast.Name):
            args = e.slice.elts if isinstance(e.slice, ast.Tuple) else [e.slice]
            if e.value.id in ("dict", "Mapping") and len(args) == 2:
                return "dict", args[1]
            if e.value.id in ("tuple", "list", "Sequence") and args:
                return "seq", args[0]
        return "other", None

    def of(self, expr: ast.expr) -> TypeRef | None:
        """Another expression of the same module; None for Any (the value tells more)."""
        any_ = isinstance(expr, ast.Name) and expr.id == "Any"
        return None if any_ else TypeRef(self.root, self.module, expr)

    def names_class(self) -> tuple[Module, str] | None:
        return resolve(self.root, self.module, self.inner())


def _is_none(e: ast.expr) -> bool:
    return isinstance(e, ast.Constant) and e.value is None


# vitrine.config's ranged types, as a reader wants them: the type and its range.
_RANGED = {
    "Count": "int >= 1",
    "NonNegativeInt": "int >= 0",
    "NonNegative": "float >= 0",
    "Positive": "float > 0",
    "Share": "float in [0, 1]",
}


def _short(annotation: str) -> str:
    """`metrics.Taxonomy` -> `Taxonomy`: the class's own name is what the reader looks up;
    `Count` -> `int >= 1`, `Annotated[int, pydantic.Field(ge=2)]` -> `int >= 2`."""
    text = re.sub(r"\b(?:[a-z_][a-z0-9_]*\.)+(?=[A-Z])", "", annotation)
    text = re.sub(r"Annotated\[(\w+), Field\(ge=(\w+)\)\]", r"\1 >= \2", text)
    return _RANGED.get(text, text)


@dataclass
class Row:
    key: str
    type: str
    inferred: bool  # no class declares the key: the type is the value's
    value: Any
    container: bool
    meaning: str


@dataclass
class Table:
    title: str
    intro: str
    loaded_as: str
    rows: list[Row] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)  # "`key` (type = default)" not set


class Comments:
    """params.yaml's comments by line (0-based), as the round-trip loader placed the keys."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def meaning(self, line: int, col: int) -> tuple[str, str]:
        """(block comment above, comment beside and aligned under) of the key at line, col."""
        above: list[str] = []
        n = line - 1
        while n >= 0 and self._comment_col(n) == col:
            above.insert(0, self._text(self.lines[n]))
            n -= 1
        beside = []
        at = trailing_comment_col(self.lines[line])
        if at >= 0:
            beside.append(self.lines[line][at:].lstrip("#").strip())
            n = line + 1
            while n < len(self.lines) and self._comment_col(n) == at:
                beside.append(self._text(self.lines[n]))
                n += 1
        return _join(above), _join(beside)

    def header(self) -> str:
        """The file's opening comment block (ended by a blank line)."""
        out: list[str] = []
        for line in self.lines:
            if not line.strip().startswith("#"):
                return _join(out) if not line.strip() else ""
            out.append(self._text(line))
        return ""

    def _comment_col(self, n: int) -> int:
        line = self.lines[n]
        return len(line) - len(line.lstrip()) if line.strip().startswith("#") else -1

    @staticmethod
    def _text(line: str) -> str:
        return line.strip().lstrip("#").strip()


def _join(parts: list[str]) -> str:
    return " ".join(" ".join(p.split()) for p in parts if p)


def trailing_comment_col(line: str) -> int:
    """Column of the `#` that starts a comment after a value on this line, or -1."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and i > 0 and line[i - 1] in " \t" and line[:i].strip():
            return i
    return -1


def read_params(root: Path) -> tuple[Any, Comments]:
    text = (root / "params.yaml").read_text()
    return YAML().load(text), Comments(text)


def dotted_keys(data: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a params tree as a dotted name, through mappings (lists are values)."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        yield name
        if isinstance(value, dict):
            yield from dotted_keys(value, name + ".")


def page(root: Path) -> str:
    data, comments = read_params(root)
    parts = [md.paragraph(comments.header())]
    for name, value in data.items():
        above, beside = comments.meaning(*_position(data, name))
        ref = section_type(root, name)
        intro = _join([above, beside])
        if ref and ref.parts()[0] == "dict" and isinstance(value, dict):  # candidates
            parts.append(f"## `{name}`\n\n{md.paragraph(intro)}")
            item = ref.parts()[1]
            item_ref = ref.of(item) if item is not None else None
            first: dict[str, str] = {}
            for entry, block in value.items():
                sub_above, sub_beside = comments.meaning(*_position(value, entry))
                table = Table(f"### `{name}.{entry}`", _join([sub_above, sub_beside]), "")
                table.loaded_as = _loaded_as(item_ref, name)
                _walk(block, item_ref, f"{name}.{entry}.", comments, table, first)
                strip = len(f"{name}.{entry}.")
                first = first or {r.key[strip:]: r.meaning for r in table.rows}
                parts.append(_render(table))
            continue
        table = Table(f"## `{name}`", intro, _loaded_as(ref, name))
        if isinstance(value, dict):
            _walk(value, ref, f"{name}.", comments, table)
        else:  # a top-level value: its comment is its row's meaning
            declared = ref.text if ref else _inferred(value)
            table.rows.append(Row(name, declared, ref is None, value, False, intro))
            table.intro = ""
        parts.append(_render(table))
    return md.section(*parts)


def _position(node: Any, key: str) -> tuple[int, int]:
    """(line, column) of `key` in a mapping the round-trip loader read, both 0-based."""
    line, col = node.lc.key(key)
    return line, col


def section_type(root: Path, name: str) -> TypeRef | None:
    """The type a top-level section is loaded as (SECTIONS), None when none is known."""
    return _typeref(root, *SECTIONS[name]) if name in SECTIONS else None


def _typeref(root: Path | None, module_name: str, expr: str) -> TypeRef | None:
    module = load(root, module_name) if root else None
    return TypeRef(root, module, ast.parse(expr, mode="eval").body) if root and module else None


def _loaded_as(ref: TypeRef | None, name: str) -> str:
    if ref is None:
        return f"No config class is known for `{name}`: types in italics are the values' own."
    found = ref.names_class()
    if found:
        module, cls = found
        return f"Loaded into `{cls}` (`{module.name}`)."
    return f"Read as `{ref.text}` (`{ref.module.name}`)."


def _class_fields(ref: TypeRef | None) -> tuple[TypeRef | None, dict[str, Field]]:
    """The class a type names, as a TypeRef in its own module, and its fields by name."""
    if ref is None:
        return None, {}
    found = ref.names_class()
    if not found:
        return None, {}
    module, cls = found
    return TypeRef(ref.root, module, ast.Name(cls)), {f.name: f for f in module.fields(cls)}


def _walk(
    node: Any,
    ref: TypeRef | None,
    prefix: str,
    comments: Comments,
    table: Table,
    inherited: dict[str, str] | None = None,
) -> None:
    """Rows for every key under `node`. A key without a comment of its own takes its field's
    comment, else `inherited`'s (the first of a mapping's like entries: candidates, ...)."""
    owner, fields = _class_fields(ref)
    kind, inner = ref.parts() if ref and not owner else ("other", None)
    inherited = inherited or {}
    like = len(node) > 1 and all(isinstance(v, dict) for v in node.values())
    first: dict[str, str] | None = None
    for key, value in node.items():
        f = fields.get(key)
        if prefix + key in KEYS:
            child = _typeref(ref.root if ref else None, *KEYS[prefix + key])
        elif f and owner:
            child = owner.of(ast.parse(f.annotation, mode="eval").body)
        elif kind == "dict" and ref and inner is not None:
            child = ref.of(inner)
        else:
            child = None
        # A flow mapping's keys share their parent's line, and so its comment.
        above, beside = (
            ("", "") if node.fa.flow_style() else comments.meaning(*_position(node, key))
        )
        meaning = _join([above, beside]) or (f.comment if f else "") or inherited.get(key, "")
        declared = child.text if child else _inferred(value)
        if f and f.default is not None:
            declared += f" = {f.default}"
        table.rows.append(
            Row(prefix + key, declared, child is None, value, isinstance(value, dict), meaning)
        )
        if isinstance(value, dict):
            start = len(table.rows)
            below = {k[len(key) + 1 :]: m for k, m in inherited.items() if k.startswith(key + ".")}
            _walk(value, child, f"{prefix}{key}.", comments, table, first if like else below)
            if like and first is None:
                first = {r.key[len(prefix + key) + 1 :]: r.meaning for r in table.rows[start:]}
                first[""] = meaning
            if like and first and not table.rows[start - 1].meaning:
                table.rows[start - 1].meaning = first[""]
        elif isinstance(value, list) and child and child.parts()[0] == "seq":
            _walk_items(value, child, f"{prefix}{key}[].", table)
    partial = prefix.rstrip(".").rpartition(".")[0] in PARTIAL
    for name, f in fields.items():
        if f.default is not None and name not in node and not partial:
            declared = md.code(f"{_short(f.annotation)} = {f.default}")
            table.optional.append(f"{md.code(prefix + name)} ({declared})")


def _walk_items(items: list[Any], ref: TypeRef, prefix: str, table: Table) -> None:
    """A list of config-class items (collect.sources): one row per field, values of every item."""
    item = ref.parts()[1]
    owner, fields = _class_fields(ref.of(item)) if item is not None else (None, {})
    if not owner or not all(isinstance(i, dict) for i in items):
        return
    for name, f in fields.items():
        values = [i[name] for i in items if name in i]
        row = Row(prefix + name, _short(f.annotation), False, values, False, f.comment)
        table.rows.append(row)


def _inferred(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if isinstance(value, kind):
            return name
    return "mapping" if isinstance(value, dict) else "list" if isinstance(value, list) else "null"


def flow(value: Any) -> str:
    """A value in YAML's flow style, as params.yaml would write it inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        plain = value and value.strip() == value and not any(c in value for c in ":#,[]{}\"'")
        return value if plain else '"' + value.replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(flow(v) for v in value) + "]"
    return str(value)


def block(value: Any) -> str:
    """A list or mapping in YAML's block style, one item or key a line, each in flow style."""
    if isinstance(value, list):
        return "\n".join(f"- {flow(v)}" for v in value)
    if isinstance(value, dict):
        return "\n".join(f"{k}: {flow(v)}" for k, v in value.items())
    return flow(value)


def _render(table: Table) -> str:
    notes = md.Notes()
    rows = []
    for r in table.rows:
        key = md.code(r.key)
        kind = md.code_cell(r.type)
        type_cell = f"*{kind}*" if r.inferred else kind
        if r.container and r.value:  # its keys are the rows below
            value = "↓"
        elif len(flow(r.value)) <= VALUE_MAX:
            value = md.code_cell(flow(r.value))
        else:
            value = notes.block(f"{key}", block(r.value))
        rows.append([key, type_cell, value, notes.cell(key, r.meaning)])
    optional = ""
    if table.optional:
        optional = "Optional keys not set here (their defaults apply):\n\n"
        optional += "\n".join(f"- {o}" for o in table.optional)
    return md.section(
        table.title,
        md.paragraph(table.intro),
        md.paragraph(table.loaded_as) if table.loaded_as else "",
        md.table(["key", "type", "shipped value", "meaning"], rows),
        notes.render(),
        optional,
    )
