"""numba kernels that subpackages of more than one layer share.

``hist_be16`` (the 16-bit histogram of raw big-endian rows: a combine's flat levels and the
inventory's pixel checks), ``block_mean`` (binning: the stretch's previews and the masters'
statistics) and ``subtract_scaled`` (``data -= scale * other``: the calibration arithmetic, and the
smallest parallel kernel, which :func:`ccdcal._shared.pool.kernels_threadsafe` runs as a probe).
The kernels of one subpackage live next to their users (``combining/_kernels.py``,
``calibration/_kernels.py``, ``io/_kernels.py``).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .jit import njit

NO_BLANK = 1 << 40  # a BLANK no 16-bit value equals


HIST16_PARTS = 8  # private histograms of hist_be16 (one per parallel part)


@njit(parallel=True, cache=True)
def hist_be16(raw, c0, c1, blank, hists):
    """Add the columns ``c0:c1`` of raw big-endian 16-bit rows to ``hists``.

    ``raw`` is (rows, nx) native uint16 holding the file's bytes; ``hists`` is
    (HIST16_PARTS, 65536) int64, bin ``u + 32768`` counting the stored integer ``u``;
    the BLANK value is not counted (pass NO_BLANK when there is none).
    """
    rows = raw.shape[0]
    parts = hists.shape[0]
    step = (rows + parts - 1) // parts
    for p in prange(parts):
        for r in range(p * step, min(rows, (p + 1) * step)):
            for j in range(c0, c1):
                w = np.int32(raw[r, j])
                u = ((w & 0xFF) << 8) | (w >> 8)
                u = u - 65536 if u >= 32768 else u
                if u != blank:
                    hists[p, u + 32768] += 1


@njit(parallel=True, cache=True)
def block_mean(image, factor, out, plus=None):
    """``out[j, i]``: the mean of the finite values of the ``factor`` × ``factor`` block of
    ``image`` at (j, i) (blocks past the edge are partial), NaN where there is none; float64 sums.
    With ``plus`` (same shape), of ``image + plus`` taken as float32 (two planes of counts),
    without a frame-sized sum."""
    ny, nx = image.shape
    oy, ox = out.shape
    for j in prange(oy):
        tot = np.zeros(ox, np.float64)
        cnt = np.zeros(ox, np.int64)
        for y in range(j * factor, min(ny, (j + 1) * factor)):
            row = image[y]
            for i in range(ox):
                for x in range(i * factor, min(nx, (i + 1) * factor)):
                    if plus is None:
                        v = row[x]
                    else:
                        v = np.float32(row[x]) + np.float32(plus[y, x])
                    if np.isfinite(v):
                        tot[i] += v
                        cnt[i] += 1
        for i in range(ox):
            out[j, i] = tot[i] / cnt[i] if cnt[i] > 0 else np.nan


@njit(parallel=True, cache=True)
def subtract_scaled(data, other, scale):
    """``data -= scale * other`` in place, float32 throughout (numpy's rounding: the product
    rounded to float32, then the difference), without numpy's frame-sized temporary."""
    flat = data.reshape(-1)
    rhs = other.reshape(-1)
    for i in prange(flat.size):
        flat[i] = flat[i] - np.float32(scale * rhs[i])
