"""How accurate is a candidate's recipe, beyond what one test split can tell? Cluster-aware
k-fold cross-validation on the prepared photos, on this machine's CPU.

    python benchmarks/cv_accuracy.py [--candidate effnet_finetune] [--folds 5] [--seed 0]
                                     [--prepared data/prepared] [--out .cache/cv_accuracy]
                                     [-S candidates.effnet_finetune.cutmix_p=0 ...]

The train and test photos of `prepare` are pooled and dealt into --folds folds by cluster (a
hash of the cluster key, as prepare splits), so copies of a photo never straddle a fold's train
and test. Each fold is the test set once; the candidate (params.yaml, recipe unchanged) trains
on the other folds with prepare's val photos for early stopping and checkpoint choice, exactly
as `dvc repro train@<candidate>` does, and is scored as evaluate scores it: exported to ONNX in
float, its probabilities calibrated on val (`evaluate.calibration`), answered by the decision rule.
A fold holds about as many photos as prepare's test split and trains on about as many as its
train split, so each fold's figure is a sample of what the pipeline's one test figure measures.

Prints each fold's accuracy and business-weighted accuracy, then the pooled accuracy over every
pooled photo with its 95% Wilson interval, and beside it the accuracy of the network's most
probable class (under evaluate.decision expected_value, the served answers give up a few photos
of accuracy for value by design). With an other class (params.yaml other_class), the
accuracy is over the known classes' photos, comparable with a run without the class, and a last
line pools the open-set figures: off-category photos answered other or abstained under the
served rule, and known photos called other. A fold's trained model is kept under --out, so a
re-run only scores finished folds (a fold takes as long as the candidate's training; scoring,
half a minute). --flip-tta scores the same models with each photo's logits averaged with its
mirror image's, inside the exported network. --against RESULTS_FOLDER compares the run photo by
photo with another one over the same folds (right only here, only there, McNemar's exact p).
--average RESULTS_FOLDER (repeatable) scores each photo's probabilities averaged over this run
and the others', as serving their networks together would answer.
-S overrides params.yaml for this run only (as `dvc exp run -S`), so two recipes can be compared
on the same folds. Each recipe keeps its results in a folder of its own, named after the
prepared photos (resize rule, side, other class) and a hash of the recipe as resolved, e.g.
.cache/cv_accuracy/effnet_finetune-squeeze-128px-k5-s0-1f2e3d4c, with the recipe in its
recipe.json: editing params.yaml starts a new folder as an override does.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, also from the tests
from options import at_least

from vitrine.config import (
    add_overrides_option,
    load_params,
    other_class,
    stage_config,
)
from vitrine.data.layout import (
    load_split,
    prepared_manifest_path,
    prepared_resize,
    preprocessing_path,
    split_images_path,
)
from vitrine.evaluation import metrics
from vitrine.evaluation.candidates import calibrated, load_candidate
from vitrine.evaluation.openset import open_set_scores
from vitrine.evaluation.settings import EvaluateConfig, check_config, load_config
from vitrine.evaluation.thresholds import fit_rules
from vitrine.model.export import export_onnx
from vitrine.model.training import (
    TrainConfig,
    candidate_config,
    model_card,
    publish,
    run_fingerprint,
    train,
)
from vitrine.runtime.decisions import answer
from vitrine.runtime.onnx import onnx_logits, onnx_proba

Photos = tuple[np.ndarray, np.ndarray]  # uint8 (N, H, W, 3) images and class indices

REPO = Path(__file__).resolve().parents[1]
POOLED = ("train", "test")  # dealt into folds; val stays the early-stopping set of every fold


def fold_of(cluster_id: str, folds: int, seed: int) -> int:
    """A cluster's fold from its key alone, as prepare.assign_split picks its split."""
    digest = hashlib.sha256(f"cv:{seed}:{cluster_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % folds


def pooled_photos(prepared: Path, folds: int, seed: int) -> pd.DataFrame:
    """prepare's train and test rows, each with its fold."""
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    rows = manifest[manifest["split"].isin(POOLED)].reset_index(drop=True)
    rows["fold"] = rows["cluster_id"].map(lambda c: fold_of(c, folds, seed))
    return rows


def gathered(prepared: Path, part: pd.DataFrame) -> np.ndarray:
    """The images of pooled rows, from the train and test arrays they came from."""
    arrays = {s: np.load(split_images_path(prepared, s), mmap_mode="r") for s in POOLED}
    return np.stack([arrays[s][i] for s, i in zip(part["split"], part["index"], strict=True)])


def write_fold(prepared: Path, rows: pd.DataFrame, fold: int, out: Path) -> None:
    """A prepared folder for one fold: its test photos, the other folds as train, val as is."""
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for split, chosen in (("train", rows["fold"] != fold), ("test", rows["fold"] == fold)):
        part = rows[chosen].copy()
        np.save(split_images_path(out, split), gathered(prepared, part))
        part["split"], part["index"] = split, np.arange(len(part))
        parts.append(part)
    shutil.copyfile(split_images_path(prepared, "val"), split_images_path(out, "val"))
    if preprocessing_path(prepared).is_file():  # how the squares were made, for the model card
        shutil.copyfile(preprocessing_path(prepared), preprocessing_path(out))
    manifest = pd.read_parquet(prepared_manifest_path(prepared))
    val = manifest[manifest["split"] == "val"]
    pd.concat([*parts, val]).drop(columns="fold").to_parquet(
        prepared_manifest_path(out), index=False
    )


def train_fold(params: dict, candidate: str, folder: Path) -> dict:
    """Train the candidate on one fold's prepared folder; its model goes to folder/model."""
    config = stage_config(TrainConfig, "train", params)
    recipe = candidate_config(params, candidate)
    data = folder / "prepared"
    started = time.perf_counter()
    # Unfinished checkpoints resume only under the same params and photos, as in the stage.
    workdir = folder / "work" / run_fingerprint(config, recipe, data)
    result = train(config, recipe, data, workdir, folder / "live")
    publish(result, model_card(config, recipe, data), folder / "model", folder / "train.json")
    return {
        "best_epoch": result.metrics["best_epoch"],
        "seconds": round(time.perf_counter() - started, 1),
    }


class FlipAveraged(nn.Module):
    """A network whose logits are the mean of a photo's and its mirror image's (test-time
    augmentation inside the exported graph, so the service would run it as is)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return 0.5 * (self.net(x) + self.net(torch.flip(x, dims=[3])))


def score_fold(
    params: dict, folder: Path, val: Photos, test: Photos, flip_tta: bool = False
) -> dict:
    """The fold's model as evaluate would serve it in float (ONNX, calibrated on val), scored
    on the fold's test photos. With an other class, accuracy is over the known classes' photos
    and the open-set counts are taken under the served rule (thresholds fitted on val), as
    evaluate reports them. The calibrated probabilities are kept in the fold's proba.npz
    (proba-flip.npz with flip_tta, the network's logits averaged with its mirror image's)."""
    evaluate = load_config(params)
    values = check_config(evaluate)
    predictor = load_candidate(folder / "model", evaluate.classes)
    if flip_tta:
        predictor.net = FlipAveraged(predictor.net)
    size = predictor.input_size
    model = export_onnx(predictor, val[0].shape[1])
    val_logits = onnx_logits(model, size, val[0], evaluate.batch_size, "val")
    model, _ = calibrated(model, val_logits, val[1], evaluate)
    images, labels = test
    proba = onnx_proba(model, size, images, evaluate.batch_size, "test")
    val_proba = onnx_proba(model, size, val[0], evaluate.batch_size, "val")
    np.savez(folder / proba_file(flip_tta), val=val_proba, test=proba, y_val=val[1], y_test=labels)
    known = np.ones(len(labels), dtype=bool)
    result: dict = {}
    if evaluate.other_class:
        rule = fit_rules(
            val[1], val_proba, values, evaluate.taxonomy, evaluate.min_val_photos_per_class
        ).rule
        other = evaluate.classes.index(evaluate.other_class)
        known = labels != other
        result = open_set_scores(labels, answer(proba, rule), rule, other)
    scores = metrics.scores(labels[known], proba[known], values, evaluate.top_k, evaluate.taxonomy)
    return result | {
        "n": int(known.sum()),
        "correct": int((values.decide(proba) == labels)[known].sum()),
        "most_probable_correct": int((proba.argmax(axis=1) == labels)[known].sum()),
        "accuracy": scores["accuracy"],
        "business_weighted_accuracy": scores["business_weighted_accuracy"],
    }


def most_probable_line(results: list[dict], decision: str) -> str:
    """The pooled accuracy of the network's most probable class, beside the served rule's: with
    expected-value answers the two part by design (a doubtful photo is answered by what a
    mistake costs, not by which class is likelier)."""
    right = sum(r["most_probable_correct"] for r in results)
    n = sum(r["n"] for r in results)
    served = sum(r["correct"] for r in results)
    return f"most probable class: {share(right, n)}; served rule ({decision}): {served}"


def open_set_line(results: list[dict]) -> str:
    """The pooled open-set figures of the folds, with the recall's 95% interval."""
    off = sum(r["off_category_photos"] for r in results)
    kept = sum(r["answered_other"] + r["abstained"] for r in results)
    flagged = sum(r["known_called_other"] for r in results)
    known = sum(r["known_photos"] for r in results)
    low, high = wilson(kept, off)
    return (
        f"open set: {kept}/{off} off-category photos answered other or abstained = "
        f"{kept / off:.2%} (95% interval {low:.2%}-{high:.2%}); known photos called other "
        f"{flagged}/{known} = {flagged / known:.2%}"
    )


def paired_line(here: Sequence[np.ndarray], there: Sequence[np.ndarray], other: Path) -> str:
    """Photo by photo against another run over the same folds (each fold's test photos right or
    wrong there and here): how many are right only here, only there, and McNemar's exact p,
    the binomial test of those two counts, which one test split's accuracy cannot give."""
    only_here = int(sum((a & ~b).sum() for a, b in zip(here, there, strict=True)))
    only_there = int(sum((b & ~a).sum() for a, b in zip(here, there, strict=True)))
    disagree = only_here + only_there
    p = scipy.stats.binomtest(only_here, disagree).pvalue if disagree else 1.0
    return (
        f"against {other.name}: {only_here} photos right only here, {only_there} only there, "
        f"McNemar exact p = {p:.2f}"
    )


def proba_file(flip_tta: bool) -> str:
    return "proba-flip.npz" if flip_tta else "proba.npz"


def fold_rights(saved: Mapping, values: metrics.ValueModel, known_only: int | None) -> np.ndarray:
    """Whether each of a scored fold's test photos is answered right (its saved probabilities,
    the decision rule of `values`), known-class photos only when known_only is the other class."""
    labels = saved["y_test"]
    right = values.decide(saved["test"]) == labels
    return right if known_only is None else right[labels != known_only]


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def share(count: int, n: int) -> str:
    """count/n as a percentage with its 95% Wilson interval, as every pooled figure prints."""
    low, high = wilson(count, n)
    return f"{count}/{n} = {count / n:.2%} (95% interval {low:.2%}-{high:.2%})"


def recipe_settings(params: dict, candidate: str) -> dict:
    """Everything a fold's training reads from params: the train block and the candidate's, as
    resolved (params.yaml with the overrides applied)."""
    return {
        "train": dataclasses.asdict(stage_config(TrainConfig, "train", params)),
        "candidate": dataclasses.asdict(candidate_config(params, candidate)),
    }


def results_folder(
    out: Path,
    candidate: str,
    folds: int,
    seed: int,
    recipe: Mapping,
    prepared: tuple[str, int, str],
) -> Path:
    """Where one recipe's folds are kept: the prepared set's resize rule, side and other class
    (`prepared`) in the name, and a hash of the resolved recipe (`recipe_settings`), so a fold
    trained before params.yaml changed is never scored as the new recipe's, and the same recipe
    finds its folds again whether set in params.yaml or by -S."""
    resize, side, other = prepared
    name = f"{candidate}-{resize}-{side}px{f'-{other}' if other else ''}-k{folds}-s{seed}"
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode())
    return out / f"{name}-{digest.hexdigest()[:8]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", default="effnet_finetune")
    parser.add_argument(
        "--folds", type=at_least(2), default=5, help="at least 2: each trains on the others"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "cv_accuracy")
    parser.add_argument(
        "--flip-tta",
        action="store_true",
        help="score each fold's model with horizontal-flip test-time augmentation",
    )
    parser.add_argument(
        "--against",
        type=Path,
        metavar="RESULTS_FOLDER",
        help="another run's results folder over the same folds: compare the two photo by photo",
    )
    parser.add_argument(
        "--average",
        type=Path,
        action="append",
        default=[],
        metavar="RESULTS_FOLDER",
        help="other runs' results folders over the same folds: score the mean of every run's "
        "probabilities (repeatable)",
    )
    add_overrides_option(parser)
    args = parser.parse_args()
    for option, folder in [("--against", args.against), *(("--average", f) for f in args.average)]:
        if folder and not (folder / "fold0").is_dir():  # before hours of training
            parser.error(f"{option} {folder}: not a results folder (no fold0 in it)")
    params = load_params(REPO / "params.yaml", args.overrides)
    resize = prepared_resize(args.prepared)
    side = int(np.load(split_images_path(args.prepared, "train"), mmap_mode="r").shape[1])
    settings = recipe_settings(params, args.candidate)
    root = results_folder(
        args.out,
        args.candidate,
        args.folds,
        args.seed,
        settings,
        (resize, side, other_class(params)),
    )
    root.mkdir(parents=True, exist_ok=True)
    recipe = {"overrides": dict(args.overrides), **settings}
    (root / "recipe.json").write_text(json.dumps(recipe, indent=2, default=str) + "\n")
    varied = dict(args.overrides) or "none"
    print(f"results in {root}; {side} px photos squared by {resize}; overrides {varied}")
    rows = pooled_photos(args.prepared, args.folds, args.seed)
    sizes = rows["fold"].value_counts().sort_index().tolist()
    print(f"{len(rows)} pooled photos in {args.folds} folds of {sizes}")
    classes = list(params["classes"])
    val = load_split(args.prepared, "val", classes)
    results = []
    for fold in range(args.folds):
        folder = root / f"fold{fold}"
        trained = folder / "trained.json"
        if not trained.exists():
            write_fold(args.prepared, rows, fold, folder / "prepared")
            trained.write_text(json.dumps(train_fold(params, args.candidate, folder), indent=2))
            shutil.rmtree(folder / "prepared")  # the arrays are rebuilt cheaply; keep the model
        part = rows[rows["fold"] == fold]
        test = gathered(args.prepared, part), part["label"].map(classes.index).to_numpy()
        scored = score_fold(params, folder, val, test, args.flip_tta)
        result = {**json.loads(trained.read_text()), **scored}
        results.append(result)
        print(
            f"fold {fold}: {result['n']} test photos, accuracy {result['accuracy']:.2%}, "
            f"business-weighted {result['business_weighted_accuracy']:.2%} "
            f"(best epoch {result['best_epoch']}, {result['seconds']:.0f} s)",
            flush=True,
        )
    correct, n = sum(r["correct"] for r in results), sum(r["n"] for r in results)
    accuracies = [r["accuracy"] for r in results]
    print(f"pooled: {share(correct, n)}; folds {min(accuracies):.2%}-{max(accuracies):.2%}")
    print(most_probable_line(results, params["evaluate"]["decision"]))
    if "off_category_photos" in results[0]:
        print(open_set_line(results))
    if args.against:
        print(compared(root, args.against, args.folds, params, proba_file(args.flip_tta)))
    if args.average:
        print(averaged_line(root, args.average, args.folds, params, proba_file(args.flip_tta)))


