"""numba kernels that subpackages of more than one layer share.

``hist_be16`` (the 16-bit histogram of raw big-endian rows: a combine's flat levels and the
inventory's pixel checks), ``block_mean`` (binning: the stretch's previews and the masters'
statistics) and ``subtract_scaled`` (``data -= scale * other``: the calibration arithmetic, and the
smallest parallel kernel, which :func:`ccdcal._shared.pool.kernels_threadsafe` runs as a probe),
``mean_std`` (the mean and standard deviation of a run of values, each pass of a clipped
statistic), and the display stretch's ``finite_clamped``, ``stf_apply`` and ``unit_to_uint8`` (one pass
each instead of numpy's chain of frame-sized temporaries; serial, since previews are made in the
pipeline's threads, and numba's workqueue layer aborts when two threads run parallel kernels).
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


@njit(cache=True, fastmath={"reassoc", "contract"})
def mean_std(values, lo, hi):
    """The mean and population standard deviation of ``values[lo:hi]`` (float64, finite): two
    compiled passes (the mean, then the squares about it) instead of numpy's four over
    temporaries. The sums are reassociated (vectorised, eight partial sums), so they round as
    differently from numpy's pairwise sums as numpy's do from exact: within ~1e-13 relative."""
    n = hi - lo
    if n <= 0:
        return np.nan, np.nan
    total = 0.0
    for i in range(lo, hi):
        total += values[i]
    mean = total / n
    total = 0.0
    for i in range(lo, hi):
        d = values[i] - mean
        total += d * d
    return mean, np.sqrt(total / n)


@njit(cache=True)
def finite_clamped(values, kept):
    """The values of the 1-D ``values`` that are not NaN, copied into ``kept`` (float64, same size
    or larger) with +inf and -inf clamped to the largest and smallest finite value (as a display
    clips them); returns (count copied, smallest finite, largest finite), the count 0 and the
    limits NaN when no value is finite."""
    lo = np.inf
    hi = -np.inf
    for i in range(values.size):
        v = values[i]
        if np.isfinite(v):
            if v < lo:
                lo = v
            if v > hi:
                hi = v
    if lo > hi:
        return 0, np.nan, np.nan
    k = 0
    for i in range(values.size):
        v = values[i]
        if not np.isnan(v):
            kept[k] = np.float64(min(max(v, lo), hi))
            k += 1
    return k, np.float64(lo), np.float64(hi)


@njit(cache=True)
def stf_apply(values, lo, scale, c0, m, out):
    """``out[i] = MTF(m, clip((clip((values[i] - lo) · scale, 0, 1) − c0) / (1 − c0), 0, 1))``
    (the auto-STF of :mod:`ccdcal.stretch`; 1-D arrays; NaN stays NaN, and ``scale`` 0 (a
    constant image) gives 0 where finite, NaN elsewhere, as :func:`ccdcal.stretch.normalize`)."""
    inv = 1.0 / (1.0 - c0)
    a = m - 1.0
    b = 2.0 * m - 1.0
    for i in range(values.size):
        v = np.float64(values[i])
        if np.isnan(v) or (scale == 0.0 and not np.isfinite(v)):
            out[i] = np.nan
            continue
        x = 0.0 if scale == 0.0 else min(max((v - lo) * scale, 0.0), 1.0)
        x = min(max((x - c0) * inv, 0.0), 1.0)
        if m != 0.5:
            x = min(max(a * x / (b * x - m), 0.0), 1.0)
        out[i] = x


@njit(cache=True)
def unit_to_uint8(values, out):
    """``out[i]``: ``values[i]`` in [0, 1] as 0…255, rounded half to even as numpy rounds (values
    outside clipped, NaN 0); 1-D arrays."""
    for i in range(values.size):
        v = values[i]
        if not (v >= 0.0):          # NaN and negatives
            out[i] = 0
            continue
        out[i] = np.uint8(np.rint(min(np.float64(v), 1.0) * 255.0))
