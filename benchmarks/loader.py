"""Is the data pipeline ever the bottleneck? The train loader alone against each candidate's
training step, both in images/s, on this machine's CPU.

    python benchmarks/loader.py [--prepared data/prepared] [--candidates cnn64 lenet5 ...]
                                [--workers 0 2] [--seconds 5]

Reads params.yaml (`train` and `candidates`). For each candidate:

- loader: PackedDataModule's train loader with the candidate's batch size, augmentations and the
  `train.imbalance` sampler, for each --workers value, iterated for at least --seconds (whole
  epochs, worker start-up included, as in training: workers are started every epoch);
- step: forward, cross-entropy, backward and AdamW step of the candidate's network at its input
  size, on batches of prepared images (uint8, resized inside the network as in training), after
  two warm-up steps, for at least --seconds.

Then the ratio loader / step rate of the fastest candidate (the target is at least 10x: the
loader then takes under a tenth of a training epoch's time). The prepared data are
data/prepared when present (what `dvc repro prepare` wrote); otherwise a synthetic set of the
same shape (2,363 training photos of 128x128) is built in a temporary folder.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, also from the tests
from options import at_least, positive_float
from synthetic import synthetic_prepared

from vitrine.config import load_params, stage_config
from vitrine.data.layout import prepared_manifest_path, split_images_path
from vitrine.data.splits import PackedDataModule
from vitrine.model.training import CandidateConfig, TrainConfig, build_module, candidate_config

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = {"train": 2363, "val": 535}  # the bundled data's split, at prepare.image_size 128


def rate(run_once: Callable[[], int], seconds: float) -> float:
    """Images/s of repeated run_once() calls (each returns how many images it handled)."""
    images, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or images == 0:
        images += run_once()
    return images / elapsed


def data_module(
    config: TrainConfig, candidate: CandidateConfig, prepared: Path, workers: int
) -> PackedDataModule:
    data = PackedDataModule(
        prepared,
        list(config.classes),
        candidate.batch_size,
        workers,
        list(candidate.augment),
        config.seed,
        config.imbalance,
    )
    data.setup()
    return data


def loader_rate(data: PackedDataModule, seconds: float) -> float:
    """Images/s of whole epochs of the train loader (a fresh iterator, so fresh workers, each)."""
    return rate(lambda: sum(len(labels) for _, labels in data.train_dataloader()), seconds)


def step_rate(
    config: TrainConfig, candidate: CandidateConfig, data: PackedDataModule, seconds: float
) -> float:
    """Images/s of training steps: forward, loss, backward, optimizer step."""
    module = build_module(config, candidate, data).train()
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    # Batches loaded beforehand: this figure is the network's alone.
    batches = itertools.cycle(list(itertools.islice(data.train_dataloader(), 8)))

    def step() -> int:
        images, labels = next(batches)
        loss = F.cross_entropy(module(images), labels, weight=module.class_weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(labels)

    step(), step()  # warm-up: lazy layers, oneDNN kernel choice
    return rate(step, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, default=REPO / "data/prepared")
    parser.add_argument("--candidates", nargs="*", help="default: every one in params.yaml")
    parser.add_argument("--workers", nargs="*", type=at_least(0), default=[0, 2])
    parser.add_argument("--seconds", type=positive_float, default=5.0)
    args = parser.parse_args()

    params = load_params(REPO / "params.yaml")
    config = stage_config(TrainConfig, "train", params)
    names = args.candidates or list(params["candidates"])
    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.prepared
        if not prepared_manifest_path(prepared).exists():
            print(f"{prepared} has no prepared data: using a synthetic set of the same shape")
            prepared = synthetic_prepared(Path(tmp), list(config.classes), SYNTHETIC)
        train_images = np.load(split_images_path(prepared, "train"), mmap_mode="r")
        shape = train_images.shape
        train_images.sum()  # in the page cache, as in every epoch but a run's first
        print(f"prepared train split {shape}, torch threads {torch.get_num_threads()}")
        print(f"imbalance {config.imbalance}, at least {args.seconds:g} s per figure\n")

        header = [f"loader w={w}" for w in args.workers] + ["train step", "loader/step"]
        print(
            f"{'candidate':<16} {'input':>5} {'batch':>5} " + " ".join(f"{h:>12}" for h in header)
        )
        loaders, steps = {}, {}
        for name in names:
            candidate = candidate_config(params, name)
            loaders[name] = [
                loader_rate(data_module(config, candidate, prepared, w), args.seconds)
                for w in args.workers
            ]
            data = data_module(config, candidate, prepared, 0)
            steps[name] = step_rate(config, candidate, data, args.seconds)
            figures = [*loaders[name], steps[name], min(loaders[name]) / steps[name]]
            print(
                f"{name:<16} {candidate.input_size:>5} {candidate.batch_size:>5} "
                + " ".join(f"{f:>12.1f}" for f in figures)
            )
        fastest = max(steps, key=steps.get)
        print("\nimages/s; loader/step uses the slower loader setting (the target is >= 10x)")
        for w, loader in zip(args.workers, loaders[fastest], strict=True):
            ratio = loader / steps[fastest]
            print(
                f"fastest candidate {fastest}: {steps[fastest]:.0f} images/s per training step; "
                f"loader with {w} workers {loader:.0f} images/s = {ratio:.1f}x"
            )


if __name__ == "__main__":
    main()
