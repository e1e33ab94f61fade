"""Numba kernels of debayering: bilinear (mask-aware: a bad pixel is left out and its value
made from good pixels of its colour, the CFA-aware cosmetic correction) and Malvar–He–Cutler
(5x5 gradient-corrected linear filters, where the whole window is good; bilinear elsewhere).

The variance of a made value is the weighted mean of its pixels' variances (Σ|w|·σ²/Σ|w|), not
the variance of a weighted mean (Σw²σ²): it is an estimate of the colour at a pixel where that
colour was not measured, and its error holds what interpolation misses (a star's core between
samples), which differs from frame to frame as the dithers move the stars across the pattern. A
variance of Σw²σ² would be half a pixel's and rejection would cut the cores of red and blue
stars (1.2 % of their flux in tests/test_colour.py)."""

from __future__ import annotations

import numpy as np
from numba import prange

from .._shared.jit import njit

# Malvar, He & Cutler (2004), "High-quality linear interpolation for demosaicing of Bayer-patterned
# colour images", ICASSP: the filters in eighths, on a 5x5 window centred on the pixel.
_MHC_G_AT_RB = np.array([[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0],
                         [0, 0, -1, 0, 0]], np.float32) / 8
_MHC_ROW = np.array([[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0],
                     [0, 0, 0.5, 0, 0]], np.float32) / 8       # the colour of the row's neighbours
_MHC_COL = np.ascontiguousarray(_MHC_ROW.T)                      # the colour of the column's neighbours
_MHC_DIAG = np.array([[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5], [0, 2, 0, 2, 0],
                      [0, 0, -1.5, 0, 0]], np.float32) / 8      # R at B, B at R
MHC_FILTERS = np.stack([_MHC_G_AT_RB, _MHC_ROW, _MHC_COL, _MHC_DIAG])


