"""`dvc repro collect dedupe` from scratch, then again after 1% new photos arrived.

    python benchmarks/incremental.py [--new-share 0.01] [--check]

Builds a throwaway copy of the project (the bundled Avito archive, the reviewed catalog and
an `incoming` folder source, empty at first) and times `dvc repro collect dedupe` twice: from
scratch (empty per-photo caches), then after adding new photos to `incoming` (random crops of
the bundled photos, 120x90: some are near copies of old ones) worth `--new-share` of the
archive. Besides the wall time of each `dvc repro` (DVC's hashing, inventory and validate
included), it reports what the stages print as their per-photo work: collect's decode, checks,
hashes and thumbnails (reading the sources included) and dedupe's two networks. Target: the
rerun's per-photo work at most 10% of the first run's.

--check then removes the caches (.cache/collect, .cache/dedupe) and the outputs and runs from
scratch on the same photos, and compares the md5 DVC records for data/collected and
data/deduped with the incremental run's: equal when the rerun wrote what a clean run writes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect_repro import project_copy
from ingest import variants
from machine import cpu_model
from options import share

REPO = Path(__file__).resolve().parents[1]
ARCHIVE_PHOTOS = 4277  # the bundled archive's photos
OUTPUTS = ("data/collected", "data/deduped")


def prepare(project: Path) -> None:
    """The project copy with the bundled sources and an empty `incoming` folder source."""
    project_copy(project)
    for name in ("avito-raw.tar.gz", "reviewed/catalog.csv"):
        (project / "data/raw" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / "data/raw" / name, project / "data/raw" / name)
    for label in ("laptop", "phone"):
        (project / "data/raw/incoming" / label).mkdir(parents=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["collect"]["sources"].append({"kind": "folder", "path": "incoming"})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def add_photos(project: Path, n: int) -> None:
    for i, data in enumerate(variants(n, (120, 90), seed=4242)):
        label = ("laptop", "phone")[i % 2]
        (project / "data/raw/incoming" / label / f"new-{i:05d}.jpg").write_bytes(data)


def repro(project: Path, *, force: bool = False) -> tuple[float, float, float, str]:
    """`dvc repro collect dedupe`: (wall s, collect's per-photo s, dedupe's, their summary)."""
    env = {
        **os.environ,
        "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
    }
    start = time.perf_counter()
    proc = subprocess.run(
        ["dvc", "repro", *(["--force"] if force else []), "collect", "dedupe"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"dvc repro failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    found = {
        stage: (float(m[1]), m[0])
        for stage in ("collect", "dedupe")
        if (m := re.search(rf"{stage}: per-photo work in ([\d.]+) s: .*", proc.stdout))
    }
    if len(found) != 2:
        raise SystemExit(f"no per-photo summary in the stages' output:\n{proc.stdout[-3000:]}")
    lines = "\n".join(f"    {found[s][1]}" for s in ("collect", "dedupe"))
    return seconds, found["collect"][0], found["dedupe"][0], lines


def output_md5s(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"] in OUTPUTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-share", type=share, default=0.01)
    parser.add_argument("--check", action="store_true", help="compare with a clean run")
    args = parser.parse_args()
    new = max(1, round(ARCHIVE_PHOTOS * args.new_share))
    print(f"{cpu_model()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        prepare(project)
        first, c1, d1, lines = repro(project)
        print(f"from scratch:  {first:6.1f} s, per-photo work {c1 + d1:6.1f} s\n{lines}")
        add_photos(project, new)
        again, c2, d2, lines = repro(project)
        print(f"+{new} photos:   {again:6.1f} s, per-photo work {c2 + d2:6.1f} s\n{lines}")
        print(
            f"rerun / first: {again / first:.1%} of the wall time, "
            f"{(c2 + d2) / (c1 + d1):.1%} of the per-photo work (target <= 10%)"
        )
        if args.check:
            incremental = output_md5s(project)
            for folder in (".cache/collect", ".cache/dedupe", *OUTPUTS):
                shutil.rmtree(project / folder)
            clean, *_ = repro(project, force=True)
            same = output_md5s(project) == incremental
            print(f"clean run on the same photos: {clean:6.1f} s; outputs identical: {same}")
            print(f"    {incremental}")


if __name__ == "__main__":
    main()
