"""The train stage: early stopping and checkpoints, reproducibility, resume, DDP, DVCLive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from stages.train import main
from tests.helpers import REPO
from tests.helpers.tiny_prepared import (
    CLASSES,
    candidate_params,
    train_params,
    trainer_args,
    write_prepared,
    write_project,
)
from vitrine.config import ConfigError, from_mapping, load_params, stage_config
from vitrine.contracts import TrainedModel
from vitrine.model.training import (
    CandidateConfig,
    TrainConfig,
    candidate_config,
    checkpoint_epoch,
    first_judged_epoch,
    model_card,
    run_fingerprint,
    train,
)

NAME = "cnn64"
TIMING = ("train_seconds", "train_images_per_s")
# A falling val_loss watched with mode max never improves after epoch 0: training stops after
# `patience` more epochs, and the best checkpoint is epoch 0's, not the last one.
NEVER_IMPROVES = {"monitor": "val_loss", "mode": "max", "patience": 2, "min_delta": 0.0}


def run_main(project: Path, name: str = NAME) -> dict:
    """`python -m stages.train <name>` in-process, in project; returns its metrics report."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        main([name])
    return json.loads((project / "reports/train" / f"{name}.json").read_text())


def run_stage(project: Path, name: str = NAME, **kwargs) -> subprocess.Popen:
    """The stage as DVC runs it: a process of its own, in the project folder."""
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", name],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def curve(project: Path, metric: str, name: str = NAME) -> list[tuple[int, float]]:
    """DVCLive's per-epoch rows (step, value) of e.g. val/loss."""
    tsv = project / "reports/live" / name / "plots/metrics" / f"{metric}.tsv"
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    return [(int(step), float(value)) for step, value in rows]


def without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in TIMING}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> tuple[Path, dict]:
    """An uninterrupted 4-epoch run of the small cnn64 candidate."""
    project = write_project(tmp_path_factory.mktemp("baseline"), {NAME: candidate_params()})
    return project, run_main(project)


def test_a_run_publishes_checkpoint_card_report_and_curves(baseline):
    project, report = baseline
    assert sorted(p.name for p in (project / "models/train" / NAME).iterdir()) == [
        "best.ckpt",
        "model.json",
    ]
    card = json.loads((project / "models/train" / NAME / "model.json").read_text())
    assert card == {
        "model": "cnn64",
        "classes": list(CLASSES),
        "image_size": 32,
        "input_size": 32,
        "resize": "squeeze",  # a prepared set without preprocessing.json was squeezed
    }
    assert report["epochs"] == 4 and report["stopped_by"] == "max_epochs"
    assert report["resumed_at_epoch"] is None
    assert set(report["final"]) == {"train_loss", "train_acc", "val_loss", "val_acc"}
    val_loss = curve(project, "val/loss")
    assert len(val_loss) == 4 and len(curve(project, "train/loss")) == 4
    losses = [value for _, value in val_loss]
    assert report["best_epoch"] == losses.index(min(losses))
    assert report["best_val_loss"] == pytest.approx(min(losses))
    assert report["final"]["val_loss"] == pytest.approx(losses[-1], abs=1e-6)
    # Finished: the resume checkpoints are gone, so a later run of these params starts afresh.
    assert list((project / ".cache/train" / NAME).iterdir()) == []


def test_early_stopping_records_when_and_why_and_keeps_the_best_epoch(tmp_path):
    candidate = candidate_params(max_epochs=8)
    train_block = train_params(early_stopping=NEVER_IMPROVES)
    project = write_project(tmp_path, {NAME: candidate}, train_block)
    report = run_main(project)
    assert report["stopped_by"] == "early_stopping"
    assert report["epochs"] == 3  # epoch 0, then `patience` epochs without improvement
    assert report["best_epoch"] == 0
    first_val_loss = curve(project, "val/loss")[0][1]
    assert report["best_val_loss"] == pytest.approx(first_val_loss)
    best = torch.load(project / "models/train" / NAME / "best.ckpt", weights_only=False)
    assert best["epoch"] == 0


