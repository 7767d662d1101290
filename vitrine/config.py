"""Strict loading of params.yaml blocks into frozen, typed dataclasses, validated by pydantic.

Unknown keys and missing required ones are errors: a typo in params.yaml must fail loudly, not be
ignored. A stage or flow run through `run_cli` says a bad setting in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, dataclass_transform

import pydantic
import yaml
from ruamel.yaml import YAML

T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")

# Settings with a range, refused outside it with the key named (see _explain).
Count = Annotated[int, pydantic.Field(ge=1)]  # photos, items, bytes, pixels: at least one
NonNegativeInt = Annotated[int, pydantic.Field(ge=0)]  # 0 has a stated meaning (none, never)
NonNegative = Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]
Share = Annotated[float, pydantic.Field(ge=0, le=1)]  # a rate, a probability, a p-value


class ConfigError(ValueError):
    """A params block does not match its stage's config dataclass."""


def load_params(
    path: Path = PARAMS_FILE, overrides: Iterable[tuple[str, Any]] = ()
) -> dict[str, Any]:
    """params.yaml, with `-S`-style (dotted key, value) overrides applied. A file that is
    missing or not YAML is a ConfigError: a command given the wrong project folder says which
    file it looked for."""
    try:
        with open(path) as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"no {path.name} at {path.parent.resolve()}: not a project folder"
        ) from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}{line}: not YAML, {problem}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of blocks, got {type(params).__name__}")
    apply_overrides(params, overrides)
    check_classes(params.get("classes"))
    return params


def check_classes(classes: Any) -> None:
    """`classes`: at least two, each once whatever its case and surrounding spaces (labels match
    classes so, and a repeated class would be two outputs for one label)."""
    if not isinstance(classes, list):
        return  # absent or of the wrong type: the stages' own blocks say so
    if len(classes) < 2:
        raise ConfigError(f"classes: a classifier needs at least two classes, got {classes!r}")
    folded = [str(c).strip().casefold() for c in classes]
    repeated = sorted({str(c) for c, f in zip(classes, folded, strict=True) if folded.count(f) > 1})
    if repeated:
        raise ConfigError(f"classes: each class once (ignoring case and spaces), {repeated} repeat")


def run_cli(main: Callable[[], int | None]) -> None:
    """A stage's or a flow's command: a settings problem (ConfigError, naming the key) is one
    line on stderr and exit status 1, not a traceback."""
    try:
        status = main()
    except ConfigError as err:
        sys.exit(f"{Path(sys.argv[0]).stem}: {err}")
    sys.exit(status)


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
    was, wanted = _kind(node[keys[-1]]), _kind(value)
    if was and wanted and was != wanted:  # before a run, not at the stage that reads it
        raise ConfigError(f"{dotted}: expected {was} as params.yaml has, got {value!r}")
    node[keys[-1]] = value


