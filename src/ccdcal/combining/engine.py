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

import math
import operator
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._repr import combine_html
from .._shared import pool
from .._shared._kernels import HIST16_PARTS, NO_BLANK, hist_be16
from .._shared.pool import LocalExecutor  # its threads restore the warning filters after
from .._shared.progress import ProgressOption, resolve_progress, steps
from ..errors import CcdcalWarning, InputError
from ..io.frames import FrameSource, write_fits
from ..io.headers import combined_header, header_gain, header_read_noise
from ..sections import to_slices
from . import _kernels, _level_kernels
from . import _kernels as K

METHODS = ("median", "mean", "sum")
SCALES = ("median", "mean", "clipped-mean", "none")
REJECTS = ("sigma", "mad", "winsorized", "percentile", "linear-fit", "ccdclip", "none")
CENTERS = ("median", "mean")
DEFAULT_THRESHOLDS = {"percentile": (0.2, 0.1)}  # every other algorithm: (3.0, 3.0)
DEFAULT_MEMORY = "1GiB"

_LEVEL_CODES = {"median": 0, "mean": 1, "clipped-mean": 2}
_TILE_TARGET = 16 << 20  # bytes of one tile's buffers (see _tile_rows)
# numba's workqueue threading layer must not be entered from two Python threads at once
# (the pipeline may run several combines in a thread pool): kernels run under this lock.
_KERNEL_LOCK = threading.Lock()


# -- results -----------------------------------------------------------------------------------
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
        extrema and iterative rejection together; None with rejection ``none``, with
        ``compat="ccdproc"``, and where the vectorised kernel ran with extrema rejection
        (it counts by value, which ties at a rank cut cannot attribute).
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

    def to_ccddata(self, unit: str = "adu") -> Any:
        """The result as ``astropy.nddata.CCDData``: data, uncertainty (``StdDevUncertainty``,
        NaN set to 0), mask (True where no value survived) and header."""
        from astropy.nddata import CCDData, StdDevUncertainty

        unc = None
        if self.uncertainty is not None:
            unc = StdDevUncertainty(np.where(np.isfinite(self.uncertainty), self.uncertainty, np.float32(0.0)))
        return CCDData(self.data, unit=unit, uncertainty=unc, mask=np.asarray(self.mask, dtype=bool),
                       header=self.header.copy())

    def write(self, path: Any, *, unit: str = "adu") -> Any:
        """Write the result as FITS, atomically (data; ``UNCERT`` and ``MASK`` extensions), as
        ``CCDData.read`` reads it; returns the path."""
        from pathlib import Path

        unc = None
        if self.uncertainty is not None:
            unc = np.where(np.isfinite(self.uncertainty), self.uncertainty, np.float32(0.0)).astype(np.float32)
        write_fits(Path(path), self.data, self.header, uncertainty=unc, mask=np.asarray(self.mask, np.uint8),
                   unit=unit)
        return Path(path)

    def _repr_html_(self) -> str:
        return combine_html(self)


@dataclass(frozen=True, eq=False)
class FrameFactors:
    """The per-frame factors of a combine (:func:`measure_factors`): measured once, used by
    every band of rows (:func:`combine_rows`). Picklable.

    Attributes
    ----------
    scales, zeros : ndarray, float64, (n,)
        Frame i's values become ``scales[i] · x + zeros[i]`` before any rejection.
    weights : ndarray, float64, (n,)
        Weights of a mean or sum (ones when none were given).
    """

    scales: np.ndarray
    zeros: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:
        arrays = [np.ascontiguousarray(getattr(self, name), dtype=np.float64)
                  for name in ("scales", "zeros", "weights")]
        if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
            raise InputError("frame factors are three 1-D arrays of one value per frame;"
                             " measure them with measure_factors")
        for name, values in zip(("scales", "zeros", "weights"), arrays, strict=True):
            object.__setattr__(self, name, values)


