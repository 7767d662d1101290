"""prepare's squares kept between runs by sha256, so that a re-run decodes only new photos.

Decoding and resizing every kept photo is prepare's cost at catalog scale: at 160,000 photos
it is most of the stage, and a run after 1% new photos arrived decoded all of them again. The
squares are pure functions of a photo's bytes, the square's side, the resize rule and the
decoding code, so after packing, prepare hard-links its split arrays into `<cache_dir>/`
beside an index of the sha256 at each row and the `version` they were made under; the next
run copies the rows of the photos it already has from there and decodes the others.

Hard links, not copies: the cache costs no disk beyond the arrays DVC already tracks (7.2 GB
at 160,000 photos at 128 px), and DVC deleting its outputs before a run leaves the linked
files whole. prepare therefore writes each new array to a fresh file and renames it into
place, never into a file that may be one of these links. Where links cannot be made (another
file system), nothing is kept and every run decodes everything. The cache holds the last run's
squares only: a photo that left and came back is decoded again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from vitrine import images
from vitrine.ingest.photo_cache import code_version

INDEX = "squares.parquet"  # sha256, split, index: where each cached square sits
VERSION = "version.json"
_DISTRIBUTIONS = ("pillow", "numpy")


def squares_version(image_size: int, resize: str) -> str:
    """What the squares were made by: vitrine.images' code, Pillow and numpy, size and rule."""
    settings = {"image_size": image_size, "resize": resize}
    return code_version((images,), _DISTRIBUTIONS, settings)


class Squares:
    """The previous run's squares of one version, looked up by sha256 (empty when the cache is
    missing, of another version, or does not match its index). Read with plain reads, not a
    memory map: a map's pages would count in this process's resident memory, 7.2 GB of them
    when a 160,000-photo catalog comes back whole."""

    def __init__(self, directory: Path | None, version: str, image_size: int):
        self.files: dict[str, tuple[int, int]] = {}  # split -> (file descriptor, data offset)
        self.where: dict[str, tuple[str, int]] = {}
        self.square_bytes = image_size * image_size * 3
        if directory is None or not _is_version(directory, version):
            return
        try:
            index = pd.read_parquet(directory / INDEX)
            for split in index["split"].unique():
                fd, offset, shape = _open_array(directory / f"{split}.npy")
                self.files[str(split)] = (fd, offset)
                rows = index.loc[index["split"] == split, "index"]
                if shape[1:] != (image_size, image_size, 3) or rows.max() >= shape[0]:
                    return self.close()
        except (OSError, ValueError, KeyError):
            return self.close()
        self.where = {
            str(d): (str(s), int(i))
            for d, s, i in zip(index["sha256"], index["split"], index["index"], strict=True)
        }

    def get(self, sha256: str) -> bytes | None:
        """The square of photo `sha256` (its uint8 bytes), or None when it has to be decoded."""
        found = self.where.get(sha256)
        if found is None:
            return None
        fd, offset = self.files[found[0]]
        return os.pread(fd, self.square_bytes, offset + found[1] * self.square_bytes)

    def close(self) -> None:
        for fd, _ in self.files.values():
            os.close(fd)
        self.files, self.where = {}, {}

    def __len__(self) -> int:
        return len(self.where)


def _open_array(path: Path) -> tuple[int, int, tuple[int, ...]]:
    """A uint8 .npy opened for reading: its descriptor, where its data starts, its shape."""
    with path.open("rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0
        if major != 1:
            read_header = np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype != np.uint8:
        raise ValueError(f"{path}: not a C-ordered uint8 array")
    return os.open(path, os.O_RDONLY), offset, shape


def _is_version(directory: Path, version: str) -> bool:
    try:
        return json.loads((directory / VERSION).read_text()).get("version") == version
    except (OSError, ValueError):
        return False


def keep(directory: Path, version: str, arrays: Mapping[str, Path], manifest: pd.DataFrame) -> bool:
    """Hard-link this run's split `arrays` into `directory` with `manifest`'s sha256, split and
    index columns; the previous run's squares are let go. False when links cannot be made
    there (the cache is then left empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VERSION).unlink(missing_ok=True)  # the cache is invalid until complete
    for old in directory.glob("*.npy"):
        old.unlink()
    try:
        for split, path in arrays.items():
            os.link(path, directory / f"{split}.npy")
    except OSError:
        for old in directory.glob("*.npy"):
            old.unlink()
        return False
    manifest[["sha256", "split", "index"]].to_parquet(directory / INDEX, index=False)
    (directory / VERSION).write_text(json.dumps({"version": version}) + "\n")
    return True
