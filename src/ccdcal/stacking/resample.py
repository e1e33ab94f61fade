"""Resampling of calibrated frames onto a reference pixel grid, served by rows.

Transform convention: a 3×3 float64 homogeneous matrix ``M`` maps a point ``(x, y)`` of the
*source* frame to ``(x, y)`` of the *reference* grid (0-based pixel centres, ``x`` the column
index, ``y`` the row index). To resample, each output pixel ``(x, y)`` of the reference grid
takes the source position ``M⁻¹·(x, y, 1)`` (divided by its third coordinate, so projective
matrices work too) and interpolates the source there.

Interpolation (separable kernels, weights normalised to sum 1, so a constant image stays
constant and flux per pixel is kept under pure shifts):

- ``"lanczos3"``: ``L(d) = sinc(d)·sinc(d/3)`` for ``|d| < 3``: 6×6 source pixels.
- ``"bicubic"``: Keys' cubic convolution (``a = −0.5``) for ``|d| < 2``: 4×4 source pixels.
- ``"bilinear"``: ``1 − |d|``: 2×2 source pixels.

Values stay *per pixel* (surface brightness): the Jacobian of the transform is not applied,
since the reference defines the grid. Where a frame's pixel scale differs from the reference's
(about 1 % within a night), a star's summed flux is multiplied by ``|det M|``; the measured
transparency scale of :func:`ccdcal.stacking.engine.stack` absorbs such a uniform difference.

The weights are tabulated at 4096 sub-pixel phases (:func:`kernel_table`): each source
coordinate is rounded to the nearest 1/4096 px (an error of at most 1/8192 px), so the weights
of a pixel cost two table rows. Whole-pixel positions (within 1/8192 px) copy values exactly:
the identity, whole-pixel shifts and 90°/180° rotations. A source pixel that cannot contribute
(outside the frame, masked, NaN, or with a NaN uncertainty) is dropped when the magnitude of its
kernel weight is below :data:`NEGLIGIBLE` (the other weights are renormalised); with a larger
weight it makes the output pixel *invalid*: NaN in the data and uncertainty, True in the mask.
Frame edges and masked pixels are therefore never averaged in as values.

Uncertainty: ``σ_out = sqrt(Σ w²σ²)`` over the same weights. Interpolation correlates
neighbouring output pixels (the same source pixels feed several of them); the plane is the
per-pixel σ and carries no covariance, so the noise of a sum over an aperture is not the
quadrature sum of these σ.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .._shared.jit import njit
from ..errors import InputError
from ..io.frames import FrameSource, as_sigma, ccddata_planes, uncertainty_kind
from .helper import cpus

INTERPOLATIONS = ("lanczos3", "bicubic", "bilinear")
_HALF = {"lanczos3": 3, "bicubic": 2, "bilinear": 1}  # kernel half-width a: taps floor(x) − a + 1 … floor(x) + a
#: Weight magnitude (of a kernel summing to 1) below which a pixel that cannot contribute is dropped.
NEGLIGIBLE = 1e-3
_MIN_PARALLEL_ROWS = 8  # output rows per parallel job at the least
#: Sub-pixel phases of the tabulated kernels: source positions are rounded to 1/(2·_PHASES) px.
_PHASES = 4096


@lru_cache(maxsize=8)
def kernel_table(interpolation: str, phases: int = _PHASES) -> np.ndarray:
    """The normalised weights of each sub-pixel phase: row ``q`` (position ``floor(x) + q/phases``)
    weighs taps ``floor(x) − a + 1 … floor(x) + a`` (``a`` the half-width); row 0 is the pixel
    itself (weight 1), so whole-pixel positions copy values exactly. Made once per kind (every
    frame and colour shares it): read-only."""
    half = _HALF[interpolation]
    f = np.arange(phases + 1)[:, None] / phases
    d = f + (half - 1) - np.arange(2 * half)[None, :]      # from each tap to the position
    if half == 1:
        w = 1.0 - np.abs(d)
    elif half == 2:     # Keys' cubic convolution, a = −0.5
        t = np.abs(d)
        w = np.where(t <= 1.0, (1.5 * t - 2.5) * t * t + 1.0, ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0)
        w[t >= 2.0] = 0.0
    else:
        w = np.sinc(d) * np.sinc(d / 3.0)
        w[np.abs(d) >= 3.0] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    w[0] = 0.0
    w[0, half - 1] = 1.0
    w = np.ascontiguousarray(w)
    w.flags.writeable = False
    return w


@lru_cache(maxsize=8)
def _squared_table(interpolation: str) -> np.ndarray:
    """:func:`kernel_table` squared (the weights of the variances), read-only."""
    w = np.square(kernel_table(interpolation))
    w.flags.writeable = False
    return w


# -- kernels ------------------------------------------------------------------------------------
@njit(cache=True, nogil=True, inline="always")
def _phase(pos, phases):
    """(floor of the nearest tabulated position, its phase) for a source coordinate."""
    base = math.floor(pos)
    q = np.int64((pos - base) * phases + 0.5)
    start = np.int64(base)
    if q >= phases:
        start += 1
        q = 0
    return start, q


@njit(cache=True, nogil=True, inline="always")
def _reaches(px, py, half, src_nx, src_ny):
    """Whether a kernel of half-width ``half`` at source position (px, py) reaches the frame."""
    return px > -half and px < src_nx - 1 + half and py > -half and py < src_ny - 1 + half


@njit(cache=True, nogil=True, inline="always")
def _set_invalid(out, err, out_bad, r, x):
    """Output pixel (r, x) has no value: NaN in the data and σ, True in the mask."""
    out[r, x] = np.nan
    err[r, x] = np.nan
    out_bad[r, x] = True


@njit(cache=True, nogil=True)
def _prepare_band(band, maskp, unc, flags, noise, r0, r1):
    """Rows ``r0:r1`` of a source band, in place, for the row kernels (:func:`_make_rows`): ``maskp`` becomes 1.0
    where a pixel cannot contribute (masked, NaN data or σ) and 0.0 elsewhere, ``unc`` the
    variance, the data 0 and the variance NaN where unusable (the direct kernels' sums never
    take such a pixel in; the two-pass kernels find it by the NaN).

    ``flags``: (has_mask, has_uncertainty, has_noise_model). ``noise``: (background, σ², 1/gain)
    of the model ``σ² = σ_bg² + max(v − B, 0)/gain`` used where there is no uncertainty plane.
    """
    for r in range(r0, r1):
        for x in range(band.shape[1]):
            v = band[r, x]
            ok = math.isfinite(v) and not (flags[0] and maskp[r, x] != 0)
            var = 0.0
            if flags[1]:
                var = np.float64(unc[r, x]) ** 2
                ok = ok and math.isfinite(var)
            elif flags[2] and ok:
                var = noise[1] + max(v - noise[0], 0.0) * noise[2]
            maskp[r, x] = 0.0 if ok else 1.0
            band[r, x] = v if ok else 0.0
            unc[r, x] = var if ok else np.nan


_FAST = {"contract", "reassoc", "arcp"}   # reorder sums (SIMD); NaN and inf semantics kept


@njit(cache=True, nogil=True)
def _footprint_counts(bad, taps, near, r0, r1):
    """``near[r, x]`` = bad pixels in the ``taps``² footprint whose top-left pixel is (r, x), for
    rows ``r0:r1`` of a prepared band (rows past its end count as good): a footprint with none
    takes the sums without bad-pixel bookkeeping.

    The column sums over ``taps`` rows are summed once for ``r0`` and then moved down a row at
    a time (the row that enters added, the row that leaves taken away): the values are 0.0 and
    1.0, so the running sums are exact integers, as a fresh sum would be."""
    rows, nx = bad.shape
    col = np.zeros(nx)
    if r0 >= r1:
        return
    for j in range(taps):
        if r0 + j < rows:
            for x in range(nx):
                col[x] += bad[r0 + j, x]
    for r in range(r0, r1):
        if r > r0:
            enter = r + taps - 1
            for x in range(nx):
                col[x] += (bad[enter, x] if enter < rows else 0.0) - bad[r - 1, x]
        running = 0.0
        for x in range(min(taps, nx)):
            running += col[x]
        for x in range(nx):
            near[r, x] = running
            running -= col[x]
            if x + taps < nx:
                running += col[x + taps]


def _make_rows(taps: int) -> Callable[..., None]:
    """The row kernel for a kernel of ``taps``² source pixels, compiled for that tap count
    (literal loops unroll).

    The common case first: a footprint wholly inside the band without a bad pixel (``near``,
    counted once per band by :func:`_footprint_counts`) takes the tabulated weights of its
    phases as they are (they sum to 1). Elsewhere :func:`_sample_careful`: weights renormalised
    over the good pixels, invalid when a bad pixel carries a weight of NEGLIGIBLE or more."""
    half = taps // 2

    @njit(cache=True, nogil=True, fastmath=_FAST)
    def rows(band, bad, var, near, y_off, src_ny, src_nx, minv, y_out0, table, table2, r0, r1, out, out_bad, err):
        nx = out.shape[1]
        phases = table.shape[0] - 1
        band_rows = band.shape[0]
        wx = np.empty(taps)
        wy = np.empty(taps)
        projective = minv[2, 0] != 0.0 or minv[2, 1] != 0.0 or minv[2, 2] != 1.0
        for r in range(r0, r1):
            y = np.float64(y_out0 + r)
            for x in range(nx):
                xf = np.float64(x)
                px = minv[0, 0] * xf + minv[0, 1] * y + minv[0, 2]
                py = minv[1, 0] * xf + minv[1, 1] * y + minv[1, 2]
                if projective:
                    pw = minv[2, 0] * xf + minv[2, 1] * y + minv[2, 2]
                    px /= pw
                    py /= pw
                if not _reaches(px, py, half, src_nx, src_ny):
                    _set_invalid(out, err, out_bad, r, x)
                    continue
                ix, qx = _phase(px, phases)
                iy, qy = _phase(py, phases)
                x0 = ix - half + 1
                sy = iy - half + 1
                y0 = sy - y_off
                if x0 >= 0 and x0 + taps <= src_nx and y0 >= 0 and y0 + taps <= band_rows and near[y0, x0] == 0.0:
                    acc = 0.0
                    accv = 0.0
                    for j in range(taps):
                        ra = 0.0
                        rv = 0.0
                        for i in range(taps):
                            ra += table[qx, i] * band[y0 + j, x0 + i]
                            rv += table2[qx, i] * var[y0 + j, x0 + i]
                        acc += table[qy, j] * ra
                        accv += table2[qy, j] * rv
                    out[r, x] = acc
                    err[r, x] = math.sqrt(accv)
                    out_bad[r, x] = False
                    continue
                for k in range(taps):
                    wx[k] = table[qx, k]
                    wy[k] = table[qy, k]
                value, sigma, ok = _sample_careful(band, bad, var, y0, sy, x0, src_ny, src_nx, wx, wy)
                out[r, x] = value
                err[r, x] = sigma
                out_bad[r, x] = not ok

    return rows


@njit(cache=True, nogil=True)
def _sample_careful(band, bad, var, y0, sy, sx, src_ny, src_nx, wx, wy):
    """Tap by tap, at the frame's and the band's edges and near bad pixels: (value, σ, valid)
    with the weights renormalised over the good taps; invalid when a tap that cannot
    contribute carries a weight of NEGLIGIBLE or more."""
    taps = wx.size
    rows = band.shape[0]
    acc = 0.0
    accw = 0.0
    accv = 0.0
    for j in range(taps):
        ty = sy + j
        row_ok = ty >= 0 and ty < src_ny and y0 + j >= 0 and y0 + j < rows
        for i in range(taps):
            w = wy[j] * wx[i]
            if w == 0.0:
                continue
            tx = sx + i
            ok = row_ok and tx >= 0 and tx < src_nx
            if ok:
                ok = bad[y0 + j, tx] == 0.0
            if not ok:
                if abs(w) >= NEGLIGIBLE:
                    return np.nan, np.nan, False
                continue
            acc += w * band[y0 + j, tx]
            accw += w
            accv += w * w * var[y0 + j, tx]
    if accw < 0.5:
        return np.nan, np.nan, False
    return acc / accw, math.sqrt(accv) / accw, True


#: the most a transform may turn the grid for the two-pass kernels (:func:`shears_well`): tan θ
_MAX_SHEAR = 0.02


def shears_well(minv: np.ndarray) -> bool:
    """Whether the two-pass kernels (:func:`_make_sheared`) take this inverse transform: affine,
    turning the grid by at most about 1.1° (a night's dithers; a meridian flip too).

    The two-pass taps of a source row are centred up to ``tan θ · half`` px from the direct
    kernel's; a tap of the direct footprint they leave out then weighs less than 4e-4 (Lanczos-3
    at 2.94 px) or 8e-4 (Keys at 1.96 px), below :data:`NEGLIGIBLE`, so both kernels find the same
    output pixels invalid. Larger turns (alt-az field rotation), quarter turns and projective
    transforms take the direct kernels; so does bilinear (2 × 2 taps: two passes save nothing, and
    its edge taps weigh up to ``tan θ``)."""
    if minv[2, 0] != 0.0 or minv[2, 1] != 0.0 or minv[2, 2] != 1.0:
        return False
    return (abs(minv[0, 0]) >= 0.5 and abs(minv[1, 1]) >= 0.5
            and abs(minv[0, 1]) <= _MAX_SHEAR * abs(minv[1, 1]) and abs(minv[1, 0]) <= _MAX_SHEAR * abs(minv[0, 0]))


#: the output blocks of the two-pass kernels: columns and rows
_TILE_WIDTH = 256
_TILE_HEIGHT = 64


# A value the two passes cannot use is marked by a NaN variance: a prepared band's unusable pixel
# has one (:func:`_prepare_band`), and any sum that takes it in is NaN (no ``nnan`` in the fast-math
# flags), a zero weight included. Both passes are inlined into the kernel made for a tap count, so
# their loops unroll (and, being module-level, the kernels stay in numba's cache).
@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _sheared_first(band, var, y_off, src_nx, minv, y_out0, table, b0, b1, c0, c1, ival, ivar, taps):
    """The first pass of :func:`_make_sheared` for output rows ``b0:b1``, columns ``c0:c1``: each
    source row they reach interpolated along itself where each column's line crosses it
    (variance NaN where the taps leave the frame or meet an unusable pixel). Returns the first
    source row and the number of rows."""
    half = taps // 2
    phases = table.shape[0] - 1
    a00, a01, a02 = minv[0, 0], minv[0, 1], minv[0, 2]
    a10, a11, a12 = minv[1, 0], minv[1, 1], minv[1, 2]
    lo_y, hi_y = np.inf, -np.inf
    for yc in (np.float64(y_out0 + b0), np.float64(y_out0 + b1 - 1)):
        for xc in (np.float64(c0), np.float64(c1 - 1)):
            py = a10 * xc + a11 * yc + a12
            lo_y, hi_y = min(lo_y, py), max(hi_y, py)
    # a row more each side than the taps reach: positions round to the nearest phase
    lo = max(y_off, np.int64(math.floor(max(lo_y, -1e9))) - half)
    hi = min(y_off + band.shape[0], np.int64(math.floor(min(hi_y, 1e9))) + half + 2, lo + ival.shape[0])
    rows = max(0, hi - lo)
    slope = a00 - a01 * a10 / a11       # px along a source row, per output column
    for k in range(rows):
        br = lo + k - y_off
        base = a01 * (np.float64(lo + k) - a12) / a11 + a02
        for xo in range(c0, c1):
            ix, q = _phase(slope * np.float64(xo) + base, phases)
            x0 = ix - half + 1
            t = xo - c0
            if x0 < 0 or x0 + taps > src_nx:
                ivar[k, t] = np.nan
                continue
            acc = 0.0
            accv = 0.0
            for i in range(taps):
                w = table[q, i]
                acc += w * band[br, x0 + i]
                accv += w * w * var[br, x0 + i]
            ival[k, t] = acc
            ivar[k, t] = accv
    return lo, rows

@njit(cache=True, nogil=True, fastmath=_FAST, inline="always")
def _sheared_second(band, bad, var, y_off, src_ny, src_nx, minv, y_out0, table, b0, b1, c0, c1, out, out_bad, err,
                    ival, ivar, lo, rows, wx, wy, taps):
    """The second pass of :func:`_make_sheared` for output rows ``b0:b1``, columns ``c0:c1``: down
    each column's line at the output pixel's source row, or :func:`_sample_careful` where a
    first-pass value is unusable."""
    half = taps // 2
    phases = table.shape[0] - 1
    a00, a01, a02 = minv[0, 0], minv[0, 1], minv[0, 2]
    a10, a11, a12 = minv[1, 0], minv[1, 1], minv[1, 2]
    for r in range(b0, b1):
        y = np.float64(y_out0 + r)
        for x in range(c0, c1):
            xf = np.float64(x)
            px = a00 * xf + a01 * y + a02
            py = a10 * xf + a11 * y + a12
            if not _reaches(px, py, half, src_nx, src_ny):
                _set_invalid(out, err, out_bad, r, x)
                continue
            iy, qy = _phase(py, phases)
            sy = iy - half + 1
            k0 = sy - lo
            t = x - c0
            if k0 >= 0 and k0 + taps <= rows:
                acc = 0.0
                accv = 0.0
                for j in range(taps):
                    w = table[qy, j]
                    acc += w * ival[k0 + j, t]
                    accv += w * w * ivar[k0 + j, t]
                if not math.isnan(accv):
                    out[r, x] = acc
                    err[r, x] = math.sqrt(accv)
                    out_bad[r, x] = False
                    continue
            ix, qx = _phase(px, phases)
            for k in range(taps):
                wx[k] = table[qx, k]
                wy[k] = table[qy, k]
            value, sigma, ok = _sample_careful(band, bad, var, sy - y_off, sy, ix - half + 1, src_ny, src_nx,
                                               wx, wy)
            out[r, x] = value
            err[r, x] = sigma
            out_bad[r, x] = not ok


def _make_sheared(taps: int) -> Callable[..., None]:
    """The two-pass row kernel for an affine transform that turns the grid a little
    (:func:`shears_well`), compiled for ``taps`` (4 or 6).

    The source position of output pixel (x, y) lies on the line that output column x draws
    across the source. The first pass interpolates each source row along its own row at the
    point where each output column's line crosses it (``taps`` weights); the second
    interpolates down each column's line at the output pixel's source row (``taps`` weights).
    The kernel is the same separable one, on axes sheared by the turn (exactly the direct
    kernel for shifts, flips and whole-pixel positions): 2·taps multiply-adds per value
    instead of taps². Each first-pass value uses one source row, so the values the second
    pass combines are independent and ``Σw²σ²`` stays exact.

    A pixel whose sheared taps leave the band or the frame, or meet a bad pixel, takes
    :func:`_sample_careful` at its exact position, as the direct kernel does."""

    @njit(cache=True, nogil=True, fastmath=_FAST)
    def sheared(band, bad, var, y_off, src_ny, src_nx, minv, y_out0, table, table2, r0, r1, out, out_bad, err):
        nx = out.shape[1]
        a10, a11 = minv[1, 0], minv[1, 1]
        # blocks of output pixels whose first-pass values stay in the cache between the passes
        span = int(math.ceil(abs(a10) * _TILE_WIDTH + abs(a11) * _TILE_HEIGHT)) + taps + 4
        ival = np.empty((span, _TILE_WIDTH))
        ivar = np.empty((span, _TILE_WIDTH))
        wx = np.empty(taps)
        wy = np.empty(taps)
        for c0 in range(0, nx, _TILE_WIDTH):
            c1 = min(nx, c0 + _TILE_WIDTH)
            for b0 in range(r0, r1, _TILE_HEIGHT):
                b1 = min(r1, b0 + _TILE_HEIGHT)
                lo, rows = _sheared_first(band, var, y_off, src_nx, minv, y_out0, table, b0, b1, c0, c1, ival, ivar,
                                          taps)
                _sheared_second(band, bad, var, y_off, src_ny, src_nx, minv, y_out0, table, b0, b1, c0, c1, out,
                                out_bad, err, ival, ivar, lo, rows, wx, wy, taps)

    return sheared


_ROWS = {6: _make_rows(6), 4: _make_rows(4), 2: _make_rows(2)}
_SHEARED = {6: _make_sheared(6), 4: _make_sheared(4)}   # bilinear takes the direct kernel (shears_well)


# -- matrices and geometry ----------------------------------------------------------------------
def as_matrix(matrix: Any) -> np.ndarray:
    """A transform as a 3×3 float64 array (a 2×3 affine matrix gets the row ``0 0 1``; an
    object with a ``matrix`` attribute, such as ``ccdcal.stacking.register.Transform``, gives that).

    Raises
    ------
    InputError
        If it is not 3×3 (or 2×3), not finite or not invertible.
    """
    matrix = getattr(matrix, "matrix", matrix)
    try:
        m = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"a transform must be a 3x3 matrix of numbers, got {matrix!r}") from exc
    if m.shape == (2, 3):
        m = np.vstack([m, [0.0, 0.0, 1.0]])
    if m.shape != (3, 3) or not np.all(np.isfinite(m)):
        raise InputError(f"a transform must be a finite 3x3 matrix, got shape {m.shape}")
    if not abs(np.linalg.det(m)) > 1e-12 * max(1.0, float(np.abs(m).max()) ** 3):
        raise InputError("a transform matrix is singular (determinant 0); check the registration")
    return m


def _check_shape(shape: Any, what: str) -> tuple[int, int]:
    try:
        ny, nx = (int(v) for v in shape)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be (ny, nx), got {shape!r}") from exc
    if ny < 1 or nx < 1:
        raise InputError(f"{what} must be positive, got {shape!r}")
    return ny, nx


def _band_rows(minv: np.ndarray, nx_out: int, y0: np.ndarray, y1: np.ndarray, half: int,
               src_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The source rows ``[lo, hi)`` that the output bands ``y0:y1`` (arrays) need.

    The source position of a projective map is linear-fractional, so over a rectangle its
    extremes lie at the corners. ``lo >= hi`` where the band sees nothing of the source.
    """
    src_ny, src_nx = src_shape
    xs_c, ys_c = [], []
    for x in (0.0, float(nx_out - 1)):
        for y in (y0.astype(np.float64), (y1 - 1).astype(np.float64)):
            w = minv[2, 0] * x + minv[2, 1] * y + minv[2, 2]
            xs_c.append((minv[0, 0] * x + minv[0, 1] * y + minv[0, 2]) / w)
            ys_c.append((minv[1, 0] * x + minv[1, 1] * y + minv[1, 2]) / w)
    ys_c, xs_c = np.array(ys_c), np.array(xs_c)
    lo = np.floor(ys_c.min(axis=0)).astype(np.int64) - half  # one row of slack for the snapping
    hi = np.floor(ys_c.max(axis=0)).astype(np.int64) + half + 2
    lo = np.clip(lo, 0, src_ny)
    hi = np.clip(hi, 0, src_ny)
    outside = (xs_c.max(axis=0) <= -half) | (xs_c.min(axis=0) >= src_nx - 1 + half)
    hi = np.where(outside, lo, hi)
    return lo, np.maximum(hi, lo)


