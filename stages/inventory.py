"""List the sources folder (paths.raw) for collect's DVC dependency: every entry's path, kind,
size and content hash, without following a link or opening anything but regular files.

DVC's own walk of a folder dies on a symbolic-link loop or a file name that is not UTF-8, and
blocks forever on a named pipe; collect quarantines each of these as one record, so it depends
on this listing instead (vitrine/ingest/inventory.py says more). The stage is always_changed:
it runs on every `dvc repro`, and collect runs when the listing changed.
"""

from __future__ import annotations

from vitrine.config import load_params, load_paths, run_cli
from vitrine.ingest.inventory import write_inventory


def main() -> None:
    paths = load_paths(load_params())
    n = write_inventory(paths.raw, paths.inventory)
    print(f"inventory: {n} entries under {paths.raw}")


if __name__ == "__main__":
    run_cli(main)
