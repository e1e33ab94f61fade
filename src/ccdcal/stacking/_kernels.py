"""The stack's combination kernels (:mod:`ccdcal.stacking.engine`): a band's resampled values,
pixel by pixel, matched, clipped about their median with σ from the noise model, averaged with
the frames' weights."""

from __future__ import annotations

import math

import numpy as np

from .._shared.jit import njit

_SORT_RANK = 32  # values per pixel up to which each is placed by its rank (else a merge sort)
_TILE = 64  # output pixels of one row combined together (each frame's row read in order)


# -- kernels --------------------------------------------------------------------------------------
# A band's pixels are combined a tile of :data:`_TILE` pixels of a row at a time, each frame's
# values in a slot of its own (value-major, NaN-free: +inf where a frame gave none), so that the
# steps every pixel takes (gathering, the medians by a sorting network, the test that nothing is
# rejected, the weighted mean) run across the tile's pixels in SIMD lanes. Only a pixel that loses
# a value takes the scalar path: its values sorted, clipped pass by pass, averaged.


@njit(cache=True, nogil=True)
def _gather_slots(data, bad, err, scales, zeros, r, x0, width, V, S, ok, m):
    """The matched values of pixels ``x0 … x0 + width − 1`` of row ``r`` in their frames' slots:
    ``V[i, t]`` (+inf where frame ``i`` has no valid value), σ in ``S`` (inf where not finite:
    never rejected), ``ok[i, t]`` whether valid, ``m[t]`` the valid values of pixel ``t``."""
    for t in range(width):
        m[t] = 0
    for i in range(data.shape[0]):
        sc = scales[i]
        ze = zeros[i]
        for t in range(width):
            v = data[i, r, x0 + t]
            good = not bad[i, r, x0 + t] and math.isfinite(v)
            s = err[i, r, x0 + t] * sc
            V[i, t] = v * sc + ze if good else np.inf
            S[i, t] = s if math.isfinite(s) else np.inf
            ok[i, t] = good
            m[t] += np.int64(good)


@njit(cache=True, nogil=True)
def _tile_medians(V, m, width, network, work, centre):
    """``centre[t]``: the median of pixel ``t``'s valid values (the mean of the two middle ones
    when their count is even): its slots sorted by the ``network`` (:func:`sorting_network` of
    the frame count; min and max, no branches: the +inf of empty slots sort last)."""
    n = V.shape[0]
    for i in range(n):
        for t in range(width):
            work[i, t] = V[i, t]
    for c in range(network.shape[0]):
        a = work[network[c, 0]]
        b = work[network[c, 1]]
        for t in range(width):
            lo = min(a[t], b[t])
            hi = max(a[t], b[t])
            a[t] = lo
            b[t] = hi
    for t in range(width):
        k = m[t]
        half = k // 2
        if k == 0:
            centre[t] = 0.0
        elif k % 2 == 1:
            centre[t] = work[half, t]
        else:
            centre[t] = 0.5 * (work[half - 1, t] + work[half, t])


@njit(cache=True, nogil=True)
def _tile_all_inside(V, S, ok, width, centre, low, high, tol, level, inside):
    """``inside[t]``: whether noise-model clipping keeps every valid value of pixel ``t`` (the
    first pass of :func:`_reject` keeping all: nothing rejected, so nothing need be sorted)."""
    for t in range(width):
        inside[t] = True
    for i in range(V.shape[0]):
        for t in range(width):
            c = centre[t]
            extra = tol * max(c - level, 0.0)
            s = S[i, t]
            w = math.sqrt(s * s + extra * extra)
            v = V[i, t]
            inside[t] = inside[t] and (not ok[i, t] or (c - low * w <= v and v <= c + high * w))


@njit(cache=True, nogil=True)
def _tile_means(V, S, ok, weights, width, sw, swx, acc):
    """Per pixel ``t``, over its valid values in frame order: the sum of weights, of weighted
    values and of squared weighted σ."""
    for t in range(width):
        sw[t] = 0.0
        swx[t] = 0.0
        acc[t] = 0.0
    for i in range(V.shape[0]):
        w = weights[i]
        for t in range(width):
            good = ok[i, t]
            e = w * S[i, t]
            sw[t] += w if good else 0.0
            swx[t] += w * V[i, t] if good else 0.0
            acc[t] += e * e if good else 0.0


@njit(cache=True, nogil=True)
def _sorted(tv, ts, ti, m, vals, sig, idx, pos):
    """The ``m`` values ``tv[:m]`` sorted (stable) into ``vals[:m]``, with their σ and frames in
    ``sig`` and ``idx``. Up to :data:`_SORT_RANK` values each goes straight to its rank (the
    values below it, and the equal ones before it: no branch to mispredict, the counting loop
    vectorises; 0.6 of an insertion sort's time at 24 values)."""
    if m <= _SORT_RANK:
        for k in range(m):
            v = tv[k]
            rank = 0
            for j in range(m):
                u = tv[j]
                rank += np.int64(u < v) + np.int64(u == v) * np.int64(j < k)
            vals[rank] = v
            pos[rank] = k
    else:
        order = np.argsort(tv[:m], kind="mergesort")
        for k in range(m):
            pos[k] = order[k]
            vals[k] = tv[order[k]]
    for k in range(m):
        sig[k] = ts[pos[k]]
        idx[k] = ti[pos[k]]


