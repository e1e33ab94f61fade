"""numba kernels of a combine's frame levels (``frame_level``): the exact median, the mean and the
clipped mean of a float32 frame, the levels its scales and zeros come from."""

from __future__ import annotations

import numpy as np
from numba import prange

from .._shared.jit import njit

_HIST_CHUNKS = 8


@njit(parallel=True, cache=True)
def _histogram(data, bits, lo, hi, level, prefix):
    """Histogram of the sortable 32-bit keys of the finite values in [lo, hi].

    level 0 counts the top 16 bits of every key; level 1 the low 16 bits of the keys
    whose top 16 bits are ``prefix``.
    """
    n = data.size
    step = (n + _HIST_CHUNKS - 1) // _HIST_CHUNKS
    hists = np.zeros((_HIST_CHUNKS, 65536), np.int64)
    for c in prange(_HIST_CHUNKS):
        for k in range(c * step, min(n, (c + 1) * step)):
            v = data[k]
            if not (np.isfinite(v) and v >= lo and v <= hi):
                continue
            b = np.int64(bits[k])
            key = b | 0x80000000 if (b & 0x80000000) == 0 else 0xFFFFFFFF - b
            if level == 0:
                hists[c, key >> 16] += 1
            elif (key >> 16) == prefix:
                hists[c, key & 0xFFFF] += 1
    out = np.zeros(65536, np.int64)
    for c in range(_HIST_CHUNKS):
        out += hists[c]
    return out


def _select(data, bits, lo, hi, rank, top_hist):
    """The value of 0-based ``rank`` among the finite values in [lo, hi] (exact, one more pass)."""
    cum = np.cumsum(top_hist)
    top = int(np.searchsorted(cum, rank, side="right"))
    seen = int(cum[top - 1]) if top else 0
    low_cum = np.cumsum(_histogram(data, bits, lo, hi, 1, top))
    low = int(np.searchsorted(low_cum, rank - seen, side="right"))
    key = (top << 16) | low
    raw = key & 0x7FFFFFFF if key & 0x80000000 else 0xFFFFFFFF - key
    return float(np.array([raw], np.uint32).view(np.float32)[0])


def _median(data, bits, lo, hi):
    hist = _histogram(data, bits, lo, hi, 0, 0)
    n = int(hist.sum())
    if n == 0:
        return np.nan, 0
    upper = _select(data, bits, lo, hi, n // 2, hist)
    if n % 2 == 1:
        return upper, n
    return (_select(data, bits, lo, hi, n // 2 - 1, hist) + upper) / 2.0, n


@njit(cache=True, nogil=True)
def _moments(data, lo, hi):
    count = 0
    total = 0.0
    for v in data:
        if np.isfinite(v) and v >= lo and v <= hi:
            total += v
            count += 1
    if count == 0:
        return 0, np.nan, np.nan
    mean = total / count
    acc = 0.0
    for v in data:
        if np.isfinite(v) and v >= lo and v <= hi:
            acc += (v - mean) ** 2
    return count, mean, np.sqrt(acc / count)


def frame_level(data, bits, how):
    """Median (0), mean (1) or 3-sigma clipped mean (2) of the finite values of ``data``.

    ``data`` is 1-D contiguous float32 and ``bits`` its uint32 view. The median is exact
    (radix selection on the float bits, two parallel passes per rank, no copy); the
    clipped mean rejects values beyond median ± 3 std (population) of the survivors,
    cumulatively, for at most 5 passes, as astropy's ``sigma_clipped_stats``.
    """
    lo = -np.inf
    hi = np.inf
    if how == 1:
        return _moments(data, lo, hi)[1]
    med, n = _median(data, bits, lo, hi)
    if how == 0 or n == 0:
        return med
    for _ in range(5):
        count, mean, std = _moments(data, lo, hi)
        new_lo = max(lo, med - 3.0 * std)
        new_hi = min(hi, med + 3.0 * std)
        if _moments(data, new_lo, new_hi)[0] == count:
            break
        lo = new_lo
        hi = new_hi
        med, n = _median(data, bits, lo, hi)
    return _moments(data, lo, hi)[1]