@dataclass(frozen=True, eq=False)
class TileResult:
    """Rows ``y0:y1`` of a combine (:func:`combine_rows`): those rows of the planes of
    :class:`CombineResult`, bit for bit.

    Attributes
    ----------
    y0, y1 : int
        The band: rows ``y0`` to ``y1 - 1`` (0-based, numpy order) of the result.
    data, uncertainty : ndarray, float32, (y1 - y0, nx)
    nlow_rejected, nhigh_rejected : ndarray, uint8 or uint16, (y1 - y0, nx)
    mask : ndarray, bool, (y1 - y0, nx)
    member_rejected : ndarray, int64, (n, 2) or None
        Rejections of each frame within these rows; summed over the bands of a whole
        image it is :attr:`CombineResult.member_rejected`.
    """

    y0: int
    y1: int
    data: np.ndarray
    uncertainty: np.ndarray
    nlow_rejected: np.ndarray
    nhigh_rejected: np.ndarray
    mask: np.ndarray
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


# -- row sources ---------------------------------------------------------------------------------
@runtime_checkable
class RowSource(Protocol):
    """A frame served by rows: what :func:`combine` streams.

    ``shape`` is (ny, nx), numpy order. ``read_rows(y0, y1)`` returns rows ``y0:y1``
    (0-based, end excluded) as float32 (y1 - y0, nx); NaN and ±inf values are ignored.
    The engine asks for increasing bands, from a thread of its own (it reads the next tile
    while it combines this one), one read at a time. Optional attributes: ``header`` (an astropy
    Header; the first frame's is the base of the result's), ``path`` or ``name`` (how the
    frame is named in messages and in IMCMBnnn). :class:`ccdcal.io.frames.FrameSource` is one;
    see :class:`RowSourceWithPlanes` for masks and uncertainties.
    """

    shape: tuple[int, int]

    def read_rows(self, y0: int, y1: int) -> np.ndarray: ...


class RowSourceWithPlanes(RowSource, Protocol):
    """A :class:`RowSource` that also serves a mask or uncertainties, by the same rows.

    Each method is optional: a source without that plane lacks it or sets it to None. The
    engine honours masks when any frame has one, and propagates uncertainties when every
    frame has them (not with ``compat="ccdproc"``).
    """

    def read_mask_rows(self, y0: int, y1: int) -> np.ndarray:
        """bool (y1 - y0, nx): True where the pixel is to be ignored."""
        ...

    def read_uncertainty_rows(self, y0: int, y1: int) -> np.ndarray:
        """float32 (y1 - y0, nx): the standard deviation of each pixel, in its units."""
        ...


class _FileRows(RowSource, Protocol):
    """The optional fast paths of a file (:class:`ccdcal.io.frames.FrameSource`).

    ``fill_rows(y0, y1, out, scratch)`` decodes rows into a given float32 buffer, with
    ``raw_bytes_per_row`` bytes of ``scratch`` per row. A ``raw16`` source serves its
    undecoded big-endian 16-bit rows through ``read_raw(y0, y1, out)``, decoded in the
    kernel with ``bscale``, ``bzero`` and ``blank`` (None: no BLANK); ``integral`` says its
    decoded values are whole numbers, so levels come from a histogram of the raw values.
    """

    raw16: bool
    integral: bool
    raw_bytes_per_row: int
    bscale: float
    bzero: float
    blank: int | None

    def fill_rows(self, y0: int, y1: int, out: np.ndarray, scratch: np.ndarray | None = None) -> None: ...

    def read_raw(self, y0: int, y1: int, out: np.ndarray) -> None: ...


@dataclass(frozen=True)
class _SourceTraits:
    """What the engine may ask of one source: the optional members of
    :class:`RowSourceWithPlanes` and of a file's fast paths (``_FileRows``)."""

    fills: bool              # fill_rows: decodes into the tile itself
    raw16: bool              # read_raw: undecoded 16-bit rows
    integral: bool           # raw16 with whole-number values: levels from a histogram
    raw_bytes_per_row: int   # scratch bytes a row read needs (0 for data in memory)
    mask: bool               # read_mask_rows
    uncertainty: bool        # read_uncertainty_rows


def _traits(source: Any) -> _SourceTraits:
    """The traits of ``source``, asked once."""
    return _SourceTraits(
        fills=callable(getattr(source, "fill_rows", None)),
        raw16=bool(getattr(source, "raw16", False)),
        integral=bool(getattr(source, "integral", False)),
        raw_bytes_per_row=int(getattr(source, "raw_bytes_per_row", 0) or 0),
        mask=getattr(source, "read_mask_rows", None) is not None,
        uncertainty=getattr(source, "read_uncertainty_rows", None) is not None,
    )


