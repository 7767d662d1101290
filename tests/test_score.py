"""Batch scoring (pipeline/score.py, vitrine.scoring): one row per record of a folder, archive or
catalog, answered as the service answers the same photo, resumable after a SIGKILL, with the
photos whose declared category the model disagrees with; and the Prefect flow.

The model is a tiny untrained cnn64 packaged by the package stage's code, with a decision rule
and an abstain threshold, so that both shape its answers.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

import service.core
from pipeline.score import REPORT_KEY, main, score_catalog
from stages.evaluate import predictions_table
from tests.helpers import PREFECT_START_TIMEOUT_S, REPO
from tests.helpers.candidates import SERVE
from tests.helpers.photos import encode, photo_bytes, png_header_only
from tests.helpers.records import record_config
from tests.helpers.server import start_server, stop
from tests.helpers.tiny_package import package_tiny_model
from vitrine.contracts import PackagedModel, read_packaged, write_packaged
from vitrine.evaluation.metrics import Taxonomy, ValueModel, value_model
from vitrine.evaluation.thresholds import backoff_levels, build_rule
from vitrine.images import Rejected
from vitrine.ingest.download import DownloadConfig
from vitrine.runtime import answers, decisions
from vitrine.runtime.decisions import chosen
from vitrine.runtime.onnx import load_onnx, onnx_proba
from vitrine.scoring.parts import parts_dir
from vitrine.scoring.run import ScoreJob, score, summary_path
from vitrine.scoring.sources import ScoreSource
from vitrine.scoring.summary import Summary, describe

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

# A phone earns 3, any mistake costs 1: "phone" from p(phone) = 1/3 on, not from 1/2.
DECISION_GAIN = np.array([[1.0, -1.0], [-1.0, 3.0]])
ANSWER = ["label", "level", "confidence", "abstain", "model_version"]


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, abstaining below the median confidence of a few photos (so that some
    answers abstain and some do not)."""
    folder = package_tiny_model(tmp_path_factory.mktemp("score"), SERVE, DECISION_GAIN)
    info = read_packaged(folder)
    confidences = [service_answer(photo_bytes(i), info, folder)["confidence"] for i in range(8)]
    info = dataclasses.replace(info, abstain_threshold=float(np.median(confidences)))
    write_packaged(info, folder)
    return folder


def service_answer(data: bytes, info: PackagedModel, folder: Path) -> dict[str, Any]:
    """The service's answer to one upload, from its own functions (service/core.py) and its
    forward pass (service.service.Classifier._forward), or its refusal."""
    try:
        pixels = service.core.prepare_image(service.core.open_upload(data, info), info)
    except Rejected as err:
        return {"error": err.code}
    module = load_onnx(folder, info.image_size, info.input_size)
    with torch.inference_mode():
        logits = module(torch.from_numpy(np.stack([pixels])))
    probabilities = torch.softmax(logits.float(), dim=1).numpy()[0]
    return service.core.classify_answer(probabilities, info)


def job(source: Path, output: Path, package: Path, **kw: Any) -> ScoreJob:
    settings: dict[str, Any] = dict(scheduler="synchronous", chunk_photos=4, progress=False)
    return ScoreJob(
        source=ScoreSource(source, kw.pop("kind", "folder")),
        output=output,
        model=package,
        cache=output.parent / "cache",
        **{**settings, **kw},
    )


def photo_folder(root: Path, n: int = 10) -> Path:
    for i in range(n):
        folder = root / ("laptop" if i % 2 else "phone")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(photo_bytes(i))
    return root


def assert_same_answer(row: pd.Series, expected: dict[str, Any]) -> None:
    """The row's answer is the service's; probabilities to float32 rounding (a forward pass
    of several photos may round otherwise than one of one, in the service too)."""
    assert row["status"] == "accepted"
    assert [row[k] for k in ANSWER] == pytest.approx([expected[k] for k in ANSWER], abs=1e-6)
    assert row["label"] == expected["label"] and row["abstain"] == expected["abstain"]
    assert dict(row["probabilities"]) == pytest.approx(expected["probabilities"], abs=1e-6)


