"""Promotion: evaluate's winner (challenger) against the deployed model (champion)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from bentoml._internal.models import ModelStore

from tests.helpers.candidates import (
    CLASSES,
    PROVENANCE,
    SERVE,
    brightness_classifier,
    constant_classifier,
    evaluation_report,
    serve_checkpoint,
    write_checkpoint,
    write_prepared,
)
from tests.helpers.candidates import evaluate_config as config
from vitrine.contracts import as_dict, read_packaged
from vitrine.evaluation.promotion import Contender, challenge, decide
from vitrine.evaluation.settings import check_config
from vitrine.packaging.bundle import export_package
from vitrine.packaging.store import champion_folder, keep_champion, save_to_store

# Loading the exported model is the point here, deprecated or not.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

METRIC = "business_weighted_accuracy"


def contender(version: str, score: float | None, classes=CLASSES, image_size=32) -> Contender:
    scores = None if score is None else {METRIC: score, "accuracy": 0.5}
    return Contender(version, version, "cnn64", "c", tuple(classes), image_size, scores)


def test_keeps_the_champion_when_the_challenger_is_worse() -> None:
    decision = decide(contender("new", 0.70), contender("old", 0.80), METRIC, 0.005)
    assert not decision.promoted
    assert "challenger business_weighted_accuracy 0.7000, champion 0.8000" in decision.reason
    assert "champion kept" in decision.reason


def test_keeps_the_champion_when_the_challenger_wins_by_less_than_the_margin() -> None:
    decision = decide(contender("new", 0.804), contender("old", 0.80), METRIC, 0.005)
    assert not decision.promoted and "margin 0.005" in decision.reason


@pytest.mark.parametrize("new", [0.805, 0.9])
def test_promotes_when_the_challenger_wins_by_at_least_the_margin(new: float) -> None:
    decision = decide(contender("new", new), contender("old", 0.80), METRIC, 0.005)
    assert decision.promoted and "wins by at least the margin" in decision.reason


def test_promotes_when_there_is_no_champion() -> None:
    decision = decide(contender("new", 0.1), None, METRIC, 0.005)
    assert decision.promoted and "no champion" in decision.reason


def test_promotes_over_a_champion_that_cannot_be_compared() -> None:
    other = contender("old", None, classes=("laptop", "phone", "tablet"))
    decision = decide(contender("new", 0.1), other, METRIC, 0.005)
    assert decision.promoted and "other classes" in decision.reason
    smaller = contender("old", None, image_size=64)
    assert "64 px" in decide(contender("new", 0.1), smaller, METRIC, 0.005).reason
    letterboxed = dataclasses.replace(contender("old", None), resize="letterbox")
    reason = decide(contender("new", 0.1), letterboxed, METRIC, 0.005).reason
    assert "made square by letterbox" in reason and "by squeeze" in reason


def test_the_same_weights_are_repackaged() -> None:
    decision = decide(contender("same", 0.8), contender("same", 0.8), METRIC, 0.005)
    assert decision.promoted and "same weights" in decision.reason


@pytest.fixture
def packaged(tmp_path: Path) -> dict[str, Path]:
    """Three packaged models; on the test photos (6 laptops, 2 phones; laptop 1, phone 1.5)
    business-weighted accuracy: always_laptop 6/9, always_phone 3/9, bright 1."""
    report = evaluation_report()
    folders = {}
    models = {
        "always_laptop": constant_classifier(0),
        "always_phone": constant_classifier(1),
        "bright": brightness_classifier(),
    }
    for name, module in models.items():
        model_dir = write_checkpoint(module, tmp_path / "train" / name)
        folders[name] = tmp_path / "package" / name
        served = serve_checkpoint(model_dir, tmp_path / "served" / name)
        export_package(model_dir, served, report, folders[name], SERVE, PROVENANCE, None)
    return folders


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    return write_prepared(tmp_path / "prepared")


def test_challenge_scores_both_on_the_test_photos(packaged: dict, prepared: Path) -> None:
    record = as_dict(
        challenge(packaged["always_laptop"], packaged["always_phone"], prepared, config())
    )
    assert record["promoted"] is True
    assert record["metric"] == METRIC and record["margin"] == 0.005
    assert record["test_photos"] == 8
    challenger, champion = record["challenger"], record["champion"]
    assert challenger["score"] == pytest.approx(6 / 9)
    assert champion["score"] == pytest.approx(3 / 9)
    assert challenger["candidate"] == "always_laptop" and champion["candidate"] == "always_phone"
    assert challenger["scores"]["accuracy"] == 0.75 and champion["scores"]["accuracy"] == 0.25
    info = read_packaged(packaged["always_phone"])
    assert champion["model_version"] == info.version
    assert json.loads(json.dumps(record)) == record  # promotion.json as written


def test_challenge_keeps_a_better_champion(packaged: dict, prepared: Path) -> None:
    record = as_dict(challenge(packaged["always_laptop"], packaged["bright"], prepared, config()))
    assert record["promoted"] is False
    assert record["champion"]["score"] == 1.0 and "champion kept" in record["reason"]


def test_challenge_honours_the_margin(packaged: dict, prepared: Path) -> None:
    # always_laptop beats always_phone by 1/3
    wide = config(promote_margin=0.34)
    assert not challenge(
        packaged["always_laptop"], packaged["always_phone"], prepared, wide
    ).promoted
    narrow = config(promote_margin=0.33)
    assert challenge(packaged["always_laptop"], packaged["always_phone"], prepared, narrow).promoted


def test_challenge_replaces_a_champion_packaged_before_model_onnx(
    packaged: dict, prepared: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(packaged["bright"], old)
    (old / "model.onnx").unlink()  # as packaged before the service ran ONNX Runtime
    record = as_dict(challenge(packaged["always_laptop"], old, prepared, config()))
    assert record["promoted"] is True and record["champion"]["score"] is None
    assert "packaged before model.onnx" in record["reason"]


def test_challenge_without_a_champion(packaged: dict, prepared: Path) -> None:
    record = as_dict(challenge(packaged["always_phone"], None, prepared, config()))
    assert record["promoted"] is True and record["champion"] is None
    assert record["challenger"]["score"] == pytest.approx(3 / 9)


def test_each_packaged_model_is_scored_by_its_own_decision_rule(
    prepared: Path, tmp_path: Path
) -> None:
    """p(phone) 0.43 on every photo: the most probable class is laptop, the expected-value
    answer (phone worth 1.5, a missed phone costing 1.0) phone. A champion packaged with the
    most probable class as its answer is scored as it is served, whatever evaluate.decision."""
    report = evaluation_report()
    by_value = config(decision="expected_value")
    gain = check_config(by_value).decision_gain()
    model_dir = write_checkpoint(constant_classifier(0, margin=0.3), tmp_path / "train" / "unsure")
    served = serve_checkpoint(model_dir, tmp_path / "served")
    for name, rule in (("likeliest", None), ("by_value", gain)):
        export_package(model_dir, served, report, tmp_path / name, SERVE, PROVENANCE, rule)
    record = as_dict(challenge(tmp_path / "by_value", tmp_path / "likeliest", prepared, by_value))
    assert record["challenger"]["scores"]["accuracy"] == 0.25  # 2 phones of 8 test photos
    assert record["champion"]["scores"]["accuracy"] == 0.75
    assert record["champion"]["model_version"] == record["challenger"]["model_version"]


def test_the_champion_is_the_latest_stored_model(packaged: dict, tmp_path: Path) -> None:
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    store = ModelStore(models)
    assert champion_folder("vitrine-test", store) is None
    save_to_store(packaged["always_phone"], "vitrine-test", store=store)
    tag = save_to_store(packaged["bright"], "vitrine-test", store=store)
    champion = champion_folder("vitrine-test", store)
    assert read_packaged(champion).version == tag.version

    out = tmp_path / "models" / "package"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("x")
    assert keep_champion(champion, out, SERVE) is False  # packaged with these serve settings
    files = sorted(p.name for p in out.iterdir())
    assert files == ["model.json", "model.onnx", "model.pt", "model_card.md"]
    for name in ("model.pt", "model.onnx", "model.json"):
        assert (out / name).read_bytes() == (packaged["bright"] / name).read_bytes()


def test_a_kept_champion_takes_the_current_serve_settings(packaged: dict, tmp_path: Path) -> None:
    models = tmp_path / "home" / "models"
    models.mkdir(parents=True)
    store = ModelStore(models)
    old_serve = dataclasses.replace(SERVE, max_batch_size=32, workers=2)
    old = tmp_path / "old"
    shutil.copytree(packaged["bright"], old)
    info = json.loads((old / "model.json").read_text())
    info["serve"] = dataclasses.asdict(old_serve)  # as packaged before the settings changed
    (old / "model.json").write_text(json.dumps(info))
    version = save_to_store(old, "vitrine-test", store=store).version

    out = tmp_path / "package"
    assert keep_champion(champion_folder("vitrine-test", store), out, SERVE) is True
    assert read_packaged(out).serve == SERVE and read_packaged(out).version == version
    for name in ("model.pt", "model.onnx"):  # the same model
        assert (out / name).read_bytes() == (old / name).read_bytes()
    assert save_to_store(out, "vitrine-test", store=store).version == version
    assert read_packaged(champion_folder("vitrine-test", store)).serve == SERVE


def test_the_same_weights_at_another_precision_are_promoted() -> None:
    champion = contender("cnn64-abc", 0.90)
    challenger = dataclasses.replace(contender("cnn64-int8-abc", 0.89), weights="cnn64-abc")
    decision = decide(challenger, champion, METRIC, 0.005)
    assert decision.promoted and "runs the champion's weights (cnn64-abc" in decision.reason
    other = dataclasses.replace(challenger, weights="cnn64-def")  # a retrain must win by margin
    assert not decide(other, champion, METRIC, 0.005).promoted
