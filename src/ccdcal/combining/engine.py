"""Pixel-wise combination of frames: per-frame zero/scale, extrema and iterative rejection, median/mean/sum.

The engine streams row tiles under a memory budget: every input is read once (plus a
small first pass over ``scale_region`` when frames are scaled) and a numba kernel
(:mod:`ccdcal.combining._kernels`) scales, rejects and combines each tile in parallel.
:func:`combine` chains three public pieces: :class:`CombineOptions` (every choice, validated
once), :func:`measure_factors` (the first pass: per-frame scales, zeros and weights) and
:func:`combine_rows` (any band of output rows, independent of the others and bit for bit
the same rows as :func:`combine`). Frames are paths, arrays or any :class:`RowSource`.

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
   - ``mad``: σ = 1.482602218505602 · median(|x − median|) (:data:`ccdcal._shared.robust.MAD_TO_STD`)
     — astropy ``mad_std``.
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
     n ≤ 10 about the mean, at 3σ: see :func:`sample_sigma_can_reject`). A pass that
     would reject every value rejects none (IRAF's ``nkeep``): an even count whose two
     middle values lie further apart than the model allows keeps them.
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

import operator
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._shared import pool
from .._shared._kernels import HIST16_PARTS, NO_BLANK, hist_be16
from .._shared.pool import LocalExecutor  # its threads restore the warning filters after
from .._shared.progress import ProgressOption, resolve_progress, steps
from ..errors import CcdcalWarning, InputError
from ..io.headers import combined_header
from ..sections import to_slices
from . import _kernels, _level_kernels
from .options import (
    DEFAULT_MEMORY,
    CombineOptions,
    given_factors,
    parse_memory,
    sample_sigma_can_reject,
)
from .results import CombineResult, FrameFactors, TileResult
from .sources import Inputs, frame_list, opened

_LEVEL_CODES = {"median": 0, "mean": 1, "clipped-mean": 2}
_TILE_TARGET = 16 << 20  # bytes of one tile's buffers (see _tile_rows)
# numba's workqueue threading layer must not be entered from two Python threads at once
# (the pipeline may run several combines in a thread pool): kernels run under this lock.
_KERNEL_LOCK = threading.Lock()


def _warn_unable_to_reject(n: int, opts: CombineOptions) -> None:
    import warnings

    n_left = n - opts.nlow - opts.nhigh if n > opts.nlow + opts.nhigh else n
    if opts.reject != "sigma" or opts.compat or n_left < 3:
        return
    if not sample_sigma_can_reject(n_left, min(opts.low, opts.high), center=opts.center):
        warnings.warn(
            f"sigma clipping at {opts.low:g}/{opts.high:g} about the {opts.center} cannot reject any value"
            f" among {n_left} values per pixel (σ comes from the same values); use reject='ccdclip' with"
            " the gain and read noise, or reject='mad'", CcdcalWarning, stacklevel=3)


# -- per-frame factors: the first, small pass -----------------------------------------------------
def measure_factors(frames: Sequence[Any], options: CombineOptions, *,
                    memory: str | int = DEFAULT_MEMORY, sample_pixels: int | None = None) -> FrameFactors:
    """The per-frame scales, zeros and weights of a combine: its first, small pass.

    Levels named by ``options.scale`` and ``options.zero`` are measured on
    ``options.scale_region`` of every frame, one frame at a time (16-bit integer files from
    a histogram of their raw values); given values are taken as they are. Measure once,
    then combine any band of rows with :func:`combine_rows`.

    Parameters
    ----------
    frames : sequence of path-like, FrameSource, ndarray, masked array, CCDData or RowSource
        As for :func:`combine`.
    options : CombineOptions
    memory : str or int
        Budget for what one frame's region costs to read, e.g. ``"256MiB"``.
    sample_pixels : int, optional
        Measure the levels of frames that are not raw integers (whose histogram gives them
        exactly in one pass) on evenly spaced bands of rows holding about this many pixels
        (:func:`region_level_rows`) instead of the whole region.

    Returns
    -------
    FrameFactors
    """
    frames = frame_list(frames)
    budget = parse_memory(memory)
    with opened(frames) as inputs:
        options.check_frames(inputs.n)
        return _measure(inputs, options, budget, sample_pixels)


def _level_names(options: CombineOptions) -> list[str]:
    """The levels to measure: the names of ``scale`` and ``zero``, in that order."""
    return [how for how in (options.scale, options.zero) if isinstance(how, str)]


def _measure(inputs: Inputs, options: CombineOptions, budget: int, sample_pixels: int | None = None,
             progress: ProgressOption = None) -> FrameFactors:
    n, shape, hows = inputs.n, inputs.shape, _level_names(options)
    levels: dict[str, np.ndarray] = {}
    if hows:
        region = (to_slices(options.scale_region, shape) if options.scale_region
                  else (slice(0, shape[0]), slice(0, shape[1])))
        levels = _region_levels(inputs, list(dict.fromkeys(hows)), region, budget, sample_pixels, progress)
    scales = np.ones(n)
    if isinstance(options.scale, str):
        scale_levels = levels[options.scale]
        if np.any(scale_levels <= 0):
            bad = inputs.names[int(np.argmin(scale_levels))]
            raise InputError(f"{bad}: its {options.scale} level is {scale_levels.min():g}, so it cannot be"
                             " scaled; remove it or drop --scale")
        scales = scale_levels.mean() / scale_levels
    elif options.scale is not None:
        scales = given_factors(options.scale, "scale", n)
    zeros = np.zeros(n)
    if isinstance(options.zero, str):
        scaled = scales * levels[options.zero]
        zeros = scaled.mean() - scaled
    elif options.zero is not None:
        zeros = given_factors(options.zero, "zero", n)
    weights = given_factors(options.weights, "weights", n)
    return FrameFactors(scales=scales, zeros=zeros, weights=np.ones(n) if weights is None else weights)


def _level(values: np.ndarray, how: str) -> float:
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    return float(_level_kernels.frame_level(flat, flat.view(np.uint32), _LEVEL_CODES[how]))


LEVEL_SAMPLE_BAND = 8  # rows read together by a level sample (region_level_rows)


def region_level_rows(rows: slice, width: int, sample_pixels: int | None) -> list[tuple[int, int]]:
    """The bands of rows a level of ``rows`` is measured on: the whole range, or one band of
    :data:`LEVEL_SAMPLE_BAND` rows at the middle of each of equal strata, about
    ``sample_pixels`` pixels in all (the midpoint rule: a smooth vignetting profile is sampled
    without the bias of its edge rows).

    The scale factors of member flats need their relative levels, not every pixel: the median
    of n = 2^21 pixels spread over the whole region estimates the region's median to about
    1.25·σ/√n (σ: the spread of the region's values, noise and vignetting together), ~1e-4 of
    the level for a flat whose pixels spread by 10 % (measured: 3e-5 on a 25 %-vignetted flat,
    tests/combining/test_sampled_levels.py), below the per-pixel noise of a master of 20 such flats.
    """
    height, band = rows.stop - rows.start, LEVEL_SAMPLE_BAND
    wanted = None if sample_pixels is None else max(band, sample_pixels // max(width, 1))
    if wanted is None or wanted >= height:
        return [(rows.start, rows.stop)]
    nbands = max(1, wanted // band)
    starts = [rows.start + min(height - band, max(0, (2 * k + 1) * height // (2 * nbands) - band // 2))
              for k in range(nbands)]
    return [(y, y + band) for y in starts]


def _region_levels(inputs: Inputs, hows: Sequence[str], region: tuple[slice, slice],
                   budget: int, sample_pixels: int | None = None,
                   progress: ProgressOption = None) -> dict[str, np.ndarray]:
    """Levels of ``region`` of every source, one source at a time (a small first read).

    The region (or its row sample, :func:`region_level_rows`) of one frame is held at a time
    (it may exceed a budget smaller than a frame); it is read in row chunks so that the rows
    around it cost no more than a third of the budget.
    """
    if _histogram_ready(inputs, hows):
        return _histogram_levels(inputs, hows, region, budget, progress)
    rows, cols = region
    width = cols.stop - cols.start
    chunk = max(1, (budget // 3) // max(inputs.shape[1] * 4, 1))
    bands = region_level_rows(rows, width, sample_pixels)
    size = sum(y1 - y0 for y0, y1 in bands)
    levels = {how: np.empty(inputs.n) for how in hows}
    local = threading.local()

    def measure(i: int) -> None:
        values = getattr(local, "values", None)   # one sample buffer per thread
        if values is None:
            values = local.values = np.empty((size, width), np.float32)
        at = 0
        for b0, b1 in bands:
            for y in range(b0, b1, chunk):
                y1 = min(b1, y + chunk)
                values[at: at + y1 - y] = inputs.sources[i].read_rows(y, y1)[:, cols]
                at += y1 - y
        for how in hows:
            levels[how][i] = _level(values, how)

    # two frames at a time when a sample is small next to the budget (calibrated members
    # spend their time in decoding and arithmetic, which release the GIL); only from the main
    # thread: a task on a dask worker shares the warning filters that these threads restore
    threads = 2 if (sample_pixels is not None and 4 * 2 * size * width <= budget // 2
                    and threading.current_thread() is threading.main_thread()) else 1

    for _ in steps(LocalExecutor(threads).map(measure, range(inputs.n)), "measuring levels", progress,
                   total=inputs.n):
        pass
    for i, name in enumerate(inputs.names):
        if not np.isfinite(levels[hows[0]][i]):
            raise InputError(f"{name}: no valid pixel in the scale region; choose another --scale-region")
    return levels


def _raw_blank(source: Any) -> int:
    """The BLANK of a raw 16-bit source as the kernels take it (NO_BLANK when there is none)."""

    return NO_BLANK if source.blank is None else int(source.blank)


def _histogram_ready(inputs: Inputs, hows: Sequence[str]) -> bool:
    """Whether :func:`_histogram_levels` can measure ``hows`` of every source."""
    return inputs.all_integral and set(hows) <= {"median", "mean"}


def _histogram_levels(inputs: Inputs, hows: Sequence[str], region: tuple[slice, slice],
                      budget: int, progress: ProgressOption = None) -> dict[str, np.ndarray]:
    """Median and mean of ``region`` from a histogram of the raw 16-bit integers.

    For 16-bit images whose values are whole numbers (BSCALE 1, whole BZERO) the
    65536-bin histogram of the stored integers holds every order statistic, and the
    float64 sum of whole numbers is exact in any order: the levels are those
    :func:`_level` computes from the decoded values, bit for bit, for one pass over
    the raw bytes and no decoded copy of the frame.
    """

    rows, cols = region
    nx = inputs.shape[1]
    chunk = int(max(1, min(rows.stop - rows.start, (budget // 3) // (nx * 2), (4 << 20) // (nx * 2))))
    buf = np.empty((chunk, nx), np.uint16)
    hists = np.zeros((HIST16_PARTS, 65536), np.int64)
    levels = {how: np.empty(inputs.n) for how in hows}
    members = zip(inputs.sources, inputs.names, strict=True)
    for i, (source, name) in enumerate(steps(members, "measuring levels", progress, total=inputs.n)):
        hists[...] = 0
        blank = _raw_blank(source)
        for y in range(rows.start, rows.stop, chunk):
            y1 = min(rows.stop, y + chunk)
            source.read_raw(y, y1, buf[: y1 - y])
            hist_be16(buf[: y1 - y], cols.start, cols.stop, blank, hists)
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


# -- rows: tiles through the kernels --------------------------------------------------------------
def combine_rows(frames: Sequence[Any], factors: FrameFactors, options: CombineOptions, y0: int, y1: int,
                 *, memory: str | int = DEFAULT_MEMORY) -> TileResult:
    """Rows ``y0:y1`` of the combine of ``frames``: bit for bit those rows of :func:`combine`.

    Each band needs only the options and the factors (:func:`measure_factors`), so bands
    can be combined in any order, in separate processes, and stacked into the result.

    Parameters
    ----------
    frames : sequence of path-like, FrameSource, ndarray, masked array, CCDData or RowSource
        As for :func:`combine`; only rows ``y0:y1`` are read.
    factors : FrameFactors
        The per-frame factors of these frames under these options.
    options : CombineOptions
    y0, y1 : int
        The band: rows ``y0`` to ``y1 - 1`` of the result (0-based, numpy order).
    memory : str or int
        Budget for the engine's own arrays (tiles and this band of the result).

    Returns
    -------
    TileResult
    """
    frames = frame_list(frames)
    budget = parse_memory(memory)
    with opened(frames) as inputs:
        options.check_frames(inputs.n)
        y0, y1 = _check_band(inputs, factors, y0, y1)
        plan = _tile_plan(inputs, options, budget, y1 - y0)
        out = _Planes.empty((y1 - y0, inputs.shape[1]), inputs.n)
        member_rejected = _combine_band(inputs, options, factors, plan, out, y0, y1)
    return TileResult(y0=y0, y1=y1, data=out.data, uncertainty=out.err, nlow_rejected=out.nlow,
                      nhigh_rejected=out.nhigh, mask=out.mask, member_rejected=member_rejected)


def combine_result(frames: Sequence[Any], options: CombineOptions, factors: FrameFactors,
                   tiles: Sequence[TileResult]) -> CombineResult:
    """The :class:`CombineResult` of ``frames`` from its bands (:func:`combine_rows`), which
    must cover every row once: the planes stitched in row order, the header and the
    per-member rejections as :func:`combine` makes them. A single band covering every row is
    used as it is (no copy)."""

    frames = frame_list(frames)
    tiles = sorted(tiles, key=lambda t: t.y0)
    with opened(frames) as inputs:
        ny = inputs.shape[0]
        headers, names = inputs.headers, inputs.names
    if not tiles or tiles[0].y0 != 0 or tiles[-1].y1 != ny or any(
            a.y1 != b.y0 for a, b in zip(tiles[:-1], tiles[1:], strict=True)):
        raise InputError(f"the bands {[(t.y0, t.y1) for t in tiles]} do not cover rows 0:{ny} once")

    def stitched(name: str) -> np.ndarray:
        parts = [getattr(t, name) for t in tiles]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    counts = [t.member_rejected for t in tiles]
    member_rejected = None if any(c is None for c in counts) else np.sum(counts, axis=0, dtype=np.int64)
    header = combined_header(headers, method=options.method, scales=factors.scales, frames=frames,
                             zeros=factors.zeros, names=names)
    _describe(header, options)
    return CombineResult(data=stitched("data"), uncertainty=stitched("uncertainty"),
                         nlow_rejected=stitched("nlow_rejected"), nhigh_rejected=stitched("nhigh_rejected"),
                         mask=stitched("mask"), header=header, scales=factors.scales, zeros=factors.zeros,
                         member_rejected=member_rejected)


def warn_unable_to_reject(n: int, options: CombineOptions) -> None:
    """The warning :func:`combine` gives when a sample-σ rejection cannot reject anything."""
    _warn_unable_to_reject(n, options)


def _check_band(inputs: Inputs, factors: FrameFactors, y0: Any, y1: Any) -> tuple[int, int]:
    ny = inputs.shape[0]
    try:
        y0, y1 = operator.index(y0), operator.index(y1)
    except TypeError as exc:
        raise InputError(f"rows {y0!r}:{y1!r} must be whole numbers") from exc
    if not 0 <= y0 < y1 <= ny:
        raise InputError(f"rows {y0}:{y1} are not a band of the {ny} rows; give 0 <= y0 < y1 <= {ny}")
    if factors.scales.shape != (inputs.n,):
        raise InputError(f"the factors are for {factors.scales.size} frames, not {inputs.n};"
                         " measure them on these frames")
    return y0, y1


def _count_dtype(n: int) -> np.dtype:
    """The smallest unsigned integer dtype that counts rejections of ``n`` frames."""
    return np.dtype(np.uint8 if n < 256 else np.uint16)


def _tile_rows(n: int, shape: tuple[int, int], budget: int, extra_per_value: int, raw_per_row: int,
               value_bytes: int = 4, count_bytes: int = 2) -> int:
    ny, nx = shape
    outputs = ny * nx * (4 + 4 + 2 * count_bytes + 1)  # data, uncertainty, nlow, nhigh, mask
    # per row of a tile: the stack (float32, or raw 16-bit values; + mask/uncertainty), one raw
    # row of a file, and the float32 row a generic source returns before it is copied
    per_row = n * nx * (value_bytes + extra_per_value) + raw_per_row + nx * 4
    # two tiles: the next one is read while the kernel combines this one (_combine_band)
    rows = (budget - outputs) // (2 * per_row)
    # Tiles far smaller than a generous budget are faster: a tile that stays in the CPU
    # caches is decoded and combined without a trip to main memory, and fresh pages cost
    # a fault each (expensive in virtual machines); the buffers are reused for every tile.
    rows = min(rows, max(8, _TILE_TARGET // per_row))
    return int(max(1, min(ny, rows)))


@dataclass(frozen=True)
class _TilePlan:
    """How the tiles of one band are read and combined."""

    kernel: str        # "ccdproc", "fast" or "general" (CombineOptions.kernel)
    has_mask: bool     # a validity plane travels with the tiles
    has_unc: bool      # an uncertainty plane travels with the tiles
    raw16: bool        # tiles hold raw 16-bit values, decoded in the kernel
    raw_per_row: int   # scratch bytes per row for file sources
    rows: int          # rows per tile


def _tile_plan(inputs: Inputs, options: CombineOptions, budget: int, height: int) -> _TilePlan:
    """The plan for ``height`` output rows: the result band and the tiles fit the budget."""
    kernel = options.kernel(has_uncertainty=inputs.all_uncertainty)
    has_mask = inputs.any_mask
    has_unc = kernel == "general" and inputs.all_uncertainty
    # the vectorised kernel serves the common case; 16-bit files then travel as raw bytes
    raw16 = kernel == "fast" and inputs.all_raw16
    raw_per_row = 0 if raw16 else inputs.raw_bytes_per_row
    rows = _tile_rows(inputs.n, (height, inputs.shape[1]), budget,
                      (1 if has_mask else 0) + (4 if has_unc else 0), raw_per_row,
                      value_bytes=2 if raw16 else 4, count_bytes=_count_dtype(inputs.n).itemsize)
    return _TilePlan(kernel, has_mask, has_unc, raw16, raw_per_row, rows)


@dataclass(frozen=True, eq=False)
class _Planes:
    """The output planes of a band of rows."""

    data: np.ndarray
    err: np.ndarray
    nlow: np.ndarray
    nhigh: np.ndarray
    mask: np.ndarray

    @classmethod
    def empty(cls, shape: tuple[int, int], n: int) -> _Planes:
        counts = _count_dtype(n)
        return cls(np.empty(shape, np.float32), np.empty(shape, np.float32), np.empty(shape, counts),
                   np.empty(shape, counts), np.empty(shape, bool))

    def rows(self, a: int, b: int) -> _Planes:
        return _Planes(self.data[a:b], self.err[a:b], self.nlow[a:b], self.nhigh[a:b], self.mask[a:b])

    def arrays(self) -> list[np.ndarray]:
        return [self.data, self.err, self.nlow, self.nhigh, self.mask]


class _Workspace:
    """The buffers every tile of a band reuses, and what the kernel takes besides the tile."""

    def __init__(self, inputs: Inputs, plan: _TilePlan, options: CombineOptions, factors: FrameFactors):
        n, nx, rows = inputs.n, inputs.shape[1], plan.rows
        self.stack = np.empty((n, rows, nx), np.uint16 if plan.raw16 else np.float32)
        self.valid = np.ones((n, rows, nx) if plan.has_mask else (1, 1, 1), np.uint8)
        self.unc = np.zeros((n, rows, nx) if plan.has_unc else (1, 1, 1), np.float32)
        self.scratch = np.empty(rows * plan.raw_per_row, np.uint8)
        self.iparams, self.fparams = options.kernel_params(has_mask=plan.has_mask, has_uncertainty=plan.has_unc)
        self.pairs = _kernels.sorting_network(n)
        self.nchunks = -(-nx // _kernels.CHUNK)
        # rejections per member: the general kernel follows frame indices; the fast one counts
        # them by value when no extrema rejection (by rank) is asked for
        tracked = plan.kernel == "general" or (plan.kernel == "fast" and options.reject != "none"
                                               and options.nlow + options.nhigh == 0)
        self.tracked = tracked
        # the master flat's case (ccdclip about the median of scaled frames, an unweighted mean
        # or sum): the general kernel's results from a kernel that works on all pixels of a job
        # at once and redoes only the pixels that lose a value
        self.ccdclip = (plan.kernel == "general" and options.reject == "ccdclip" and options.center != "mean"
                        and options.method in ("mean", "sum") and options.nlow + options.nhigh == 0
                        and not plan.has_unc and options.weights is None)
        self.member_jobs = np.zeros((rows * self.nchunks, n, 2) if tracked else (1, 1, 2), np.int32)
        # float32 working values when exact (no scaling), else float64
        scaled = np.any(factors.scales != 1.0) or np.any(factors.zeros != 0.0)
        self.proto = np.zeros(1, np.float64 if scaled else np.float32)
        if plan.raw16:  # how the kernel decodes raw values
            self.decode = (np.array([s.bscale for s in inputs.sources], np.float32),
                           np.array([s.bzero for s in inputs.sources], np.float32),
                           np.array([_raw_blank(s) for s in inputs.sources], np.int64))
        else:
            self.decode = (np.ones(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.int64))


def _checked(rows: Any, shape: tuple[int, ...], name: str, call: str) -> np.ndarray:
    if rows is None or np.shape(rows) != shape:
        raise InputError(f"{name}: {call} gave shape {np.shape(rows)}, expected {shape}")
    return rows


def _read_tile(inputs: Inputs, plan: _TilePlan, ws: _Workspace, y0: int, y1: int) -> None:
    """Rows ``y0:y1`` of every frame, and of its mask and uncertainty planes, into ``ws``."""
    h = y1 - y0
    for i, (source, name, traits) in enumerate(zip(inputs.sources, inputs.names, inputs.traits, strict=True)):
        out = ws.stack[i, :h]
        if plan.raw16:
            source.read_raw(y0, y1, out)
        elif traits.fills:  # FrameSource: decoded straight into the tile
            source.fill_rows(y0, y1, out, ws.scratch)
        else:
            out[...] = _checked(source.read_rows(y0, y1), out.shape, name, f"read_rows({y0}, {y1})")
        if plan.has_mask:
            if traits.mask:
                mask = _checked(source.read_mask_rows(y0, y1), out.shape, name, f"read_mask_rows({y0}, {y1})")
                ws.valid[i, :h] = ~np.asarray(mask, dtype=bool)
            else:
                ws.valid[i, :h] = 1
        if plan.has_unc:
            ws.unc[i, :h] = _checked(source.read_uncertainty_rows(y0, y1), out.shape, name,
                                     f"read_uncertainty_rows({y0}, {y1})")


def _run_kernel(plan: _TilePlan, ws: _Workspace, factors: FrameFactors, out: _Planes,
                h: int) -> np.ndarray | None:
    """Combine the first ``h`` rows of the tile in ``ws`` into ``out``; the rejections per
    member (n, 2) where the general kernel ran, else None."""

    tile = ws.stack[:, :h]
    valid = ws.valid[:, :h] if plan.has_mask else ws.valid
    planes = (out.data, out.err, out.nlow, out.nhigh)
    with _KERNEL_LOCK:
        if plan.kernel == "ccdproc":
            _kernels.combine_tile_ccdproc(tile, valid, factors.scales, factors.weights, ws.iparams,
                                          ws.fparams, *planes)
            return None
        jobs = ws.member_jobs[: h * ws.nchunks] if ws.tracked else ws.member_jobs
        jobs[...] = 0
        if plan.kernel == "fast":
            _kernels.combine_tile_sorted(tile, valid, factors.scales, factors.zeros, ws.pairs, ws.iparams,
                                         ws.fparams, ws.proto, *ws.decode, *planes, jobs)
            return jobs.sum(axis=0, dtype=np.int64) if ws.tracked else None
        if ws.ccdclip:
            _kernels.combine_tile_ccdclip(tile, valid, factors.scales, factors.zeros, ws.pairs, ws.iparams,
                                          ws.fparams, *planes, jobs)
            return jobs.sum(axis=0, dtype=np.int64)
        _kernels.combine_tile(tile, valid, ws.unc[:, :h] if plan.has_unc else ws.unc, factors.scales,
                              factors.zeros, factors.weights, ws.pairs, ws.iparams, ws.fparams, *planes, jobs)
    return jobs.sum(axis=0, dtype=np.int64)


def _combine_band(inputs: Inputs, options: CombineOptions, factors: FrameFactors, plan: _TilePlan,
                  out: _Planes, y0: int, y1: int, ready: Callable[[], None] | None = None,
                  progress: ProgressOption = None) -> np.ndarray | None:
    """Combine rows ``y0:y1`` tile by tile into ``out`` (whose first row is row ``y0``).

    ``ready`` is called once, after the first tile is read and before the first kernel
    runs; ``progress`` wraps the tiles (:mod:`ccdcal._shared.progress`). Returns the rejections per
    member (n, 2) where the kernel counts them, else None.
    """
    from concurrent.futures import ThreadPoolExecutor

    tiles = [(t0, min(y1, t0 + plan.rows)) for t0 in range(y0, y1, plan.rows)]
    # two workspaces: a thread reads (and calibrates) the next tile while the kernel combines
    # this one; the reads stay in tile order, each source read by one thread at a time

    # reading a tile may run a kernel (a dark subtracted by calibrate.subtract_dark)
    ahead = len(tiles) > 1 and pool.kernels_threadsafe()
    spaces = [_Workspace(inputs, plan, options, factors) for _ in range(2 if ahead else 1)]
    member_rejected = np.zeros((inputs.n, 2), np.int64) if spaces[0].tracked else None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccdcal-tiles") if ahead else \
            nullcontext() as reader:

        def read(k: int) -> Any:
            args = (inputs, plan, spaces[k % len(spaces)], *tiles[k])
            return reader.submit(_read_tile, *args) if ahead else _read_tile(*args)

        reading = read(0)
        for k, (t0, t1) in enumerate(steps(tiles, "combining", progress)):
            if ahead:
                reading.result()
                if k + 1 < len(tiles):
                    reading = read(k + 1)
            if ready is not None:
                ready()
                ready = None
            band = out.rows(t0 - y0, t1 - y0)
            counts = _run_kernel(plan, spaces[k % len(spaces)], factors, band, t1 - t0)
            if member_rejected is not None:
                member_rejected += counts
            np.isnan(band.err, out=band.mask)
            if not ahead and k + 1 < len(tiles):
                read(k + 1)
    return member_rejected


# -- the whole combine ------------------------------------------------------------------------------
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
    progress: ProgressOption = None,
) -> CombineResult:
    """Combine equal-shaped frames pixel by pixel, streaming row tiles under a memory budget.

    Order of operations (IRAF/Siril order): per-frame zero/scale → extrema rejection →
    iterative rejection of the surviving *scaled* values → combine. The exact
    definitions are in the module docstring of :mod:`ccdcal.combining.engine`.

    Parameters
    ----------
    frames : sequence of path-like, FrameSource, ndarray, masked array, CCDData or row source
        Equal-shaped 2-D images. Paths and FrameSources are streamed from disk (each file
        read once); a *row source* is any object with ``shape`` (ny, nx) and
        ``read_rows(y0, y1)`` returning float32 rows (:class:`RowSource`; optionally
        ``header``, ``path``, and ``read_mask_rows``/``read_uncertainty_rows``:
        :class:`RowSourceWithPlanes`); its rows are requested in increasing tiles.
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
    progress : bool or callable, optional
        True: a progress bar (a widget in Jupyter, else on stderr) while the levels are
        measured and while the tiles of rows are combined; False or None: silent; or a
        function ``f(items, description, total=None)`` (see
        :func:`ccdcal._shared.progress.resolve_progress`). The library itself never prints.

    Returns
    -------
    CombineResult

    Raises
    ------
    TypeError
        If ``progress`` is none of the above (before any frame is read).
    """
    progress = resolve_progress(progress)
    frames = frame_list(frames)
    budget = parse_memory(memory)
    with opened(frames) as inputs:
        options = CombineOptions.create(
            inputs.n, header=inputs.headers[0], method=method, scale=scale, zero=zero,
            scale_region=scale_region, clip_extrema=clip_extrema, sigma_clip=sigma_clip, reject=reject,
            center=center, maxiters=maxiters, weights=weights, gain=gain, read_noise=read_noise,
            sensitivity_noise=sensitivity_noise, pedestal=pedestal, compat=compat)
        _warn_unable_to_reject(inputs.n, options)
        factors, out, member_rejected = _combine_all(inputs, options, budget, progress)

    header = combined_header(inputs.headers, method=options.method, scales=factors.scales, frames=frames,
                             zeros=factors.zeros, names=inputs.names)
    _describe(header, options)
    return CombineResult(data=out.data, uncertainty=out.err, nlow_rejected=out.nlow, nhigh_rejected=out.nhigh,
                         mask=out.mask, header=header, scales=factors.scales, zeros=factors.zeros,
                         member_rejected=member_rejected)


def _combine_all(inputs: Inputs, options: CombineOptions, budget: int,
                 progress: ProgressOption = None) -> tuple[FrameFactors, _Planes, np.ndarray | None]:
    """The factors and every row of the result.

    Levels from raw histograms need almost no memory: they are measured while a thread
    faults in the result's fresh pages; other sources are measured first, so that the
    region they hold is freed before the result is allocated.
    """
    late = _histogram_ready(inputs, _level_names(options))
    factors = None if late else _measure(inputs, options, budget, progress=progress)
    plan = _tile_plan(inputs, options, budget, inputs.shape[0])
    out = _Planes.empty(inputs.shape, inputs.n)
    prefault = _Prefault(out.arrays())
    try:
        if factors is None:
            factors = _measure(inputs, options, budget, progress=progress)
        member_rejected = _combine_band(inputs, options, factors, plan, out, 0, inputs.shape[0],
                                        ready=prefault.wait, progress=progress)
    finally:
        prefault.wait()
    return factors, out, member_rejected


class _Prefault:
    """Touches fresh arrays in a thread (numpy releases the GIL) while the caller reads:
    fresh pages cost a fault each, dear in virtual machines."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self._thread = threading.Thread(target=_touch, args=(arrays,), daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()


def _touch(arrays: Sequence[np.ndarray]) -> None:
    for array in arrays:
        array[...] = 0


# -- header (provenance; leaves the array core with the headers module) ---------------------------
def _describe(header: Any, opts: CombineOptions) -> None:
    """Add the HISTORY line that says how the frames were combined."""
    parts = [opts.method]
    if opts.scale is not None:
        what = opts.scale if isinstance(opts.scale, str) else "given factors"
        parts.append(f"scaled by {what}" + (f" of {opts.scale_region}"
                                            if opts.scale_region and isinstance(opts.scale, str) else ""))
    if opts.clip_extrema is not None:
        parts.append(f"minmax {opts.nlow}/{opts.nhigh}")
    if opts.reject != "none":
        parts.append(f"{opts.reject} {opts.low:g}/{opts.high:g}")
    if opts.compat:
        parts.append(f"compat {opts.compat}")
    header["HISTORY"] = "ccdcal combine: " + ", ".join(parts)

