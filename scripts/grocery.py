"""Run the whole pipeline on the GroceryStore dataset in its own workspace (`make grocery`).

    python -m scripts.grocery [--tar PATH] [--workspace DIR] [--profile NAME] [STAGE ...]

1. copies the project's files (tracked and untracked, not ignored; not params.yaml, dvc.lock or
   data/raw/) into the workspace, default build/grocery (ignored by git), changed files only;
2. extracts the photos and the published lists from the tar (GROCERY_TAR, default
   ../shared/datasets/grocery-store.tar) into <workspace>/data/grocery/, once, and writes
   catalog.csv there: id, label (the class's taxonomy path, Fruit/Apple/Granny-Smith), path,
   split (train, val or test, as published);
3. writes <workspace>/params.yaml: this project's params.yaml with every key of
   configs/grocery.yaml set (dotted keys, as `dvc exp run -S`; a key params.yaml lacks is an
   error), so the variant follows every other change of params.yaml; `--profile gpu` then sets
   configs/grocery-gpu.yaml's keys too (a profile: the same dotted keys, for other hardware);
4. runs `dvc repro [STAGE ...]` there (DVC without git: the workspace is a build folder).
"""

from __future__ import annotations

import argparse
import csv
import filecmp
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from dvc.utils.serialize import modify_yaml

from vitrine.config import ConfigError, apply_overrides

REPO = Path(__file__).resolve().parents[1]
VARIANT = REPO / "configs" / "grocery.yaml"
DEFAULT_TAR = os.environ.get("GROCERY_TAR", str(REPO.parent / "shared/datasets/grocery-store.tar"))
DEFAULT_WORKSPACE = os.environ.get("GROCERY_WORKSPACE", str(REPO / "build" / "grocery"))
SPLITS = ("train", "val", "test")
DATA_DIR = "data/grocery"  # the variant's paths.raw, relative to the workspace
CATALOG = "catalog.csv"
# Never copied: the variant writes its own params.yaml, keeps its own dvc.lock, and has no use
# for the bundled Avito archive.
NOT_COPIED = ("params.yaml", "dvc.lock")
# The workspace has its own sources and writes its own reports (the repository keeps the
# bundled data's metrics in git).
NOT_COPIED_UNDER = ("data/raw/", "reports/")
TELEMETRY_OFF = {
    "DVC_NO_ANALYTICS": "1",
    "BENTOML_DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
}


class VariantError(ValueError):
    """The dataset or the variant's parameters are not what the variant expects."""


# --- the catalog -----------------------------------------------------------------------------


def taxonomy_labels(classes_csv: Path) -> dict[int, str]:
    """Fine class id -> its path group/coarse/fine, e.g. 1 -> Fruit/Apple/Granny-Smith.

    The group (Fruit, Vegetables, Packages) is the first folder of the class's iconic image;
    a fine class that is its own coarse class keeps three levels (Fruit/Avocado/Avocado), so
    every class has the same depth and the first two levels are always its coarse class."""
    labels: dict[int, str] = {}
    with open(classes_csv, newline="") as f:
        for row in csv.DictReader(f):
            group = PurePosixPath(row["Iconic Image Path (str)"].strip()).parts[2]
            coarse, fine = row["Coarse Class Name (str)"].strip(), row["Class Name (str)"].strip()
            labels[int(row["Class ID (int)"])] = f"{group}/{coarse}/{fine}"
    return labels


def _list_entries(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, photo path, fine class id) of a published list (`path, fine_id, coarse_id`)."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not fields[1].isdigit():
            raise VariantError(f"{path.name} line {n}: expected 'path, fine_id, coarse_id': {line}")
        yield n, fields[0], int(fields[1])


def catalog_rows(dataset: Path) -> list[dict[str, str]]:
    """One catalog row per photo of the published train/val/test lists under `dataset` (the
    tar's dataset/ folder). The label comes from the class id, not the photo's folder: the
    published folders disagree for one class (train/Vegetables/Brown-Cap-Mushroom but
    test/Vegetables/Mushroom/Brown-Cap-Mushroom)."""
    labels = taxonomy_labels(dataset / "classes.csv")
    rows = []
    for split in SPLITS:
        for n, photo, fine_id in _list_entries(dataset / f"{split}.txt"):
            if fine_id not in labels:
                raise VariantError(f"{split}.txt line {n}: class id {fine_id} not in classes.csv")
            rows.append(
                {
                    "id": photo,
                    "label": labels[fine_id],
                    "path": f"{dataset.name}/{photo}",
                    "split": split,
                }
            )
    return rows


def write_catalog(rows: list[dict[str, str]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "label", "path", "split"])
        writer.writeheader()
        writer.writerows(rows)


def check_classes(classes: list[str], rows: list[dict[str, str]]) -> None:
    """The variant's class list must be exactly the dataset's labels."""
    labels = {r["label"] for r in rows}
    missing, unused = sorted(labels - set(classes)), sorted(set(classes) - labels)
    if missing or unused:
        raise VariantError(
            f"the variant's classes do not match the dataset: not listed {missing}, "
            f"listed but without photos {unused}"
        )


def _wanted_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return name == "LICENSE" or (
        len(parts) >= 2
        and parts[0] == "dataset"
        and (parts[1] in SPLITS or parts[1] in {"classes.csv", *(f"{s}.txt" for s in SPLITS)})
    )


