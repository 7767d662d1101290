import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vitrine.images import Rejected, decode_rgb, inspect_image, load_square


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is 16 bytes of nothing."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", bytes(16))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_accepts_a_jpeg_and_reports_its_size(make_photo):
    info = inspect_image(make_photo(1, (96, 72)), min_side=32, max_pixels=10**6)
    assert (info.width, info.height, info.format) == (96, 72, "JPEG")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty"),
        (b"just some text, not a photo\n", "not_an_image"),
        (b"<!DOCTYPE html><html><body>Login</body></html>", "not_an_image"),
    ],
)
def test_refuses_non_images(data, code):
    with pytest.raises(Rejected) as err:
        inspect_image(data, min_side=1, max_pixels=10**6)
    assert err.value.code == code


def test_html_is_described_as_html():
    with pytest.raises(Rejected) as err:
        inspect_image(b"<html><body>home page</body></html>", min_side=1, max_pixels=10**6)
    assert err.value.detail == "HTML document"


def test_truncated_jpeg_is_refused(make_photo):
    data = make_photo(2, (200, 150))
    with pytest.raises(Rejected) as err:
        inspect_image(data[: len(data) // 2], min_side=1, max_pixels=10**6)
    assert err.value.code == "truncated"


def test_decompression_bomb_is_refused_from_its_header():
    # 30000 x 30000 claimed, no pixel data: if decoding were attempted this would be "truncated".
    with pytest.raises(Rejected) as err:
        inspect_image(png_header_only(30000, 30000), min_side=1, max_pixels=40_000_000)
    assert err.value.code == "too_many_pixels"


def test_too_small_is_refused(make_photo):
    with pytest.raises(Rejected) as err:
        inspect_image(make_photo(3, (40, 20)), min_side=32, max_pixels=10**6)
    assert err.value.code == "too_small"


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_every_mode_decodes_to_rgb(mode):
    img = Image.fromarray(np.full((40, 50, 3), 200, np.uint8), "RGB")
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    out = decode_rgb(encode(img, fmt))
    assert out.mode == "RGB" and out.size == (50, 40)


def test_sixteen_bit_keeps_its_brightness():
    arr = np.full((10, 10), 40000, np.uint16)  # about 61% grey
    out = np.asarray(decode_rgb(encode(Image.fromarray(arr), "PNG")))
    assert 150 <= out.mean() <= 160


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert np.asarray(decode_rgb(encode(img, "PNG"))).min() == 255


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert decode_rgb(data).size == (40, 60)
    info = inspect_image(data, min_side=1, max_pixels=10**6)
    assert (info.width, info.height) == (40, 60)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    red = np.asarray(decode_rgb(data))[10, 10]
    assert red[0] > 200 and red[2] < 50


def test_webp_is_accepted():
    info = inspect_image(
        encode(Image.new("RGB", (64, 48), (1, 2, 3)), "WEBP"), min_side=32, max_pixels=10**6
    )
    assert info.format == "WEBP"


def test_load_square_shape_and_dtype(make_photo):
    arr = load_square(make_photo(4, (120, 90)), 64)
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
