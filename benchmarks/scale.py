"""The data stages' cost curve: collect, validate, dedupe and prepare on synthetic catalogs.

    python benchmarks/scale.py [--sizes 10000,40000,160000] [--new-share 0.01]
                               [--workers 1,2] [--dask-size 10000]

Each catalog is a folder source of small JPEGs (about 120 px on the longest side, 3-4 kB, like
the marketplace thumbnails) in three classes: distinct procedural scenes (a texture or gradient,
6-15 random shapes, random text; each class favours one kind of shape), with every tenth photo
a near copy of an earlier one (resized, recompressed or cropped to 90-97%, in turn) and 2% of
the distinct photos filed under a wrong class, their copies with them. The scenes are varied
enough that no two distinct ones pair up by pHash and descriptor (measured on 2,000: the
closest descriptor cosine 0.93, where dedupe's loosest tier needs 0.95 with a pHash within 6
bits), and the script checks it: after dedupe it reports how many injected copies landed in
their original's cluster and how many distinct photos were merged with another.

Per size, in a throwaway copy of the project (benchmarks/collect_repro.project_copy), it times
`dvc repro collect` (inventory and collect), then `dvc repro -s validate`, `-s dedupe` and
`-s prepare`, each with the sampled peak memory of its whole process tree (collect_repro.
timed_repro: its PSS, and the sum of its RSS), and prints wall seconds, photos/s and both per
stage. Then it adds `--new-share` new photos to the largest catalog and re-runs the four, to
print the incremental cost as a share of the from-scratch time; and it runs the smallest
catalog again, from scratch, with `compute.scheduler` set to the address of a
dask.distributed.LocalCluster of each of `--workers` worker processes, to show how the Dask
path's wall time follows the workers. The ratios the pipeline is held to: time per photo at
the largest size within 1.3x of the smallest, peak PSS of the process tree at most 4 GiB, the
incremental re-run at most 10% of the run from scratch.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
import options
from collect_repro import REPO, project_copy, timed_repro
from machine import cpu_model

CLASSES = ("bag", "lamp", "watch")  # synthetic: each favours one kind of shape
STAGES = ("collect", "validate", "dedupe", "prepare")
COPY_EVERY = 10  # photo i is a near copy of photo i - 5 when i % 10 == 9
COPY_KINDS = ("resized", "recompressed", "cropped")
WRONG_LABEL_SHARE = 0.02  # distinct photos filed under another class (label noise)
SHAPES = ("ellipse", "rectangle", "polygon", "line")
SIDES = ((120, 90), (90, 120), (120, 120), (120, 80), (100, 120))
SOURCE = "photos"
GIB = 2**30
NAME = re.compile(r"(\d+)(?:-copy-of-(\d+))?\.jpg$")


# --- the synthetic catalog -----------------------------------------------------------------


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in rng.integers(0, 256, 3))
    return r, g, b


def true_class(index: int, seed: int) -> int:
    """Distinct photo `index`'s class (an index into CLASSES): scene's first draw."""
    return int(np.random.default_rng([seed, index]).integers(len(CLASSES)))


def scene(index: int, seed: int) -> tuple[Image.Image, int]:
    """Distinct photo `index`: its pixels and its true class (an index into CLASSES)."""
    rng = np.random.default_rng([seed, index])
    true_class = int(rng.integers(len(CLASSES)))
    w, h = SIDES[int(rng.integers(len(SIDES)))]
    cells = int(rng.integers(2, 12))  # a texture at a random scale, over a gradient
    noise = rng.integers(0, 256, (cells, cells * w // h + 1, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC))
    ramp = np.linspace(0, 1, w)[None, :, None] * rng.uniform(-120, 120, 3) + rng.uniform(0, 255, 3)
    mix = texture * rng.uniform(0.2, 0.8) + ramp * 0.5
    img = Image.fromarray(np.clip(mix, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    weights = np.full(len(SHAPES), 1.0)
    weights[true_class] = 3.0  # the class shows in what is drawn, for the noise scores
    for kind in rng.choice(len(SHAPES), int(rng.integers(6, 16)), p=weights / weights.sum()):
        x0, y0 = int(rng.integers(-20, w)), int(rng.integers(-20, h))
        box = (x0, y0, x0 + int(rng.integers(10, w)), y0 + int(rng.integers(10, h)))
        if SHAPES[kind] == "ellipse":
            draw.ellipse(box, fill=_colour(rng))
        elif SHAPES[kind] == "rectangle":
            draw.rectangle(box, fill=_colour(rng))
        elif SHAPES[kind] == "polygon":
            corners = int(rng.integers(3, 7))
            draw.polygon(
                [(int(rng.integers(w)), int(rng.integers(h))) for _ in range(corners)], _colour(rng)
            )
        else:
            draw.line(box, fill=_colour(rng), width=int(rng.integers(1, 8)))
    if rng.random() < 0.5:
        text = "".join(chr(int(c)) for c in rng.integers(65, 91, int(rng.integers(3, 10))))
        draw.text((int(rng.integers(0, w // 2)), int(rng.integers(0, h - 12))), text, _colour(rng))
    return img, true_class


def jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def near_copy(img: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """A re-upload of img: smaller, recompressed harder, or cropped to 90-97% and resized back."""
    w, h = img.size
    if kind == "resized":
        s = rng.uniform(0.6, 0.85)
        small = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
        return jpeg(small, int(rng.integers(70, 95)))
    if kind == "recompressed":
        return jpeg(img, int(rng.integers(40, 70)))
    s = rng.uniform(0.9, 0.97)
    cw, ch = round(w * s), round(h * s)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return jpeg(img.crop((x, y, x + cw, y + ch)).resize((w, h), Image.Resampling.BICUBIC), 85)


def original_of(index: int) -> int | None:
    """The photo that photo `index` is a near copy of, or None for a distinct photo."""
    return index - 5 if index % COPY_EVERY == COPY_EVERY - 1 else None


def filed_label(index: int, seed: int, true_class: int) -> str:
    """The class a distinct photo is filed under: its own, or for 2% of them another one."""
    rng = np.random.default_rng([seed, index, 1])
    if rng.random() < WRONG_LABEL_SHARE:
        return CLASSES[(true_class + int(rng.integers(1, len(CLASSES)))) % len(CLASSES)]
    return CLASSES[true_class]


def photo(index: int, seed: int) -> tuple[str, bytes]:
    """Photo `index` of the catalog: its path under the source folder and its JPEG bytes."""
    original = original_of(index)
    img, true_class = scene(index if original is None else original, seed)
    label = filed_label(index if original is None else original, seed, true_class)
    if original is None:
        return f"{label}/{index:07d}.jpg", jpeg(img, 85)
    kind = COPY_KINDS[(index // COPY_EVERY) % len(COPY_KINDS)]
    data = near_copy(img, kind, np.random.default_rng([seed, index, 2]))
    return f"{label}/{index:07d}-copy-of-{original:07d}.jpg", data


def _write_range(folder: Path, start: int, stop: int, seed: int) -> None:
    for i in range(start, stop):
        name, data = photo(i, seed)
        (folder / name).write_bytes(data)


def write_photos(folder: Path, start: int, stop: int, seed: int) -> None:
    """Photos start..stop-1 into folder/<class>/, on one process per core."""
    for label in CLASSES:
        (folder / label).mkdir(parents=True, exist_ok=True)
    chunks = [(folder, i, min(i + 1000, stop), seed) for i in range(start, stop, 1000)]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(os.cpu_count(), mp_context=context) as pool:
        list(pool.map(_write_range, *zip(*chunks, strict=True)))


# --- one catalog through the stages ----------------------------------------------------------


@dataclass
class StageRun:
    seconds: float
    peak_rss: int  # bytes, the sum of RSS over the stage's whole process tree, sampled
    peak_pss: int = 0  # bytes, its PSS (shared library pages counted once), sampled


@dataclass
class CatalogRun:
    photos: int
    stages: dict[str, StageRun] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages.values())

    @property
    def peak_rss(self) -> int:
        return max(s.peak_rss for s in self.stages.values())

    @property
    def peak_pss(self) -> int:
        return max(s.peak_pss for s in self.stages.values())


def project_at(project: Path, commit: str) -> None:
    """The project's files as `commit` has them (the sources under data/raw left out); ""
    copies the working tree instead (collect_repro.project_copy)."""
    if not commit:
        project_copy(project)
        return
    archive = subprocess.run(
        ["git", "archive", commit, "--", ".", ":(exclude)data/raw"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(project, filter="data")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)


def workspace(project: Path, size: int, seed: int, commit: str) -> None:
    """The project at `commit` with one folder source of `size` synthetic photos, the
    synthetic classes and no review decisions."""
    project_at(project, commit)
    write_photos(project / "data/raw" / SOURCE, 0, size, seed)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["classes"] = list(CLASSES)
    params["collect"]["sources"] = [{"kind": "folder", "path": SOURCE}]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / params["paths"]["decisions"]).write_text("id,decision,new_label,note\n")


def set_scheduler(project: Path, scheduler: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["compute"]["scheduler"] = scheduler
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stages(project: Path, photos: int) -> CatalogRun:
    run = CatalogRun(photos)
    for stage in STAGES:
        # collect with its inventory; the others alone (-s), not re-listing the sources
        targets = [stage] if stage == "collect" else ["-s", stage]
        code, seconds, peak, output = timed_repro(project, *targets)
        if code:
            raise SystemExit(f"dvc repro {' '.join(targets)} failed:\n{output}")
        run.stages[stage] = StageRun(seconds, peak["tree"], peak.get("pss_tree", 0))
    return run


@dataclass(frozen=True)
class CopyCheck:
    copies: int  # injected near copies
    found: int  # of them, in their original's cluster
    merged: int  # distinct photos in a cluster with another distinct photo
    mislabelled: int = 0  # kept photos filed under another class than their own
    flagged_mislabelled: int = 0  # of them, flagged as label issues
    flagged_others: int = 0  # kept photos flagged though filed under their own class


def check_clusters(project: Path, seed: int) -> CopyCheck:
    """Do dedupe's clusters match the injected copies, and its label issues the injected
    label noise? (Read from its manifest.)"""
    deduped = pd.read_parquet(
        project / "data/deduped/manifest.parquet",
        columns=["id", "cluster_id", "status", "label", "label_issue"],
    )
    cluster: dict[int, str] = {}
    copies: list[tuple[int, int]] = []  # (copy, original)
    wrong = np.zeros(len(deduped), dtype=bool)
    for row, (photo_id, cluster_id, label) in enumerate(
        zip(deduped["id"], deduped["cluster_id"], deduped["label"], strict=True)
    ):
        found = NAME.search(photo_id)
        assert found, photo_id
        cluster[int(found[1])] = cluster_id
        distinct = int(found[1]) if found[2] is None else int(found[2])
        wrong[row] = label != CLASSES[true_class(distinct, seed)]
        if found[2] is not None:
            copies.append((int(found[1]), int(found[2])))
    found_copies = sum(cluster[c] == cluster[o] for c, o in copies)
    copy_ids = {c for c, _ in copies}
    distinct_ids = pd.Series([k for i, k in cluster.items() if i not in copy_ids])
    merged = int(distinct_ids.duplicated(keep=False).sum())
    kept = (deduped["status"] == "kept").to_numpy()
    issue = deduped["label_issue"].fillna(False).to_numpy(dtype=bool)
    return CopyCheck(
        len(copies),
        found_copies,
        merged,
        int((kept & wrong).sum()),
        int((kept & wrong & issue).sum()),
        int((kept & ~wrong & issue).sum()),
    )


def copies_line(check: CopyCheck) -> str:
    return (
        f"near copies in their original's cluster: {check.found:,} of {check.copies:,}; "
        f"distinct photos merged with another: {check.merged:,}\n"
        f"  kept photos filed under a wrong class flagged as label issues: "
        f"{check.flagged_mislabelled:,} of {check.mislabelled:,}; others flagged: "
        f"{check.flagged_others:,}"
    )


def table(title: str, run: CatalogRun) -> str:
    header = (
        f"  {'stage':<9} {'wall s':>8} {'photos/s':>9} {'peak PSS MiB':>13} {'RSS sum MiB':>12}"
    )
    lines = [title, header]
    rows = [*run.stages.items(), ("total", StageRun(run.seconds, run.peak_rss, run.peak_pss))]
    for name, stage in rows:
        lines.append(
            f"  {name:<9} {stage.seconds:8.1f} {run.photos / stage.seconds:9.0f} "
            f"{stage.peak_pss / 2**20:13.0f} {stage.peak_rss / 2**20:12.0f}"
        )
    return "\n".join(lines)


@contextmanager
def local_cluster(workers: int, project: Path) -> Iterator[str]:
    """A dask.distributed.LocalCluster of `workers` single-threaded processes that import the
    project's code (not the working tree's): its scheduler's address."""
    from dask.distributed import LocalCluster

    sys.path.insert(0, str(project))  # the spawned workers start with this process's path
    try:
        with LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            yield cluster.scheduler_address
    finally:
        sys.path.remove(str(project))