# --- answers ---------------------------------------------------------------------------------


def test_the_library_answers_as_the_service_for_the_same_probabilities(package: Path) -> None:
    info = read_packaged(package)
    rng = np.random.default_rng(0)
    for p in [*rng.dirichlet([1, 1], 200), [1 / 3, 2 / 3], [0.75, 0.25], [0.5, 0.5]]:
        p32 = np.asarray(p, np.float32)
        assert answers.classify_answer(p32, info) == service.core.classify_answer(p32, info)
    flat = dataclasses.replace(info, decision_gain=None, abstain_threshold=0.0)
    assert answers.classify_answer([0.6, 0.4], flat) == service.core.classify_answer(
        [0.6, 0.4], flat
    )


def test_the_library_prepares_and_refuses_photos_as_the_service(package: Path) -> None:
    info = read_packaged(package)
    truncated = photo_bytes(1, (200, 150))
    uploads = [
        photo_bytes(1),
        encode(Image.new("RGBA", (64, 40), (9, 9, 9, 0)), "PNG"),
        photo_bytes(2, (20, 20)),  # too_small
        truncated[: len(truncated) // 2],  # truncated
        png_header_only(50_000, 50_000),  # too_many_pixels, from the header
        b"<html>log in</html>",  # not_an_image
        b"",  # empty
        b"\0" * (info.serve.max_upload_bytes + 1),  # too_large
    ]
    for data in uploads:
        try:
            mine: Any = answers.model_input(data, info)
        except Rejected as err:
            mine = err.code
        try:
            theirs: Any = service.core.prepare_image(service.core.open_upload(data, info), info)
        except Rejected as err:
            theirs = err.code
        assert type(mine) is type(theirs)
        assert mine == theirs if isinstance(mine, str) else np.array_equal(mine, theirs)


# --- evaluate, the service and the scorer answer alike ----------------------------------------

# Two levels: two Tech classes and one Home; every class worth 1, every mistake costing 0.5.
TREE = ("Tech/laptop", "Tech/phone", "Home/lamp")
TREE_TAXONOMY = Taxonomy("/", (1.0, 1.0), (0.6, 1.0))
TREE_PHOTOS = 24


def tree_values(review_cost: float) -> ValueModel:
    values = dict.fromkeys(TREE, 1.0)
    return value_model(TREE, values, [], 0.5, review_cost, decision="expected_value")


def between(values: np.ndarray) -> float:
    """A cut through the middle half of `values` at their widest gap there: about half fall on
    each side, none within float rounding of it."""
    ordered = np.sort(values)
    n = len(ordered)
    lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
    gaps = np.diff(ordered[lo : hi + 1])
    i = lo + int(gaps.argmax())
    assert ordered[i + 1] - ordered[i] > 1e-4
    return float((ordered[i] + ordered[i + 1]) / 2)


@pytest.fixture(scope="module")
def tree_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ValueModel]:
    """The tiny model over TREE, packaged with a threshold per class and taxonomy back-off:
    each class answered from the middle of its photos' confidences, and a review cost that
    lets about half of the refused photos back off to their Tech or Home, so that the photos
    get all three kinds of answer. The value model evaluate would score it with."""
    root = tmp_path_factory.mktemp("tree")
    folder = package_tiny_model(root, SERVE, tree_values(0.0).gain(), classes=TREE)
    info = read_packaged(folder)
    proba = np.array(
        [
            list(service_answer(photo_bytes(i), info, folder)["probabilities"].values())
            for i in range(TREE_PHOTOS)
        ]
    )
    decided = tree_values(0.0).decide(proba)
    confidence = chosen(proba, decided)
    cut = between(confidence)
    refused = proba[confidence < cut]
    [level] = backoff_levels(TREE, TREE_TAXONOMY)
    gain = decisions.level_gain(tree_values(0.0).gain(), np.array(level.node_of), level.value_share)
    review_cost = 1.0 - between((refused @ gain).max(axis=1))
    values = tree_values(review_cost)
    info = dataclasses.replace(
        info,
        abstain_threshold=cut,
        class_thresholds=(cut, cut, cut),
        backoff=(level,),
        value_gain=tuple(map(tuple, values.gain().tolist())),
        review_cost=review_cost,
    )
    write_packaged(info, folder)
    return folder, values


