"""Stacking of calibrated light frames on a reference grid: resample, match, reject, average.

Each frame is resampled onto the reference grid by rows (:class:`ccdcal.stacking.resample.ResampledRows`),
matched to the reference and combined pixel by pixel, streaming bands of output rows under a
memory budget. Per output pixel, with ``x_i`` the resampled value of frame ``i`` and ``σ_i``
its resampled standard deviation:

1. Matching: ``x'_i = s_i·x_i + z_i`` and ``σ'_i = s_i·σ_i``. ``s_i`` is the transparency
   factor (flux of the reference / flux of frame i; given by the caller from matched stars,
   or measured as the ratio of background-subtracted sums over the 8×8-pixel bins of the
   co-registered frames that hold a source in every frame, on blocks of rows until the ratios are
   known to 0.2 %: at most half of the rows),
   ``z_i = B_ref − s_i·B_i`` with ``B`` the sigma-clipped median background: the stack
   keeps the reference's background and units (values per pixel of one reference frame).
2. Rejection (``reject="auto"``/``"noise"``): a noise-model clip. The centre ``c`` is the
   median of the surviving ``x'``; a value is rejected when ``x'_i < c − low·t_i`` or
   ``x'_i > c + high·t_i`` with ``t_i² = σ'_i² + (tol·max(c − level, 0))²`` (``tol`` =
   ``signal_tolerance``, ``level`` the matched background: seeing and registration differences
   in star cores are not noise). Passes repeat while at least 3 values survive and a pass
   rejects something; a pass that would reject every value rejects none. Because σ comes
   from the noise, not from the sample, one outlier (a satellite trail, a cosmic ray) is
   rejected at any frame count from 3 up, where sample-σ clipping cannot reject one outlier
   among n ≤ 10 values (:func:`ccdcal.combining.options.sample_sigma_can_reject`). The default
   thresholds are 3.5σ: with σ known, clipping good values costs signal to noise, because a
   pixel loses a good value when its other values lie to the other side (the median with them),
   and their mean is then off. For Gaussian values clipped about their median, 12 a pixel, the
   noise of the mean grows by 1.9 % at 3σ (4 % of the pixels lose a good value) and 0.5 % at
   3.5σ (0.9 % at 5 values, 0.4 % at 24); at 4σ/3σ or 4σ/4σ bright stars' fluxes and colours
   lost 2 % where frames disagree in star cores (tests of ``tests/stacking`` and ``test_colour``).
   Cosmic rays, hot pixels and trails lie far beyond.
3. Weighted mean of the survivors ``Σ w_i x'_i / Σ w_i`` with per-frame weights
   ``w_i ∝ 1/(s_i·σ_bg,i)²`` (``weights="noise"``; normalised to a mean of 1), uncertainty
   ``sqrt(Σ (w_i σ'_i)²) / Σ w_i`` (resampling correlates neighbouring pixels: a per-pixel σ).

``σ_i`` comes from the frame's ``UNCERT`` plane. With ``reject="auto"`` a frame without one
uses a noise model instead: its background noise plus the Poisson noise of the signal above the
background, with the header's gain in e-/ADU, or else the gain the sky implies (``B/σ_bg²``,
which over-states the noise when the read noise matters: a safe side for rejection).

The combine engine (:func:`ccdcal.combining.engine.combine`) cannot serve step 2: its rejections take
σ from the sample or from one gain/read-noise model for every frame (``ccdclip``), not from
per-value uncertainties, and it reports neither coverage nor the sum of weights per pixel.
"""

from __future__ import annotations

import math
import os
import queue
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._shared.progress import ProgressOption, resolve_progress, steps
from .._shared.robust import clipped_level, robust_std
from ..combining.options import parse_memory
from ..errors import CcdcalWarning, InputError
from ..io.frames import FrameSource, clean_header
from ..io.headers import header_gain, stack_header
from ..io.writer import write_atomic
from ..masks import MASK_NO_DATA
from ._kernels import sorting_network, stack_rows
from .resample import InputBuffers, ResampledRows, RowThreads

REJECTS = ("auto", "noise", "none")
WEIGHTINGS = ("noise", "none")
_RESULT_BYTES = 4 + 4 + 2 + 4 + 2 + 1  # per pixel: data, uncertainty, coverage, weight, rejected, mask
_BAND_BYTES = 4 + 1 + 4  # per pixel of each frame's band: data, bad, σ
#: the default clipping thresholds (low, high) in σ (module docstring: why 3.5, not 3)
SIGMA = (3.5, 3.5)
#: a frame resampled whole in one thread (its rows in no threads of their own)
_SERIAL = RowThreads(1)
_SCALE_BLOCK = 32  # rows of one block sampled for the transparency
_SCALE_BIN = 8  # the transparency compares sums over bins of 8 × 8 pixels
_MIN_SCALE_BINS = 10
_SCALE_PRECISION = 0.002  # sample rows for the transparency until the ratios are this precise
_NETWORK_MOST = 256  # frames up to which the pixels' medians come from a sorting network


