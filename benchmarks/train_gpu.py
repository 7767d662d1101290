"""Is the accelerator kept busy? The train stage's images/s against the network's own training
step rate, at the same batch size and precision.

    python benchmarks/train_gpu.py [--photos 50000] [--batch 256] [--steps 0] [--warmup 10]
                                   [--candidate effnet_finetune] [--augment-on device]
                                   [--workers 8] [--precision bf16-mixed] [--dir /tmp]

- train stage: vitrine.model.training.train, the stage's own Lightning loop and data module
  (params.yaml's `train` and the candidate, with the options above), on a synthetic prepared set
  of --photos training photos of 128x128 (random pixels, prepare's layout: {train,val,test}.npy
  and manifest.parquet) written to a temporary folder; timed over the training batches after
  --warmup, up to --steps of them (0: the rest of one epoch), ending when validation starts;
- network step: forward (uint8 photos in, resized and normalised inside, as in training),
  cross-entropy, backward and AdamW step of the candidate's network on batches already on the
  device, under the same autocast, after three warm-up steps, --steps of them (0: 50).

Prints both and their ratio (the target on a GPU: at least 0.5). Without a GPU it runs on the
CPU (precision 32-true unless given), where small settings make a quick check:

    python benchmarks/train_gpu.py --candidate cnn64 --photos 2000 --batch 64 --steps 20
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its siblings, also from the tests
import synthetic
from options import at_least

from vitrine.config import load_params, stage_config
from vitrine.model.training import (
    CandidateConfig,
    TrainConfig,
    candidate_config,
    data_and_module,
    train,
)

REPO = Path(__file__).resolve().parents[1]
SIDE = 128  # prepare.image_size


def synthetic_prepared(root: Path, classes: list[str], photos: int, seed: int = 0) -> Path:
    """--photos random training photos (and a fiftieth as many for val, 16 for test) in
    prepare's layout."""
    sizes = {"train": photos, "val": max(64, photos // 50), "test": 16}
    return synthetic.synthetic_prepared(root, classes, sizes, SIDE, seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LoopTimer(Callback):
    """Images and seconds of the training batches after `warmup`, until validation starts."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.images = 0
        self.started: float | None = None
        self.seconds = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if i + 1 == self.warmup:
            synchronize(module.device)
            self.started = time.perf_counter()
        elif self.started is not None and not self.seconds:
            self.images += len(batch[1])

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.started is not None and not self.seconds:
            synchronize(module.device)
            self.seconds = time.perf_counter() - self.started

    @property
    def rate(self) -> float:
        if not self.images:
            raise RuntimeError("no batch after the warm-up was timed: more --photos or --steps")
        return self.images / self.seconds


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast Lightning's precision setting runs the forward pass under."""
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def step_rate(
    module: torch.nn.Module, batch: int, steps: int, device: torch.device, precision: str
) -> float:
    """Images/s of training steps on device-resident random photos and labels."""
    module = module.to(device).train()
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    images = torch.randint(0, 256, (batch, SIDE, SIDE, 3), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 2, (batch,), device=device)

    def step() -> None:
        with autocast(device, precision):
            logits = module(images)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):  # lazy layers, kernel choice
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - started)


def settings(args: argparse.Namespace, gpu: bool) -> tuple[TrainConfig, CandidateConfig]:
    """params.yaml's train block and candidate, with this run's options."""
    params = load_params(REPO / "params.yaml")
    config = stage_config(TrainConfig, "train", params)
    candidate = candidate_config(params, args.candidate)
    limit = args.warmup + args.steps if args.steps else 1.0
    trainer = {
        **config.trainer,
        "accelerator": "gpu" if gpu else "cpu",
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",
        "precision": args.precision,
        "limit_train_batches": limit,
        "limit_val_batches": 1,
        "enable_progress_bar": False,
    }
    config = dataclasses.replace(
        config, num_workers=args.workers, augment_on=args.augment_on, trainer=trainer
    )
    candidate = dataclasses.replace(candidate, batch_size=args.batch, max_epochs=1)
    return config, candidate


@contextlib.contextmanager
def workspace(parent: str | None) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vitrine-train-gpu-", dir=parent) as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> dict[str, float]:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=at_least(1), default=50_000)
    parser.add_argument("--batch", type=at_least(1), default=256)
    parser.add_argument("--steps", type=at_least(0), default=0, help="timed batches; 0: one epoch")
    parser.add_argument(
        "--warmup",
        type=at_least(1),
        default=10,
        help="batches before the timing (at least one: the timing starts after a batch)",
    )
    parser.add_argument("--candidate", default="effnet_finetune")
    parser.add_argument("--augment-on", choices=["host", "device"], default="device")
    parser.add_argument("--workers", type=at_least(0), default=8 if gpu else 0)
    parser.add_argument("--precision", default="bf16-mixed" if gpu else "32-true")
    parser.add_argument("--dir", help="parent of the temporary prepared set (default: TMPDIR)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if gpu else "cpu")
    name = torch.cuda.get_device_name(device) if gpu else "no GPU: the CPU"
    print(f"device {name}, torch threads {torch.get_num_threads()}")
    print(f"{args.candidate}: batch {args.batch}, precision {args.precision}, ", end="")
    print(f"augment_on {args.augment_on}, {args.workers} loader workers")
    config, candidate = settings(args, gpu)
    figures: dict[str, float] = {}
    with workspace(args.dir) as tmp:
        started = time.perf_counter()
        prepared = synthetic_prepared(tmp / "prepared", list(config.classes), args.photos)
        print(
            f"synthetic prepared set of {args.photos} photos: {time.perf_counter() - started:.0f} s"
        )

        # The network's step first: the Trainer's deterministic=True stays set after it ends.
        _, module = data_and_module(config, candidate, prepared)
        steps = args.steps or 50
        figures["step"] = step_rate(module.predictor, args.batch, steps, device, args.precision)
        print(f"network training step: {figures['step']:,.0f} images/s ({steps} steps)")
        del module

        timer = LoopTimer(args.warmup)
        try:
            train(config, candidate, prepared, tmp / "work", tmp / "live", callbacks=[timer])
            figures["train"] = timer.rate
        except Exception as err:  # e.g. a precision this machine lacks: say why, go on
            print(f"train stage: skipped ({type(err).__name__}: {err})")
            return figures
    print(
        f"train stage: {figures['train']:,.0f} images/s ({timer.images} photos timed)\n"
        f"ratio train stage / network step: {figures['train'] / figures['step']:.2f} "
        "(target >= 0.5 on a GPU)"
    )
    return figures


if __name__ == "__main__":
    main()
