"""The project's Python source read with ast, never imported: classes and their fields with
the comments beside them, module constants, docstrings, imports.

Reading rather than importing keeps the documentation build free of torch, Great Expectations
and BentoML (importing every stage takes about 12 s and 1 GB), and lets the generators under
scripts/ describe stages and the service without importing them (tests/test_architecture.py).
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Field:
    """One annotated field of a class, as its source writes it."""

    name: str
    annotation: str  # the annotation's source, e.g. "tuple[str, ...]"
    default: str | None  # the default's source; None when the field is required
    comment: str  # the comment on the field's line and the comment lines just above it


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "stages.collect"
    path: Path
    tree: ast.Module
    lines: tuple[str, ...]

    @property
    def docstring(self) -> str:
        return ast.get_docstring(self.tree) or ""

    @property
    def classes(self) -> dict[str, ast.ClassDef]:
        return {n.name: n for n in self.tree.body if isinstance(n, ast.ClassDef)}

    @property
    def functions(self) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
        return {n.name: n for n in self.tree.body if isinstance(n, kinds)}

    @property
    def imports(self) -> dict[str, str]:
        """Local name -> what it names: "pkg.mod" for a module, "pkg.mod.Name" for a name."""
        names = {}
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    names[alias.asname or alias.name.split(".")[0]] = alias.name
        return names

    def constants(self) -> dict[str, tuple[object, str]]:
        """Module-level NAME = literal: the value and the comment beside it."""
        found = {}
        for node in self.tree.body:
            target = _assigned_name(node)
            value = getattr(node, "value", None)
            if target and value is not None:
                try:
                    literal = ast.literal_eval(value)
                except ValueError:
                    continue
                found[target] = (literal, self.comment(node))
        return found

    def comment(self, node: ast.stmt) -> str:
        """The comment lines just above `node` and the comment after it on its last line."""
        above: list[str] = []
        n = node.lineno - 2
        indent = node.col_offset
        while n >= 0 and self.lines[n].strip().startswith("#") and _indent(self.lines[n]) == indent:
            above.insert(0, self.lines[n].strip().lstrip("#").strip())
            n -= 1
        end = node.end_lineno or node.lineno
        after = self.lines[end - 1][node.end_col_offset or 0 :].strip()
        beside = after.lstrip("#").strip() if after.startswith("#") else ""
        return " ".join(part for part in [*above, beside] if part)

    def fields(self, cls: str) -> list[Field]:
        """The annotated fields of class `cls`, in order (a dataclass's fields)."""
        out = []
        for node in self.classes[cls].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                default = ast.unparse(node.value) if node.value is not None else None
                if default and default.startswith("field("):
                    default = _factory_default(node.value) or default
                out.append(
                    Field(node.target.id, ast.unparse(node.annotation), default, self.comment(node))
                )
        return out


def _assigned_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
        target = node.targets[0]
        return target.id if isinstance(target, ast.Name) else None
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    return None


def _factory_default(value: ast.expr | None) -> str | None:
    """`field(default_factory=lambda: {...})` -> "{...}"; `default_factory=X` -> "X()"."""
    if isinstance(value, ast.Call):
        for kw in value.keywords:
            if kw.arg == "default_factory" and isinstance(kw.value, ast.Lambda):
                return ast.unparse(kw.value.body)
            if kw.arg == "default_factory":
                return f"{ast.unparse(kw.value)}()"
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def load(root: Path, name: str) -> Module | None:
    """The project module `name` ("vitrine.contracts"), or None when there is no such file."""
    path = module_file(root, name)
    return None if path is None else _parse(name, path, path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _parse(name: str, path: Path, mtime_ns: int) -> Module:
    text = path.read_text()
    return Module(name, path, ast.parse(text), tuple(text.splitlines()))


def resolve(root: Path, module: Module, expr: ast.expr) -> tuple[Module, str] | None:
    """The project class a type expression names (`Source`, `metrics.Taxonomy`), if any:
    defined in `module` or imported into it from another project module."""
    if isinstance(expr, ast.Name):
        if expr.id in module.classes:
            return module, expr.id
        target = module.imports.get(expr.id, "")
        owner, _, name = target.rpartition(".")
        other = load(root, owner) if owner else None
        return resolve(root, other, ast.Name(name)) if other else None
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        other = load(root, module.imports.get(expr.value.id, ""))
        return (other, expr.attr) if other and expr.attr in other.classes else None
    return None


def first_sentence(doc: str) -> str:
    """A docstring's first paragraph, on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def template(expr: ast.expr) -> str:
    """A message argument as a reader sees it: an f-string's fields as <field>."""
    if isinstance(expr, ast.Constant):
        return str(expr.value)
    if isinstance(expr, ast.JoinedStr):
        out = []
        for part in expr.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
            elif isinstance(part, ast.FormattedValue):
                out.append(f"<{ast.unparse(part.value)}>")
        return "".join(out)
    return f"<{ast.unparse(expr)}>"


def call_name(call: ast.Call) -> str:
    """`f(...)` -> "f", `a.b.f(...)` -> "f"."""
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def docstring_markdown(doc: str) -> list[tuple[str, str]]:
    """A docstring's blocks: ("code", text) for an indented block or a list laid out in
    columns, ("list", items one per line) for a plain list, ("text", text) otherwise."""
    blocks: list[tuple[str, str]] = []
    for block in doc.strip().split("\n\n"):
        lines = block.splitlines()
        if lines and all(line.startswith("    ") or not line.strip() for line in lines):
            blocks.append(("code", "\n".join(line[4:] for line in lines)))
            continue
        first = next((i for i, line in enumerate(lines) if line.startswith(("- ", "* "))), None)
        if first is None:
            blocks.append(("text", " ".join(block.split())))
            continue
        if first:
            blocks.append(("text", " ".join(" ".join(lines[:first]).split())))
        items = lines[first:]
        if any("  " in line.strip() for line in items):  # columns: keep the layout
            blocks.append(("code", "\n".join(items)))
        else:
            joined = "\n".join(items).replace("\n  ", " ")
            blocks.append(("list", "\n".join(" ".join(i.split()) for i in joined.splitlines())))
    return blocks
