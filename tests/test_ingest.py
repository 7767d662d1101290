import hashlib
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image, ImageFile

from tests.helpers.photos import encode, png_header_only
from vitrine.images import Rejected, decode_rgb, inspect_image
from vitrine.ingest import sources as ingest
from vitrine.ingest.hashing import hamming, phash64
from vitrine.ingest.sources import (
    ImageFacts,
    IngestConfig,
    ingest_batch,
    ingest_image,
    ingest_stream,
    phash_from_int64,
    phash_to_int64,
)

SYNC = IngestConfig(scheduler="synchronous", progress=False)


def code_of(data: bytes, config: IngestConfig = SYNC) -> str:
    with pytest.raises(Rejected) as err:
        ingest_image(data, config)
    return err.value.code


def test_facts_of_a_good_jpeg(make_photo):
    data = make_photo(1, (120, 90))
    facts = ingest_image(data, SYNC)
    assert facts.sha256 == hashlib.sha256(data).hexdigest()
    assert (facts.width, facts.height, facts.format) == (120, 90, "JPEG")
    assert 0 <= facts.phash < 2**64
    thumb = Image.open(io.BytesIO(facts.thumbnail))
    assert (thumb.format, thumb.mode, thumb.size) == ("JPEG", "RGB", (96, 72))


# 640x480 decodes at 1/4 scale, then takes a nearest-neighbour step (160 -> 128 px); 2400x1800
# decodes at 1/8 (300 px), too far from 128 px for that: area averaging (BOX) finishes it.
@pytest.mark.parametrize("size", [(640, 480), (2400, 1800)])
def test_the_thumbnail_is_the_upright_rgb_decode_made_small(make_photo, size):
    data = make_photo(2, size)
    thumb = Image.open(io.BytesIO(ingest_image(data, SYNC).thumbnail))
    reference = decode_rgb(data).resize(thumb.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(thumb, np.int16) - np.asarray(reference, np.int16))
    assert diff.mean() < 4