def test_same_params_give_the_same_metrics(baseline, tmp_path):
    project, report = baseline
    again = write_project(tmp_path, {NAME: candidate_params()})
    assert without_timing(run_main(again)) == without_timing(report)
    for metric in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert curve(again, metric) == curve(project, metric)


def last_checkpoint_epoch(project: Path) -> int | None:
    """The epoch of the run's last.ckpt, None while there is none (or it is being written)."""
    for last in (project / ".cache/train" / NAME).glob("*/last.ckpt"):
        try:
            return int(torch.load(last, map_location="cpu", weights_only=False)["epoch"])
        except Exception:
            return None
    return None


def kill_after_epoch(project: Path, epoch: int, timeout_s: float = 240) -> int:
    """Start the stage, SIGKILL it once last.ckpt holds `epoch`; the epoch saved at the kill."""
    process = run_stage(project)
    deadline = time.monotonic() + timeout_s
    try:
        while (saved := last_checkpoint_epoch(project)) is None or saved < epoch:
            assert process.poll() is None, f"finished before the kill:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    return last_checkpoint_epoch(project)


@pytest.mark.slow
def test_a_killed_run_resumes_and_selects_the_same_best_model(baseline, tmp_path, capsys):
    project, report = baseline
    killed = write_project(tmp_path, {NAME: candidate_params()})
    saved = kill_after_epoch(killed, epoch=1)
    assert saved is not None and 1 <= saved < 3, "the kill must leave epochs to resume"
    resumed = run_main(killed)
    assert f"train: resuming cnn64 at epoch {saved + 1} from" in capsys.readouterr().out
    assert resumed["resumed_at_epoch"] == saved + 1
    for key in ("best_epoch", "epochs", "stopped_by"):
        assert resumed[key] == report[key], key
    assert resumed["best_val_loss"] == pytest.approx(report["best_val_loss"], rel=1e-5)
    assert resumed["final"] == pytest.approx(report["final"], rel=1e-5)
    # The curves continue the killed run's (DVCLive resumes too). The epochs before the kill
    # ran in another process, whose float sums may differ in the last bits.
    resumed_curve, baseline_curve = (
        dict(curve(killed, "val/loss")),
        dict(curve(project, "val/loss")),
    )
    assert sorted(resumed_curve) == sorted(baseline_curve)
    assert [resumed_curve[s] for s in sorted(resumed_curve)] == pytest.approx(
        [baseline_curve[s] for s in sorted(baseline_curve)], rel=1e-5
    )
    assert (killed / "models/train" / NAME / "best.ckpt").exists()


def test_the_last_checkpoint_follows_every_epoch_not_only_the_best(tmp_path):
    # Never improving after epoch 0, the run's best checkpoint stays at epoch 0; a kill after
    # epoch 2 must resume at epoch 3, so last.ckpt has to hold epoch 2, not the best epoch.
    prepared = write_prepared(tmp_path / "data")
    params = train_params(early_stopping=NEVER_IMPROVES)
    config = stage_config(TrainConfig, "train", {"classes": list(CLASSES), "train": params})
    candidate = from_mapping(CandidateConfig, candidate_params(max_epochs=3))
    workdir = tmp_path / "resume"
    result = train(config, candidate, prepared, workdir, tmp_path / "live")
    assert result.metrics["best_epoch"] == 0 and result.metrics["epochs"] == 3
    assert checkpoint_epoch(workdir / "last.ckpt") == 2
    assert checkpoint_epoch(workdir / "best.ckpt") == 0