@njit(cache=True, nogil=True)
def _reject(vals, sig, idx, m, low, high, tol, level, member):
    """Noise-model clipping of the sorted survivors ``vals[:m]`` about their median (module
    docstring); compacts them in place, counts rejections per frame in ``member`` (n, 2)."""
    total = 0
    while m >= 3:
        half = m // 2
        c = vals[half] if m % 2 == 1 else 0.5 * (vals[half - 1] + vals[half])
        extra = tol * max(c - level, 0.0)
        inside = 0
        for k in range(m):
            t = math.sqrt(sig[k] * sig[k] + extra * extra)
            if c - low * t <= vals[k] <= c + high * t:
                inside += 1
        if inside == m or inside == 0:
            break
        keep = 0
        for k in range(m):
            t = math.sqrt(sig[k] * sig[k] + extra * extra)
            if vals[k] < c - low * t:
                member[idx[k], 0] += 1
            elif vals[k] > c + high * t:
                member[idx[k], 1] += 1
            else:
                vals[keep], sig[keep], idx[keep] = vals[k], sig[k], idx[k]
                keep += 1
        total += m - keep
        m = keep
    return m, total


def sorting_network(n: int) -> np.ndarray:
    """The compare-exchange pairs (k, 2) of Batcher's odd-even merge sort of ``n`` values (any
    ``n``; Knuth's formulation): applied in order, each putting the smaller of its two places
    first, they sort any ``n`` values, with no branch that depends on the values."""
    pairs = []
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return np.array(pairs, np.int64).reshape(-1, 2)


@njit(cache=True, nogil=True)
def _clipped_pixel(V, S, ok, t, weights, low, high, tol, level, tv, ts, ti, vals, sig, idx, pos, member):
    """Pixel ``t`` of a tile, clipped pass by pass (its values sorted): (values kept, values
    rejected, sum of weights, of weighted values, of squared weighted σ)."""
    m = 0
    for i in range(V.shape[0]):
        if ok[i, t]:
            tv[m] = V[i, t]
            ts[m] = S[i, t]
            ti[m] = i
            m += 1
    _sorted(tv, ts, ti, m, vals, sig, idx, pos)
    m, nrej = _reject(vals, sig, idx, m, low, high, tol, level, member)
    sw = 0.0
    swx = 0.0
    acc = 0.0
    for k in range(m):
        w = weights[idx[k]]
        sw += w
        swx += w * vals[k]
        e = w * sig[k]
        acc += e * e
    return m, nrej, sw, swx, acc


@njit(cache=True, nogil=True)
def stack_rows(data, bad, err, scales, zeros, weights, params, network, r0, r1, out_data, out_err, out_cov,
                out_wsum, out_rej, member):
    """Rows ``r0:r1`` of a band: ``data``/``bad``/``err`` (n, rows, nx) of the resampled frames
    into the (rows, nx) outputs. ``params``: low, high, tolerance, level, reject (0/1);
    ``network``: :func:`sorting_network` of n (empty: every pixel with 3 values or more is
    clipped pass by pass). Per pixel: reject, weighted mean and σ; the values are sorted only
    where clipping takes one (most pixels keep all: their median from the network, their mean
    in frame order)."""
    n = data.shape[0]
    nx = data.shape[2]
    low, high, tol, level = params[0], params[1], params[2], params[3]
    reject = params[4] != 0.0
    by_network = network.shape[0] > 0
    V = np.empty((n, _TILE))
    S = np.empty((n, _TILE))
    ok = np.empty((n, _TILE), np.bool_)
    work = np.empty((n, _TILE))
    m = np.empty(_TILE, np.int64)
    centre = np.empty(_TILE)
    inside = np.ones(_TILE, np.bool_)
    sw = np.empty(_TILE)
    swx = np.empty(_TILE)
    acc = np.empty(_TILE)
    tv = np.empty(n)
    ts = np.empty(n)
    ti = np.empty(n, np.int64)
    vals = np.empty(n)
    sig = np.empty(n)
    idx = np.empty(n, np.int64)
    pos = np.empty(n, np.int64)
    for r in range(r0, r1):
        for x0 in range(0, nx, _TILE):
            width = min(_TILE, nx - x0)
            _gather_slots(data, bad, err, scales, zeros, r, x0, width, V, S, ok, m)
            if reject and by_network:
                _tile_medians(V, m, width, network, work, centre)
                _tile_all_inside(V, S, ok, width, centre, low, high, tol, level, inside)
            _tile_means(V, S, ok, weights, width, sw, swx, acc)
            for t in range(width):
                x = x0 + t
                k = m[t]
                nrej = 0
                s_w, s_wx, s_acc = sw[t], swx[t], acc[t]
                if reject and k >= 3 and not (by_network and inside[t]):
                    k, nrej, s_w, s_wx, s_acc = _clipped_pixel(V, S, ok, t, weights, low, high, tol, level, tv, ts,
                                                               ti, vals, sig, idx, pos, member)
                out_rej[r, x] = nrej
                out_cov[r, x] = k
                if k == 0:
                    out_data[r, x] = np.nan
                    out_err[r, x] = np.nan
                    out_wsum[r, x] = 0.0
                else:
                    out_data[r, x] = s_wx / s_w
                    out_err[r, x] = math.sqrt(s_acc) / s_w
                    out_wsum[r, x] = s_w
