import tarfile

import pytest

from vitrine.data.shards import ShardReader, ShardWriter


def test_shards_are_standard_tar_files_and_refs_point_at_the_bytes(tmp_path):
    blobs = {f"{i:064x}.jpg": bytes([i]) * (100 * i + 1) for i in range(7)}
    with ShardWriter(tmp_path, "images", per_shard=3) as writer:
        refs = {name: writer.add(name, data) for name, data in blobs.items()}
    shards = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*.tar"))
    assert shards == [f"images/shard-0000{i}.tar" for i in range(3)]
    assert {ref.shard for ref in refs.values()} == set(shards)
    for shard in shards:
        with tarfile.open(tmp_path / shard) as tar:  # readable by standard tools
            for member in tar.getmembers():
                assert tar.extractfile(member).read() == blobs[member.name]
        assert (tmp_path / shard).stat().st_size % 10240 == 0
    with ShardReader(tmp_path) as reader:
        for name, ref in refs.items():
            assert reader.read(ref.shard, ref.offset, ref.length) == blobs[name]


def test_member_names_over_100_bytes_are_refused(tmp_path):
    with (
        ShardWriter(tmp_path, "images", per_shard=3) as writer,
        pytest.raises(ValueError, match="100"),
    ):
        writer.add("x" * 101, b"data")
