"""The outputs reference: every file the pipeline writes, from dvc.yaml (outs, metrics and
plots of each stage, `${paths.*}` resolved from params.yaml) and from the artefact contracts
of vitrine/contracts.py (file names, docstrings and fields), with the stage graph drawn from
dvc.yaml's dependencies."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scripts.docs import markdown as md
from scripts.docs.params import read_params
from scripts.docs.source import Module, docstring_markdown, first_sentence, load

KINDS = ("outs", "metrics", "plots")
FOREACH_ITEM = "<candidate>"  # a foreach stage's ${key}, as the pages write it
_TEMPLATE = re.compile(r"\$\{([\w.]+)\}")
_FILE_NAME = re.compile(r"^[\w.-]+\.(json|onnx|pt|md|ckpt|parquet|npy|csv|html)$")


@dataclass(frozen=True)
class Output:
    stage: str  # as `dvc repro` names it: collect, train@<candidate>
    kind: str  # outs | metrics | plots
    template: str  # as dvc.yaml writes it
    path: str  # resolved
    cached: bool  # in DVC's cache (else the file is only in the workspace)
    comment: str  # dvc.yaml's comment on the entry, and params.yaml's on its paths key


def resolve(template: str, params: dict[str, Any]) -> str:
    """`${paths.model}/${key}` -> `models/train/<candidate>`."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in ("key", "item"):
            return FOREACH_ITEM
        node: Any = params
        for part in name.split("."):
            node = node[part]
        return str(node)

    return _TEMPLATE.sub(value, template)


def stages(root: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(name, definition) of each stage of dvc.yaml; a foreach stage once, as name@<candidate>."""
    for name, stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in stage:
            yield f"{name}@{FOREACH_ITEM}", stage["do"]
        else:
            yield name, stage


def outputs(root: Path) -> list[Output]:
    params = yaml.safe_load((root / "params.yaml").read_text())
    dvc_lines = (root / "dvc.yaml").read_text().splitlines()
    data, comments = read_params(root)
    found = []
    for stage, definition in stages(root):
        for kind in KINDS:
            for entry in definition.get(kind) or []:
                template, options = _entry(entry)
                # dvc.yaml's comment on the entry, else params.yaml's on its paths key
                comment = _line_comment(dvc_lines, template)
                key = re.fullmatch(r"\$\{paths\.(\w+)\}.*", template)
                if not comment and key and key.group(1) in data["paths"]:
                    comment = comments.meaning(*data["paths"].lc.key(key.group(1)))[1]
                path = resolve(template, params)
                cached = options.get("cache", True)
                found.append(Output(stage, kind, template, path, cached, comment))
    return found


def _entry(entry: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(entry, dict):
        ((template, options),) = entry.items()
        return template, options or {}
    return str(entry), {}


def _line_comment(lines: list[str], template: str) -> str:
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(f"- {template}") and "#" in stripped:
            return stripped.split("#", 1)[1].strip()
    return ""


def dependency_graph(root: Path) -> list[tuple[str, str]]:
    """(upstream, downstream) stages: downstream depends on a file or folder upstream writes."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    written = [(o.stage, o.path) for o in outputs(root)]
    edges = []
    for stage, definition in stages(root):
        for dep in definition.get("deps") or []:
            dep_path = resolve(str(dep), params)
            for source, path in written:
                inside = dep_path == path or dep_path.startswith(path.rstrip("/") + "/")
                if inside and source != stage and (source, stage) not in edges:
                    edges.append((source, stage))
    return edges


def mermaid(root: Path) -> str:
    names = [name for name, _ in stages(root)]
    ids = {name: re.sub(r"\W", "_", name.split("@")[0]) for name in names}
    lines = ["flowchart LR"]
    lines += [f'    {ids[n]}["{n.replace(FOREACH_ITEM, "candidate")}"]' for n in names]
    lines += [f"    {ids[a]} --> {ids[b]}" for a, b in dependency_graph(root)]
    return md.fenced("\n".join(lines), "mermaid")


# --- contracts ------------------------------------------------------------------------------


def contract_files(contracts: Module) -> dict[str, str]:
    """Contract class -> the file it is written as: the file name its docstring opens with
    (`evaluate.json: ...`), else the .json file names its writer function uses."""
    constants = {
        name: value for name, (value, _) in contracts.constants().items() if isinstance(value, str)
    }
    files: dict[str, str] = {}
    for name, cls in contracts.classes.items():
        doc = first_sentence(ast.get_docstring(cls) or "").split()
        if doc and _FILE_NAME.match(doc[0].rstrip(":")):
            files[name] = doc[0].rstrip(":")
    for fn in contracts.functions.values():
        if not fn.name.startswith("write_"):
            continue
        annotations = {ast.unparse(a.annotation) for a in fn.args.args if a.annotation}
        used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
        jsons = sorted(
            constants[c] for c in used if c in constants and constants[c].endswith(".json")
        )
        for contract in annotations & set(contracts.classes):
            if contract not in files and jsons:
                files[contract] = " + ".join(jsons)
    return files


def _contracts_section(root: Path) -> str:
    contracts = load(root, "vitrine.contracts")
    if contracts is None:
        return ""
    parts = ["## Artefact contracts", md.blocks(docstring_markdown(contracts.docstring))]
    names = [
        [md.code(value), md.code(name), md.cell(comment) if comment else "—"]
        for name, (value, comment) in contracts.constants().items()
        if isinstance(value, str) and _FILE_NAME.match(value)
    ]
    parts += ["### File names", md.table(["file", "constant", "what"], names)]
    files = contract_files(contracts)
    for name, cls in contracts.classes.items():
        if "params_block" not in {ast.unparse(d) for d in cls.decorator_list}:
            continue
        title = f"### {name}" + (f" ({files[name]})" if name in files else "")
        notes = md.Notes()
        rows = []
        for f in contracts.fields(name):
            kind = f.annotation + (f" = {f.default}" if f.default is not None else "")
            rows.append(
                [md.code(f.name), md.code_cell(kind), notes.cell(md.code(f.name), f.comment)]
            )
        parts += [
            title,
            md.blocks(docstring_markdown(ast.get_docstring(cls) or "")),
            md.table(["field", "type", "meaning"], rows),
            notes.render(),
        ]
    return md.section(*parts)


def page(root: Path) -> str:
    rows = []
    notes = md.Notes()
    for o in outputs(root):
        kind = {"outs": "out", "metrics": "metric", "plots": "plot"}[o.kind]
        cache = "yes" if o.cached else "no"
        rows.append(
            [md.code(o.path), md.code(o.stage), kind, cache, notes.cell(md.code(o.path), o.comment)]
        )
    table = md.table(["path", "stage", "kind", "DVC cache", "what"], rows)
    return md.section(
        "## Stages and what they write",
        md.paragraph(
            "An arrow from one stage to another: the second depends on a file or folder the "
            "first writes (dvc.yaml `deps` against `outs`, `metrics` and `plots`)."
        ),
        mermaid(root),
        "## Every output",
        md.paragraph(
            f"`{FOREACH_ITEM}` stands for each entry of params.yaml `candidates`. An output "
            "outside DVC's cache (`cache: false`) exists only in the workspace that ran the stage; "
            "`dvc.lock` still records its hash."
        ),
        table,
        notes.render(),
        _contracts_section(root),
    )
