"""benchmarks/train_gpu.py: without a GPU it measures both rates on the CPU, tiny settings."""

from __future__ import annotations

import numpy as np
import pandas as pd

from benchmarks.train_gpu import main, synthetic_prepared
from tests.helpers.tiny_prepared import CLASSES
from vitrine.data.layout import load_split, prepared_manifest_path


def test_the_synthetic_set_is_in_prepares_layout(tmp_path):
    prepared = synthetic_prepared(tmp_path / "prepared", list(CLASSES), photos=100)
    images, labels = load_split(prepared, "train", list(CLASSES))
    assert images.shape == (100, 128, 128, 3) and images.dtype == np.uint8
    assert set(labels) == {0, 1}
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    assert manifest["split"].value_counts().to_dict() == {"train": 100, "val": 64, "test": 16}


def test_it_prints_both_rates_and_their_ratio_on_the_cpu(tmp_path, capsys):
    argv = ["--photos", "64", "--batch", "8", "--steps", "3", "--warmup", "1"]
    figures = main([*argv, "--candidate", "cnn64", "--workers", "0", "--dir", str(tmp_path)])
    assert figures["step"] > 0 and figures["train"] > 0
    out = capsys.readouterr().out
    assert "network training step:" in out and "train stage:" in out
    assert "ratio train stage / network step:" in out
    assert list(tmp_path.iterdir()) == []  # the synthetic set is removed
