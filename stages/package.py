"""Package: evaluate's winner as TorchScript and ONNX models, promoted to the BentoML store and
a Bento only when it beats the model deployed now.

Reads  <paths.evaluate_report> (evaluate: the winner, its test scores, the abstain threshold),
       <paths.model>/<winner>/best.ckpt and model.json (train), <paths.served>/<winner>/
       (evaluate: model.onnx as it scored it, and its precision), the prepared test photos, the
       evaluate: block (primary metric, value model, promote_margin) and serve: block of
       params.yaml (with the shipped candidate's serve.by_candidate entry over it), dvc.lock
       (the prepared data's md5) and the git revision.
Writes <paths.package>/model.pt  the scripted Predictor: uint8 (N, H, W, 3) -> logits, checked
                                 against the eager one before anything is written;
       <paths.package>/model.onnx evaluate's served model, as it is: the Predictor after its
                                 resize for ONNX Runtime (what the service runs, behind the
                                 same resize), in float or int8 (vitrine/model/export.py);
       <paths.package>/model.json classes, image_size, model, candidate, input_size,
                                 model_version, weights_version, precision, calibration
                                 (evaluate's fit, baked into model.onnx), metrics (the
                                 winner's test scores),
                                 abstain_threshold, serve (the service's limits: the Bento has no
                                 params.yaml) and card (params, data version, git revision);
       <paths.package>/model_card.md the same card for people;
       <paths.promotion>          the decision (vitrine.evaluation.promotion), why, and both
                                 models' scores.
The challenger (the winner) and the champion (<package.model_name>:latest in the BentoML model
store, $BENTOML_HOME, <repo>/.bentoml when unset) are scored on the same test photos. Promoted:
the package folder goes to the store as <package.model_name>:<model_version> and, with
package.build_bento, bentofile.yaml's Bento is built. Kept: <paths.package> gets the champion's
files instead, so the DVC output is always the deployed model; its model.json takes the current
serve: block for its candidate (re-saved to the store under the same version when that
changed), and the Bento is built again around it, since the service code or its settings may
be what changed.

weights_version hashes the weights, classes and sizes, so packaging the same model twice gives
the same version (and makes it :latest again); model_version is it for the plain float export,
and for a quantized or calibrated model.onnx effnet-lite0-<precision>-<hash of model.onnx>
(int8's ranges and the probabilities' calibration shape it too).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np
import torch
import yaml
from bentoml.exceptions import NotFound

from stages.evaluate import EvaluateConfig, check_config, labelled_split, load_config, onnx_proba
from stages.train import CHECKPOINT, MODEL_CARD
from vitrine.config import ConfigError, from_mapping, load_params, load_paths, stage_config
from vitrine.contracts import (
    MODEL_CARD_FILE,
    MODEL_INFO_FILE,
    MODEL_NAME_ENV,
    ONNX_MODEL_FILE,
    SCRIPTED_MODEL_FILE,
    ServeConfig,
    read_package_info,
)
from vitrine.evaluation import metrics
from vitrine.evaluation.promotion import Contender, decide, not_comparable, promotion_record
from vitrine.model.export import FP32, max_output_diff, parity_batch, read_served
from vitrine.model.networks import ImageClassifier, Predictor
from vitrine.runtime.decisions import decide as decide_answers

if TYPE_CHECKING:
    from bentoml._internal.models import ModelStore

BENTOFILE = Path("bentofile.yaml")
DVC_LOCK = Path("dvc.lock")
CARD_PARAMS = ("classes", "prepare", "train", "evaluate")  # what made the model, for its card
UNKNOWN = "unknown"
PARITY_ATOL = 1e-6  # max |scripted - eager| on the logits
PACKAGE_FILES = (SCRIPTED_MODEL_FILE, ONNX_MODEL_FILE, MODEL_INFO_FILE, MODEL_CARD_FILE)


@dataclasses.dataclass(frozen=True)
class PackageConfig:
    model_name: str  # name in the BentoML model store; the service loads <model_name>:latest
    build_bento: bool


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """What train wrote next to its checkpoint (<paths.model>/model.json)."""

    model: str
    classes: tuple[str, ...]
    image_size: int  # side of the prepared square arrays: what the Predictor is fed
    input_size: int  # the network's own input side (the Predictor resizes to it)


def read_trained(model_dir: Path) -> TrainedModel:
    info = json.loads((model_dir / MODEL_CARD).read_text())
    missing = sorted({"model", "classes", "image_size", "input_size"} - set(info))
    if missing:
        raise ValueError(f"{model_dir / MODEL_CARD}: missing key(s) {missing}")
    return TrainedModel(
        model=str(info["model"]),
        classes=tuple(str(c) for c in info["classes"]),
        image_size=int(info["image_size"]),
        input_size=int(info["input_size"]),
    )


def load_predictor(checkpoint: Path, trained: TrainedModel) -> Predictor:
    """The checkpoint's Predictor in eval mode, after checking it is the model train described."""
    module = ImageClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    hparams = module.hparams
    if hparams["model"] != trained.model or tuple(hparams["classes"]) != trained.classes:
        raise ValueError(
            f"{checkpoint} holds {hparams['model']} over {list(hparams['classes'])}, but "
            f"model.json says {trained.model} over {list(trained.classes)}"
        )
    predictor = module.predictor.eval()
    if predictor.input_size != trained.input_size:
        raise ValueError(
            f"{checkpoint}: network input {predictor.input_size}, model.json says "
            f"{trained.input_size}"
        )
    return predictor