def test_the_service_answers_the_test_photos_as_evaluate_and_the_scorer_do(
    tree_package: tuple[Path, ValueModel], tmp_path: Path
) -> None:
    folder, values = tree_package
    info = read_packaged(folder)
    photos = [photo_bytes(i) for i in range(TREE_PHOTOS)]
    # evaluate: the test photos' pixels through model.onnx in batches, its predictions table
    # answering by the rule it builds from the value model, thresholds and taxonomy.
    pixels = np.stack([answers.model_input(p, info) for p in photos])
    proba = onnx_proba(folder / "model.onnx", info.input_size, pixels, 5, "test")
    manifest = pd.DataFrame(
        {
            "id": [f"p{i}" for i in range(TREE_PHOTOS)],
            "source": "s",
            "label": [TREE[i % 3] for i in range(TREE_PHOTOS)],
            "index": range(TREE_PHOTOS),
            "split": "test",
        }
    )
    rule = build_rule(values, info.class_thresholds, backoff_levels(TREE, TREE_TAXONOMY))
    evaluated = predictions_table(manifest, proba, values, rule)
    root = tmp_path / "photos"
    root.mkdir()
    for i, data in enumerate(photos):
        (root / f"p{i:02d}.jpg").write_bytes(data)
    score(job(root, tmp_path / "out.parquet", folder))
    scored = pd.read_parquet(tmp_path / "out.parquet")
    for i, data in enumerate(photos):
        served = service_answer(data, info, folder)
        row = evaluated.iloc[i]
        assert (served["label"], served["level"], served["abstain"]) == (
            row["answer"],
            row["level"],
            row["abstained"],
        )
        assert_same_answer(scored.iloc[i], served)
    kinds = set(zip(evaluated["level"], evaluated["abstained"], strict=True))
    assert kinds == {(2, False), (1, False), (2, True)}  # a class, an ancestor, a review


# --- one row per record, answered as the service answers -------------------------------------


def test_every_file_of_a_folder_is_one_row_answered_as_the_service(
    package: Path, tmp_path: Path
) -> None:
    root = photo_folder(tmp_path / "photos", 9)
    (root / "phone" / "notes.jpg").write_bytes(b"just some text")
    (root / "phone" / "tiny.png").write_bytes(encode(Image.new("RGB", (16, 16)), "PNG"))
    (root / "loose.jpg").write_bytes(photo_bytes(99))  # no class folder: no label needed
    os.mkfifo(root / "phone" / "pipe.jpg")  # refused by collect's reader, never opened
    summary = score(job(root, tmp_path / "out.parquet", package))
    out = pd.read_parquet(tmp_path / "out.parquet")
    info = read_packaged(package)

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_dir())
    assert sorted(out["id"]) == files and out["row"].tolist() == list(range(len(files)))
    assert not parts_dir(tmp_path / "out.parquet").exists()
    reasons = out.set_index("id")["reason"]
    assert reasons["phone/pipe.jpg"] == "not_a_regular_file"
    assert reasons["phone/notes.jpg"] == "not_an_image" and reasons["phone/tiny.png"] == "too_small"
    for _, row in out[out["id"] != "phone/pipe.jpg"].iterrows():
        expected = service_answer((root / row["id"]).read_bytes(), info, package)
        if "error" in expected:
            assert (row["status"], row["reason"]) == ("quarantined", expected["error"])
            assert pd.isna(row["label"]) and pd.isna(row["confidence"])
        else:
            assert_same_answer(row, expected)
    assert out["abstain"].dropna().any() and not out["abstain"].dropna().all()
    assert "category" not in out.columns  # the folder has no `category`
    assert summary["rows"] == len(files) and summary["quarantined"] == 3
    assert summary["by_reason"] == {"not_a_regular_file": 1, "not_an_image": 1, "too_small": 1}
    assert summary["abstained"] == int(out["abstain"].sum())
    assert summary["by_label"] == out["label"].value_counts().to_dict()


