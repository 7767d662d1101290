"""What training costs on this CPU: each candidate's training step at each side it may train
at, and the seconds its schedule in params.yaml then takes, natively and with the kernels of a
CPU without AVX-512.

    python benchmarks/train_cpu.py [--candidates effnet_finetune] [--sides 192,160,128]
                                   [--isa native avx2] [--seconds 15]
                                   [-S candidates.effnet_finetune.options.frozen_blocks=2 ...]

Per --isa, in a child process (the setting must be made before torch loads): native is what
torch picks on this machine; avx2 caps ATen's kernels (ATEN_CPU_CAPABILITY=avx2) and oneDNN's
(ONEDNN_MAX_CPU_ISA=AVX2) at AVX2, the code a 2-core AMD EPYC without AVX-512 runs, on this
machine's cores (an estimate of such a machine, not a measurement of it).

For each candidate: the training step (forward, cross-entropy, backward, AdamW at the candidate's
batch size, uint8 images resized inside the network as in training, after two warm-up steps,
for at least --seconds) at each --side, and inference at input_size (the validation pass); then
the candidate's schedule as params.yaml sets it (max_epochs, of which all but full_size_epochs
at train_input_size when set), each epoch over the prepared train split with a validation pass,
in seconds. Augmentation, CutMix and loader time are left out (benchmarks/loader.py measures the
loader: about 10x faster than the fastest step), so a stage run takes somewhat longer. -S
overrides params.yaml for this run only (as `dvc exp run -S`), e.g. to price a recipe change.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model
from options import positive_float, sizes

from vitrine.config import add_overrides_option, load_params

REPO = Path(__file__).resolve().parents[1]
ISA_ENV = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
PREPARED_IMAGE = 128  # prepare.image_size: the side of the uint8 batches the network resizes


def rate(run_once: Callable[[], int], seconds: float) -> float:
    """Images/s of repeated run_once() calls (each returns how many images it handled)."""
    images, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds or images == 0:
        images += run_once()
    return images / elapsed


def measure(name: str, sides: list[int], seconds: float, params: dict) -> dict:
    """Training-step images/s per side and inference images/s at input_size (in this process)."""
    import torch
    import torch.nn.functional as F

    from vitrine.model.networks import ImageClassifier
    from vitrine.model.training import candidate_config
    from vitrine.runtime.network_input import network_input

    recipe = candidate_config(params, name)
    torch.manual_seed(0)
    module = ImageClassifier(
        recipe.model,
        list(params["classes"]),
        recipe.lr,
        input_size=recipe.input_size,
        options=recipe.options,
    ).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad])
    images = torch.randint(0, 256, (recipe.batch_size, PREPARED_IMAGE, PREPARED_IMAGE, 3))
    images = images.to(torch.uint8)
    labels = torch.randint(0, len(params["classes"]), (recipe.batch_size,))
    steps = {}
    for side in sides:

        def step(side: int = side) -> int:
            logits = module.predictor.normalised(network_input(images, side))
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return len(labels)

        step(), step()  # warm-up: oneDNN picks its kernels for the shape
        steps[side] = rate(step, seconds)
    module.eval()

    def infer() -> int:
        with torch.no_grad():
            module(images)
        return len(labels)

    infer()
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "step": steps,
        "infer": rate(infer, seconds / 2),
    }


def schedule_seconds(recipe: dict, figures: dict, n_train: int, n_val: int) -> float | None:
    """The candidate's epochs as params.yaml schedules them, from the measured rates (None when a
    side it trains at was not measured)."""
    epochs, full = recipe["max_epochs"], recipe.get("full_size_epochs", 1)
    small = recipe.get("train_input_size", 0)
    plan = [(small, epochs - full), (recipe["input_size"], full)] if small else []
    plan = plan or [(recipe["input_size"], epochs)]
    total = epochs * n_val / figures["infer"]
    for side, count in plan:
        if count > 0:
            rate_at = figures["step"].get(str(side))  # JSON keys: the sides as strings
            if rate_at is None:
                return None
            total += count * n_train / rate_at
    return total


def split_sizes() -> tuple[int, int]:
    """Train and val photos of data/prepared (the bundled data's 2,337 and 451 if absent)."""
    import pandas as pd

    manifest = REPO / "data/prepared/manifest.parquet"
    if not manifest.exists():
        return 2337, 451
    counts = pd.read_parquet(manifest, columns=["split"])["split"].value_counts()
    return int(counts.get("train", 0)), int(counts.get("val", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="*", default=["effnet_finetune"])
    parser.add_argument("--sides", type=sizes, default="192,160,128")
    parser.add_argument("--isa", nargs="*", default=["native", "avx2"], choices=sorted(ISA_ENV))
    parser.add_argument("--seconds", type=positive_float, default=15.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_overrides_option(parser)
    args = parser.parse_args()
    sides = args.sides
    params = load_params(REPO / "params.yaml", args.overrides)
    if args.child:
        print(json.dumps(measure(args.child, sides, args.seconds, params)))
        return

    n_train, n_val = split_sizes()
    print(f"{cpu_model()}, {os.cpu_count()} cores; {n_train} train and {n_val} val photos")
    header = " ".join(f"{f'step@{s}':>10}" for s in sides)
    print(
        f"{'isa':<7} {'capability':<10} {'candidate':<16} {header} {'infer':>8} {'schedule s':>11}"
    )
    for isa in args.isa:
        env = {**os.environ, **ISA_ENV[isa]}
        for name in args.candidates:
            command = [sys.executable, __file__, "--child", name]
            command += ["--sides", ",".join(map(str, sides)), "--seconds", str(args.seconds)]
            command += [f"-S{key}={json.dumps(value)}" for key, value in args.overrides]
            out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{isa} {name} failed:\n{out.stderr}")
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            total = schedule_seconds(params["candidates"][name], figures, n_train, n_val)
            steps = " ".join(f"{figures['step'][str(s)]:>10.1f}" for s in sides)
            shown = f"{total:11.0f}" if total is not None else f"{'-':>11}"
            print(
                f"{isa:<7} {figures['capability']:<10} {name:<16} {steps} "
                f"{figures['infer']:>8.1f} {shown}",
                flush=True,
            )
    print("images/s; schedule: seconds of training steps and validation passes, loader excluded")


if __name__ == "__main__":
    main()
