"""The real server records its answers: request ids, one row per answer, nothing lost when it
is killed with SIGKILL under load, nothing held up while the database is down.

Each server is `bentoml serve` over a tiny packaged model (two worker processes, so two spools
and two writers share the database), recording into SQLite or a real PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import REPO
from tests.helpers.records import database_down, metric, record_config, rows_stored, wait_for
from tests.helpers.server import RunningServer, kill, start_server, stop
from tests.helpers.tiny_package import package_tiny_model
from vitrine.contracts import RecordConfig, ServeConfig
from vitrine.production.recorder import photo_sha256
from vitrine.production.records import RECORD_URL_ENV, RecordStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning"),
]

ARCHIVE = REPO / "data" / "raw" / "avito-raw.tar.gz"
MODEL_NAME = "vitrine-records-test"
BACKLOG = "vitrine_record_backlog"


def serve_config(record: RecordConfig) -> ServeConfig:
    return ServeConfig(
        max_upload_bytes=1_000_000,
        max_pixels=4_000_000,
        min_side=32,
        max_batch_images=6,
        max_batch_bytes=2_000_000,
        max_batch_size=8,
        max_batch_wait_ms=2.0,
        workers=2,
        torch_threads=1,
        concurrent_batches=2,
        record=record,
    )


def photos(n: int = 8) -> list[bytes]:
    with tarfile.open(ARCHIVE) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")),
            key=lambda m: m.name,
        )[:n]
        return [archive.extractfile(m).read() for m in members]  # type: ignore[union-attr]


def serve(root: Path, record: RecordConfig, env: dict[str, str] | None = None) -> RunningServer:
    """A server recording as `record` says (its model packaged once per root)."""
    if not (root / "home").exists():
        package_tiny_model(root, serve_config(record), model_name=MODEL_NAME)
    return start_server(root / "home", MODEL_NAME, root / "server.log", env)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("recording")
    server = serve(root, record_config(root / "records"))
    try:
        yield server, root / "records"
    finally:
        stop(server)
    assert server.process.returncode == 0


def image(data: bytes) -> tuple:
    return ("image", ("upload.jpg", data, "application/octet-stream"))


def stored(url: str, ids: list[str]) -> dict[str, object]:
    store = RecordStore(url)
    try:
        return {r.request_id: r for r in store.find(request_ids=ids)}
    finally:
        store.close()


def test_every_answer_is_recorded_under_the_request_id_it_returned(
    recording: tuple[RunningServer, Path],
) -> None:
    server, records = recording
    url = f"sqlite:///{records / 'answers.sqlite'}"
    laptop, phone = photos(2)
    headers = {"X-Request-ID": "client-trace-42"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        single = client.post("/classify", files=[image(phone)], headers=headers)
        checked = client.post(
            "/check_category", files=[image(laptop)], data={"declared_category": "phone"}
        )
        batch = client.post(
            "/classify_batch", files=[image(laptop), image(b"<html>no</html>"), image(phone)]
        )
        refused = client.post("/classify", files=[image(b"not a photo")])
    assert single.status_code == checked.status_code == batch.status_code == 200
    assert refused.status_code == 422 and "x-request-id" not in refused.headers
    for response in (single, checked):
        assert response.headers["x-request-id"] == response.json()["request_id"]
        assert response.json()["request_id"] != "client-trace-42"  # ours, never the client's
    first, bad, last = batch.json()["results"]
    assert "request_id" not in bad  # a refused image is no answer
    ids = [single.json()["request_id"], checked.json()["request_id"]]
    ids += [first["request_id"], last["request_id"]]
    assert len({*ids, batch.headers["x-request-id"]}) == 5

    rows = wait_for(lambda: len(found := stored(url, ids)) == 4 and found)
    one, check, batched_first, batched_last = (rows[i] for i in ids)
    assert (one.endpoint, one.client_request_id, one.declared_category, one.matches) == (
        "/classify",
        "client-trace-42",
        None,
        None,
    )
    assert one.label == single.json()["label"] and one.abstain == single.json()["abstain"]
    assert one.probabilities == pytest.approx(single.json()["probabilities"])
    assert one.model_version == single.json()["model_version"]
    assert one.image_sha256 == photo_sha256(phone) and one.latency_ms > 0
    assert (check.endpoint, check.declared_category) == ("/check_category", "phone")
    assert check.matches == checked.json()["matches"]
    assert check.label == checked.json()["predicted"]
    assert {batched_first.batch_id, batched_last.batch_id} == {batch.headers["x-request-id"]}
    assert batched_last.image_sha256 == one.image_sha256 and batched_last.endpoint.endswith("batch")
    # Each photo kept once, by content; the refused upload's not at all.
    kept = {p.name for p in (records / "photos").glob("*/*")}
    assert kept == {photo_sha256(laptop), photo_sha256(phone)}
    assert RecordStore(url).count() == 4
    assert metric(server.url, "vitrine_records_written_total") >= 4
    assert metric(server.url, "vitrine_record_backlog") == 0


async def hammer(url: str, uploads: list[bytes], stop_at: threading.Event) -> list[str]:
    """/classify at 16 concurrent requests until stop_at: the request ids of every 200."""
    answered: list[str] = []

    async def client_loop(client: httpx.AsyncClient, k: int) -> None:
        i = k
        while not stop_at.is_set():
            try:
                response = await client.post("/classify", files=[image(uploads[i % 8])])
            except httpx.TransportError:  # the server died mid-request: no answer received
                await asyncio.sleep(0.01)
                continue
            if response.status_code == 200:
                answered.append(response.json()["request_id"])
            i += 16

    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(16)))
    return answered


def test_a_server_killed_under_load_loses_no_answered_record(
    answers_url: str, tmp_path: Path
) -> None:
    # Records reach the database every 2 s: at the kill, the last ones are only in the spool.
    record = record_config(tmp_path / "records", answers_url, flush_every_s=2.0)
    server = serve(tmp_path, record)
    uploads = photos()
    stop_at = threading.Event()
    result: list[list[str]] = []
    load = threading.Thread(
        target=lambda: result.append(asyncio.run(hammer(server.url, uploads, stop_at)))
    )
    load.start()
    try:
        # Read from the database: a /metrics scrape would queue behind the 16 clients.
        wait_for(lambda: rows_stored(answers_url) > 0, timeout_s=60)
        time.sleep(1.0)
        kill(server)  # SIGKILL to the arbiter and both workers, mid-load
    finally:
        time.sleep(0.5)
        stop_at.set()
        load.join()
    answered = result[0]
    assert len(answered) == len(set(answered)) > 50
    before = stored(answers_url, answered)
    assert len(before) < len(answered), "nothing was left to replay: the test proves nothing"

    restarted = serve(tmp_path, record)  # its workers adopt the dead ones' spools
    try:
        wait_for(lambda: len(stored(answers_url, answered)) == len(answered), timeout_s=60)
        wait_for(lambda: metric(restarted.url, "vitrine_record_backlog") == 0, timeout_s=30)
    finally:
        stop(restarted)
    store = RecordStore(answers_url)
    rows = store.find()
    store.close()
    ids = [r.request_id for r in rows]
    assert len(ids) == len(set(ids))  # exactly once (the key), whatever was replayed twice
    assert set(answered) <= set(ids)
    assert not list((tmp_path / "records" / "spool").glob("*.spool"))  # all replayed


def test_a_database_down_fails_no_answer_and_the_backlog_drains_when_it_is_back(
    answers_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Packaged with the default SQLite URL: the environment points the server elsewhere.
    record = record_config(tmp_path / "records", "sqlite:///packaged-url-unused.sqlite")
    server = serve(tmp_path, record, env={RECORD_URL_ENV: answers_url})
    uploads = photos()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            client.post("/classify", files=[image(uploads[0])])  # the schema, migrated
            wait_for(lambda: metric(server.url, "vitrine_records_written_total") == 1)
            wait_for(lambda: metric(server.url, BACKLOG) == 0)
            assert RecordStore(answers_url).count() == 1
            with database_down(answers_url, request):
                answers = []
                for i in range(20):
                    started = time.perf_counter()
                    response = client.post("/classify", files=[image(uploads[i % 8])])
                    answers.append((response, time.perf_counter() - started))
                assert [r.status_code for r, _ in answers] == [200] * 20
                assert max(seconds for _, seconds in answers) < 2.0  # never the database's wait
                assert metric(server.url, BACKLOG) == 20
                wait_for(
                    lambda: metric(server.url, "vitrine_record_write_failures_total") > 0,
                    timeout_s=60,
                )
            ids = [r.json()["request_id"] for r, _ in answers]
            wait_for(lambda: metric(server.url, BACKLOG) == 0, timeout_s=90)
        assert set(stored(answers_url, ids)) == set(ids)
    finally:
        stop(server)
    assert not (REPO / "packaged-url-unused.sqlite").exists()
