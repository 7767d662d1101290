"""What passes between stages: every artefact's file name and typed contract, defined once.

Each contract is a frozen pydantic dataclass (vitrine.config.params_block: unknown keys are
refused) with one function that writes it and one that reads it back:

- train     -> <paths.model>/<candidate>/     best.ckpt + model.json      TrainedModel
- evaluate  -> <paths.served>/<candidate>/    model.onnx + served.json    ServedRecord
- evaluate  -> <paths.evaluate_report>        evaluate.json               EvaluationReport
- package   -> <paths.package>/               model.pt, model.onnx, model.json (PackagedModel),
                                              model_card.md
- package   -> <paths.promotion>              promotion.json              PromotionRecord

The prepared splits (prepare -> train, evaluate, package) are packed arrays with a manifest,
named by vitrine.data.splits; the collected and deduped photos are vitrine.data.shards' tables.
The Bento carries no params.yaml: package copies the `serve:` block (ServeConfig) and the
abstain threshold evaluate chose into the packaged model.json, and the service reads them back
from there, so the deployed model runs under the limits of the last `dvc repro package`.
"""

from __future__ import annotations

import json
from dataclasses import field
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

import numpy as np
import pydantic

from vitrine.config import Count, NonNegative, NonNegativeInt, params_block
from vitrine.runtime import decisions

T = TypeVar("T")

# The model the service loads from the BentoML store, as `<name>:latest`.
MODEL_NAME_ENV = "VITRINE_MODEL_NAME"
DEFAULT_MODEL_NAME = "vitrine-classifier"

CHECKPOINT = "best.ckpt"  # train: the best epoch's Lightning checkpoint
MODEL_INFO_FILE = "model.json"  # train's TrainedModel; package's PackagedModel
SERVED_INFO_FILE = "served.json"  # evaluate: beside model.onnx, how it is served
SCRIPTED_MODEL_FILE = "model.pt"  # TorchScript: the framework's portable export
ONNX_MODEL_FILE = "model.onnx"  # what the service runs (vitrine.runtime.onnx)
MODEL_CARD_FILE = "model_card.md"
PACKAGE_FILES = (SCRIPTED_MODEL_FILE, ONNX_MODEL_FILE, MODEL_INFO_FILE, MODEL_CARD_FILE)

FP32: Final = "fp32"
INT8: Final = "int8"
Precision = Literal["fp32", "int8"]
UNKNOWN = "unknown"  # BentoML metadata refuses None: what no dvc.lock or git checkout gives


def as_dict(contract: Any) -> dict[str, Any]:
    """A contract as the plain JSON data its file holds."""
    return pydantic.TypeAdapter(type(contract)).dump_python(contract, mode="json")


def write_json(contract: Any, path: Path) -> None:
    """A contract as indented JSON, in its fields' order (the one writer of every record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_dict(contract), indent=2) + "\n")


def read_json(cls: type[T], path: Path) -> T:
    """A contract back from its JSON, refused with the file named when it does not match."""
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        return pydantic.TypeAdapter(cls).validate_json(path.read_bytes())
    except pydantic.ValidationError as error:
        raise ValueError(f"{path} is not a valid {cls.__name__}: {error}") from None


# --- train ------------------------------------------------------------------------------------


@params_block
class TrainedModel:
    """What train writes beside its checkpoint: what a consumer needs to feed it."""

    model: str  # a key of vitrine.model.networks.MODELS
    classes: tuple[str, ...]
    image_size: int  # side of the prepared square arrays: what the Predictor is fed
    input_size: int  # the network's own input side (the Predictor resizes to it)
    resize: str = "squeeze"  # how prepare made the squares (vitrine.images.RESIZE_MODES)


def write_trained(trained: TrainedModel, folder: Path) -> None:
    write_json(trained, folder / MODEL_INFO_FILE)


def read_trained(folder: Path) -> TrainedModel:
    return read_json(TrainedModel, folder / MODEL_INFO_FILE)


# --- evaluate -----------------------------------------------------------------------------------


@params_block
class Int8Trial:
    """How int8 fared against the float model on val (evaluate.int8 candidates)."""

    metric: str  # evaluate.primary_metric
    val_fp32: float
    val_int8: float  # the last int8 model tried
    val_answers_changed: int  # val photos answered otherwise by int8
    float_strides: tuple[int, ...]  # convolution output strides kept in float
    calibration_photos: int  # train photos that set the activation ranges


@params_block
class ServedRecord:
    """served.json: how a candidate's model.onnx is served, and which checkpoint it came from."""

    precision: Precision
    checkpoint_sha256: str
    # vitrine.evaluation.calibration's fit baked into model.onnx: method, temperature, bias
    # per class and val log losses; {"method": "none"}: the network's softmax.
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    int8: Int8Trial | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration.get("method", "none") != "none"


