"""collect never dies on one bad record: each hostile input ends as exactly one manifest row,
quarantined with a stable reason (or accepted, where its content is fine), and the others are
read as usual."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import REPO
from tests.helpers.collect_runs import config, run
from tests.helpers.hostile import (
    deadline,
    lying_zip,
    make_special,
    open_tar,
    tar_member,
    xz_with_a_huge_dictionary,
)
from vitrine.ingest.archives import _tree_prefix, archive_records
from vitrine.ingest.catalogs import catalog_records
from vitrine.ingest.records import InputRecord, Source, escaped, read_record

CLASSES = ("laptop", "phone")


def catalog(raw: Path, name: str, data: bytes, tmp_path: Path, **overrides) -> pd.DataFrame:
    (raw / name).write_bytes(data)
    return run(config(Source("catalog", name), **overrides), raw, tmp_path)


def tar_of(path: Path, members: list[tuple[str | bytes, bytes]], mode: str = "w") -> Path:
    with open_tar(path, mode) as tf:
        for name, data in members:
            tar_member(tf, name, data)
    return path


# --- catalogs ------------------------------------------------------------------------------


def test_a_csv_row_with_more_fields_than_the_header_is_a_bad_row(class_folder, tmp_path):
    m = catalog(
        class_folder.parent,
        "c.csv",
        b"id,label,path\n"
        b"a,phone,photos/phone/000.jpg\n"
        b"b,phone,photos/phone/001.jpg,extra,fields\n"
        b"c,laptop,photos/laptop/000.jpg\n",
        tmp_path,
    )
    assert len(m) == 3
    assert (
        m.loc["b", "reason"] == "bad_row" and "5 fields, the header has 3" in m.loc["b", "detail"]
    )
    assert (m.loc[["a", "c"], "status"] == "accepted").all()


def test_one_latin1_byte_quarantines_its_row_only(class_folder, tmp_path):
    m = catalog(
        class_folder.parent,
        "c.csv",
        b"id,label,path,title\n"
        b"a,phone,photos/phone/000.jpg,ok\n"
        b"b,phone,photos/phone/001.jpg,caf\xe9\n"
        b"c,laptop,photos/laptop/000.jpg,ok\n",
        tmp_path,
    )
    assert len(m) == 3
    assert m.loc["b", "reason"] == "invalid_utf8"
    assert "caf\\xe9" in m.loc["b", "detail"]  # the undecodable byte, kept traceable
    assert json.loads(m.loc["b", "meta"]) == {"title": "caf\\xe9"}
    assert (m.loc[["a", "c"], "status"] == "accepted").all()


def test_an_undecodable_id_is_kept_escaped(class_folder, tmp_path):
    m = catalog(class_folder.parent, "c.csv", b"id,label,path\nx\xff,phone,a.jpg\n", tmp_path)
    assert m.loc["x\\xff", "reason"] == "invalid_utf8"


@pytest.mark.parametrize("line", ["[1, 2, 3]", "null", '"text"', "42", "true"])
def test_a_jsonl_line_that_is_json_but_not_an_object_is_a_bad_row(class_folder, tmp_path, line):
    good = json.dumps({"id": "ok", "label": "phone", "path": "photos/phone/000.jpg"})
    m = catalog(class_folder.parent, "c.jsonl", f"{line}\n{good}\n".encode(), tmp_path)
    assert len(m) == 2
    assert m.loc["line-1", "reason"] == "bad_row" and "not an object" in m.loc["line-1", "detail"]
    assert m.loc["ok", "status"] == "accepted"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"id": "\\ud800", "label": "phone", "path": "x"}', "invalid_utf8"),  # lone surrogate
        (b'{"id": "a", "label": "ph\xf6ne", "path": "x"}', "invalid_utf8"),
        (b'{"id": "a", "n": ' + b"1" * 5000 + b"}", "bad_row"),  # over Python's int digits
        (b"[" * 5000 + b"]" * 5000, "bad_row"),  # RecursionError in json
        (b'{"id": "a", "meta": ' + b"[" * 100 + b"]" * 100 + b"}", "bad_row"),
        (b"{broken", "bad_row"),
    ],
)
def test_hostile_jsonl_lines_are_one_row_each(class_folder, tmp_path, line, reason):
    good = json.dumps({"id": "ok", "label": "phone", "path": "photos/phone/000.jpg"}).encode()
    m = catalog(class_folder.parent, "c.jsonl", line + b"\n\n" + good + b"\n", tmp_path)
    assert len(m) == 2 and m.loc["ok", "status"] == "accepted"
    assert m.drop(index="ok")["reason"].tolist() == [reason]


def test_a_csv_saved_with_a_byte_order_mark_is_read(class_folder, tmp_path):
    text = "id,label,path\na,phone,photos/phone/000.jpg\nb,laptop,photos/laptop/000.jpg\n"
    m = catalog(class_folder.parent, "c.csv", text.encode("utf-8-sig"), tmp_path)
    assert sorted(m.index) == ["a", "b"] and (m["status"] == "accepted").all()


def test_a_field_over_the_csv_limit_and_a_line_over_the_row_cap_cost_their_row(
    class_folder, tmp_path
):
    raw = class_folder.parent
    big = b"x" * 200_000  # over the csv module's 128 KiB field limit
    m = catalog(
        raw,
        "c.csv",
        b"id,label,path,t\nbig,phone,a.jpg," + big + b"\nok,phone,photos/phone/000.jpg,t\n",
        tmp_path,
    )
    assert len(m) == 2 and m.loc["ok", "status"] == "accepted"
    assert m.drop(index="ok")["reason"].tolist() == ["bad_row"]
    (raw / "d.jsonl").write_bytes(b'{"id": "long", "t": "' + big + b'"}\n{"id": "next"}\n')
    records = list(
        catalog_records(raw / "d.jsonl", "catalog:d.jsonl", {}, 1000, max_row_chars=1000)
    )
    found = {r.id: read_record(r, CLASSES)[1] for r in records}
    assert found["line-1"].code == "bad_row" and "over 1000 characters" in found["line-1"].detail
    assert found["next"].code == "missing_location"


def test_a_quote_never_closed_costs_its_row_and_the_rows_after_it_are_read(class_folder, tmp_path):
    m = catalog(
        class_folder.parent,
        "c.csv",
        b"id,label,path\n"
        b"a1,phone,photos/phone/000.jpg\n"
        b'a2,"phone,photos/phone/001.jpg\n'
        b"a3,phone,photos/phone/002.jpg\n"
        b"a4,laptop,photos/laptop/000.jpg\n",
        tmp_path,
    )
    assert sorted(m.index) == ["a1", "a3", "a4", "row-2"]  # every line of the file accounted for
    assert (m.loc[["a1", "a3", "a4"], "status"] == "accepted").all()
    assert m.loc["row-2", "reason"] == "bad_row"
    assert "line 3: a quote opened here is never closed" in m.loc["row-2", "detail"]


def test_a_quoted_field_with_line_breaks_is_one_field_even_over_the_csv_limit(
    class_folder, tmp_path
):
    """A quoted note with line breaks is one field; one over the csv module's limit is one bad
    row, and the lines inside it never become rows (a line that looks like one included)."""
    note = b'"first line\nn1,phone,photos/phone/003.jpg\n' + b"x" * 140_000 + b'\nlast"'
    m = catalog(
        class_folder.parent,
        "c.csv",
        b"id,label,path,note\n"
        b'i1,phone,photos/phone/000.jpg,"line one\nn9,phone,photos/phone/004.jpg\n15"" screen"\n'
        b"i2,phone,photos/phone/001.jpg," + note + b"\n"
        b'i3,laptop,photos/laptop/000.jpg,15" MacBook\n',
        tmp_path,
    )
    assert sorted(m.index) == ["i1", "i3", "row-2"]
    assert (m.loc[["i1", "i3"], "status"] == "accepted").all()
    assert json.loads(m.loc["i1", "meta"]) == {
        "note": 'line one\nn9,phone,photos/phone/004.jpg\n15" screen'
    }
    assert json.loads(m.loc["i3", "meta"]) == {"note": '15" MacBook'}  # a quote mid-field
    assert m.loc["row-2", "reason"] == "bad_row" and "line 5" in m.loc["row-2", "detail"]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        (
            "c.json",
            b'[{"id": "a", "label": "phone", "path": "photos/phone/000.jpg"}, 5,\n'
            b' {"ID": "b", "Label": "laptop", "Path": "photos/laptop/000.jpg"}]',
        ),
        (
            "c.json",
            b'{"id": "a", "label": "phone", "path": "photos/phone/000.jpg"}\n[5]\n'
            b'{"id": "b", "label": "laptop", "path": "photos/laptop/000.jpg"}\n',
        ),
        (
            "c.csv",
            b"ID, Label ,PATH\na,phone,photos/phone/000.jpg\nx\nb,laptop,photos/laptop/000.jpg\n",
        ),
        (
            "c.csv",
            b'id;label;path\na;phone;photos/phone/000.jpg\n"b;";x\n'
            b"b;laptop;photos/laptop/000.jpg\n",
        ),
        (
            "c.tsv",
            b"id\tlabel\tpath\na\tphone\tphotos/phone/000.jpg\nx\n"
            b"b\tlaptop\tphotos/laptop/000.jpg\n",
        ),
        (
            "c.csv",
            "id,label,path\na,phone,photos/phone/000.jpg\nx\n"
            "b,laptop,photos/laptop/000.jpg\n".encode("utf-16"),
        ),
    ],
    ids=["json-array", "json-lines", "header-spelling", "semicolons", "tabs", "utf-16"],
)
def test_catalogs_as_spreadsheets_and_scripts_write_them_are_read(
    class_folder, tmp_path, name, data
):
    """A .json array or JSON lines, ID/Label/PATH headers, ; or tab separators, Excel's UTF-16:
    the two photos accepted, and the one bad row in between quarantined with its reason."""
    m = catalog(class_folder.parent, name, data, tmp_path)
    assert (m.loc[["a", "b"], "status"] == "accepted").all()
    assert m.loc["a", "label"] == "phone" and m.loc["b", "label"] == "laptop"
    assert len(m) == 3 and m.drop(index=["a", "b"])["status"].tolist() == ["quarantined"]


def test_a_header_without_the_columns_collect_reads_says_so(class_folder, tmp_path):
    raw = class_folder.parent
    m = catalog(raw, "c.csv", b"ident,label,photo\na,phone,photos/phone/000.jpg\n", tmp_path)
    assert m.loc["row-1", "reason"] == "missing_id"
    assert "no id column, its columns are ['ident', 'label', 'photo']" in m.loc["row-1", "detail"]
    m = catalog(raw, "d.csv", b"id,label,photo\na,phone,photos/phone/000.jpg\n", tmp_path / "d")
    assert m.loc["a", "reason"] == "missing_location"
    assert "no url or path column" in m.loc["a", "detail"]


def test_archives_from_tar_of_a_dot_folder_and_from_a_macs_compress(make_photo, tmp_path):
    """`tar czf x.tgz ./photos` writes ./ before every name; a Mac's Compress adds __MACOSX/
    beside the top folder. Neither hides the class folders; a zip cut short says it is a zip."""
    raw = tmp_path / "raw"
    raw.mkdir()
    tar_of(raw / "a.tgz", [("./photos/phone/a.jpg", make_photo(1))], mode="w:gz")
    with zipfile.ZipFile(raw / "b.zip", "w") as zf:
        zf.writestr("photos/phone/a.jpg", make_photo(2))
        zf.writestr("__MACOSX/photos/phone/._a.jpg", b"\x00\x05\x16\x07 resource fork")
        zf.writestr("photos/laptop/b.jpg", make_photo(3))
    whole = (raw / "b.zip").read_bytes()
    (raw / "cut.zip").write_bytes(whole[: len(whole) // 2])
    with zipfile.ZipFile(raw / "windows.zip", "w") as zf:  # \\ where the format asks for /
        zf.writestr("photos\\phone\\c.jpg", make_photo(4))
        zf.writestr("photos\\..\\..\\escape.jpg", make_photo(5))
    (raw / "top.jpg").write_bytes(make_photo(6))  # beside the archives, in no class folder
    sources = [Source("archive", n) for n in ("a.tgz", "b.zip", "cut.zip", "windows.zip")]
    m = run(config(*sources, Source("folder", ".")), raw, tmp_path)
    m = m.reset_index().set_index(["source", "id"])
    assert m.loc[("archive:a.tgz", "phone/a.jpg"), "status"] == "accepted"
    assert m.loc[("archive:b.zip", "phone/a.jpg"), "status"] == "accepted"
    assert m.loc[("archive:b.zip", "laptop/b.jpg"), "status"] == "accepted"
    fork = m.loc[("archive:b.zip", "__MACOSX/photos/phone/._a.jpg")]
    assert fork["status"] == "quarantined"  # accounted for, not a photo of any class
    assert "BadZipFile" in m.loc[("archive:cut.zip", "cut.zip#0"), "detail"]
    assert m.loc[("archive:windows.zip", "phone/c.jpg"), "status"] == "accepted"
    assert m.loc[("archive:windows.zip", "../../escape.jpg"), "reason"] == "outside_source_root"
    top = m.loc[("folder:.", "top.jpg")]
    assert (
        top["reason"] == "label_not_in_classes" and "folder named after its class" in top["detail"]
    )


# --- links, special files, names ------------------------------------------------------------


def test_a_symlink_loop_is_unreadable_in_a_folder_and_as_a_catalog_path(class_folder, tmp_path):
    (class_folder / "phone" / "loop.jpg").symlink_to("loop.jpg")
    (class_folder / "phone" / "a.jpg").symlink_to("b.jpg")
    (class_folder / "phone" / "b.jpg").symlink_to("a.jpg")
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert len(m) == 24 + 3
    for name in ("loop.jpg", "a.jpg", "b.jpg"):
        assert m.loc[f"phone/{name}", "reason"] == "unreadable"
    assert "symbolic links" in m.loc["phone/loop.jpg", "detail"]
    c = catalog(
        class_folder.parent,
        "c.csv",
        b"id,label,path\nloop,phone,photos/phone/loop.jpg\nok,phone,photos/phone/000.jpg\n",
        tmp_path / "second",
    )
    assert (c.loc["loop", "reason"], c.loc["ok", "status"]) == ("unreadable", "accepted")


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_a_special_file_is_never_opened(class_folder, tmp_path, kind):
    if not make_special(class_folder / "phone" / "special.jpg", kind):
        pytest.skip(f"cannot make a {kind} here")
    (class_folder / "laptop" / "link.jpg").symlink_to("../phone/special.jpg")
    (class_folder.parent / "c.csv").write_text("id,label,path\ns,phone,photos/phone/special.jpg\n")
    cfg = config(Source("folder", "photos"), Source("catalog", "c.csv"))
    with deadline(60):  # an open FIFO would block forever, /dev/zero would never end
        m = run(cfg, class_folder.parent, tmp_path)
    assert len(m) == 24 + 3
    for rid in ("phone/special.jpg", "laptop/link.jpg", "s"):
        assert m.loc[rid, "reason"] == "not_a_regular_file"


def test_a_socket_in_use_is_not_a_regular_file(class_folder, tmp_path):
    path = class_folder / "phone" / "s.jpg"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert (m.loc["phone/s.jpg", "reason"], m.loc["phone/s.jpg", "detail"]) == (
        "not_a_regular_file",
        "a socket",
    )


def test_a_file_name_that_is_not_utf8_is_quarantined_escaped(class_folder, make_photo, tmp_path):
    os.makedirs(os.fsencode(class_folder) + b"/caf\xe9")
    (Path(os.fsdecode(os.fsencode(class_folder) + b"/phone/photo\xff.jpg"))).write_bytes(
        make_photo(1)
    )
    (Path(os.fsdecode(os.fsencode(class_folder) + b"/caf\xe9/x.jpg"))).write_bytes(make_photo(2))
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert len(m) == 26
    assert m.loc["phone/photo\\xff.jpg", "reason"] == "invalid_utf8"
    assert m.loc["caf\\xe9/x.jpg", "reason"] == "invalid_utf8"
    assert m.loc["caf\\xe9/x.jpg", "label"] == "caf\\xe9"


def test_a_tar_member_name_that_is_not_utf8_is_quarantined_escaped(make_photo, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    tar_of(
        raw / "a.tar.gz",
        [(b"phone/ok.jpg", make_photo(1)), (b"phone/bad\xe9.jpg", make_photo(2))],
        "w:gz",
    )
    m = run(config(Source("archive", "a.tar.gz")), raw, tmp_path)
    assert m.loc["phone/ok.jpg", "status"] == "accepted"
    assert m.loc["phone/bad\\xe9.jpg", "reason"] == "invalid_utf8"


# --- archives ------------------------------------------------------------------------------


def test_tar_links_fifos_and_devices_are_never_followed(make_photo, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with open_tar(raw / "a.tar") as tf:
        tar_member(tf, "phone/ok.jpg", make_photo(1))
        tar_member(tf, "phone/sym.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        tar_member(tf, "phone/hard.jpg", kind=tarfile.LNKTYPE, linkname="phone/ok.jpg")
        tar_member(tf, "phone/fifo.jpg", kind=tarfile.FIFOTYPE)
        tar_member(tf, "phone/zero.jpg", kind=tarfile.CHRTYPE)
        tar_member(tf, "phone/dir", kind=tarfile.DIRTYPE)
    with deadline(60):
        m = run(config(Source("archive", "a.tar")), raw, tmp_path)
    assert m.loc["phone/ok.jpg", "status"] == "accepted"
    details = m.drop(index="phone/ok.jpg")[["reason", "detail"]].to_dict("index")
    assert details == {
        "phone/sym.jpg": {
            "reason": "not_a_regular_file",
            "detail": "a symbolic link to /etc/passwd",
        },
        "phone/hard.jpg": {"reason": "not_a_regular_file", "detail": "a hard link to phone/ok.jpg"},
        "phone/fifo.jpg": {"reason": "not_a_regular_file", "detail": "a FIFO"},
        "phone/zero.jpg": {"reason": "not_a_regular_file", "detail": "a character device"},
    }


def test_a_damaged_tar_keeps_the_members_before_the_damage(make_photo, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    whole = tar_of(tmp_path / "w.tar", [(f"phone/{i}.jpg", make_photo(i)) for i in range(4)])
    data = whole.read_bytes()
    packed = gzip.compress(data)
    (raw / "cut.tar.gz").write_bytes(packed[: len(packed) // 2])  # cut inside the second photo
    (raw / "junk.tar").write_bytes(data[:-2048] + b"\x01" * 4096)  # garbage after the end
    (raw / "none.tar").write_bytes(b"this is not an archive at all" * 40)
    found = {}
    for name in ("cut.tar.gz", "junk.tar", "none.tar"):
        m = run(config(Source("archive", name)), raw, tmp_path / name)
        found[name] = m["reason"].to_dict()
    assert found == {
        "cut.tar.gz": {
            "phone/0.jpg": "",
            "phone/1.jpg": "unreadable",
            "cut.tar.gz#2": "bad_archive",
        },
        "junk.tar": {**{f"phone/{i}.jpg": "" for i in range(4)}, "junk.tar#4": "bad_archive"},
        "none.tar": {"none.tar#0": "bad_archive"},
    }


def test_a_pax_header_claiming_a_gigabyte_is_refused_not_allocated(make_photo, tmp_path):
    path = tmp_path / "pax.tar"
    tar_of(path, [("phone/a.jpg", make_photo(1))])
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 30
    raw = header.tobuf(tarfile.USTAR_FORMAT) + path.read_bytes()
    (tmp_path / "big.tar").write_bytes(raw)
    records = list(archive_records(tmp_path / "big.tar", "archive:big.tar", CLASSES, 10**6))
    assert [read_record(r, CLASSES)[1].code for r in records] == ["bad_archive"]


def test_an_xz_dictionary_past_the_memory_limit_is_refused(make_photo, tmp_path):
    tar = tar_of(tmp_path / "a.tar", [("phone/a.jpg", make_photo(1))]).read_bytes()
    (tmp_path / "a.tar.xz").write_bytes(xz_with_a_huge_dictionary(tar))
    records = list(archive_records(tmp_path / "a.tar.xz", "archive:a.tar.xz", CLASSES, 10**6))
    results = [read_record(r, CLASSES)[1] for r in records]
    assert [r.code for r in results] == ["bad_archive"]
    assert "Memory usage limit" in results[0].detail


def test_a_zip_lzma_dictionary_past_the_memory_limit_is_refused(make_photo, tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_LZMA) as zf:
        zf.writestr("phone/a.jpg", make_photo(1))
        zf.writestr("phone/b.jpg", make_photo(2))
    data = bytearray(path.read_bytes())
    name = b"phone/a.jpg"
    props = data.index(name) + len(name) + 4  # after the name (no extra): version, size
    assert data[props - 2 : props] == b"\x05\x00"
    data[props + 1 : props + 5] = b"\xff\xff\xff\xff"  # a 4 GiB dictionary
    path.write_bytes(bytes(data))
    records = archive_records(path, "archive:a.zip", CLASSES, 10**6)
    results = {r.id: d for r, d in (read_record(r, CLASSES) for r in records)}
    assert results["phone/a.jpg"].code == "unreadable"
    assert results["phone/b.jpg"] == make_photo(2)


def test_a_zip_member_inflating_past_its_header_holds_at_most_the_cap():
    """200 MB of zeros behind a header that says 4 kB: read through a capped stream, the
    process grows by about the cap (20 MB), not by the 200 MB a whole-member read inflates."""
    script = """
