"""What a combine gives back: :class:`CombineResult` (a whole image), :class:`FrameFactors`
(the per-frame factors of its first pass) and :class:`TileResult` (a band of its rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._repr import combine_html
from ..errors import InputError
from ..io.writer import write_fits


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