def test_a_thumbnail_far_below_the_dct_scaled_decode_is_area_averaged():
    # 2400 px stripes 24 px apart decode at 1/8 scale (300 px), 2.3x the thumbnail's 128 px:
    # nearest neighbour would alias them (mean error 73 against BOX of the full decode).
    row = (np.arange(2400) // 12 % 2 * 255).astype(np.uint8)
    stripes = Image.fromarray(np.repeat(np.repeat(row[None, :, None], 1800, 0), 3, 2))
    data = encode(stripes, "JPEG", quality=95)
    thumb = Image.open(io.BytesIO(ingest_image(data, SYNC).thumbnail))
    reference = decode_rgb(data).resize(thumb.size, Image.Resampling.BOX)
    assert np.abs(np.asarray(thumb, np.int16) - np.asarray(reference, np.int16)).mean() < 40


def test_the_thumbnail_encoder_matches_image_save(make_photo):
    # ingest encodes with Image.tobytes("jpeg", ...): a Pillow upgrade must not change it.
    img = decode_rgb(make_photo(3, (96, 72)))
    assert ingest._encode_thumbnail(img, img.size, 80, False) == encode(img, "JPEG", quality=80)


def test_a_small_plain_jpeg_is_its_own_thumbnail(make_photo):
    data = make_photo(4, (90, 67))
    assert ingest_image(data, SYNC).thumbnail == data


BAD_INPUTS = {
    "empty": lambda photo: b"",
    "not_an_image": lambda photo: b"<!DOCTYPE html><html><body>Login</body></html>",
    "truncated": lambda photo: photo(5, (200, 150))[:1500],
    "too_small": lambda photo: photo(6, (40, 20)),
    "too_many_pixels": lambda photo: png_header_only(30000, 30000),
}


@pytest.mark.parametrize("code", sorted(BAD_INPUTS))
def test_every_rejection_code_and_the_same_as_inspect_image(code, make_photo):
    data = BAD_INPUTS[code](make_photo)
    assert code_of(data) == code
    with pytest.raises(Rejected) as err:
        inspect_image(data, min_side=SYNC.min_side, max_pixels=SYNC.max_pixels)
    assert err.value.code == code


@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpeg_is_refused_although_decoded_at_reduced_scale(make_photo, progressive, keep):
    data = encode(decode_rgb(make_photo(7, (640, 480))), "JPEG", progressive=progressive)
    rgb, *_ = ingest._examine(data, SYNC)
    assert rgb.size == (160, 120)  # the complete file is decoded at 1/4 scale (draft)
    cut = int(len(data) * keep) if keep > 0 else len(data) + keep  # -2: only the EOI lost
    assert code_of(data[:cut]) == "truncated"


def test_size_reported_is_the_original_not_the_reduced_decode(make_photo):
    facts = ingest_image(make_photo(8, (640, 480)), SYNC)
    assert (facts.width, facts.height) == (640, 480)


def test_decompression_bomb_is_refused_from_its_header(monkeypatch):
    # 30000 x 30000 claimed, no pixel data: any decoding attempt would say "truncated".
    def no_decoding(self):
        raise AssertionError("decoded a bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert code_of(png_header_only(30000, 30000)) == "too_many_pixels"


def test_phash_survives_resizing_and_recompression_but_not_another_photo(make_photo):
    original = make_photo(9, (640, 480))
    copy = encode(decode_rgb(original).resize((300, 225)), "JPEG", quality=50)
    other = make_photo(10, (640, 480))
    h_original, h_copy, h_other = (ingest_image(d, SYNC).phash for d in (original, copy, other))
    assert hamming(h_original, h_copy) <= 6
    assert hamming(h_original, h_other) >= 16


def test_phash_from_the_reduced_decode_is_close_to_the_full_one(make_photo):
    data = make_photo(11, (640, 480))
    assert hamming(ingest_image(data, SYNC).phash, phash64(decode_rgb(data))) <= 4


def test_phash_as_int64_round_trips():
    for value in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        signed = phash_to_int64(value)
        assert -(2**63) <= signed < 2**63
        assert phash_from_int64(signed) == value
    assert np.array([2**64 - 1], np.uint64).view(np.int64)[0] == phash_to_int64(2**64 - 1)


def test_exif_rotated_photo_reports_upright_size_and_upright_thumbnail():
    # Left half red, right half blue, stored 600x400 with "rotate 90 degrees clockwise".
    arr = np.zeros((400, 600, 3), np.uint8)
    arr[:, :300] = (255, 0, 0)
    arr[:, 300:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes())

    facts = ingest_image(data, SYNC)
    assert (facts.width, facts.height) == (400, 600)
    thumb = np.asarray(Image.open(io.BytesIO(facts.thumbnail)))
    assert thumb.shape == (96, 64, 3)  # upright: 64 wide, 96 high
    top, bottom = thumb[5, 32], thumb[-5, 32]  # red ends up on top once upright
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_png_with_transparency_gets_a_white_background_thumbnail():
    data = encode(Image.new("RGBA", (200, 100), (0, 0, 0, 0)), "PNG")
    facts = ingest_image(data, SYNC)
    assert facts.format == "PNG" and (facts.width, facts.height) == (200, 100)
    assert np.asarray(Image.open(io.BytesIO(facts.thumbnail))).min() > 240


def mixed_inputs(make_photo, n: int) -> list[tuple[str, bytes | Rejected]]:
    """Good photos of several sizes with a bad input, and an unreadable one, every few."""
    items: list[tuple[str, bytes | Rejected]] = []
    for i in range(n):
        if i % 7 == 3:
            items.append((f"bad-{i}", b"not an image"))
        elif i % 11 == 5:
            items.append((f"unreadable-{i}", Rejected("too_large", "a big file")))
        else:
            items.append((f"photo-{i}", make_photo(i, (120 + i % 5 * 40, 90))))
    return items


def as_comparable(results):
    return [(k, r if isinstance(r, ImageFacts) else (r.code, r.detail)) for k, r in results]


def test_a_batch_equals_image_by_image(make_photo):
    blobs = [data for _, data in mixed_inputs(make_photo, 40) if isinstance(data, bytes)]
    batch = ingest_batch(blobs, SYNC)
    for data, result in zip(blobs, batch, strict=True):
        try:
            assert result == ingest_image(data, SYNC)
        except Rejected as rejected:
            assert (result.code, result.detail) == (rejected.code, rejected.detail)


def test_an_unexpected_decoder_error_fails_one_image_not_the_batch(make_photo, monkeypatch):
    examine = ingest._examine

    def flaky(data, config):
        if data == b"poison":
            raise RuntimeError("decoder bug")
        return examine(data, config)

    monkeypatch.setattr(ingest, "_examine", flaky)
    results = ingest_batch([make_photo(1), b"poison", make_photo(2)], SYNC)
    assert isinstance(results[0], ImageFacts) and isinstance(results[2], ImageFacts)
    assert results[1].code == "undecodable"


def test_stream_passes_an_unreadable_input_through_in_order(make_photo):
    items = mixed_inputs(make_photo, 30)
    results = list(ingest_stream(iter(items), IngestConfig(**{**vars(SYNC), "batch_size": 4})))
    assert [k for k, _ in results] == [k for k, _ in items]
    assert results[5][1].code == "too_large" and results[3][1].code == "not_an_image"


class CountingItems:
    """An input stream that records how far it has been read."""

    def __init__(self, items: list):
        self.items, self.taken = items, 0

    def __iter__(self) -> Iterator:
        for item in self.items:
            self.taken += 1
            yield item


def test_stream_reads_its_input_lazily_in_process(make_photo):
    source = CountingItems(mixed_inputs(make_photo, 50))
    results = ingest_stream(source, IngestConfig(**{**vars(SYNC), "batch_size": 8}))
    next(results)
    assert source.taken == 8  # one batch, not the whole stream
    assert len([next(results) for _ in range(10)]) == 10
    assert source.taken == 16


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard": False, "dashboard_address": ":0"},  # not port 8787
    ) as cluster:
        yield cluster


def test_stream_on_a_cluster_equals_the_synchronous_path_in_order(cluster, make_photo):
    items = mixed_inputs(make_photo, 120)
    config = IngestConfig(scheduler=cluster.scheduler_address, batch_size=16, progress=False)
    on_cluster = as_comparable(ingest_stream(iter(items), config))
    in_process = as_comparable(ingest_stream(iter(items), SYNC))
    assert [k for k, _ in on_cluster] == [k for k, _ in items]
    assert on_cluster == in_process


def test_stream_on_a_cluster_reads_ahead_a_bounded_number_of_batches(cluster, make_photo):
    source = CountingItems(mixed_inputs(make_photo, 200))
    config = IngestConfig(
        scheduler=cluster.scheduler_address, batch_size=10, max_in_flight=3, progress=False
    )
    results = ingest_stream(source, config)
    next(results)
    assert source.taken == 30  # max_in_flight batches, not the 200 items
    assert sum(1 for _ in results) == 199


def test_stream_starts_and_stops_its_own_local_cluster(make_photo):
    items = mixed_inputs(make_photo, 20)
    config = IngestConfig(n_workers=1, batch_size=8, progress=False)  # scheduler "": local
    assert as_comparable(ingest_stream(iter(items), config)) == as_comparable(
        ingest_stream(iter(items), SYNC)
    )