def write_served(folder: Path, model: bytes, record: ServedRecord) -> None:
    """<folder>/model.onnx and served.json: a candidate as the service would run it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ONNX_MODEL_FILE).write_bytes(model)
    write_json(record, folder / SERVED_INFO_FILE)


def read_served(folder: Path) -> tuple[bytes, ServedRecord]:
    if not (folder / SERVED_INFO_FILE).is_file():
        raise ValueError(f"{folder / SERVED_INFO_FILE} is missing: run `dvc repro evaluate`")
    return (folder / ONNX_MODEL_FILE).read_bytes(), read_json(
        ServedRecord, folder / SERVED_INFO_FILE
    )


@params_block
class ReviewedScores:
    """The winner on the test photos moderators labelled in production (the reviewed catalog
    pipeline/feedback.py exports), on their own: production photos are not the catalog's."""

    source: str = ""  # their manifest source, catalog:<feedback.catalog> ("": none configured)
    n: int = 0  # test photos from it; 0: the scores are null
    accuracy: float | None = None
    business_weighted_accuracy: float | None = None  # null too when they are worth nothing


@params_block
class EvaluationReport:
    """evaluate.json: the winner on val, its scores, calibration and abstain threshold."""

    winner: str
    primary_metric: str
    decision: str  # argmax | expected_value
    ranking: tuple[str, ...]  # candidates, best first
    business_values: str  # "params" or the CSV they came from
    val: dict[str, float]  # the winner's scalar val scores
    test: dict[str, Any]  # the winner's test scores (vitrine.evaluation.metrics.scores)
    calibration: dict[str, Any]  # expected calibration error on val and test
    abstain: dict[str, Any]  # threshold (0.0: never) and what it does on val and test
    served: dict[str, ServedRecord]  # per candidate
    # The winner on the reviewed production photos among the test photos (a default: reports
    # written before the figure existed still load).
    reviewed: ReviewedScores = field(default_factory=ReviewedScores)
    # The winner's test accuracy and value per slice of photos (vitrine.evaluation.slices).
    slices: dict[str, Any] = field(default_factory=dict)
    # The decision rule fitted on val (vitrine.evaluation.thresholds.decision_report): the
    # threshold of each class, the taxonomy back-off, each rule's expected value on val and
    # test, and the test answers per taxonomy level. {}: a report written before it existed.
    decisions: dict[str, Any] = field(default_factory=dict)
    # With an other class (params.yaml other_class): the served rule on the held-out
    # off-category and known photos (vitrine.evaluation.openset.open_set_report). {}: no other
    # class, and the file has no such key.
    open_set: dict[str, Any] = field(default_factory=dict)

    @property
    def abstain_threshold(self) -> float:
        return float(self.abstain["threshold"])

    def class_thresholds(self, classes: tuple[str, ...]) -> tuple[float, ...]:
        """The fitted threshold of each class, in `classes` order; () when the report has none
        (every class then answers from abstain_threshold)."""
        fitted = self.decisions.get("class_thresholds") or {}
        if not fitted:
            return ()
        missing = [c for c in classes if c not in fitted]
        if missing:
            raise ValueError(f"evaluate.json has no threshold for class(es) {missing[:10]}")
        return tuple(float(fitted[c]["threshold"]) for c in classes)