def test_an_unreadable_last_checkpoint_is_ignored(baseline, tmp_path, capsys):
    project, _ = baseline
    workdir = tmp_path / "resume"
    workdir.mkdir()
    checkpoint = (project / "models/train" / NAME / "best.ckpt").read_bytes()
    (workdir / "last.ckpt").write_bytes(checkpoint[: len(checkpoint) // 2])  # killed mid-write
    config = stage_config(TrainConfig, "train", {"classes": list(CLASSES), "train": train_params()})
    candidate = from_mapping(CandidateConfig, candidate_params(max_epochs=1))
    result = train(config, candidate, project / "data/prepared", workdir, tmp_path / "live")
    out = capsys.readouterr().out
    assert f"train: ignoring unreadable {workdir / 'last.ckpt'}" in out and "starting over" in out
    assert result.metrics["resumed_at_epoch"] is None and result.metrics["epochs"] == 1


def test_the_fingerprint_follows_params_and_data(tmp_path):
    prepared = write_prepared(tmp_path / "a")
    config = stage_config(TrainConfig, "train", {"classes": list(CLASSES), "train": train_params()})
    candidate = from_mapping(CandidateConfig, candidate_params())
    fingerprint = run_fingerprint(config, candidate, prepared)
    assert run_fingerprint(config, candidate, prepared) == fingerprint
    other_lr = from_mapping(CandidateConfig, candidate_params(lr=0.002))
    assert run_fingerprint(config, other_lr, prepared) != fingerprint
    other_data = write_prepared(tmp_path / "b", seed=1)
    assert run_fingerprint(config, candidate, other_data) != fingerprint


def test_every_candidate_in_params_yaml_is_valid():
    params = load_params(REPO / "params.yaml")
    config = stage_config(TrainConfig, "train", params)
    assert config.imbalance in ("none", "loss_weights", "balanced_sampler")
    assert set(params["candidates"]) >= {"cnn64", "lenet5", "effnet_probe", "effnet_finetune"}
    for name in params["candidates"]:
        candidate = candidate_config(params, name)
        assert candidate.max_epochs >= 1 and candidate.input_size >= 32


def test_unknown_candidates_and_keys_are_named():
    params = {"candidates": {NAME: candidate_params(lr_decay=0.9)}}
    with pytest.raises(ConfigError, match=r"unknown candidate 'resnet'.*\['cnn64'\]"):
        candidate_config(params, "resnet")
    with pytest.raises(ConfigError, match=r"candidates.cnn64: unknown key\(s\) \['lr_decay'\]"):
        candidate_config(params, NAME)


def test_candidate_settings_out_of_range_are_refused():
    assert candidate_config({"candidates": {NAME: candidate_params()}}, NAME).cutmix_p == 0.0
    cases = [("cutmix_p", 1.5, "<= 1"), ("cutmix_p", -0.1, ">= 0"), ("cutmix_alpha", 0.0, "> 0")]
    cases += [("batch_size", 0, ">= 1"), ("max_epochs", 0, ">= 1"), ("input_size", 0, ">= 1")]
    cases += [("lr", 0.0, "> 0"), ("weight_decay", -1e-4, ">= 0"), ("full_size_epochs", -1, ">= 0")]
    for key, value, bound in cases:
        params = {"candidates": {NAME: candidate_params(**{key: value})}}
        with pytest.raises(ConfigError, match=f"candidates.cnn64.{key}: expected a value {bound}"):
            candidate_config(params, NAME)
    params = {"candidates": {NAME: candidate_params(label_smoothing=1.0)}}
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        candidate_config(params, NAME)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model", "mobilenet", r"model 'mobilenet' is none of \['cnn64', 'effnet_lite0'"),
        ("options", {"width": 2}, "options do not fit the cnn64 builder: .*'width'"),
        ("augment", [{"p": 0.5}], "augment: step 0 has no name"),
        ("augment", [{"name": "RandomResizedKrop"}], "augment: unknown albumentations transform"),
        # albumentations itself would only warn, and train without the flip
        (
            "augment",
            [{"name": "HorizontalFlip", "q": 0.5}],
            r"augment: HorizontalFlip: Argument\(s\) 'q'",
        ),
        (
            "augment",
            [{"name": "HorizontalFlip", "p": "x"}],
            "augment: HorizontalFlip: p: Input should be a valid number",
        ),
    ],
)
def test_a_candidate_a_builder_or_albumentations_would_refuse_is_refused_at_load(
    key: str, value: object, message: str
):
    """Before any photo is read, naming the candidate, instead of a traceback at fit time."""
    params = {"candidates": {NAME: candidate_params(**{key: value})}}
    with pytest.raises(ConfigError, match=f"candidates.cnn64: {message}"):
        candidate_config(params, NAME)


def test_an_imbalance_rule_spelt_wrong_is_refused_not_ignored():
    block = {"classes": list(CLASSES), "train": train_params() | {"imbalance": "weights"}}
    with pytest.raises(ConfigError, match=r"train.imbalance: expected .*'loss_weights'"):
        stage_config(TrainConfig, "train", block)


def test_model_card_names_classes_and_sizes(tmp_path):
    prepared = write_prepared(tmp_path, size=40)
    config = stage_config(TrainConfig, "train", {"classes": list(CLASSES), "train": train_params()})
    candidate = from_mapping(CandidateConfig, candidate_params(input_size=64))
    assert model_card(config, candidate, prepared) == TrainedModel("cnn64", CLASSES, 40, 64)


@pytest.mark.slow
@pytest.mark.parametrize("augment_on", ["host", "device"])
def test_ddp_on_two_cpu_processes_agrees_and_writes_once(tmp_path, augment_on):
    """strategy=ddp, devices=2 on CPU (gloo): Lightning's launcher re-runs the command as rank 1.
    The same params with augmentation on the host or on the device (here the CPU)."""
    trainer = trainer_args(strategy="ddp", devices=2)
    early = {**NEVER_IMPROVES, "patience": 1}
    train_block = train_params(trainer=trainer, early_stopping=early, augment_on=augment_on)
    project = write_project(tmp_path, {NAME: candidate_params(max_epochs=5)}, train_block)
    process = run_stage(project)
    out, _ = process.communicate(timeout=400)
    assert process.returncode == 0, out[-3000:]
    stops = {}
    for line in out.splitlines():
        if line.startswith("train: rank "):
            rank, rest = line.removeprefix("train: rank ").split(" ", 1)
            stops[int(rank)] = rest
    assert set(stops) == {0, 1}, out[-3000:]
    # Metrics all-reduced over both ranks: both stopped early, at the same epoch, on one value.
    assert stops[0] == stops[1]
    assert out.count("(written by rank 0)") == 1
    report = json.loads((project / "reports/train" / f"{NAME}.json").read_text())
    assert report["stopped_by"] == "early_stopping" and report["epochs"] < 5
    last_epoch = report["epochs"] - 1
    assert stops[0].startswith(f"stopped after epoch {last_epoch} (early_stopping), final {{")
    assert json.loads(stops[0].split("final ", 1)[1]) == report["final"]
    assert sorted(p.name for p in (project / "models/train" / NAME).iterdir()) == [
        "best.ckpt",
        "model.json",
    ]
    assert len(curve(project, "val/loss")) == report["epochs"]  # once per epoch, by rank 0


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (
        f"dvc {' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    )
    return done.stdout


@pytest.mark.slow
def test_dvc_exp_run_lists_a_variant_beside_the_baseline(tmp_path):
    """dvc.yaml's real train stage (foreach over candidates) in a git + DVC repo of its own."""
    repo = write_project(tmp_path, {NAME: candidate_params(max_epochs=1)})
    for package in ("stages", "vitrine"):
        shutil.copytree(
            REPO / package, repo / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}, sort_keys=False))
    (repo / ".gitignore").write_text("/data/prepared\n/.cache\n")
    git(repo, "init", "-q")
    dvc(repo, "init", "-q")
    dvc(repo, "repro")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline")
    dvc(repo, "exp", "run", "-S", f"candidates.{NAME}.lr=0.003", "--name", "faster")
    rows = json.loads(dvc(repo, "exp", "show", "--json"))
    baseline = next(row for row in rows if row["rev"] != "workspace")
    (variant,) = [rev for experiment in baseline["experiments"] for rev in experiment["revs"]]
    assert variant["name"] == "faster"

    def lr_and_report(row: dict) -> tuple[float, dict]:
        data = row["data"]
        lr = data["params"]["params.yaml"]["data"]["candidates"][NAME]["lr"]
        return lr, data["metrics"][f"reports/train/{NAME}.json"]["data"]

    (baseline_lr, baseline_report), (variant_lr, variant_report) = map(
        lr_and_report, (baseline, variant)
    )
    assert (baseline_lr, variant_lr) == (0.001, 0.003)
    assert baseline_report["epochs"] == variant_report["epochs"] == 1
    assert baseline_report["best_val_loss"] != variant_report["best_val_loss"]


