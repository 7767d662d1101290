"""The inventory of the sources folder: collect's DVC dependency, listed without following a
link or opening anything but regular files, so that no seller's folder can stop the pipeline
before collect accounts for every record."""

from __future__ import annotations

import os

import pytest

from tests.helpers.hostile import deadline, watching
from vitrine.ingest.inventory import inventory_digest, listing, write_inventory


@pytest.fixture
def hostile_folder(tmp_path, make_photo):
    root = tmp_path / "raw"
    (root / "phone").mkdir(parents=True)
    (root / "phone" / "a.jpg").write_bytes(make_photo(1))
    os.symlink("loop.jpg", root / "phone" / "loop.jpg")  # a loop
    os.symlink("..", root / "phone" / "up")  # a folder loop, if followed
    os.symlink("/etc/passwd", root / "phone" / "out.jpg")  # out of the root
    os.mkfifo(root / "phone" / "pipe.jpg")  # opening it would block
    (root / os.fsdecode(b"caf\xe9")).mkdir()  # not UTF-8
    (root / os.fsdecode(b"caf\xe9") / "b.jpg").write_bytes(make_photo(2))
    return root


def test_every_entry_listed_once_without_following_or_opening(hostile_folder, tmp_path):
    with watching() as watch, deadline(10):
        lines = list(listing(hostile_folder))
    rows = {line.split("\t")[0]: line.rstrip("\n").split("\t")[1:] for line in lines}
    assert list(rows) == [
        "caf\\\\xe9",
        "caf\\\\xe9/b.jpg",
        "phone",
        "phone/a.jpg",
        "phone/loop.jpg",
        "phone/out.jpg",
        "phone/pipe.jpg",
        "phone/up",
    ]
    assert rows["phone/loop.jpg"] == ["symlink", "0", "loop.jpg"]
    assert rows["phone/out.jpg"] == ["symlink", "0", "/etc/passwd"]
    assert rows["phone/pipe.jpg"] == ["fifo", "0", ""]
    assert rows["phone/a.jpg"][0] == "file" and len(rows["phone/a.jpg"][2]) == 64
    assert watch.special_opened() == []
    assert watch.outside(tmp_path, hostile_folder) == []
    assert all(line.encode("utf-8") for line in lines)


def test_the_digest_follows_content_names_and_links(hostile_folder):
    before = inventory_digest(hostile_folder)
    assert inventory_digest(hostile_folder) == before  # stable
    (hostile_folder / "phone" / "a.jpg").write_bytes(b"other bytes")
    changed = inventory_digest(hostile_folder)
    assert changed != before
    os.remove(hostile_folder / "phone" / "out.jpg")
    os.symlink("/etc/hostname", hostile_folder / "phone" / "out.jpg")
    assert inventory_digest(hostile_folder) != changed


def test_a_missing_root_is_one_line(tmp_path):
    assert list(listing(tmp_path / "nowhere")) == ["\tmissing\t0\t\n"]
    assert write_inventory(tmp_path / "nowhere", tmp_path / "inv.tsv") == 1