def _kind(value: Any) -> str:
    """What an override must stay: a number where params.yaml has one (`lr=abc` is a typo),
    a list where it has a list; "" for null, which any value may replace."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    return "a mapping" if isinstance(value, Mapping) else ""


def apply_overrides(params: Any, overrides: Iterable[tuple[str, Any]]) -> None:
    """set_dotted for each (dotted key, value) pair, in order."""
    for dotted, value in overrides:
        set_dotted(params, dotted, value)


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def params_block(cls: type[T]) -> type[T]:
    """A params.yaml block, or an artefact's typed contract: a frozen pydantic dataclass that
    refuses unknown keys. Still a dataclass (positional construction, dataclasses.replace), with
    pydantic doing the validation that from_mapping asks of it."""
    return pydantic.dataclasses.dataclass(frozen=True, config=_STRICT)(cls)  # type: ignore[return-value]


_STRICT = pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True)


def from_mapping(cls: type[T], data: Any, where: str = "") -> T:
    """Build `cls` (a params_block dataclass) from a mapping, refusing unknown and missing keys
    and values of the wrong type.

    Validated as JSON in pydantic's strict mode: the YAML's lists become tuples and its strings
    paths, an int may stand for a float, but "5" is no int and 1 no bool, as a typo must fail.
    """
    name = where or cls.__name__
    if not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {data!r}")
    try:
        return _adapter(cls).validate_json(json.dumps(data, default=str), strict=True)
    except pydantic.ValidationError as error:
        raise ConfigError(_explain(error, name)) from None


# One adapter per class, kept: building one is slow. A plain dict, as functools.cache would
# lose the adapter's type parameter.
_ADAPTERS: dict[type, pydantic.TypeAdapter[Any]] = {}


def _adapter(cls: type[T]) -> pydantic.TypeAdapter[T]:
    if cls not in _ADAPTERS:
        _ADAPTERS[cls] = pydantic.TypeAdapter(cls)
    return _ADAPTERS[cls]


def _explain(error: pydantic.ValidationError, where: str) -> str:
    """pydantic's errors in params.yaml's words: the dotted key, then what is wrong with it."""
    unknown: dict[str, list[str]] = {}
    problems = []
    for e in error.errors():
        *parent, last = [str(part) for part in e["loc"]] or [""]
        at = ".".join([where, *parent])
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            unknown.setdefault(at, []).append(last)
        elif e["type"] == "missing":
            problems.append(f"{at}: missing key {last!r}")
        elif e["type"] == "value_error" and not last:  # a block's own check (__post_init__)
            message = str(e["msg"]).removeprefix("Value error, ")
            problems.append(message if message.startswith(where) else f"{at}: {message}")
        elif e["type"] in ("too_long", "too_short"):
            problems.append(
                f"{at}.{last}: expected {e['ctx'].get('max_length', '?')} items, got {e['input']!r}"
            )
        else:
            problems.append(f"{at}.{last}: expected {_expected(e)}, got {e['input']!r}")
    problems[:0] = [f"{at}: unknown key(s) {sorted(keys)}" for at, keys in unknown.items()]
    return "; ".join(problems)


_BOUNDS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}


def _expected(error: Any) -> str:
    """`int_type` -> int; a bound -> "a value >= 1"; pydantic's message otherwise."""
    kind = str(error["type"])
    if kind in _BOUNDS:
        limit = next(iter(error["ctx"].values()))
        return f"a value {_BOUNDS[kind]} {limit}"
    if kind == "finite_number":  # NaN or infinity where a cost or a rate is due
        return "a finite number"
    return kind.removesuffix("_type") if kind.endswith("_type") else str(error["msg"])


@params_block
class Paths:
    """Where every stage reads and writes; the same names dvc.yaml templates."""

    raw: Path
    inventory: Path
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


def other_class(params: Mapping[str, Any]) -> str:
    """params.yaml's top-level `other_class`: the class of photos that are none of the others
    (chargers, boxes, screenshots under "phone"), one of `classes`; "" (or no key): none."""
    other = params.get("other_class") or ""
    if not isinstance(other, str):
        raise ConfigError(f'other_class: expected a class name or "", got {other!r}')
    if other and other not in (params.get("classes") or ()):
        raise ConfigError(
            f"other_class {other!r} is not one of the classes {list(params.get('classes') or ())}"
            ": list it in `classes` (its place there is its output of the models)"
        )
    return other


def stage_config(cls: type[T], block: str, params: Mapping[str, Any]) -> T:
    """Load `params[block]`; a config with a `classes` field gets the top-level class list, one
    with an `other_class` field the top-level other_class (checked by `other_class`)."""
    data = dict(params[block] or {})
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if "classes" in fields:
        data["classes"] = params["classes"]
    if "other_class" in fields:
        data["other_class"] = other_class(params)
    return from_mapping(cls, data, block)


def load_paths(params: Mapping[str, Any]) -> Paths:
    return from_mapping(Paths, params["paths"], "paths")