def other_class_index(evaluate: EvaluateConfig) -> int | None:
    """The other class's index when params declare one (its photos are left out of accuracy)."""
    return evaluate.classes.index(evaluate.other_class) if evaluate.other_class else None


def saved_folds(root: Path, folds: int, name: str) -> list:
    """A results folder's saved probabilities, fold by fold."""
    return [np.load(root / f"fold{fold}" / name) for fold in range(folds)]


def check_same_photos(mine: Sequence, theirs: Sequence, root: Path, other: Path) -> None:
    """Refuses two runs unless they scored the same photos in each fold."""
    for fold, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if not np.array_equal(a["y_test"], b["y_test"]):
            raise SystemExit(
                f"{other}/fold{fold}: not the photos of {root}/fold{fold}; "
                "compare runs of the same folds"
            )


def compared(root: Path, against: Path, folds: int, params: dict, name: str) -> str:
    """paired_line of this run's folds against another run's, refused unless the other run
    scored the same photos in each fold."""
    evaluate = load_config(params)
    values, other = check_config(evaluate), other_class_index(evaluate)
    mine, theirs = saved_folds(root, folds, name), saved_folds(against, folds, name)
    check_same_photos(mine, theirs, root, against)
    here = [fold_rights(saved, values, other) for saved in mine]
    there = [fold_rights(saved, values, other) for saved in theirs]
    return paired_line(here, there, against)