def script_predictor(
    predictor: Predictor, image_size: int, atol: float = PARITY_ATOL
) -> torch.jit.ScriptModule:
    """TorchScript the Predictor; refuse the result unless it computes what the eager one does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice
        scripted = torch.jit.script(predictor)
    diff = max_output_diff(scripted, predictor, parity_batch(image_size))
    if not diff <= atol:
        raise ValueError(f"scripted model differs from eager by {diff:.3g} (> {atol:g})")
    return scripted


def serialize(scripted: torch.jit.ScriptModule) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(scripted, buffer)
    return buffer.getvalue()


def weights_version(predictor: torch.nn.Module, trained: TrainedModel) -> str:
    """`<model>-<12 hex>`: a hash of the weights and of how the outputs are read.

    Not a hash of model.pt: TorchScript archives differ from run to run (a random serialization
    id, constants in hash-seed order) even for the same weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(predictor.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(json.dumps(dataclasses.asdict(trained), sort_keys=True).encode())
    prefix = re.sub(r"[^a-z0-9]+", "-", trained.model.lower()).strip("-") or "model"
    return f"{prefix}-{digest.hexdigest()[:12]}"


def model_version(weights: str, precision: str, calibrated: bool, served: bytes) -> str:
    """The served model's version: the weights' own for the plain float export; when quantized
    or calibrated, marked with the precision and a hash of model.onnx itself, since int8's and
    the probabilities' calibration shape it too (effnet-lite0-int8-<hash> runs the weights of
    effnet-lite0-<other hash>)."""
    if precision == FP32 and not calibrated:
        return weights
    prefix = weights.rsplit("-", 1)[0]
    return f"{prefix}-{precision}-{hashlib.sha256(served).hexdigest()[:12]}"


def abstain_threshold(report: dict[str, Any]) -> float:
    """The confidence below which the service abstains, as evaluate chose it (0.0: never)."""
    return float(report["abstain"]["threshold"]) if "abstain" in report else 0.0


def test_metrics(report: dict[str, Any]) -> dict[str, float | int]:
    """The winner's scalar test scores in evaluate's report ({} when it has none)."""
    return metrics.scalar_scores(report.get("test", {}))


def data_version(lock_file: Path, prepared: Path) -> str | None:
    """The md5 dvc.lock records for the prepared data (None before the first `dvc repro`)."""
    if not lock_file.is_file():
        return None
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            if Path(out["path"]) == prepared:
                return out.get("md5")
    return None


def git_revision(repo: Path) -> str | None:
    """The commit the code was at (None outside a git checkout)."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def provenance(params: dict[str, Any], prepared: Path, repo: Path) -> dict[str, Any]:
    """The model card's record of what made the model: params, data version, code revision.

    "unknown" where there is no dvc.lock or git checkout (BentoML metadata refuses None).
    """
    md5 = data_version(repo / DVC_LOCK, prepared) or UNKNOWN
    return {
        "params": {key: params[key] for key in CARD_PARAMS if key in params},
        "data": {"path": prepared.as_posix(), "md5": md5},
        "git_revision": git_revision(repo) or UNKNOWN,
    }


def package_info(
    trained: TrainedModel,
    candidate: str,
    weights: str,
    record: dict[str, Any],
    served: bytes,
    report: dict[str, Any],
    serve: ServeConfig,
    card: dict[str, Any],
    decision_gain: np.ndarray | None,
) -> dict[str, Any]:
    """model.json of the package: everything the service needs besides the weights. record:
    served.json, how evaluate served the model (precision, probability calibration)."""
    precision = str(record["precision"])
    calibration = calibration_of(record)
    calibrated = calibration["method"] != "none"
    info = {
        "model": trained.model,
        "candidate": candidate,
        "classes": list(trained.classes),
        "image_size": trained.image_size,
        "input_size": trained.input_size,
        "model_version": model_version(weights, precision, calibrated, served),
        "weights_version": weights,
        "precision": precision,  # of model.onnx; model.pt is always the float network
        "calibration": calibration,  # baked into model.onnx; model.pt gives raw logits
        "metrics": test_metrics(report),
        "abstain_threshold": abstain_threshold(report),
        "serve": dataclasses.asdict(serve),
        "card": card,
    }
    if decision_gain is not None:  # else the most probable class (BentoML metadata has no null)
        # How the service turns probabilities into an answer, as evaluate scored it:
        # vitrine.runtime.decisions.decide's gain matrix, rows and columns in the classes' order.
        info["decision_gain"] = decision_gain.tolist()
    return info


def answers(info: dict[str, Any]) -> str:
    """How the packaged model turns probabilities into an answer, in words."""
    if "decision_gain" not in info:
        return "the most probable class"
    gain = ", ".join(f"[{', '.join(f'{g:g}' for g in row)}]" for row in info["decision_gain"])
    return f"the class of highest expected gain (rows actual, columns answered: {gain})"


def runs_as(info: dict[str, Any]) -> str:
    """model.onnx's precision, in words (models packaged before int8 were all float)."""
    if info.get("precision", FP32) == FP32:
        return "model.onnx in float (fp32), as model.pt"
    return (
        f"model.onnx quantized to {info['precision']} (weights {info['weights_version']}; "
        "model.pt holds them in float); its scores are the quantized model's"
    )


def calibration_of(record: dict[str, Any]) -> dict[str, Any]:
    """The probability calibration a served.json or model.json records; models served before
    calibration existed record none, and were not calibrated."""
    return record.get("calibration", {"method": "none"})


def calibrated_as(info: dict[str, Any]) -> str:
    """How model.onnx's probabilities were calibrated (vitrine.evaluation.calibration), in words."""
    calibration = calibration_of(info)
    if calibration["method"] == "none":
        return "the network's softmax, uncalibrated"
    bias = ", ".join(f"{c} {b:+.3f}" for c, b in calibration["bias"].items())
    return (
        f"calibrated on val ({calibration['method']}): softmax(logits / "
        f"{calibration['temperature']:.3f} + bias), bias {bias}"
    )


def model_card(info: dict[str, Any]) -> str:
    """model_card.md: the model, how to feed it, how well it did and what made it."""
    scalars = {k: v for k, v in info["metrics"].items() if isinstance(v, int | float)}
    card = info["card"]
    lines = [
        f"# Model card: {info['model_version']}",
        "",
        f"- Architecture: {info['model']} (candidate {info['candidate']})",
        f"- Classes (output order): {', '.join(info['classes'])}",
        f"- Input: uint8 RGB (N, {info['image_size']}, {info['image_size']}, 3) from "
        f"vitrine.images.load_square; the model resizes to {info['input_size']} px and "
        "normalises inside",
        f"- Runs as: {runs_as(info)}",
        f"- Probabilities: {calibrated_as(info)}",
        f"- Answers with {answers(info)}; abstains below confidence {info['abstain_threshold']:g}",
        f"- Data: {card['data']['path']} (md5 {card['data']['md5']} in dvc.lock)",
        f"- Code: git revision {card['git_revision']}",
        "",
        "## Test metrics",
        "",
        *(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in scalars.items()),
        "",
        "## Params",
        "",
        "```yaml",
        yaml.safe_dump(card["params"], sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_package(
    out_dir: Path, model_bytes: bytes, onnx_bytes: bytes, info: dict[str, Any]
) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / SCRIPTED_MODEL_FILE).write_bytes(model_bytes)
    (out_dir / ONNX_MODEL_FILE).write_bytes(onnx_bytes)
    (out_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (out_dir / MODEL_CARD_FILE).write_text(model_card(info))


def export_package(
    model_dir: Path,
    served_dir: Path,
    evaluate_report: Path,
    out_dir: Path,
    serve: ServeConfig,
    card: dict[str, Any],
    decision_gain: np.ndarray | None,
) -> dict[str, Any]:
    """Checkpoint and served model -> <out_dir>/model.pt, model.onnx, model.json,
    model_card.md; returns model.json's content.

    model_dir is <paths.model>/<candidate>: its name is the candidate's. served_dir is
    <paths.served>/<candidate>, the model.onnx evaluate scored (vitrine.model.export.write_served),
    shipped as it is. decision_gain: the value model's ValueModel.decision_gain(), which the
    service decides with.
    """
    trained = read_trained(model_dir)
    predictor = load_predictor(model_dir / CHECKPOINT, trained)
    scripted = script_predictor(predictor, trained.image_size)
    model_bytes = serialize(scripted)
    onnx_bytes, record = read_served(served_dir, model_dir / CHECKPOINT)
    report = json.loads(evaluate_report.read_text())
    weights = weights_version(predictor, trained)
    info = package_info(
        trained, model_dir.name, weights, record, onnx_bytes, report, serve, card, decision_gain
    )
    write_package(out_dir, model_bytes, onnx_bytes, info)
    return info


def store_labels(info: dict[str, Any]) -> dict[str, str]:
    """BentoML labels (strings only): the model, its classes and its scalar test metrics."""
    labels = {
        "model": info["model"],
        "candidate": info["candidate"],
        "classes": ",".join(info["classes"]),
    }
    for key, value in info["metrics"].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            labels[key] = f"{value:.4f}" if isinstance(value, float) else str(value)
    return labels


def save_to_store(package_dir: Path, name: str, store: ModelStore | None = None) -> bentoml.Tag:
    """Save the package folder as model `<name>:<model_version>`; returns its bentoml Tag.

    `store`: None means the one in $BENTOML_HOME. An existing model of the same version is
    replaced, so that it becomes :latest again.
    """
    info = json.loads((package_dir / MODEL_INFO_FILE).read_text())
    tag = bentoml.Tag(name, info["model_version"])
    where = {} if store is None else {"_model_store": store}
    with contextlib.suppress(NotFound):
        bentoml.models.delete(tag, **where)
    with bentoml.models.create(
        tag, labels=store_labels(info), metadata=copy.deepcopy(info), **where
    ) as model:
        for filename in PACKAGE_FILES:
            shutil.copy2(package_dir / filename, model.path_of(filename))
    return model.tag


def champion_folder(name: str, store: ModelStore | None = None) -> Path | None:
    """The folder of <name>:latest in the model store (the deployed model), None if none."""
    where = {} if store is None else {"_model_store": store}
    try:
        return Path(bentoml.models.get(f"{name}:latest", **where).path)
    except NotFound:
        return None


def describe(folder: Path) -> Contender:
    """A packaged model folder as a contender, not yet scored."""
    info = json.loads((folder / MODEL_INFO_FILE).read_text())
    return Contender(
        model_version=str(info["model_version"]),
        weights=str(info.get("weights_version", info["model_version"])),  # before int8: equal
        model=str(info["model"]),
        candidate=str(info.get("candidate", UNKNOWN)),  # models packaged before candidates
        classes=tuple(str(c) for c in info["classes"]),
        image_size=int(info["image_size"]),
        scores=None,
        servable=(folder / ONNX_MODEL_FILE).is_file(),
    )


def packaged_scores(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    config: EvaluateConfig,
    values: metrics.ValueModel,
    role: str,
) -> dict[str, float]:
    """The packaged model's scalar scores on the photos, computed as the service computes them:
    its probabilities under ONNX Runtime, answered by the decision rule in its own model.json
    (a champion packaged before another rule keeps its own), valued by the current value model."""
    served = read_package_info(folder)
    model = folder / ONNX_MODEL_FILE
    proba = onnx_proba(model, served.input_size, images, config.batch_size, f"test {role}")
    answers = decide_answers(proba, served.decision_gain)
    return metrics.scalar_scores(
        metrics.scores(labels, proba, values, config.top_k, config.taxonomy, answers)
    )


def challenge(
    challenger_dir: Path, champion_dir: Path | None, prepared: Path, config: EvaluateConfig
) -> dict[str, Any]:
    """promotion.json: the packaged challenger against the champion's folder (None: none yet),
    both scored on the prepared test photos with evaluate's primary metric and value model."""
    values = check_config(config)
    images, labels = labelled_split(prepared, "test", config.classes)
    challenger = describe(challenger_dir)
    if challenger.classes != config.classes or challenger.image_size != images.shape[1]:
        raise ValueError(
            f"{challenger_dir}: the challenger takes {challenger.image_size} px images of "
            f"{list(challenger.classes)}, not the prepared ones: rerun train and evaluate"
        )
    scored = packaged_scores(challenger_dir, images, labels, config, values, "challenger")
    challenger = dataclasses.replace(challenger, scores=scored)
    champion = describe(champion_dir) if champion_dir else None
    if champion_dir and champion and not_comparable(challenger, champion) is None:
        scored = packaged_scores(champion_dir, images, labels, config, values, "champion")
        champion = dataclasses.replace(champion, scores=scored)
    metric, margin = config.primary_metric, config.promote_margin
    decision = decide(challenger, champion, metric, margin)
    return promotion_record(decision, challenger, champion, metric, margin, len(labels))


def serve_settings(params: dict[str, Any], candidate: str) -> ServeConfig:
    """The serve: block as `candidate` is served: its by_candidate entry over the shared keys.

    Serving settings follow the network: a compute-bound one serves best from one process with a
    fair queue, a small one from a process per core (README "Serving").
    """
    block = dict(params["serve"])
    by_candidate = block.pop("by_candidate", None) or {}
    unknown = sorted(set(by_candidate) - set(params["candidates"]))
    if unknown:
        raise ConfigError(f"serve.by_candidate: unknown candidate(s) {unknown}")
    overrides = by_candidate.get(candidate) or {}
    return from_mapping(ServeConfig, {**block, **overrides}, f"serve (for {candidate})")


def keep_champion(champion_dir: Path, out_dir: Path, serve: ServeConfig) -> bool:
    """The champion's files into the package folder (the DVC output is the deployed model), its
    model.json under `serve` (the current serve: block for its candidate): serving limits are
    deployment settings, and a change to them must reach the deployed model even when no new
    model wins. Returns whether the block changed, i.e. whether the stored champion must be
    saved again."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    for filename in PACKAGE_FILES:
        shutil.copy2(champion_dir / filename, out_dir / filename)
    info = json.loads((out_dir / MODEL_INFO_FILE).read_text())
    current = dataclasses.asdict(serve)
    if info.get("serve") == current:
        return False
    info["serve"] = current
    (out_dir / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return True


def build_bento(bentofile: Path, build_ctx: Path) -> bentoml.Tag:
    """Build the Bento (the service code, pinned to the stored model it loads) in $BENTOML_HOME."""
    return bentoml.bentos.build_bentofile(str(bentofile), build_ctx=str(build_ctx)).tag


def main() -> None:
    params = load_params()
    cfg = stage_config(PackageConfig, "package", params)
    evaluation = load_config(params)
    paths = load_paths(params)
    os.environ.setdefault("BENTOML_HOME", str(Path.cwd() / ".bentoml"))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    os.environ[MODEL_NAME_ENV] = cfg.model_name  # read by the service when the Bento is built
    card = provenance(params, paths.prepared, Path.cwd())
    winner = json.loads(paths.evaluate_report.read_text())["winner"]
    serve = serve_settings(params, winner)
    gain = check_config(evaluation).decision_gain()
    info = export_package(
        paths.model / winner,
        paths.served / winner,
        paths.evaluate_report,
        paths.package,
        serve,
        card,
        gain,
    )
    champion = champion_folder(cfg.model_name)
    promotion = challenge(paths.package, champion, paths.prepared, evaluation)
    print(f"package: {'promoted' if promotion['promoted'] else 'kept'}: {promotion['reason']}")
    if promotion["promoted"]:
        tag = save_to_store(paths.package, cfg.model_name)
        print(f"package: saved model {tag} ({info['model']}, {len(info['classes'])} classes)")
    else:  # a champion is kept: there was one
        kept = serve_settings(params, describe(champion).candidate)
        if keep_champion(champion, paths.package, kept):
            tag = save_to_store(paths.package, cfg.model_name)  # the same version, replaced
            print(f"package: saved model {tag} again under the current serve: settings")
    if cfg.build_bento:  # also when kept: the service code may be what changed
        print(f"package: built Bento {build_bento(BENTOFILE, Path.cwd())}")
    paths.promotion.parent.mkdir(parents=True, exist_ok=True)
    paths.promotion.write_text(json.dumps(promotion, indent=2) + "\n")


if __name__ == "__main__":
    main()
