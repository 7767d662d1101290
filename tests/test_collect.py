import contextlib
import io
import json
import os
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from stages.collect import (
    MANIFEST,
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    REPORT_COLUMNS,
    ManifestWriter,
    collect,
    collect_report,
    quarantine_list,
    read_quarantined,
)
from tests.helpers.collect_runs import config, run
from vitrine.config import ConfigError, from_mapping
from vitrine.data.shards import ShardReader
from vitrine.images import Rejected
from vitrine.ingest.archives import _tar_members, _tree_prefix
from vitrine.ingest.download import DownloadConfig
from vitrine.ingest.records import Source, read_fd_capped, read_file_capped


def test_folder_source_accepts_every_photo_and_packs_shards(class_folder, tmp_path):
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert len(m) == 24 and (m["status"] == "accepted").all()
    assert m.loc["laptop/000.jpg", "label"] == "laptop"
    # 24 images, 5 per shard: few files, not one per image.
    assert len(list((tmp_path / "out" / "shards").glob("*.tar"))) == 5
    row = m.loc["phone/001.jpg"]
    with ShardReader(tmp_path / "out") as thumbs:
        thumb = Image.open(
            io.BytesIO(thumbs.read(row["thumb_shard"], row["thumb_offset"], row["thumb_length"]))
        )
    assert max(thumb.size) == 48 and thumb.format == "JPEG"
    assert row["phash"] != 0


def test_shard_refs_give_back_the_original_bytes(class_folder, tmp_path):
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    row = m.loc["phone/007.jpg"]
    with ShardReader(tmp_path / "out") as shards:
        data = shards.read(row["shard"], row["offset"], row["length"])
    assert data == (class_folder / "phone" / "007.jpg").read_bytes()


def test_a_photo_within_thumb_size_is_its_own_thumbnail_stored_once(class_folder, tmp_path):
    m = run(config(Source("folder", "photos"), thumb_size=4096), class_folder.parent, tmp_path)
    refs = ["shard", "offset", "length"]
    assert (m[refs].to_numpy() == m[[f"thumb_{c}" for c in refs]].to_numpy()).all()
    assert not list((tmp_path / "out" / "thumbs").glob("*.tar"))


