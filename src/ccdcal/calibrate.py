"""Calibration arithmetic: overscan geometry and models, trimming, the fused per-frame pass
(raw − overscan − bias − k·dark) / flat, gain, per-pixel uncertainty, bad-pixel masks and
dark optimisation.

Pure functions over arrays, plus :class:`CalibratedRows`, which applies a recipe to
any row source lazily, row tile by row tile, so that master frames can be stacked
from calibrated members without holding them all in memory, and
:func:`calibrate_frame`, which calibrates one whole frame with uncertainty and mask.

Mask bits (the ``MASK`` extension, uint8; a pixel is bad when any bit is set):

====  ===================  ==========================================================
bit   name                 meaning
====  ===================  ==========================================================
1     ``MASK_SATURATED``   raw value (before any subtraction) at or above saturation
2     ``MASK_HOT``         hot pixel: the master dark is far above its noise there
4     ``MASK_LOW_FLAT``    dead or weak pixel: normalised flat below the floor (the
                           value is not divided by the flat there)
8     ``MASK_COSMIC_RAY``  cosmic-ray hit (astroscrappy L.A.Cosmic; flagged, not cleaned)
16    ``MASK_USER``        set in the user's bad-pixel map
32    ``MASK_NO_DATA``     no valid value in a master at this pixel (all rejected/NaN)
====  ===================  ==========================================================

Units: raw frames, masters and the arithmetic are in ADU; ``gain`` is in e-/ADU;
read noise is in ADU inside this module (header ``RDNOISE`` is in electrons, as in IRAF).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError
from .sections import Section, parse_section

OVERSCAN_MODELS = ("mean", "median", "legendre", "chebyshev", "spline")

MASK_SATURATED = 1
MASK_HOT = 2
MASK_LOW_FLAT = 4
MASK_COSMIC_RAY = 8
MASK_USER = 16
MASK_NO_DATA = 32
MASK_BITS = {
    MASK_SATURATED: "saturated in the raw frame",
    MASK_HOT: "hot pixel in the master dark",
    MASK_LOW_FLAT: "dead or weak pixel: flat below the floor, not flat-fielded",
    MASK_COSMIC_RAY: "cosmic ray (astroscrappy), flagged not cleaned",
    MASK_USER: "user bad-pixel map",
    MASK_NO_DATA: "no valid value in a master frame",
}

MAD_TO_STD = 1.482602218505602


def robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated as 1.4826 × the median absolute deviation (finite values only)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return float(MAD_TO_STD * np.median(np.abs(values - np.median(values))))


def clipped_std(values: np.ndarray, *, sigma: float = 4.0, maxiters: int = 5) -> float:
    """Standard deviation after iterative ``sigma`` clipping about the median (finite values only).

    Unlike the MAD, it is not biased by integer-quantised data (raw ADU differences).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan")
    centre, spread = float(np.median(values)), robust_std(values)
    if not spread > 0:
        spread = float(np.std(values))
    kept = values
    for _ in range(maxiters):
        new = values[np.abs(values - centre) <= sigma * spread]
        if new.size < 2:
            break
        centre, spread = float(np.mean(new)), float(np.std(new, ddof=1))
        if new.size == kept.size:
            break
        kept = new
    return spread


# -- overscan --------------------------------------------------------------------------------
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
        line = np.nanmedian(strip, axis=spec.axis)
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