def small_side_recipe(**overrides) -> dict:
    """A fine-tune candidate that trains at 32 px before its last full_size_epochs at 64."""
    return candidate_params(
        model="effnet_lite0",
        options={"mode": "finetune"},
        input_size=64,
        train_input_size=32,
        **overrides,
    )


def test_a_smaller_training_side_gives_way_to_the_full_one_for_the_last_epochs(
    tmp_path, monkeypatch
):
    from lightning.pytorch.callbacks import Callback

    from vitrine.model import networks

    sides: list[int] = []  # the sides network_input resized to, and -(e + 1) as epoch e starts
    real = networks.network_input

    def spy(images, size):
        sides.append(size)
        return real(images, size)

    class Epochs(Callback):
        def on_train_epoch_start(self, trainer, module):
            sides.append(-trainer.current_epoch - 1)

    monkeypatch.setattr(networks, "network_input", spy)
    config = stage_config(TrainConfig, "train", {"classes": list(CLASSES), "train": train_params()})
    recipe = small_side_recipe(max_epochs=3, full_size_epochs=1)
    candidate = from_mapping(CandidateConfig, recipe)
    prepared = write_prepared(tmp_path / "prepared", size=48)
    train(config, candidate, prepared, tmp_path / "work", tmp_path / "live", callbacks=[Epochs()])
    epochs: dict[int, list[int]] = {}
    for side in sides:
        if side < 0:
            epoch = -side - 1
            epochs[epoch] = []
        elif epochs:
            epochs[epoch].append(side)
    train_batches = 32 // 8  # then the val batches, at the served side
    assert {e: s[:train_batches] for e, s in epochs.items()} == {
        0: [32] * 4,
        1: [32] * 4,
        2: [64] * 4,
    }
    assert all(set(s[train_batches:]) == {64} for s in epochs.values())
    with pytest.raises(ConfigError, match="train_input_size: expected a value >= 0, got -1"):
        candidate_config({"candidates": {NAME: candidate_params(train_input_size=-1)}}, NAME)


