"""The package folder: model.pt, model.onnx, model.json and model_card.md of one model.

model.pt is the scripted Predictor (uint8 (N, H, W, 3) -> logits), checked against the eager one
before anything is written; model.onnx is evaluate's served model as it is (the Predictor after
its resize, in float or int8, its probabilities calibrated), what the service runs behind the
same resize; model.json (vitrine.contracts.PackagedModel) what the service needs besides the
weights.

weights_version hashes the weights, classes and sizes, so packaging the same model twice gives
the same version (and makes it :latest again); model_version is it for the plain float export,
and for a quantized or calibrated model.onnx <model>-<precision>-<hash of model.onnx> (int8's
ranges and the probabilities' calibration shape it too).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vitrine.config import ConfigError, from_mapping
from vitrine.contracts import (
    CHECKPOINT,
    FP32,
    MODEL_CARD_FILE,
    ONNX_MODEL_FILE,
    SCRIPTED_MODEL_FILE,
    UNKNOWN,
    BackoffLevel,
    EvaluationReport,
    PackagedModel,
    Provenance,
    ServeConfig,
    ServedRecord,
    TrainedModel,
    as_dict,
    read_trained,
    write_packaged,
)
from vitrine.evaluation import metrics
from vitrine.model.export import max_output_diff, parity_batch, served_for
from vitrine.model.networks import ImageClassifier, Predictor

DVC_LOCK = Path("dvc.lock")
CARD_PARAMS = ("classes", "prepare", "train", "evaluate")  # what made the model, for its card
PARITY_ATOL = 1e-6  # max |scripted - eager| on the logits


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
    digest.update(json.dumps(as_dict(trained), sort_keys=True).encode())
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


def provenance(params: Mapping[str, Any], prepared: Path, repo: Path) -> Provenance:
    """The model card's record of what made the model: params, data version, code revision."""
    md5 = data_version(repo / DVC_LOCK, prepared) or UNKNOWN
    return Provenance(
        params={key: params[key] for key in CARD_PARAMS if key in params},
        data={"path": prepared.as_posix(), "md5": md5},
        git_revision=git_revision(repo) or UNKNOWN,
    )


def serve_settings(params: Mapping[str, Any], candidate: str) -> ServeConfig:
    """The serve: block as `candidate` is served: its by_candidate entry over the shared keys.

    Serving settings follow the network: a compute-bound one serves best from one process with a
    fair queue, a small one from a process per core (the docs' serving guide).
    """
    block = dict(params["serve"])
    by_candidate = block.pop("by_candidate", None) or {}
    unknown = sorted(set(by_candidate) - set(params["candidates"]))
    if unknown:
        raise ConfigError(f"serve.by_candidate: unknown candidate(s) {unknown}")
    overrides = by_candidate.get(candidate) or {}
    return from_mapping(ServeConfig, {**block, **overrides}, f"serve (for {candidate})")


def packaged_model(
    trained: TrainedModel,
    candidate: str,
    weights: str,
    record: ServedRecord,
    served: bytes,
    report: EvaluationReport,
    serve: ServeConfig,
    card: Provenance,
    decision_gain: np.ndarray | None,
    value_gain: np.ndarray | None = None,
    review_cost: float = 0.0,
    backoff: Sequence[BackoffLevel] = (),
) -> PackagedModel:
    """model.json of the package. record: served.json, how evaluate served the model;
    value_gain and review_cost: the value model's, which the review queue and taxonomy back-off
    weigh with; the class thresholds are the report's, backoff the taxonomy's levels
    (vitrine.evaluation.thresholds.backoff_levels), the other class the report's open set's."""
    return PackagedModel(
        model=trained.model,
        classes=trained.classes,
        image_size=trained.image_size,
        input_size=trained.input_size,
        model_version=model_version(weights, record.precision, record.calibrated, served),
        abstain_threshold=report.abstain_threshold,
        serve=serve,
        card=card,
        metrics=metrics.scalar_scores(report.test),
        candidate=candidate,
        weights_version=weights,
        precision=record.precision,
        calibration=record.calibration,
        decision_gain=None if decision_gain is None else tuple(map(tuple, decision_gain.tolist())),
        value_gain=() if value_gain is None else tuple(map(tuple, value_gain.tolist())),
        review_cost=float(review_cost),
        class_thresholds=report.class_thresholds(trained.classes),
        backoff=tuple(backoff),
        other_class=str(report.open_set.get("other_class", "")),
        resize=trained.resize,
    )


def answers(info: PackagedModel) -> str:
    """How the packaged model turns probabilities into an answer, in words."""
    if info.decision_gain is None:
        return "the most probable class"
    gain = ", ".join(f"[{', '.join(f'{g:g}' for g in row)}]" for row in info.decision_gain)
    return f"the class of highest expected gain (rows actual, columns answered: {gain})"


