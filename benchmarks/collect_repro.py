"""End-to-end ingest rate of `dvc repro collect` on N small JPEGs, DVC's hashing included.

    python benchmarks/collect_repro.py [--n 20000] [--n-small 5000] [--source folder]

Builds a throwaway copy of the project whose only source holds N distinct 120x90 JPEGs (random
crops of the bundled Avito photos): a folder (default), an uncompressed tar archive of that
folder, or a CSV catalog of their paths. Times `dvc repro collect` (Dask start-up, decode,
checks, hashing, shards, manifest and DVC's hashing and caching of the outputs), and reports
images/s. It repeats with n-small images to show how peak memory (RSS, sampled) grows
with the catalog: of the whole process tree, and of its parts (DVC, the stage's own process,
its Dask processes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import variants
from options import at_least

REPO = Path(__file__).resolve().parents[1]


def project_copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, text=True
    ).stdout.split("\0")
    for name in filter(None, files):
        if name.startswith("data/raw/"):
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def photo_folder(root: Path, n: int) -> None:
    for c, label in enumerate(("laptop", "phone")):
        (root / label).mkdir(parents=True)
        for i, data in enumerate(variants(n // 2, (120, 90), seed=c + 1)):
            (root / label / f"{i:06d}.jpg").write_bytes(data)


def _role(p: psutil.Process) -> str:
    """dvc, stage (the stage's own process) or dask (its forked worker processes and the rest)."""
    command = " ".join(p.cmdline())
    if "stages.collect" not in command:
        return "dvc" if "dvc" in command else "dask"
    parent = p.parent()
    return "dask" if parent and "stages.collect" in " ".join(parent.cmdline()) else "stage"


PSS_EVERY_S = 0.5  # reading a process's PSS walks its mappings: about 13 ms a process


def peak_rss(proc: psutil.Process, stop: threading.Event, out: dict[str, int]) -> None:
    """Sample the RSS of the stage's whole process tree (DVC, python, Dask workers), and of
    each role in it: DVC itself, the stage's process, the Dask processes together; every
    PSS_EVERY_S also the tree's PSS ("pss_tree"), which counts the pages the processes share
    (torch's and ONNX Runtime's libraries, mapped by each worker) once, as the machine does,
    where a sum of RSS counts them once per process."""
    last_pss = 0.0
    while not stop.is_set():
        try:
            roles: dict[str, int] = {}
            tree = [proc, *proc.children(recursive=True)]
            for p in tree:
                role = _role(p)  # the tree's root is `dvc repro collect` itself
                roles[role] = roles.get(role, 0) + p.memory_info().rss
            roles["tree"] = sum(roles.values())
            if time.monotonic() - last_pss >= PSS_EVERY_S:
                last_pss = time.monotonic()
                roles["pss_tree"] = sum(p.memory_full_info().pss for p in tree)
            for role, rss in roles.items():
                out[role] = max(out.get(role, 0), rss)
        except psutil.Error:
            pass
        time.sleep(0.05)


# The source kinds this benchmark can build, and how its report names each.
SOURCES = {"folder": "in a folder", "archive": "in a tar", "catalog": "listed in a CSV"}


def photo_source(raw: Path, n: int, kind: str) -> dict[str, str]:
    """N photos under raw as a source of this kind; its collect.sources entry."""
    photo_folder(raw / "photos", n)
    if kind == "archive":
        with tarfile.open(raw / "photos.tar", "w") as tar:
            tar.add(raw / "photos", arcname="photos")
        shutil.rmtree(raw / "photos")
        return {"kind": "archive", "path": "photos.tar"}
    if kind == "catalog":
        with open(raw / "photos.csv", "w") as f:
            f.write("id,label,path\n")
            for path in sorted((raw / "photos").glob("*/*.jpg")):
                f.write(
                    f"{path.parent.name}/{path.name},{path.parent.name},{path.relative_to(raw)}\n"
                )
        return {"kind": "catalog", "path": "photos.csv"}
    return {"kind": "folder", "path": "photos"}


def timed_repro(project: Path, *targets: str) -> tuple[int, float, dict[str, int], str]:
    """`dvc repro <targets>` in the project: exit code, seconds, peak RSS by role (sampled, see
    peak_rss) and the output's last 3,000 characters."""
    env = {**os.environ, "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}"}
    env |= {"DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        ["dvc", "repro", *targets],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=peak_rss, args=(psutil.Process(proc.pid), stop, peak))
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return proc.returncode, seconds, peak, out[-3000:]


def run(n: int, kind: str) -> tuple[float, dict[str, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        project_copy(project)
        source = photo_source(project / "data/raw", n, kind)
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["collect"]["sources"] = [source]
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        code, seconds, peak, output = timed_repro(project, "collect")
        if code:
            raise SystemExit(f"dvc repro collect failed:\n{output[-2000:]}")
        return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=at_least(1), default=20000)
    parser.add_argument("--n-small", type=at_least(1), default=5000)
    parser.add_argument("--source", choices=list(SOURCES), default="folder")
    args = parser.parse_args()
    for n in (args.n_small, args.n):
        seconds, rss = run(n, args.source)
        roles = ", ".join(f"{r} {rss.get(r, 0) / 2**20:.0f}" for r in ("dvc", "stage", "dask"))
        print(
            f"dvc repro collect, {n:>6} JPEGs 120x90 {SOURCES[args.source]}: {seconds:6.1f} s "
            f"= {n / seconds:6.0f} images/s, peak RSS of the process tree "
            f"{rss['tree'] / 2**20:6.0f} MiB ({roles} MiB)"
        )
    print("target: >= 1,500 images/s; peak memory flat as N grows")


if __name__ == "__main__":
    main()
