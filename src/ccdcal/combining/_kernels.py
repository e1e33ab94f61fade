"""numba kernels of the combine engine: per-pixel scale, reject and combine over a row tile.

Each kernel loops over the pixels of an (n, rows, cols) float32 tile in parallel,
gathers the n values of one pixel into a small per-thread buffer and works there:
no temporaries the size of the tile. The definitions are documented in
:mod:`ccdcal.combining.engine`; ``tests/combining/test_combine_oracle.py`` holds the numpy oracle.
Only float32 tiles come in, so each kernel compiles once (and is cached on disk).
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

# Codes shared with combine.py (plain ints keep the kernel signatures stable).
MEDIAN, MEAN, SUM = 0, 1, 2
REJECT_NONE, SIGMA, MAD, WINSORIZED, PERCENTILE, LINEAR_FIT, CCDCLIP = 0, 1, 2, 3, 4, 5, 6
CENTER_MEDIAN, CENTER_MEAN = 0, 1
SPREAD_STD, SPREAD_MAD = 0, 1

from .._shared.jit import njit  # noqa: E402
from .._shared.robust import MAD_TO_STD  # noqa: E402 - numba reads it as a global constant

MEDIAN_ERROR = 1.2533  # sqrt(pi/2): standard error of a median relative to a mean
CHUNK = 64  # pixels of one row per parallel job: small tiles still use every core


def sorting_network(n: int) -> np.ndarray:
    """Comparator pairs (i < j) of Batcher's odd-even merge sort for ``n`` values, as (k, 2) int64.

    Built for the next power of two; comparators that touch the padding (which holds +inf
    and never moves) are dropped.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            j = k % p
            while j <= size - 1 - k:
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
                j += 2 * k
            k //= 2
        p *= 2
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)

# Integer parameters (iparams) and float parameters (fparams) of combine_tile.
I_METHOD, I_NLOW, I_NHIGH, I_REJECT, I_CENTER, I_MAXITERS, I_HAS_VALID, I_HAS_UNC, I_NEED_INDEX = range(9)
F_LOW, F_HIGH, F_GAIN, F_RDNOISE, F_SNOISE, F_PEDESTAL = range(6)


@njit(cache=True, nogil=True)
def _sort_lanes(buf, pairs, width):
    """Sort each of the first ``width`` columns of ``buf`` (n, lanes) with the comparator
    network ``pairs``: every comparator runs across the lanes at once, branch-free."""
    for p in range(pairs.shape[0]):
        a = pairs[p, 0]
        b = pairs[p, 1]
        for c in range(width):
            va = buf[a, c]
            vb = buf[b, c]
            buf[a, c] = min(va, vb)
            buf[b, c] = max(va, vb)


@njit(cache=True, nogil=True)
def _median_sorted(vals, m):
    half = m // 2
    if m % 2 == 1:
        return vals[half]
    return (vals[half - 1] + vals[half]) / 2.0


@njit(cache=True, nogil=True)
def _mean(vals, m):
    total = 0.0
    for k in range(m):
        total += vals[k]
    return total / m


@njit(cache=True, nogil=True)
def _std(vals, m, mean):
    # population (ddof=0) standard deviation about ``mean``, as astropy's sigma_clip uses
    acc = 0.0
    for k in range(m):
        d = vals[k] - mean
        acc += d * d
    return np.sqrt(acc / m)


@njit(cache=True, nogil=True)
def _sort_small(work, m):
    for k in range(1, m):
        v = work[k]
        j = k
        while j > 0 and work[j - 1] > v:
            work[j] = work[j - 1]
            j -= 1
        work[j] = v


@njit(cache=True, nogil=True)
def _mad_std(vals, m, median, work):
    for k in range(m):
        work[k] = abs(vals[k] - median)
    _sort_small(work, m)
    return MAD_TO_STD * _median_sorted(work, m)


@njit(cache=True, nogil=True)
def _center(vals, m, center):
    if center == CENTER_MEAN:
        return _mean(vals, m)
    return _median_sorted(vals, m)


