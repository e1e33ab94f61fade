"""Pixel-wise combination of frames: per-frame zero/scale, extrema and iterative rejection, median/mean/sum.

The engine streams row tiles under a memory budget: every input is read once (plus a
small first pass over ``scale_region`` when frames are scaled) and a numba kernel
(:mod:`ccdcal._kernels`) scales, rejects and combines each tile in parallel.

Definitions (per output pixel; ``x_i`` is the value of frame ``i``, ``s_i``/``z_i``
its scale and zero, all arithmetic in float64, the result stored as float32):

1. Gather: NaN, ±inf and masked values are ignored. ``x'_i = s_i·x_i + z_i``.
2. Extrema (``clip_extrema=(nlow, nhigh)``): when more than ``nlow + nhigh`` values
   are left, the ``nlow`` lowest and ``nhigh`` highest scaled values are rejected
   (ties: the earlier frame counts as the lower); otherwise none are.
3. Iterative rejection (``reject`` with thresholds ``sigma_clip=(low, high)``) on
   the surviving scaled values, repeated while at least 3 values survive, until a
   pass rejects nothing or ``maxiters`` passes. A pass computes a centre ``c`` and a
   spread ``σ`` of the survivors and rejects ``x < c − low·σ`` (counted low) or
   ``x > c + high·σ`` (counted high); strict inequalities, so ``σ = 0`` rejects
   nothing.

   - ``sigma``: c = median or mean (``center``), σ = population std (ddof=0) about
     the mean — astropy ``sigma_clip`` with ``stdfunc="std"``.
   - ``mad``: σ = 1.482602218505602 · median(|x − median|) — astropy ``mad_std``.
   - ``winsorized``: σ0 = std; then repeat (at most 10 times, until σ changes by
     ≤ 0.05 %): clamp the survivors to ``c ± 1.5σ`` and set σ = 1.134 · std(clamped)
     (Siril's winsorized sigma clipping).
   - ``percentile``: c = median, σ = |c|: thresholds are fractions of the median
     (Siril's percentile clipping); a single pass.
   - ``linear-fit``: least-squares line ``a + b·k`` through the sorted survivors
     against their rank ``k``; centre of value k is the line, σ = mean |residual|
     (Siril's linear fit clipping).
   - ``ccdclip``: IRAF's noise model; for frame i, with
     ``level = max((c − z_i)/s_i − pedestal, 0)`` in ADU, σ_i = s_i · sqrt((rdnoise/gain)² +
     level/gain + (snoise·level)²), gain in e-/ADU, read noise in e-, snoise a fraction.
     ``pedestal`` is the part of the level that carries no photon noise (the bias level of
     raw frames; ``inf`` leaves read noise alone, right for biases). The spread comes from
     the detector, not from the sample, so one outlier is rejected at any frame count
     (the sample-σ methods cannot reject one outlier among n ≤ 7 values about the median,
     n ≤ 10 about the mean, at 3σ: see :func:`sample_sigma_can_reject`).
4. Combine the survivors: median (mean of the two middle values for an even count),
   weighted mean Σwx/Σw, or sum = N·mean (N = all frames, so rejection leaves no
   holes in a sum). A pixel with no survivor is NaN and masked.
5. Uncertainty: the sample std (ddof=1) of the survivors divided by sqrt(n) for a mean
   (``std·sqrt(Σw²)/Σw`` with weights), times 1.2533 for a median and N for a sum; 0
   where one value survived. When every input carries an uncertainty σ_i it is
   propagated instead: ``sqrt(Σ(w_i s_i σ_i)²)/Σw_i`` (×1.2533 median, ×N sum).

``compat="ccdproc"`` reproduces ``ccdproc.combine`` instead; see :func:`combine`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

METHODS = ("median", "mean", "sum")
SCALES = ("median", "mean", "clipped-mean", "none")
REJECTS = ("sigma", "mad", "winsorized", "percentile", "linear-fit", "ccdclip", "none")
CENTERS = ("median", "mean")
DEFAULT_THRESHOLDS = {"percentile": (0.2, 0.1)}  # every other algorithm: (3.0, 3.0)
DEFAULT_MEMORY = "1GiB"

_LEVEL_CODES = {"median": 0, "mean": 1, "clipped-mean": 2}
_REJECT_CODES = {"none": 0, "sigma": 1, "mad": 2, "winsorized": 3, "percentile": 4,
                 "linear-fit": 5, "ccdclip": 6}
_TILE_TARGET = 16 << 20  # bytes of one tile's buffers (see _tile_rows)
# numba's workqueue threading layer must not be entered from two Python threads at once
# (the pipeline may run several combines in a thread pool): kernels run under this lock.
_KERNEL_LOCK = threading.Lock()


@dataclass(frozen=True)
class CombineResult:
    """The result of :func:`combine`.

    Attributes
    ----------
    data : ndarray, float32, (ny, nx)
        The combined image, in the units of the (scaled) inputs.
    uncertainty : ndarray, float32, (ny, nx) or None
        Standard error of the combined value per pixel (NaN where masked).
    nlow_rejected, nhigh_rejected : ndarray, uint8 (fewer than 256 frames) or uint16, (ny, nx)
        How many values were rejected below / above the centre at each pixel.
    mask : ndarray, bool, (ny, nx)
        True where no value survived (the data there is NaN; 0 for a ccdproc sum).
    header : astropy.io.fits.Header
        NCOMBINE, scale factors, members, EXPTIME and MJD-OBS of the result.
    scales, zeros : ndarray, float64, (n,)
        The multiplicative and additive per-frame factors applied before rejection.
    member_rejected : ndarray, int64, (n, 2) or None
        Values of each input frame rejected low (column 0) and high (column 1), by
        extrema and iterative rejection together; None where the vectorised kernel ran
        (rejection ``none`` or ``sigma`` without weights), which does not track frames.
    """

    data: np.ndarray
    uncertainty: np.ndarray | None
    nlow_rejected: np.ndarray
    nhigh_rejected: np.ndarray
    mask: np.ndarray
    header: Any
    scales: np.ndarray = field(default_factory=lambda: np.ones(0))
    zeros: np.ndarray = field(default_factory=lambda: np.zeros(0))
    member_rejected: np.ndarray | None = None


def parse_memory(memory: str | int) -> int:
    """Bytes of a memory budget such as ``"1GiB"``, ``"256MiB"``, ``"500MB"`` or an int."""
    if isinstance(memory, (int, np.integer)) and not isinstance(memory, bool):
        if memory > 0:
            return int(memory)
        raise InputError(f"memory budget {memory!r} must be positive; write it like '1GiB' or '256MiB'")
    text = str(memory).strip().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "K": 1024,
             "M": 1024**2, "G": 1024**3, "B": 1}
    upper = text.upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                value = float(upper[: -len(unit)])
            except ValueError:
                break
            if value > 0 and math.isfinite(value):
                return int(value * units[unit])
            break
    try:
        value = float(text)
        if value > 0 and math.isfinite(value):
            return int(value)
    except ValueError:
        pass
    raise InputError(f"memory budget {memory!r} not understood; write it like '1GiB' or '256MiB'")


# -- row sources -----------------------------------------------------------------------------
class _ArrayRows:
    """An in-memory frame (ndarray, masked array or CCDData) served by rows."""

    def __init__(self, obj: Any, index: int):
        from astropy.io import fits

        self.path = None
        self.name = f"array {index}"
        self.header = None
        mask = None
        uncertainty = None
        if hasattr(obj, "data") and hasattr(obj, "unit") and hasattr(obj, "header"):  # CCDData
            data = np.asarray(obj.data)
            self.header = fits.Header(obj.header)
            mask = None if obj.mask is None else np.asarray(obj.mask, dtype=bool)
            if obj.uncertainty is not None:
                uncertainty = _std_uncertainty(obj.uncertainty)
        elif isinstance(obj, np.ma.MaskedArray):
            data = np.ma.getdata(obj)
            mask = np.ma.getmaskarray(obj)
        else:
            data = np.asarray(obj)
        if data.ndim != 2:
            raise InputError(f"{self.name}: expected a 2-D image, got an array of shape {data.shape}")
        self.data = data
        self.mask = mask
        self.uncertainty = uncertainty
        self.shape: tuple[int, int] = (int(data.shape[0]), int(data.shape[1]))

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        return np.asarray(self.data[y0:y1], dtype=np.float32)

    def read_uncertainty_rows(self, y0: int, y1: int) -> np.ndarray | None:
        if self.uncertainty is None:
            return None
        return np.asarray(self.uncertainty[y0:y1], dtype=np.float32)


def _std_uncertainty(uncertainty: Any) -> np.ndarray:
    from astropy.nddata import StdDevUncertainty

    if not isinstance(uncertainty, StdDevUncertainty):
        try:
            uncertainty = uncertainty.represent_as(StdDevUncertainty)
        except (AttributeError, TypeError, ValueError) as exc:
            raise InputError(f"cannot use an uncertainty of type {type(uncertainty).__name__};"
                             " give a standard deviation") from exc
    return np.asarray(uncertainty.array)


def _as_source(frame: Any, index: int) -> Any:
    from .frames import FrameSource

    if isinstance(frame, (str, os.PathLike)):
        return FrameSource(frame)
    if hasattr(frame, "read_rows") and hasattr(frame, "shape"):
        return frame
    return _ArrayRows(frame, index)


def _source_name(source: Any, index: int) -> str:
    name = getattr(source, "name", None)
    if isinstance(name, str) and name:
        return name
    path = getattr(source, "path", None)
    if isinstance(path, (str, os.PathLike)):
        return os.path.basename(os.fspath(path))
    return f"frame {index}"


def _fill(source: Any, y0: int, y1: int, out: np.ndarray, scratch: np.ndarray, name: str) -> None:
    if hasattr(source, "fill_rows"):  # FrameSource: decoded straight into the tile
        source.fill_rows(y0, y1, out, scratch)
        return
    rows = source.read_rows(y0, y1)
    if rows.shape != out.shape:
        raise InputError(f"{name}: read_rows({y0}, {y1}) gave shape {rows.shape}, expected {out.shape}")
    out[...] = rows


# -- scale and zero levels ----------------------------------------------------------------------
def _level(values: np.ndarray, how: str) -> float:
    from . import _kernels

    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return float(_kernels.frame_level(flat, flat.view(np.uint32), _LEVEL_CODES[how]))


def _region_levels(sources: Sequence[Any], names: Sequence[str], hows: Sequence[str],
                   region: tuple[slice, slice], budget: int) -> dict[str, np.ndarray]:
    """Levels of ``region`` of every source, one source at a time (a small first read).

    The region of one frame is held at a time (it may exceed a budget smaller than a frame);
    it is read in row chunks so that the rows around it cost no more than a third of the budget.
    """
    if _histogram_ready(sources, hows):
        return _histogram_levels(sources, names, hows, region, budget)
    rows, cols = region
    width = cols.stop - cols.start
    chunk = max(1, (budget // 3) // max(sources[0].shape[1] * 4, 1))
    values = np.empty((rows.stop - rows.start, width), np.float32)
    levels = {how: np.empty(len(sources)) for how in hows}
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        for y in range(rows.start, rows.stop, chunk):
            y1 = min(rows.stop, y + chunk)
            values[y - rows.start: y1 - rows.start] = source.read_rows(y, y1)[:, cols]
        for how in hows:
            levels[how][i] = _level(values, how)
        if not np.isfinite(levels[hows[0]][i]):
            raise InputError(f"{name}: no valid pixel in the scale region; choose another --scale-region")
    return levels


def _raw_blank(source: Any) -> int:
    """The BLANK of a raw 16-bit source as the kernels take it (NO_BLANK when there is none)."""
    from ._kernels import NO_BLANK

    return NO_BLANK if source.blank is None else int(source.blank)


def _histogram_ready(sources: Sequence[Any], hows: Sequence[str]) -> bool:
    """Whether :func:`_histogram_levels` can measure ``hows`` of every source."""
    return all(getattr(s, "integral", False) for s in sources) and set(hows) <= {"median", "mean"}


def _histogram_levels(sources: Sequence[Any], names: Sequence[str], hows: Sequence[str],
                      region: tuple[slice, slice], budget: int) -> dict[str, np.ndarray]:
    """Median and mean of ``region`` from a histogram of the raw 16-bit integers.

    For 16-bit images whose values are whole numbers (BSCALE 1, whole BZERO) the
    65536-bin histogram of the stored integers holds every order statistic, and the
    float64 sum of whole numbers is exact in any order: the levels are those
    :func:`_level` computes from the decoded values, bit for bit, for one pass over
    the raw bytes and no decoded copy of the frame.
    """
    from . import _kernels

    rows, cols = region
    nx = sources[0].shape[1]
    chunk = int(max(1, min(rows.stop - rows.start, (budget // 3) // (nx * 2), (4 << 20) // (nx * 2))))
    buf = np.empty((chunk, nx), np.uint16)
    hists = np.zeros((_kernels.HIST16_PARTS, 65536), np.int64)
    levels = {how: np.empty(len(sources)) for how in hows}
    for i, (source, name) in enumerate(zip(sources, names, strict=True)):
        hists[...] = 0
        blank = _raw_blank(source)
        for y in range(rows.start, rows.stop, chunk):
            y1 = min(rows.stop, y + chunk)
            source.read_raw(y, y1, buf[: y1 - y])
            _kernels.hist_be16(buf[: y1 - y], cols.start, cols.stop, blank, hists)
        counts = hists.sum(axis=0)
        total = int(counts.sum())
        if total == 0:
            raise InputError(f"{name}: no valid pixel in the scale region; choose another --scale-region")
        # the decoded value of every bin, as the float32 decoding gives it
        values = (np.arange(-32768, 32768, dtype=np.float32) * np.float32(source.bscale)
                  + np.float32(source.bzero)).astype(np.float64)
        for how in hows:
            if how == "mean":
                levels[how][i] = float(np.dot(counts.astype(np.float64), values)) / total
                continue
            cum = np.cumsum(counts)
            upper = values[int(np.searchsorted(cum, total // 2, side="right"))]
            if total % 2:
                levels[how][i] = upper
            else:
                levels[how][i] = (values[int(np.searchsorted(cum, total // 2 - 1, side="right"))] + upper) / 2.0
    return levels


def _factors(spec: Any, what: str, n: int, levels: np.ndarray | None) -> np.ndarray | None:
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, str):
        return levels
    values = np.asarray(spec, dtype=float)
    if values.shape != (n,):
        raise InputError(f"{what} has {values.size} values for {n} frames; give one per frame")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what} values must be finite numbers")
    return values


# -- options ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    method: str
    reject: str
    low: float
    high: float
    nlow: int
    nhigh: int
    center: str
    maxiters: int  # 0 = until nothing changes
    gain: float
    read_noise: float
    sensitivity_noise: float
    compat: str | None
    pedestal: float = 0.0


def _check_name(value: Any, allowed: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _pair(value: Any, what: str, kind: type) -> tuple[Any, Any]:
    try:
        low, high = value
        low, high = kind(low), kind(high)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be a pair (low, high), got {value!r}") from exc
    if kind is int and (low < 0 or high < 0):
        raise InputError(f"{what} counts must be 0 or more, got {value!r}")
    if kind is float and not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"{what} thresholds must be positive numbers, got {value!r}")
    return low, high


def _options(n: int, method: str, clip_extrema: Any, sigma_clip: Any, reject: str | None,
             center: str | None, maxiters: int | None, weights: Any, gain: float | None,
             read_noise: float | None, sensitivity_noise: float, zero: Any, compat: str | None,
             first_header: Any, pedestal: float = 0.0) -> _Options:
    _check_name(method, METHODS, "method")
    if compat not in (None, "ccdproc"):
        raise InputError(f"compat {compat!r} is not understood; the only choice is 'ccdproc'")
    nlow, nhigh = (0, 0) if clip_extrema is None else _pair(clip_extrema, "clip_extrema", int)
    if reject is None:
        reject = "sigma" if sigma_clip is not None else "none"
    _check_name(reject, REJECTS, "reject")
    if reject == "none" and sigma_clip is not None:
        raise InputError("sigma_clip thresholds were given with reject='none'; drop one of them")
    default = DEFAULT_THRESHOLDS.get(reject, (3.0, 3.0))
    low, high = default if sigma_clip is None else _pair(sigma_clip, "sigma_clip", float)
    if center is None:
        center = "mean" if compat else "median"
    _check_name(center, CENTERS, "center")
    if maxiters is not None and (not isinstance(maxiters, (int, np.integer)) or maxiters < 1):
        raise InputError(f"maxiters must be a whole number of at least 1, got {maxiters!r}")
    if weights is not None and method == "median":
        raise InputError("weights apply to mean and sum combines; use method='mean' or drop the weights")
    gain_value, noise_value = 1.0, 0.0
    if reject == "ccdclip":
        from .frames import header_value

        gain = gain if gain is not None else header_value(first_header, ("GAIN", "EGAIN", "CCDGAIN"))
        read_noise = read_noise if read_noise is not None else header_value(first_header, ("RDNOISE", "READNOIS", "RON"))
        if not isinstance(gain, (int, float)) or not gain > 0:
            raise InputError("ccdclip needs the gain in e-/ADU; pass gain= (--gain) or set GAIN in the headers")
        if not isinstance(read_noise, (int, float)) or read_noise < 0:
            raise InputError("ccdclip needs the read noise in e-; pass read_noise= (--read-noise) or set RDNOISE")
        gain_value, noise_value = float(gain), float(read_noise)
    if math.isnan(pedestal) or pedestal == -math.inf:
        raise InputError(f"pedestal must be a number of ADU (or inf), got {pedestal!r}")
    if not (sensitivity_noise >= 0 and math.isfinite(sensitivity_noise)):
        raise InputError(f"sensitivity_noise must be 0 or more, got {sensitivity_noise!r}")
    if compat:
        if reject not in ("sigma", "mad", "none"):
            raise InputError(f"compat='ccdproc' clips with 'sigma' or 'mad' only, not {reject!r}")
        if maxiters not in (None, 1):
            raise InputError("compat='ccdproc' clips in a single pass; leave maxiters unset")
        if zero is not None and not (isinstance(zero, str) and zero == "none"):
            raise InputError("compat='ccdproc' has no zero offsets; drop zero")
        maxiters = 1
    return _Options(method, reject, low, high, nlow, nhigh, center, maxiters or 0,
                    gain_value, noise_value, float(sensitivity_noise), compat, float(pedestal))


def sample_sigma_can_reject(n: int, threshold: float, *, center: str = "median") -> bool:
    """Whether a clip with σ from the same ``n`` values can ever reject one of them.

    With σ the population std of the sample (Samuelson's inequality), no value lies
    further than ``√(n−1)`` σ from the mean, and one outlier among ``n`` values no further
    than ``n/√(n−1)`` σ from the median. So at 3σ a sample-σ clip about the median never
    fires for n ≤ 7, about the mean for n ≤ 10, whatever the outlier's size.
    """
    if n < 3:
        return False
    bound = math.sqrt(n - 1) if center == "mean" else n / math.sqrt(n - 1)
    return bound > threshold


def _warn_unable_to_reject(n: int, opts: _Options) -> None:
    import warnings

    from .errors import CcdcalWarning

    n_left = n - opts.nlow - opts.nhigh if n > opts.nlow + opts.nhigh else n
    if opts.reject != "sigma" or opts.compat or n_left < 3:
        return
    if not sample_sigma_can_reject(n_left, min(opts.low, opts.high), center=opts.center):
        warnings.warn(
            f"sigma clipping at {opts.low:g}/{opts.high:g} about the {opts.center} cannot reject any value"
            f" among {n_left} values per pixel (σ comes from the same values); use reject='ccdclip' with"
            " the gain and read noise, or reject='mad'", CcdcalWarning, stacklevel=4)


def _tile_rows(n: int, shape: tuple[int, int], budget: int, extra_per_value: int, raw_per_row: int,
               value_bytes: int = 4, count_bytes: int = 2) -> int:
    ny, nx = shape
    outputs = ny * nx * (4 + 4 + 2 * count_bytes + 1)  # data, uncertainty, nlow, nhigh, mask
    # per row of a tile: the stack (float32, or raw 16-bit values; + mask/uncertainty), one raw
    # row of a file, and the float32 row a generic source returns before it is copied
    per_row = n * nx * (value_bytes + extra_per_value) + raw_per_row + nx * 4
    rows = (budget - outputs) // per_row
    # Tiles far smaller than a generous budget are faster: a tile that stays in the CPU
    # caches is decoded and combined without a trip to main memory, and fresh pages cost
    # a fault each (expensive in virtual machines); the buffers are reused for every tile.
    rows = min(rows, max(8, _TILE_TARGET // per_row))
    return int(max(1, min(ny, rows)))


# -- the engine ---------------------------------------------------------------------------------
def combine(
    frames: Sequence[Any],
    *,
    method: str = "median",
    scale: str | Sequence[float] | None = None,
    zero: str | Sequence[float] | None = None,
    scale_region: str | None = None,
    clip_extrema: tuple[int, int] | None = None,
    sigma_clip: tuple[float, float] | None = None,
    reject: str | None = None,
    center: str | None = None,
    maxiters: int | None = None,
    weights: Sequence[float] | None = None,
    gain: float | None = None,
    read_noise: float | None = None,
    sensitivity_noise: float = 0.0,
    pedestal: float = 0.0,
    memory: str | int = DEFAULT_MEMORY,
    compat: str | None = None,
) -> CombineResult:
    """Combine equal-shaped frames pixel by pixel, streaming row tiles under a memory budget.

    Order of operations (IRAF/Siril order): per-frame zero/scale → extrema rejection →
    iterative rejection of the surviving *scaled* values → combine. The exact
    definitions are in the module docstring of :mod:`ccdcal.combine`.

    Parameters
    ----------
    frames : sequence of path-like, FrameSource, ndarray, masked array, CCDData or row source
        Equal-shaped 2-D images. Paths and FrameSources are streamed from disk (each file
        read once); a *row source* is any object with ``shape`` (ny, nx) and
        ``read_rows(y0, y1)`` returning float32 rows (optionally ``header``, ``path``,
        ``read_uncertainty_rows``); its rows are requested in increasing tiles.
        NaN, infinite and masked pixels are ignored.
    method : {"median", "mean", "sum"}
        How the surviving values are combined. A sum is N × the mean of the survivors.
    scale : {"median", "mean", "clipped-mean", "none"}, sequence of float, or None
        Multiplicative per-frame scaling, applied before any rejection. A name measures
        each frame's level L_i in ``scale_region`` and multiplies frame i by
        ``mean(L) / L_i``; a sequence gives the factors. None (default): no scaling
        (right for bias and dark); flats want ``"median"``.
    zero : {"median", "mean", "clipped-mean", "none"}, sequence of float, or None
        Additive per-frame offset applied after scaling: ``z_i = mean(s·Z) − s_i·Z_i``
        for levels Z measured like ``scale``; a sequence gives the offsets. Default none.
    scale_region : str, optional
        IRAF section ``[x1:x2,y1:y2]`` (1-based, inclusive) where levels are measured;
        the whole frame by default.
    clip_extrema : (nlow, nhigh), optional
        Reject the ``nlow`` lowest and ``nhigh`` highest scaled values at each pixel
        (only where more than ``nlow + nhigh`` values are valid).
    sigma_clip : (low, high), optional
        Thresholds of the iterative rejection, in units of its spread (fractions of
        the median for ``percentile``). Giving them turns on ``reject="sigma"``.
    reject : {"sigma", "mad", "winsorized", "percentile", "linear-fit", "ccdclip", "none"}, optional
        The rejection algorithm. Default: "sigma" when ``sigma_clip`` is given, else none.
        Without ``sigma_clip`` its thresholds default to (3, 3) ((0.2, 0.1) for percentile).
    center : {"median", "mean"}, optional
        Centre of the rejection (default median; mean with ``compat="ccdproc"``).
    maxiters : int, optional
        Maximum rejection passes; default: until a pass rejects nothing.
    weights : sequence of float, optional
        Per-frame weights of a mean or sum.
    gain, read_noise, sensitivity_noise : float, optional
        ``ccdclip`` noise model: e-/ADU, e- and a fraction. Gain and read noise default
        to the first header's GAIN and RDNOISE.
    pedestal : float
        ``ccdclip``: ADU of each frame's level that carry no photon noise (the bias level
        of raw frames); ``math.inf`` for biases, whose noise is read noise alone.
    memory : str or int
        Budget for the engine's own arrays (tiles and result), e.g. ``"256MiB"``.
    compat : {"ccdproc"}, optional
        Reproduce ``ccdproc.combine``: extrema rejection ranks the raw (unscaled) values
        of all frames, NaN last and masked ones included; one sigma-clipping pass over
        all raw values of the pixel (earlier rejections included; ``center`` default
        mean, spread std or MAD-std; where any value is NaN ccdproc rejects the whole
        pixel with std, and nothing with MAD-std, and so does compat); then the
        scaled survivors are combined with ccdproc's statistics (median uncertainty =
        MAD-std/sqrt(n), mean/sum with the population std; weighted mean divided by
        the sum of all weights; an empty sum is 0).

    Returns
    -------
    CombineResult
    """
    if isinstance(frames, (str, os.PathLike)) or not isinstance(frames, Sequence):
        frames = list(frames) if not isinstance(frames, (str, os.PathLike)) else [frames]
    if len(frames) == 0:
        raise InputError("nothing to combine: no frames given")
    budget = parse_memory(memory)
    from .frames import FrameSource

    sources = [_as_source(frame, i) for i, frame in enumerate(frames)]
    try:
        return _combine_sources(sources, frames, method=method, scale=scale,
                                zero=zero, scale_region=scale_region, clip_extrema=clip_extrema,
                                sigma_clip=sigma_clip, reject=reject, center=center,
                                maxiters=maxiters, weights=weights, gain=gain,
                                read_noise=read_noise, sensitivity_noise=sensitivity_noise,
                                pedestal=pedestal, budget=budget, compat=compat)
    finally:
        for source in sources:
            if isinstance(source, FrameSource):  # files opened here; a caller's reopen on demand
                source.close()


def _combine_sources(sources, frames, *, method, scale, zero, scale_region,
                     clip_extrema, sigma_clip, reject, center, maxiters, weights, gain, read_noise,
                     sensitivity_noise, pedestal, budget, compat) -> CombineResult:
    n = len(sources)
    names = [_source_name(s, i) for i, s in enumerate(sources)]
    shape = tuple(int(v) for v in sources[0].shape)
    for source, name in zip(sources, names, strict=True):
        if tuple(source.shape) != shape:
            raise InputError(f"{name} is {source.shape[1]}x{source.shape[0]} but {names[0]} is"
                             f" {shape[1]}x{shape[0]}; combine frames of one size")
    headers = [getattr(s, "header", None) for s in sources]
    opts = _options(n, method, clip_extrema, sigma_clip, reject, center, maxiters, weights, gain,
                    read_noise, sensitivity_noise, zero, compat, headers[0], pedestal)
    _warn_unable_to_reject(n, opts)

    # per-frame factors (a first, small pass over the scale region)
    hows = [h for h in (scale, zero) if isinstance(h, str) and h != "none"]
    for how in hows:
        _check_name(how, SCALES, "scale" if how is scale else "zero")

    # levels from raw histograms need almost no memory: measure them while the result's
    # pages are faulted in (below); other sources are measured first, so that the region
    # they hold is freed before the result is allocated
    late = _histogram_ready(sources, hows)
    if not late:
        scales, zeros, weight_values = _frame_factors(sources, names, shape, hows, scale, zero, weights,
                                                      scale_region, budget)

    # which optional planes travel with the tiles
    has_valid = any(getattr(s, "mask", None) is not None for s in sources if isinstance(s, _ArrayRows))
    has_unc = opts.compat is None and all(
        (isinstance(s, _ArrayRows) and s.uncertainty is not None)
        or (not isinstance(s, _ArrayRows) and hasattr(s, "read_uncertainty_rows"))
        for s in sources)
    need_index = weights is not None or has_unc or opts.reject == "ccdclip"
    # the vectorised kernel serves the common case; 16-bit files then travel as raw bytes
    fast = opts.compat is None and opts.reject in ("none", "sigma") and not need_index
    # the general kernel follows frame indices whenever it rejects, to count rejections per member
    general = opts.compat is None and not fast
    need_index = need_index or (general and (opts.reject != "none" or opts.nlow + opts.nhigh > 0))
    raw16 = fast and all(getattr(s, "raw16", False) for s in sources)
    raw_per_row = 0 if raw16 else max(
        (getattr(s, "raw_bytes_per_row", 0) for s in sources), default=0)
    rows = _tile_rows(n, shape, budget, (1 if has_valid else 0) + (4 if has_unc else 0), raw_per_row,
                      value_bytes=2 if raw16 else 4, count_bytes=_count_dtype(n).itemsize)

    ny, nx = shape
    data = np.empty(shape, np.float32)
    err = np.empty(shape, np.float32)
    nlow = np.empty(shape, _count_dtype(n))
    nhigh = np.empty(shape, _count_dtype(n))
    mask = np.empty(shape, bool)
    stack = np.empty((n, rows, nx), np.uint16 if raw16 else np.float32)
    valid = np.ones((n, rows, nx) if has_valid else (1, 1, 1), np.uint8)
    unc = np.zeros((n, rows, nx) if has_unc else (1, 1, 1), np.float32)
    scratch = np.empty(rows * raw_per_row, np.uint8)
    # Fresh pages cost a fault each (dear in virtual machines); touch the result arrays in a
    # thread (numpy releases the GIL) while this one loads the kernels and reads the first tile.
    prefault = threading.Thread(target=_touch, args=([data, err, nlow, nhigh, mask],), daemon=True)
    prefault.start()
    from . import _kernels

    if late:
        try:
            scales, zeros, weight_values = _frame_factors(sources, names, shape, hows, scale, zero, weights,
                                                          scale_region, budget)
        except BaseException:
            prefault.join()
            raise
    if raw16:
        dscale = np.array([s.bscale for s in sources], np.float32)
        dzero = np.array([s.bzero for s in sources], np.float32)
        dblank = np.array([_raw_blank(s) for s in sources], np.int64)
    else:
        dscale, dzero, dblank = np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int64)
    if opts.compat:
        iparams = np.array([_method_code(opts.method), opts.nlow, opts.nhigh,
                            int(clip_extrema is not None), int(opts.reject != "none"),
                            int(opts.center == "mean"), int(opts.reject == "mad"), int(has_valid),
                            int(weights is not None)], np.int64)
        fparams = np.array([opts.low, opts.high], np.float64)
    else:
        iparams = np.array([_method_code(opts.method), opts.nlow, opts.nhigh,
                            _REJECT_CODES[opts.reject], int(opts.center == "mean"), opts.maxiters,
                            int(has_valid), int(has_unc), int(need_index)], np.int64)
        fparams = np.array([opts.low, opts.high, opts.gain, opts.read_noise,
                            opts.sensitivity_noise, opts.pedestal], np.float64)
    pairs = _kernels.sorting_network(n)
    nchunks = -(-nx // _kernels.CHUNK)
    member_counts = np.zeros((n, 2), np.int64) if general and need_index else None
    member_jobs = np.zeros((rows * nchunks, n, 2) if member_counts is not None else (1, 1, 2), np.int32)
    # float32 working values when exact (no scaling), else float64
    proto = np.zeros(1, np.float64 if (np.any(scales != 1.0) or np.any(zeros != 0.0)) else np.float32)

    for y0 in range(0, ny, rows):
        y1 = min(ny, y0 + rows)
        h = y1 - y0
        tile = stack[:, :h]
        for i, (source, name) in enumerate(zip(sources, names, strict=True)):
            if raw16:
                source.read_raw(y0, y1, tile[i])
            else:
                _fill(source, y0, y1, tile[i], scratch, name)
            if has_valid:
                m = getattr(source, "mask", None) if isinstance(source, _ArrayRows) else None
                valid[i, :h] = 1 if m is None else ~m[y0:y1]
            if has_unc:
                unc[i, :h] = source.read_uncertainty_rows(y0, y1)
        vtile = valid[:, :h] if has_valid else valid
        if prefault is not None:
            prefault.join()
            prefault = None
        out = (data[y0:y1], err[y0:y1], nlow[y0:y1], nhigh[y0:y1])
        with _KERNEL_LOCK:
            if opts.compat:
                _kernels.combine_tile_ccdproc(tile, vtile, scales, weight_values, iparams, fparams, *out)
            elif fast:
                _kernels.combine_tile_sorted(tile, vtile, scales, zeros, pairs, iparams, fparams, proto,
                                             dscale, dzero, dblank, *out)
            else:
                job_counts = member_jobs[: h * nchunks]
                job_counts[...] = 0
                _kernels.combine_tile(tile, vtile, unc[:, :h] if has_unc else unc, scales, zeros,
                                      weight_values, pairs, iparams, fparams, *out, job_counts)
                if member_counts is not None:
                    member_counts += job_counts.sum(axis=0, dtype=np.int64)
        np.isnan(err[y0:y1], out=mask[y0:y1])
    del stack, valid, unc, scratch

    header = combined_header(headers, method=opts.method, scales=scales, frames=frames,
                             zeros=zeros, names=names)
    _describe(header, opts, clip_extrema, scale, scale_region)
    return CombineResult(data=data, uncertainty=err, nlow_rejected=nlow, nhigh_rejected=nhigh,
                         mask=mask, header=header, scales=scales, zeros=zeros,
                         member_rejected=member_counts)


def _frame_factors(sources: Sequence[Any], names: Sequence[str], shape: tuple[int, int], hows: Sequence[str],
                   scale: Any, zero: Any, weights: Any, scale_region: str | None,
                   budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (scales, zeros, weights): given, or measured on ``scale_region`` (a first pass)."""
    from .sections import to_slices

    n = len(sources)
    levels: dict[str, np.ndarray] = {}
    if hows:
        region = to_slices(scale_region, shape) if scale_region else (slice(0, shape[0]), slice(0, shape[1]))
        levels = _region_levels(sources, names, list(dict.fromkeys(hows)), region, budget)
    scale_levels = levels.get(scale) if isinstance(scale, str) else None
    if scale_levels is not None:
        if np.any(scale_levels <= 0):
            bad = names[int(np.argmin(scale_levels))]
            raise InputError(f"{bad}: its {scale} level is {scale_levels.min():g}, so it cannot be"
                             " scaled; remove it or drop --scale")
        scale_levels = scale_levels.mean() / scale_levels
    scales = _factors(scale, "scale", n, scale_levels)
    if scales is not None and np.any(scales <= 0):
        raise InputError("scale factors must be positive")
    scales = np.ones(n) if scales is None else scales
    zero_levels = levels.get(zero) if isinstance(zero, str) else None
    if zero_levels is not None:
        scaled = scales * zero_levels
        zero_levels = scaled.mean() - scaled
    zeros = _factors(zero, "zero", n, zero_levels)
    zeros = np.zeros(n) if zeros is None else zeros
    weight_values = _factors(weights, "weights", n, None)
    if weight_values is not None and np.any(weight_values <= 0):
        raise InputError("weights must be positive numbers")
    weight_values = np.ones(n) if weight_values is None else weight_values
    return scales, zeros, weight_values


