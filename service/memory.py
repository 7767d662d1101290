"""Large blocks handed back to the operating system as soon as they are freed (glibc).

An upload is held in memory several times over while it is read (the multipart parser's
buffer, its bytes, the decoded image), each a block of up to serve.max_upload_bytes. glibc
serves a block of 128 KiB or more from a mapping of its own, unmapped on free, but raises that
threshold to the size of each such block freed (up to 32 MiB): after the first large upload,
the following ones come from the heap, and the heap keeps what they free. Under a mix of
uploads up to 20 MB (benchmarks/serve_soak.py), each worker then stays ~100 MB above its idle
size, moving up and down by 20 MB with the largest uploads in flight; with the threshold fixed
at LARGE_BLOCK_BYTES it stays within a few MB of it. Small objects (requests, answers, photos
under a megabyte) are not concerned.
"""

from __future__ import annotations

import ctypes
import ctypes.util

LARGE_BLOCK_BYTES = 1024 * 1024
M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def hand_back_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Blocks of `threshold` bytes or more each get a mapping of their own, unmapped on free,
    whatever sizes were freed before. False where the C library is not glibc (nothing done)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # no C library found, or one without mallopt (macOS)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
