"""Fitting one candidate network with Lightning: configs, the module, resumable training.

The `train` block of params.yaml holds what every candidate shares (seed, imbalance handling,
early stopping, Lightning Trainer arguments); a `candidates.<name>` block one network and how to
fit it. Checkpoints go to a work folder outside DVC's outputs (which `dvc repro` deletes before a
stage runs): a run killed mid-training and started again resumes from its last epoch there.
Used by the train stage and by benchmarks (cross-validation, the loader benchmark).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import lightning as L
import numpy as np
import torch
from dvclive import Live
from dvclive.lightning import DVCLiveLogger
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from vitrine.config import (
    ConfigError,
    Count,
    NonNegative,
    NonNegativeInt,
    Positive,
    Share,
    from_mapping,
    params_block,
)
from vitrine.contracts import CHECKPOINT, TrainedModel, write_trained
from vitrine.data.batches import photo_data
from vitrine.data.layout import prepared_manifest_path, prepared_resize, split_images_path
from vitrine.data.splits import PackedDataModule, build_augment, epoch_seed
from vitrine.model.networks import MODELS, ImageClassifier
from vitrine.model.probe import CachedFeatures, HeadOnly, flip_probability, is_probe

LAST = "last.ckpt"


@params_block
class EarlyStoppingConfig:
    monitor: str
    mode: str
    patience: int
    min_delta: float


@params_block
class TrainConfig:
    """params.yaml `train`: shared by every candidate."""

    classes: tuple[str, ...]
    seed: int
    num_workers: int
    imbalance: Literal["none", "loss_weights", "balanced_sampler"]
    early_stopping: EarlyStoppingConfig
    trainer: dict[str, Any]  # passed through to lightning.Trainer
    augment_on: Literal["host", "device"] = "host"  # where `augment` runs (vitrine.data.splits)


@params_block
class CandidateConfig:
    """params.yaml `candidates.<name>`: one network and how to fit it."""

    model: str  # a key of vitrine.model.networks.MODELS
    options: dict[str, Any]  # keyword arguments of the model's builder, e.g. {mode: probe}
    input_size: Count  # side the Predictor resizes prepared images to before the network
    batch_size: Count
    lr: Positive
    weight_decay: NonNegative
    label_smoothing: float  # in [0, 1): 1 would leave no signal in the targets
    cosine_schedule: bool  # anneal the learning rate to 0 over max_epochs
    max_epochs: Count
    augment: tuple[dict[str, Any], ...]  # albumentations transforms, train split only
    cutmix_p: Share = 0.0  # probability that a training batch is CutMix-ed (0 = never)
    cutmix_alpha: Positive = 1.0  # the pasted box's area is 1 - Beta(alpha, alpha)
    # Training epochs at a smaller side, then the last full_size_epochs at input_size
    # (ImageClassifier.train_side); 0: input_size throughout.
    train_input_size: NonNegativeInt = 0
    full_size_epochs: NonNegativeInt = 1

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        # Checked at load, naming the key: at fit time, after the photos are read, these
        # would be tracebacks of the builder's or albumentations' own.
        if self.model not in MODELS:
            raise ValueError(f"model {self.model!r} is none of {sorted(MODELS)}")
        try:
            inspect.signature(MODELS[self.model].build).bind(0, **self.options)
        except TypeError as err:
            raise ValueError(f"options do not fit the {self.model} builder: {err}") from None
        try:
            build_augment(list(self.augment), seed=0)
        except (ValueError, TypeError) as err:
            raise ValueError(f"augment: {str(err).splitlines()[0]}") from None

    def small_side_epochs(self) -> int:
        """The epochs before the last full_size_epochs: at train_input_size when it is set."""
        return max(self.max_epochs - self.full_size_epochs, 0)


def candidate_config(params: dict[str, Any], name: str) -> CandidateConfig:
    candidates = params.get("candidates") or {}
    if name not in candidates:
        raise ConfigError(
            f"unknown candidate {name!r}; params.yaml candidates: {sorted(candidates)}"
        )
    return from_mapping(CandidateConfig, candidates[name], f"candidates.{name}")


class Reseedable(Protocol):
    def reseed(self, seed: int) -> None: ...


class EpochSeed(Callback):
    """Seeds every epoch from (seed, epoch): shuffling, sampling, dropout and augmentation of
    epoch e are then the same whether the run got there in one go or was resumed."""

    def __init__(self, seed: int, data: Reseedable):
        self.seed = seed
        self.data = data

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        seed = epoch_seed(self.seed, trainer.current_epoch)
        seed_everything(seed, workers=True, verbose=False)
        self.data.reseed(seed)


class PlotsOnlyLive(Live):
    """DVCLive writing metrics and plots only, without its own DVC integration.

    The stage's dvc.yaml entry declares the plots, so the integration adds nothing here, and it
    fails the stage in a Git repository without commits (dvclive 3.49: `scm.get_rev()` raises
    "Empty git repo" before its own no-commits check) and runs `dvc init` in a Git repository
    without DVC.
    """

    def _init_dvc(self) -> None:
        pass


class StageLogger(DVCLiveLogger):
    """Lightning's DVCLive logger, over PlotsOnlyLive; created on rank zero only, as DVCLive's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> Live:
        if self._experiment is None:
            self._experiment = PlotsOnlyLive(**self._kwargs)
        return self._experiment


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: Path
    metrics: dict[str, Any]
    is_global_zero: bool  # DDP: only rank zero writes files


