"""numba kernels of FITS output: big-endian words and the data checksum."""

from __future__ import annotations

import numpy as np

from .._shared.jit import njit


@njit(cache=True, nogil=True)
def word_sum(words, swap):
    """Sum (uint64) of the 32-bit words a FITS file stores for ``words`` (a native uint32 view).

    ``swap=False``: the words are numbers (float32 bits) written big-endian, so each stored word
    has the value of the native word; ``swap=True``: the words are raw bytes (uint8 planes) read
    back big-endian. The FITS data checksum (DATASUM) is this sum folded to 32 bits.
    """
    total = np.uint64(0)
    if swap:
        for i in range(words.size):
            w = np.uint64(words[i])
            total += (((w & np.uint64(0xFF)) << np.uint64(24)) | ((w & np.uint64(0xFF00)) << np.uint64(8))
                      | ((w >> np.uint64(8)) & np.uint64(0xFF00)) | (w >> np.uint64(24)))
    else:
        for i in range(words.size):
            total += np.uint64(words[i])
    return total


@njit(cache=True, nogil=True)
def to_big_endian(words, out):
    """``out[i]`` = the bytes of ``words[i]`` reversed (native uint32 -> big-endian storage)."""
    for i in range(words.size):
        w = words[i]
        out[i] = (((w & np.uint32(0xFF)) << np.uint32(24)) | ((w & np.uint32(0xFF00)) << np.uint32(8))
                  | ((w >> np.uint32(8)) & np.uint32(0xFF00)) | (w >> np.uint32(24)))
