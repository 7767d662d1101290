import numpy as np
import pytest
from PIL import Image

from tests.helpers.photos import broken_avif, encode, png_header_only, spider_image
from vitrine.images import (
    CENTER_CROP,
    LETTERBOX,
    RESIZE_MODES,
    SQUEEZE,
    Rejected,
    checked_square,
    decode_rgb,
    inspect_image,
    load_square,
    open_capped,
)


def load_checked_square(data: bytes, size: int, *, min_side: int, max_pixels: int) -> np.ndarray:
    """The service's path: open_capped from the header, then checked_square's single decode."""
    return checked_square(open_capped(data, max_pixels), size, min_side=min_side)


def checked_square_128(data: bytes, **limits) -> np.ndarray:
    return load_checked_square(data, 128, **limits)


# The service's single-decode path must refuse exactly what inspect_image refuses, with the same
# codes, even though it decodes JPEGs at a reduced DCT scale.
BOTH_CHECKS = pytest.mark.parametrize(
    "check", [inspect_image, checked_square_128], ids=["inspect_image", "checked_square"]
)


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
@BOTH_CHECKS
def test_refuses_non_images(data, code, check):
    with pytest.raises(Rejected) as err:
        check(data, min_side=1, max_pixels=10**6)
    assert err.value.code == code


@BOTH_CHECKS
def test_html_is_described_as_html(check):
    with pytest.raises(Rejected) as err:
        check(b"<html><body>home page</body></html>", min_side=1, max_pixels=10**6)
    assert err.value.detail == "HTML document"


@BOTH_CHECKS
@pytest.mark.parametrize(
    "data",
    [spider_image(), broken_avif("payload"), broken_avif("no_item")],
    ids=["spider", "avif-payload", "avif-no-item"],
)
def test_a_decoders_own_failure_is_this_photos_reason(check, data):
    """Decoders fail in their own ways (EOFError, libavif's RuntimeError): a Rejected, never an
    exception that would take down a collect batch or answer an upload with a 500."""
    with pytest.raises(Rejected) as err:
        check(data, min_side=1, max_pixels=10**6)
    assert err.value.code in ("undecodable", "truncated")
    assert err.value.detail


@BOTH_CHECKS
def test_postscript_is_never_rendered(check, monkeypatch):
    """PIL renders EPS by running Ghostscript: an upload must not start an outside program."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n"
    started = []
    monkeypatch.setattr("subprocess.Popen.__init__", lambda *a, **k: started.append(a))
    with pytest.raises(Rejected) as err:
        check(eps, min_side=1, max_pixels=10**6)
    assert err.value.code == "not_an_image" and "PostScript (EPS)" in err.value.detail
    assert started == []


@BOTH_CHECKS
@pytest.mark.parametrize("size", [(200, 150), (640, 480)])  # 640x480 decodes at 1/2 DCT scale
def test_truncated_jpeg_is_refused(make_photo, check, size):
    data = make_photo(2, size)
    with pytest.raises(Rejected) as err:
        check(data[: len(data) // 2], min_side=1, max_pixels=10**6)
    assert err.value.code == "truncated"


@BOTH_CHECKS
def test_decompression_bomb_is_refused_from_its_header(check):
    # 30000 x 30000 claimed, no pixel data: if decoding were attempted this would be "truncated".
    with pytest.raises(Rejected) as err:
        check(png_header_only(30000, 30000), min_side=1, max_pixels=40_000_000)
    assert err.value.code == "too_many_pixels"


@BOTH_CHECKS
def test_too_small_is_refused(make_photo, check):
    with pytest.raises(Rejected) as err:
        check(make_photo(3, (40, 20)), min_side=32, max_pixels=10**6)
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


def exif_rotated_jpeg() -> bytes:
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, :200] = (255, 0, 0)  # left half red: after the rotation, the top half
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes())


@pytest.mark.parametrize("kind", ["jpeg_120x90", "jpeg_640x480", "jpeg_exif_rotated", "png"])
def test_load_checked_square_gives_load_squares_pixels(make_photo, kind):
    data = {
        "jpeg_120x90": lambda: make_photo(5, (120, 90)),
        "jpeg_640x480": lambda: make_photo(6, (640, 480)),
        "jpeg_exif_rotated": exif_rotated_jpeg,
        "png": lambda: encode(decode_rgb(make_photo(7, (150, 100))), "PNG"),
    }[kind]()
    checked = load_checked_square(data, 128, min_side=32, max_pixels=10**6)
    np.testing.assert_array_equal(checked, load_square(data, 128))


def test_load_checked_square_judges_size_on_the_original_not_the_dct_scaled_decode(make_photo):
    # 1024x256 decodes at 1/2 scale for a 128 px square (512x128): 256 px is the shorter side.
    data = make_photo(8, (1024, 256))
    assert load_checked_square(data, 128, min_side=200, max_pixels=10**6).shape == (128, 128, 3)
    with pytest.raises(Rejected) as err:
        load_checked_square(data, 128, min_side=257, max_pixels=10**6)
    assert err.value.detail.startswith("1024x256")


def two_colour_photo() -> bytes:
    """A 40x20 PNG: left half red, right half blue (lossless, so pixels can be checked)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    return encode(Image.fromarray(arr), "PNG")


def test_squeeze_stretches_the_whole_photo_to_the_square():
    square = load_square(two_colour_photo(), 8, SQUEEZE)
    assert (square[:, :3] == (255, 0, 0)).all() and (square[:, 5:] == (0, 0, 255)).all()


def test_letterbox_keeps_the_shape_on_white_bands():
    square = load_square(two_colour_photo(), 8, LETTERBOX)
    # 40x20 scaled to 8x4, centred: rows 0-1 and 6-7 are white bands.
    assert (square[:2] == 255).all() and (square[6:] == 255).all()
    assert (square[2:6, :3] == (255, 0, 0)).all() and (square[2:6, 5:] == (0, 0, 255)).all()


def test_center_crop_keeps_the_middle_square_at_its_shape():
    square = load_square(two_colour_photo(), 8, CENTER_CROP)
    # The middle 20x20 of 40x20: half red, half blue, with nothing white.
    assert (square[:, :3] == (255, 0, 0)).all() and (square[:, 5:] == (0, 0, 255)).all()
    assert not (square == 255).all(axis=2).any()


@pytest.mark.parametrize("resize", RESIZE_MODES)
def test_the_services_single_decode_makes_the_same_square_for_every_rule(make_photo, resize):
    data = make_photo(9, (640, 360))
    checked = checked_square(open_capped(data, 10**6), 128, min_side=32, resize=resize)
    np.testing.assert_array_equal(checked, load_square(data, 128, resize))


def test_an_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="resize must be one of"):
        load_square(two_colour_photo(), 8, "stretch")