def test_an_archive_is_read_member_by_member(package: Path, tmp_path: Path) -> None:
    archive = tmp_path / "photos.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i, name in enumerate(["raw/phone/a.jpg", "raw/laptop/b.jpg", "../evil.jpg"]):
            data = photo_bytes(i)
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    score(job(archive, tmp_path / "out.parquet", package, kind="archive"))
    out = pd.read_parquet(tmp_path / "out.parquet").set_index("id")
    assert out["status"].to_dict() == {
        "raw/phone/a.jpg": "accepted",
        "raw/laptop/b.jpg": "accepted",
        "../evil.jpg": "quarantined",
    }
    assert out.loc["../evil.jpg", "reason"] == "outside_source_root"


class _Photos(BaseHTTPRequestHandler):
    photos: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        body = self.photos.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def photo_server() -> Iterator[str]:
    _Photos.photos = {f"/{i}.jpg": photo_bytes(100 + i) for i in range(3)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Photos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def write_catalog(path: Path, server: str) -> tuple[list[str], dict[str, bytes]]:
    """A catalog of paths and URLs with bad rows: the ids of its rows, in order, and the photo
    of each row that has one."""
    (path.parent / "img").mkdir(parents=True)
    photos = {f"p{i}": photo_bytes(200 + i) for i in range(6)}
    for i in range(6):
        (path.parent / "img" / f"{i}.jpg").write_bytes(photos[f"p{i}"])
    photos |= {"u0": _Photos.photos["/0.jpg"], "u1": _Photos.photos["/1.jpg"], "tv": photos["p2"]}
    lines = [
        "id,path,url,category",
        *(f"p{i},img/{i}.jpg,,{'phone' if i % 2 else 'Laptop '}" for i in range(6)),
        f"u0,,{server}/0.jpg,phone",
        f"u1,,{server}/1.jpg,",
        f"u9,,{server}/9.jpg,laptop",  # http_404
        "p0,img/1.jpg,,phone",  # duplicate_id
        "bad,img/1.jpg,,phone,extra",  # bad_row: more fields than the header
        "nowhere,,,phone",  # missing_location
        "gone,img/missing.jpg,,phone",  # unreadable
        "tv,img/2.jpg,,television",  # a category the model does not know
    ]
    path.write_text("\n".join(lines) + "\n")
    ids = [line.split(",")[0] for line in lines[1:]]
    return [rid if n != 9 else "p0#repeat-2" for n, rid in enumerate(ids)], photos  # the repeat


def test_a_catalog_of_paths_and_urls_gives_one_row_per_row_and_the_disagreements(
    package: Path, tmp_path: Path, photo_server: str
) -> None:
    catalog = tmp_path / "shop" / "catalog.csv"
    ids, photos = write_catalog(catalog, photo_server)
    output = tmp_path / "out.parquet"
    allowed = DownloadConfig(timeout_s=5, max_attempts=1, fsync=False, allow_private=True)
    summary = score(job(catalog, output, package, kind="catalog", download=allowed))
    out = pd.read_parquet(output)
    info = read_packaged(package)

    assert out["id"].tolist() == ids and out["row"].tolist() == list(range(len(ids)))
    quarantined = out[out["status"] == "quarantined"].set_index("id")["reason"].to_dict()
    assert quarantined == {
        "u9": "http_404",
        "p0#repeat-2": "duplicate_id",
        "bad": "bad_row",
        "nowhere": "missing_location",
        "gone": "unreadable",
    }
    accepted = out[out["status"] == "accepted"].set_index("id")
    assert sorted(accepted.index) == sorted(photos)
    assert accepted.loc["u0", "url"] == f"{photo_server}/0.jpg"
    for rid, row in accepted.iterrows():
        expected = service_answer(photos[str(rid)], info, package)
        assert_same_answer(row, expected)
        declared = row["category"]
        if pd.isna(declared) or declared == "television":  # none, or one the model lacks
            assert pd.isna(row["matches"]) and pd.isna(row["suggested_category"])
            continue
        check = service.core.check_answer(declared.strip().lower(), expected, info)
        assert row["matches"] == check["matches"]
        assert row["suggested_category"] == check["suggested_category"]

    disagree = accepted[(accepted["matches"] == False) & ~accepted["abstain"]]  # noqa: E712
    assert len(disagree) > 0
    category = summary["category"]
    assert [d["id"] for d in category["recategorise"]] == disagree.index.tolist()
    assert category["disagreements"] == len(disagree) and category["unknown"] == 1
    assert category["matches"] == int(accepted["matches"].sum())
    assert category["declared"] == accepted["category"].notna().sum()
    written = json.loads(summary_path(output).read_text())
    assert written["category"]["recategorise"] == category["recategorise"]


def test_a_private_address_is_blocked_unless_the_download_settings_allow_it(
    package: Path, tmp_path: Path, photo_server: str
) -> None:
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(f'{{"id": "a", "url": "{photo_server}/0.jpg"}}\n')
    blocked = DownloadConfig(timeout_s=5, max_attempts=1, fsync=False)  # allow_private: false
    score(job(catalog, tmp_path / "out.parquet", package, kind="catalog", download=blocked))
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["reason"].tolist() == ["blocked_address"]


# --- resuming --------------------------------------------------------------------------------

DRIVER = """
import sys, time
from vitrine.scoring import worker

real = worker.score_packed
log, delay = sys.argv[1], float(sys.argv[2])


def counted(payload, ends, *args):
    scored = real(payload, ends, *args)
    with open(log, "a") as f:
        f.write(f"{len(ends)}\\n")
    time.sleep(delay)
    return scored


worker.score_packed = counted
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

from pipeline.score import REPORT_KEY, main, score_catalog

sys.exit(main(sys.argv[3:]))
"""


def scoring_project(tmp_path: Path, chunk_photos: int) -> Path:
    """A project folder whose params.yaml scores chunk_photos records per chunk, in process."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["score"]["chunk_photos"] = chunk_photos
    params["compute"]["scheduler"] = "synchronous"
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    return project


def run_driver(tmp_path: Path, log: Path, delay: float, args: list[str]) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(driver), str(log), str(delay), *args]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)


def test_a_run_killed_with_sigkill_resumes_without_scoring_a_photo_twice(
    package: Path, tmp_path: Path
) -> None:
    root = photo_folder(tmp_path / "photos", 40)
    output = tmp_path / "out.parquet"
    project = scoring_project(tmp_path, chunk_photos=4)
    args = [str(root), "--output", str(output), "--model", str(package)]
    args += ["--project-dir", str(project), "--no-progress"]
    first = run_driver(tmp_path, tmp_path / "first.log", 0.3, args)
    parts = parts_dir(output)
    deadline = time.monotonic() + 60
    while len(list(parts.glob("*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait()
    finished = sorted(parts.glob("*.parquet"))
    assert 3 <= len(finished) < 10 and not output.exists()
    done = sum(len(pd.read_parquet(p)) for p in finished)

    second = run_driver(tmp_path, tmp_path / "second.log", 0.0, args)
    stdout, _ = second.communicate(timeout=120)
    assert second.returncode == 0, stdout
    scored_again = sum(int(n) for n in (tmp_path / "second.log").read_text().split())
    assert scored_again == 40 - done
    out = pd.read_parquet(output)
    assert out["id"].value_counts().eq(1).all() and len(out) == 40
    assert out["id"].tolist() == sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert f"this run scored {40 - done} photos; {done} rows came from" in stdout
    assert not parts.exists()


def test_parts_of_another_model_or_chunk_size_are_not_reused(package: Path, tmp_path: Path) -> None:
    root = photo_folder(tmp_path / "photos", 6)
    output = tmp_path / "out.parquet"
    first = job(root, output, package)
    score(first)
    stale = parts_dir(output)
    stale.mkdir()
    (stale / "run.json").write_text('{"chunk_photos": 3}')
    table = pq.read_table(output).slice(0, 3)
    table = table.set_column(table.column_names.index("label"), "label", pa.array(["bogus"] * 3))
    pq.write_table(table, stale / "00000000.parquet")
    summary = score(first)
    assert summary["resumed"] == 0 and summary["scored_now"] == 6
    assert "bogus" not in set(pd.read_parquet(output)["label"])


def test_a_folder_whose_photos_changed_is_another_source_to_resume(tmp_path: Path) -> None:
    """Parts scored before a kill are reused only for the same photos: a photo replaced or
    added since changes the folder's identity (run.json), and the run starts over."""
    root = photo_folder(tmp_path / "photos", 3)
    source = ScoreSource(root, "folder")
    before = source.identity()
    assert source.identity() == before  # nothing changed: the parts are reused
    photo = next(root.rglob("*.jpg"))
    photo.write_bytes(b"now a text file")
    assert source.identity() != before
    changed = source.identity()
    (root / "phone" / "new.jpg").write_bytes(photo_bytes(99))
    assert source.identity() != changed


# --- Dask, the command, the flow --------------------------------------------------------------


def test_local_dask_workers_give_the_rows_the_calling_process_gives(
    package: Path, tmp_path: Path
) -> None:
    root = photo_folder(tmp_path / "photos", 12)
    (root / "phone" / "notes.jpg").write_bytes(b"text")
    score(job(root, tmp_path / "here.parquet", package))
    score(job(root, tmp_path / "dask.parquet", package, scheduler="", n_workers=2))
    here = pd.read_parquet(tmp_path / "here.parquet")
    there = pd.read_parquet(tmp_path / "dask.parquet")
    columns = ["row", "id", "status", "reason", "label", "abstain"]
    pd.testing.assert_frame_equal(here[columns], there[columns])
    assert np.allclose(here["confidence"], there["confidence"], atol=1e-6, equal_nan=True)


def test_the_command_prints_the_summary(
    package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = photo_folder(tmp_path / "photos", 4)
    project = scoring_project(tmp_path, chunk_photos=3)
    args = [str(root), "--output", str(tmp_path / "o.parquet"), "--model", str(package)]
    assert main([*args, "--project-dir", str(project), "--category-column", "label"]) == 0
    printed = capsys.readouterr().out
    assert "scored 4 rows with" in printed and "declared 'label': 4 photos" in printed
    assert "class mix:" in printed and "abstained:" in printed


def test_a_category_column_no_catalog_row_fills_is_said(
    package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A misspelt column name checks nothing: the run says so instead of scoring quietly."""
    project = scoring_project(tmp_path, chunk_photos=3)
    (project / "a.jpg").write_bytes(photo_bytes(1))
    (project / "catalog.csv").write_text("id,path,category\na,a.jpg,phone\n")
    args = ["catalog.csv", "--output", "o.parquet", "--model", str(package)]
    monkeypatch.chdir(project)
    assert main([*args, "--category-column", "categroy"]) == 0
    printed = capsys.readouterr().out
    assert "no accepted photo has a value in column 'categroy'" in printed
    summary = json.loads((project / "o.summary.json").read_text())
    assert summary["category"]["column"] == "categroy" and summary["category"]["declared"] == 0
    assert main([*args, "--output", "p.parquet"]) == 0  # score.category_column: category
    assert "declared 'category': 1 photos, " in capsys.readouterr().out


@pytest.fixture
def prefect_backend() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_START_TIMEOUT_S):
        yield


def test_the_flow_scores_a_catalog_and_publishes_its_summary(
    package: Path, tmp_path: Path, prefect_backend: None
) -> None:
    project = scoring_project(tmp_path, chunk_photos=2)
    (project / "a.jpg").write_bytes(photo_bytes(1))
    rows = [
        {"id": "a", "path": "a.jpg", "declared_category": "phone"},
        {"id": "b", "path": "b.jpg", "declared_category": "phone"},
    ]
    lines = [json.dumps(r) + "\n" for r in rows]
    (project / "catalog.jsonl").write_text("".join(lines) + "[1, 2]\n")
    summary = score_catalog(
        "catalog.jsonl",
        "scores/out.parquet",
        model=str(package),
        category_column="declared_category",
        project_dir=project,
    )
    out = pd.read_parquet(project / "scores" / "out.parquet")
    assert out["id"].tolist() == ["a", "b", "line-3"]
    assert out["reason"].tolist() == ["", "unreadable", "bad_row"]
    assert out["category"].fillna("").tolist() == ["phone", "phone", ""]
    assert summary["rows"] == 3 and summary["category"]["declared"] == 1
    with get_client(sync_client=True) as client:
        path = {"id": summary["artifact_id"]}
        artifact = client.request("GET", "/artifacts/{id}", path_params=path).json()
    assert artifact["key"] == REPORT_KEY and "scored 3 rows" in artifact["data"]


@pytest.mark.slow
def test_a_real_server_gives_the_answers_the_scorer_writes(tmp_path: Path) -> None:
    """The BentoML server (as `make serve` runs it) over the same packaged model: for each
    photo, its /classify answer or refusal is the scorer's row."""
    serve = dataclasses.replace(SERVE, workers=1, record=record_config(tmp_path / "records"))
    package = package_tiny_model(tmp_path / "model", serve, DECISION_GAIN, "vitrine-score-test")
    root = photo_folder(tmp_path / "photos", 8)
    (root / "phone" / "notes.jpg").write_bytes(b"just some text")
    (root / "phone" / "tiny.png").write_bytes(encode(Image.new("RGB", (16, 16)), "PNG"))
    score(job(root, tmp_path / "out.parquet", package))
    out = pd.read_parquet(tmp_path / "out.parquet")
    running = start_server(tmp_path / "model" / "home", "vitrine-score-test", tmp_path / "log")
    try:
        for _, row in out.iterrows():
            upload = ("image", ("upload.jpg", (root / row["id"]).read_bytes(), "image/jpeg"))
            response = httpx.post(f"{running.url}/classify", files=[upload], timeout=30)
            body = response.json()
            if response.status_code != 200:
                assert (row["status"], row["reason"]) == ("quarantined", body["error"])
            else:
                assert_same_answer(row, body)
    finally:
        stop(running)


def test_the_summary_counts_answers_by_taxonomy_level_and_says_so_when_some_backed_off() -> None:
    summary = Summary("m-1", "")
    summary.add(
        pa.table(
            {
                "status": ["accepted", "accepted", "accepted", "quarantined"],
                "reason": ["", "", "", "undecodable"],
                "label": ["Fruit/Apple", "Fruit/Apple/Golden", "Fruit/Apple/Golden", None],
                "abstain": [False, False, True, None],
                "level": [2, 3, 3, None],
            }
        )
    )
    counted = summary.as_dict()
    assert counted["answered_by_level"] == {"2": 1, "3": 1}  # the abstained photo is no answer
    assert "answered at taxonomy level: 2: 1, 3: 1" in describe(counted)
    one_level = Summary("m-1", "")
    one_level.add(
        pa.table(
            {
                "status": ["accepted"],
                "reason": [""],
                "label": ["phone"],
                "abstain": [False],
                "level": [1],
            }
        )
    )
    assert "taxonomy level" not in describe(one_level.as_dict())


def test_an_output_that_would_overwrite_or_join_its_source_is_refused(tmp_path: Path) -> None:
    """Scores written over the catalog, or into the photos folder (whose files the next run
    would list as photos), or onto a folder: refused before anything is read."""
    folder = tmp_path / "photos"
    folder.mkdir()
    catalog = tmp_path / "shop.csv"
    catalog.write_text("id,path\na,x.jpg\n")
    model = tmp_path / "package"
    cases = [
        (ScoreSource(catalog, "catalog"), catalog, "would overwrite the source"),
        (ScoreSource(folder, "folder"), folder / "scores.parquet", "outside the photos folder"),
        (ScoreSource(catalog, "catalog"), folder, "is a folder, not a Parquet file"),
    ]
    for source, output, message in cases:
        with pytest.raises(ValueError, match=message):
            ScoreJob(source, output, model, tmp_path / "cache")
