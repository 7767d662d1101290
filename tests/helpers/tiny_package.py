"""A tiny untrained cnn64, packaged by the package stage's code into a throwaway BentoML store:
the model the service tests and the soak benchmark serve (its answers are not meant to be good).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning
import numpy as np
import torch
from bentoml._internal.models import ModelStore

from tests.helpers.candidates import PROVENANCE, evaluation_report, serve_checkpoint
from vitrine.contracts import ServeConfig
from vitrine.model.networks import ImageClassifier
from vitrine.packaging.bundle import export_package
from vitrine.packaging.store import save_to_store

CLASSES = ["laptop", "phone"]


def package_tiny_model(
    root: Path,
    serve: ServeConfig,
    decision_gain: np.ndarray | None = None,
    model_name: str | None = None,
    value_gain: np.ndarray | None = None,
    review_cost: float = 0.0,
    classes: Sequence[str] = CLASSES,
) -> Path:
    """An untrained checkpoint (seed 0) through the package stage -> <root>/package (returned),
    saved as `model_name` into a model store at <root>/home (BENTOML_HOME) when one is given;
    value_gain and review_cost: the value model the review queue weighs answers with."""
    torch.manual_seed(0)
    module = ImageClassifier("cnn64", list(classes), lr=1e-3)
    train = root / "train"
    train.mkdir(parents=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        train / "best.ckpt",
    )
    info = {"model": "cnn64", "classes": list(classes), "image_size": 128, "input_size": 64}
    (train / "model.json").write_text(json.dumps(info))
    served = serve_checkpoint(train, root / "served")
    report = evaluation_report({"accuracy": 0.5, "n": 2})
    export_package(
        train,
        served,
        report,
        root / "package",
        serve,
        PROVENANCE,
        decision_gain,
        value_gain,
        review_cost,
    )
    if model_name is not None:
        models = root / "home" / "models"
        models.mkdir(parents=True)
        save_to_store(root / "package", model_name, store=ModelStore(models))
    return root / "package"