def _check_projective(minv: np.ndarray, out_shape: tuple[int, int]) -> None:
    ny, nx = out_shape
    corners = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1]], np.float64)
    w = minv[2, 0] * corners[:, 0] + minv[2, 1] * corners[:, 1] + minv[2, 2]
    if not np.all(w > 0):
        raise InputError("the transform sends part of the reference grid to infinity (projective"
                         " denominator <= 0); check the registration")


# -- planes of a source -------------------------------------------------------------------------
Filler = Callable[[int, int, np.ndarray, np.ndarray], None]


def _filler(source: Any, method: str) -> Filler:
    """A function ``fill(y0, y1, out, scratch)`` writing rows of one plane into ``out`` (float32)."""
    if method == "read_rows" and callable(getattr(source, "fill_rows", None)):
        def fill_file(y0: int, y1: int, out: np.ndarray, scratch: np.ndarray) -> None:
            source.fill_rows(y0, y1, out, scratch)
        return fill_file
    read = getattr(source, method)

    def fill(y0: int, y1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        out[...] = np.asarray(read(y0, y1))
    return fill


class _Planes:
    """The data, mask and uncertainty planes of one source frame, by rows."""

    def __init__(self, source: Any):
        self.owned: list[Any] = []
        if isinstance(source, (str, os.PathLike)):
            source = FrameSource(source)
            self.owned.append(source)
        elif isinstance(source, np.ndarray) or all(hasattr(source, a) for a in ("data", "unit", "header")):
            source = _in_memory(source)
        if not (hasattr(source, "shape") and callable(getattr(source, "read_rows", None))):
            raise InputError(f"cannot resample {type(source).__name__}: give a path, a FrameSource or a row source")
        self.source = source
        self.shape = _check_shape(source.shape, "the source shape")
        self.header = getattr(source, "header", None)
        self.path = getattr(source, "path", None)
        self.data = _filler(source, "read_rows")
        self.fills = callable(getattr(source, "fill_rows", None))
        self.mask: Filler | None = None
        self.unc: Filler | None = None
        self.unc_kind = "std"
        self.raw_bytes_per_row = int(getattr(source, "raw_bytes_per_row", 0) or 0)
        if isinstance(source, FrameSource):
            for hdu, is_mask in zip(ccddata_planes(source), (True, False), strict=True):
                if hdu is None:
                    continue
                plane = FrameSource(source.path, hdu=hdu.index)
                self.owned.append(plane)
                self.raw_bytes_per_row = max(self.raw_bytes_per_row, plane.raw_bytes_per_row)
                if is_mask:
                    self.mask = _filler(plane, "read_rows")
                else:
                    self.unc, self.unc_kind = _filler(plane, "read_rows"), uncertainty_kind(hdu.header)
        else:
            if getattr(source, "read_mask_rows", None) is not None:
                self.mask = _filler(source, "read_mask_rows")
            if getattr(source, "read_uncertainty_rows", None) is not None:
                self.unc = _filler(source, "read_uncertainty_rows")

    def close(self) -> None:
        for source in self.owned:
            source.close()


class InputBuffers:
    """Reusable float32 buffers for the source rows of one band (data, mask, uncertainty, and the
    bad pixels near each footprint) and the raw bytes of a file read: several :class:`ResampledRows` may share one set. They grow
    on demand; size them up front (``pixels`` per plane, ``raw`` scratch bytes) to keep a budget."""

    def __init__(self, pixels: int = 0, raw: int = 0):
        self.pixels = self.raw = -1
        self._grow(pixels, raw)

    @staticmethod
    def nbytes_for(rows: int, width: int, raw_bytes_per_row: int = 0) -> int:
        """Bytes of buffers for ``rows`` source rows of ``width`` pixels."""
        return rows * (4 * 4 * width + raw_bytes_per_row)

    def _grow(self, pixels: int, raw: int) -> None:
        if pixels <= self.pixels and raw <= self.raw:
            return
        self.pixels, self.raw = max(pixels, self.pixels), max(raw, self.raw)
        self.data = np.empty(self.pixels, np.float32)
        self.mask = np.empty(self.pixels, np.float32)
        self.unc = np.empty(self.pixels, np.float32)
        self.near = np.empty(self.pixels, np.float32)
        self.scratch = np.empty(self.raw, np.uint8)

    def near_view(self, rows: int, width: int) -> np.ndarray:
        """The (rows, width) plane of bad-pixel counts per footprint (:func:`_footprint_counts`)."""
        n = rows * width
        self._grow(n, self.raw)
        return self.near[:n].reshape(rows, width)

    def views(self, rows: int, width: int, raw_bytes_per_row: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """C-contiguous (rows, width) views of data, mask and uncertainty, and the scratch bytes."""
        n = rows * width
        self._grow(n, rows * raw_bytes_per_row)
        shape = (rows, width)
        return (self.data[:n].reshape(shape), self.mask[:n].reshape(shape), self.unc[:n].reshape(shape),
                self.scratch[: rows * raw_bytes_per_row])


# -- the row source ------------------------------------------------------------------------------
class ResampledRows:
    """One frame resampled onto the reference grid, served by rows (a combine row source).

    Satisfies :class:`ccdcal.combining.sources.RowSourceWithPlanes`: ``shape`` is ``out_shape``;
    ``read_rows``, ``read_mask_rows`` (True: no valid value, see the module docstring) and
    ``read_uncertainty_rows`` serve the same band from one resampling (the last band is
    cached). For each band only the source rows it needs are read (:meth:`needed_input_rows`):
    a rotated frame needs a taller band of source rows than it outputs
    (:meth:`input_band_height` sizes memory budgets).

    Parameters
    ----------
    source : path-like, FrameSource, row source, CCDData or ndarray
        A calibrated frame. For a file, the ``MASK`` (non-zero = bad) and ``UNCERT`` (σ;
        variance or inverse variance by its UTYPE) extensions are used when present; a row
        source may offer ``read_mask_rows``/``read_uncertainty_rows``; a CCDData its mask
        and uncertainty.
    matrix : array-like (3, 3)
        Maps source pixel coordinates to reference-grid coordinates (module docstring).
    out_shape : (ny, nx)
        The reference grid.
    interpolation : {"lanczos3", "bicubic", "bilinear"}
    name : str, optional
        How the frame is named (default: the file name).
    noise : tuple of float, optional
        ``(background, sigma, gain)``, a noise model for sources without an uncertainty plane:
        ``σ² = sigma² + max(v − background, 0)/gain`` per source pixel (``gain`` in e-/ADU,
        ``inf`` for none).
    """

    def __init__(self, source: Any, matrix: Any, out_shape: tuple[int, int], *,
                 interpolation: str = "lanczos3", name: str | None = None,
                 noise: tuple[float, float, float] | None = None):
        if interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        self.shape: tuple[int, int] = _check_shape(out_shape, "out_shape")
        self.matrix = as_matrix(matrix)
        self.inverse = np.linalg.inv(self.matrix)
        _check_projective(self.inverse, self.shape)
        self.interpolation = interpolation
        self._half = _HALF[interpolation]
        self._sheared = self._half > 1 and shears_well(self.inverse)
        self._table = kernel_table(interpolation)
        self._table2 = _squared_table(interpolation)
        self._planes = _Planes(source)
        self.source_shape = self._planes.shape
        self.header = self._planes.header
        path = self._planes.path
        self.path = Path(path) if isinstance(path, (str, os.PathLike)) else None
        default = self.path.name if self.path is not None else getattr(source, "name", None)
        self.name = name or (str(default) if default else "frame")
        self._noise = np.zeros(3)
        self._has_noise = False
        if noise is not None:
            self.noise_model = noise
        self._buffers: InputBuffers | None = None
        self._cache: tuple[int, int, np.ndarray, np.ndarray, np.ndarray] | None = None

    # -- planes and noise ---------------------------------------------------------------------
    @property
    def has_uncertainty(self) -> bool:
        """Whether the source carries an uncertainty plane."""
        return self._planes.unc is not None

    @property
    def reads_own_file(self) -> bool:
        """Whether the source reads a file of its own (given by its path, or a row source that
        says so: a :class:`ccdcal.colour.demosaic.DebayeredRows`): then its rows can be read in
        a thread beside other such sources."""
        return bool(self._planes.owned) or getattr(self._planes.source, "reads_own_file", False) is True

    @property
    def has_mask(self) -> bool:
        """Whether the source carries a mask plane."""
        return self._planes.mask is not None

    @property
    def noise_model(self) -> tuple[float, float, float] | None:
        """(background, sigma, gain) used where the source has no uncertainty plane, or None."""
        if not self._has_noise:
            return None
        b, var, inv_gain = self._noise
        return float(b), float(math.sqrt(var)), (math.inf if inv_gain == 0 else float(1.0 / inv_gain))

    @noise_model.setter
    def noise_model(self, model: tuple[float, float, float] | None) -> None:
        self._cache = None
        if model is None:
            self._has_noise = False
            return
        background, sigma, gain = (float(v) for v in model)
        if not (math.isfinite(background) and sigma >= 0 and math.isfinite(sigma) and gain > 0):
            raise InputError(f"{self.name}: noise model {model!r} needs a finite background, sigma >= 0"
                             " and gain > 0")
        self._noise = np.array([background, sigma * sigma, 0.0 if math.isinf(gain) else 1.0 / gain])
        self._has_noise = True

    # -- geometry -----------------------------------------------------------------------------
    def needed_input_rows(self, y0: int, y1: int) -> tuple[int, int]:
        """Source rows ``[lo, hi)`` needed for output rows ``y0:y1`` (``lo == hi``: none; the
        band lies outside the source)."""
        lo, hi = _band_rows(self.inverse, self.shape[1], np.array([y0]), np.array([y1]), self._half,
                            self.source_shape)
        return int(lo[0]), int(hi[0])

    def input_band_height(self, height: int) -> int:
        """The most source rows any band of ``height`` output rows needs (see :meth:`input_rows_for`)."""
        return self.input_rows_for(self.matrix, self.shape, self.source_shape, height,
                                   interpolation=self.interpolation)

    @staticmethod
    def input_rows_for(matrix: Any, out_shape: tuple[int, int], source_shape: tuple[int, int], height: int,
                       *, interpolation: str = "lanczos3") -> int:
        """The most source rows that any band of ``height`` output rows of ``out_shape`` needs
        (every band position is checked): what a memory budget must allow for this source.
        About ``|sin θ|·nx + |cos θ|·height`` plus the kernel rows for a rotation by θ."""
        ny, nx = _check_shape(out_shape, "out_shape")
        height = int(min(max(1, height), ny))
        minv = np.linalg.inv(as_matrix(matrix))
        y0 = np.arange(0, ny - height + 1)
        lo, hi = _band_rows(minv, nx, y0, y0 + height, _HALF[interpolation],
                            _check_shape(source_shape, "source_shape"))
        return int((hi - lo).max())

    def input_bytes(self, height: int) -> int:
        """Bytes that reading the source rows of a band of ``height`` output rows costs: the
        :class:`InputBuffers` and, for a row source that returns new arrays, one such array."""
        rows = self.input_band_height(height)
        transient = 0 if self._planes.fills else rows * self.source_shape[1] * 4
        return InputBuffers.nbytes_for(rows, self.source_shape[1], self._planes.raw_bytes_per_row) + transient

    @property
    def raw_bytes_per_row(self) -> int:
        """Scratch bytes that reading one source row needs (0 for sources in memory)."""
        return self._planes.raw_bytes_per_row

    # -- reading ------------------------------------------------------------------------------
    def source_rows(self, y0: int, y1: int, *, measured: bool = False) -> np.ndarray:
        """Rows ``y0:y1`` of the source frame itself (not resampled), float32, NaN where masked;
        ``measured``: only the values the source measured, NaN where it made them (a debayered
        colour's other pixels: its ``read_measured_rows``, the CFA's own pixels of that colour)."""
        ny, nx = self.source_shape
        if not 0 <= y0 < y1 <= ny:
            raise InputError(f"{self.name}: rows {y0}:{y1} are not within the {ny} source rows")
        read_measured = getattr(self._planes.source, "read_measured_rows", None)
        if measured and read_measured is not None:
            return np.asarray(read_measured(y0, y1), np.float32)
        out = np.empty((y1 - y0, nx), np.float32)
        scratch = np.empty((y1 - y0) * self._planes.raw_bytes_per_row, np.uint8)
        self._planes.data(y0, y1, out, scratch)
        if self._planes.mask is not None:
            mask = np.empty_like(out)
            self._planes.mask(y0, y1, mask, scratch)
            out[mask != 0] = np.nan
        return out

    def _read_band(self, lo: int, hi: int, buffers: InputBuffers) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        nx = self.source_shape[1]
        data, mask, unc, scratch = buffers.views(hi - lo, nx, self._planes.raw_bytes_per_row)
        planes = self._planes
        planes.data(lo, hi, data, scratch)
        if planes.mask is not None:
            planes.mask(lo, hi, mask, scratch)
        if planes.unc is not None:
            planes.unc(lo, hi, unc, scratch)
            as_sigma(unc, planes.unc_kind)
        return data, mask, unc

    def resample_into(self, y0: int, y1: int, data: np.ndarray, bad: np.ndarray, err: np.ndarray, *,
                      buffers: InputBuffers | None = None, threads: RowThreads | None = None) -> None:
        """Resample output rows ``y0:y1`` into ``data`` (float32), ``bad`` (bool) and ``err``
        (float32), each C-contiguous (y1 − y0, nx). ``buffers`` hold the source rows (default:
        this source's own); ``threads`` run row chunks in parallel (default: this call's own).
        Without an uncertainty plane or noise model ``err`` is 0 where valid."""
        ny, nx = self.shape
        if not 0 <= y0 < y1 <= ny:
            raise InputError(f"{self.name}: rows {y0}:{y1} are not a band of the {ny} output rows")
        lo, hi = self.needed_input_rows(y0, y1)
        if lo >= hi:
            data[...] = np.nan
            err[...] = np.nan
            bad[...] = True
            return
        if buffers is None:
            buffers = self._buffers = self._buffers or InputBuffers()
        band, mask, unc = self._read_band(lo, hi, buffers)
        flags = np.array([self._planes.mask is not None, self._planes.unc is not None, self._has_noise], np.bool_)
        src_ny, src_nx = self.source_shape

        near = buffers.near_view(hi - lo, band.shape[1])
        half = self._half

        def prepare(r0: int, r1: int) -> None:
            _prepare_band(band, mask, unc, flags, self._noise, r0, r1)

        def count(r0: int, r1: int) -> None:
            _footprint_counts(mask, 2 * half, near, r0, r1)

        table, table2 = self._table, self._table2
        if self._sheared:
            kernel = _SHEARED[2 * half]

            def run(r0: int, r1: int) -> None:
                kernel(band, mask, unc, lo, src_ny, src_nx, self.inverse, y0, table, table2, r0, r1, data, bad, err)
        else:
            kernel = _ROWS[2 * half]

            def run(r0: int, r1: int) -> None:
                kernel(band, mask, unc, near, lo, src_ny, src_nx, self.inverse, y0, table, table2, r0, r1,
                       data, bad, err)

        own = None
        if threads is None:
            threads = own = RowThreads(1 if (y1 - y0) * nx < 65536 else None)
        try:
            threads.run(prepare, hi - lo)
            if not self._sheared:
                threads.run(count, hi - lo)
            threads.run(run, y1 - y0)
        finally:
            if own is not None:
                own.close()

    def _band(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[:2] != (y0, y1):
            nx = self.shape[1]
            data = np.empty((y1 - y0, nx), np.float32)
            err = np.empty((y1 - y0, nx), np.float32)
            bad = np.empty((y1 - y0, nx), np.bool_)
            self._cache = None
            self.resample_into(y0, y1, data, bad, err)
            self._cache = (y0, y1, data, bad, err)
        return self._cache[2], self._cache[3], self._cache[4]

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Output rows ``y0:y1`` as float32 (NaN where invalid). Do not modify: the band is cached."""
        return self._band(y0, y1)[0]

    def read_mask_rows(self, y0: int, y1: int) -> np.ndarray:
        """bool (y1 − y0, nx): True where the output pixel has no valid value."""
        return self._band(y0, y1)[1]

    @property
    def read_uncertainty_rows(self) -> Callable[[int, int], np.ndarray] | None:
        """σ of output rows ``y0:y1`` (float32; ``sqrt(Σ w²σ²)``, no covariance), or None when
        the source has neither an uncertainty plane nor a :attr:`noise_model`."""
        if self._planes.unc is None and not self._has_noise:
            return None
        return self._uncertainty_rows

    def _uncertainty_rows(self, y0: int, y1: int) -> np.ndarray:
        return self._band(y0, y1)[2]

    def close(self) -> None:
        """Close the files this source opened (they reopen on demand) and drop the buffers."""
        self._planes.close()
        self._buffers = None
        self._cache = None

    def __enter__(self) -> ResampledRows:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"ResampledRows({self.name!r}, {self.source_shape[1]}x{self.source_shape[0]} ->"
                f" {self.shape[1]}x{self.shape[0]}, {self.interpolation})")


def default_workers() -> int:
    """Threads for row-parallel kernels: the CPUs this process may use, at most 8."""
    return max(1, min(8, cpus()))


class RowThreads:
    """Threads that run row chunks of a kernel that releases the GIL (numba ``nogil``); no
    numba threading layer is entered, so several may run at once. Use as a context manager."""

    def __init__(self, workers: int | None = None):
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self._pool = ThreadPoolExecutor(max_workers=self.workers) if self.workers > 1 else None

    def run(self, fn: Callable[[int, int], None], rows: int) -> None:
        """Call ``fn(r0, r1)`` over chunks covering rows ``0:rows`` and wait for all of them."""
        if self._pool is None or rows < 2 * _MIN_PARALLEL_ROWS:
            fn(0, rows)
            return
        chunks = min(4 * self.workers, rows // _MIN_PARALLEL_ROWS)
        edges = np.linspace(0, rows, chunks + 1).astype(int)
        futures = [self._pool.submit(fn, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)
                   if b > a]
        for future in futures:
            future.result()

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, the items shared among the threads (for work that
        releases the GIL for much of its time: reading files, numpy's sorts)."""
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> RowThreads:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ArrayPlanes:
    """Arrays served as a row source with planes (for :func:`resample_array`)."""

    def __init__(self, data: np.ndarray, mask: np.ndarray | None, uncertainty: np.ndarray | None):
        self.data = np.asarray(data)
        if self.data.ndim != 2:
            raise InputError(f"expected a 2-D image, got an array of shape {self.data.shape}")
        self.shape = self.data.shape
        self.header = None
        self.name = "array"
        for plane, what in ((mask, "mask"), (uncertainty, "uncertainty")):
            if plane is not None and np.shape(plane) != self.shape:
                raise InputError(f"the {what} has shape {np.shape(plane)}, the data {self.shape}")
        self.mask = None if mask is None else np.asarray(mask)
        self.uncertainty = None if uncertainty is None else np.asarray(uncertainty)
        if self.mask is None:
            self.read_mask_rows = None
        if self.uncertainty is None:
            self.read_uncertainty_rows = None

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.data[y0:y1], np.float32)

    def read_mask_rows(self, y0: int, y1: int) -> np.ndarray:
        return self.mask[y0:y1] != 0

    def read_uncertainty_rows(self, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.uncertainty[y0:y1], np.float32)


def _in_memory(obj: Any) -> _ArrayPlanes:
    """An ndarray, or a CCDData with its mask, uncertainty (as σ) and header, as a row source."""
    if isinstance(obj, np.ndarray):
        return _ArrayPlanes(obj, None, None)
    from astropy.io import fits
    from astropy.nddata import StdDevUncertainty

    unc = obj.uncertainty
    if unc is not None and not isinstance(unc, StdDevUncertainty):
        try:
            unc = unc.represent_as(StdDevUncertainty)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputError(f"cannot use an uncertainty of type {type(unc).__name__}; give a standard"
                             " deviation") from exc
    planes = _ArrayPlanes(np.asarray(obj.data), None if obj.mask is None else np.asarray(obj.mask),
                          None if unc is None else np.asarray(unc.array))
    planes.header = fits.Header(obj.header)
    return planes


def resample_array(data: np.ndarray, matrix: Any, out_shape: tuple[int, int], *,
                   interpolation: str = "lanczos3", mask: np.ndarray | None = None,
                   uncertainty: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Resample a whole array onto a grid of ``out_shape`` (the kernel of :class:`ResampledRows`).

    Parameters
    ----------
    data : ndarray (ny, nx)
    matrix : array-like (3, 3)
        Source → reference-grid pixel coordinates (module docstring).
    out_shape : (ny, nx)
    interpolation : {"lanczos3", "bicubic", "bilinear"}
    mask : ndarray (ny, nx), optional
        Non-zero/True: bad source pixel.
    uncertainty : ndarray (ny, nx), optional
        σ of each source pixel.

    Returns
    -------
    data : ndarray float32 (out_shape), NaN where invalid
    mask : ndarray bool (out_shape), True where invalid
    uncertainty : ndarray float32 (out_shape) or None (when none was given)
    """
    rows = ResampledRows(_ArrayPlanes(data, mask, uncertainty), matrix, out_shape, interpolation=interpolation)
    ny, nx = rows.shape
    out = np.empty((ny, nx), np.float32)
    err = np.empty((ny, nx), np.float32)
    bad = np.empty((ny, nx), np.bool_)
    rows.resample_into(0, ny, out, bad, err)
    return out, bad, (err if uncertainty is not None else None)