def write_evaluation(report: EvaluationReport, path: Path) -> None:
    """evaluate.json; without an other class, no `open_set` key (the two-class report as is)."""
    data = as_dict(report)
    if not data["open_set"]:
        del data["open_set"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_evaluation(path: Path) -> EvaluationReport:
    return read_json(EvaluationReport, path)


# --- package ------------------------------------------------------------------------------------


@params_block
class RecordConfig:
    """params.yaml `serve.record:`, how the service records its answers (vitrine.production).

    Every key has a default, so that a model packaged before recording existed still loads (and
    records with these settings). VITRINE_RECORD_URL, when set, replaces `url` at serve time.
    """

    enabled: bool = True  # false: nothing is recorded (answers still carry their request_id)
    # SQLAlchemy URL of the answers database: SQLite for one host, PostgreSQL
    # (postgresql://user:password@host/db) for several workers or hosts. Relative SQLite paths
    # are from the service's working directory.
    url: str = "sqlite:///data/production/answers.sqlite"
    spool: str = "data/production/spool"  # local folder of the not yet written records
    photos: str = "data/production/photos"  # uploaded photos, <photos>/<sha[:2]>/<sha256>
    keep_photos_days: float = 90.0  # a photo unseen for longer is deleted (0: no age limit)
    keep_photos_bytes: int = 50_000_000_000  # over this, the least recently seen go first (0: none)
    sweep_every_s: float = 3600.0  # how often the photo folder is checked against both limits
    flush_every_s: float = 0.5  # how often the spooled records are written to the database
    batch_rows: int = 1000  # records per database transaction


@params_block
class ServeConfig:
    """params.yaml `serve:` (with the candidate's by_candidate entry), copied into model.json."""

    max_upload_bytes: Count  # one photo; a larger upload is refused with a 413
    max_pixels: Count  # width x height, checked from the header before anything is decoded
    min_side: Count  # shorter side in pixels
    max_batch_images: Count  # image parts in one /classify_batch request
    max_batch_bytes: Count  # the whole /classify_batch request body
    max_batch_size: Count  # adaptive batching: most images in one forward pass
    max_batch_wait_ms: NonNegative  # adaptive batching: how long a lone image waits for company
    workers: Count  # serving processes, each with its own copy of the model
    torch_threads: Count  # intra-op threads of each worker's forward pass (ONNX Runtime's too)
    # Forward passes running at once in a worker, a thread each. A default, unlike the others:
    # a stored model packaged before it existed still loads (and runs one pass at a time) until
    # the next `dvc repro package` writes the current serve: block into it.
    concurrent_batches: Count = 1
    # With workers > 1: each worker ends one keep-alive connection in this many responses, so
    # that clients reconnect to the least busy worker (service/rebalance.py); 0: never. A
    # default for the same reason as concurrent_batches.
    rebalance_every: NonNegativeInt = 0
    # Every answer's record (vitrine.production); a default for the same reason.
    record: RecordConfig = field(default_factory=RecordConfig)


@params_block
class Provenance:
    """What made a packaged model: params, data version, code revision."""

    params: dict[str, Any]  # params.yaml's classes, prepare, train and evaluate blocks
    data: dict[str, str]  # path and md5 (dvc.lock) of the prepared data
    git_revision: str


@params_block
class BackoffLevel:
    """A taxonomy level an answer too unsure for its class backs off to (decisions.answer)."""

    level: int  # 1 = coarsest
    value_share: float  # evaluate.taxonomy.level_values: what share of its value a right one earns
    nodes: tuple[str, ...]  # the taxonomy's nodes at this level (Fruit/Apple at level 2)
    node_of: tuple[int, ...]  # each class's node, in the classes' order


@params_block
class PackagedModel:
    """model.json of a packaged model: everything the service needs besides the weights.

    Defaults stand for what models packaged before a field existed were: float, uncalibrated,
    answered by the most probable class, their weights' version their model version.
    """

    model: str
    classes: tuple[str, ...]
    image_size: int  # side of the square vitrine.images.load_square produces
    input_size: int  # the network's input side (vitrine.runtime.network_input resizes to it)
    model_version: str
    abstain_threshold: float  # answers below this confidence abstain (0.0: never)
    serve: ServeConfig
    card: Provenance
    metrics: dict[str, float | int] = field(default_factory=dict)  # the winner's test scores
    candidate: str = UNKNOWN  # the params `candidates` entry it was trained as
    weights_version: str = ""  # equal for the same network, whatever its precision
    precision: Precision = FP32  # of model.onnx; model.pt is always the float network
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    # vitrine.runtime.decisions.decide's gain matrix, rows and columns in the classes' order,
    # as evaluate scored the model; None: the most probable class.
    decision_gain: tuple[tuple[float, ...], ...] | None = None
    # The value model's gain matrix g(a, p) (value on the diagonal, -cost elsewhere; rows actual,
    # columns answered) whatever evaluate.decision is, and evaluate.review_cost: what the review
    # queue weighs a moderator's review with (vitrine.production.queue). Defaults for models
    # packaged before they existed: () unknown, 0.0 no cost.
    value_gain: tuple[tuple[float, ...], ...] = ()
    review_cost: float = 0.0
    # The decision rule's thresholds (vitrine.runtime.decisions): per class, in the classes'
    # order, the probability from which that class is answered, fitted on val; (): models
    # packaged before they existed, whose every class answers from abstain_threshold.
    class_thresholds: tuple[float, ...] = ()
    # The taxonomy's ancestor levels, deepest first, that an answer too unsure for its class
    # backs off to; (): none (flat classes, or a model packaged before back-off existed).
    backoff: tuple[BackoffLevel, ...] = ()
    # The class of photos that are none of the categories (params.yaml other_class): an answer
    # of it never matches a declared category, and the upload page says what it means; "":
    # none (not written to model.json then).
    other_class: str = ""
    # How a photo becomes the image_size square (vitrine.images.RESIZE_MODES), as prepare made
    # the training photos; models packaged before it existed squeezed.
    resize: str = "squeeze"

    @cached_property
    def rule(self) -> decisions.Rule:
        """The decision rule this model answers by: probabilities -> class, ancestor or abstain.
        Built once per loaded model (decisions.rule, as evaluate builds it)."""
        thresholds = self.class_thresholds or (self.abstain_threshold,) * len(self.classes)
        value_gain = np.array(self.value_gain, np.float64) if self.value_gain else None
        return decisions.rule(
            self.classes,
            self.gain,
            thresholds,
            value_gain,
            self.review_cost,
            [(b.level, b.value_share, b.node_of) for b in self.backoff],
            [b.nodes for b in self.backoff],
        )

    @property
    def version(self) -> str:
        return self.model_version

    @property
    def weights(self) -> str:
        return self.weights_version or self.model_version

    @property
    def gain(self) -> np.ndarray | None:
        """decision_gain as the array vitrine.runtime.decisions.decide takes."""
        return None if self.decision_gain is None else np.array(self.decision_gain, np.float64)


def write_packaged(info: PackagedModel, folder: Path) -> None:
    """model.json, without decision_gain when there is none (BentoML metadata has no null),
    nor other_class when there is none."""
    data = as_dict(info)
    if data["decision_gain"] is None:
        del data["decision_gain"]
    if not data["other_class"]:
        del data["other_class"]
    (folder / MODEL_INFO_FILE).write_text(json.dumps(data, indent=2) + "\n")


def read_packaged(folder: Path) -> PackagedModel:
    """model.json of a packaged model folder (the DVC output or the stored BentoML model),
    refused with the file named when its decision rule does not fit its classes."""
    info = read_json(PackagedModel, folder / MODEL_INFO_FILE)
    try:
        info.rule  # noqa: B018 (built now: a bad rule is refused at load, not at the first photo)
    except ValueError as error:
        raise ValueError(f"{folder / MODEL_INFO_FILE}: {error}") from None
    return info


def packaged_metadata(info: PackagedModel) -> dict[str, Any]:
    """model.json as the BentoML store's metadata (the same keys, no nulls)."""
    return {
        k: v
        for k, v in as_dict(info).items()
        if v is not None and not (k == "other_class" and not v)
    }


@params_block
class ContenderSummary:
    """One side of a promotion decision."""

    model_version: str
    weights: str
    model: str
    candidate: str
    score: float | None  # the primary metric on the test photos (None: not comparable)
    scores: dict[str, float | int] | None


@params_block
class PromotionRecord:
    """promotion.json: the decision, why, and the figures it rests on."""

    promoted: bool
    reason: str
    metric: str
    margin: float
    test_photos: int
    challenger: ContenderSummary
    champion: ContenderSummary | None


def write_promotion(record: PromotionRecord, path: Path) -> None:
    write_json(record, path)


def read_promotion(path: Path) -> PromotionRecord:
    return read_json(PromotionRecord, path)