# -- the result -------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class StackResult:
    """The result of :func:`stack`.

    Attributes
    ----------
    data : ndarray float32 (ny, nx)
        The stack, per pixel in the units of one reference frame (NaN where no data).
    uncertainty : ndarray float32 (ny, nx)
        Propagated standard deviation (per pixel; neighbours are correlated by resampling).
    coverage : ndarray int16 (ny, nx)
        Frames that contributed to each pixel (after rejection).
    weight : ndarray float32 (ny, nx)
        Sum of the weights of the contributing frames (weights have a mean of 1 per frame).
    rejected : ndarray uint16 (ny, nx)
        Values rejected at each pixel.
    mask : ndarray bool (ny, nx)
        True where no frame contributed.
    header : astropy.io.fits.Header
    scales, zeros, weights, backgrounds, noise : ndarray float64 (n,)
        Per frame: the matching ``x' = scale·x + zero``, the weight, the background level and
        the background noise (σ, source pixels) that were measured or given.
    frame_rejected : ndarray int64 (n, 2)
        Values of each frame rejected low (column 0) and high (column 1).
    notes : list of str
        What the stack assumed, said once (frames without UNCERT: a noise model from the sky).
    """

    data: np.ndarray
    uncertainty: np.ndarray
    coverage: np.ndarray
    weight: np.ndarray
    rejected: np.ndarray
    mask: np.ndarray
    header: Any
    scales: np.ndarray = field(default_factory=lambda: np.ones(0))
    zeros: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: np.ndarray = field(default_factory=lambda: np.ones(0))
    backgrounds: np.ndarray = field(default_factory=lambda: np.zeros(0))
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frame_rejected: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    notes: list[str] = field(default_factory=list)

    def write(self, path: str | os.PathLike, *, unit: str | None = None) -> Path:
        """Write the stack as FITS, atomically: primary = data, then ``UNCERT`` (σ, NaN as 0),
        ``COVERAGE``, ``WEIGHT``, ``REJECT`` and ``MASK`` (uint8, MASK_NO_DATA where no data)
        extensions; CHECKSUM on every HDU. ``CCDData.read`` reads data, UNCERT and MASK."""
        from astropy.io import fits

        header = clean_header(self.header)
        if unit is not None:
            header["BUNIT"] = (unit, "physical unit of the data")
        unc_header = fits.Header()
        unc_header["UTYPE"] = ("StdDevUncertainty", "uncertainty type (astropy.nddata)")
        hdus = fits.HDUList([
            fits.PrimaryHDU(np.asarray(self.data, np.float32), header=header),
            fits.ImageHDU(np.where(np.isfinite(self.uncertainty), self.uncertainty, np.float32(0.0)),
                          header=unc_header, name="UNCERT"),
            fits.ImageHDU(np.asarray(self.coverage, np.int16), name="COVERAGE"),
            fits.ImageHDU(np.asarray(self.weight, np.float32), name="WEIGHT"),
            fits.ImageHDU(np.asarray(self.rejected, np.uint16), name="REJECT"),
            fits.ImageHDU(np.where(self.mask, np.uint8(MASK_NO_DATA), np.uint8(0)), name="MASK"),
        ])
        path = Path(path)
        write_atomic(path, lambda tmp: hdus.writeto(tmp, checksum=True, output_verify="silentfix"))
        return path


# -- options ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Options:
    reject: str
    low: float
    high: float
    weights: str | tuple[float, ...]
    zero: bool
    scale: bool
    scales: tuple[float, ...] | None
    zeros: tuple[float, ...] | None
    tolerance: float


def _per_frame(values: Any, what: str, n: int, positive: bool) -> tuple[float, ...] | None:
    if values is None:
        return None
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be numbers, one per frame") from exc
    if array.shape != (n,):
        raise InputError(f"{what} has {array.size} values for {n} frames; give one per frame")
    if not np.all(np.isfinite(array)) or (positive and np.any(array <= 0)):
        raise InputError(f"{what} must be finite{' positive' if positive else ''} numbers")
    return tuple(float(v) for v in array)


def _options(n: int, reject: str, sigma: Any, weights: Any, zero: bool, scale: bool, scales: Any,
             zeros: Any, tolerance: float) -> _Options:
    if reject not in REJECTS:
        raise InputError(f"reject {reject!r} is not one of {', '.join(REJECTS)}")
    try:
        low, high = (float(v) for v in sigma)
    except (TypeError, ValueError) as exc:
        raise InputError(f"sigma must be a pair (low, high), got {sigma!r}") from exc
    if not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"sigma thresholds must be positive numbers, got {sigma!r}")
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise InputError(f"weights {weights!r} is not one of {', '.join(WEIGHTINGS)} or a sequence")
    else:
        weights = _per_frame(weights, "weights", n, positive=True)
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise InputError(f"signal_tolerance must be 0 or more, got {tolerance!r}")
    return _Options(reject, low, high, weights, bool(zero), bool(scale), _per_frame(scales, "scales", n, True),
                    _per_frame(zeros, "zeros", n, False), float(tolerance))