import resource, sys, tempfile
from pathlib import Path
from tests.helpers.hostile import lying_zip
from vitrine.ingest.archives import archive_records
from vitrine.ingest.records import read_record
path = Path(tempfile.mkdtemp()) / "bomb.zip"
lying_zip(path, "phone/bomb.jpg", 200 << 20, 4096)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = [read_record(r, ("phone",)) for r in archive_records(path, "z", ("phone",), 20_000_000)]
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grew // 1024, [(r.id, d.code) for r, d in rows])
"""
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    assert out[1].strip() == "[('phone/bomb.jpg', 'too_large')]"
    assert int(out[0]) < 100, f"grew {out[0]} MB"


def test_a_zip_header_is_not_trusted_either_way(make_photo, tmp_path):
    photo = make_photo(1)
    lying_zip(tmp_path / "small.zip", "phone/a.jpg", 2 << 20, 100)  # says 100 bytes: 2 MB
    lying_zip(tmp_path / "fine.zip", "phone/a.jpg", len(photo), 10, fill=photo)  # CRC holds
    codes = {}
    for name in ("small.zip", "fine.zip"):
        (record,) = archive_records(tmp_path / name, name, CLASSES, 10**6)
        result = read_record(record, CLASSES)[1]
        codes[name] = result if isinstance(result, bytes) else result.code
    assert codes == {"small.zip": "too_large", "fine.zip": photo}


def test_a_name_twice_in_an_archive_or_a_catalog_keeps_the_first_and_the_key_unique(
    make_photo, tmp_path
):
    """`tar -rf` appends a file again under its name; a catalog repeats an id. The first is
    kept, the repeat quarantined, and (source, id), the manifest's key that validate checks, stays
    unique."""
    raw = tmp_path / "raw"
    raw.mkdir()
    first, second = make_photo(1), make_photo(2)
    tar_of(raw / "a.tar", [("phone/a.jpg", first), ("laptop/b.jpg", second)])
    tar_of(raw / "a.tar", [("phone/a.jpg", second)], mode="a")
    (raw / "c.csv").write_text("id,label,path\nx,phone,a.jpg\nx,laptop,a.jpg\nx,phone,a.jpg\n")
    (raw / "a.jpg").write_bytes(first)
    cfg = config(Source("archive", "a.tar"), Source("catalog", "c.csv"))
    m = run(cfg, raw, tmp_path).reset_index()
    assert not m.duplicated(["source", "id"]).any()
    by = m.set_index(["source", "id"])
    assert by.loc[("archive:a.tar", "phone/a.jpg"), "status"] == "accepted"
    repeat = by.loc[("archive:a.tar", "phone/a.jpg#repeat-2")]
    assert repeat["reason"] == "duplicate_id" and "earlier member" in repeat["detail"]
    assert by.loc[("catalog:c.csv", "x"), "status"] == "accepted"
    repeats = ["x#repeat-2", "x#repeat-3"]
    assert (by.loc[[("catalog:c.csv", r) for r in repeats], "reason"] == "duplicate_id").all()
    assert len(m) == 6  # every member and row accounted for


def test_zip_members_that_cannot_be_read_are_one_row_each(make_photo, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with zipfile.ZipFile(raw / "z.zip", "w") as zf:
        zf.writestr("phone/ok.jpg", make_photo(1))
        link = zipfile.ZipInfo("phone/link.jpg")
        link.create_system, link.external_attr = 3, (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("phone/crc.jpg", make_photo(2))
        zf.writestr("../phone/out.jpg", make_photo(3))
    data = bytearray((raw / "z.zip").read_bytes())
    at = data.find(make_photo(2)[-100:-80])
    data[at] ^= 0xFF  # the CRC no longer matches
    (raw / "z.zip").write_bytes(bytes(data))
    m = run(config(Source("archive", "z.zip")), raw, tmp_path)
    assert m["reason"].to_dict() == {
        "phone/ok.jpg": "",
        "phone/link.jpg": "not_a_regular_file",
        "phone/crc.jpg": "unreadable",
        "../phone/out.jpg": "outside_source_root",
    }


def test_a_zip_whose_directory_is_damaged_is_one_bad_archive_row(make_photo, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with zipfile.ZipFile(raw / "z.zip", "w") as zf:
        zf.writestr("phone/é.jpg", make_photo(1))  # a UTF-8 name, flagged as such
    data = (raw / "z.zip").read_bytes().replace("é".encode(), b"\xff\xfe")
    (raw / "z.zip").write_bytes(data)
    m = run(config(Source("archive", "z.zip")), raw, tmp_path)
    assert m["reason"].to_dict() == {"z.zip#0": "bad_archive"}


# --- labels --------------------------------------------------------------------------------


def test_labels_match_trimmed_and_case_insensitively_for_every_source(make_photo, tmp_path):
    raw = tmp_path / "raw"
    (raw / "photos" / " Phone ").mkdir(parents=True)
    (raw / "photos" / " Phone " / "a.jpg").write_bytes(make_photo(1))
    tar_of(raw / "a.tar", [("LAPTOP/b.jpg", make_photo(2)), ("phnoe/c.jpg", make_photo(3))])
    (raw / "c.csv").write_text("id,label,path\nc1, phone ,photos/ Phone /a.jpg\nc2,Tablet,x.jpg\n")
    cfg = config(Source("folder", "photos"), Source("archive", "a.tar"), Source("catalog", "c.csv"))
    m = run(cfg, raw, tmp_path)
    assert m.loc[[" Phone /a.jpg", "LAPTOP/b.jpg", "c1"], "label"].tolist() == [
        "phone",
        "laptop",
        "phone",
    ]
    assert (m.loc[[" Phone /a.jpg", "LAPTOP/b.jpg", "c1"], "status"] == "accepted").all()
    assert m.loc["phnoe/c.jpg", "reason"] == "label_not_in_classes"
    assert m.loc["phnoe/c.jpg", "detail"] == "'phnoe' not in classes; nearest: 'phone'"
    assert m.loc["c2", "detail"] == "'Tablet' not in ['laptop', 'phone']"


def test_a_top_folder_that_is_a_class_in_another_case_is_not_a_wrapper():
    assert _tree_prefix(["Phone/a.jpg", "Phone/b.jpg"], CLASSES) == ""
    assert _tree_prefix(["raw/phone/a.jpg"], CLASSES) == "raw/"


def test_classes_differing_only_in_case_need_the_exact_spelling():
    classes = ("Apple", "apple")

    def outcome(label: str) -> tuple[str, bytes | str]:
        record, result = read_record(InputRecord("x", label, "s", lambda: b"data"), classes)
        return record.label, result if isinstance(result, bytes) else result.code

    assert outcome("apple") == ("apple", b"data")
    assert outcome("APPLE") == ("APPLE", "label_not_in_classes")


def test_escaped_keeps_text_that_parquet_can_hold():
    assert escaped("plain é") == "plain é"
    assert escaped(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert escaped("\ud800x") == "\\ud800x"


def test_a_source_of_the_wrong_kind_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a directory"):
        run(config(Source("folder", "file")), tmp_path, tmp_path)
    with pytest.raises(ValueError, match="is not a regular file"):
        run(config(Source("archive", ".")), tmp_path, tmp_path)


def test_an_io_error_while_listing_is_one_row(class_folder, tmp_path, monkeypatch):
    real = os.scandir

    def scandir(path):
        if str(path).endswith("phone"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert len(m) == 12 + 1 and m.loc["phone", "reason"] == "unreadable"