def _count_dtype(n: int) -> np.dtype:
    """The smallest unsigned integer dtype that counts rejections of ``n`` frames."""
    return np.dtype(np.uint8 if n < 256 else np.uint16)


def _touch(arrays: Sequence[np.ndarray]) -> None:
    for array in arrays:
        array[...] = 0


def _method_code(method: str) -> int:
    return {"median": 0, "mean": 1, "sum": 2}[method]


def _describe(header: Any, opts: _Options, clip_extrema: Any, scale: Any, scale_region: Any) -> None:
    parts = [opts.method]
    if scale is not None and not (isinstance(scale, str) and scale == "none"):
        what = scale if isinstance(scale, str) else "given factors"
        parts.append(f"scaled by {what}" + (f" of {scale_region}" if scale_region and isinstance(scale, str) else ""))
    if clip_extrema is not None:
        parts.append(f"minmax {opts.nlow}/{opts.nhigh}")
    if opts.reject != "none":
        parts.append(f"{opts.reject} {opts.low:g}/{opts.high:g}")
    if opts.compat:
        parts.append(f"compat {opts.compat}")
    header["HISTORY"] = "ccdcal combine: " + ", ".join(parts)


def _frame_name(frame: Any, index: int) -> str:
    path = getattr(frame, "path", frame)
    if isinstance(path, (str, os.PathLike)):
        return os.path.basename(os.fspath(path))
    return f"array {index}"


