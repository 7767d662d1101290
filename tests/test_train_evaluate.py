import numpy as np
import pandas as pd
import pytest
import torch

from stages.evaluate import (
    EvaluateConfig,
    business_weighted_accuracy,
    evaluate,
    predict_proba,
    scores,
)
from stages.train import EarlyStoppingConfig, TrainConfig, model_card, train
from vitrine.data import prepared_manifest_path, split_images_path
from vitrine.models import build_predictor

CLASSES = ("laptop", "phone")


@pytest.fixture
def prepared(tmp_path):
    """A tiny prepared dataset: dark 'laptops' and bright 'phones', 32x32."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        labels = np.arange(n) % 2
        images = np.stack(
            [
                rng.integers(0, 100, (32, 32, 3)) if y == 0 else rng.integers(155, 256, (32, 32, 3))
                for y in labels
            ]
        ).astype(np.uint8)
        np.save(split_images_path(tmp_path, split), images)
        rows += [
            dict(
                id=f"{split}-{i}",
                source="s",
                label=CLASSES[y],
                cluster_id=f"{split}{i}",
                split=split,
                index=i,
            )
            for i, y in enumerate(labels)
        ]
    pd.DataFrame(rows).to_parquet(prepared_manifest_path(tmp_path))
    return tmp_path


def train_config(**overrides) -> TrainConfig:
    base = dict(
        classes=CLASSES,
        model="cnn64",
        seed=1,
        batch_size=8,
        lr=0.01,
        weight_decay=0.0,
        max_epochs=3,
        num_workers=0,
        augment=({"name": "HorizontalFlip", "p": 0.5},),
        early_stopping=EarlyStoppingConfig("val_loss", "min", patience=5, min_delta=0.0),
        trainer={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
    )
    return TrainConfig(**{**base, **overrides})


def test_train_keeps_the_best_checkpoint_and_a_history(prepared, tmp_path):
    result = train(train_config(), prepared, tmp_path / "model")
    assert result.best_checkpoint.name == "best.ckpt" and result.best_checkpoint.exists()
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
    assert {"train_loss", "val_loss", "val_acc"} <= set(result.history[0])
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.metrics["best_epoch"] == best["epoch"]
    assert result.metrics["stopped_by"] == "max_epochs"


def test_early_stopping_ends_training_and_says_so(prepared, tmp_path):
    # No improvement can reach a min_delta of 100: stop after patience + 1 epochs.
    es = EarlyStoppingConfig("val_loss", "min", patience=1, min_delta=100.0)
    result = train(train_config(max_epochs=10, early_stopping=es), prepared, tmp_path / "m")
    assert result.metrics["epochs_run"] == 2
    assert result.metrics["stopped_by"] == "early_stopping"


def test_same_seed_same_metrics(prepared, tmp_path):
    a = train(train_config(max_epochs=1), prepared, tmp_path / "a").history
    b = train(train_config(max_epochs=1), prepared, tmp_path / "b").history
    assert a == b


def test_model_card_names_the_sizes(prepared):
    assert model_card(train_config(), prepared) == {
        "model": "cnn64",
        "classes": list(CLASSES),
        "image_size": 32,
        "input_size": 64,
    }


def test_business_weighted_accuracy_by_hand():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 1, 0])
    # correct: one laptop (value 1) and one phone (value 3) out of 1+1+3+3
    assert business_weighted_accuracy(y_true, y_pred, np.array([1.0, 3.0])) == pytest.approx(4 / 8)


def test_scores_weight_the_valuable_class():
    cfg = EvaluateConfig(CLASSES, 8, {"laptop": 1.0, "phone": 4.0})
    y_true = np.array([0, 0, 0, 1])
    s = scores(y_true, np.array([0, 0, 0, 0]), cfg)  # every phone missed
    assert s["accuracy"] == 0.75
    assert s["business_weighted_accuracy"] == pytest.approx(3 / 7)
    assert s["f1_per_class"]["phone"] == 0.0


def test_business_values_must_cover_exactly_the_classes():
    with pytest.raises(ValueError, match="exactly the classes"):
        EvaluateConfig(CLASSES, 8, {"laptop": 1.0})


def test_predict_proba_is_a_distribution_in_input_order():
    torch.manual_seed(0)
    predictor = build_predictor("cnn64", 2)
    images = np.random.default_rng(1).integers(0, 256, (5, 40, 40, 3)).astype(np.uint8)
    proba = predict_proba(predictor, images, batch_size=2)
    assert proba.shape == (5, 2) and np.allclose(proba.sum(axis=1), 1, atol=1e-6)
    single = predict_proba(predictor, images[3:4], batch_size=1)
    assert np.allclose(single[0], proba[3], atol=1e-6)


def test_evaluate_scores_the_trained_model_on_test(prepared, tmp_path):
    train(train_config(max_epochs=3), prepared, tmp_path / "model")
    cfg = EvaluateConfig(CLASSES, 4, {"laptop": 1.0, "phone": 2.0})
    metrics, table = evaluate(cfg, prepared, tmp_path / "model")
    assert metrics["n_test"] == len(table) == 8
    assert list(table["id"]) == [f"test-{i}" for i in range(8)]
    assert metrics["accuracy"] == (table["label"] == table["predicted"]).mean()
    assert np.allclose(table[["p_laptop", "p_phone"]].sum(axis=1), 1, atol=1e-6)
