"""Challenger against champion: does evaluate's winner replace the deployed model?

The champion is the model the service loads now (<package.model_name>:latest in the BentoML
store); the challenger is evaluate's winner. package scores both on the same test photos with
evaluate's primary metric and value model; the challenger replaces the champion only when it
scores at least `evaluate.promote_margin` higher, so a retrain that is better only by noise
does not churn the deployment. With an other class (params.yaml other_class) both are also
scored on the open set (vitrine.evaluation.openset, under each one's own decision rule): the
challenger must not catch fewer off-category test photos, nor call more known ones other, than
the champion by more than `evaluate.open_set_max_loss`. `decide` is the pure decision;
`challenge` scores both packaged folders as the service would run them and returns
promotion.json's record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrine.contracts import ONNX_MODEL_FILE, ContenderSummary, PromotionRecord, read_packaged
from vitrine.data.layout import labelled_split
from vitrine.evaluation import metrics
from vitrine.evaluation.openset import KNOWN_AS_OTHER, RECALL, scalar_open_set
from vitrine.evaluation.settings import EvaluateConfig, check_config
from vitrine.runtime.decisions import answer
from vitrine.runtime.decisions import decide as decide_answers
from vitrine.runtime.onnx import onnx_proba

# Score differences below this are float noise, not a reason to refuse a promotion.
TOLERANCE = 1e-12


@dataclass(frozen=True)
class Contender:
    """A packaged model and its scalar test scores (None: not comparable, so not scored)."""

    model_version: str
    weights: str  # its weights' version: equal for the same network, whatever its precision
    model: str  # the architecture, e.g. cnn64
    candidate: str  # the params `candidates` entry it was trained as
    classes: tuple[str, ...]
    image_size: int  # side of the square uint8 images it takes
    scores: dict[str, float | int] | None
    servable: bool = True  # packaged with model.onnx, which the service runs
    resize: str = "squeeze"  # how a photo becomes its square (vitrine.images.RESIZE_MODES)

    def summary(self, metric: str) -> ContenderSummary:
        return ContenderSummary(
            model_version=self.model_version,
            weights=self.weights,
            model=self.model,
            candidate=self.candidate,
            score=self.scores[metric] if self.scores else None,
            scores=self.scores,
        )


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def not_comparable(challenger: Contender, champion: Contender) -> str | None:
    """Why the champion cannot be scored on the challenger's test photos, if it cannot."""
    if not champion.servable:
        return (
            f"the champion {champion.model_version} was packaged before model.onnx, which the "
            "service runs, so it can be neither scored nor served"
        )
    if champion.classes != challenger.classes:
        return (
            f"the champion {champion.model_version} predicts other classes "
            f"({len(champion.classes)}: {list(champion.classes)[:5]}...) than the challenger "
            f"({len(challenger.classes)}), so no score compares them"
        )
    if champion.image_size != challenger.image_size:
        return (
            f"the champion {champion.model_version} takes {champion.image_size} px images, the "
            f"prepared test photos are {challenger.image_size} px, so no score compares them"
        )
    if champion.resize != challenger.resize:
        return (
            f"the champion {champion.model_version} takes photos made square by {champion.resize},"
            f" the prepared test photos by {challenger.resize}, so no score compares them"
        )
    return None


def open_set_loss(
    challenger: dict[str, float | int], champion: dict[str, float | int], max_loss: float
) -> str | None:
    """Why the challenger is worse on the open set than the champion by more than `max_loss`
    (fewer off-category photos caught, or more known photos called other), if it is; None
    when it is not, or when either lacks the figures."""
    if RECALL in challenger and RECALL in champion:
        new, old = float(challenger[RECALL]), float(champion[RECALL])
        if new < old - max_loss - TOLERANCE:
            return (
                f"challenger {RECALL} {new:.4f}, champion {old:.4f}, more than {max_loss:g} lower"
            )
    if KNOWN_AS_OTHER in challenger and KNOWN_AS_OTHER in champion:
        new, old = float(challenger[KNOWN_AS_OTHER]), float(champion[KNOWN_AS_OTHER])
        if new > old + max_loss + TOLERANCE:
            return (
                f"challenger {KNOWN_AS_OTHER} {new:.4f}, champion {old:.4f}, more than "
                f"{max_loss:g} higher"
            )
    return None