# -- opening the frames -------------------------------------------------------------------------------
def _grid_shape(frame: Any) -> tuple[int, int]:
    if isinstance(frame, (str, os.PathLike)):
        with FrameSource(frame) as source:
            return source.shape
    shape = getattr(frame, "shape", None)
    if shape is None:
        raise InputError(f"cannot stack {type(frame).__name__}: give paths, FrameSources or row sources")
    return int(shape[0]), int(shape[1])


def _open_sources(frames: Sequence[Any], matrices: Sequence[Any], out_shape: Any, reference: int,
                  interpolation: str) -> list[ResampledRows]:
    if len(frames) == 0:
        raise InputError("nothing to stack: give a list of calibrated frames")
    if len(matrices) != len(frames):
        raise InputError(f"{len(matrices)} transforms for {len(frames)} frames; give one per frame")
    if not (isinstance(reference, (int, np.integer)) and 0 <= reference < len(frames)):
        raise InputError(f"reference {reference!r} is not the index of one of the {len(frames)} frames")
    shape = _grid_shape(frames[reference]) if out_shape is None else out_shape
    sources: list[ResampledRows] = []
    try:
        for frame, matrix in zip(frames, matrices, strict=True):
            sources.append(ResampledRows(frame, matrix, shape, interpolation=interpolation))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return sources


