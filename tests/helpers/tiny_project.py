"""A throwaway copy of the repository whose sources are a few real Avito photos per class, for
tests that run the whole pipeline (`dvc repro`) end to end: the working tree copied (tracked
and untracked files git does not ignore), the vendored archive replaced by a small one, params
changed in place, `dvc` run with the venv's tools and a BentoML store inside the copy."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.helpers import REPO

ARCHIVE = REPO / "data/raw/avito-raw.tar.gz"
# extra(archive, label, photo): adds files of a test's own beside a class's first photo.
Extra = Callable[[tarfile.TarFile, str, bytes], None]


def copy_repo(dest: Path) -> None:
    """The working tree at `dest`: git's tracked files and the untracked ones it does not ignore."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


def tiny_archive(path: Path, per_class: int, extra: Extra | None = None) -> None:
    """The first `per_class` photos of each class of the vendored archive, in its order, as an
    archive at `path`; `extra(archive, label, photo)` is called once per class with its first
    photo, to add files of its own."""
    picked: dict[str, int] = {}
    with tarfile.open(ARCHIVE) as src, tarfile.open(path, "w:gz") as dst:
        for m in src:
            label = m.name.split("/")[-2] if m.isfile() else ""
            if m.isfile() and picked.get(label, 0) < per_class:
                picked[label] = picked.get(label, 0) + 1
                data = src.extractfile(m).read()  # type: ignore[union-attr]
                dst.addfile(m, io.BytesIO(data))
                if picked[label] == 1 and extra is not None:
                    extra(dst, label, data)


def photos_left_out(per_class: int, n: int) -> dict[str, list[bytes]]:
    """n photos per class of the vendored archive that `tiny_archive(path, per_class)` leaves
    out (the next ones in its order), by class."""
    seen: dict[str, int] = {}
    found: dict[str, list[bytes]] = {}
    with tarfile.open(ARCHIVE) as src:
        for m in src:
            if m.isfile():
                label = m.name.split("/")[-2]
                seen[label] = seen.get(label, 0) + 1
                if per_class < seen[label] <= per_class + n:
                    data = src.extractfile(m).read()  # type: ignore[union-attr]
                    found.setdefault(label, []).append(data)
    return found


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_params(repo: Path) -> dict[str, Any]:
    return yaml.safe_load((repo / "params.yaml").read_text())


def set_params(repo: Path, **changes: Any) -> None:
    """params.yaml with `changes` ({"a.b.c": value}) applied."""
    params = read_params(repo)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params
        for p in parents:
            node = node[p]
        node[leaf] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def tool_env(repo: Path) -> dict[str, str]:
    """The environment `dvc` runs in: the venv's tools first, BentoML's store inside the copy."""
    return {
        **os.environ,
        "PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}",
        "BENTOML_HOME": str(repo / ".bentoml"),
    }


def dvc(repo: Path, *args: str) -> str:
    """`dvc <args>` in the copy, its stdout; AssertionError with the output's end on failure."""
    done = subprocess.run(
        ["dvc", *args], cwd=repo, env=tool_env(repo), capture_output=True, text=True
    )
    assert done.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done.stdout


def two_classes(params: dict[str, Any]) -> dict[str, Any]:
    """The changes ({"a.b": value}) that switch params.yaml's other class off: the class out of
    `classes`, of the business values and of the cost matrix ({} when there is none). The tiny
    archive holds laptops and phones only, and the other class's photos would come from review
    decisions naming photos it leaves out."""
    other = params.get("other_class") or ""
    if not other:
        return {}
    evaluate = params["evaluate"]
    return {
        "classes": [c for c in params["classes"] if c != other],
        "other_class": "",
        "evaluate.business_value": {
            c: v for c, v in evaluate["business_value"].items() if c != other
        },
        "evaluate.cost_matrix": [e for e in evaluate["cost_matrix"] if other not in e[:2]],
    }


def tiny_project(
    dest: Path,
    per_class: int,
    *,
    candidates: tuple[str, ...] | None = None,
    params: dict[str, Any] | None = None,
    extra: Extra | None = None,
) -> Path:
    """The repository copied to `dest`, its archive cut to `per_class` photos per class, every
    candidate (or only those named in `candidates`: the others removed, with their int8 and
    serving entries) trained for one epoch, the other class switched off (two_classes), then
    `params` ({"a.b": value}) applied; a git repository (DVC wants one), not yet run."""
    copy_repo(dest)
    tiny_archive(dest / "data/raw/avito-raw.tar.gz", per_class, extra)
    current = read_params(dest)
    kept = {
        name: {**settings, "max_epochs": 1}
        for name, settings in current["candidates"].items()
        if candidates is None or name in candidates
    }
    by_candidate = current["serve"].get("by_candidate") or {}
    changes = {
        "candidates": kept,
        "evaluate.int8": [n for n in current["evaluate"]["int8"] if n in kept],
        "serve.by_candidate": {n: v for n, v in by_candidate.items() if n in kept},
    }
    set_params(dest, **(changes | two_classes(current) | (params or {})))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest
