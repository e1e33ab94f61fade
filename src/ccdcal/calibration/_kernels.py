"""numba kernels of the calibration arithmetic and of finishing a master: one pass in float32
per frame, no frame-sized temporaries (:mod:`ccdcal.calibration.arithmetic`,
:mod:`ccdcal.calibration.masters`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .._shared.jit import njit


@njit(cache=True, nogil=True)
def _finite_or_zero(v):
    """``np.nan_to_num(v, nan=0.0)`` for one float32: NaN -> 0, ±inf -> ±float32 max."""
    if np.isnan(v):
        return np.float32(0.0)
    if np.isinf(v):
        return np.float32(3.4028234663852886e38) if v > 0 else np.float32(-3.4028234663852886e38)
    return v


@njit(cache=True, inline="always")
def _pixel_sigma(s, gain, rn2, b_unc, d_unc, dark_scale, f, f_unc, calibrated, has_bias, has_dark, has_flat, has_fu):
    """σ of one calibrated pixel from its signal above bias ``s`` (the formula of
    :func:`ccdcal.calibration.arithmetic.calibrated_uncertainty`, in float32, in its order)."""
    zero = np.float32(0.0)
    var = s if (s > zero or np.isnan(s)) else zero
    var = np.float32(var / gain)
    var = np.float32(var + rn2)
    if has_bias:
        b = _finite_or_zero(b_unc)
        var = np.float32(var + np.float32(b * b))
    if has_dark:
        d = np.float32(dark_scale * _finite_or_zero(d_unc))
        var = np.float32(var + np.float32(d * d))
    if has_flat:
        var = np.float32(var / np.float32(f * f))
        if has_fu:
            t = np.float32(_finite_or_zero(f_unc) / f)
            t = np.float32(_finite_or_zero(calibrated) * t)
            var = np.float32(var + np.float32(t * t))
    return np.sqrt(var)


@njit(parallel=True, cache=True)
def calibrated_sigma(signal, gain, rn2, bias_unc, dark_unc, dark_scale, flat, flat_unc, calibrated, flags, out):
    """σ of each pixel of a calibrated frame (the kernel of
    :func:`ccdcal.calibration.arithmetic.calibrated_uncertainty`): one pass in float32, no temporaries.
    ``flags``: has bias σ, has dark σ, has flat, has flat σ and calibrated values."""
    ny, nx = signal.shape
    has_bias, has_dark, has_flat, has_fu = flags[0], flags[1], flags[2], flags[3]
    for y in prange(ny):
        for x in range(nx):
            out[y, x] = _pixel_sigma(
                signal[y, x], gain, rn2, bias_unc[y, x] if has_bias else np.float32(0.0),
                dark_unc[y, x] if has_dark else np.float32(0.0), dark_scale,
                flat[y, x] if has_flat else np.float32(1.0), flat_unc[y, x] if has_fu else np.float32(0.0),
                calibrated[y, x] if has_fu else np.float32(0.0), has_bias, has_dark, has_flat, has_fu)


@njit(parallel=True, cache=True)
def calibrate_pass(data, bias, dark, dark_scale, flat, flat_floor, gain, rn2, bias_unc, dark_unc, flat_unc, flags,
                   sigma, pedestal):
    """A frame's bias, dark and flat and its σ in one pass, in place on ``data`` (float32, after
    overscan and trimming): per pixel the float32 operations of ``data -= bias``,
    ``data -= float32(scale)·dark``, ``data /= flat`` (numpy's rounding, so the same values),
    then :func:`_pixel_sigma` of the signal above bias (less ``pedestal``: the black level a night
    without biases leaves in, which is no charge) into ``sigma``. No frame-sized temporary.
    A flat pixel that is not finite or below the float32 ``flat_floor`` counts as 1
    (:func:`ccdcal.calibration.arithmetic.safe_flat`, applied here: no floored copy of the flat).

    ``flags``: has bias, has dark (and a scale ≠ 0), has flat, σ wanted, has bias σ, has dark σ
    (and a scale ≠ 0), has flat σ; arrays that are absent may be any 2-D float32 placeholder.
    """
    ny, nx = data.shape
    has_bias, has_dark, has_flat, want = flags[0], flags[1], flags[2], flags[3]
    has_bu, has_du, has_fu = flags[4], flags[5], flags[6]
    for y in prange(ny):
        for x in range(nx):
            v = data[y, x]
            if has_bias:
                v = np.float32(v - bias[y, x])
            s = np.float32(v - pedestal)
            if has_dark:
                v = np.float32(v - np.float32(dark_scale * dark[y, x]))
            f = np.float32(1.0)
            if has_flat:
                f = flat[y, x]
                if not (np.isfinite(f) and f >= flat_floor):
                    f = np.float32(1.0)
                v = np.float32(v / f)
            data[y, x] = v
            if want:
                sigma[y, x] = _pixel_sigma(
                    s, gain, rn2, bias_unc[y, x] if has_bu else np.float32(0.0),
                    dark_unc[y, x] if has_du else np.float32(0.0), dark_scale, f,
                    flat_unc[y, x] if has_fu else np.float32(0.0), v, has_bu, has_du, has_flat, has_fu)


@njit(parallel=True, cache=True)
def flag_at_or_above(values, level, mask, bit):
    """``mask[values >= level] |= bit`` without a frame-sized boolean temporary."""
    ny, nx = values.shape
    for y in prange(ny):
        for x in range(nx):
            if values[y, x] >= level:
                mask[y, x] |= bit


@njit(parallel=True, cache=True)
def finish_planes(data, unc, has_unc, nodata, level, is_flat, flat_floor, no_data_bit, low_flat_bit, mask):
    """A combined master's planes finished in place (the kernel of
    :func:`ccdcal.calibration.masters.finish_master`), float32 as numpy's element-wise steps:

    - ``mask`` = ``no_data_bit`` where ``nodata``;
    - a flat: ``data /= level``; its weak pixels (not finite or below ``flat_floor``, with data)
      get ``low_flat_bit``; what is not finite becomes 1;
    - a bias or dark: what is not finite becomes 0;
    - ``unc`` (when ``has_unc``): ``/= level`` for a flat, then non-finite values become 0.
    """
    ny, nx = data.shape
    for y in prange(ny):
        for x in range(nx):
            bad = nodata[y, x]
            m = no_data_bit if bad else np.uint8(0)
            v = data[y, x]
            if is_flat:
                v = np.float32(v / level)
                if not bad and (not np.isfinite(v) or v < flat_floor):
                    m |= low_flat_bit
                data[y, x] = v if np.isfinite(v) else np.float32(1.0)
            else:
                data[y, x] = v if np.isfinite(v) else np.float32(0.0)
            mask[y, x] = m
            if has_unc:
                u = unc[y, x]
                if is_flat:
                    u = np.float32(u / level)
                unc[y, x] = u if np.isfinite(u) else np.float32(0.0)
