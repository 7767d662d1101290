"""The deployments `python -m pipeline.deploy` serves or registers, built without serving."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.testing.utilities import prefect_test_harness

from pipeline.deploy import build_deployments, main
from pipeline.score import dated
from tests.helpers import PREFECT_START_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prefect_backend() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=PREFECT_START_TIMEOUT_S):
        yield


@pytest.fixture
def project(tmp_path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    flow, monitor = params["flow"], params["monitor"]
    flow.update(timezone="America/Sao_Paulo", retrain_cron="15 4 * * 2", check_cron="*/20 * * * *")
    monitor.update(cron="45 5 * * *")
    body = {"flow": flow, "monitor": monitor, "score": params["score"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(body))
    return tmp_path


def schedules(deployment: object) -> list[tuple[str, str]]:
    return [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules]


def test_deployments_take_cron_and_timezone_from_params(project: Path) -> None:
    scheduled, on_change, drift = build_deployments(project)

    assert (scheduled.flow_name, scheduled.name) == ("retrain", "scheduled")
    assert schedules(scheduled) == [("15 4 * * 2", "America/Sao_Paulo")]
    assert (on_change.flow_name, on_change.name) == ("retrain-if-changed", "on-change")
    assert schedules(on_change) == [("*/20 * * * *", "America/Sao_Paulo")]
    assert (drift.flow_name, drift.name) == ("monitor", "drift")
    assert schedules(drift) == [("45 5 * * *", "America/Sao_Paulo")]
    for deployment in (scheduled, on_change, drift):
        assert deployment.parameters == {"project_dir": str(project)}
        assert deployment.entrypoint in {
            "pipeline.flows.retrain",
            "pipeline.flows.retrain_if_changed",
            "pipeline.monitor.monitor",
        }


def test_scoring_is_deployed_only_when_scheduled(project: Path) -> None:
    assert [d.name for d in build_deployments(project)] == ["scheduled", "on-change", "drift"]

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["score"].update(cron="0 2 * * *", source="data/raw/catalog.csv")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    *_, daily = build_deployments(project)

    assert (daily.flow_name, daily.name) == ("score-catalog", "daily")
    assert daily.entrypoint == "pipeline.score.score_catalog"
    assert schedules(daily) == [("0 2 * * *", "America/Sao_Paulo")]
    assert daily.parameters == {
        "source": "data/raw/catalog.csv",
        "output": "reports/scores/{date}.parquet",
        "project_dir": str(project),
    }


def test_a_scheduled_output_is_dated_in_utc() -> None:
    late = datetime(2026, 3, 1, 23, 30, tzinfo=timezone(timedelta(hours=-3)))
    assert dated("scores/{date}.parquet", late) == "scores/2026-03-02.parquet"
    assert dated("scores/all.parquet", late) == "scores/all.parquet"


def test_register_with_a_work_pool(
    project: Path, prefect_backend: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="vitrine-test", type="process"))

    assert main([str(project), "--work-pool", "vitrine-test"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert "registered retrain/scheduled in pool vitrine-test" in said
    assert said[-1] == f"the worker runs them in {project.resolve()}: start it in that checkout"

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
        drift = client.read_deployment_by_name("monitor/drift")
    assert deployment.work_pool_name == "vitrine-test"
    assert deployment.entrypoint == "pipeline.flows.retrain"
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (
        "15 4 * * 2",
        "America/Sao_Paulo",
    )
    assert (drift.work_pool_name, drift.entrypoint) == ("vitrine-test", "pipeline.monitor.monitor")
    [schedule] = drift.schedules
    assert schedule.schedule.cron == "45 5 * * *"