def combined_header(headers: Sequence[Any], *, method: str, scales: np.ndarray, frames: Sequence[Any],
                    zeros: np.ndarray | None = None, names: Sequence[str] | None = None) -> Any:
    """Header of a combined frame.

    The first input's cards (storage keywords removed), plus NCOMBINE, COMBMETH, the
    members (IMCMBnnn) with their scale factors (SCALnnnn) and zero offsets (ZEROnnnn,
    when any is non-zero) for the first 999 members, and the time keywords of the
    result: EXPTIME is the members' mean for mean/median and their total for sum (removed
    when a member lacks it). For mean/median, MJD-OBS/DATE-OBS is the mean of the members'
    starts (so MJD-OBS + EXPTIME/2 is their mean mid-exposure); for sum it is the
    earliest start, with MJD-END the latest end. MJD-AVG/DATE-AVG is the mean
    mid-exposure time (exposure-weighted for sum).
    """
    from astropy.io import fits
    from astropy.time import Time

    from .frames import clean_header, header_value

    first = next((h for h in headers if h is not None), None)
    out = fits.Header(clean_header(first))
    n = len(headers)
    if names is None:
        names = [_frame_name(frame, i) for i, frame in enumerate(frames)]
    out["NCOMBINE"] = (n, "number of frames combined")
    out["COMBMETH"] = (method, "ccdcal combine method")

    exptimes = [header_value(h, ("EXPTIME", "EXPOSURE", "ITIME", "EXPTIM")) for h in headers]
    known = [float(e) for e in exptimes if isinstance(e, (int, float)) and not isinstance(e, bool)]
    exptime = None
    if n and len(known) == n:
        exptime = float(np.sum(known)) if method == "sum" else float(np.mean(known))
        out["EXPTIME"] = (exptime, "[s] exposure of the combined frame")
    else:
        for key in ("EXPTIME", "EXPOSURE"):
            if key in out:
                del out[key]

    starts = []
    for h in headers:
        mjd = header_value(h, ("MJD-OBS", "MJD_OBS"))
        if isinstance(mjd, (int, float)) and not isinstance(mjd, bool):
            starts.append(float(mjd))
            continue
        date = header_value(h, ("DATE-OBS", "DATE_OBS"))
        if isinstance(date, str):
            try:
                starts.append(Time(date.replace(" ", "T"), format="isot", scale="utc").mjd)
            except ValueError:
                pass
    if n and len(starts) == n:
        durations = np.array(known if len(known) == n else [0.0] * n) / 86400.0
        begin = np.array(starts)
        mids = begin + durations / 2
        if method == "sum":
            start = float(begin.min())
            out["MJD-OBS"] = (start, "[d] start of the earliest member")
            out["MJD-END"] = (float((begin + durations).max()), "[d] end of the latest member")
            total = durations.sum()
            avg = float(np.sum(mids * durations) / total) if total > 0 else float(mids.mean())
        else:
            start = float(begin.mean())
            out["MJD-OBS"] = (start, "[d] mean of the members' starts")
            avg = float(mids.mean())
        out["DATE-OBS"] = (Time(start, format="mjd", scale="utc").isot, "start, as MJD-OBS")
        out["MJD-AVG"] = (avg, "[d] mean mid-exposure time of the members")
        out["DATE-AVG"] = (Time(avg, format="mjd", scale="utc").isot, "mean mid-exposure time")

    zeros = np.zeros(n) if zeros is None else np.asarray(zeros)
    any_zero = bool(np.any(zeros != 0))
    for i in range(min(n, 999)):
        out[f"IMCMB{i + 1:03d}"] = (str(names[i])[-68:], "combined input")
        out[f"SCAL{i + 1:04d}"] = (float(scales[i]), "scale factor of input")
        if any_zero:
            out[f"ZERO{i + 1:04d}"] = (float(zeros[i]), "zero offset of input")
    if n > 999:
        out["COMMENT"] = f"members beyond the 999th ({n - 999}) are not listed"
    return out