# -- recipe and the lazy row pass ------------------------------------------------------------
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
    value is left flat-uncorrected rather than exploding; callers mask them
    (:data:`MASK_LOW_FLAT`).
    """
    if bias is not None:
        data -= bias
    if dark is not None and dark_scale != 0.0:
        data -= np.float32(dark_scale) * dark
    if flat is not None:
        data /= safe_flat(flat, flat_floor)
    return data


def safe_flat(flat: np.ndarray, flat_floor: float) -> np.ndarray:
    """The flat with every pixel below ``flat_floor`` (or not finite) replaced by 1."""
    flat = np.asarray(flat, dtype=np.float32)
    return np.where(np.isfinite(flat) & (flat >= flat_floor), flat, np.float32(1.0))


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
        self.overscan: OverscanFit | None = None

    def _overscan_model(self) -> np.ndarray:
        if self._overscan is None:
            spec = self.recipe.overscan
            rows, cols = spec.region.slices()
            strip = self.source.read_rows(rows.start, rows.stop)[:, cols]
            self.overscan = overscan_fit(strip, spec)
            self._overscan = overscan_image(self.overscan, spec, tuple(self.source.shape))
            self.overscan_level = self.overscan.level
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


# -- masters: flat normalisation, dark scaling, hot pixels, read noise, gain ---------------------
FLAT_NORMS = ("median", "clipped-mean")


def central_region(shape: tuple[int, int]) -> tuple[slice, slice]:
    """The central half (in each axis) of an image of ``shape`` (ny, nx)."""
    ny, nx = shape
    return (slice(ny // 4, ny - ny // 4), slice(nx // 4, nx - nx // 4))


def flat_level(flat: np.ndarray, region: tuple[slice, slice] | None = None, *, method: str = "median") -> float:
    """Level of a combined flat in ``region`` (central half by default): median or 3σ-clipped mean."""
    if method not in FLAT_NORMS:
        raise InputError(f"flat normalisation {method!r} is not one of {', '.join(FLAT_NORMS)}")
    values = np.asarray(flat[region if region is not None else central_region(flat.shape)], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    if method == "median":
        return float(np.median(values))
    from astropy.stats import sigma_clipped_stats

    mean, _, _ = sigma_clipped_stats(values, sigma=3.0, maxiters=10)
    return float(mean)


def normalise_flat(flat: np.ndarray, region: tuple[slice, slice] | None = None, *,
                   method: str = "median") -> tuple[np.ndarray, float]:
    """Divide a combined flat by its level (see :func:`flat_level`); return it (float32) and the level."""
    level = flat_level(flat, region, method=method)
    if not np.isfinite(level) or level <= 0:
        raise InputError(f"the combined flat has a level of {level:g} in its central region; check the flat frames")
    return (flat / np.float32(level)).astype(np.float32), level


def low_flat_mask(flat: np.ndarray, flat_floor: float) -> np.ndarray:
    """Dead or weak pixels of a normalised flat: below ``flat_floor`` or not finite (bool)."""
    flat = np.asarray(flat)
    return ~np.isfinite(flat) | (flat < flat_floor)


def dark_scale_for(exptime: float | None, dark_exptime: float | None) -> float:
    """Exposure ratio t_frame / t_dark (1 when either is unknown or the dark has 0 s)."""
    if exptime is None or not dark_exptime:
        return 1.0
    return float(exptime) / float(dark_exptime)


def choose_dark(exptime: float | None, darks: dict[str, float | None], *, tolerance: float = 0.01,
                counts: dict[str, int] | None = None, temperature: float | None = None,
                temperatures: dict[str, float | None] | None = None,
                temp_tolerance: float = 2.0) -> str | None:
    """The master dark (name → exposure in s) for a frame of ``exptime`` seconds.

    Temperature first, but only as a tolerance: darks whose temperature is within
    ``temp_tolerance`` (°C) of the frame's are equivalent (detector temperatures jitter
    by tenths of a degree; a 0.03 °C closer dark of the wrong exposure is worse). With
    none within it, the darks within ``temp_tolerance`` of the nearest one are the
    candidates. Among the candidates an exact exposure (within ``tolerance``, relative)
    wins; else, among the darks at least as long (scaling down never amplifies a dark's
    noise): with ``counts`` (frames combined per master), the one adding least noise,
    scale/sqrt(count); without, the shortest. With no longer dark, the longest. Ties go
    to the nearest temperature.
    """
    if not darks:
        return None
    temps = temperatures or {}
    candidates = dict(darks)
    known_t = {n: t for n, t in temps.items() if n in darks and t is not None}
    if temperature is not None and known_t:
        distance = {n: abs(t - temperature) for n, t in known_t.items()}
        closest = min(distance, key=distance.__getitem__)
        if distance[closest] <= temp_tolerance:
            candidates = {n: darks[n] for n, d in distance.items() if d <= temp_tolerance}
        else:
            t_near = known_t[closest]
            candidates = {n: darks[n] for n, t in known_t.items() if abs(t - t_near) <= temp_tolerance}

    def off(name: str) -> float:
        t = temps.get(name)
        return abs(t - temperature) if (t is not None and temperature is not None) else 0.0

    known = {name: t for name, t in candidates.items() if t is not None}
    if exptime is None or not known:
        return min(candidates, key=off)
    exact = [n for n, t in known.items() if abs(t - exptime) <= tolerance * max(exptime, 1e-9)]
    if exact:
        return min(exact, key=off)
    longer = [n for n, t in known.items() if t >= exptime]
    if longer and counts:
        return min(longer, key=lambda n: ((exptime / known[n]) / counts.get(n, 1) ** 0.5, off(n)))
    if longer:
        return min(longer, key=lambda n: (known[n], off(n)))
    return max(known, key=lambda n: (known[n], -off(n)))


def hot_pixel_mask(dark: np.ndarray, *, sigma: float = 5.0, uncertainty: np.ndarray | None = None) -> np.ndarray:
    """Hot pixels of a bias-subtracted master dark (bool).

    A pixel is hot when it exceeds the frame's median dark by more than ``sigma`` times
    its noise: the larger of the frame's robust standard deviation (1.4826 × MAD) and,
    when given, the pixel's own ``uncertainty``.
    """
    dark = np.asarray(dark, dtype=np.float32)
    finite = np.isfinite(dark)
    if not finite.any():
        return np.zeros(dark.shape, dtype=bool)
    sample = dark[finite]
    if sample.size > 1_000_000:
        sample = sample[:: sample.size // 1_000_000]
    centre = float(np.median(sample))
    noise = robust_std(sample)
    if uncertainty is not None:
        noise = np.maximum(noise, np.nan_to_num(np.asarray(uncertainty, dtype=np.float32), nan=0.0))
    if np.all(np.asarray(noise) <= 0):
        return np.zeros(dark.shape, dtype=bool)
    return finite & (dark - np.float32(centre) > sigma * noise)


def read_noise_from_pair(first: np.ndarray, second: np.ndarray) -> float:
    """Read noise (ADU) of one frame from two bias frames: robust std of their difference / sqrt(2).

    Fixed structure (bias pattern, hot pixels) cancels in the difference; a 4-sigma
    clipped standard deviation ignores the few pixels that do not (cosmic rays).
    """
    diff = np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)
    return clipped_std(diff) / np.sqrt(2.0)


def gain_from_flat_pair(first: np.ndarray, second: np.ndarray, *, read_noise: float,
                        region: tuple[slice, slice] | None = None) -> float:
    """Photon-transfer gain (e-/ADU) from two bias-subtracted flats of similar level.

    With r = S1/S2 (levels S), ``var(F1 − r·F2) = (1 + r)·S1/g + (1 + r²)·rn²`` in
    ADU², so ``g = (1 + r)·S1 / (var − (1 + r²)·rn²)``; the flat pattern cancels in
    the difference. The variance is a 4-sigma clipped one over ``region`` (central half).
    """
    region = region if region is not None else central_region(first.shape)
    a = np.asarray(first[region], dtype=np.float64)
    b = np.asarray(second[region], dtype=np.float64)
    s1, s2 = float(np.nanmedian(a)), float(np.nanmedian(b))
    if not (s1 > 0 and s2 > 0):
        return float("nan")
    r = s1 / s2
    var = clipped_std(a - r * b) ** 2 - (1.0 + r * r) * read_noise**2
    return float((1.0 + r) * s1 / var) if var > 0 else float("nan")


_GAIN_WORDS = ("e-/adu", "e/adu", "electrons/adu", "e-/dn", "e/dn", "e-/count", "electrons per adu", "e-/ad")


def header_gain(header: Any) -> tuple[float | None, str]:
    """Gain (e-/ADU) that a header states unambiguously, and where it came from.

    ``EGAIN`` is trusted. ``GAIN`` is trusted only when its comment says e-/ADU: on many
    cameras it is a gain *setting* or index (Nickel: ``DCS GAIN INDEX``; ZWO: 0–600).
    """
    if header is None:
        return None, "no header"
    for key in ("EGAIN", "GAIN", "CCDGAIN"):
        if key not in header:
            continue
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            continue
        comment = str(header.comments[key]).lower().replace(" ", "")
        if key == "EGAIN" or any(w.replace(" ", "") in comment for w in _GAIN_WORDS):
            return float(value), key
    if "GAIN" in header:
        return None, f"GAIN = {header['GAIN']!r} ({header.comments['GAIN'] or 'no comment'}) is not stated in e-/ADU"
    return None, "no gain keyword"


def header_read_noise(header: Any) -> float | None:
    """Read noise in electrons from RDNOISE/READNOIS/RON, when the header has a positive number."""
    if header is None:
        return None
    for key in ("RDNOISE", "READNOIS", "RON", "READNOISE"):
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def exposure_of(header: Any, *, dark: bool = False) -> float | None:
    """Seconds of exposure from a header: EXPTIME, EXPOSURE, (ITIME); ``dark=True`` prefers DARKTIME.

    A DARKTIME shorter than the exposure is a shutter-open time, not the time dark current
    accumulated (some robotic observatories write one): it is ignored.
    """
    if header is None:
        return None
    exposure = None
    for key in ("EXPTIME", "EXPOSURE", "ITIME"):
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
            exposure = float(value)
            break
    darktime = header.get("DARKTIME")
    if dark and isinstance(darktime, (int, float)) and not isinstance(darktime, bool):
        if darktime >= 0 and (exposure is None or darktime >= exposure * (1 - 1e-6)):
            return float(darktime)
    return exposure


# -- dark optimisation -----------------------------------------------------------------------
def _high_pass(image: np.ndarray, box: int) -> np.ndarray:
    from scipy.ndimage import median_filter

    image = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return image - median_filter(image, size=box, mode="nearest")


def optimize_dark_scale(frame: np.ndarray, dark: np.ndarray, *, mask: np.ndarray | None = None,
                        box: int = 5, threshold: float = 8.0, sigma: float = 4.0, maxiters: int = 10,
                        min_pixels: int = 30) -> tuple[float | None, int]:
    """The dark scale ``k`` that minimises the noise of ``frame − k·dark``.

    Definition: with H = image − median_filter(image, ``box``) (a high-pass that keeps
    isolated structure such as hot pixels and drops sky, vignetting and smooth
    gradients), k is the least-squares solution
    ``k = Σ H(frame)·H(dark) / Σ H(dark)²`` over the pixels where the dark has
    signal, ``|H(dark)| > threshold × robust std(H(dark))`` — exactly the k that
    minimises ``Σ (H(frame) − k·H(dark))²``, the high-pass noise of the result there.
    Pixels whose residual is beyond ``sigma`` robust standard deviations (stars, cosmic
    rays, saturation) are rejected and k is refitted, at most ``maxiters`` times.
    Restricting to significant dark pixels keeps the dark's own noise from biasing k
    toward 0 (errors-in-variables).

    Parameters
    ----------
    frame : ndarray
        The light after overscan and bias subtraction (ADU), trimmed.
    dark : ndarray
        The bias-subtracted master dark (ADU), same shape.
    mask : ndarray of bool, optional
        Pixels to ignore (saturated, user bad pixels).

    Returns
    -------
    (k, n) : (float or None, int)
        The scale, or None when fewer than ``min_pixels`` pixels carry dark signal
        (a dark without structure cannot be optimised); n pixels used.
    """
    hd = _high_pass(dark, box)
    noise = robust_std(hd[:: max(1, hd.size // 1_000_000)])
    if not noise > 0:
        return None, 0
    use = np.abs(hd) > threshold * noise
    use &= np.isfinite(frame) & np.isfinite(dark)
    if mask is not None:
        use &= ~np.asarray(mask, dtype=bool)
    if use.sum() < min_pixels:
        return None, int(use.sum())
    hl = _high_pass(frame, box)
    x = hd[use].astype(np.float64)
    y = hl[use].astype(np.float64)
    keep = np.ones(x.size, dtype=bool)
    k = float(np.sum(x * y) / np.sum(x * x))
    for _ in range(maxiters):
        resid = y - k * x
        spread = robust_std(resid[keep])
        if not spread > 0:
            break
        new_keep = np.abs(resid - np.median(resid[keep])) <= sigma * spread
        if new_keep.sum() < min_pixels:
            break
        k = float(np.sum(x[new_keep] * y[new_keep]) / np.sum(x[new_keep] ** 2))
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return k, int(keep.sum())


# -- uncertainty, masks, the whole-frame pass --------------------------------------------------
@dataclass(frozen=True)
class Master:
    """A master frame as the calibration needs it (trimmed, ADU; flats normalised).

    Attributes
    ----------
    data : ndarray, float32
    uncertainty : ndarray, optional
        Standard deviation per pixel, same units as ``data``.
    mask : ndarray, optional
        uint8 bitmask (bits as in this module) or bool (True = no valid data).
    name, datasum : str, optional
        File name and DATASUM, recorded in the calibrated header.
    exptime : float, optional
        Exposure (dark time) of a master dark, seconds.
    level : float, optional
        FLATNORM of a master flat: the level it was divided by.
    """

    data: np.ndarray
    uncertainty: np.ndarray | None = None
    mask: np.ndarray | None = None
    name: str | None = None
    datasum: str | None = None
    exptime: float | None = None
    level: float | None = None

    def bits(self, keep: int) -> np.ndarray | None:
        """The mask bits in ``keep`` (a bool mask counts as :data:`MASK_NO_DATA`)."""
        if self.mask is None:
            return None
        if self.mask.dtype == bool:
            return np.where(self.mask, np.uint8(MASK_NO_DATA), np.uint8(0)) & np.uint8(keep)
        return np.asarray(self.mask, dtype=np.uint8) & np.uint8(keep)


def calibrated_uncertainty(
    signal: np.ndarray,
    *,
    read_noise: float,
    gain: float,
    bias_uncertainty: np.ndarray | None = None,
    dark_uncertainty: np.ndarray | None = None,
    dark_scale: float = 1.0,
    flat: np.ndarray | None = None,
    flat_uncertainty: np.ndarray | None = None,
    calibrated: np.ndarray | None = None,
) -> np.ndarray:
    """Standard deviation (ADU) of each pixel of a calibrated frame.

    Before the flat, in ADU²::

        var = read_noise² + max(signal, 0) / gain + σ_bias² + (k·σ_dark)²

    where ``signal`` is the frame after overscan and bias subtraction (photo- and
    dark-current charge, whose Poisson noise counts). Dividing by the flat F (the
    floored flat, as applied) with uncertainty σ_F gives::

        σ² = var / F² + calibrated² · (σ_F / F)²

    Parameters
    ----------
    signal : ndarray
        ADU above bias, before dark subtraction and flat fielding.
    read_noise : float
        ADU.
    gain : float
        e-/ADU.
    calibrated : ndarray, optional
        The calibrated value (needed with ``flat_uncertainty``).
    """
    if not gain > 0:
        raise InputError(f"gain must be positive to compute the uncertainty, got {gain!r}")
    var = np.maximum(np.asarray(signal, dtype=np.float32), np.float32(0.0)) / np.float32(gain)
    var += np.float32(read_noise) ** 2
    if bias_uncertainty is not None:
        var += np.nan_to_num(np.asarray(bias_uncertainty, dtype=np.float32), nan=0.0) ** 2
    if dark_uncertainty is not None and dark_scale:
        var += (np.float32(dark_scale) * np.nan_to_num(np.asarray(dark_uncertainty, dtype=np.float32), nan=0.0)) ** 2
    if flat is not None:
        f = np.asarray(flat, dtype=np.float32)
        var /= f * f
        if flat_uncertainty is not None and calibrated is not None:
            rel = np.nan_to_num(np.asarray(flat_uncertainty, dtype=np.float32), nan=0.0) / f
            var += (np.nan_to_num(np.asarray(calibrated, dtype=np.float32), nan=0.0) * rel) ** 2
    return np.sqrt(var).astype(np.float32)


def cosmic_ray_mask(data: np.ndarray, *, gain: float | None, read_noise: float | None,
                    mask: np.ndarray | None = None, sigclip: float = 4.5, objlim: float = 5.0,
                    saturation: float | None = None) -> np.ndarray:
    """Cosmic rays of a calibrated frame (ADU) by L.A.Cosmic (astroscrappy); bool.

    ``read_noise`` in ADU; without a gain, 1 e-/ADU is assumed (only the noise model's
    scale changes).
    """
    try:
        import astroscrappy
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise InputError("cosmic-ray detection needs astroscrappy: pip install astroscrappy") from exc
    g = gain if gain and gain > 0 else 1.0
    rn_e = (read_noise if read_noise and read_noise > 0 else 5.0) * g
    data = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    inmask = None if mask is None else np.asarray(mask, dtype=bool)
    crmask, _ = astroscrappy.detect_cosmics(
        data, inmask=inmask, sigclip=sigclip, objlim=objlim, gain=g, readnoise=rn_e,
        satlevel=float(saturation) if saturation else float(np.finfo(np.float32).max), verbose=False)
    return np.asarray(crmask, dtype=bool)


@dataclass
class CalibratedFrame:
    """The result of :func:`calibrate_frame`.

    Attributes
    ----------
    data : ndarray, float32
        Calibrated image, ADU (or electrons when ``unit == "electron"``).
    uncertainty : ndarray, float32, or None
        Standard deviation per pixel, in the unit of ``data``.
    mask : ndarray, uint8
        Bitmask, bits as in this module's docstring.
    unit : str
        ``"adu"`` or ``"electron"``.
    """

    data: np.ndarray
    uncertainty: np.ndarray | None
    mask: np.ndarray
    unit: str = "adu"
    overscan: OverscanFit | None = None
    overscan_spec: OverscanSpec | None = None
    trim: Section | None = None
    dark_scale: float | None = None          # the factor applied
    dark_scale_exposure: float | None = None  # the exposure ratio asked for
    dark_optimized: bool = False
    dark_pixels: int = 0
    gain: float | None = None                 # e-/ADU of the raw frame
    read_noise: float | None = None           # ADU
    saturation: float | None = None           # raw ADU
    notes: list[str] = field(default_factory=list)

    def count(self, bit: int) -> int:
        return int(np.count_nonzero(self.mask & np.uint8(bit)))


def calibrate_frame(
    raw: np.ndarray,
    *,
    overscan: OverscanSpec | None = None,
    trim: Section | None = None,
    bias: Master | None = None,
    dark: Master | None = None,
    dark_scale: float = 1.0,
    dark_optimize: bool = False,
    flat: Master | None = None,
    flat_floor: float = 0.1,
    gain: float | None = None,
    read_noise: float | None = None,
    saturation: float | None = None,
    cosmic_rays: bool = False,
    bad_pixels: np.ndarray | None = None,
    hot_sigma: float = 5.0,
    to_electrons: bool = False,
    uncertainty: bool = True,
) -> CalibratedFrame:
    """Calibrate one raw frame: (raw − overscan − bias − k·dark) / flat, with uncertainty and mask.

    The arithmetic is the same float32 sequence as :class:`CalibratedRows` (so results
    are identical); this adds the per-pixel uncertainty, the bitmask, dark
    optimisation and gain conversion.

    Parameters
    ----------
    raw : ndarray
        The raw frame (ny, nx) in ADU, overscan included.
    overscan, trim : OverscanSpec, Section, optional
        From :func:`overscan_geometry`.
    bias, dark, flat : Master, optional
        Trimmed masters: bias and (bias-subtracted) dark in ADU, flat normalised.
    dark_scale : float
        Factor of the dark: the exposure ratio t_frame / t_dark.
    dark_optimize : bool
        Replace ``dark_scale`` by :func:`optimize_dark_scale` (kept when the dark has no structure).
    flat_floor : float
        Flat pixels below this are masked (:data:`MASK_LOW_FLAT`) and not divided by.
    gain : float, optional
        e-/ADU. Needed for the uncertainty (Poisson term) and for ``to_electrons``.
    read_noise : float, optional
        ADU. Default: the overscan's scatter about its model, when there is an overscan.
    saturation : float, optional
        Raw ADU at which a pixel saturates; compared with the raw values (:data:`MASK_SATURATED`).
    cosmic_rays : bool
        Flag cosmic rays (:data:`MASK_COSMIC_RAY`) with astroscrappy.
    bad_pixels : ndarray, optional
        User bad-pixel map, non-zero = bad; raw or trimmed shape.
    hot_sigma : float
        Threshold of :func:`hot_pixel_mask` when the master dark carries no mask.
    to_electrons : bool
        Multiply data and uncertainty by ``gain``; the unit becomes ``"electron"``.
    uncertainty : bool
        Compute the uncertainty (needs gain and read noise; otherwise a note says why not).
    """
    raw = np.array(raw, dtype=np.float32, copy=True)
    if raw.ndim != 2:
        raise InputError(f"expected a 2-D raw frame, got shape {raw.shape}")
    shape = raw.shape
    fit = None
    if overscan is not None:
        rows, cols = overscan.region.slices()
        fit = overscan_fit(raw[rows, cols], overscan)
        model = overscan_image(fit, overscan, shape).astype(np.float32)
    ty, tx = (slice(None), slice(None)) if trim is None else trim.slices()
    raw_trimmed = raw[ty, tx]
    out_shape = raw_trimmed.shape
    mask = np.zeros(out_shape, dtype=np.uint8)
    if saturation is not None:
        mask[raw_trimmed >= np.float32(saturation)] |= MASK_SATURATED
    if fit is not None:
        raw -= model[:, None] if overscan.axis == 1 else model[None, :]
    data = np.ascontiguousarray(raw[ty, tx])
    for what, master in (("bias", bias), ("dark", dark), ("flat", flat)):
        if master is not None and master.data.shape != out_shape:
            raise InputError(f"master {what} {master.name or ''} is {master.data.shape[1]}x{master.data.shape[0]}"
                             f" but the frame is {out_shape[1]}x{out_shape[0]} after trimming")
    notes: list[str] = []
    if bad_pixels is not None:
        bpm = np.asarray(bad_pixels)
        if bpm.shape == shape and shape != out_shape:
            bpm = bpm[ty, tx]
        if bpm.shape != out_shape:
            raise InputError(f"the bad-pixel map is {bpm.shape[1]}x{bpm.shape[0]}; the frame is"
                             f" {shape[1]}x{shape[0]} raw, {out_shape[1]}x{out_shape[0]} trimmed")
        mask[bpm != 0] |= MASK_USER
    if bias is not None:
        data -= np.asarray(bias.data, dtype=np.float32)
    signal = data.copy() if uncertainty else None
    scale_used = None
    optimized = False
    npix = 0
    if dark is not None:
        scale_used = float(dark_scale)
        if dark_optimize:
            k, npix = optimize_dark_scale(data, dark.data, mask=mask != 0)
            if k is None:
                notes.append(f"dark optimisation: the master dark has no structure ({npix} pixels); "
                             f"exposure ratio {dark_scale:.4g} kept")
            else:
                scale_used, optimized = k, True
        if scale_used != 0.0:
            data -= np.float32(scale_used) * np.asarray(dark.data, dtype=np.float32)
    floored = None
    if flat is not None:
        floored = safe_flat(flat.data, flat_floor)
        data /= floored
    # masks carried by the masters, or derived from their data
    for master, keep in ((bias, MASK_NO_DATA), (dark, MASK_NO_DATA | MASK_HOT), (flat, MASK_NO_DATA | MASK_LOW_FLAT)):
        if master is not None:
            bits = master.bits(keep)
            if bits is not None:
                mask |= bits
    if dark is not None and (dark.mask is None or dark.mask.dtype == bool):
        mask[hot_pixel_mask(dark.data, sigma=hot_sigma)] |= MASK_HOT
    if flat is not None:
        mask[low_flat_mask(flat.data, flat_floor)] |= MASK_LOW_FLAT
    if read_noise is None and fit is not None and np.isfinite(fit.noise):
        read_noise = fit.noise
    sigma = None
    if uncertainty:
        if gain is None or read_noise is None:
            notes.append("no uncertainty: " + ("the gain (e-/ADU) is unknown; pass it" if gain is None
                                               else "the read noise is unknown; pass it"))
        else:
            sigma = calibrated_uncertainty(
                signal, read_noise=read_noise, gain=gain,
                bias_uncertainty=None if bias is None else bias.uncertainty,
                dark_uncertainty=None if dark is None else dark.uncertainty,
                dark_scale=scale_used or 0.0, flat=floored,
                flat_uncertainty=None if flat is None else flat.uncertainty, calibrated=data)
    del signal
    if cosmic_rays:
        crs = cosmic_ray_mask(data, gain=gain, read_noise=read_noise, mask=mask != 0)
        mask[crs] |= MASK_COSMIC_RAY
    unit = "adu"
    if to_electrons:
        if gain is None:
            raise InputError("conversion to electrons needs the gain (e-/ADU); pass --gain")
        data *= np.float32(gain)
        if sigma is not None:
            sigma *= np.float32(gain)
        unit = "electron"
    return CalibratedFrame(
        data=data, uncertainty=sigma, mask=mask, unit=unit, overscan=fit, overscan_spec=overscan, trim=trim,
        dark_scale=scale_used, dark_scale_exposure=float(dark_scale) if dark is not None else None,
        dark_optimized=optimized, dark_pixels=npix, gain=gain, read_noise=read_noise, saturation=saturation,
        notes=notes)


# -- the header of a calibrated frame ----------------------------------------------------------
def _ascii(text: str) -> str:
    text = text.replace("×", "x").replace("°C", "C").replace("°", "deg").replace("—", "-").replace("←", "<-")
    return text.encode("ascii", "replace").decode("ascii")


def describe_calibration(header: Any, result: CalibratedFrame, *, bias: Master | None = None,
                         dark: Master | None = None, flat: Master | None = None,
                         flat_floor: float = 0.1, gain_source: str | None = None) -> Any:
    """Write what :func:`calibrate_frame` did into ``header`` (an astropy Header, changed in place).

    Keywords: OVSCSEC/OVSCMOD/OVSCORD/OVSCMEAN/OVSCNOIS/OVSCCn (overscan model),
    CALBIAS/CALDARK/CALFLAT (master file names) with CALSUMB/CALSUMD/CALSUMF (their
    DATASUM), DARKSCAL (factor applied), DARKEXPR (exposure ratio), DARKOPT (optimised),
    FLATNORM/FLATFLOR, GAIN/RDNOISE (e-) and BUNIT for the unit of the data, SATURATE,
    NSATUR/NHOTPIX/NLOWFLAT/NCOSRAY/NUSERBAD/NNODATA (masked pixel counts), one HISTORY
    line per step and a COMMENT per mask bit. Returns ``header``.
    """
    spec, fit = result.overscan_spec, result.overscan
    if spec is not None and fit is not None:
        header["OVSCSEC"] = (str(spec.region), "overscan region subtracted (FITS, 1-based)")
        header["OVSCMOD"] = (spec.model, "overscan model along the readout direction")
        header["OVSCAXIS"] = ("row" if spec.axis == 1 else "column", "one overscan value per")
        if spec.model not in ("mean", "median"):
            header["OVSCORD"] = (spec.order, "polynomial order (spline: pieces)")
            header["OVSCREJ"] = (fit.rejected, "lines rejected by the fit")
        header["OVSCMEAN"] = (fit.level, "[adu] mean overscan level subtracted")
        if np.isfinite(fit.noise):
            header["OVSCNOIS"] = (fit.noise, "[adu] overscan scatter about the model")
        for i, c in enumerate(fit.coefficients[:10]):
            header[f"OVSCC{i}"] = (c, f"{spec.model} coefficient {i} (x in [-1,1])")
        header["HISTORY"] = _ascii(spec.describe())
    if result.trim is not None:
        header["HISTORY"] = f"trimmed to {result.trim}"
    for key, master, what in (("CALBIAS", bias, "master bias"), ("CALDARK", dark, "master dark"),
                              ("CALFLAT", flat, "master flat")):
        if master is None:
            continue
        header[key] = (master.name or "(array)", f"{what} applied")
        header["CALSUM" + key[3]] = (master.datasum or "", f"DATASUM of the {what}")
        if key == "CALBIAS":
            header["HISTORY"] = f"subtracted master bias {master.name or ''}".rstrip()
    if dark is not None:
        header["DARKSCAL"] = (result.dark_scale, "master dark x this was subtracted")
        header["DARKEXPR"] = (result.dark_scale_exposure, "exposure ratio t_frame / t_dark")
        header["DARKOPT"] = (result.dark_optimized, "DARKSCAL optimised to minimise the noise")
        if result.dark_optimized:
            header["DARKNPIX"] = (result.dark_pixels, "pixels the dark optimisation used")
        header["HISTORY"] = (f"subtracted master dark {dark.name or ''} x {result.dark_scale:.6g}"
                             + (" (optimised)" if result.dark_optimized else " (exposure ratio)"))
    if flat is not None:
        if flat.level is not None:
            header["FLATNORM"] = (flat.level, "[adu] level the master flat was divided by")
        header["FLATFLOR"] = (flat_floor, "flat pixels below this masked, not divided")
        header["HISTORY"] = f"divided by master flat {flat.name or ''} (normalised to 1)"
    if result.gain is not None:
        if result.unit == "electron":
            header["GAIN"] = (1.0, "[e-/unit] data are in electrons")
            header["GAINORIG"] = (result.gain, "[e-/adu] gain used for the conversion")
            header["HISTORY"] = f"multiplied by the gain {result.gain:.4g} e-/adu: data in electrons"
        else:
            header["GAIN"] = (result.gain, "[e-/adu] gain, source in GAINSRC")
        if gain_source:
            header["GAINSRC"] = (_ascii(gain_source)[:68], "where the gain came from")
    if result.read_noise is not None:
        if result.gain is not None:
            header["RDNOISE"] = (result.read_noise * result.gain, "[e-] read noise")
        header["RDNADU"] = (result.read_noise, "[adu] read noise")
    header["BUNIT"] = (result.unit, "physical unit of the data")
    if result.saturation is not None:
        header["SATRAW"] = (result.saturation, "[adu] saturation of the raw frame (MASK bit 1)")
        header.remove("SATURATE", ignore_missing=True)
        header.remove("DATAMAX", ignore_missing=True)
    if result.uncertainty is not None:
        header["HISTORY"] = "UNCERT: sqrt(rn^2 + max(S,0)/gain + bias_unc^2 + (k dark_unc)^2)/flat (+flat term)"
    for note in result.notes:
        header["HISTORY"] = _ascii(note)
    for key, bit in (("NSATUR", MASK_SATURATED), ("NHOTPIX", MASK_HOT), ("NLOWFLAT", MASK_LOW_FLAT),
                     ("NCOSRAY", MASK_COSMIC_RAY), ("NUSERBAD", MASK_USER), ("NNODATA", MASK_NO_DATA)):
        header[key] = (result.count(bit), f"pixels with MASK bit {bit}")
    for bit, meaning in MASK_BITS.items():
        header["COMMENT"] = f"MASK bit {bit}: {meaning}"
    return header
