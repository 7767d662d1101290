"""`dvc repro validate` over every hostile input at once: collect completes, every record is
accounted for, and a lying zip member costs collect no more memory than its size cap.

    python benchmarks/collect_hostile.py [--photos 60] [--bomb-mb 200]

Builds a throwaway copy of the project whose sources hold, besides `--photos` good photos per
class, one of each hostile input:

    folder   a symbolic-link loop, a file name that is not UTF-8, a named pipe (FIFO)
    tar      a member name that is not UTF-8
    zip      a member whose header claims 4 kB and that inflates to --bomb-mb MB
    CSV      saved with a UTF-8 byte-order mark; a row with more fields than the header; a row
             with one latin-1 byte; a row whose path is a symbolic-link loop
    JSONL    lines that are valid JSON but not objects: [1, 2, 3], null, "text", 42

and runs `dvc repro validate` (collect, then validate), sampling the peak RSS of the process
tree. It prints each hostile record's manifest row, the count of input records against
manifest rows, validate's verdict, and the peak RSS against the same run without the zip.
Exits non-zero if a record is missing or collect failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect_repro import project_copy, timed_repro
from ingest import variants
from options import at_least

from tests.helpers.hostile import lying_zip, open_tar, tar_member

REPO = Path(__file__).resolve().parents[1]
LATIN1_NAME = b"caf\xe9.jpg"  # a latin-1 file name: not UTF-8


def good_photos(root: Path, n: int) -> list[bytes]:
    """n photos per class under root/<class>/; the photos, for the other sources to reuse."""
    made = []
    for c, label in enumerate(("laptop", "phone")):
        (root / label).mkdir(parents=True)
        for i, data in enumerate(variants(n, (120, 90), seed=c + 11)):
            (root / label / f"{i:04d}.jpg").write_bytes(data)
            made.append(data)
    return made


def hostile_sources(raw: Path, n: int, bomb_mb: int) -> tuple[list[dict], int]:
    """The sources (collect.sources entries) and the number of input records in all."""
    photos = good_photos(raw / "photos", n)
    records = 2 * n
    folder = raw / "photos"
    os.symlink("loop.jpg", folder / "phone" / "loop.jpg")
    (folder / "laptop").joinpath(os.fsdecode(LATIN1_NAME)).write_bytes(photos[0])
    os.mkfifo(folder / "phone" / "pipe.jpg")
    records += 3

    with open_tar(raw / "names.tar") as tf:
        tar_member(tf, b"phone/\xff\xfe.jpg", photos[1])
        tar_member(tf, "phone/fine.jpg", photos[2])
    records += 2

    lying_zip(raw / "bomb.zip", "phone/bomb.jpg", bomb_mb << 20, 4096)
    records += 1

    os.symlink("loop2.jpg", raw / "loop2.jpg")
    csv = b"\xef\xbb\xbfid,label,path\n"  # Excel's "CSV UTF-8"
    csv += b"csv-good,phone,photos/phone/0001.jpg\n"
    csv += b"csv-extra,phone,photos/phone/0002.jpg,extra,fields\n"
    csv += b"csv-latin1,phone,photos/phone/0003.jpg\xe9\n"
    csv += b"csv-loop,phone,loop2.jpg\n"
    (raw / "catalog.csv").write_bytes(csv)
    records += 4

    lines = [json.dumps({"id": "jsonl-good", "label": "laptop", "path": "photos/laptop/0001.jpg"})]
    lines += ["[1, 2, 3]", "null", '"text"', "42"]
    (raw / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    records += 5

    sources = [
        {"kind": "folder", "path": "photos"},
        {"kind": "archive", "path": "names.tar"},
        {"kind": "archive", "path": "bomb.zip"},
        {"kind": "catalog", "path": "catalog.csv"},
        {"kind": "catalog", "path": "catalog.jsonl"},
    ]
    return sources, records


def run(n: int, bomb_mb: int, with_bomb: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        project_copy(project)
        raw = project / "data/raw"
        sources, records = hostile_sources(raw, n, bomb_mb)
        if not with_bomb:
            sources = [s for s in sources if s["path"] != "bomb.zip"]
            records -= 1
        params = yaml.safe_load((project / "params.yaml").read_text())
        params["collect"]["sources"] = sources
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        code, seconds, peak, log = timed_repro(project, "validate")
        manifest = project / "data/collected/manifest.parquet"
        if not manifest.exists():
            raise SystemExit(f"collect did not complete:\n{log}")
        m = pd.read_parquet(manifest)
        validate = project / "reports/validate.json"
        verdict = json.loads(validate.read_text()) if validate.exists() else {}
        return {
            "records": records,
            "manifest": m,
            "code": code,
            "seconds": seconds,
            "peak": peak,
            "validate": verdict,
            "log": log,
        }


def hostile_rows(m: pd.DataFrame) -> pd.DataFrame:
    return m[(m["status"] == "quarantined") | m["source"].str.startswith(("catalog", "archive"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=at_least(1), default=60, help="good photos per class")
    parser.add_argument("--bomb-mb", type=at_least(1), default=200)
    args = parser.parse_args()
    full = run(args.photos, args.bomb_mb, with_bomb=True)
    base = run(args.photos, args.bomb_mb, with_bomb=False)
    m = full["manifest"]
    rows = hostile_rows(m)[["source", "id", "label", "status", "reason"]]
    with pd.option_context("display.width", 160, "display.max_colwidth", 40):
        print(rows.sort_values(["source", "id"]).to_string(index=False))
    print(
        f"\ninput records {full['records']}, manifest rows {len(m)}, "
        f"accepted {int((m['status'] == 'accepted').sum())}, "
        f"quarantined {int((m['status'] == 'quarantined').sum())}"
    )
    checks = full["validate"].get("success")
    print(
        f"dvc repro validate: exit {full['code']} in {full['seconds']:.0f} s; "
        f"validate's verdict: {checks!r} (it may fail the data set on its thresholds)"
    )
    grew = (full["peak"]["tree"] - base["peak"]["tree"]) / 2**20
    print(
        f"peak RSS of the process tree: {full['peak']['tree'] / 2**20:.0f} MiB with the "
        f"{args.bomb_mb} MB zip member, {base['peak']['tree'] / 2**20:.0f} MiB without "
        f"({grew:+.0f} MiB; target: within 100 MiB)"
    )
    if len(m) != full["records"]:
        raise SystemExit("records and manifest rows differ")


if __name__ == "__main__":
    main()
