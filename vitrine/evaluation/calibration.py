"""Post-hoc calibration: logits -> logits / temperature + bias, fitted on the val photos.

The expected-value decision (vitrine.runtime.decisions) is the Bayes answer only for
probabilities that mean what they say, and the abstain threshold and the service's confidences
read them too. A fine-tuned network's are not: label smoothing and CutMix soften them,
inverse-frequency loss weights tilt them towards the rarer class. Two fixes, both fitted by
minimising the val negative log-likelihood:

- `temperature`: one scalar divides the logits (Guo et al. 2017). It sharpens or softens every
  answer alike and never changes which class is most probable.
- `temperature_bias`: the same plus one bias per class (bias-corrected temperature scaling,
  Alexandari et al. 2020), which also undoes a tilt in the class priors. k + 1 parameters, so
  for many classes with few val photos each, `temperature` is the safer choice.

evaluate bakes the fitted map into the served ONNX graph (vitrine/model/export.py), so the service,
package's scoring and evaluate all compute the same calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CALIBRATIONS = ("none", "temperature", "temperature_bias")
LBFGS_STEPS = 200  # a convex fit of k + 1 parameters converges in a few dozen


@dataclass(frozen=True)
class Calibration:
    temperature: float
    bias: tuple[float, ...]  # one per class, centred (a common shift changes no probability)


def check_method(method: str) -> None:
    if method not in CALIBRATIONS:
        raise ValueError(f"evaluate.calibration must be one of {CALIBRATIONS}, got {method!r}")


def fit_calibration(logits: np.ndarray, labels: np.ndarray, method: str) -> Calibration | None:
    """The calibration of `method` that minimises the negative log-likelihood of `labels`
    under (n, k) `logits` (log-probabilities do as well: a per-row shift changes nothing);
    None for "none"."""
    check_method(method)
    if method == "none":
        return None
    z = torch.tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    # log(temperature), so it stays positive without constraints; zero is the identity
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=method == "temperature_bias")
    fitted = [log_t, bias] if bias.requires_grad else [log_t]
    optimizer = torch.optim.LBFGS(fitted, max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp() + bias, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    centred = (bias - bias.mean()).detach()
    return Calibration(log_t.detach().exp().item(), tuple(float(b) for b in centred))
