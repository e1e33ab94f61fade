"""Calibration arithmetic: overscan geometry and models, trimming, and the fused per-frame pass
(raw − overscan − bias − b·dark) / flat.

Pure functions over arrays, plus :class:`CalibratedRows`, which applies a recipe to
any row source lazily, row tile by row tile, so that master frames can be stacked
from calibrated members without holding them all in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .sections import Section, parse_section

OVERSCAN_MODELS = ("mean", "median", "legendre", "chebyshev")


@dataclass(frozen=True)
class OverscanSpec:
    """Where the overscan is and how it is modelled.

    Attributes
    ----------
    region : Section
        The overscan strip (resolved, FITS convention).
    axis : int
        Numpy axis along which the overscan is collapsed: 1 when the strip is a block
        of columns (one value per row), 0 when it is a block of rows (one per column).
    model : str
        ``"mean"``/``"median"``: the per-line statistic itself; ``"legendre"``/
        ``"chebyshev"``: a polynomial fitted to the per-line medians along the readout
        direction, with iterative ``sigma`` rejection.
    order : int
        Polynomial order of the fitted models.
    sigma : float
        Rejection threshold of the fit, in standard deviations of the residuals.
    maxiters : int
        Maximum rejection iterations of the fit.
    derived : bool
        True when the region was derived from DATASEC rather than read from BIASSEC.
    """

    region: Section
    axis: int
    model: str = "legendre"
    order: int = 3
    sigma: float = 3.0
    maxiters: int = 5
    derived: bool = False

    def describe(self) -> str:
        per = "row" if self.axis == 1 else "column"
        how = f"{self.model} per {per}" if self.model in ("mean", "median") else (
            f"median per {per}, {self.model.capitalize()} order {self.order}")
        source = " (from DATASEC)" if self.derived else ""
        return f"overscan {self.region}{source}, {how}"


def overscan_geometry(
    shape: tuple[int, int],
    biassec: str | None,
    trimsec: str | None,
    *,
    model: str = "legendre",
    order: int = 3,
    margin: int = 2,
) -> tuple[OverscanSpec | None, Section | None]:
    """The overscan spec and trim section of a raw frame of ``shape`` (ny, nx).

    ``biassec`` wins when given. Without it, when ``trimsec`` (TRIMSEC or DATASEC)
    leaves a strip of full-height columns (or full-width rows) unused, that strip is
    the overscan, less ``margin`` lines next to the data (charge bleeding into the
    first overscan lines). Without ``trimsec``, a BIASSEC strip is trimmed off.
    """
    if model not in OVERSCAN_MODELS:
        raise InputError(f"overscan model {model!r} is not one of {', '.join(OVERSCAN_MODELS)}")
    ny, nx = shape
    trim = parse_section(trimsec).resolve(shape) if trimsec else None
    if trim is not None and trim.shape == shape:
        trim = None
    bias = parse_section(biassec).resolve(shape) if biassec else None
    derived = False
    if bias is None and trim is not None:
        left, right = trim.x1 - 1, nx - trim.x2
        below, above = trim.y1 - 1, ny - trim.y2
        best = max(left, right, below, above)
        if best >= 3:
            derived = True
            if best == right:
                bias = Section(trim.x2 + 1 + min(margin, right - 1), nx, trim.y1, trim.y2)
            elif best == left:
                bias = Section(1, trim.x1 - 1 - min(margin, left - 1), trim.y1, trim.y2)
            elif best == above:
                bias = Section(trim.x1, trim.x2, trim.y2 + 1 + min(margin, above - 1), ny)
            else:
                bias = Section(trim.x1, trim.x2, 1, trim.y1 - 1 - min(margin, below - 1))
    if bias is None:
        return None, trim
    by, bx = bias.shape
    # A strip taller than wide holds whole rows' worth of overscan columns: one value per row.
    axis = 1 if by >= bx else 0
    if trim is None:
        if axis == 1:
            trim = Section(bias.x2 + 1, nx, 1, ny) if bias.x1 == 1 else Section(1, bias.x1 - 1, 1, ny)
        else:
            trim = Section(1, nx, bias.y2 + 1, ny) if bias.y1 == 1 else Section(1, nx, 1, bias.y1 - 1)
    spec = OverscanSpec(region=bias, axis=axis, model=model, order=order, derived=derived)
    return spec, trim


def fit_overscan(strip: np.ndarray, spec: OverscanSpec) -> np.ndarray:
    """The overscan level along the readout direction, from the overscan ``strip``.

    Returns a float64 array with one value per row (``axis=1``) or per column (``axis=0``).
    """
    strip = np.asarray(strip, dtype=np.float64)
    if spec.model == "mean":
        return np.nanmean(strip, axis=spec.axis)
    line = np.nanmedian(strip, axis=spec.axis)
    if spec.model == "median":
        return line
    x = np.linspace(-1.0, 1.0, line.size)
    fitter = np.polynomial.Legendre if spec.model == "legendre" else np.polynomial.Chebyshev
    good = np.isfinite(line)
    model = line.copy()
    for _ in range(max(spec.maxiters, 1)):
        if good.sum() <= spec.order + 1:
            break
        poly = fitter.fit(x[good], line[good], spec.order)
        model = poly(x)
        resid = line - model
        std = np.std(resid[good])
        new_good = np.isfinite(line) & (np.abs(resid) <= spec.sigma * std) if std > 0 else good
        if np.array_equal(new_good, good):
            break
        good = new_good
    return model


def trim_offsets(trim: Section | None) -> tuple[int, int]:
    """(row, column) numpy offsets of the trimmed image in the raw frame."""
    return (0, 0) if trim is None else (trim.y1 - 1, trim.x1 - 1)


@dataclass(frozen=True)
class Recipe:
    """What is done to one raw frame: overscan, trim, and the masters (by name) to apply."""

    overscan: OverscanSpec | None = None
    trim: Section | None = None
    bias: str | None = None
    dark: str | None = None
    dark_scale: float = 0.0
    flat: str | None = None

    def describe(self) -> str:
        parts = []
        if self.overscan is not None:
            parts.append(self.overscan.describe())
        if self.trim is not None:
            parts.append(f"trim {self.trim}")
        if self.bias:
            parts.append("bias")
        if self.dark:
            parts.append(f"dark ×{self.dark_scale:.3g}")
        if self.flat:
            parts.append("flat")
        return ", ".join(parts) if parts else "as is"


def apply_masters(
    data: np.ndarray,
    *,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    dark_scale: float = 1.0,
    flat: np.ndarray | None = None,
    flat_floor: float = 0.1,
) -> np.ndarray:
    """(data − bias − dark_scale·dark) / flat, in place on a float32 ``data``; returns it.

    Flat pixels below ``flat_floor`` (of the normalised flat) are not divided by: the
    value is left flat-uncorrected rather than exploding; callers mask them.
    """
    if bias is not None:
        data -= bias
    if dark is not None and dark_scale != 0.0:
        data -= np.float32(dark_scale) * dark
    if flat is not None:
        safe = np.where(flat >= flat_floor, flat, np.float32(1.0))
        data /= safe
    return data


class CalibratedRows:
    """A raw frame with its :class:`Recipe` applied lazily, row tile by row tile.

    Quacks like a row source (``shape``, ``read_rows``, ``header``, ``path``), so
    :func:`ccdcal.combine.combine` can stack calibrated members straight from disk.

    Parameters
    ----------
    source : row source
        The raw frame (e.g. :class:`ccdcal.frames.FrameSource`).
    recipe : Recipe
        What to do.
    masters : mapping of str to ndarray
        The master frames named in the recipe (already trimmed).
    flat_floor : float
        See :func:`apply_masters`.
    """

    def __init__(self, source: Any, recipe: Recipe, masters: dict[str, np.ndarray] | None = None,
                 *, flat_floor: float = 0.1):
        self.source = source
        self.recipe = recipe
        self.path = getattr(source, "path", None)
        self.header = getattr(source, "header", None)
        self.flat_floor = flat_floor
        masters = masters or {}
        self._bias = masters[recipe.bias] if recipe.bias else None
        self._dark = masters[recipe.dark] if recipe.dark else None
        self._flat = masters[recipe.flat] if recipe.flat else None
        self._offset = trim_offsets(recipe.trim)
        self.shape: tuple[int, int] = recipe.trim.shape if recipe.trim is not None else tuple(source.shape)
        for name, arr in (("bias", self._bias), ("dark", self._dark), ("flat", self._flat)):
            if arr is not None and arr.shape != self.shape:
                raise InputError(f"{self.path}: master {name} is {arr.shape[1]}x{arr.shape[0]} but the"
                                 f" frame is {self.shape[1]}x{self.shape[0]} after trimming")
        self._overscan: np.ndarray | None = None
        self.overscan_level: float | None = None

    def _overscan_model(self) -> np.ndarray:
        if self._overscan is None:
            spec = self.recipe.overscan
            rows, cols = spec.region.slices()
            strip = self.source.read_rows(rows.start, rows.stop)[:, cols]
            model = fit_overscan(strip, spec)
            # Index the model by raw row (axis=1) or raw column (axis=0) for any tile.
            full = np.zeros(self.source.shape[0] if spec.axis == 1 else self.source.shape[1])
            lo = rows.start if spec.axis == 1 else cols.start
            full[lo: lo + model.size] = model
            if spec.axis == 1:  # rows outside the strip's rows take the nearest fitted value
                full[:lo] = model[0]
                full[lo + model.size:] = model[-1]
            self._overscan = full
            self.overscan_level = float(np.mean(model))
        return self._overscan

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Calibrated rows ``y0:y1`` of the trimmed frame, float32."""
        r0, c0 = self._offset
        raw = self.source.read_rows(r0 + y0, r0 + y1)
        if self.recipe.overscan is not None:
            model = self._overscan_model()
            if self.recipe.overscan.axis == 1:
                raw -= model[r0 + y0: r0 + y1, None].astype(np.float32)
            else:
                raw -= model[None, :].astype(np.float32)
        data = raw[:, c0: c0 + self.shape[1]]
        data = np.ascontiguousarray(data)
        rows = slice(y0, y1)
        return apply_masters(
            data,
            bias=None if self._bias is None else self._bias[rows],
            dark=None if self._dark is None else self._dark[rows],
            dark_scale=self.recipe.dark_scale,
            flat=None if self._flat is None else self._flat[rows],
            flat_floor=self.flat_floor,
        )

    def read(self) -> np.ndarray:
        return self.read_rows(0, self.shape[0])


def normalise_flat(flat: np.ndarray, region: tuple[slice, slice] | None = None) -> tuple[np.ndarray, float]:
    """Divide a combined flat by the median of ``region`` (central half by default); return it and the level."""
    if region is None:
        ny, nx = flat.shape
        region = (slice(ny // 4, ny - ny // 4), slice(nx // 4, nx - nx // 4))
    level = float(np.nanmedian(flat[region]))
    if not np.isfinite(level) or level <= 0:
        raise InputError(f"the combined flat has a level of {level:g} in its central region; check the flat frames")
    return (flat / np.float32(level)).astype(np.float32), level


def dark_scale_for(exptime: float | None, dark_exptime: float | None) -> float:
    """Exposure ratio t_frame / t_dark (1 when either is unknown or the dark has 0 s)."""
    if exptime is None or not dark_exptime:
        return 1.0
    return float(exptime) / float(dark_exptime)