def catalog_run(
    size: int, seed: int, commit: str, workers: int = 0, new_share: float = 0.0
) -> tuple[CatalogRun, CopyCheck, CatalogRun | None]:
    """From scratch on `size` photos, on `workers` of a LocalCluster of its own (0: each stage
    starts local processes); then, if new_share, again after that share was added."""
    with tempfile.TemporaryDirectory(prefix="vitrine-scale-") as tmp:
        project = Path(tmp)
        workspace(project, size, seed, commit)
        with local_cluster(workers, project) if workers else nullcontext("") as address:
            set_scheduler(project, address)
            first = run_stages(project, size)
        check = check_clusters(project, seed)
        again = None
        if new_share:
            new = max(1, round(size * new_share))
            write_photos(project / "data/raw" / SOURCE, size, size + new, seed)
            again = run_stages(project, size + new)
        return first, check, again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=options.sizes, default="10000,40000,160000", help="photos per catalog"
    )
    parser.add_argument(
        "--new-share", type=options.share, default=0.01, help="added to the largest"
    )
    parser.add_argument(
        "--workers",
        type=options.sizes_or_none,
        default="1,2",
        help="LocalCluster sizes ('' for none)",
    )
    parser.add_argument(
        "--dask-size", type=options.at_least(0), default=0, help="its catalog (default: smallest)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--commit", default="HEAD", help="the code to measure ('' for the working tree)"
    )
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    if args.commit:  # one commit for every run, however HEAD moves meanwhile
        args.commit = subprocess.run(
            ["git", "rev-parse", "--short", args.commit],
            cwd=REPO,
            capture_output=True,
            check=True,
            text=True,
        ).stdout.strip()
    print(f"{cpu_model()}, {os.cpu_count()} cores; code at {args.commit or 'the working tree'}")
    runs: dict[int, CatalogRun] = {}
    again = None
    for size in sizes:
        largest = size == sizes[-1]
        share = args.new_share * largest
        run, check, rerun = catalog_run(size, args.seed, args.commit, new_share=share)
        runs[size] = run
        print(table(f'{size:,} photos, local Dask processes (compute.scheduler: "")', run))
        print(f"  {copies_line(check)}", flush=True)
        if rerun is not None:
            again = rerun
            print(table(f"+{rerun.photos - size:,} new photos, re-run", rerun), flush=True)
    small, large = runs[sizes[0]], runs[sizes[-1]]
    growth = (large.seconds / large.photos) / (small.seconds / small.photos)
    print(f"time per photo at {sizes[-1]:,} / at {sizes[0]:,}: {growth:.2f}x (target <= 1.3x)")
    print(
        f"peak memory at {sizes[-1]:,}: {large.peak_pss / GIB:.2f} GiB PSS of the process tree "
        f"(target <= 4 GiB; the sum of its RSS, shared libraries counted per process: "
        f"{large.peak_rss / GIB:.2f} GiB)"
    )
    if again is not None:
        share = again.seconds / large.seconds
        print(
            f"re-run after {args.new_share:.0%} new photos: {share:.1%} of the time from "
            "scratch (target <= 10%)"
        )
    dask_size = args.dask_size or sizes[0]
    for workers in args.workers:
        run, check, _ = catalog_run(dask_size, args.seed, args.commit, workers=workers)
        print(table(f"{dask_size:,} photos, a LocalCluster of {workers} worker(s)", run))
        print(f"  {copies_line(check)}", flush=True)


if __name__ == "__main__":
    main()
