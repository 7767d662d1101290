"""benchmarks/cv_accuracy.py: folds that never split a cluster, results kept per recipe, open-set
figures pooled over folds, two runs compared photo by photo."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.cv_accuracy import (
    FlipAveraged,
    averaged_line,
    compared,
    fold_rights,
    most_probable_line,
    open_set_line,
    paired_line,
    pooled_photos,
    recipe_settings,
    results_folder,
)
from vitrine.config import load_params
from vitrine.data.layout import prepared_manifest_path
from vitrine.evaluation.settings import check_config, load_config


def test_folds_pool_train_and_test_and_keep_each_cluster_whole(tmp_path: Path) -> None:
    rows = [
        {"split": split, "cluster_id": f"c{i // 3}", "index": i}
        for i, split in enumerate(["train", "test", "val"] * 40)
    ]
    pd.DataFrame(rows).to_parquet(prepared_manifest_path(tmp_path))
    pooled = pooled_photos(tmp_path, folds=5, seed=0)
    assert set(pooled["split"]) == {"train", "test"} and len(pooled) == 80  # val stays out
    assert pooled.groupby("cluster_id")["fold"].nunique().max() == 1
    assert set(pooled["fold"]) == set(range(5))
    reseeded = pooled_photos(tmp_path, folds=5, seed=1)
    assert not reseeded["fold"].equals(pooled["fold"])


def test_each_recipe_keeps_its_results_apart(tmp_path: Path) -> None:
    params = load_params()
    shipped = recipe_settings(params, "effnet_finetune")
    squeezed = ("squeeze", 128, "")
    plain = results_folder(tmp_path, "effnet_finetune", 5, 0, shipped, squeezed)
    assert plain.parent == tmp_path
    assert plain.name.startswith("effnet_finetune-squeeze-128px-k5-s0-")
    # an override, or the same change made in params.yaml, is another recipe...
    no_cutmix = load_params(overrides=[("candidates.effnet_finetune.cutmix_p", 0.0)])
    varied = results_folder(
        tmp_path, "effnet_finetune", 5, 0, recipe_settings(no_cutmix, "effnet_finetune"), squeezed
    )
    assert varied != plain
    edited = copy.deepcopy(params)
    edited["candidates"]["effnet_finetune"]["cutmix_p"] = 0.0
    assert varied == results_folder(
        tmp_path, "effnet_finetune", 5, 0, recipe_settings(edited, "effnet_finetune"), squeezed
    )
    # ...while an override that restates params.yaml is the same one
    lr = params["candidates"]["effnet_finetune"]["lr"]
    restated = load_params(overrides=[("candidates.effnet_finetune.lr", lr)])
    same = recipe_settings(restated, "effnet_finetune")
    assert results_folder(tmp_path, "effnet_finetune", 5, 0, same, squeezed) == plain
    # photos squared another way, or prepared at another side, are another recipe
    letterboxed = results_folder(tmp_path, "effnet_finetune", 5, 0, shipped, ("letterbox", 128, ""))
    larger = results_folder(tmp_path, "effnet_finetune", 5, 0, shipped, ("squeeze", 192, ""))
    assert len({plain, letterboxed, larger}) == 3
    # and a prepared set with an other class holds other photos
    with_other = results_folder(
        tmp_path, "effnet_finetune", 5, 0, shipped, ("squeeze", 128, "other")
    )
    assert with_other.name.startswith("effnet_finetune-squeeze-128px-other-k5-s0-")


def test_open_set_figures_pool_every_folds_photos() -> None:
    folds = [
        {
            "off_category_photos": 10,
            "answered_other": 6,
            "abstained": 2,
            "known_called_other": 1,
            "known_photos": 90,
        },
        {
            "off_category_photos": 10,
            "answered_other": 3,
            "abstained": 1,
            "known_called_other": 0,
            "known_photos": 110,
        },
    ]
    line = open_set_line(folds)
    assert "12/20 off-category photos answered other or abstained = 60.00%" in line
    assert "known photos called other 1/200 = 0.50%" in line


def test_flip_averaged_logits_are_the_same_for_a_photo_and_its_mirror() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    photos = torch.rand(2, 3, 8, 8)
    averaged = FlipAveraged(net)
    with torch.no_grad():
        mirrored = averaged(torch.flip(photos, dims=[3]))
        assert torch.allclose(averaged(photos), mirrored, atol=1e-6)
        assert not torch.allclose(net(photos), net(torch.flip(photos, dims=[3])))


def test_two_runs_are_compared_photo_by_photo() -> None:
    here = [np.array([True, True, False, True]), np.array([True, False])]
    there = [np.array([True, False, False, False]), np.array([False, True])]
    line = paired_line(here, there, Path("runs/frozen3"))
    # only here: photos 1 and 3 of the first fold, 0 of the second; only there: 1 of the second
    assert line.startswith("against frozen3: 3 photos right only here, 1 only there")
    assert line.endswith("McNemar exact p = 0.62")  # two-sided binomial test of 3 of 4
    same = [np.array([True, False])]
    assert line_p(paired_line(same, same, Path("x"))) == 1.0  # no disagreement, no evidence


def test_runs_over_other_folds_are_not_compared(tmp_path: Path) -> None:
    for run, labels in [("here", [0, 1, 1]), ("there", [1, 0, 1])]:
        (tmp_path / run / "fold0").mkdir(parents=True)
        proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
        np.savez(tmp_path / run / "fold0" / "proba.npz", test=proba, y_test=np.array(labels))
    with pytest.raises(SystemExit, match="not the photos of"):
        compared(tmp_path / "here", tmp_path / "there", 1, load_params(), "proba.npz")
    line = compared(tmp_path / "here", tmp_path / "here", 1, load_params(), "proba.npz")
    assert line.startswith("against here: 0 photos right only here, 0 only there")


def test_averaged_runs_answer_from_each_photos_mean_probabilities(tmp_path: Path) -> None:
    # each run wrong on one photo (a phone is answered from p(phone) 0.375 on) where the other is
    # sure, so the mean of their probabilities gets all four right
    labels = np.array([0, 0, 1, 1])
    runs = {
        "sure_of_laptops": [[0.9, 0.1], [0.9, 0.1], [0.8, 0.2], [0.1, 0.9]],
        "sure_of_phones": [[0.5, 0.5], [0.9, 0.1], [0.05, 0.95], [0.2, 0.8]],
    }
    values = check_config(load_config(load_params()))
    for run, proba in runs.items():
        (tmp_path / run / "fold0").mkdir(parents=True)
        saved = {"test": np.array(proba), "y_test": labels}
        np.savez(tmp_path / run / "fold0" / "proba.npz", **saved)
        assert fold_rights(saved, values, None).sum() == 3
    here, there = tmp_path / "sure_of_laptops", [tmp_path / "sure_of_phones"]
    line = averaged_line(here, there, 1, load_params(), "proba.npz")
    assert line.startswith("averaged with sure_of_phones: 4/4 = 100.00%")
    assert line.endswith("wrong in every run: 0 (none)")
    both_unsure = {"test": np.array([[0.5, 0.5], [0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])}
    np.savez(there[0] / "fold0" / "proba.npz", **both_unsure, y_test=labels)
    line = averaged_line(here, there, 1, load_params(), "proba.npz")
    assert line.endswith("wrong in every run: 1 (phone 1)")
    other_photos = {"test": np.eye(2)[labels], "y_test": labels[::-1]}
    np.savez(there[0] / "fold0" / "proba.npz", **other_photos)
    with pytest.raises(SystemExit, match="not the photos of"):
        averaged_line(here, there, 1, load_params(), "proba.npz")


def line_p(line: str) -> float:
    return float(line.rsplit("= ", 1)[1])


def test_most_probable_class_accuracy_is_pooled_beside_the_served_rule() -> None:
    folds = [
        {"n": 100, "correct": 95, "most_probable_correct": 97},
        {"n": 50, "correct": 45, "most_probable_correct": 44},
    ]
    line = most_probable_line(folds, "expected_value")
    assert line.startswith("most probable class: 141/150 = 94.00% (95% interval ")
    assert line.endswith("served rule (expected_value): 140")
