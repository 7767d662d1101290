"""Challenger against champion: does evaluate's winner replace the deployed model?

The champion is the model the service loads now (<package.model_name>:latest in the BentoML
store); the challenger is evaluate's winner. package scores both on the same test photos with
evaluate's primary metric and value model; the challenger replaces the champion only when it
scores at least `evaluate.promote_margin` higher, so a retrain that is better only by noise
does not churn the deployment. Pure decisions here; package does the scoring and the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    scores: dict[str, float] | None
    servable: bool = True  # packaged with model.onnx, which the service runs

    def summary(self, metric: str) -> dict[str, Any]:
        return {
            "model_version": self.model_version,
            "weights": self.weights,
            "model": self.model,
            "candidate": self.candidate,
            "score": self.scores[metric] if self.scores else None,
            "scores": self.scores,
        }


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
    return None


def decide(
    challenger: Contender, champion: Contender | None, metric: str, margin: float
) -> Decision:
    """Promote when there is no comparable champion or the challenger wins by `margin`."""
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
    if new >= old + margin - TOLERANCE:
        return Decision(True, f"{figures}: the challenger wins by at least the margin")
    return Decision(False, f"{figures}: the challenger does not win by the margin; champion kept")


def promotion_record(
    decision: Decision,
    challenger: Contender,
    champion: Contender | None,
    metric: str,
    margin: float,
    test_photos: int,
) -> dict[str, Any]:
    """promotion.json: the decision, why, and the figures it rests on."""
    return {
        "promoted": decision.promoted,
        "reason": decision.reason,
        "metric": metric,
        "margin": margin,
        "test_photos": test_photos,
        "challenger": challenger.summary(metric),
        "champion": champion.summary(metric) if champion else None,
    }