def test_early_stopping_judges_only_the_epochs_at_the_served_side(tmp_path):
    # No epoch improves val_loss by min_delta, so early stopping ends a run `patience` epochs
    # after the first it judges: epoch 0, or the first at input_size.
    never = {"monitor": "val_loss", "mode": "min", "patience": 2, "min_delta": 100.0}
    block = {"classes": list(CLASSES), "train": train_params(early_stopping=never)}
    config = stage_config(TrainConfig, "train", block)
    recipe = small_side_recipe(max_epochs=8, full_size_epochs=4)
    prepared = write_prepared(tmp_path / "prepared", size=48)
    runs = {}
    for small in (32, 0):  # epochs 0-3 at 32 px, then 64; or 64 px throughout
        candidate = from_mapping(CandidateConfig, {**recipe, "train_input_size": small})
        work = tmp_path / f"side{small}"
        runs[small] = train(config, candidate, prepared, work / "work", work / "live").metrics
    assert runs[0]["stopped_by"] == runs[32]["stopped_by"] == "early_stopping"
    assert runs[0]["epochs"] == 3
    # judged from epoch 4, the first at 64 px: stopped after epoch 6, not on the 32 px plateau
    # (after epoch 2) nor as soon as that plateau let it (after epoch 4)
    assert runs[32]["epochs"] == 7
    assert first_judged_epoch(from_mapping(CandidateConfig, recipe)) == 4
    same_side = from_mapping(CandidateConfig, {**recipe, "train_input_size": 64})
    assert first_judged_epoch(same_side) == 0