def test_bad_files_are_quarantined_with_a_reason_and_nothing_is_lost(
    class_folder, make_photo, tmp_path
):
    good = make_photo(7)
    (class_folder / "phone" / "corrupt.jpg").write_bytes(good[: len(good) // 2])
    (class_folder / "phone" / "notes.jpg").write_text("this is a text file, not a photo")
    (class_folder / "phone" / "empty.jpg").write_bytes(b"")
    (class_folder / "phone" / "tiny.jpg").write_bytes(make_photo(8, (20, 20)))
    (class_folder / "tablet").mkdir()
    (class_folder / "tablet" / "t.jpg").write_bytes(make_photo(9))
    (class_folder / "loose.jpg").write_bytes(make_photo(10))
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert len(m) == 24 + 6  # rows in = accepted + quarantined
    assert m.loc["phone/corrupt.jpg", "reason"] == "truncated"
    assert m.loc["phone/notes.jpg", "reason"] == "not_an_image"
    assert m.loc["phone/empty.jpg", "reason"] == "empty"
    assert m.loc["phone/tiny.jpg", "reason"] == "too_small"
    assert m.loc["tablet/t.jpg", "reason"] == "label_not_in_classes"
    assert m.loc["loose.jpg", "reason"] == "label_not_in_classes"
    assert (m[m["status"] == "quarantined"]["shard"] == "").all()
    # main() reads back only these columns, and only the quarantined rows for the list.
    report = collect_report(m.reset_index()[REPORT_COLUMNS])
    assert report["accepted"] + report["quarantined"] == report["records"] == 30
    assert report["by_reason"]["label_not_in_classes"] == 2
    listed = quarantine_list(read_quarantined(tmp_path / "out" / MANIFEST))
    assert listed.equals(quarantine_list(m.reset_index()))
    assert sorted(listed["id"]) == sorted(m.index[m["status"] == "quarantined"])
    assert listed.loc[listed["id"] == "phone/empty.jpg", "reason"].item() == "empty"


def test_manifest_is_written_a_row_group_at_a_time_and_reads_back_whole(tmp_path):
    blank = {f.name: 0 if f.type == "int64" else "" for f in MANIFEST_SCHEMA}
    rows = [blank | {"id": f"r{i}", "offset": i} for i in range(5)]
    with ManifestWriter(tmp_path / "m.parquet", group_rows=2) as writer:
        for row in rows:
            writer.add(row)
    assert pq.ParquetFile(tmp_path / "m.parquet").num_row_groups == 3  # 2 + 2 + 1
    back = pd.read_parquet(tmp_path / "m.parquet")
    assert back["id"].tolist() == [f"r{i}" for i in range(5)]
    assert back["width"].dtype == "int64" and back["offset"].tolist() == list(range(5))


def test_an_empty_run_still_writes_a_manifest_with_every_column(tmp_path):
    with ManifestWriter(tmp_path / "m.parquet"):
        pass
    back = pd.read_parquet(tmp_path / "m.parquet")
    assert len(back) == 0 and tuple(back.columns) == MANIFEST_COLUMNS


def test_symlink_escaping_the_source_root_is_refused(class_folder, make_photo, tmp_path):
    secret = tmp_path / "elsewhere.jpg"
    secret.write_bytes(make_photo(11))
    (class_folder / "laptop" / "link.jpg").symlink_to(secret)
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    assert m.loc["laptop/link.jpg", "reason"] == "outside_source_root"


def test_oversized_file_is_refused(class_folder, make_photo, tmp_path):
    m = run(config(Source("folder", "photos"), max_bytes=1000), class_folder.parent, tmp_path)
    assert set(m["reason"]) == {"too_large"}


def test_read_capped_accepts_exactly_the_cap_and_refuses_one_byte_more(tmp_path):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(b"x" * 1000)
    assert read_file_capped(photo, 1000) == b"x" * 1000
    with pytest.raises(Rejected, match="over 999 bytes"):
        read_file_capped(photo, 999)
    with pytest.raises(Rejected) as err:
        read_file_capped(tmp_path, 1000)  # a directory
    assert err.value.code == "not_a_regular_file"


def _feed(payload: bytes) -> tuple[int, threading.Thread]:
    """The read end of a pipe, and the thread writing `payload` into it."""
    read_end, write_end = os.pipe()

    def write() -> None:
        with open(write_end, "wb") as f, contextlib.suppress(BrokenPipeError):
            f.write(payload)  # the reader may stop at its cap

    writer = threading.Thread(target=write)
    writer.start()
    return read_end, writer


def test_read_fd_capped_reads_past_a_size_fstat_does_not_know():
    # A pipe reports size 0, as a file still being written reports too little.
    payload = bytes(range(256)) * 5000
    fd, writer = _feed(payload)
    assert read_fd_capped(fd, 0, 10**7) == payload
    os.close(fd)
    writer.join()
    fd, writer = _feed(payload)
    with pytest.raises(Rejected, match="over 1000 bytes"):
        read_fd_capped(fd, 0, 1000)
    os.close(fd)
    writer.join()


def test_a_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody writes: opening it for reading would block forever
    with pytest.raises(Rejected) as err:
        read_file_capped(fifo, 1000)
    assert (err.value.code, err.value.detail) == ("not_a_regular_file", "a FIFO")


def test_exact_copies_are_stored_once(class_folder, tmp_path):
    data = (class_folder / "laptop" / "000.jpg").read_bytes()
    (class_folder / "laptop" / "copy.jpg").write_bytes(data)
    m = run(config(Source("folder", "photos")), class_folder.parent, tmp_path)
    a, b = m.loc["laptop/000.jpg"], m.loc["laptop/copy.jpg"]
    assert (a["shard"], a["offset"]) == (b["shard"], b["offset"])


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archive_with_a_wrapping_folder(class_folder, tmp_path, kind):
    raw = tmp_path / "raw"
    raw.mkdir()
    archive = raw / f"photos.{kind}"
    files = sorted(p for p in class_folder.rglob("*.jpg"))
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, f"raw_data/{p.relative_to(class_folder)}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, f"raw_data/{p.relative_to(class_folder)}")
    m = run(config(Source("archive", archive.name)), raw, tmp_path)
    assert len(m) == 24 and (m["status"] == "accepted").all()
    assert (
        "phone/003.jpg" in m.index and m.loc["phone/003.jpg", "source"] == f"archive:photos.{kind}"
    )


@pytest.mark.parametrize(
    ("names", "prefix"),
    [
        (["raw_data/laptop/a.jpg", "raw_data/phone/b.jpg"], "raw_data/"),
        (["laptop/a.jpg", "phone/b.jpg"], ""),  # the class tree itself
        (["phone/a.jpg", "phone/b.jpg"], ""),  # one top folder, but it is a class
        (["raw_data/laptop/a.jpg", "README.txt"], ""),  # a file beside the top folder
        (["a/laptop/x.jpg", "b/phone/y.jpg"], ""),  # two top folders
        ([], ""),
    ],
)
def test_tree_prefix_strips_only_a_single_wrapping_folder(names, prefix):
    assert _tree_prefix(iter(names), ("laptop", "phone")) == prefix


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_tar_members_are_streamed_not_kept(make_photo, tmp_path):
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tf:
        tf.addfile(_dir("laptop"))
        for i in range(50):
            data = make_photo(i)
            info = tarfile.TarInfo(f"laptop/{i:03d}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        names = []
        for member in _tar_members(tar):
            names.append(member.name)
            assert len(tar.members) <= 1  # TarFile would otherwise hold every header read
            assert tar.extractfile(member).read() == make_photo(len(names) - 1)
    assert names == [f"laptop/{i:03d}.jpg" for i in range(50)]  # the directory is skipped


def test_archive_member_escaping_the_root_is_refused(make_photo, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with tarfile.open(raw / "evil.tar", "w") as tf:
        for name in ("laptop/ok.jpg", "../phone/evil.jpg"):
            data = make_photo(len(name))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    m = run(config(Source("archive", "evil.tar")), raw, tmp_path)
    assert m.loc["laptop/ok.jpg", "status"] == "accepted"
    assert m.loc["../phone/evil.jpg", "reason"] == "outside_source_root"


class _Photos(BaseHTTPRequestHandler):
    photo = b""
    requests: ClassVar[list[str]] = []

    def do_GET(self):
        self.requests.append(self.path)
        routes = {
            "/a.jpg": (200, "image/jpeg", self.photo),
            "/login.jpg": (200, "image/jpeg", b"<html><body>Please log in</body></html>"),
        }
        status, ctype, body = routes.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def photo_server(make_photo):
    _Photos.photo = make_photo(42)
    _Photos.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Photos)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_csv_catalog_with_urls_and_paths(photo_server, class_folder, tmp_path):
    raw = class_folder.parent
    (raw / "catalog.csv").write_text(
        "id,label,url,path,price\n"
        f"ad-1,phone,{photo_server}/a.jpg,,100\n"
        f"ad-2,phone,{photo_server}/gone.jpg,,120\n"
        f"ad-3,laptop,{photo_server}/login.jpg,,900\n"
        f"ad-1,laptop,{photo_server}/a.jpg,,1\n"
        "ad-4,laptop,,photos/laptop/001.jpg,800\n"
        "ad-5,laptop,,../../etc/passwd,0\n"
        "ad-6,laptop,file:///etc/passwd,,0\n"
    )
    m = pd.read_parquet(
        collect(
            config(Source("catalog", "catalog.csv")), raw, tmp_path / "out", cache=tmp_path / "c"
        )
    )
    assert len(m) == 7
    by = {(r.id, r.label): r for r in m.itertuples()}
    assert by["ad-1", "phone"].status == "accepted"
    assert json.loads(by["ad-1", "phone"].meta) == {"price": "100"}
    assert by["ad-2", "phone"].reason == "http_404"
    assert by["ad-3", "laptop"].reason == "not_an_image"
    assert by["ad-1#repeat-2", "laptop"].reason == "duplicate_id"  # the manifest's key stays unique
    assert by["ad-4", "laptop"].status == "accepted"
    assert by["ad-5", "laptop"].reason == "outside_source_root"
    assert by["ad-6", "laptop"].reason == "bad_url"
    assert by["ad-1", "phone"].url.endswith("/a.jpg")
    # A re-run answers from the download cache: no request for what succeeded or 404'd.
    before = len(_Photos.requests)
    again = pd.read_parquet(
        collect(
            config(Source("catalog", "catalog.csv")), raw, tmp_path / "o2", cache=tmp_path / "c"
        )
    )
    assert len(_Photos.requests) == before
    assert again.drop(columns="meta").equals(m.drop(columns="meta"))


def test_catalog_urls_to_private_addresses_are_quarantined_by_default(photo_server, tmp_path):
    (tmp_path / "catalog.csv").write_text(
        f"id,label,url\nad-1,phone,{photo_server}/a.jpg\nad-2,phone,http://169.254.169.254/\n"
    )
    policy = DownloadConfig(max_attempts=1, fsync=False)  # the shipped policy: public only
    cfg = config(Source("catalog", "catalog.csv"), download=policy)
    m = pd.read_parquet(collect(cfg, tmp_path, tmp_path / "out", cache=tmp_path / "c"))
    assert m.set_index("id")["reason"].to_dict() == {
        "ad-1": "blocked_address",
        "ad-2": "blocked_address",
    }
    assert _Photos.requests == []  # the local server never heard of it


def test_jsonl_catalog_and_several_sources(class_folder, tmp_path):
    raw = class_folder.parent
    lines = [json.dumps({"id": "j1", "label": "phone", "path": "photos/phone/000.jpg"}), "{broken"]
    (raw / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config(Source("folder", "photos"), Source("catalog", "catalog.jsonl"))
    m = pd.read_parquet(collect(cfg, raw, tmp_path / "out", cache=tmp_path / "cache"))
    assert len(m) == 24 + 2
    assert set(m["source"]) == {"folder:photos", "catalog:catalog.jsonl"}
    assert m.set_index("id").loc["line-2", "reason"] == "bad_row"


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder:nowhere"):
        collect(config(Source("folder", "nowhere")), tmp_path, tmp_path / "out", cache=tmp_path)


def test_config_refuses_unknown_keys_and_kinds():
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping(Source, {"kind": "folder", "path": "x", "colour": "red"})
    with pytest.raises(ValueError, match="unknown kind"):
        config(Source("ftp", "x"))


def test_catalog_taxonomy_labels_and_split_column_reach_the_manifest(class_folder, tmp_path):
    raw = class_folder.parent
    (raw / "catalog.csv").write_text(
        "id,label,path,split\n"
        "g-1,Fruit/Apple/Granny-Smith,photos/laptop/000.jpg,train\n"
        "g-2,Vegetables/Mushroom/Brown-Cap-Mushroom,photos/phone/000.jpg,test\n"
        "g-3,Fruit/Apple,photos/phone/001.jpg,val\n"
    )
    taxonomy = ("Fruit/Apple/Granny-Smith", "Vegetables/Mushroom/Brown-Cap-Mushroom")
    m = run(config(Source("catalog", "catalog.csv"), classes=taxonomy), raw, tmp_path)
    assert m.loc["g-1", "label"] == "Fruit/Apple/Granny-Smith"
    assert (m.loc["g-1", "status"], m.loc["g-2", "status"]) == ("accepted", "accepted")
    assert json.loads(m.loc["g-2", "meta"]) == {"split": "test"}
    # a path prefix of a class is not that class
    assert m.loc["g-3", "reason"] == "label_not_in_classes"
    report = collect_report(m.reset_index())
    assert report["by_class"] == {taxonomy[0]: 1, taxonomy[1]: 1}
