"""The `flow:` block of params.yaml: schedules, per-stage timeouts and retries, publishing."""

from __future__ import annotations

from pathlib import Path

from vitrine.config import ConfigError, load_params, params_block, stage_config


def base_name(stage: str) -> str:
    """`train@cnn64` -> `train`: a foreach/matrix stage's settings cover each of its items."""
    return stage.split("@", 1)[0]


@params_block
class FlowConfig:
    timezone: str  # IANA name; both crons are read in it
    retrain_cron: str  # `retrain`, whatever changed
    check_cron: str  # `retrain_if_changed`
    timeout_s: dict[str, float]  # per stage (or foreach base name); "default" for the rest
    retries: dict[str, int]  # per stage (or foreach base name); absent = no retry
    retry_backoff_s: float  # first delay; doubles on each further attempt
    lock_wait_s: float  # how long a second run waits for the first before giving up
    commit_lock: bool  # after a promotion: git commit dvc.lock
    push_remote: str  # after a promotion: `dvc push -r <remote>`; "" = no push

    def __post_init__(self) -> None:
        if "default" not in self.timeout_s:
            raise ConfigError("flow.timeout_s: needs a 'default' entry for unlisted stages")
        bad = {k: v for k, v in {**self.timeout_s, **self.retries}.items() if v < 0}
        if bad or self.retry_backoff_s < 0 or self.lock_wait_s < 0:
            raise ConfigError(f"flow: timeouts, retries and waits must be >= 0, got {bad or self}")

    def stage_timeout_s(self, stage: str) -> float:
        return self.timeout_s.get(
            stage, self.timeout_s.get(base_name(stage), self.timeout_s["default"])
        )

    def retry_delays_s(self, stage: str) -> list[float]:
        """Exponential backoff: one delay per retry, e.g. [30, 60, 120] for 3 retries."""
        retries = self.retries.get(stage, self.retries.get(base_name(stage), 0))
        return [self.retry_backoff_s * 2**attempt for attempt in range(retries)]


def load_flow_config(project_dir: Path) -> FlowConfig:
    return stage_config(FlowConfig, "flow", load_params(project_dir / "params.yaml"))
