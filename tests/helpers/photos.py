"""Photos made on the spot: photo-like JPEGs, encoded images, PNGs that lie about their size."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photo_bytes(
    seed: int, size: tuple[int, int] = (96, 72), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    """A distinct, photo-like image: a smooth random gradient plus a few blocks."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (2, 3))
    arr = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    for _ in range(4):
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, 3)
    img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


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


def spider_image() -> bytes:
    """A SPIDER file (a scientific format PIL reads): its seek(0) raises EOFError."""
    out = io.BytesIO()
    Image.new("F", (64, 64)).save(out, "SPIDER")
    return out.getvalue()


def broken_avif(damage: str) -> bytes:
    """An AVIF whose AV1 payload is garbled ("payload": libavif's RuntimeError at decoding) or
    whose item-location box is renamed ("no_item": its RuntimeError at opening)."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(out, "AVIF")
    data = bytearray(out.getvalue())
    if damage == "payload":
        at = data.find(b"mdat") + 4
        data[at:] = b"\xff" * (len(data) - at)
    else:
        at = data.find(b"iloc")
        data[at : at + 4] = b"xloc"
    return bytes(data)