@njit(cache=True, nogil=True)
def _reject_pass(vals, idx, m, reject, center, low, high, work, scales, zeros, gain, rdnoise, snoise,
                 pedestal, member, track):
    """One rejection pass over the sorted survivors ``vals[:m]``; compacts them in place.

    With ``track``, ``member[i, 0]`` / ``member[i, 1]`` count the values of frame ``i``
    rejected low / high (``idx`` holds the frame of each value). Returns (survivors,
    rejected low, rejected high).
    """
    c = 0.0
    spread = 0.0
    slope = 0.0
    if reject == SIGMA:
        c = _center(vals, m, center)
        spread = _std(vals, m, _mean(vals, m))
    elif reject == MAD:
        c = _center(vals, m, center)
        spread = _mad_std(vals, m, _median_sorted(vals, m), work)
        if spread == 0.0:   # quantised data (half the values equal): the spread of all, not nothing
            spread = _std(vals, m, _mean(vals, m))
    elif reject == WINSORIZED:
        c = _center(vals, m, center)
        sigma = _std(vals, m, _mean(vals, m))
        for _ in range(10):
            lo_b = c - 1.5 * sigma
            hi_b = c + 1.5 * sigma
            for k in range(m):
                work[k] = min(max(vals[k], lo_b), hi_b)
            new = 1.134 * _std(work, m, _mean(work, m))
            done = abs(new - sigma) <= 0.0005 * sigma
            sigma = new
            if done:
                break
        spread = sigma
    elif reject == PERCENTILE:
        c = _median_sorted(vals, m)
        spread = abs(c)
    elif reject == LINEAR_FIT:
        # least-squares line through (rank, value) of the sorted survivors
        kbar = (m - 1) / 2.0
        ybar = _mean(vals, m)
        sxy = 0.0
        sxx = 0.0
        for k in range(m):
            dk = k - kbar
            sxy += dk * (vals[k] - ybar)
            sxx += dk * dk
        slope = sxy / sxx
        c = ybar - slope * kbar
        acc = 0.0
        for k in range(m):
            acc += abs(vals[k] - (c + slope * k))
        spread = acc / m
    elif reject == CCDCLIP:
        c = _center(vals, m, center)
        # σ of each value from the noise model, once per pass (work[k]). IRAF's nkeep: a pass
        # that would reject every value (an even count whose two middle values straddle the
        # model's band) rejects none
        inside = 0
        for k in range(m):
            i = idx[k]
            level = max((c - zeros[i]) / scales[i] - pedestal, 0.0)
            var = scales[i] * scales[i] * ((rdnoise / gain) ** 2 + level / gain + (snoise * level) ** 2)
            work[k] = var
            d = vals[k] - c
            if d * d <= var * (low * low if d < 0 else high * high):
                inside += 1
        if inside == 0:
            return m, 0, 0
    keep = 0
    nlow = 0
    nhigh = 0
    for k in range(m):
        v = vals[k]
        if reject == CCDCLIP:  # squared distances against each value's variance: no square root
            d = v - c
            is_low = d < 0 and d * d > work[k] * (low * low)
            is_high = d > 0 and d * d > work[k] * (high * high)
        else:
            mid = c + slope * k if reject == LINEAR_FIT else c
            is_low = v < mid - spread * low
            is_high = v > mid + spread * high
        if is_low:
            nlow += 1
            if track:
                member[idx[k], 0] += 1
        elif is_high:
            nhigh += 1
            if track:
                member[idx[k], 1] += 1
        else:
            vals[keep] = v
            idx[keep] = idx[k]
            keep += 1
    return keep, nlow, nhigh


@njit(cache=True, nogil=True)
def _gather_scaled(stack, valid, has_valid, r, x0, width, lanes, scales, zeros, buf, count):
    """The values of pixels ``x0 .. x0+lanes-1`` of row ``r`` of every frame, scaled and offset
    (float64), into ``buf[:, :lanes]``; invalid values (non-finite, masked) and lanes past the
    row's ``width`` as +inf, so they sort last. ``count[:lanes]`` gets the valid values per lane."""
    n = stack.shape[0]
    for c in range(lanes):
        count[c] = 0
    for i in range(n):
        si = scales[i]
        zi = zeros[i]
        for c in range(lanes):
            w = np.inf
            if c < width:
                v = stack[i, r, x0 + c]
                ok = np.isfinite(v)
                if has_valid:
                    ok = ok and valid[i, r, x0 + c] != 0
                if ok:
                    w = v * si + zi
                    count[c] += 1
            buf[i, c] = w