class _ArrayRows:
    """An in-memory frame (ndarray, masked array or CCDData) served by rows, with its mask
    and uncertainty planes when it has them (:class:`RowSourceWithPlanes`)."""

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

    @property
    def read_mask_rows(self) -> Callable[[int, int], np.ndarray] | None:
        return None if self.mask is None else self._mask_rows

    @property
    def read_uncertainty_rows(self) -> Callable[[int, int], np.ndarray] | None:
        return None if self.uncertainty is None else self._uncertainty_rows

    def _mask_rows(self, y0: int, y1: int) -> np.ndarray:
        return self.mask[y0:y1]

    def _uncertainty_rows(self, y0: int, y1: int) -> np.ndarray:
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
    if isinstance(frame, (str, os.PathLike)):
        return FrameSource(frame)
    if isinstance(frame, RowSource):
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


@dataclass(frozen=True, eq=False)
class _Inputs:
    """The frames of one combine as row sources: named, of one shape, classified once."""

    sources: tuple[Any, ...]
    names: tuple[str, ...]
    headers: tuple[Any, ...]
    traits: tuple[_SourceTraits, ...]
    shape: tuple[int, int]

    @property
    def n(self) -> int:
        return len(self.sources)

    @property
    def any_mask(self) -> bool:
        return any(t.mask for t in self.traits)

    @property
    def all_uncertainty(self) -> bool:
        return all(t.uncertainty for t in self.traits)

    @property
    def all_raw16(self) -> bool:
        return all(t.raw16 for t in self.traits)

    @property
    def all_integral(self) -> bool:
        return all(t.integral for t in self.traits)

    @property
    def raw_bytes_per_row(self) -> int:
        return max((t.raw_bytes_per_row for t in self.traits), default=0)


def _frame_list(frames: Any) -> Sequence[Any]:
    if isinstance(frames, (str, os.PathLike)) or not isinstance(frames, Sequence):
        frames = list(frames) if not isinstance(frames, (str, os.PathLike)) else [frames]
    if len(frames) == 0:
        raise InputError("nothing to combine: no frames given")
    return frames


@contextmanager
def _opened(frames: Sequence[Any]) -> Iterator[_Inputs]:
    """The frames as classified row sources; FrameSources are closed on the way out (a
    caller's own reopens on demand)."""

    sources = [_as_source(frame, i) for i, frame in enumerate(frames)]
    try:
        names = [_source_name(s, i) for i, s in enumerate(sources)]
        shape = (int(sources[0].shape[0]), int(sources[0].shape[1]))
        for source, name in zip(sources, names, strict=True):
            if tuple(source.shape) != shape:
                raise InputError(f"{name} is {source.shape[1]}x{source.shape[0]} but {names[0]} is"
                                 f" {shape[1]}x{shape[0]}; combine frames of one size")
        yield _Inputs(tuple(sources), tuple(names), tuple(getattr(s, "header", None) for s in sources),
                      tuple(_traits(s) for s in sources), shape)
    finally:
        for source in sources:
            if isinstance(source, FrameSource):
                source.close()


# -- options ---------------------------------------------------------------------------------------
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


def _per_frame_spec(spec: Any, what: str) -> Any:
    """A level name or None as it is; per-frame values as (nested) tuples of float, so the
    options stay hashable and compare by value ("none" means None)."""
    if spec is None or isinstance(spec, str):
        return None if spec == "none" else spec
    try:
        values = np.asarray(spec, dtype=float).tolist()
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} values must be finite numbers") from exc

    def frozen(v: Any) -> Any:
        return tuple(frozen(x) for x in v) if isinstance(v, list) else v

    return frozen(values)


def _given_factors(spec: Any, what: str, n: int) -> np.ndarray | None:
    """Given per-frame values (scale, zero or weights) checked against ``n`` frames, as
    float64 (n,); None for a level name or nothing."""
    if spec is None or isinstance(spec, str):
        return None
    values = np.asarray(spec, dtype=float)
    if values.shape != (n,):
        raise InputError(f"{what} has {values.size} values for {n} frames; give one per frame")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what} values must be finite numbers")
    if what == "scale" and np.any(values <= 0):
        raise InputError("scale factors must be positive")
    if what == "weights" and np.any(values <= 0):
        raise InputError("weights must be positive numbers")
    return values