def run_fingerprint(config: TrainConfig, candidate: CandidateConfig, prepared: Path) -> str:
    """Identifies a training run: its params and the prepared data (manifest and image size)."""
    digest = hashlib.sha256()
    settings = [dataclasses.asdict(config), dataclasses.asdict(candidate)]
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(prepared_manifest_path(prepared).read_bytes())
    digest.update(str(np.load(split_images_path(prepared, "train"), mmap_mode="r").shape).encode())
    return digest.hexdigest()[:16]


def checkpoint_epoch(path: Path) -> int:
    """The epoch a Lightning checkpoint was saved at (0-based)."""
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def resumable_checkpoint(workdir: Path) -> tuple[Path, int] | None:
    """The last checkpoint of an interrupted run and the epoch to resume at, if readable."""
    last = workdir / LAST
    if not last.exists():
        return None
    try:
        return last, checkpoint_epoch(last) + 1
    except Exception as err:  # a SIGKILL while writing leaves a truncated file
        print(f"train: ignoring unreadable {last} ({type(err).__name__}: {err}); starting over")
        last.unlink()
        return None


def build_module(
    config: TrainConfig,
    candidate: CandidateConfig,
    data: PackedDataModule,
    kind: type[ImageClassifier] = ImageClassifier,
) -> ImageClassifier:
    weights = data.train_class_weights() if config.imbalance == "loss_weights" else None
    return kind(
        candidate.model,
        list(config.classes),
        candidate.lr,
        candidate.weight_decay,
        input_size=candidate.input_size,
        options=candidate.options,
        class_weights=weights,
        label_smoothing=candidate.label_smoothing,
        cosine_epochs=candidate.max_epochs if candidate.cosine_schedule else 0,
        cutmix_p=candidate.cutmix_p,
        cutmix_alpha=candidate.cutmix_alpha,
        train_input_size=candidate.train_input_size,
        small_epochs=candidate.small_side_epochs(),
    )


def first_judged_epoch(candidate: CandidateConfig) -> int:
    """The first epoch early stopping judges: with a smaller train_input_size, the first at
    input_size (0 otherwise).

    Validation runs at input_size, so until then it judges a network that has not yet learnt to
    read photos at that side: on a fold of the bundled photos its val loss levels off at
    0.26-0.29 through the 128 px epochs and falls to 0.20 in the first at 192 px. Early stopping
    watching that plateau ended some runs before it (after epoch 6 of 8, keeping epoch 2's
    weights), and they served a network never trained at its served side.
    """
    if not candidate.train_input_size or candidate.train_input_size == candidate.input_size:
        return 0
    return min(candidate.small_side_epochs(), candidate.max_epochs - 1)