@njit(parallel=True, cache=True)
def combine_tile(stack, valid, unc, scales, zeros, weights, pairs, iparams, fparams,
                 out_data, out_err, out_nlow, out_nhigh, out_member):
    """Scale, reject and combine each pixel of ``stack`` (n, rows, cols) float32.

    ``valid`` (uint8, same shape, or a 1x1x1 dummy) marks usable values when
    ``iparams[I_HAS_VALID]``; ``unc`` holds input standard deviations when
    ``iparams[I_HAS_UNC]``. ``pairs`` (k, 2) is a sorting network for n values
    (:func:`sorting_network`); frame indices follow the values when ``iparams[I_NEED_INDEX]``
    (weights, ccdclip, input uncertainties), else only the values are sorted.
    Results go to the (rows, cols) ``out_*`` arrays. When frame indices follow the values,
    ``out_member`` (rows * chunks, n, 2) int32 counts the values of each frame rejected
    low / high by each job (a row's chunk of ``CHUNK`` pixels; zeroed by the caller), so
    that no two threads write one counter; else it may be a (1, 1, 2) dummy.
    """
    n, rows, cols = stack.shape
    has_valid = iparams[I_HAS_VALID] != 0
    need_index = iparams[I_NEED_INDEX] != 0
    track = need_index and out_member.shape[0] == rows * ((cols + CHUNK - 1) // CHUNK)
    npairs = pairs.shape[0]
    nchunks = (cols + CHUNK - 1) // CHUNK
    for job in prange(rows * nchunks):
        r = job // nchunks
        x0 = (job % nchunks) * CHUNK
        width = min(cols, x0 + CHUNK) - x0
        vals = np.empty(n, np.float64)
        idx = np.empty(n, np.int64)
        work = np.empty(n, np.float64)
        # Gather the chunk's values frame by frame (invalid ones as +inf, so they sort last),
        # then sort every pixel at once with a sorting network: the comparators run across
        # the pixels of the chunk, branch-free and vectorised.
        buf = np.empty((n, CHUNK), np.float64)
        ibuf = np.empty((n, CHUNK), np.int64)
        count = np.zeros(CHUNK, np.int64)
        _gather_scaled(stack, valid, has_valid, r, x0, width, width, scales, zeros, buf, count)
        for i in range(n):
            for c in range(width):
                ibuf[i, c] = i
        if need_index:
            for p in range(npairs):
                a = pairs[p, 0]
                b = pairs[p, 1]
                for c in range(width):
                    va = buf[a, c]
                    vb = buf[b, c]
                    ia = ibuf[a, c]
                    ib = ibuf[b, c]
                    swap = vb < va or (vb == va and ib < ia)  # ties in frame order
                    buf[a, c] = vb if swap else va
                    buf[b, c] = va if swap else vb
                    ibuf[a, c] = ib if swap else ia
                    ibuf[b, c] = ia if swap else ib
        else:
            _sort_lanes(buf, pairs, width)
        for c in range(width):
            m = count[c]
            for k in range(m):
                vals[k] = buf[k, c]
                idx[k] = ibuf[k, c]
            member = out_member[np.int64(job) if track else np.int64(0)]
            _combine_pixel(vals, idx, work, m, r, x0 + c, n, iparams, fparams, scales, zeros, weights, unc,
                           member, track, out_data, out_err, out_nlow, out_nhigh)


@njit(cache=True, nogil=True)
def _combine_pixel(vals, idx, work, m, r, x, n, iparams, fparams, scales, zeros, weights, unc, member, track,
                   out_data, out_err, out_nlow, out_nhigh):
    """Reject and combine the ``m`` sorted values ``vals`` (frames ``idx``, ties in frame order)
    of pixel (r, x) into the ``out_*`` planes, as :func:`combine_tile` defines it."""
    method = iparams[I_METHOD]
    nlow_req = iparams[I_NLOW]
    nhigh_req = iparams[I_NHIGH]
    reject = iparams[I_REJECT]
    center = iparams[I_CENTER]
    maxiters = iparams[I_MAXITERS]
    has_unc = iparams[I_HAS_UNC] != 0
    low = fparams[F_LOW]
    high = fparams[F_HIGH]
    gain = fparams[F_GAIN]
    rdnoise = fparams[F_RDNOISE]
    snoise = fparams[F_SNOISE]
    pedestal = fparams[F_PEDESTAL] if fparams.shape[0] > F_PEDESTAL else 0.0
    nlow = 0
    nhigh = 0
    if nlow_req + nhigh_req > 0 and m > nlow_req + nhigh_req:
        keep = m - nlow_req - nhigh_req
        if track:
            for k in range(nlow_req):
                member[idx[k], 0] += 1
            for k in range(m - nhigh_req, m):
                member[idx[k], 1] += 1
        if nlow_req > 0:
            for k in range(keep):
                vals[k] = vals[k + nlow_req]
                idx[k] = idx[k + nlow_req]
        m = keep
        nlow = nlow_req
        nhigh = nhigh_req
    if reject != REJECT_NONE:
        it = 0
        while m >= 3 and (maxiters <= 0 or it < maxiters):
            it += 1
            keep, dl, dh = _reject_pass(vals, idx, m, reject, center, low, high, work,
                                        scales, zeros, gain, rdnoise, snoise, pedestal,
                                        member, track)
            nlow += dl
            nhigh += dh
            if keep == m:
                break
            m = keep
            if reject == PERCENTILE:
                break
    out_nlow[r, x] = nlow
    out_nhigh[r, x] = nhigh
    if m == 0:
        out_data[r, x] = np.nan
        out_err[r, x] = np.nan
        return
    if method == MEDIAN:
        result = _median_sorted(vals, m)
    else:
        swx = 0.0
        sw = 0.0
        for k in range(m):
            w = weights[idx[k]]
            swx += w * vals[k]
            sw += w
        result = swx / sw
        if method == SUM:
            result *= n
    # standard error of the result
    if has_unc:
        acc = 0.0
        sw = 0.0
        for k in range(m):
            i = idx[k]
            w = 1.0 if method == MEDIAN else weights[i]
            e = w * scales[i] * unc[i, r, x]
            acc += e * e
            sw += w
        err = np.sqrt(acc) / sw
    elif m > 1:
        mean = _mean(vals, m)
        acc = 0.0
        for k in range(m):
            d = vals[k] - mean
            acc += d * d
        std = np.sqrt(acc / (m - 1))
        if method == MEDIAN:
            err = std / np.sqrt(m)
        else:
            sw = 0.0
            sw2 = 0.0
            for k in range(m):
                w = weights[idx[k]]
                sw += w
                sw2 += w * w
            err = std * np.sqrt(sw2) / sw
    else:
        err = 0.0
    if method == MEDIAN:
        err *= MEDIAN_ERROR
    elif method == SUM:
        err *= n
    out_data[r, x] = result
    out_err[r, x] = err


# Jobs (CHUNK pixels of one row) per parallel task of combine_tile_sorted: the per-task
# scratch arrays are allocated once and reused across these jobs.
JOBS_PER_TASK = 16


def _load(row, j, i, dscale, dzero, dblank):
    """Value ``j`` of frame ``i``'s tile row as float32 (compiled by the overload below)."""
    raise NotImplementedError


@overload(_load)
def _load_impl(row, j, i, dscale, dzero, dblank):
    if isinstance(row.dtype, types.Integer):
        # raw big-endian 16-bit FITS integers viewed as native uint16: swap the bytes and
        # apply BSCALE/BZERO/BLANK in float32 as FrameSource.fill_rows does
        def load_raw(row, j, i, dscale, dzero, dblank):
            w = np.int32(row[j])
            u = ((w & 0xFF) << 8) | (w >> 8)
            u = u - 65536 if u >= 32768 else u
            v = np.float32(u) * dscale[i] + dzero[i]
            return np.float32(np.nan) if u == dblank[i] else v
        return load_raw

    def load(row, j, i, dscale, dzero, dblank):
        return row[j]
    return load


@njit(parallel=True, cache=True)
def combine_tile_sorted(stack, valid, scales, zeros, pairs, iparams, fparams, proto,
                        dscale, dzero, dblank, out_data, out_err, out_nlow, out_nhigh, out_member):
    """The fast path of :func:`combine_tile`: no weights, no input uncertainties, and
    rejection ``none``, ``sigma`` (median or mean centre), or ``ccdclip`` of frames that
    are neither scaled nor offset (every value of a pixel then has the same σ).

    The same definitions and the same float64 arithmetic in the same order, so the
    results are identical; but every step runs across the CHUNK pixels of a job at once
    (vectorised), on ranks instead of copies: after the sorting network the survivors of
    a pixel are always the contiguous sorted ranks ``lo <= k < hi`` (extrema and sigma
    clipping remove a prefix and a suffix), so a pass only moves ``lo`` and ``hi``.
    Masked sums over all ranks add exact zeros outside the range, which leaves the
    sequential sums of the survivors unchanged.

    ``proto`` (a 1-element array) sets the working precision: float32 when the frames
    are neither scaled nor offset (the values are then exact float32), else float64.
    ``stack`` is float32, or uint16 holding the raw big-endian bytes of 16-bit FITS
    images, decoded while gathering with the per-frame float32 ``dscale``/``dzero`` and
    int64 ``dblank`` (NO_BLANK when none) — no separate decoding pass over the tile.
    iparams: I_METHOD, I_NLOW, I_NHIGH, I_REJECT, I_CENTER, I_MAXITERS, I_HAS_VALID;
    fparams: F_LOW, F_HIGH (and F_GAIN, F_RDNOISE, F_SNOISE, F_PEDESTAL for ccdclip).

    Without extrema rejection, ``out_member`` (rows * chunks, n, 2) int32, zeroed by the
    caller, counts the values of each frame rejected low / high per job, as the general
    kernel does: rejection is by value, so a frame's value was rejected low exactly when
    it lies below the lowest survivor (high: above the highest). Otherwise it may be a
    (1, 1, 2) dummy.
    """
    n, rows, cols = stack.shape
    method = iparams[I_METHOD]
    nlow_req = iparams[I_NLOW]
    nhigh_req = iparams[I_NHIGH]
    reject = iparams[I_REJECT]
    center = iparams[I_CENTER]
    maxiters = iparams[I_MAXITERS]
    has_valid = iparams[I_HAS_VALID] != 0
    low = fparams[F_LOW]
    high = fparams[F_HIGH]
    gain = fparams[F_GAIN] if fparams.shape[0] > F_GAIN else 1.0
    rdnoise = fparams[F_RDNOISE] if fparams.shape[0] > F_RDNOISE else 0.0
    snoise = fparams[F_SNOISE] if fparams.shape[0] > F_SNOISE else 0.0
    pedestal = fparams[F_PEDESTAL] if fparams.shape[0] > F_PEDESTAL else 0.0
    scaled = False
    for i in range(n):
        if scales[i] != 1.0 or zeros[i] != 0.0:
            scaled = True
    nchunks = (cols + CHUNK - 1) // CHUNK
    njobs = rows * nchunks
    passes = maxiters if maxiters > 0 else n + 1  # a pass that changes anything removes a value
    track = nlow_req + nhigh_req == 0 and out_member.shape[0] == njobs
    for task in prange((njobs + JOBS_PER_TASK - 1) // JOBS_PER_TASK):
        buf = np.empty((n, CHUNK), proto.dtype)
        lo = np.zeros(CHUNK, np.int32)
        hi = np.zeros(CHUNK, np.int32)
        nl = np.zeros(CHUNK, np.int32)
        nh = np.zeros(CHUNK, np.int32)
        dl = np.zeros(CHUNK, np.int32)
        dh = np.zeros(CHUNK, np.int32)
        tot = np.empty(CHUNK, np.float64)
        acc = np.empty(CHUNK, np.float64)
        lower = np.empty(CHUNK, np.float64)
        upper = np.empty(CHUNK, np.float64)
        gathered = np.empty((n if track else 1, CHUNK), proto.dtype)
        for job in range(task * JOBS_PER_TASK, min(njobs, (task + 1) * JOBS_PER_TASK)):
            r = job // nchunks
            x0 = (job % nchunks) * CHUNK
            width = min(cols, x0 + CHUNK) - x0
            for c in range(CHUNK):
                lo[c] = 0
                hi[c] = 0
                nl[c] = 0
                nh[c] = 0
            # gather (invalid values and the padding past the row's end as +inf: they sort last)
            for i in range(n):
                si = scales[i]
                zi = zeros[i]
                row = stack[i, r]
                if width == CHUNK and not has_valid:  # the common case, branch-free
                    for c in range(CHUNK):
                        v = _load(row, x0 + c, i, dscale, dzero, dblank)
                        ok = np.isfinite(v)
                        hi[c] += ok
                        w = v * si + zi if scaled else v
                        buf[i, c] = w if ok else np.inf
                    continue
                for c in range(CHUNK):
                    v = _load(row, x0 + c, i, dscale, dzero, dblank) if c < width else np.float32(np.inf)
                    ok = np.isfinite(v)
                    if has_valid and c < width:
                        ok = ok and valid[i, r, x0 + c] != 0
                    if ok:
                        hi[c] += 1
                        buf[i, c] = v * si + zi if scaled else v
                    else:
                        buf[i, c] = np.inf
            if track:
                for i in range(n):
                    for c in range(CHUNK):
                        gathered[i, c] = buf[i, c]
            _sort_lanes(buf, pairs, CHUNK)
            if nlow_req + nhigh_req > 0:
                for c in range(CHUNK):
                    if hi[c] > nlow_req + nhigh_req:
                        lo[c] = nlow_req
                        hi[c] -= nhigh_req
                        nl[c] = nlow_req
                        nh[c] = nhigh_req
            fresh = False  # whether tot/acc hold the mean/sum of squares of the survivors
            if reject == SIGMA or reject == CCDCLIP:
                for _ in range(passes):
                    _masked_mean(buf, lo, hi, n, tot)
                    if reject == SIGMA:
                        _masked_sumsq(buf, lo, hi, n, tot, acc)
                    for c in range(CHUNK):
                        m = hi[c] - lo[c]
                        if m >= 3:
                            cc = tot[c] if center == CENTER_MEAN else _median_ranks(buf, lo[c], m, c)
                            if reject == SIGMA:
                                s = np.sqrt(acc[c] / m)
                            else:  # the noise model, the same for every (unscaled) value
                                level = max(cc - pedestal, 0.0)
                                s = 1.0 * np.sqrt((rdnoise / gain) ** 2 + level / gain + (snoise * level) ** 2)
                            lower[c] = cc - s * low
                            upper[c] = cc + s * high
                        else:  # fewer than 3 survivors: this pixel is done
                            lower[c] = -np.inf
                            upper[c] = np.inf
                        dl[c] = 0
                        dh[c] = 0
                    for k in range(n):
                        for c in range(CHUNK):
                            inside = (k >= lo[c]) & (k < hi[c])
                            v = buf[k, c]
                            dl[c] += inside & (v < lower[c])
                            dh[c] += inside & (v > upper[c]) & (v >= lower[c])
                    if reject == CCDCLIP:
                        for c in range(CHUNK):  # IRAF's nkeep: a pass never rejects every value
                            if dl[c] + dh[c] == hi[c] - lo[c]:
                                dl[c] = 0
                                dh[c] = 0
                    changed = 0
                    for c in range(CHUNK):
                        lo[c] += dl[c]
                        hi[c] -= dh[c]
                        nl[c] += dl[c]
                        nh[c] += dh[c]
                        changed += dl[c] + dh[c]
                    if changed == 0:
                        fresh = True
                        break
            # the result and its standard error (a converged pass already summed the survivors)
            if not fresh or reject == CCDCLIP:
                _masked_mean(buf, lo, hi, n, tot)
                _masked_sumsq(buf, lo, hi, n, tot, acc)
            if track and reject != REJECT_NONE:
                member = out_member[job]
                for c in range(width):
                    m = hi[c] - lo[c]
                    if m <= 0 or (nl[c] == 0 and nh[c] == 0):
                        continue
                    first = buf[lo[c], c]
                    last = buf[hi[c] - 1, c]
                    for i in range(n):
                        v = gathered[i, c]
                        if np.isfinite(v):
                            if v < first:
                                member[i, 0] += 1
                            elif v > last:
                                member[i, 1] += 1
            for c in range(width):
                x = x0 + c
                m = hi[c] - lo[c]
                out_nlow[r, x] = nl[c]
                out_nhigh[r, x] = nh[c]
                if m <= 0:
                    out_data[r, x] = np.nan
                    out_err[r, x] = np.nan
                    continue
                err = np.sqrt(acc[c] / (m - 1)) if m > 1 else 0.0
                if method == MEDIAN:
                    out_data[r, x] = _median_ranks(buf, lo[c], m, c)
                    out_err[r, x] = err / np.sqrt(m) * MEDIAN_ERROR
                else:
                    fm = np.float64(m)
                    if method == SUM:
                        out_data[r, x] = tot[c] * n
                        out_err[r, x] = err * np.sqrt(fm) / fm * n
                    else:
                        out_data[r, x] = tot[c]
                        out_err[r, x] = err * np.sqrt(fm) / fm


@njit(cache=True, nogil=True)
def _median_ranks(buf, lo, m, c):
    h = lo + m // 2
    if m % 2 == 1:
        return np.float64(buf[h, c])
    return (np.float64(buf[h - 1, c]) + np.float64(buf[h, c])) / 2.0


@njit(cache=True, nogil=True)
def _masked_mean(buf, lo, hi, n, out):
    """Mean of ranks lo <= k < hi of each lane (sequential float64 sums, as the scalar kernel)."""
    width = out.shape[0]
    for c in range(width):
        out[c] = 0.0
    for k in range(n):
        for c in range(width):
            inside = (k >= lo[c]) & (k < hi[c])
            out[c] += np.float64(buf[k, c]) if inside else 0.0
    for c in range(width):
        out[c] = out[c] / max(hi[c] - lo[c], 1)


@njit(cache=True, nogil=True)
def _masked_sumsq(buf, lo, hi, n, mean, out):
    """Sum of squared deviations from ``mean`` over ranks lo <= k < hi of each lane."""
    width = out.shape[0]
    for c in range(width):
        out[c] = 0.0
    for k in range(n):
        for c in range(width):
            inside = (k >= lo[c]) & (k < hi[c])
            d = np.float64(buf[k, c]) - mean[c]
            out[c] += d * d if inside else 0.0


@njit(parallel=True, cache=True)
def combine_tile_ccdproc(stack, valid, scales, weights, iparams, fparams,
                         out_data, out_err, out_nlow, out_nhigh):
    """``ccdproc.combine`` semantics on a float32 tile (see ``compat="ccdproc"`` in combine.py).

    iparams: method, nlow, nhigh, do_extrema, do_sigma, center, spread, has_valid,
    has_weights; fparams: low, high. ``scales`` multiply the values only when combining.
    """
    n, rows, cols = stack.shape
    method = iparams[0]
    nlow_req = iparams[1]
    nhigh_req = iparams[2]
    do_extrema = iparams[3] != 0
    do_sigma = iparams[4] != 0
    center = iparams[5]
    spread_kind = iparams[6]
    has_valid = iparams[7] != 0
    has_weights = iparams[8] != 0
    low = fparams[0]
    high = fparams[1]
    total_weight = 0.0
    for i in range(n):
        total_weight += weights[i]
    nchunks = (cols + CHUNK - 1) // CHUNK
    for job in prange(rows * nchunks):
        r = job // nchunks
        x0 = (job % nchunks) * CHUNK
        raw = np.empty(n, np.float64)
        use = np.empty(n, np.bool_)
        order = np.empty(n, np.int64)
        vals = np.empty(n, np.float64)
        work = np.empty(n, np.float64)
        for x in range(x0, min(cols, x0 + CHUNK)):
            finite = True
            for i in range(n):
                v = np.float64(stack[i, r, x])
                raw[i] = v
                use[i] = not (has_valid and valid[i, r, x] == 0)
                if not np.isfinite(v):
                    finite = False
            nlow = 0
            nhigh = 0
            if do_extrema:
                # rank all values, NaN last and ties in frame order, as numpy's argsort of the raw data
                for i in range(n):
                    v = raw[i]
                    j = i
                    while j > 0:
                        u = raw[order[j - 1]]
                        if (np.isnan(u) and not np.isnan(v)) or u > v:
                            order[j] = order[j - 1]
                            j -= 1
                        else:
                            break
                    order[j] = i
                for k in range(n):
                    is_low = k < nlow_req
                    is_high = k >= n - nhigh_req
                    if is_low or is_high:
                        i = order[k]
                        if use[i] and np.isfinite(raw[i]):
                            if is_low:
                                nlow += 1
                            else:
                                nhigh += 1
                        use[i] = False
            if do_sigma and not finite and spread_kind == SPREAD_STD:
                # ccdproc's numpy.ma.std turns the NaN bounds into masked ones, and astropy then
                # rejects every value of the pixel
                for i in range(n):
                    use[i] = False
            if do_sigma and finite:
                # one pass over ALL raw values (earlier rejections and masks included); a NaN
                # anywhere in the pixel makes the centre NaN and rejects nothing
                mean = 0.0
                for i in range(n):
                    mean += raw[i]
                mean /= n
                if center == CENTER_MEAN:
                    c = mean
                else:
                    for i in range(n):
                        vals[i] = raw[i]
                    _sort_small(vals, n)
                    c = _median_sorted(vals, n)
                if spread_kind == SPREAD_STD:
                    s = _std(raw, n, mean)
                else:
                    for i in range(n):
                        vals[i] = raw[i]
                    _sort_small(vals, n)
                    s = _mad_std(vals, n, _median_sorted(vals, n), work)
                lower = c - s * low
                upper = c + s * high
                for i in range(n):
                    if raw[i] < lower or raw[i] > upper:
                        if use[i]:
                            if raw[i] < lower:
                                nlow += 1
                            else:
                                nhigh += 1
                        use[i] = False
            m = 0
            total = 0.0
            wtotal = 0.0
            for i in range(n):
                v = raw[i] * scales[i]
                if use[i] and np.isfinite(v):
                    vals[m] = v
                    total += v
                    wtotal += v * weights[i]
                    m += 1
            out_nlow[r, x] = nlow
            out_nhigh[r, x] = nhigh
            if m == 0:
                if method == SUM:
                    out_data[r, x] = 0.0
                elif method == MEAN and has_weights:
                    out_data[r, x] = 0.0
                else:
                    out_data[r, x] = np.nan
                out_err[r, x] = np.nan
                continue
            mean = total / m
            if method == MEDIAN:
                for k in range(m):
                    work[k] = vals[k]
                _sort_small(work, m)
                med = _median_sorted(work, m)
                out_data[r, x] = med
                out_err[r, x] = _mad_std(work, m, med, vals) / np.sqrt(m)
                continue
            acc = 0.0
            for k in range(m):
                d = vals[k] - mean
                acc += d * d
            std = np.sqrt(acc / m)
            if method == MEAN:
                out_data[r, x] = wtotal / total_weight if has_weights else mean
                out_err[r, x] = std / np.sqrt(m)
            else:
                out_data[r, x] = wtotal if has_weights else total
                out_err[r, x] = std / np.sqrt(m) * m


@njit(parallel=True, cache=True)
def combine_tile_ccdclip(stack, valid, scales, zeros, pairs, iparams, fparams,
                         out_data, out_err, out_nlow, out_nhigh, out_member):
    """:func:`combine_tile` for the common master flat: ``ccdclip`` about the median of scaled
    or offset frames (each value its own σ), a mean or sum with equal weights, no extrema
    rejection and no input uncertainties. Identical results, faster.

    A value's σ depends on its frame, so the survivors are not contiguous sorted ranks and
    :func:`combine_tile_sorted` does not apply. But most pixels lose no value: here the first
    pass runs across the CHUNK pixels of a job at once (values sorted without their frames,
    the median, each value tested in frame order against its own variance), and a pixel with
    no rejection is finished from the sorted values (the same sums in the same order as the
    general kernel). Only a pixel that loses a value is redone, whole, by the general
    per-pixel code (:func:`_combine_pixel`, values ordered by value then frame as the network
    of :func:`combine_tile` orders them).
    """
    n, rows, cols = stack.shape
    method = iparams[I_METHOD]
    has_valid = iparams[I_HAS_VALID] != 0
    low = fparams[F_LOW]
    high = fparams[F_HIGH]
    gain = fparams[F_GAIN]
    rdnoise = fparams[F_RDNOISE]
    snoise = fparams[F_SNOISE]
    pedestal = fparams[F_PEDESTAL] if fparams.shape[0] > F_PEDESTAL else 0.0
    low2 = low * low
    high2 = high * high
    nchunks = (cols + CHUNK - 1) // CHUNK
    njobs = rows * nchunks
    track = out_member.shape[0] == njobs
    weights = np.ones(n)
    for task in prange((njobs + JOBS_PER_TASK - 1) // JOBS_PER_TASK):
        gathered = np.empty((n, CHUNK), np.float64)
        buf = np.empty((n, CHUNK), np.float64)
        count = np.zeros(CHUNK, np.int64)
        first = np.zeros(CHUNK, np.int64)
        centre = np.empty(CHUNK, np.float64)
        inside = np.zeros(CHUNK, np.int64)
        out = np.zeros(CHUNK, np.int64)
        tot = np.empty(CHUNK, np.float64)
        acc = np.empty(CHUNK, np.float64)
        vals = np.empty(n, np.float64)
        idx = np.empty(n, np.int64)
        work = np.empty(n, np.float64)
        for job in range(task * JOBS_PER_TASK, min(njobs, (task + 1) * JOBS_PER_TASK)):
            r = job // nchunks
            x0 = (job % nchunks) * CHUNK
            width = min(cols, x0 + CHUNK) - x0
            for c in range(CHUNK):
                inside[c] = 0
                out[c] = 0
            _gather_scaled(stack, valid, has_valid, r, x0, width, CHUNK, scales, zeros, gathered, count)
            buf[:, :] = gathered
            _sort_lanes(buf, pairs, CHUNK)
            # the first pass: each value against its own variance about the median
            for c in range(CHUNK):
                m = count[c]
                centre[c] = _median_ranks(buf, 0, m, c) if m >= 3 else 0.0
            for i in range(n):
                si = scales[i]
                zi = zeros[i]
                for c in range(CHUNK):
                    v = gathered[i, c]
                    if count[c] >= 3 and v != np.inf:
                        cc = centre[c]
                        level = max((cc - zi) / si - pedestal, 0.0)
                        var = si * si * ((rdnoise / gain) ** 2 + level / gain + (snoise * level) ** 2)
                        d = v - cc
                        d2 = d * d
                        inside[c] += d2 <= var * (low2 if d < 0 else high2)
                        out[c] += (d < 0 and d2 > var * low2) or (d > 0 and d2 > var * high2)
            _masked_mean(buf, first, count, n, tot)
            _masked_sumsq(buf, first, count, n, tot, acc)
            for c in range(width):
                x = x0 + c
                m = count[c]
                if m >= 3 and out[c] > 0 and inside[c] > 0:
                    # a value is rejected: the whole pixel by the general per-pixel code
                    k = 0
                    for i in range(n):
                        v = gathered[i, c]
                        if v != np.inf:
                            j = k   # insertion by (value, frame): the network's order
                            while j > 0 and vals[j - 1] > v:
                                vals[j] = vals[j - 1]
                                idx[j] = idx[j - 1]
                                j -= 1
                            vals[j] = v
                            idx[j] = i
                            k += 1
                    member = out_member[np.int64(job) if track else np.int64(0)]
                    _combine_pixel(vals, idx, work, m, r, x, n, iparams, fparams, scales, zeros, weights,
                                   stack, member, track, out_data, out_err, out_nlow, out_nhigh)
                    continue
                out_nlow[r, x] = 0
                out_nhigh[r, x] = 0
                if m == 0:
                    out_data[r, x] = np.nan
                    out_err[r, x] = np.nan
                    continue
                fm = np.float64(m)
                mean = tot[c]
                out_data[r, x] = mean * n if method == SUM else mean
                err = np.sqrt(acc[c] / (m - 1)) * np.sqrt(fm) / fm if m > 1 else 0.0
                out_err[r, x] = err * n if method == SUM else err