@dataclass(frozen=True)
class CombineOptions:
    """Every choice of a combine, validated once: the keywords of :func:`combine` besides
    the frames and the memory budget, with the same names and meanings (see there).

    The constructor checks them (raising :class:`~ccdcal.errors.InputError` with the
    messages :func:`combine` gives) and fills in the defaults, so the fields say what will
    be done: ``reject`` and ``center`` are names; ``sigma_clip`` holds the thresholds
    (None only with ``reject="none"``); ``clip_extrema`` is None when no extrema are
    rejected; ``maxiters`` None repeats until a pass rejects nothing (1 with
    ``compat="ccdproc"``); ``gain`` (e-/ADU) and ``read_noise`` (e-) are numbers for
    ``ccdclip`` and None otherwise; ``scale`` and ``zero`` are a level name, a tuple of
    per-frame values or None; ``weights`` a tuple or None. :meth:`create` also reads ccdclip's
    gain and read noise from a header and checks per-frame values against the frame count.

    The object is frozen, hashable and picklable (it travels to worker processes), and it
    is the only code that knows how the kernels take their parameters
    (:meth:`kernel_params`).
    """

    method: str = "median"
    scale: str | tuple[float, ...] | None = None
    zero: str | tuple[float, ...] | None = None
    scale_region: str | None = None
    clip_extrema: tuple[int, int] | None = None
    sigma_clip: tuple[float, float] | None = None
    reject: str | None = None
    center: str | None = None
    maxiters: int | None = None
    weights: tuple[float, ...] | None = None
    gain: float | None = None
    read_noise: float | None = None
    sensitivity_noise: float = 0.0
    pedestal: float = 0.0
    compat: str | None = None

    def __post_init__(self) -> None:
        def resolve(**values: Any) -> None:
            for name, value in values.items():
                object.__setattr__(self, name, value)

        _check_name(self.method, METHODS, "method")
        if self.compat not in (None, "ccdproc"):
            raise InputError(f"compat {self.compat!r} is not understood; the only choice is 'ccdproc'")
        if self.clip_extrema is not None:
            resolve(clip_extrema=_pair(self.clip_extrema, "clip_extrema", int))
        reject = self.reject if self.reject is not None else ("sigma" if self.sigma_clip is not None else "none")
        _check_name(reject, REJECTS, "reject")
        if reject == "none" and self.sigma_clip is not None:
            raise InputError("sigma_clip thresholds were given with reject='none'; drop one of them")
        if self.sigma_clip is not None:
            resolve(sigma_clip=_pair(self.sigma_clip, "sigma_clip", float))
        elif reject != "none":
            resolve(sigma_clip=DEFAULT_THRESHOLDS.get(reject, (3.0, 3.0)))
        center = self.center if self.center is not None else ("mean" if self.compat else "median")
        resolve(reject=reject, center=_check_name(center, CENTERS, "center"))
        maxiters = self.maxiters
        if maxiters is not None and (not isinstance(maxiters, (int, np.integer)) or maxiters < 1):
            raise InputError(f"maxiters must be a whole number of at least 1, got {maxiters!r}")
        if self.weights is not None and self.method == "median":
            raise InputError("weights apply to mean and sum combines; use method='mean' or drop the weights")
        self._check_noise_model()
        resolve(maxiters=None if maxiters is None else int(maxiters), pedestal=float(self.pedestal),
                sensitivity_noise=float(self.sensitivity_noise))
        if self.compat:
            if reject not in ("sigma", "mad", "none"):
                raise InputError(f"compat='ccdproc' clips with 'sigma' or 'mad' only, not {reject!r}")
            if self.maxiters not in (None, 1):
                raise InputError("compat='ccdproc' clips in a single pass; leave maxiters unset")
            if self.zero is not None and not (isinstance(self.zero, str) and self.zero == "none"):
                raise InputError("compat='ccdproc' has no zero offsets; drop zero")
            resolve(maxiters=1)
        for what in ("scale", "zero"):
            spec = getattr(self, what)
            if isinstance(spec, str) and spec != "none":
                _check_name(spec, SCALES, what)
        resolve(scale=_per_frame_spec(self.scale, "scale"), zero=_per_frame_spec(self.zero, "zero"),
                weights=_per_frame_spec(self.weights, "weights"))

    def _check_noise_model(self) -> None:
        """ccdclip's gain and read noise, and the pedestal and sensitivity noise."""
        if self.reject == "ccdclip":
            gain, read_noise = self.gain, self.read_noise
            if not isinstance(gain, (int, float)) or not gain > 0:
                raise InputError("ccdclip needs the gain in e-/ADU; pass gain= (--gain) or set GAIN in the headers")
            if not isinstance(read_noise, (int, float)) or read_noise < 0:
                raise InputError("ccdclip needs the read noise in e-; pass read_noise= (--read-noise) or set RDNOISE")
            object.__setattr__(self, "gain", float(gain))
            object.__setattr__(self, "read_noise", float(read_noise))
        else:
            object.__setattr__(self, "gain", None)
            object.__setattr__(self, "read_noise", None)
        if math.isnan(self.pedestal) or self.pedestal == -math.inf:
            raise InputError(f"pedestal must be a number of ADU (or inf), got {self.pedestal!r}")
        if not (self.sensitivity_noise >= 0 and math.isfinite(self.sensitivity_noise)):
            raise InputError(f"sensitivity_noise must be 0 or more, got {self.sensitivity_noise!r}")

    @classmethod
    def create(cls, n_frames: int, *, header: Any = None, **choices: Any) -> CombineOptions:
        """Options for combining ``n_frames`` frames.

        ``choices`` are the fields (the keywords of :func:`combine`). With
        ``reject="ccdclip"``, a gain or read noise left None is read from ``header`` (the
        first frame's) by :mod:`ccdcal.io.headers`' rules: a gain only where the header states
        it in e-/ADU (EGAIN, or GAIN with an e-/ADU comment; a camera's GAIN *setting* such
        as ZWO's 0-600 never counts), RDNOISE/READNOIS/RON in e-. Per-frame ``scale``,
        ``zero`` and ``weights`` values must number ``n_frames``.
        """
        if choices.get("reject") == "ccdclip" and header is not None:
            if choices.get("gain") is None:
                choices["gain"] = header_gain(header)[0]
            if choices.get("read_noise") is None:
                choices["read_noise"] = header_read_noise(header)
        options = cls(**choices)
        options.check_frames(n_frames)
        return options

    def check_frames(self, n_frames: int) -> None:
        """Raise :class:`~ccdcal.errors.InputError` unless the per-frame values (scale, zero,
        weights) give one value for each of ``n_frames`` frames."""
        for what in ("scale", "zero", "weights"):
            _given_factors(getattr(self, what), what, n_frames)

    @property
    def low(self) -> float:
        """The low rejection threshold (the default one where nothing is rejected)."""
        return (self.sigma_clip or DEFAULT_THRESHOLDS.get(self.reject, (3.0, 3.0)))[0]

    @property
    def high(self) -> float:
        """The high rejection threshold (the default one where nothing is rejected)."""
        return (self.sigma_clip or DEFAULT_THRESHOLDS.get(self.reject, (3.0, 3.0)))[1]

    @property
    def nlow(self) -> int:
        return 0 if self.clip_extrema is None else self.clip_extrema[0]

    @property
    def nhigh(self) -> int:
        return 0 if self.clip_extrema is None else self.clip_extrema[1]

    def kernel(self, *, has_uncertainty: bool = False) -> str:
        """The kernel that combines: ``"ccdproc"`` (compat), ``"fast"`` (the vectorised one:
        rejection none or sigma, or ccdclip of frames neither scaled nor offset without
        extrema rejection; no weights, no input uncertainties) or ``"general"``.
        ``has_uncertainty``: every frame carries one."""
        if self.compat:
            return "ccdproc"
        unscaled = all(spec is None or (isinstance(spec, str) and spec == "none") for spec in (self.scale, self.zero))
        rejects = ("none", "sigma") + (("ccdclip",) if unscaled and self.nlow + self.nhigh == 0 else ())
        simple = self.reject in rejects and self.weights is None and not has_uncertainty
        return "fast" if simple else "general"

    def kernel_params(self, *, has_mask: bool = False,
                      has_uncertainty: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The (iparams int64, fparams float64) arrays of the kernel :meth:`kernel` picks.

        ``combine_tile`` and ``combine_tile_sorted`` share one layout (``_kernels.I_*`` and
        ``F_*``); ``combine_tile_ccdproc`` has its own. ``has_mask``: the tiles carry a
        validity plane; ``has_uncertainty``: every frame carries uncertainties.
        """

        kernel = self.kernel(has_uncertainty=has_uncertainty)
        method = {"median": K.MEDIAN, "mean": K.MEAN, "sum": K.SUM}[self.method]
        center = K.CENTER_MEAN if self.center == "mean" else K.CENTER_MEDIAN
        if kernel == "ccdproc":
            # method, nlow, nhigh, do_extrema, do_sigma, center, spread, has_valid, has_weights
            ints = [method, self.nlow, self.nhigh, int(self.clip_extrema is not None),
                    int(self.reject != "none"), center,
                    K.SPREAD_MAD if self.reject == "mad" else K.SPREAD_STD,
                    int(has_mask), int(self.weights is not None)]
            return np.array(ints, np.int64), np.array([self.low, self.high], np.float64)
        rejects = {"none": K.REJECT_NONE, "sigma": K.SIGMA, "mad": K.MAD, "winsorized": K.WINSORIZED,
                   "percentile": K.PERCENTILE, "linear-fit": K.LINEAR_FIT, "ccdclip": K.CCDCLIP}
        general = kernel == "general"  # follows frame indices: rejections are counted per member
        ints = {K.I_METHOD: method, K.I_NLOW: self.nlow, K.I_NHIGH: self.nhigh,
                K.I_REJECT: rejects[self.reject], K.I_CENTER: center, K.I_MAXITERS: self.maxiters or 0,
                K.I_HAS_VALID: int(has_mask), K.I_HAS_UNC: int(general and has_uncertainty),
                K.I_NEED_INDEX: int(general)}
        floats = {K.F_LOW: self.low, K.F_HIGH: self.high,
                  K.F_GAIN: 1.0 if self.gain is None else self.gain,
                  K.F_RDNOISE: 0.0 if self.read_noise is None else self.read_noise,
                  K.F_SNOISE: self.sensitivity_noise, K.F_PEDESTAL: self.pedestal}
        iparams = np.zeros(len(ints), np.int64)
        fparams = np.zeros(len(floats), np.float64)
        for index, value in ints.items():
            iparams[index] = value
        for index, value in floats.items():
            fparams[index] = value
        return iparams, fparams


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
    frames = _frame_list(frames)
    budget = parse_memory(memory)
    with _opened(frames) as inputs:
        options.check_frames(inputs.n)
        return _measure(inputs, options, budget, sample_pixels)


def _level_names(options: CombineOptions) -> list[str]:
    """The levels to measure: the names of ``scale`` and ``zero``, in that order."""
    return [how for how in (options.scale, options.zero) if isinstance(how, str)]


def _measure(inputs: _Inputs, options: CombineOptions, budget: int, sample_pixels: int | None = None,
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
        scales = _given_factors(options.scale, "scale", n)
    zeros = np.zeros(n)
    if isinstance(options.zero, str):
        scaled = scales * levels[options.zero]
        zeros = scaled.mean() - scaled
    elif options.zero is not None:
        zeros = _given_factors(options.zero, "zero", n)
    weights = _given_factors(options.weights, "weights", n)
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


def _region_levels(inputs: _Inputs, hows: Sequence[str], region: tuple[slice, slice],
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


def _histogram_ready(inputs: _Inputs, hows: Sequence[str]) -> bool:
    """Whether :func:`_histogram_levels` can measure ``hows`` of every source."""
    return inputs.all_integral and set(hows) <= {"median", "mean"}


def _histogram_levels(inputs: _Inputs, hows: Sequence[str], region: tuple[slice, slice],
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
    frames = _frame_list(frames)
    budget = parse_memory(memory)
    with _opened(frames) as inputs:
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

    frames = _frame_list(frames)
    tiles = sorted(tiles, key=lambda t: t.y0)
    with _opened(frames) as inputs:
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


def _check_band(inputs: _Inputs, factors: FrameFactors, y0: Any, y1: Any) -> tuple[int, int]:
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


def _tile_plan(inputs: _Inputs, options: CombineOptions, budget: int, height: int) -> _TilePlan:
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

    def __init__(self, inputs: _Inputs, plan: _TilePlan, options: CombineOptions, factors: FrameFactors):
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


def _read_tile(inputs: _Inputs, plan: _TilePlan, ws: _Workspace, y0: int, y1: int) -> None:
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


def _combine_band(inputs: _Inputs, options: CombineOptions, factors: FrameFactors, plan: _TilePlan,
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
    frames = _frame_list(frames)
    budget = parse_memory(memory)
    with _opened(frames) as inputs:
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


def _combine_all(inputs: _Inputs, options: CombineOptions, budget: int,
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

