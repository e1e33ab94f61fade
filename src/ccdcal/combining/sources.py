"""The frames of a combine as row sources: the :class:`RowSource` protocols, in-memory frames
served by rows, and the classified inputs of one combine (:func:`opened`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError
from ..io.frames import FrameSource


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
class Inputs:
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


def frame_list(frames: Any) -> Sequence[Any]:
    if isinstance(frames, (str, os.PathLike)) or not isinstance(frames, Sequence):
        frames = list(frames) if not isinstance(frames, (str, os.PathLike)) else [frames]
    if len(frames) == 0:
        raise InputError("nothing to combine: no frames given")
    return frames


@contextmanager
def opened(frames: Sequence[Any]) -> Iterator[Inputs]:
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
        yield Inputs(tuple(sources), tuple(names), tuple(getattr(s, "header", None) for s in sources),
                      tuple(_traits(s) for s in sources), shape)
    finally:
        for source in sources:
            if isinstance(source, FrameSource):
                source.close()
