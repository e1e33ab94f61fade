"""Overscan geometry and models: where the overscan strip is (BIASSEC, or derived from
DATASEC/TRIMSEC), how it is collapsed and fitted along the readout direction, and the
trimmed data section. Pure functions over arrays and section strings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._shared.robust import median_function, robust_std
from ..errors import InputError
from ..sections import Section, parse_section

OVERSCAN_MODELS = ("mean", "median", "legendre", "chebyshev", "spline")

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
        ``"chebyshev"``: a polynomial of degree ``order`` fitted to the per-line
        medians along the readout direction; ``"spline"``: a least-squares cubic
        spline with ``order`` equal pieces. Fits reject outliers iteratively at ``sigma``.
    order : int
        Polynomial degree, or number of spline pieces.
    sigma : float
        Rejection threshold of the fit, in robust standard deviations of the residuals.
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
        if self.model in ("mean", "median"):
            how = f"{self.model} per {per}"
        elif self.model == "spline":
            how = f"median per {per}, cubic spline {self.order} pieces"
        else:
            how = f"median per {per}, {self.model.capitalize()} order {self.order}"
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
    axis: int | None = None,
    sigma: float = 3.0,
) -> tuple[OverscanSpec | None, Section | None]:
    """The overscan spec and trim section of a raw frame of ``shape`` (ny, nx).

    ``biassec`` wins when given. Without it, when ``trimsec`` (TRIMSEC or DATASEC)
    leaves a strip of full-height columns (or full-width rows) unused, that strip is
    the overscan, less ``margin`` lines next to the data (charge bleeding into the
    first overscan lines). Without ``trimsec``, a BIASSEC strip is trimmed off.

    ``axis`` (numpy axis collapsed: 1 = one value per row, 0 = one per column) is
    taken from the strip's shape (taller than wide: per row) unless given.
    """
    if model not in OVERSCAN_MODELS:
        raise InputError(f"overscan model {model!r} is not one of {', '.join(OVERSCAN_MODELS)}")
    if axis not in (None, 0, 1):
        raise InputError(f"overscan axis {axis!r}: use 1 (one value per row) or 0 (one per column)")
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
    if axis is None:
        # A strip taller than wide holds whole rows' worth of overscan columns: one value per row.
        axis = 1 if by >= bx else 0
    if trim is None:
        if axis == 1:
            trim = Section(bias.x2 + 1, nx, 1, ny) if bias.x1 == 1 else Section(1, bias.x1 - 1, 1, ny)
        else:
            trim = Section(1, nx, bias.y2 + 1, ny) if bias.y1 == 1 else Section(1, nx, 1, bias.y1 - 1)
    spec = OverscanSpec(region=bias, axis=axis, model=model, order=order, sigma=sigma, derived=derived)
    return spec, trim


@dataclass(frozen=True)
class OverscanFit:
    """The fitted overscan of one frame.

    Attributes
    ----------
    model : ndarray, float64
        Level (ADU) per line along the readout direction (per row for ``axis=1``).
    coefficients : tuple of float
        Polynomial coefficients (Legendre/Chebyshev basis on x in [-1, 1]); empty otherwise.
    rejected : int
        Lines rejected by the fit.
    noise : float
        Robust standard deviation (ADU) of the strip about the model: the read noise of the frame.
    """

    model: np.ndarray
    coefficients: tuple[float, ...] = ()
    rejected: int = 0
    noise: float = float("nan")

    @property
    def level(self) -> float:
        return float(np.mean(self.model))


def _spline_fit(x: np.ndarray, y: np.ndarray, pieces: int) -> Any:
    from scipy.interpolate import LSQUnivariateSpline

    pieces = max(int(pieces), 1)
    knots = np.linspace(x[0], x[-1], pieces + 1)[1:-1]
    return LSQUnivariateSpline(x, y, knots, k=3)


def overscan_fit(strip: np.ndarray, spec: OverscanSpec) -> OverscanFit:
    """Fit the overscan ``strip`` (ADU) along the readout direction; see :class:`OverscanSpec`."""
    strip = np.asarray(strip, dtype=np.float64)
    if spec.model == "mean":
        line = np.nanmean(strip, axis=spec.axis)
    else:
        line = median_function(strip)(strip, axis=spec.axis)
    model = line.copy()
    coefficients: tuple[float, ...] = ()
    finite = np.isfinite(line)
    good = finite.copy()
    if spec.model not in ("mean", "median"):
        x = np.linspace(-1.0, 1.0, line.size)
        need = spec.order + 1 if spec.model != "spline" else spec.order + 4
        for _ in range(max(spec.maxiters, 1)):
            if good.sum() <= need:
                break
            if spec.model == "spline":
                fit = _spline_fit(x[good], line[good], spec.order)
            else:
                family = np.polynomial.Legendre if spec.model == "legendre" else np.polynomial.Chebyshev
                fit = family.fit(x[good], line[good], spec.order, domain=[-1.0, 1.0])
                coefficients = tuple(float(c) for c in fit.coef)
            model = fit(x)
            resid = line - model
            spread = robust_std(resid[good])
            if not spread > 0:
                break
            new_good = finite & (np.abs(resid) <= spec.sigma * spread)
            if np.array_equal(new_good, good):
                break
            good = new_good
    expanded = model[:, None] if spec.axis == 1 else model[None, :]
    noise = robust_std(strip - expanded)
    return OverscanFit(model=model, coefficients=coefficients, rejected=int(finite.sum() - good.sum()),
                       noise=noise)


def overscan_image(fit: OverscanFit, spec: OverscanSpec, shape: tuple[int, int]) -> np.ndarray:
    """The fitted overscan as a per-raw-line vector (length ny for ``axis=1``, nx for ``axis=0``).

    Lines outside the strip's extent take the nearest fitted value.
    """
    rows, cols = spec.region.slices()
    model = fit.model
    full = np.zeros(shape[0] if spec.axis == 1 else shape[1])
    lo = rows.start if spec.axis == 1 else cols.start
    full[lo: lo + model.size] = model
    full[:lo] = model[0]
    full[lo + model.size:] = model[-1]
    return full


def trim_offsets(trim: Section | None) -> tuple[int, int]:
    """(row, column) numpy offsets of the trimmed image in the raw frame."""
    return (0, 0) if trim is None else (trim.y1 - 1, trim.x1 - 1)
