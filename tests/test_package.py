"""The package stage: checkpoint -> TorchScript model + model.json -> BentoML store (-> Bento)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bentoml._internal.models import ModelStore
from PIL import Image

from stages.package import PackageConfig
from tests.helpers.candidates import (
    SERVE,
    brightness_classifier,
    constant_classifier,
    serve_checkpoint,
    write_checkpoint,
    write_prepared,
)
from tests.helpers.tiny_project import two_classes
from vitrine.config import ConfigError, apply_overrides, load_params, stage_config
from vitrine.contracts import Provenance, read_evaluation, read_packaged, read_trained
from vitrine.evaluation.calibration import Calibration
from vitrine.evaluation.settings import check_config, load_config
from vitrine.images import load_square
from vitrine.model.export import (
    ONNX_PARITY_ATOL,
    export_onnx,
    parity_batch,
)
from vitrine.model.networks import ImageClassifier
from vitrine.packaging.bundle import (
    data_version,
    export_package,
    load_predictor,
    provenance,
    script_predictor,
    serve_settings,
)
from vitrine.packaging.store import save_to_store
from vitrine.runtime.onnx import load_onnx

# Loading the exported model is the point here, deprecated or not.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["laptop", "phone"]
METRICS = {"n": 40, "accuracy": 0.75, "macro_f1": 0.7, "business_weighted_accuracy": 0.8}
# evaluate.json as evaluate writes it (abridged): package keeps the winner's scalar test scores.
REPORT = {
    "winner": "cnn64",
    "primary_metric": "business_weighted_accuracy",
    "decision": "argmax",
    "ranking": ["cnn64"],
    "business_values": "params",
    "val": METRICS,
    "test": {**METRICS, "per_class": {"laptop": {"f1": 0.8}}, "taxonomy": {"levels": []}},
    "calibration": {},
    "abstain": {"threshold": 0.0},
    "served": {},
}
CARD = {"params": {"train": {"model": "cnn64"}}, "data": {"path": "p", "md5": "abc.dir"}}
PROVENANCE = Provenance(**CARD, git_revision="f00")


def write_trained_model(model_dir: Path, seed: int = 0, classes: list[str] = CLASSES) -> None:
    """What train leaves behind: an (untrained) ImageClassifier checkpoint plus model.json."""
    torch.manual_seed(seed)
    write_checkpoint(ImageClassifier("cnn64", list(classes), lr=1e-3), model_dir, image_size=128)


def write_report(path: Path, report: dict = REPORT) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def export(
    model_dir: Path,
    report: Path,
    out_dir: Path,
    gain: np.ndarray | None = None,
    photos: np.ndarray | None = None,
    calibration: Calibration | None = None,
) -> dict:
    """The package stage's export of a checkpoint, served as evaluate would (int8 with photos);
    model.json as written."""
    served_dir = out_dir.with_name(out_dir.name + "-served")
    served = serve_checkpoint(model_dir, served_dir, photos, calibration)
    evaluation = read_evaluation(report)
    export_package(model_dir, served, evaluation, out_dir, SERVE, PROVENANCE, gain)
    return json.loads((out_dir / "model.json").read_text())


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (300, 200)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def exported(tmp_path: Path) -> tuple[Path, Path, dict]:
    model_dir = tmp_path / "models" / "train"
    write_trained_model(model_dir)
    out_dir = tmp_path / "models" / "package"
    info = export(model_dir, write_report(tmp_path / "evaluate.json"), out_dir)
    return model_dir, out_dir, info


def test_config_fields_are_the_params_block() -> None:
    cfg = stage_config(PackageConfig, "package", load_params(REPO / "params.yaml"))
    assert isinstance(cfg.model_name, str) and cfg.model_name
    assert isinstance(cfg.build_bento, bool)


def serve_params(by_candidate: dict) -> dict:
    params = load_params(REPO / "params.yaml")
    return {**params, "serve": {**params["serve"], "by_candidate": by_candidate}}


def test_a_candidate_is_served_with_its_own_entry_over_the_shared_serve_block() -> None:
    params = serve_params({"cnn64": {"workers": 3, "max_batch_size": 16}})
    own, shared = serve_settings(params, "cnn64"), serve_settings(params, "effnet_probe")
    assert (own.workers, own.max_batch_size) == (3, 16)
    assert (shared.workers, shared.max_batch_size) == (
        params["serve"]["workers"],
        params["serve"]["max_batch_size"],
    )
    assert own.max_upload_bytes == shared.max_upload_bytes == params["serve"]["max_upload_bytes"]


@pytest.mark.parametrize(
    ("by_candidate", "message"),
    [
        ({"cnn65": {"workers": 2}}, "unknown candidate"),
        ({"cnn64": {"wrokers": 2}}, "unknown key"),
    ],
)
def test_a_misspelt_serve_override_is_an_error(by_candidate: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        serve_settings(serve_params(by_candidate), "cnn64")


def test_export_writes_scripted_model_and_info(exported: tuple[Path, Path, dict]) -> None:
    _, out_dir, info = exported
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["model.json", "model.onnx", "model.pt", "model_card.md"]
    assert json.loads((out_dir / "model.json").read_text()) == info
    assert info["classes"] == CLASSES
    assert info["image_size"] == 128 and info["input_size"] == 64 and info["model"] == "cnn64"
    assert info["candidate"] == "train"  # the checkpoint's folder: <paths.model>/<candidate>
    assert info["metrics"] == METRICS
    assert info["model_version"].startswith("cnn64-")
    # What the service reads back: the serve limits and "never abstain" without an abstain key.
    served = read_packaged(out_dir)
    assert served.serve == SERVE and served.abstain_threshold == 0.0
    assert "decision_gain" not in info and served.decision_gain is None  # the likeliest class
    assert served.classes == tuple(CLASSES) and served.version == info["model_version"]


def test_abstain_threshold_comes_from_the_evaluate_report(tmp_path: Path) -> None:
    write_trained_model(tmp_path / "train")
    report = write_report(tmp_path / "evaluate.json", {**REPORT, "abstain": {"threshold": 0.6}})
    info = export(tmp_path / "train", report, tmp_path / "package")
    assert info["abstain_threshold"] == 0.6
    assert read_packaged(tmp_path / "package").abstain_threshold == 0.6


def test_class_thresholds_come_from_the_evaluate_report(tmp_path: Path) -> None:
    write_trained_model(tmp_path / "train")
    fitted = {"laptop": {"threshold": 0.7, "val_photos": 40, "fitted": True}}
    fitted["phone"] = {"threshold": 0.6, "val_photos": 3, "fitted": False}
    report = {**REPORT, "abstain": {"threshold": 0.6}, "decisions": {"class_thresholds": fitted}}
    info = export(tmp_path / "train", write_report(tmp_path / "e.json", report), tmp_path / "p")
    assert info["class_thresholds"] == [0.7, 0.6] and info["backoff"] == []
    served = read_packaged(tmp_path / "p")
    assert served.rule.thresholds.tolist() == [0.7, 0.6]
    card = (tmp_path / "p" / "model_card.md").read_text()
    assert (
        "abstains below confidence 0.6 (classes with a threshold of their own: laptop 0.7)" in card
    )
    # A report written before class thresholds existed: every class from the shared one.
    older = export(tmp_path / "train", write_report(tmp_path / "o.json"), tmp_path / "o")
    assert older["class_thresholds"] == []
    assert read_packaged(tmp_path / "o").rule.thresholds.tolist() == [0.0, 0.0]


def test_the_decision_rule_travels_to_the_service(tmp_path: Path) -> None:
    write_trained_model(tmp_path / "train")
    gain = np.array([[1.0, -0.5], [-1.0, 1.5]])
    info = export(tmp_path / "train", write_report(tmp_path / "e.json"), tmp_path / "pkg", gain)
    assert info["decision_gain"] == gain.tolist()
    np.testing.assert_array_equal(read_packaged(tmp_path / "pkg").gain, gain)
    card = (tmp_path / "pkg" / "model_card.md").read_text()
    assert "Answers with the class of highest expected gain" in card
    assert "[1, -0.5], [-1, 1.5]" in card


def test_model_card_records_metrics_params_data_and_code(
    exported: tuple[Path, Path, dict],
) -> None:
    _, out_dir, info = exported
    card = (out_dir / "model_card.md").read_text()
    assert info["model_version"] in card
    assert "accuracy: 0.7500" in card and "n: 40" in card
    assert "abc.dir" in card and "f00" in card and "model: cnn64" in card
    assert "Answers with the most probable class; abstains below confidence 0" in card
    assert info["card"] == {**CARD, "git_revision": "f00"}


def test_data_version_is_the_prepared_md5_in_dvc_lock(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    assert data_version(lock, Path("data/prepared")) is None  # before the first dvc repro
    lock.write_text(
        "schema: '2.0'\nstages:\n  prepare:\n    outs:\n"
        "    - path: data/prepared\n      hash: md5\n      md5: 0123abcd.dir\n"
        "    - path: reports/prepare.json\n      md5: ffff\n"
    )
    assert data_version(lock, Path("data/prepared")) == "0123abcd.dir"
    card = provenance({"train": {"seed": 1}, "collect": {}}, Path("data/prepared"), tmp_path)
    assert card.params == {"train": {"seed": 1}}  # only what made the model
    assert card.data == {"path": "data/prepared", "md5": "0123abcd.dir"}
    assert card.git_revision == "unknown"  # tmp_path is no git checkout


def test_scripted_model_equals_eager(exported: tuple[Path, Path, dict]) -> None:
    model_dir, out_dir, _ = exported
    eager = load_predictor(model_dir / "best.ckpt", read_trained(model_dir))
    scripted = torch.jit.load(str(out_dir / "model.pt"))
    photo = torch.from_numpy(load_square(jpeg_bytes(), 128).copy()).unsqueeze(0)
    for batch in (parity_batch(128, n=8, seed=1), photo):
        with torch.inference_mode():
            expected, actual = eager(batch), scripted(batch)
        assert actual.shape == (len(batch), len(CLASSES))
        assert torch.allclose(actual, expected, rtol=0.0, atol=1e-6)


def test_onnx_model_behind_the_shared_resize_equals_eager(
    exported: tuple[Path, Path, dict],
) -> None:
    model_dir, out_dir, info = exported
    eager = load_predictor(model_dir / "best.ckpt", read_trained(model_dir))
    served = load_onnx(out_dir, 128, info["input_size"])
    photo = torch.from_numpy(load_square(jpeg_bytes(), 128).copy()).unsqueeze(0)
    for batch in (parity_batch(128, n=8, seed=1), photo):
        with torch.inference_mode():
            expected, actual = eager(batch), served(batch)
        assert actual.shape == (len(batch), len(CLASSES))
        assert torch.allclose(actual, expected, rtol=0.0, atol=ONNX_PARITY_ATOL)
    with pytest.raises(ValueError, match="ONNX model differs from eager"):
        export_onnx(eager, 128, atol=-1.0)


def test_scripting_is_refused_when_outputs_differ(exported: tuple[Path, Path, dict]) -> None:
    model_dir, _, _ = exported
    eager = load_predictor(model_dir / "best.ckpt", read_trained(model_dir))
    with pytest.raises(ValueError, match="differs from eager"):
        script_predictor(eager, 128, atol=-1.0)  # no difference passes a negative tolerance


def test_model_version_follows_the_weights(tmp_path: Path) -> None:
    report = write_report(tmp_path / "evaluate.json")
    versions = []
    for run, seed in enumerate((0, 0, 1)):
        write_trained_model(tmp_path / f"train{run}", seed=seed)
        info = export(tmp_path / f"train{run}", report, tmp_path / f"package{run}")
        versions.append(info["model_version"])
    assert versions[0] == versions[1] != versions[2]


def test_checkpoint_must_match_model_json(tmp_path: Path) -> None:
    model_dir = tmp_path / "train"
    write_trained_model(model_dir)
    info = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**info, "classes": ["phone", "laptop"]}))
    with pytest.raises(ValueError, match=r"model\.json says"):
        export(model_dir, write_report(tmp_path / "evaluate.json"), tmp_path / "out")


def test_model_lands_in_the_store(exported: tuple[Path, Path, dict], tmp_path: Path) -> None:
    _, out_dir, info = exported
    models = tmp_path / "bentoml" / "models"
    models.mkdir(parents=True)
    store = ModelStore(models)

    tag = save_to_store(out_dir, "vitrine-test", store=store)

    stored = store.get("vitrine-test:latest")
    assert stored.tag == tag and tag.version == info["model_version"]
    for name in ("model.pt", "model.json", "model_card.md"):
        assert Path(stored.path_of(name)).read_bytes() == (out_dir / name).read_bytes()
    assert stored.info.metadata["metrics"] == METRICS
    assert stored.info.metadata["classes"] == CLASSES
    assert stored.info.labels["classes"] == "laptop,phone"
    assert stored.info.labels["accuracy"] == "0.7500"

    # Packaging the same model again replaces it instead of adding a version.
    assert save_to_store(out_dir, "vitrine-test", store=store) == tag
    assert [m.tag for m in store.list("vitrine-test")] == [tag]


@pytest.mark.slow
def test_stage_promotes_a_first_model_then_keeps_the_better_champion(tmp_path: Path) -> None:
    """`python -m stages.package` twice in a scratch copy of the repository: the first winner
    becomes the champion and a Bento; a worse winner then leaves the champion in place."""
    for folder in ("service", "vitrine", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__py*"))
    for name in ("params.yaml", "bentofile.yaml"):
        shutil.copy(REPO / name, tmp_path)
    params = load_params(tmp_path / "params.yaml")
    apply_overrides(params, two_classes(params).items())  # the fixture's laptops and phones
    params["candidates"]["bright"] = params["candidates"]["cnn64"]
    params["serve"]["by_candidate"] = {"bright": {"workers": 3}}  # its own, kept or promoted
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    paths = params["paths"]
    write_prepared(tmp_path / paths["prepared"])  # 32 px dark laptops and bright phones
    models = tmp_path / paths["model"]
    write_checkpoint(brightness_classifier(), models / "bright")  # right on every test photo
    write_checkpoint(constant_classifier(1), models / "always_phone")
    for name in ("bright", "always_phone"):  # evaluate's served models, in float
        serve_checkpoint(models / name, tmp_path / paths["served"] / name)
    home = tmp_path / "bentoml-home"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    env.pop("PYTHONPATH", None)
    package = tmp_path / paths["package"]

    def run(winner: str) -> dict:
        report = {**REPORT, "winner": winner, "abstain": {"threshold": 0.6}}
        write_report(tmp_path / paths["evaluate_report"], report)
        subprocess.run([sys.executable, "-m", "stages.package"], cwd=tmp_path, env=env, check=True)
        return json.loads((tmp_path / paths["promotion"]).read_text())

    first = run("bright")
    assert first["promoted"] is True and first["champion"] is None
    assert first["challenger"]["candidate"] == "bright" and first["challenger"]["score"] == 1.0
    info = json.loads((package / "model.json").read_text())
    assert info["candidate"] == "bright" and info["abstain_threshold"] == 0.6
    assert info["serve"]["workers"] == 3
    # The decision rule evaluate scores with (params evaluate.decision: expected_value).
    values = check_config(load_config(params))
    assert info["decision_gain"] == values.gain().tolist()
    # The value model the service's review queue ranks answers by (vitrine.production.queue).
    assert info["value_gain"] == values.gain().tolist()
    assert info["review_cost"] == params["evaluate"]["review_cost"]
    bentos = sorted((home / "bentos" / "vitrine").glob("*/bento.yaml"))
    model_name = load_params(tmp_path / "params.yaml")["package"]["model_name"]
    assert len(bentos) == 1 and f"{model_name}:{info['model_version']}" in bentos[0].read_text()
    bento_src = bentos[0].parent / "src"
    assert (bento_src / "service" / "service.py").is_file()
    assert (bento_src / "vitrine" / "images.py").is_file()
    assert (bento_src / "service" / "upload.html").is_file()
    assert (bento_src / "service" / "review.html").is_file()  # the moderators' page
    # The answers' recorder, its migrations and its database drivers travel with the service.
    assert (bento_src / "vitrine" / "production" / "recorder.py").is_file()
    assert (bento_src / "vitrine/production/migrations/versions/v0001_answers.py").is_file()
    requirements = (bentos[0].parent / "env" / "python" / "requirements.txt").read_text()
    assert {"sqlalchemy==2.1.9", "alembic==1.20.1", "psycopg[binary]==3.3.9"} <= set(
        requirements.split()
    )
    assert info["serve"]["record"] == params["serve"]["record"]
    deployed = {name: (package / name).read_bytes() for name in ("model.pt", "model.json")}

    second = run("always_phone")
    assert second["promoted"] is False and "champion kept" in second["reason"]
    assert second["champion"]["model_version"] == info["model_version"]
    assert second["challenger"]["score"] < second["champion"]["score"]
    # The package folder is still the deployed model and the store holds no new model; the
    # Bento is built again around the champion (the service code may be what changed).
    assert {name: (package / name).read_bytes() for name in deployed} == deployed  # workers 3
    rebuilt = sorted(set((home / "bentos" / "vitrine").glob("*/bento.yaml")) - set(bentos))
    assert len(rebuilt) == 1
    assert f"{model_name}:{info['model_version']}" in rebuilt[0].read_text()
    assert [p.name for p in (home / "models" / model_name).iterdir() if p.is_dir()] == [
        info["model_version"]
    ]


def test_an_int8_package_ships_evaluates_model_under_its_weights_version(tmp_path: Path) -> None:
    model_dir = tmp_path / "train"
    write_trained_model(model_dir)
    report = write_report(tmp_path / "evaluate.json")
    fp32 = export(model_dir, report, tmp_path / "fp32")
    int8 = export(model_dir, report, tmp_path / "int8", photos=parity_batch(128, 8, 2).numpy())
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert fp32["model_version"] == fp32["weights_version"] == int8["weights_version"]
    shipped = (tmp_path / "int8" / "model.onnx").read_bytes()
    assert shipped == (tmp_path / "int8-served" / "model.onnx").read_bytes()
    prefix = fp32["model_version"].rsplit("-", 1)[0]
    assert int8["model_version"] == f"{prefix}-int8-{hashlib.sha256(shipped).hexdigest()[:12]}"
    assert "quantized to int8" in (tmp_path / "int8" / "model_card.md").read_text()
    assert "in float (fp32)" in (tmp_path / "fp32" / "model_card.md").read_text()
    batch = parity_batch(128, n=4, seed=3)
    with torch.inference_mode():
        logits = [load_onnx(tmp_path / p, 128, 64)(batch) for p in ("fp32", "int8")]
    assert not torch.equal(*logits)  # quantized: near the float logits, not equal
    assert torch.allclose(*logits, atol=0.05)


def test_a_calibrated_float_package_is_versioned_by_its_model_onnx(tmp_path: Path) -> None:
    """The same weights with calibrated probabilities answer otherwise: another version."""
    model_dir = tmp_path / "train"
    write_trained_model(model_dir)
    report = write_report(tmp_path / "evaluate.json")
    plain = export(model_dir, report, tmp_path / "plain")
    calibration = Calibration(2.0, (0.1, -0.1))
    calibrated = export(model_dir, report, tmp_path / "calibrated", calibration=calibration)
    assert calibrated["weights_version"] == plain["weights_version"] == plain["model_version"]
    shipped = (tmp_path / "calibrated" / "model.onnx").read_bytes()
    prefix = plain["model_version"].rsplit("-", 1)[0]
    digest = hashlib.sha256(shipped).hexdigest()[:12]
    assert calibrated["model_version"] == f"{prefix}-fp32-{digest}"
    assert calibrated["calibration"]["temperature"] == 2.0
    card = (tmp_path / "calibrated" / "model_card.md").read_text()
    assert "softmax(logits / 2.000 + bias), bias laptop +0.100, phone -0.100" in card
    plain_card = (tmp_path / "plain" / "model_card.md").read_text()
    assert "the network's softmax, uncalibrated" in plain_card


def test_a_served_model_of_another_checkpoint_is_refused(tmp_path: Path) -> None:
    """Retrained since evaluate ran: package would ship a model.onnx of the old weights."""
    for seed in (0, 1):
        write_trained_model(tmp_path / f"train{seed}", seed=seed)
    served = serve_checkpoint(tmp_path / "train0", tmp_path / "served")
    report = write_report(tmp_path / "evaluate.json")
    with pytest.raises(ValueError, match=r"another checkpoint .* run `dvc repro evaluate`"):
        evaluation = read_evaluation(report)
        export_package(
            tmp_path / "train1", served, evaluation, tmp_path / "package", SERVE, PROVENANCE, None
        )


def test_the_packaged_model_makes_photos_square_by_its_training_rule(tmp_path: Path) -> None:
    """train's card names prepare's resize rule; package writes it to model.json, where the
    service, the scorer and the heat maps read it (tests/test_service.py)."""
    torch.manual_seed(0)
    module = ImageClassifier("cnn64", list(CLASSES), lr=1e-3)
    write_checkpoint(module, tmp_path / "train", image_size=128, resize="letterbox")
    info = export(tmp_path / "train", write_report(tmp_path / "evaluate.json"), tmp_path / "pkg")
    assert info["resize"] == "letterbox" and read_packaged(tmp_path / "pkg").resize == "letterbox"
    assert "vitrine.images.load_square (letterbox)" in (tmp_path / "pkg/model_card.md").read_text()