def _nonzero_taps(filters: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each filter's non-zero taps in row-major order (the order the 5x5 loops take them):
    offsets (filters, 25, 2) as (dy, dx), weights (filters, 25) and counts (filters,)."""
    offsets = np.zeros((len(filters), 25, 2), np.int64)
    weights = np.zeros((len(filters), 25), np.float32)
    counts = np.zeros(len(filters), np.int64)
    for f, kernel in enumerate(filters):
        for dy in range(5):
            for dx in range(5):
                if kernel[dy, dx] != 0:
                    k = counts[f]
                    offsets[f, k] = (dy - 2, dx - 2)
                    weights[f, k] = kernel[dy, dx]
                    counts[f] = k + 1
    return offsets, weights, counts


MHC_OFFSETS, MHC_WEIGHTS, MHC_COUNTS = _nonzero_taps(MHC_FILTERS)


@njit(cache=True)
def _mean_of_colour(cfa, bad, var, has_var, chan, row0, y, x, c, radius):
    """Mean (value, variance, count) of the good pixels of colour ``c`` within ``radius`` of (y, x),
    the centre excluded."""
    ny, nx = cfa.shape
    total = 0.0
    vsum = 0.0
    n = 0
    for dy in range(-radius, radius + 1):
        yy = y + dy
        if yy < 0 or yy >= ny:
            continue
        for dx in range(-radius, radius + 1):
            xx = x + dx
            if (dy == 0 and dx == 0) or xx < 0 or xx >= nx:
                continue
            if chan[(row0 + yy) % 2, xx % 2] != c or bad[yy, xx]:
                continue
            total += cfa[yy, xx]
            if has_var:
                vsum += var[yy, xx]
            n += 1
    if n == 0:
        return 0.0, 0.0, 0
    return total / n, vsum / n, n


@njit(cache=True, inline="always")
def _bilinear_clean(cfa, var, has_var, chan, row0, y, x, c):
    """Bilinear colour ``c`` at (y, x) where the 3x3 window is inside and has no bad pixel:
    the pixel itself, or the mean of its 2 or 4 nearest pixels of colour ``c``."""
    py = (row0 + y) % 2
    px = x % 2
    own = chan[py, px]
    if own == c:
        return cfa[y, x], var[y, x] if has_var else 0.0
    if chan[py, 1 - px] == c and chan[1 - py, px] == c:        # green at red or blue: 4 sides
        value = (cfa[y - 1, x] + cfa[y + 1, x] + cfa[y, x - 1] + cfa[y, x + 1]) * 0.25
        v = (var[y - 1, x] + var[y + 1, x] + var[y, x - 1] + var[y, x + 1]) * 0.25 if has_var else 0.0
    elif chan[py, 1 - px] == c:                                   # in the row
        value = (cfa[y, x - 1] + cfa[y, x + 1]) * 0.5
        v = (var[y, x - 1] + var[y, x + 1]) * 0.5 if has_var else 0.0
    elif chan[1 - py, px] == c:                                   # in the column
        value = (cfa[y - 1, x] + cfa[y + 1, x]) * 0.5
        v = (var[y - 1, x] + var[y + 1, x]) * 0.5 if has_var else 0.0
    else:                                                         # red at blue, blue at red: diagonals
        value = (cfa[y - 1, x - 1] + cfa[y - 1, x + 1] + cfa[y + 1, x - 1] + cfa[y + 1, x + 1]) * 0.25
        v = (var[y - 1, x - 1] + var[y - 1, x + 1] + var[y + 1, x - 1] + var[y + 1, x + 1]) * 0.25 \
            if has_var else 0.0
    return value, v


@njit(cache=True)
def _clean_row(cfa, var, has_var, chan, row0, r, r0, c, out, out_var, out_bad):
    """Bilinear colour ``c`` of the inner pixels (1 … nx − 2) of row ``r``, whose 3x3 windows are
    all inside and clean: :func:`_bilinear_clean`'s sums in the same order, the layout decided
    once for each column parity instead of at every pixel."""
    nx = cfa.shape[1]
    py = (row0 + r) % 2
    o = r - r0
    for px in range(2):
        start = 2 if px == 0 else 1
        if chan[py, px] == c:                                       # the pixel itself
            for x in range(start, nx - 1, 2):
                out[c, o, x] = cfa[r, x]
                out_var[c, o, x] = var[r, x] if has_var else 0.0
        elif chan[py, 1 - px] == c and chan[1 - py, px] == c:       # green at red or blue: 4 sides
            for x in range(start, nx - 1, 2):
                out[c, o, x] = (cfa[r - 1, x] + cfa[r + 1, x] + cfa[r, x - 1] + cfa[r, x + 1]) * 0.25
                if has_var:
                    out_var[c, o, x] = (var[r - 1, x] + var[r + 1, x] + var[r, x - 1] + var[r, x + 1]) * 0.25
                else:
                    out_var[c, o, x] = 0.0
        elif chan[py, 1 - px] == c:                                 # in the row
            for x in range(start, nx - 1, 2):
                out[c, o, x] = (cfa[r, x - 1] + cfa[r, x + 1]) * 0.5
                out_var[c, o, x] = (var[r, x - 1] + var[r, x + 1]) * 0.5 if has_var else 0.0
        elif chan[1 - py, px] == c:                                 # in the column
            for x in range(start, nx - 1, 2):
                out[c, o, x] = (cfa[r - 1, x] + cfa[r + 1, x]) * 0.5
                out_var[c, o, x] = (var[r - 1, x] + var[r + 1, x]) * 0.5 if has_var else 0.0
        else:                                                       # red at blue, blue at red
            for x in range(start, nx - 1, 2):
                out[c, o, x] = (cfa[r - 1, x - 1] + cfa[r - 1, x + 1] + cfa[r + 1, x - 1] + cfa[r + 1, x + 1]) * 0.25
                if has_var:
                    out_var[c, o, x] = (var[r - 1, x - 1] + var[r - 1, x + 1] + var[r + 1, x - 1]
                                        + var[r + 1, x + 1]) * 0.25
                else:
                    out_var[c, o, x] = 0.0
        for x in range(start, nx - 1, 2):
            out_bad[c, o, x] = False


@njit(cache=True)
def _bilinear_value(cfa, bad, var, has_var, chan, row0, y, x, c):
    own = chan[(row0 + y) % 2, x % 2]
    if own == c and not bad[y, x]:
        return cfa[y, x], var[y, x] if has_var else 0.0, True
    value, v, n = _mean_of_colour(cfa, bad, var, has_var, chan, row0, y, x, c, 1)
    if n == 0:
        value, v, n = _mean_of_colour(cfa, bad, var, has_var, chan, row0, y, x, c, 2)
    return value, v, n > 0


@njit(cache=True)
def _mhc_filter(chan, row0, y, x, c):
    """Which MHC filter gives colour ``c`` at (y, x): -1 the pixel itself, else an index."""
    own = chan[(row0 + y) % 2, x % 2]
    if own == c:
        return -1
    if c == 1:
        return 0
    if own == 1:   # a green pixel: are the c-coloured neighbours in its row or its column?
        return 1 if chan[(row0 + y) % 2, (x + 1) % 2] == c else 2
    return 3


@njit(cache=True)
def _mhc_clean_row(cfa, var, has_var, chan, row0, r, r0, c, offsets, weights, counts, out, out_var, out_bad):
    """Malvar–He–Cutler colour ``c`` of the pixels 2 … nx − 3 of row ``r``, whose 5x5 windows
    are all inside and clean (rows r − 2 … r + 2 hold no bad pixel): the sums of the per-pixel
    path over the same non-zero taps in the same order, the filter chosen once for each column
    parity instead of at every pixel, the zero taps never visited."""
    nx = cfa.shape[1]
    o = r - r0
    for start in (2, 3):
        f = _mhc_filter(chan, row0, r, start, c)
        if f < 0:                                                   # the pixel's own colour
            for x in range(start, nx - 2, 2):
                out[c, o, x] = cfa[r, x]
                out_var[c, o, x] = var[r, x] if has_var else 0.0
                out_bad[c, o, x] = False
            continue
        k = counts[f]
        for x in range(start, nx - 2, 2):
            value = 0.0
            v = 0.0
            wsum = 0.0
            for t in range(k):
                w = weights[f, t]
                yy = r + offsets[f, t, 0]
                xx = x + offsets[f, t, 1]
                value += w * cfa[yy, xx]
                if has_var:
                    v += abs(w) * var[yy, xx]
                    wsum += abs(w)
            out[c, o, x] = value
            out_var[c, o, x] = v / wsum if wsum > 0 else 0.0
            out_bad[c, o, x] = False


@njit(parallel=True, cache=True)
def debayer_rows(cfa, bad, var, has_var, chan, row0, r0, r1, method, filters, only, out, out_bad, out_var):
    """Colours of rows ``r0:r1`` of the CFA band ``cfa`` (whose row 0 is the image's row ``row0``,
    for the phase) into ``out[c, r - r0]`` (c: 0 red, 1 green, 2 blue; ``only`` >= 0: that colour
    alone, the other planes left as they are), with ``out_bad`` (no good pixel of that colour
    near) and ``out_var`` (when ``has_var``). ``method``: 0 bilinear, 1 Malvar–He–Cutler.
    Where the 3x3 (bilinear) or 5x5 (MHC) window is inside and clean, the closed forms; else the
    mask-aware bilinear."""
    ny, nx = cfa.shape
    row_bad = np.zeros(ny, np.bool_)        # rows holding a bad pixel, each row looked at once
    for r in prange(max(r0 - 1, 0), min(r1 + 1, ny)):
        for xx in range(nx):
            if bad[r, xx]:
                row_bad[r] = True
                break
    for r in prange(r0, r1):
        # bilinear, rows r − 1 … r + 1 without a bad pixel; MHC, rows r − 2 … r + 2
        fast = method == 0 and 1 <= r < ny - 1 and not (row_bad[r - 1] or row_bad[r] or row_bad[r + 1])
        fast_mhc = method == 1 and 2 <= r < ny - 2 and not (row_bad[r - 2] or row_bad[r - 1] or row_bad[r]
                                                            or row_bad[r + 1] or row_bad[r + 2])
        if fast:
            for c in range(3):
                if only < 0 or c == only:
                    _clean_row(cfa, var, has_var, chan, row0, r, r0, c, out, out_var, out_bad)
        if fast_mhc:
            for c in range(3):
                if only < 0 or c == only:
                    _mhc_clean_row(cfa, var, has_var, chan, row0, r, r0, c, MHC_OFFSETS, MHC_WEIGHTS, MHC_COUNTS,
                                   out, out_var, out_bad)
        for x in range(nx):
            if (fast and 1 <= x < nx - 1) or (fast_mhc and 2 <= x < nx - 2):
                continue
            inside3 = 1 <= r < ny - 1 and 1 <= x < nx - 1
            clean3 = False
            if inside3:
                clean3 = True
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        if bad[r + dy, x + dx]:
                            clean3 = False
            for c in range(3):
                if only >= 0 and c != only:
                    continue
                done = False
                if method == 1:
                    f = _mhc_filter(chan, row0, r, x, c)
                    if f >= 0 and 2 <= r < ny - 2 and 2 <= x < nx - 2 and clean3:
                        clean = True
                        for dy in range(-2, 3):
                            for dx in range(-2, 3):
                                if filters[f, dy + 2, dx + 2] != 0 and bad[r + dy, x + dx]:
                                    clean = False
                        if clean:
                            value = 0.0
                            v = 0.0
                            wsum = 0.0
                            for dy in range(-2, 3):
                                for dx in range(-2, 3):
                                    w = filters[f, dy + 2, dx + 2]
                                    if w != 0:
                                        value += w * cfa[r + dy, x + dx]
                                        if has_var:
                                            v += abs(w) * var[r + dy, x + dx]
                                            wsum += abs(w)
                            out[c, r - r0, x] = value
                            out_var[c, r - r0, x] = v / wsum if wsum > 0 else 0.0
                            out_bad[c, r - r0, x] = False
                            done = True
                if not done and clean3:
                    value, v = _bilinear_clean(cfa, var, has_var, chan, row0, r, x, c)
                    out[c, r - r0, x] = value
                    out_var[c, r - r0, x] = v
                    out_bad[c, r - r0, x] = False
                    done = True
                if not done:
                    value, v, ok = _bilinear_value(cfa, bad, var, has_var, chan, row0, r, x, c)
                    out[c, r - r0, x] = value if ok else np.nan
                    out_var[c, r - r0, x] = v
                    out_bad[c, r - r0, x] = not ok


# -- RCD: ratio corrected demosaicing ---------------------------------------------------------------
# After L. Sanz Rodríguez's RCD (as in RawTherapee and Siril; written here from the published steps):
# 1. the local strength of vertical against horizontal variation, from the squares of a
#    colour-balanced high-pass filter summed over three pixels in each direction;
# 2. green at red and blue pixels: the four nearest greens, each corrected by the ratio of the
#    low-pass CFA at the pixel to the low-pass CFA two pixels away on its side, weighted
#    inversely to their side's gradient and blended by direction;
# 3. red at blue and blue at red: colour differences (colour minus green) of the four diagonal
#    neighbours, blended by the diagonal direction strength;
# 4. red and blue at green pixels: colour differences of the four cardinal neighbours, blended by
#    the vertical/horizontal strength.
# Differences from the published version: data are not normalised to [0, 1] nor clipped to it
# (calibrated frames hold any level, negatives near zero); the ratio correction divides by the
# sum of the absolute low-pass values (bounded for any sign); the small constants that keep the
# divisions finite are relative to the local values, so the result does not depend on the
# data's scale. Red, green and blue are first what the mask-aware bilinear gives (bad pixels
# repaired from good pixels of their colour); RCD replaces them where its window is finite and
# inside the band (5 px from its edges), the bilinear values stay elsewhere. A made value keeps
# the bilinear variance (the mean of its colour's nearest pixels' variances): RCD's made values
# scatter no more than a measured pixel (0.65-0.97 σ on flat noise), so it stays conservative.

RCD_MARGIN = 12     # rows either side a band needs for its inner rows to equal the whole frame's


@njit(inline="always")
def _hp(a, b, c, d, e, f, g):
    """The colour-balanced high-pass of seven pixels along a line, squared."""
    v = (a - c - e + g) - 3.0 * (b + f) + 6.0 * d
    return v * v


@njit(inline="always")
def _blend(central, n1, n2, n3, n4):
    """The direction strength at a pixel, or its four neighbours' mean where that is more decided."""
    around = 0.25 * (n1 + n2 + n3 + n4)
    return around if abs(0.5 - central) < abs(0.5 - around) else central


@njit(inline="always")
def _strength(a, b, level):
    """a / (a + b) of two summed squared high-passes, each at least a floor relative to the
    local ``level`` (NaN stays NaN: a window holding an unrepaired pixel keeps bilinear)."""
    floor = 1e-30 + 1e-18 * (level * level)
    a = a if not (a < floor) else floor
    b = b if not (b < floor) else floor
    return a / (a + b)


@njit(inline="always")
def _tiny(x):
    return 1e-9 * abs(x) + 1e-30


@njit(parallel=True, cache=True)
def rcd_refine(chan, row0, out, out_bad, scratch):
    """Replace the bilinear colours ``out`` (3, ny, nx; all three made, with ``out_bad``) of a CFA
    band whose row 0 is the image's row ``row0`` by RCD's where its window is finite and inside
    the band. ``scratch``: (7, ny, nx) float64."""
    _, ny, nx = out.shape
    if ny < 12 or nx < 12:
        return
    cfa = scratch[0]
    vh = scratch[1]
    green = scratch[2]
    red = scratch[3]
    blue = scratch[4]
    hv = scratch[5]
    hh = scratch[6]
    for y in prange(ny):
        for x in range(nx):
            k = chan[(row0 + y) % 2, x % 2]
            cfa[y, x] = np.nan if out_bad[k, y, x] else out[k, y, x]   # bad pixels repaired (bilinear)
            green[y, x] = np.nan if out_bad[1, y, x] else out[1, y, x]
            red[y, x] = np.nan if out_bad[0, y, x] else out[0, y, x]
            blue[y, x] = np.nan if out_bad[2, y, x] else out[2, y, x]
            hv[y, x] = 0.0
            hh[y, x] = 0.0
            vh[y, x] = np.nan
    # 1. vertical against horizontal strength (vh: near 1 where the vertical variation dominates)
    for y in prange(3, ny - 3):
        for x in range(3, nx - 3):
            hv[y, x] = _hp(cfa[y - 3, x], cfa[y - 2, x], cfa[y - 1, x], cfa[y, x], cfa[y + 1, x],
                           cfa[y + 2, x], cfa[y + 3, x])
            hh[y, x] = _hp(cfa[y, x - 3], cfa[y, x - 2], cfa[y, x - 1], cfa[y, x], cfa[y, x + 1],
                           cfa[y, x + 2], cfa[y, x + 3])
    for y in prange(4, ny - 4):
        for x in range(4, nx - 4):
            vh[y, x] = _strength(hv[y - 1, x] + hv[y, x] + hv[y + 1, x], hh[y, x - 1] + hh[y, x] + hh[y, x + 1],
                                 cfa[y, x])
    # 2. green at red and blue pixels (hh reused for the low-pass CFA)
    for y in prange(1, ny - 1):
        for x in range(1, nx - 1):
            hh[y, x] = (cfa[y, x] + 0.5 * (cfa[y - 1, x] + cfa[y + 1, x] + cfa[y, x - 1] + cfa[y, x + 1])
                        + 0.25 * (cfa[y - 1, x - 1] + cfa[y - 1, x + 1] + cfa[y + 1, x - 1] + cfa[y + 1, x + 1]))
    lpf = hh
    for y in prange(5, ny - 5):
        for x in range(5, nx - 5):
            if chan[(row0 + y) % 2, x % 2] == 1:
                continue
            c = cfa
            eps = _tiny(c[y, x])
            ng = eps + abs(c[y - 1, x] - c[y + 1, x]) + abs(c[y, x] - c[y - 2, x]) + abs(c[y - 1, x] - c[y - 3, x]) \
                + abs(c[y - 2, x] - c[y - 4, x])
            sg = eps + abs(c[y - 1, x] - c[y + 1, x]) + abs(c[y, x] - c[y + 2, x]) + abs(c[y + 1, x] - c[y + 3, x]) \
                + abs(c[y + 2, x] - c[y + 4, x])
            wg = eps + abs(c[y, x - 1] - c[y, x + 1]) + abs(c[y, x] - c[y, x - 2]) + abs(c[y, x - 1] - c[y, x - 3]) \
                + abs(c[y, x - 2] - c[y, x - 4])
            eg = eps + abs(c[y, x - 1] - c[y, x + 1]) + abs(c[y, x] - c[y, x + 2]) + abs(c[y, x + 1] - c[y, x + 3]) \
                + abs(c[y, x + 2] - c[y, x + 4])
            l0 = lpf[y, x]
            le = _tiny(l0)
            n_est = c[y - 1, x] * (1.0 + (l0 - lpf[y - 2, x]) / (le + abs(l0) + abs(lpf[y - 2, x])))
            s_est = c[y + 1, x] * (1.0 + (l0 - lpf[y + 2, x]) / (le + abs(l0) + abs(lpf[y + 2, x])))
            w_est = c[y, x - 1] * (1.0 + (l0 - lpf[y, x - 2]) / (le + abs(l0) + abs(lpf[y, x - 2])))
            e_est = c[y, x + 1] * (1.0 + (l0 - lpf[y, x + 2]) / (le + abs(l0) + abs(lpf[y, x + 2])))
            v_est = (sg * n_est + ng * s_est) / (ng + sg)
            h_est = (eg * w_est + wg * e_est) / (eg + wg)
            d = _blend(vh[y, x], vh[y - 1, x - 1], vh[y - 1, x + 1], vh[y + 1, x - 1], vh[y + 1, x + 1])
            g = d * h_est + (1.0 - d) * v_est
            if np.isfinite(g):
                green[y, x] = g
    # 3. red at blue, blue at red (hv reused for the diagonal strength, hh for its high-pass)
    for y in prange(3, ny - 3):
        for x in range(3, nx - 3):
            hv[y, x] = _hp(cfa[y - 3, x - 3], cfa[y - 2, x - 2], cfa[y - 1, x - 1], cfa[y, x], cfa[y + 1, x + 1],
                           cfa[y + 2, x + 2], cfa[y + 3, x + 3])
            hh[y, x] = _hp(cfa[y - 3, x + 3], cfa[y - 2, x + 2], cfa[y - 1, x + 1], cfa[y, x], cfa[y + 1, x - 1],
                           cfa[y + 2, x - 2], cfa[y + 3, x - 3])
    pq = scratch[0]         # the CFA is not read again: its plane takes the diagonal strength
    for y in prange(ny):
        for x in range(nx):
            pq[y, x] = np.nan
    for y in prange(4, ny - 4):
        for x in range(4, nx - 4):
            pq[y, x] = _strength(hv[y - 1, x - 1] + hv[y, x] + hv[y + 1, x + 1],
                                 hh[y - 1, x + 1] + hh[y, x] + hh[y + 1, x - 1], green[y, x])
    for y in prange(5, ny - 5):
        for x in range(5, nx - 5):
            own = chan[(row0 + y) % 2, x % 2]
            if own == 1:
                continue
            col = blue if own == 0 else red
            g = green
            eps = _tiny(g[y, x])
            nw = eps + abs(col[y - 1, x - 1] - col[y + 1, x + 1]) + abs(col[y - 1, x - 1] - col[y - 3, x - 3]) \
                + abs(g[y, x] - g[y - 2, x - 2])
            ne = eps + abs(col[y - 1, x + 1] - col[y + 1, x - 1]) + abs(col[y - 1, x + 1] - col[y - 3, x + 3]) \
                + abs(g[y, x] - g[y - 2, x + 2])
            sw = eps + abs(col[y + 1, x - 1] - col[y - 1, x + 1]) + abs(col[y + 1, x - 1] - col[y + 3, x - 3]) \
                + abs(g[y, x] - g[y + 2, x - 2])
            se = eps + abs(col[y + 1, x + 1] - col[y - 1, x - 1]) + abs(col[y + 1, x + 1] - col[y + 3, x + 3]) \
                + abs(g[y, x] - g[y + 2, x + 2])
            p_est = (nw * (col[y + 1, x + 1] - g[y + 1, x + 1]) + se * (col[y - 1, x - 1] - g[y - 1, x - 1])) / (nw + se)
            q_est = (ne * (col[y + 1, x - 1] - g[y + 1, x - 1]) + sw * (col[y - 1, x + 1] - g[y - 1, x + 1])) / (ne + sw)
            d = _blend(pq[y, x], pq[y - 1, x - 1], pq[y - 1, x + 1], pq[y + 1, x - 1], pq[y + 1, x + 1])
            v = g[y, x] + (1.0 - d) * p_est + d * q_est
            if np.isfinite(v):
                hv[y, x] = v
            else:
                hv[y, x] = col[y, x]
    for y in prange(5, ny - 5):             # written after all were read
        for x in range(5, nx - 5):
            own = chan[(row0 + y) % 2, x % 2]
            if own == 0:
                blue[y, x] = hv[y, x]
            elif own == 2:
                red[y, x] = hv[y, x]
    # 4. red and blue at green pixels (into hv and hh, then written)
    for y in prange(5, ny - 5):
        for x in range(5, nx - 5):
            if chan[(row0 + y) % 2, x % 2] != 1:
                continue
            g = green
            d = _blend(vh[y, x], vh[y - 1, x - 1], vh[y - 1, x + 1], vh[y + 1, x - 1], vh[y + 1, x + 1])
            for which in range(2):
                col = red if which == 0 else blue
                eps = _tiny(g[y, x])
                ng = eps + abs(g[y, x] - g[y - 2, x]) + abs(col[y - 1, x] - col[y + 1, x]) \
                    + abs(col[y - 1, x] - col[y - 3, x])
                sg = eps + abs(g[y, x] - g[y + 2, x]) + abs(col[y + 1, x] - col[y - 1, x]) \
                    + abs(col[y + 1, x] - col[y + 3, x])
                wg = eps + abs(g[y, x] - g[y, x - 2]) + abs(col[y, x - 1] - col[y, x + 1]) \
                    + abs(col[y, x - 1] - col[y, x - 3])
                eg = eps + abs(g[y, x] - g[y, x + 2]) + abs(col[y, x + 1] - col[y, x - 1]) \
                    + abs(col[y, x + 1] - col[y, x + 3])
                v_est = (ng * (col[y + 1, x] - g[y + 1, x]) + sg * (col[y - 1, x] - g[y - 1, x])) / (ng + sg)
                h_est = (eg * (col[y, x - 1] - g[y, x - 1]) + wg * (col[y, x + 1] - g[y, x + 1])) / (eg + wg)
                v = g[y, x] + (1.0 - d) * v_est + d * h_est
                target = hv if which == 0 else hh
                target[y, x] = v if np.isfinite(v) else col[y, x]
    for y in prange(ny):
        for x in range(nx):
            inner = 5 <= y < ny - 5 and 5 <= x < nx - 5 and chan[(row0 + y) % 2, x % 2] == 1
            r = hv[y, x] if inner else red[y, x]
            b = hh[y, x] if inner else blue[y, x]
            for k in range(3):
                if out_bad[k, y, x]:
                    continue
                v = r if k == 0 else (green[y, x] if k == 1 else b)
                if np.isfinite(v):
                    out[k, y, x] = v