def decide(
    challenger: Contender,
    champion: Contender | None,
    metric: str,
    margin: float,
    open_set_max_loss: float = 0.0,
) -> Decision:
    """Promote when there is no comparable champion or the challenger wins by `margin`, and,
    when both have open-set figures, loses on neither by more than `open_set_max_loss`."""
    if champion is None:
        return Decision(True, "no champion in the model store: the challenger is the first model")
    if champion.model_version == challenger.model_version:
        return Decision(
            True,
            f"the challenger is the champion's model ({champion.model_version}, same weights): "
            "packaged again so the current serve settings and abstain threshold apply",
        )
    if champion.weights == challenger.weights:
        # The same network served otherwise (int8, its probabilities recalibrated, or back to
        # float): not a retrain that needs the margin to prove itself; evaluate ships int8 only
        # when it holds up on val.
        return Decision(
            True,
            f"the challenger {challenger.model_version} runs the champion's weights "
            f"({champion.weights}, deployed as {champion.model_version}), exported as evaluate "
            "scored it (precision, int8 calibration, calibrated probabilities)",
        )
    if champion.scores is None or challenger.scores is None:
        reason = not_comparable(challenger, champion) or "the champion was not scored"
        return Decision(True, reason + ": the challenger replaces it")
    new, old = challenger.scores[metric], champion.scores[metric]
    figures = f"challenger {metric} {new:.4f}, champion {old:.4f}, margin {margin:g}"
    if new < old + margin - TOLERANCE:
        return Decision(
            False, f"{figures}: the challenger does not win by the margin; champion kept"
        )
    worse = open_set_loss(challenger.scores, champion.scores, open_set_max_loss)
    if worse:
        return Decision(False, f"{figures}, but on the open set {worse}: the champion is kept")
    return Decision(True, f"{figures}: the challenger wins by at least the margin")


def promotion_record(
    decision: Decision,
    challenger: Contender,
    champion: Contender | None,
    metric: str,
    margin: float,
    test_photos: int,
) -> PromotionRecord:
    """promotion.json: the decision, why, and the figures it rests on."""
    return PromotionRecord(
        promoted=decision.promoted,
        reason=decision.reason,
        metric=metric,
        margin=margin,
        test_photos=test_photos,
        challenger=challenger.summary(metric),
        champion=champion.summary(metric) if champion else None,
    )


def describe(folder: Path) -> Contender:
    """A packaged model folder as a contender, not yet scored."""
    info = read_packaged(folder)
    return Contender(
        model_version=info.model_version,
        weights=info.weights,
        model=info.model,
        candidate=info.candidate,
        classes=info.classes,
        image_size=info.image_size,
        scores=None,
        servable=(folder / ONNX_MODEL_FILE).is_file(),
        resize=info.resize,
    )


def packaged_scores(
    folder: Path,
    images: np.ndarray,
    labels: np.ndarray,
    config: EvaluateConfig,
    values: metrics.ValueModel,
    role: str,
) -> dict[str, float | int]:
    """The packaged model's scalar scores on the photos, computed as the service computes them:
    its probabilities under ONNX Runtime, answered by the decision rule in its own model.json
    (a champion packaged before another rule keeps its own), valued by the current value model;
    with an other class, its open-set shares under that rule's thresholds and back-off too."""
    served = read_packaged(folder)
    model = folder / ONNX_MODEL_FILE
    proba = onnx_proba(model, served.input_size, images, config.batch_size, f"test {role}")
    answers = decide_answers(proba, served.gain)
    scores = metrics.scalar_scores(
        metrics.scores(labels, proba, values, config.top_k, config.taxonomy, answers)
    )
    open_set = scalar_open_set(labels, answer(proba, served.rule), served.rule, config.other_class)
    return scores | open_set


def challenge(
    challenger_dir: Path, champion_dir: Path | None, prepared: Path, config: EvaluateConfig
) -> PromotionRecord:
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
    decision = decide(challenger, champion, metric, margin, config.open_set_max_loss)
    return promotion_record(decision, challenger, champion, metric, margin, len(labels))