# -- per-frame levels ---------------------------------------------------------------------------------
def _background(source: ResampledRows, rows: int = 64) -> tuple[float, float]:
    """(background, σ) of a frame from a sample of its own rows (blocks of 4 rows); of a debayered
    colour, from its measured pixels only (the CFA's pixels of that colour): made ones are averages, whose smaller scatter would
    give every pixel of the noise model (``σ_bg``) less than a measured pixel has, and rejection
    would then cut good values of the measured ones (1 % of the values, 3.5 % of the star SNR
    with RCD's colours)."""
    ny = source.source_shape[0]
    starts = np.unique(np.linspace(0, max(0, ny - 4), max(1, min(rows // 4, ny // 4 or 1))).astype(int))
    sample = np.concatenate([source.source_rows(int(y), min(ny, int(y) + 4), measured=True).ravel()
                             for y in starts])
    level, sigma = clipped_level(sample)
    if not (math.isfinite(level) and math.isfinite(sigma)):
        raise InputError(f"{source.name}: no valid background pixels to measure; check the frame and its mask")
    return level, sigma


def _noise_models(sources: Sequence[ResampledRows], backgrounds: np.ndarray, noise: np.ndarray,
                  reject: str) -> str | None:
    """Give frames without an uncertainty plane a noise model (module docstring); returns the
    note that says so (lights from another tool have none: the normal case, not a warning)."""

    lacking = [i for i, s in enumerate(sources) if not s.has_uncertainty]
    if not lacking:
        return None
    if reject == "noise":
        raise InputError(f"{sources[lacking[0]].name}: no UNCERT extension, so reject='noise' cannot work;"
                         " use reject='auto' (a noise model from the background) or calibrate with a gain")
    for i in lacking:
        gain = header_gain(sources[i].header)[0]
        if gain is None:
            sky = backgrounds[i] / noise[i] ** 2 if noise[i] > 0 else 0.0
            gain = sky if backgrounds[i] > 5 * noise[i] and sky > 0 else math.inf
        sources[i].noise_model = (backgrounds[i], noise[i], gain)
    names = ", ".join(sources[i].name for i in lacking[:3]) + (" ..." if len(lacking) > 3 else "")
    return (f"{len(lacking)} frame(s) without an UNCERT plane ({names}): their noise comes from the"
            " background noise and the gain")


# -- memory ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    rows: int    # output rows per band
    pixels: int  # source pixels of the largest input band (per plane)
    raw: int     # scratch bytes of the largest input band


def _plan(sources: Sequence[ResampledRows], shape: tuple[int, int], budget: int, readers: int = 1,
          results: int = 1) -> _Plan | None:
    """The tallest output band whose buffers fit the budget with the ``results`` (planes stacked
    together): per band, every source's resampled rows, and the source rows of ``readers``
    frames at a time (taller for rotated frames). None when not even one row fits with more
    than one reader."""
    ny, nx = shape
    n = len(sources)

    def need(h: int) -> int:
        return (results * ny * nx * _RESULT_BYTES + n * h * nx * _BAND_BYTES
                + readers * max(s.input_bytes(h) for s in sources))

    lo, hi = 1, ny
    if need(1) > budget:
        if readers > 1:
            return None
        warnings.warn(f"the memory budget ({budget / 2**20:.0f} MiB) is below what stacking these frames"
                      f" needs ({need(1) / 2**20:.0f} MiB: the result and one band of rows); using that",
                      CcdcalWarning, stacklevel=4)
        hi = 1
    while lo < hi:  # the tallest band that fits
        mid = (lo + hi + 1) // 2
        if need(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    rows_in = [s.input_band_height(lo) for s in sources]
    return _Plan(lo, max(r * s.source_shape[1] for r, s in zip(rows_in, sources, strict=True)),
                 max(r * s.raw_bytes_per_row for r, s in zip(rows_in, sources, strict=True)))


class _Band:
    """The resampled rows of every frame for one band: (n, rows, nx) C-contiguous views of
    flat buffers, so that a shorter last band is contiguous too."""

    def __init__(self, n: int, rows: int, nx: int):
        self.n, self.nx = n, nx
        self._data = np.empty(n * rows * nx, np.float32)
        self._bad = np.empty(n * rows * nx, np.bool_)
        self._err = np.empty(n * rows * nx, np.float32)

    def views(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.n * rows * self.nx
        shape = (self.n, rows, self.nx)
        return (self._data[:size].reshape(shape), self._bad[:size].reshape(shape),
                self._err[:size].reshape(shape))


@dataclass
class _Work:
    """What every band of one stack shares. With one set of ``buffers`` per thread (sources that
    each read a file of their own), a band's frames are resampled one frame per thread at once
    (each whole: reading, decoding and debayering included, which a frame's row chunks in
    threads would leave to one thread); else one frame after another, its rows in threads."""

    sources: Sequence[ResampledRows]
    plan: _Plan
    buffers: list[InputBuffers]
    band: _Band
    threads: RowThreads
    whole: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None   # with one_band: every row, kept

    @property
    def one_band(self) -> bool:
        """Every row of the grid fits one band: each frame is resampled once (``whole``), and the
        transparency and the combination read the same resampled rows."""
        return self.plan.rows >= self.sources[0].shape[0]

    def kept(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every frame's resampled rows ``y0:y1`` from ``whole`` (the whole band itself when asked
        whole: C-contiguous, as the kernels are compiled for)."""
        assert self.whole is not None
        if (y0, y1) == (0, self.sources[0].shape[0]):
            return self.whole
        data, bad, err = self.whole
        return data[:, y0:y1], bad[:, y0:y1], err[:, y0:y1]

    def frame_rows(self, i: int, b0: int, b1: int, data: np.ndarray, bad: np.ndarray, err: np.ndarray,
                   buffers: InputBuffers | None = None, threads: RowThreads | None = None) -> None:
        """Frame ``i``'s resampled rows ``b0:b1`` into the given arrays (copied from the kept
        band with :attr:`one_band`, else resampled in bands of the plan, with ``buffers`` and
        ``threads``: by default the first set and the work's own)."""
        if self.one_band:
            whole = self.kept(b0, b1)
            data[:], bad[:], err[:] = whole[0][i], whole[1][i], whole[2][i]
            return
        for y0 in range(b0, b1, self.plan.rows):
            y1 = min(b1, y0 + self.plan.rows)
            self.sources[i].resample_into(y0, y1, data[y0 - b0:y1 - b0], bad[y0 - b0:y1 - b0],
                                          err[y0 - b0:y1 - b0], buffers=buffers or self.buffers[0],
                                          threads=threads or self.threads)

    def each_frame(self, fn: Any) -> list[Any]:
        """``[fn(i, buffers, threads) for i in range(n)]``: with a set of buffers per thread (sources
        that read their own files), a frame per thread, each call with a set of its own and no
        row threads; else frame after frame with the first set and the work's row threads."""
        n = len(self.sources)
        if len(self.buffers) == 1:
            return [fn(i, self.buffers[0], self.threads) for i in range(n)]
        free: queue.SimpleQueue[InputBuffers] = queue.SimpleQueue()
        for into in self.buffers:
            free.put(into)

        def one(i: int) -> Any:
            into = free.get()
            try:
                return fn(i, into, _SERIAL)
            finally:
                free.put(into)

        return self.threads.map(one, range(n))


def _resample_together(works: Sequence[_Work], y0: int, y1: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Rows ``y0:y1`` of every frame of each of ``works`` (planes of the same frames: the colours
    of CFA frames) into their band buffers, a frame's planes one after another (a CFA band is
    debayered once for its three colours); with a set of buffers per thread, a frame per thread
    (its planes in that thread), else frame after frame, the rows of each in threads."""
    bands = [work.band.views(y1 - y0) for work in works]

    def planes_of(i: int, into: InputBuffers, threads: RowThreads) -> None:
        for work, (data, bad, err) in zip(works, bands, strict=True):
            work.sources[i].resample_into(y0, y1, data[i], bad[i], err[i], buffers=into, threads=threads)

    works[0].each_frame(planes_of)
    return bands


# -- transparency ---------------------------------------------------------------------------------------
def _scale_blocks(ny: int) -> list[tuple[int, int]]:
    """Every block of ``_SCALE_BLOCK`` rows, in a spread order (each prefix covers the frame
    evenly); independent of the band height, so the measured scales are too."""
    block = min(_SCALE_BLOCK, ny)
    starts = sorted({min(y, ny - block) for y in range(0, ny, block)})
    order = sorted(range(len(starts)), key=lambda k: (k * 0.6180339887498949) % 1.0)
    return [(starts[k], starts[k] + block) for k in order]


def _bin_sums(values: np.ndarray, size: int) -> np.ndarray:
    """Sums of ``size`` × ``size`` bins of (n, rows, nx) values (edges that do not fill a bin
    are left out); NaN where a bin holds a NaN."""
    n, rows, nx = values.shape
    by, bx = rows // size, nx // size
    cut = values[:, : by * size, : bx * size].reshape(n, by, size, bx, size)
    return cut.sum(axis=(2, 4), dtype=np.float64).reshape(n, by * bx)


def _block_bins(works: Sequence[_Work], b0: int, b1: int, size: int, backgrounds: Sequence[np.ndarray],
                reference: int, active: Sequence[bool]) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """Per work (planes of the same frames; None where not ``active``): sky-subtracted sums and
    variances (n, k) of the bins of rows ``b0:b1`` where the reference is valid (NaN where a
    frame is not). The sky is each frame's median bin of the block: local (gradients) and
    measured on the same sky for every frame. A frame's planes one after another (a CFA frame's
    band debayered once for its colours), a frame per thread where each frame reads its own file
    (:meth:`_Work.each_frame`), else one frame after another."""
    rows, nx = b1 - b0, works[0].band.nx

    def bins(i: int, buffers: InputBuffers, threads: RowThreads) -> list[tuple[np.ndarray, np.ndarray] | None]:
        data, err, bad = np.empty((rows, nx), np.float32), np.empty((rows, nx), np.float32), np.empty((rows, nx), bool)
        out: list[tuple[np.ndarray, np.ndarray] | None] = []
        for work, wanted in zip(works, active, strict=True):
            if not wanted:
                out.append(None)
                continue
            work.frame_rows(i, b0, b1, data, bad, err, buffers, threads)
            data[bad] = np.nan
            out.append((_bin_sums(data[None], size)[0], _bin_sums(np.square(err, out=err)[None], size)[0]))
        return out

    each = works[0].each_frame(bins)
    found: list[tuple[np.ndarray, np.ndarray] | None] = []
    for w, back in enumerate(backgrounds):
        if not active[w]:
            found.append(None)
            continue
        values = np.array([frame[w][0] for frame in each])
        var = np.array([frame[w][1] for frame in each])
        ok = np.isfinite(values[reference])
        values, var = values[:, ok], var[:, ok]
        for i in range(values.shape[0]):  # the local sky: the median bin (faint sources scale with the frame)
            valid = np.isfinite(values[i])
            values[i] -= np.median(values[i, valid]) if valid.sum() >= 16 else size * size * back[i]
        found.append((values, var))
    return found


def _precision(values: np.ndarray, variances: np.ndarray, reference: int) -> float:
    """The worst relative precision of the frames' flux ratios from these bins (noise only)."""
    worst = 0.0
    ref, ref_var = values[reference], variances[reference]
    for i in range(values.shape[0]):
        ok = np.isfinite(values[i]) & np.isfinite(variances[i])
        flux = float(ref[ok].sum())
        if i != reference:
            worst = max(worst, math.sqrt(float(ref_var[ok].sum() + variances[i, ok].sum())) / flux
                        if flux > 0 else math.inf)
    return worst


def _bright_bins(works: Sequence[_Work], backgrounds: Sequence[np.ndarray], noise: Sequence[np.ndarray],
                 reference: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per work (planes of the same frames, each measured on its own): sky-subtracted sums and
    variances (n, k) of the ``_SCALE_BIN``² bins that hold a source in every frame: the median
    over the frames exceeds 5σ of a mean bin and no frame is below a third of that (a trail or
    cosmic ray in one frame selects nothing; no frame's own noise selects much); NaN where a
    frame lacks a pixel.

    Blocks of rows are read in a spread order until the ratios are known to 0.2 % (noise
    only), from 8 blocks up to half of the rows: dense fields cost little, sparse ones more.
    A block is read for every work still measuring (a CFA frame's band debayered once for its
    colours); a work stops taking blocks when its own ratios are known, as measured alone.
    Bins as large as several FWHM hold nearly all of a star's flux whatever the seeing and
    the interpolation's slight sharpening, which would bias ratios of single core pixels."""
    n = len(works[0].sources)
    blocks = _scale_blocks(works[0].sources[0].shape[0])
    size = min(_SCALE_BIN, blocks[0][1] - blocks[0][0])
    thresholds = [5.0 * size * math.sqrt(float(np.sum(sigma**2))) / n for sigma in noise]
    found = [(np.empty((n, 0)), np.empty((n, 0))) for _ in works]
    active = [True] * len(works)
    for count, (b0, b1) in enumerate(blocks, start=1):
        for w, block in enumerate(_block_bins(works, b0, b1, size, backgrounds, reference, active)):
            if block is None:
                continue
            data, var = block
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                pick = (np.nanmedian(data, axis=0) > thresholds[w]) & ~np.any(data <= thresholds[w] / 3, axis=0)
            values = np.concatenate([found[w][0], data[:, pick]], axis=1)
            variances = np.concatenate([found[w][1], var[:, pick]], axis=1)
            found[w] = (values, variances)
            if count >= max(8, len(blocks) // 2) or (
                    count >= 8 and _precision(values, variances, reference) <= _SCALE_PRECISION):
                active[w] = False
        if not any(active):
            break
    return found


def _transparency(values: np.ndarray, variances: np.ndarray, reference: int,
                  names: Sequence[str]) -> np.ndarray:
    """Per-frame flux ratios (reference / frame) of the bright bins: the ratio of their sums,
    leaving out the bins whose residual ``s·x − ref`` lies beyond 5 robust σ of the noise (a
    cosmic ray or a trail in either frame); a symmetric test, so faint bins add no bias."""

    n = values.shape[0]
    scales = np.ones(n)
    poor = []
    for i in range(n):
        ok = np.isfinite(values[i]) & np.isfinite(variances[i]) & np.isfinite(variances[reference])
        ref, x = values[reference, ok], values[i, ok]
        if i == reference or ok.sum() < _MIN_SCALE_BINS or not x.sum() > 0:
            if i != reference:
                poor.append(names[i])
            continue
        keep = np.ones(ref.size, bool)
        for _ in range(5):
            s = float(ref[keep].sum() / x[keep].sum())
            with np.errstate(divide="ignore", invalid="ignore"):    # no σ known (frames in memory): z = ±inf
                z = (s * x - ref) / np.sqrt(s * s * variances[i, ok] + variances[reference, ok])
            new = np.abs(z) <= 5.0 * max(1.0, robust_std(z))
            if new.sum() < _MIN_SCALE_BINS or np.array_equal(new, keep) or not x[new].sum() > 0:
                break
            keep = new
        scales[i] = s
    if poor:
        warnings.warn(f"too few bright bins shared with the reference to measure the transparency of"
                      f" {', '.join(poor[:3])}{' ...' if len(poor) > 3 else ''}; scale 1 used (pass scales=)",
                      CcdcalWarning, stacklevel=5)
    return scales


# -- the stack ------------------------------------------------------------------------------------------
def stack(
    frames: Sequence[Any],
    matrices: Sequence[Any],
    *,
    out_shape: tuple[int, int] | None = None,
    reference: int = 0,
    reject: str = "auto",
    sigma: tuple[float, float] = SIGMA,
    weights: str | Sequence[float] = "noise",
    interpolation: str = "lanczos3",
    zero: bool = True,
    scale: bool = True,
    scales: Sequence[float] | None = None,
    zeros: Sequence[float] | None = None,
    signal_tolerance: float = 0.05,
    memory: str | int = "1GiB",
    progress: ProgressOption = None,
) -> StackResult:
    """Stack calibrated light frames on the reference grid (definitions in the module docstring).

    Parameters
    ----------
    frames : sequence of path-like, FrameSource, row source, CCDData or ndarray
        Calibrated lights: FITS with the data, and ``UNCERT`` (σ) and ``MASK`` (non-zero =
        bad) extensions when present, as ccdcal writes them (files are read by rows).
    matrices : sequence of array-like (3, 3)
        Per frame, the transform from its pixel coordinates to the reference grid's
        (:mod:`ccdcal.stacking.resample`); the reference's own is the identity.
    out_shape : (ny, nx), optional
        The grid; default the shape of the reference frame.
    reference : int
        Index of the frame whose grid, header, WCS, background and flux scale the stack keeps.
    reject : {"auto", "noise", "none"}
        Noise-model rejection with σ from the ``UNCERT`` planes (``"noise"``: every frame must
        have one; ``"auto"``: frames without one use a noise model), or none.
    sigma : (low, high)
        Rejection thresholds in units of each value's σ (module docstring: why 3.5, not 3).
    weights : {"noise", "none"} or sequence of float
        ``1/(s_i·σ_bg,i)²``, equal, or given per frame; normalised to a mean of 1.
    interpolation : {"lanczos3", "bicubic", "bilinear"}
        The resampling kernel (:mod:`ccdcal.stacking.resample`). Lanczos-3 (the default) keeps
        stars sharpest and their fluxes truest; bilinear smooths the noise (stars about 4 %
        wider, about 5 % less noise in a star's aperture) and resamples 2.4 times as fast;
        bicubic lies between.
    zero, scale : bool
        Match the backgrounds (additive) and the transparency (multiplicative) to the reference.
    scales, zeros : sequence of float, optional
        Per-frame factors given by the caller (e.g. flux ratios of matched stars from the
        registration), used instead of measured ones: ``x' = scale·x + zero``.
    signal_tolerance : float
        Fraction of the signal above the background added in quadrature to each value's σ
        for rejection (star cores differ by seeing and registration, not by noise alone).
    memory : str or int
        Budget for the result, the resampled bands and the source rows, e.g. ``"256MiB"``.
    progress : bool or callable, optional
        True: a progress bar over the bands of rows stacked (a widget in Jupyter, else on
        stderr); False or None: silent; or a function ``f(items, description, total=None)``
        (see :func:`ccdcal._shared.progress.resolve_progress`).

    Returns
    -------
    StackResult
    """

    progress = resolve_progress(progress)
    budget = parse_memory(memory)
    frames = [frames] if isinstance(frames, (str, os.PathLike)) else list(frames)
    matrices = list(matrices)
    options = _options(len(frames), reject, sigma, weights, zero, scale, scales, zeros, signal_tolerance)
    sources = _open_sources(frames, matrices, out_shape, reference, interpolation)
    try:
        with RowThreads() as threads:
            return _stack_planes([sources], options, reference, budget, threads, progress)[0]
    finally:
        for source in sources:
            source.close()


def stack_colours(
    colours: Sequence[Sequence[Any]],
    matrices: Sequence[Any],
    *,
    out_shape: tuple[int, int] | None = None,
    reference: int = 0,
    reject: str = "auto",
    sigma: tuple[float, float] = SIGMA,
    weights: str | Sequence[float] = "noise",
    interpolation: str = "lanczos3",
    zero: bool = True,
    scale: bool = True,
    scales: Sequence[float] | None = None,
    zeros: Sequence[float] | None = None,
    signal_tolerance: float = 0.05,
    memory: str | int = "1GiB",
    progress: ProgressOption = None,
) -> list[StackResult]:
    """Several planes of the same frames stacked, each as :func:`stack` stacks it, together: the
    colours of one-shot-colour frames (:func:`ccdcal.colour.demosaic.colour_sources`: a frame's
    three colours share its file and each band of it, debayered once for the three).

    Parameters
    ----------
    colours : sequence of sequences
        One list of row sources per plane, each in frame order (a frame's planes are read one
        after another by one thread).
    matrices : sequence of array-like (3, 3)
        One per frame, for every plane.
    memory : str or int
        The budget for every plane's result and bands together.
    out_shape, reference, reject, sigma, weights, interpolation, zero, scale, scales, zeros, signal_tolerance, progress
        As :func:`stack`, for every plane.

    Returns
    -------
    list of StackResult
        One per plane, in the order given.
    """
    progress = resolve_progress(progress)
    budget = parse_memory(memory)
    groups = [list(frames) for frames in colours]
    if not groups or len({len(g) for g in groups}) != 1:
        raise InputError("stack_colours needs one list of frames per plane, all of the same length")
    matrices = list(matrices)
    options = _options(len(groups[0]), reject, sigma, weights, zero, scale, scales, zeros, signal_tolerance)
    opened: list[list[ResampledRows]] = []
    try:
        for frames in groups:
            opened.append(_open_sources(frames, matrices, out_shape, reference, interpolation))
        with RowThreads() as threads:
            return _stack_planes(opened, options, reference, budget, threads, progress)
    finally:
        for sources in opened:
            for source in sources:
                source.close()


def _stack_planes(groups: Sequence[Sequence[ResampledRows]], options: _Options, reference: int, budget: int,
                  threads: RowThreads, progress: ProgressOption = None) -> list[StackResult]:
    """Each group (a plane of the same frames, in frame order) stacked on its own, the groups'
    frames read and resampled together band by band."""
    n = len(groups[0])
    shape = groups[0][0].shape
    if n < 3 and options.reject != "none":
        warnings.warn(f"{n} frame(s): rejection needs at least 3 values per pixel, so nothing is rejected",
                      CcdcalWarning, stacklevel=3)
    every = [source for group in groups for source in group]
    # each frame's own rows (its planes one after another): in threads when each frame reads its own file
    own_files = all(s.reads_own_file for s in every)

    def frame_levels(i: int) -> list[tuple[float, float]]:
        return [_background(group[i]) for group in groups]

    levels = np.array(threads.map(frame_levels, range(n)) if own_files else [frame_levels(i) for i in range(n)])
    backgrounds, noise = levels[:, :, 0].T, levels[:, :, 1].T      # (groups, frames)
    notes: list[list[str]] = [[] for _ in groups]
    if options.reject != "none":
        for group, back, sigma, said in zip(groups, backgrounds, noise, notes, strict=True):
            note = _noise_models(group, back, sigma, options.reject)
            said += [note] if note else []
    plan = _plan(every, shape, budget, results=len(groups))
    readers = threads.workers if own_files and n > 1 else 1
    if readers > 1:     # a frame per thread when the budget gives as few bands so (a tight one: not)
        wide = _plan(every, shape, budget, readers, results=len(groups))
        if wide is not None and -(-shape[0] // wide.rows) == -(-shape[0] // plan.rows):
            plan = wide
        else:
            readers = 1
    buffers = [InputBuffers(plan.pixels, plan.raw) for _ in range(readers)]
    works = [_Work(group, plan, buffers, _Band(n, plan.rows, shape[1]), threads) for group in groups]
    if works[0].one_band:       # every frame's planes resampled once, together
        for work, whole in zip(works, _resample_together(works, 0, shape[0]), strict=True):
            work.whole = whole
    measured = options.scales is None and options.scale and n > 1
    brights = _bright_bins(works, backgrounds, noise, reference) if measured else [None] * len(works)
    factors = []
    for work, back, sigma, bright in zip(works, backgrounds, noise, brights, strict=True):   # a loop: warnings' depth
        factors.append(_factors(work, options, back, sigma, reference, bright))
    matched = [float(np.median(f[0] * back + f[1])) for f, back in zip(factors, backgrounds, strict=True)]
    combined = _combine_together(works, factors, options, matched, progress)
    results = []
    for group, f, back, sigma, (planes, frame_rejected), said in zip(groups, factors, backgrounds, noise, combined,
                                                                     notes, strict=True):
        header = stack_header([s.header for s in group], [s.name for s in group], reference=reference,
                              scales=f[0], zeros=f[1], weights=f[2], how=_describe(options, group[0].interpolation))
        data, unc, coverage, weight, rejected = planes
        results.append(StackResult(data=data, uncertainty=unc, coverage=coverage, weight=weight, rejected=rejected,
                                   mask=coverage == 0, header=header, scales=f[0], zeros=f[1], weights=f[2],
                                   backgrounds=back, noise=sigma, frame_rejected=frame_rejected, notes=said))
    return results


def _factors(work: _Work, options: _Options, backgrounds: np.ndarray, noise: np.ndarray,
             reference: int, bright: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (scales, zeros, weights): given, measured (from ``bright``, the work's
    :func:`_bright_bins`) or none (module docstring)."""
    n = len(work.sources)
    if options.scales is not None:
        scales = np.array(options.scales)
    elif options.scale and n > 1 and bright is not None:
        scales = _transparency(*bright, reference, [s.name for s in work.sources])
    else:
        scales = np.ones(n)
    if options.zeros is not None:
        zeros = np.array(options.zeros)
    elif options.zero:
        zeros = backgrounds[reference] * scales[reference] - scales * backgrounds
    else:
        zeros = np.zeros(n)
    if isinstance(options.weights, tuple):
        weights = np.array(options.weights)
    elif options.weights == "noise":
        sigma = scales * noise
        if not np.all(sigma > 0):
            raise InputError(f"{work.sources[int(np.argmin(sigma))].name}: its background noise is 0, so it"
                             " cannot be weighted by noise; use weights='none'")
        weights = 1.0 / sigma**2
    else:
        weights = np.ones(n)
    return scales, zeros, weights / weights.mean()


def _combine_together(works: Sequence[_Work], factors: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      options: _Options, levels: Sequence[float], progress: ProgressOption = None
                      ) -> list[tuple[tuple[np.ndarray, ...], np.ndarray]]:
    """Every band of each of ``works`` (planes of the same frames): per plane (data, uncertainty,
    coverage, weight, rejected) and the rejections per frame (n, 2). ``levels`` are the matched
    backgrounds; ``progress`` wraps the bands (:mod:`ccdcal._shared.progress`). Each band's frames
    are resampled for every plane together (:func:`_resample_together`), or read from the kept
    whole with one band."""
    ny, nx = works[0].sources[0].shape
    n = len(works[0].sources)
    params = [np.array([options.low, options.high, options.tolerance, level,
                        0.0 if options.reject == "none" else 1.0]) for level in levels]
    # a pixel's median comes from a sorting network run across a tile's pixels at once, and only a
    # pixel that loses a value is sorted; beyond _NETWORK_MOST frames every pixel is sorted (the
    # network grows as n log² n: 289 exchanges for 38 frames, 3,000-odd for 256)
    network = sorting_network(n) if n <= _NETWORK_MOST else np.empty((0, 2), np.int64)
    outs = [(np.empty((ny, nx), np.float32), np.empty((ny, nx), np.float32), np.empty((ny, nx), np.int16),
             np.empty((ny, nx), np.float32), np.empty((ny, nx), np.uint16)) for _ in works]
    members: list[list[np.ndarray]] = [[] for _ in works]
    rows_per_band = works[0].plan.rows
    for y0 in steps(range(0, ny, rows_per_band), "stacking", progress):
        y1 = min(ny, y0 + rows_per_band)
        bands = ([work.kept(y0, y1) for work in works] if works[0].one_band
                 else _resample_together(works, y0, y1))
        for (data, bad, err), (scales, zeros, weights), param, out, member_list in zip(
                bands, factors, params, outs, members, strict=True):
            rows = [plane[y0:y1] for plane in out]

            def run(r0: int, r1: int, data=data, bad=bad, err=err, rows=rows, scales=scales, zeros=zeros,
                    weights=weights, param=param, member_list=member_list) -> None:
                member = np.zeros((n, 2), np.int64)
                stack_rows(data, bad, err, scales, zeros, weights, param, network, r0, r1, *rows, member)
                member_list.append(member)

            works[0].threads.run(run, y1 - y0)
    return [(out, np.sum(member_list, axis=0) if member_list else np.zeros((n, 2), np.int64))
            for out, member_list in zip(outs, members, strict=True)]


# -- header ---------------------------------------------------------------------------------------------
def _describe(options: _Options, interpolation: str) -> str:
    parts = [f"weighted mean on the reference grid ({interpolation})"]
    if options.reject != "none":
        parts.append(f"noise rejection {options.low:g}/{options.high:g} (tolerance {options.tolerance:g})")
    parts.append("scales " + ("given" if options.scales else "measured" if options.scale else "none"))
    parts.append("zeros " + ("given" if options.zeros else "background" if options.zero else "none"))
    return ", ".join(parts)
