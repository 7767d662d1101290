"""The documentation site: the generated reference lists every parameter, route, output and
quarantine reason the project has, the results page reads the metrics it finds, and the
Markdown stays readable. The generators are called directly (pure functions of the checkout);
one test runs the strict site build."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from scripts.docs import http_api, markdown, outputs, params, reasons, results
from scripts.docs.pages import GENERATORS, UnknownMarker, fill
from tests.helpers import REPO

MAX_LINE = 200  # characters, any Markdown line
MAX_PROSE_LINE = 120  # outside tables and code blocks
MAX_CELL = 120  # characters of a generated table cell's Markdown
# Built from character classes, so that this file does not match it.
HISTORY = re.compile(r"[s]ession [0-9]+|[i]ssue [0-9]+", re.IGNORECASE)
HISTORY_SCOPE = ["README.md", "docs", "params.yaml", "Makefile"]
HISTORY_SCOPE += ["vitrine", "stages", "service", "pipeline", "benchmarks", "tests"]


def dotted(data: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in data.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from dotted(value, f"{prefix}{key}.")


def test_every_key_of_params_yaml_is_in_the_parameters_reference() -> None:
    keys = list(dotted(yaml.safe_load((REPO / "params.yaml").read_text())))
    page = params.page(REPO)
    assert len(keys) > 100
    assert [k for k in keys if f"`{k}`" not in page] == []


def test_every_section_of_params_yaml_is_typed_by_the_class_that_loads_it() -> None:
    sections = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(sections) <= set(params.SECTIONS)
    for name in sections:
        ref = params.section_type(REPO, name)
        assert ref is not None, name
        kind, item = ref.parts()
        if kind == "dict" and item is not None:  # candidates: dict[str, CandidateConfig]
            ref = ref.of(item)
        if name not in ("classes", "other_class"):  # top-level values, not blocks
            assert ref and ref.names_class(), f"{name}: {params.SECTIONS[name]} names no class"


def test_a_parameter_s_type_and_meaning_come_from_its_class_and_comment() -> None:
    rows = {line.split(" | ")[0]: line for line in params.page(REPO).splitlines()}
    rps = rows["| `collect.download.per_host_rps`"]
    assert "`float = 10.0`" in rps and "`10`" in rps  # DownloadConfig's field, shipped value
    assert "`tuple[Source, ...]`" in rows["| `collect.sources`"]
    assert "per attempt" in rows["| `collect.download.timeout_s`"]  # params.yaml's comment
    # inferred from the value (no class declares lightning.Trainer's arguments): in italics
    assert "*`str`*" in rows["| `train.trainer.accelerator`"]


def service_routes() -> list[tuple[str, str]]:
    """(method(s), path) of every @app.<method>(path) / @app.api_route(path) in the service."""
    tree = ast.parse((REPO / "service/service.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for deco in node.decorator_list:
                text = ast.unparse(deco)
                match = re.match(r"app\.(\w+)\('([^']*)'", text)
                if match:
                    found.append((match.group(1), match.group(2)))
    return found


def test_every_route_of_the_service_is_in_the_http_reference() -> None:
    routes = service_routes()
    page = http_api.page(REPO)
    assert {path for _, path in routes} >= {"/", "/classify", "/check_category"}
    headings = [line for line in page.splitlines() if line.startswith("### ")]
    for verb, path in routes:
        assert any(h.endswith(f" {path}") for h in headings), (verb, path)
        assert f"{http_api.BASE_URL}{path}" in page  # a curl example
    for path in ("/readyz", "/livez", "/metrics"):  # BentoML's, which the service tests probe
        assert f"`{path}`" in page


def test_every_refusal_of_the_service_has_its_status() -> None:
    page = http_api.page(REPO)
    found = re.search(r"^STATUS = (\{.*?^\})", (REPO / "service/core.py").read_text(), re.M | re.S)
    assert found
    status = ast.literal_eval(found[1])
    for code, code_status in status.items():
        assert f"| `{code}` | {code_status} |" in page


def test_an_example_answer_has_exactly_the_keys_the_service_writes() -> None:
    page = http_api.page(REPO)
    answers = (REPO / "vitrine/runtime/answers.py").read_text()  # the service's one-photo rules
    classify = re.search(r"def classify_answer.*?return \{(.*?)\n    \}", answers, re.S)
    assert classify
    for key in re.findall(r'"(\w+)":', classify[1]):
        assert f'"{key}":' in page


def test_an_answer_key_without_an_example_value_fails_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(http_api.EXAMPLE_VALUES, "confidence")
    with pytest.raises(http_api.DocsError, match="confidence"):
        http_api.page(REPO)


def dvc_output_paths() -> list[str]:
    """Every outs/metrics/plots path of dvc.yaml, ${paths.*} resolved, ${key} as <candidate>."""
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    found = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                template = next(iter(entry)) if isinstance(entry, dict) else entry
                path = re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m[1]], template)
                found.append(path.replace("${key}", "<candidate>"))
    return found


def test_every_output_of_dvc_yaml_is_in_the_outputs_reference() -> None:
    page = outputs.page(REPO)
    paths = dvc_output_paths()
    assert len(paths) > 15
    assert [p for p in paths if f"| `{p}` |" not in page] == []
    assert "```mermaid" in page and "prepare --> train" in page


def test_every_contract_of_vitrine_contracts_is_in_the_outputs_reference() -> None:
    tree = ast.parse((REPO / "vitrine/contracts.py").read_text())
    contracts = [
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef) and "params_block" in map(ast.unparse, n.decorator_list)
    ]
    page = outputs.page(REPO)
    assert "EvaluationReport" in contracts
    assert [c for c in contracts if f"### {c}" not in page] == []
    assert "### EvaluationReport (evaluate.json)" in page


def test_every_quarantine_reason_collect_gives_is_in_the_reasons_reference() -> None:
    call = re.compile(
        r"""(?:Rejected|reject|Outcome)\(\s*"([a-z][a-z0-9_]*)"|\("([a-z_]+_[a-z]+)", f?["']"""
    )
    sources = [*sorted((REPO / "vitrine/ingest").glob("*.py")), REPO / "vitrine/images.py"]
    codes = {c for s in sources for m in call.finditer(s.read_text()) for c in m.groups() if c}
    page = reasons.page(REPO)
    assert {"bad_archive", "label_not_in_classes", "too_small", "blocked_address"} <= codes
    assert sorted(c for c in codes if f"| `{c}` |" not in page) == []
    assert "| `http_<status>` |" in page  # the downloader's f"http_{status}"


def test_a_reason_takes_its_meaning_from_the_table_its_module_documents() -> None:
    found = {r.code: r for r in reasons.reasons(REPO)}
    assert "JSON" in found["bad_row"].meaning  # vitrine.ingest.catalogs' list
    assert "retried: yes" in found["timeout"].meaning  # vitrine.ingest.download's table


def write_metrics(root: Path) -> None:
    """A checkout with every metrics file, as a finished `dvc repro` leaves them."""
    for name in ("params.yaml", "dvc.yaml", "dvc.lock"):
        shutil.copy(REPO / name, root / name)
    reports = root / "reports"
    (reports / "train").mkdir(parents=True)
    scores = {
        "n": 503,
        "accuracy": 0.9364,
        "macro_f1": 0.931,
        "business_weighted_accuracy": 0.9418,
        "expected_value_per_1000": 1193.0,
    }
    files: dict[str, Any] = {
        "collect.json": {"records": 10, "accepted": 9, "quarantined": 1, "by_reason": {"empty": 1}},
        "validate.json": {
            "success": True,
            "evaluated": 17,
            "failed_blocking": 0,
            "failed_warning": 0,
        },
        "dedupe.json": {
            "clusters": 8,
            "clusters_with_copies": 1,
            "duplicates": 1,
            "exact_duplicates": 1,
            "near_duplicates": 0,
            "label_conflicts": 0,
            "dropped_by_review": 0,
            "relabelled_by_review": 0,
            "kept": 8,
            "noise_candidates": 2,
        },
        "prepare.json": {
            "train": {"total": 6},
            "val": {"total": 1},
            "test": {"total": 1},
            "leakage": {
                "leaked_val_test_photos": 0,
                "naive_split_leaked_val_test_photos": 1,
                "naive_split_val_test_photos": 2,
            },
        },
        "evaluate.json": {
            "winner": "effnet_finetune",
            "primary_metric": "business_weighted_accuracy",
            "val": {"business_weighted_accuracy": 0.9649},
            "ranking": ["effnet_finetune", "cnn64"],
            "test": scores,
            "calibration": {"test_ece": 0.02},
            "abstain": {
                "threshold": 0.0,
                "review_cost": 0.8,
                "val_expected_value_per_1000": 1232.0,
                "test_expected_value_per_1000": 1193.0,
            },
            "served": {"effnet_finetune": {"precision": "int8"}, "cnn64": {"precision": "fp32"}},
        },
        "candidates.json": {"effnet_finetune": scores, "cnn64": {**scores, "accuracy": 0.84}},
        "promotion.json": {
            "promoted": True,
            "reason": "no champion in the model store",
            "challenger": {"model_version": "effnet-lite0-int8-0123456789ab"},
        },
        "train/cnn64.json": {
            "epochs": 13,
            "best_epoch": 9,
            "stopped_by": "early_stopping",
            "train_seconds": 35.2,
            "train_images_per_s": 850.0,
        },
    }
    for name, data in files.items():
        (reports / name).write_text(json.dumps(data))


def test_the_results_page_shows_the_figures_of_the_metrics_files(tmp_path: Path) -> None:
    write_metrics(tmp_path)
    page = results.page(tmp_path)
    assert "| test accuracy | 93.64% |" in page and "(int8, calibration none)" in page
    assert "| the same, naive random split | 1 of 2 (50.00%) |" in page
    assert "`dvc repro evaluate`" in page and "`dvc repro train@cnn64`" in page
    candidates = page[page.index("## Candidates on val") :]
    assert candidates.index("`effnet_finetune`") < candidates.index("`cnn64`")  # the ranking
    assert "differs from dvc.lock" in page  # not the committed run's files: said so
    assert "| `reports/train/lenet5.json` | absent |" in page


def test_the_results_page_of_a_checkout_without_metrics_says_so(tmp_path: Path) -> None:
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    page = results.page(tmp_path)
    assert "No metrics in this checkout" in page and "## Current figures" in page


def test_a_page_naming_an_unknown_section_fails() -> None:
    with pytest.raises(UnknownMarker):
        fill("<!-- generated: nonesuch -->", REPO)


def test_a_wrapped_paragraph_starts_no_list_or_heading() -> None:
    text = "word " * 19 + "- not a list item, " + "word " * 17 + "# not a heading"
    assert not any(re.match(r"[-#] ", line) for line in markdown.paragraph(text).splitlines())


def long_prose_lines(text: str) -> list[str]:
    """Lines over MAX_PROSE_LINE outside tables and fenced code, and any over MAX_LINE."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        too_long = len(line) > MAX_PROSE_LINE and not fenced and not line.startswith("|")
        if too_long or len(line) > MAX_LINE:
            found.append(line[:60])
    return found


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_markdown_lines_stay_readable(path: Path) -> None:
    assert long_prose_lines(path.read_text()) == []


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_markdown_stays_readable(name: str) -> None:
    """Prose wrapped as in the pages' source; a table's cells short (longer text goes below)."""
    text = GENERATORS[name](REPO)
    rows = [line for line in text.splitlines() if line.startswith("|")]
    cells = [c.strip() for row in rows for c in row.strip("|").split(" | ")]
    assert [c for c in cells if len(c) > MAX_CELL] == []
    prose = [line for line in text.splitlines() if not line.startswith("|")]
    assert long_prose_lines("\n".join(prose)) == []


def text_files(scope: list[str]) -> Iterator[Path]:
    for name in scope:
        path = REPO / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        yield from (f for f in files if "__pycache__" not in f.parts)


def test_the_texts_speak_of_the_product_not_of_its_history() -> None:
    found = []
    for path in text_files(HISTORY_SCOPE):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # images and other binary files
        found += [f"{path.relative_to(REPO)}: {m[0]}" for m in HISTORY.finditer(text)]
    assert found == []


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs.yml's strict build (make docs): every nav page there, every link and anchor
    resolving, the generated sections filled in, Mermaid fences turned into diagrams."""
    site = tmp_path / "site"
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    params_page = (site / "reference/params/index.html").read_text()
    assert "collect.download.per_host_rps" in params_page
    assert "generated:" not in params_page  # every marker filled
    assert '<pre class="mermaid">' in (site / "reference/outputs/index.html").read_text()
    assert not (site / "hooks").exists()