def averaged_line(root: Path, others: Sequence[Path], folds: int, params: dict, name: str) -> str:
    """The served rule on each photo's probabilities averaged over this run and others of the
    same folds: what serving all their networks at once would score, at the sum of their costs;
    then the photos every run answers wrong, by class: what no averaging can mend."""
    evaluate = load_config(params)
    values, other = check_config(evaluate), other_class_index(evaluate)
    runs = [saved_folds(root, folds, name)]
    for folder in others:
        runs.append(saved_folds(folder, folds, name))
        check_same_photos(runs[0], runs[-1], root, folder)
    right, n, never_right = 0, 0, Counter[str]()
    for fold, saved in enumerate(runs[0]):
        labels = saved["y_test"]
        known = labels if other is None else labels[labels != other]
        mean = np.mean([run[fold]["test"] for run in runs], axis=0)
        right += int(fold_rights({"test": mean, "y_test": labels}, values, other).sum())
        n += len(known)
        wrong = ~np.any([fold_rights(run[fold], values, other) for run in runs], axis=0)
        never_right.update(evaluate.classes[label] for label in known[wrong])
    by_class = ", ".join(f"{label} {count}" for label, count in sorted(never_right.items()))
    return (
        f"averaged with {', '.join(f.name for f in others)}: {share(right, n)}; "
        f"wrong in every run: {never_right.total()} ({by_class or 'none'})"
    )


if __name__ == "__main__":
    main()
