"""Strict loading of params.yaml blocks into frozen, typed dataclasses.

Unknown and missing keys are errors: a typo in params.yaml must fail loudly, not be ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from ruamel.yaml import YAML

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")


class ConfigError(ValueError):
    """A params block does not match its stage's config dataclass."""


def load_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-3` -> ("train.lr", 0.001): the value is YAML 1.2, as in `dvc exp run -S`."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, YAML(typ="safe").load(value)


def add_overrides_option(parser: argparse.ArgumentParser) -> None:
    """`-S KEY=VALUE` (repeatable) as `dvc exp run` has it: args.overrides, (key, value) pairs."""
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        type=parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter of params.yaml for this run only (repeatable)",
    )


def set_dotted(params: Any, dotted: str, value: Any) -> None:
    """Set `a.b.c` in nested mappings, refusing a key params.yaml lacks (as `dvc exp run -S`
    without `+`): a misspelt or renamed parameter must fail, not be silently added."""
    keys = dotted.split(".")
    node = params
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            raise ConfigError(f"{dotted}: params.yaml has no key {'.'.join(keys[: depth + 1])!r}")
        if depth < len(keys) - 1:
            node = node[key]
    node[keys[-1]] = value


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if args and args[-1] is not Ellipsis:  # fixed shape, e.g. tuple[int, float]
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {value!r}")
            return tuple(
                _convert(t, v, f"{where}[{i}]")
                for i, (t, v) in enumerate(zip(args, value, strict=True))
            )
        return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {k: _convert(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, refusing unknown and missing keys."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}")
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}".lstrip("."))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where or cls.__name__}: missing key {name!r}")
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where every stage reads and writes; the same names dvc.yaml templates."""

    raw: Path
    download_cache: Path
    collected: Path
    deduped: Path
    decisions: Path
    review: Path
    prepared: Path
    model: Path
    served: Path  # evaluate: each candidate's model.onnx as the service would run it
    package: Path
    validation_docs: Path
    collect_report: Path
    quarantine: Path  # every quarantined input and why, as CSV
    validate_report: Path
    dedupe_report: Path
    prepare_report: Path
    train_reports: Path  # <candidate>.json per candidate
    train_live: Path  # DVCLive's per-epoch metrics, <candidate>/ per candidate
    train_resume: Path  # checkpoints of unfinished runs, outside DVC's outputs
    evaluate_report: Path
    candidates_report: Path  # every candidate's val scores (a DVC metric)
    candidates_table: Path  # the same as a Markdown table
    evaluation_html: Path
    confusion: Path
    reliability: Path
    predictions: Path
    promotion: Path


def stage_config(cls: type[T], block: str, params: Mapping[str, Any]) -> T:
    """Load `params[block]`; a config with a `classes` field gets the top-level class list."""
    data = dict(params[block] or {})
    if "classes" in {f.name for f in dataclasses.fields(cls)}:
        data["classes"] = params["classes"]
    return from_mapping(cls, data, block)


def load_paths(params: Mapping[str, Any]) -> Paths:
    return from_mapping(Paths, params["paths"], "paths")