def answered_from(info: PackagedModel) -> str:
    """Below which confidence an answer is not given, and what the photo gets then, in words."""
    shared = info.abstain_threshold
    pairs = zip(info.classes, info.class_thresholds, strict=False)
    own = {c: t for c, t in pairs if t != shared}
    below = f"below confidence {shared:g}"
    if own:
        listed = ", ".join(f"{c} {t:g}" for c, t in list(own.items())[:10])
        more = f" and {len(own) - 10} more" if len(own) > 10 else ""
        below += f" (classes with a threshold of their own: {listed}{more})"
    if info.backoff:
        levels = ", ".join(f"level {b.level} (value share {b.value_share:g})" for b in info.backoff)
        return f"{below} backs off to the taxonomy's {levels} when that pays, else abstains"
    return f"abstains {below}"


def runs_as(info: PackagedModel) -> str:
    """model.onnx's precision, in words."""
    if info.precision == FP32:
        return "model.onnx in float (fp32), as model.pt"
    return (
        f"model.onnx quantized to {info.precision} (weights {info.weights}; "
        "model.pt holds them in float); its scores are the quantized model's"
    )


def calibrated_as(info: PackagedModel) -> str:
    """How model.onnx's probabilities were calibrated (vitrine.evaluation.calibration)."""
    calibration = info.calibration
    if calibration.get("method", "none") == "none":
        return "the network's softmax, uncalibrated"
    bias = ", ".join(f"{c} {b:+.3f}" for c, b in calibration["bias"].items())
    return (
        f"calibrated on val ({calibration['method']}): softmax(logits / "
        f"{calibration['temperature']:.3f} + bias), bias {bias}"
    )


def model_card(info: PackagedModel) -> str:
    """model_card.md: the model, how to feed it, how well it did and what made it."""
    card = info.card
    lines = [
        f"# Model card: {info.model_version}",
        "",
        f"- Architecture: {info.model} (candidate {info.candidate})",
        f"- Classes (output order): {', '.join(info.classes)}",
        *(
            [f"- Off-category photos (none of the categories): answered {info.other_class}"]
            if info.other_class
            else []
        ),
        f"- Input: uint8 RGB (N, {info.image_size}, {info.image_size}, 3) from "
        f"vitrine.images.load_square ({info.resize}); the model resizes to "
        f"{info.input_size} px and normalises inside",
        f"- Runs as: {runs_as(info)}",
        f"- Probabilities: {calibrated_as(info)}",
        f"- Answers with {answers(info)}; {answered_from(info)}",
        f"- Data: {card.data['path']} (md5 {card.data['md5']} in dvc.lock)",
        f"- Code: git revision {card.git_revision}",
        "",
        "## Test metrics",
        "",
        *(
            f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in info.metrics.items()
        ),
        "",
        "## Params",
        "",
        "```yaml",
        yaml.safe_dump(card.params, sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_package(
    out_dir: Path, model_bytes: bytes, onnx_bytes: bytes, info: PackagedModel
) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / SCRIPTED_MODEL_FILE).write_bytes(model_bytes)
    (out_dir / ONNX_MODEL_FILE).write_bytes(onnx_bytes)
    write_packaged(info, out_dir)
    (out_dir / MODEL_CARD_FILE).write_text(model_card(info))


def export_package(
    model_dir: Path,
    served_dir: Path,
    report: EvaluationReport,
    out_dir: Path,
    serve: ServeConfig,
    card: Provenance,
    decision_gain: np.ndarray | None,
    value_gain: np.ndarray | None = None,
    review_cost: float = 0.0,
    backoff: Sequence[BackoffLevel] = (),
) -> PackagedModel:
    """Checkpoint and served model -> <out_dir>/model.pt, model.onnx, model.json,
    model_card.md; returns model.json's content.

    model_dir is <paths.model>/<candidate>: its name is the candidate's. served_dir is
    <paths.served>/<candidate>, the model.onnx evaluate scored, shipped as it is.
    decision_gain: the value model's ValueModel.decision_gain(), which the service decides with;
    value_gain (ValueModel.gain()) and review_cost: what its review queue ranks answers by;
    backoff: the taxonomy levels an unsure answer backs off to.
    """
    trained = read_trained(model_dir)
    predictor = load_predictor(model_dir / CHECKPOINT, trained)
    model_bytes = serialize(script_predictor(predictor, trained.image_size))
    onnx_bytes, record = served_for(served_dir, model_dir / CHECKPOINT)
    weights = weights_version(predictor, trained)
    info = packaged_model(
        trained,
        model_dir.name,
        weights,
        record,
        onnx_bytes,
        report,
        serve,
        card,
        decision_gain,
        value_gain,
        review_cost,
        backoff,
    )
    write_package(out_dir, model_bytes, onnx_bytes, info)
    return info
