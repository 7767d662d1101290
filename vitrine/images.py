"""The one image decoding and resizing path, shared by collect, prepare and the service.

Served predictions equal evaluated ones only if every consumer turns bytes into pixels the
same way, so nothing else in the project calls PIL to decode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# We enforce our own pixel cap from the header (see inspect_image); PIL's global one would
# raise or warn with a message we cannot map to a stable reason code.
Image.MAX_IMAGE_PIXELS = None
Image.init()
# Every raster format PIL reads but EPS, which PIL renders by running Ghostscript, an outside
# program that a seller's upload or a catalog's file must never start: PostScript is no photo.
READ_FORMATS = tuple(f for f in Image.OPEN if f != "EPS")


class Rejected(Exception):
    """An input that cannot become a training image; `code` is a stable manifest reason."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str


def _describe_non_image(data: bytes) -> str:
    head = data[:512].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "HTML document"
    if head.startswith(b"%!ps") or data.startswith(b"\xc5\xd0\xd3\xc6"):
        return "PostScript (EPS) document, not read: rendering it would run Ghostscript"
    try:
        head.decode("utf-8")
        return "text file"
    except UnicodeDecodeError:
        return f"unknown binary data starting {data[:8].hex()}"


def undecodable(err: Exception) -> Rejected:
    """A decoder's unexpected failure as this photo's reason. PIL's plugins and the libraries
    under them fail in their own ways (libavif a RuntimeError, SPIDER an EOFError, others
    struct.error): each costs its photo, never its caller (a collect batch, a service worker)."""
    return Rejected("undecodable", f"{type(err).__name__}: {err}")


def _open(data: bytes) -> Image.Image:
    if not data:
        raise Rejected("empty", "0 bytes")
    try:
        return Image.open(io.BytesIO(data), formats=READ_FORMATS)
    except UnidentifiedImageError:
        raise Rejected("not_an_image", _describe_non_image(data)) from None
    except Exception as err:  # a format recognised, then its header refused by its library
        raise undecodable(err) from None


def open_capped(data: bytes, max_pixels: int) -> Image.Image:
    """Open `data` (header only, nothing decoded) and refuse more than `max_pixels` pixels."""
    img = _open(data)
    w, h = img.size  # from the header; PNG's getexif() would decode every pixel
    if w * h > max_pixels:
        raise Rejected("too_many_pixels", f"{w}x{h} exceeds {max_pixels} pixels")
    return img


def load_checked(img: Image.Image, header_size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """Decode every pixel (at the draft scale, if one was set) and return the upright size of
    the original, given by `header_size` (draft() shrinks img.size to the decoded scale). The
    entropy decoder reads every byte at any DCT scale, so a truncated JPEG fails either way."""
    try:
        img.load()
        orientation = img.getexif().get(0x0112, 1)  # PNG keeps EXIF after the pixels
    except (OSError, SyntaxError, ValueError) as err:
        raise Rejected("truncated", str(err)) from None
    except Exception as err:
        raise undecodable(err) from None
    w, h = header_size
    if orientation in (5, 6, 7, 8):  # these EXIF orientations rotate by 90 degrees
        w, h = h, w
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h}, shorter side below {min_side}")
    return w, h


def inspect_image(data: bytes, *, min_side: int, max_pixels: int) -> ImageInfo:
    """Check that `data` is a complete, decodable image of acceptable size.

    The pixel cap is applied from the header alone, so a decompression bomb is refused before a
    single pixel is decoded.
    """
    img = open_capped(data, max_pixels)
    w, h = load_checked(first_frame(img, None), img.size, min_side)
    return ImageInfo(width=w, height=h, format=(img.format or "unknown").upper())


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits instead of clipping everything to white.
        arr = np.asarray(img, dtype=np.uint32) >> 8
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as on a marketplace listing page.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def first_frame(img: Image.Image, draft: tuple[int, int] | None) -> Image.Image:
    """An opened image's first frame, to be decoded at the smallest JPEG DCT scale (1/2, 1/4 or
    1/8) that still covers `draft` (width, height), when only a small image is needed."""
    try:
        img.seek(0)
    except Exception as err:  # SPIDER's seek refuses a file that is not a stack
        raise undecodable(err) from None
    if draft and img.format == "JPEG":
        img.draft("RGB", draft)
    return img


def decode_rgb(data: bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decode to an upright RGB image (first frame of an animation, EXIF orientation applied).

    `draft_size` lets JPEG decoding run at a reduced DCT scale when only a small image is needed.
    """
    draft = (draft_size, draft_size) if draft_size else None
    return upright_rgb(first_frame(_open(data), draft))


def upright_rgb(img: Image.Image) -> Image.Image:
    """Decode an opened image, apply its EXIF orientation, then the RGB rules of _to_rgb."""
    img.load()
    # exif_transpose and convert("RGB") each copy every pixel even when there is nothing to
    # do; skipping them then gives the same pixels (vitrine.ingest.sources decodes thousands a
    # second).
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else _to_rgb(img)


# How a photo becomes a square (prepare.resize; the packaged model carries it to the service):
# - squeeze: the whole photo, stretched to the square (a portrait laptop comes out tall);
# - letterbox: the whole photo at its own shape, centred on white bands (a listing's background);
# - center_crop: the middle square of the photo, at its own shape (the ends of the long side lost).
SQUEEZE, LETTERBOX, CENTER_CROP = "squeeze", "letterbox", "center_crop"
RESIZE_MODES = (SQUEEZE, LETTERBOX, CENTER_CROP)
LETTERBOX_FILL = (255, 255, 255)


def resize_square(img: Image.Image, size: int, resize: str = SQUEEZE) -> np.ndarray:
    """An upright RGB image to a (size, size, 3) uint8 array by the `resize` rule (bilinear)."""
    bilinear = Image.Resampling.BILINEAR
    if resize == SQUEEZE:
        square = img.resize((size, size), bilinear)
    elif resize == LETTERBOX:
        square = ImageOps.pad(img, (size, size), method=bilinear, color=LETTERBOX_FILL)
    elif resize == CENTER_CROP:
        square = ImageOps.fit(img, (size, size), method=bilinear)
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    return np.asarray(square, dtype=np.uint8)


def load_square(data: bytes, size: int, resize: str = SQUEEZE) -> np.ndarray:
    """Encoded bytes to a (size, size, 3) uint8 array: what training and serving both see."""
    return resize_square(decode_rgb(data, draft_size=size), size, resize)


def checked_square(
    img: Image.Image, size: int, *, min_side: int, resize: str = SQUEEZE
) -> np.ndarray:
    """The rest of inspect_image's checks, then load_square's pixels, from a single decode of an
    image open_capped returned: the service's path for untrusted uploads, which decides from the
    opened header where to decode (a bomb was refused by open_capped)."""
    header_size = img.size
    load_checked(first_frame(img, (size, size)), header_size, min_side)
    return resize_square(upright_rgb(img), size, resize)