def extract_dataset(tar: Path, dest: Path) -> None:
    """The photos, lists and licence from the tar, into `dest` (written under a temporary name
    and renamed, so an existing `dest` is always complete and is not extracted again)."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not tar.is_file():
        raise VariantError(f"GroceryStore tar not found at {tar} (set GROCERY_TAR)")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tar) as archive:
        members = [m for m in archive.getmembers() if _wanted_member(m.name)]
        archive.extractall(partial, members=members, filter="data")
    partial.rename(dest)


# --- the workspace ---------------------------------------------------------------------------


def project_files(repo: Path) -> list[str]:
    """The project's files as git sees them: tracked, plus untracked ones not ignored."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=repo,
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    return [
        name
        for name in listing.split("\0")
        if name
        and name not in NOT_COPIED
        and not name.startswith(NOT_COPIED_UNDER)
        and (repo / name).is_file()
    ]


def sync_project(repo: Path, workspace: Path) -> int:
    """Copy the project's files into the workspace, only those that differ (unchanged files
    keep their timestamps). Returns how many were copied."""
    copied = 0
    for name in project_files(repo):
        src, dst = repo / name, workspace / name
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        copied += 1
    return copied


def write_variant_params(base: Path, overrides: Mapping[str, Any], out: Path) -> None:
    """`base` with every override applied, comments kept; `out` is rewritten only if it
    changes."""
    draft = out.with_name(out.name + ".draft")
    shutil.copyfile(base, draft)
    with modify_yaml(draft) as params:
        try:
            apply_overrides(params, overrides.items())
        except ConfigError as err:
            raise VariantError(str(err)) from err
    if out.is_file() and filecmp.cmp(draft, out, shallow=False):
        draft.unlink()
    else:
        draft.replace(out)


def ignore_build_folder(repo: Path, workspace: Path) -> None:
    """A workspace inside the repository sits in a folder git ignores entirely."""
    folder = workspace.resolve().parent
    if not folder.is_relative_to(repo):
        return
    if folder == repo:
        raise VariantError(f"{workspace}: put the workspace in a sub-folder, e.g. build/grocery")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text("*\n")


def profile_path(name: str) -> Path:
    """configs/grocery-<name>.yaml, which must exist."""
    path = VARIANT.with_name(f"{VARIANT.stem}-{name}.yaml")
    if not path.is_file():
        known = sorted(p.stem.removeprefix(f"{VARIANT.stem}-") for p in profiles())
        raise VariantError(f"no profile {name!r} ({path} is missing); known: {known}")
    return path


def profiles() -> list[Path]:
    return sorted(VARIANT.parent.glob(f"{VARIANT.stem}-*.yaml"))


def variant_overrides(variant: Path, profile: Path | None = None) -> dict[str, Any]:
    """The variant's dotted keys, then the profile's: a key both set takes the profile's value."""
    overrides = dict(yaml.safe_load(variant.read_text()))
    if profile is not None:
        overrides.update(yaml.safe_load(profile.read_text()) or {})
    return overrides


def set_up(
    repo: Path, workspace: Path, tar: Path, variant: Path = VARIANT, profile: Path | None = None
) -> int:
    """Everything but the run; returns the number of photos in the catalog."""
    overrides = variant_overrides(variant, profile)
    ignore_build_folder(repo, workspace)
    workspace.mkdir(parents=True, exist_ok=True)
    sync_project(repo, workspace)
    local = workspace / ".dvc" / "config.local"
    if not local.exists():  # the workspace is a build folder, not a git repository
        local.write_text("[core]\n    no_scm = True\n")
    data = workspace / DATA_DIR
    extract_dataset(tar, data)
    rows = catalog_rows(data / "dataset")
    check_classes(overrides["classes"], rows)
    write_catalog(rows, data / CATALOG)
    write_variant_params(repo / "params.yaml", overrides, workspace / "params.yaml")
    return len(rows)


def repro(workspace: Path, stages: list[str]) -> int:
    env = {
        **os.environ,
        **{k: os.environ.get(k, v) for k, v in TELEMETRY_OFF.items()},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "BENTOML_HOME": str(workspace / ".bentoml"),
    }
    return subprocess.run(["dvc", "repro", *stages], cwd=workspace, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="dvc repro targets (default: every stage)")
    parser.add_argument("--tar", type=Path, default=Path(DEFAULT_TAR))
    parser.add_argument("--workspace", type=Path, default=Path(DEFAULT_WORKSPACE))
    parser.add_argument("--setup-only", action="store_true", help="prepare the workspace only")
    parser.add_argument(
        "--profile", default="", help="also set configs/grocery-<PROFILE>.yaml's keys, e.g. gpu"
    )
    args = parser.parse_args(argv)
    try:
        profile = profile_path(args.profile) if args.profile else None
        photos = set_up(REPO, args.workspace, args.tar, profile=profile)
    except VariantError as err:
        print(f"grocery: {err}", file=sys.stderr)
        return 2
    print(f"grocery: workspace {args.workspace}, {photos} photos in {DATA_DIR}/{CATALOG}")
    return 0 if args.setup_only else repro(args.workspace, args.stages)


if __name__ == "__main__":
    sys.exit(main())
