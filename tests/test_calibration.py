"""Probability calibration: fitted on labelled logits, it recovers the map that made them."""

from __future__ import annotations

import numpy as np
import pytest

from vitrine.evaluation.calibration import Calibration, fit_calibration
from vitrine.evaluation.metrics import log_loss


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def calibrated(logits: np.ndarray, cal: Calibration) -> np.ndarray:
    return softmax(logits / cal.temperature + np.asarray(cal.bias))


def sampled(temperature: float, bias: np.ndarray, n: int = 4000, seed: int = 0):
    """Logits, and labels drawn from softmax(logits / temperature + bias): the calibrated
    probabilities are the true ones."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, len(bias)))
    proba = softmax(logits / temperature + bias)
    labels = np.array([rng.choice(len(bias), p=p) for p in proba])
    return logits, labels


def test_temperature_recovers_overconfident_logits() -> None:
    logits, labels = sampled(2.0, np.zeros(3))
    fitted = fit_calibration(logits, labels, "temperature")
    assert fitted.temperature == pytest.approx(2.0, rel=0.1)
    assert fitted.bias == (0.0, 0.0, 0.0)


def test_temperature_bias_also_recovers_tilted_priors() -> None:
    bias = np.array([0.8, 0.0, -0.8])
    logits, labels = sampled(0.5, bias)
    fitted = fit_calibration(logits, labels, "temperature_bias")
    assert fitted.temperature == pytest.approx(0.5, rel=0.1)
    assert np.allclose(fitted.bias, bias, atol=0.15)
    assert sum(fitted.bias) == pytest.approx(0.0, abs=1e-9)  # centred
    # Without the bias the tilt cannot be undone: a worse fit of the same labels.
    scaled_only = fit_calibration(logits, labels, "temperature")
    assert log_loss(labels, calibrated(logits, fitted)) < log_loss(
        labels, calibrated(logits, scaled_only)
    )


def test_none_fits_nothing_and_unknown_methods_are_refused() -> None:
    logits, labels = sampled(1.0, np.zeros(2), n=10)
    assert fit_calibration(logits, labels, "none") is None
    with pytest.raises(ValueError, match=r"evaluate\.calibration must be one of"):
        fit_calibration(logits, labels, "isotonic")
