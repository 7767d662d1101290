"""Perceptual hashing: a 64-bit pHash that survives resizing and recompression.

pHash (Zauner 2010): greyscale 32x32, 2-D DCT, keep the 8x8 lowest frequencies, one bit per
coefficient above their median. Copies of a photo land a few bits apart; distinct photos ~32.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HASH_SIDE = 32


def _dct_rows(n: int, keep: int) -> np.ndarray:
    """The first `keep` rows of the orthonormal DCT-II matrix of size n."""
    k = np.arange(keep)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


# Only the 8x8 lowest frequencies are needed: two small matrix products instead of a full DCT.
_DCT8 = _dct_rows(HASH_SIDE, 8)


def phash64(img: Image.Image) -> int:
    """The 64-bit pHash of an image, as an unsigned int."""
    small = img.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX)
    return phash64_gray(np.asarray(small, dtype=np.float32))


def phash64_gray(gray32: np.ndarray) -> int:
    """pHash of an already-reduced (32, 32) greyscale array."""
    low = (_DCT8 @ gray32 @ _DCT8.T).ravel()
    # The DC term (mean brightness) is excluded from the median: it would always be the largest.
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def phash64_grays(grays32: np.ndarray) -> np.ndarray:
    """phash64_gray of a stack of (n, 32, 32) greyscale arrays, as n uint64: one batched
    matrix product instead of n small ones (per-call numpy overhead dominates at this size)."""
    gray = grays32.astype(np.float32, copy=False)
    low = (_DCT8 @ gray @ _DCT8.T).reshape(len(gray), 64)
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