class EarlyStoppingFrom(EarlyStopping):
    """Lightning's EarlyStopping, blind to the epochs before `first_epoch`: its patience counts
    from there. Lightning's min_epochs cannot do this: a stop requested on the earlier plateau
    stays requested, so the run ends at min_epochs whatever the epochs at the full side do
    (GroceryStore's fine-tune, five stages frozen, would end after the first of its four
    epochs at 224 px)."""

    def __init__(self, first_epoch: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.first_epoch = first_epoch

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.first_epoch:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.first_epoch:
            super().on_train_epoch_end(trainer, pl_module)


def data_and_module(
    config: TrainConfig, candidate: CandidateConfig, prepared: Path
) -> tuple[PackedDataModule | CachedFeatures, ImageClassifier]:
    """The candidate's data module and Lightning module: photos and the whole network, or for a
    probe (options mode: probe) its backbone's cached features and the head (vitrine.model.probe).
    """
    probe = is_probe(candidate.options)
    flip_p = flip_probability(candidate.augment, candidate.cutmix_p) if probe else 0.0
    photos = photo_data(
        config.augment_on,
        prepared,
        list(config.classes),
        candidate.batch_size,
        config.num_workers,
        [] if probe else list(candidate.augment),
        config.seed,
        config.imbalance,
    )
    if not probe:
        return photos, build_module(config, candidate, photos)
    module = build_module(config, candidate, photos, HeadOnly)
    return CachedFeatures(photos, module.predictor, flip_p), module


def train(
    config: TrainConfig,
    candidate: CandidateConfig,
    prepared: Path,
    workdir: Path,
    live_dir: Path,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Fit the candidate; checkpoints (best and last) go to workdir, resumed from if present.
    callbacks: more Lightning callbacks (benchmarks/train_gpu.py times the loop with one)."""
    seed_everything(config.seed, workers=True, verbose=False)
    data, module = data_and_module(config, candidate, prepared)
    es = config.early_stopping
    stopper = EarlyStoppingFrom(
        first_judged_epoch(candidate),
        monitor=es.monitor,
        mode=es.mode,
        patience=es.patience,
        min_delta=es.min_delta,
    )
    checkpoints = ModelCheckpoint(
        dirpath=workdir,
        filename=Path(CHECKPOINT).stem,
        monitor=es.monitor,
        mode=es.mode,
        save_top_k=1,
        enable_version_counter=False,
    )
    # Lightning's save_last writes last.ckpt only in epochs that also write a best checkpoint, so
    # a run killed after epochs without improvement would redo them: an unmonitored checkpoint,
    # overwritten every epoch, is what a resumed run continues from. Listed after `checkpoints`,
    # it saves that callback's state as updated by the same epoch.
    latest = ModelCheckpoint(
        dirpath=workdir, filename=Path(LAST).stem, save_top_k=1, enable_version_counter=False
    )
    resume = resumable_checkpoint(workdir)
    resume_from, resumed_epoch = resume if resume else (None, 0)
    trainer = L.Trainer(
        max_epochs=candidate.max_epochs,
        callbacks=[stopper, checkpoints, latest, EpochSeed(config.seed, data), *callbacks],
        logger=StageLogger(
            dir=str(live_dir),
            resume=resume_from is not None,
            save_dvc_exp=False,
            dvcyaml=None,
            report=None,
        ),
        num_sanity_val_steps=0,
        deterministic=True,
        enable_model_summary=False,
        default_root_dir=workdir,
        **config.trainer,
    )
    if resume_from:
        print(f"train: resuming {candidate.model} at epoch {resumed_epoch} from {resume_from}")
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume_from)
    seconds = time.perf_counter() - started
    best = Path(checkpoints.best_model_path)
    best_score = checkpoints.best_model_score
    if best_score is None:
        raise RuntimeError(f"train: no epoch logged {es.monitor}, so no best checkpoint")
    final = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items()}
    epochs_run = trainer.current_epoch - resumed_epoch
    metrics = {
        "model": candidate.model,
        "best_epoch": checkpoint_epoch(best),
        f"best_{es.monitor}": float(best_score),
        "epochs": trainer.current_epoch,
        "stopped_by": "early_stopping" if stopper.stopped_epoch > 0 else "max_epochs",
        "resumed_at_epoch": resumed_epoch if resume_from else None,
        "train_seconds": round(seconds, 1),
        "train_images_per_s": round(epochs_run * len(data.train_set) / seconds, 1),
        "final": final,
    }
    # Every rank prints this line: the DDP test checks they stopped at the same epoch.
    print(
        f"train: rank {trainer.global_rank} stopped after epoch {trainer.current_epoch - 1} "
        f"({metrics['stopped_by']}), final {json.dumps(final, sort_keys=True)}"
    )
    return TrainResult(best, metrics, trainer.is_global_zero)


def model_card(config: TrainConfig, candidate: CandidateConfig, prepared: Path) -> TrainedModel:
    """What a consumer of the checkpoint needs to feed it: classes and image sizes."""
    image_size = int(np.load(split_images_path(prepared, "train"), mmap_mode="r").shape[1])
    resize = prepared_resize(prepared)
    return TrainedModel(candidate.model, config.classes, image_size, candidate.input_size, resize)


def publish(result: TrainResult, card: TrainedModel, out: Path, report: Path) -> None:
    """Copy the best checkpoint into the DVC output and write the card and the metrics."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(result.best_checkpoint, out / CHECKPOINT)
    write_trained(card, out)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(result.metrics, indent=2) + "\n")
