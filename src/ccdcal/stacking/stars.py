"""Stars in calibrated light frames, and what they say of each frame: detection, quality and
the outliers of a group. NumPy and ``sep`` only (no numba), so that a helper process that
judges frames (:mod:`ccdcal.stacking.judge`) starts in a fraction of the time.

* :func:`detect_stars` finds point sources with ``sep`` (background, extraction,
  windowed centroids) and returns a :class:`Stars` catalogue.
* :func:`frame_quality` summarises a catalogue (star count, FWHM, eccentricity, sky) and
  :func:`flag_outliers` names the frames of a group that are cloudy, trailed, out of focus or
  starless.

Coordinates are 0-based pixel centres with ``x`` the column and ``y`` the row, as in ``sep`` and
numpy (``data[y, x]``). Matching star lists and fitting transforms is
:mod:`ccdcal.stacking.register`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sep

from .._shared.normal import MAD_TO_STD
from ..errors import InputError

__all__ = ["FrameQuality", "Stars", "detect_stars", "flag_outliers", "frame_quality"]

#: sep flags that disqualify a source: cut by the frame edge, deblending overflow, singular
#: moments.
_BAD_SEP_FLAGS = sep.OBJ_TRUNC | sep.OBJ_DOVERFLOW | sep.OBJ_SINGU
#: Pixels around a source's isophotal box that must be free of masked pixels.
_MASK_MARGIN = 2
#: Fewer stars than this and a frame has "no stars" for quality and flagging.
_MIN_QUALITY_STARS = 5


# --------------------------------------------------------------------------------------------
# Catalogue and quality values
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Stars:
    """Stars detected in one frame, brightest first.

    Attributes
    ----------
    x, y : numpy.ndarray
        Windowed centroids (``sep.winpos``), 0-based pixel centres; ``x`` is the column.
    flux : numpy.ndarray
        Background-subtracted flux in a circular aperture of radius ≈ 4 × the frame's
        typical FWHM (ADU).
    fwhm : numpy.ndarray
        Per-star FWHM (px), taken as twice the half-light radius (``sep.flux_radius`` at 0.5
        of the aperture flux). For a Gaussian this equals the FWHM exactly; for other
        profiles it is the half-light diameter, a robust seeing measure.
    a, b, theta : numpy.ndarray
        Isophotal second-moment semi-major and semi-minor axes (px) and position angle
        (radians, counter-clockwise from +x) from ``sep.extract``.
    background : float
        Median sky level of the frame (ADU).
    background_rms : float
        Global sky noise (ADU), ``sep.Background.globalrms``.
    """

    x: np.ndarray
    y: np.ndarray
    flux: np.ndarray
    fwhm: np.ndarray
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    background: float
    background_rms: float

    def __len__(self) -> int:
        return int(np.asarray(self.x).size)

    def take(self, index: np.ndarray) -> Stars:
        """A new catalogue of the stars selected by ``index`` (a boolean mask or indices)."""
        pick = {k: np.asarray(getattr(self, k))[index] for k in ("x", "y", "flux", "fwhm",
                                                                  "a", "b", "theta")}
        return Stars(**pick, background=self.background, background_rms=self.background_rms)


@dataclass(frozen=True)
class FrameQuality:
    """What a star catalogue says about a frame.

    Attributes
    ----------
    n_stars : int
        Stars detected.
    fwhm : float
        Median FWHM of the stars used for quality (px); NaN without stars.
    eccentricity : float
        Median ``sqrt(1 - b²/a²)`` of those stars (0 round, → 1 trailed); NaN without stars.
    background : float
        Median sky level (ADU).
    noise : float
        Global sky noise (ADU).
    """

    n_stars: int
    fwhm: float
    eccentricity: float
    background: float
    noise: float


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def _prepare(data: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A native-order, C-contiguous float copy of ``data`` and the bad-pixel map (mask | NaN)."""
    data = np.asarray(data)
    if data.ndim != 2 or min(data.shape) < 8:
        raise InputError(f"detect_stars needs a 2-D image of at least 8×8 pixels, got shape "
                         f"{data.shape}")
    if not (np.issubdtype(data.dtype, np.number) and not np.iscomplexobj(data)):
        raise InputError(f"detect_stars needs a real numeric image, got dtype {data.dtype}")
    small = data.dtype == np.float32 or (np.issubdtype(data.dtype, np.integer)
                                         and data.dtype.itemsize <= 2)
    image = np.array(data, dtype=np.float32 if small else np.float64, order="C", copy=True)
    bad = ~np.isfinite(image)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise InputError(f"mask shape {mask.shape} differs from the image shape {image.shape}")
        bad |= mask.astype(bool)
    image[bad] = 0.0
    return image, bad


def _saturation_level(image: np.ndarray, bad: np.ndarray, saturation: float | None,
                      rms: float, back: float) -> float | None:
    """The level at and above which a star counts as saturated, or None for no cut.

    Without ``saturation``, a plateau (at least 3 good pixels at the image maximum, well
    above the sky) marks a clipped frame and its maximum becomes the level.
    """
    if saturation is not None:
        return float(saturation)
    good = image[~bad] if bad.any() else image.ravel()
    if good.size == 0:
        return None
    top = float(good.max())
    if top > back + 50.0 * rms and np.count_nonzero(good == top) >= 3:
        return top
    return None


#: frames of at least this many pixels measure their sky on every other pixel of every other row
_SUBSAMPLE_FROM = 2**20


def _subtract_background(image: np.ndarray, bad: np.ndarray | None,
                         sampled: bool) -> tuple[np.ndarray, float, float]:
    """The image less sep's background map, the map's median and the sky's global rms.

    With ``sampled``, a frame of :data:`_SUBSAMPLE_FROM` pixels or more has its map measured on
    every other pixel of every other row, each value serving its 2 × 2 pixels (the last row or
    column of odd sides serving one), in a quarter of the time. Its meshes are 64 such pixels
    (128 px of the frame), so that each mesh's sky comes from as many pixels as sep's default
    mesh of 64 px at full resolution (with 32 the map was half as noisy again); the rms stays the
    per-pixel rms."""
    if not sampled or image.size < _SUBSAMPLE_FROM:
        bkg = sep.Background(image, mask=bad)
        back = bkg.back().astype(image.dtype, copy=False)
        sub = image - back
    else:
        bkg = sep.Background(np.ascontiguousarray(image[::2, ::2]),
                             mask=None if bad is None else np.ascontiguousarray(bad[::2, ::2]), bw=64, bh=64)
        back = bkg.back().astype(image.dtype, copy=False)
        along = np.repeat(back, 2, axis=1)[:, : image.shape[1]]     # each value for its two columns
        sub = np.empty_like(image)
        np.subtract(image[0::2], along, out=sub[0::2])              # and for its two rows
        np.subtract(image[1::2], along[: image.shape[0] // 2], out=sub[1::2])
    median = float(np.median(back[:: max(1, back.shape[0] // 256), :: max(1, back.shape[1] // 256)]))
    return sub, median, float(bkg.globalrms)


def _extract(sub: np.ndarray, threshold: float, rms: float, bad: np.ndarray | None) -> np.ndarray:
    """``sep.extract`` with internal buffers sized for the frame (grown once on overflow)."""
    sep.set_extract_pixstack(max(sep.get_extract_pixstack(), sub.size // 20))
    for attempt in range(2):
        try:
            return sep.extract(sub, threshold, err=rms, mask=bad, minarea=5,
                               deblend_cont=0.005, clean=True)
        except Exception as exc:  # sep raises bare Exception on buffer overflows
            text = str(exc).lower()
            if attempt or not ("pixel buffer" in text or "deblend" in text or "limit" in text):
                raise
            sep.set_extract_pixstack(sep.get_extract_pixstack() * 4)
            sep.set_sub_object_limit(sep.get_sub_object_limit() * 4)
    raise AssertionError("unreachable")


def _touches_mask(bad: np.ndarray, obj: np.ndarray) -> np.ndarray:
    """Per source: is any bad pixel within ``_MASK_MARGIN`` px of its isophotal box?"""
    ny, nx = bad.shape
    table = np.zeros((ny + 1, nx + 1), dtype=np.int32)
    np.cumsum(np.cumsum(bad, axis=0, dtype=np.int32), axis=1, out=table[1:, 1:])
    x0 = np.clip(obj["xmin"] - _MASK_MARGIN, 0, nx)
    x1 = np.clip(obj["xmax"] + _MASK_MARGIN + 1, 0, nx)
    y0 = np.clip(obj["ymin"] - _MASK_MARGIN, 0, ny)
    y1 = np.clip(obj["ymax"] + _MASK_MARGIN + 1, 0, ny)
    count = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
    return count > 0


def _clean_sources(obj: np.ndarray, image: np.ndarray, bad: np.ndarray,
                   level: float | None) -> np.ndarray:
    """Boolean keep-mask: unflagged, whole, unmasked, unsaturated sources with real moments."""
    ny, nx = image.shape
    keep = (obj["flag"] & _BAD_SEP_FLAGS) == 0
    keep &= np.isfinite(obj["a"]) & np.isfinite(obj["b"]) & (obj["b"] > 0)
    keep &= (obj["xmin"] > 0) & (obj["ymin"] > 0) & (obj["xmax"] < nx - 1)
    keep &= obj["ymax"] < ny - 1
    if bad.any():
        keep &= ~_touches_mask(bad, obj)
    if level is not None:
        keep &= image[obj["ypeak"], obj["xpeak"]] < level
    return keep


def _measure(sub: np.ndarray, bad: np.ndarray | None, x: np.ndarray, y: np.ndarray,
             rmax: float, rms: float) -> tuple[np.ndarray, np.ndarray]:
    """Aperture flux within ``rmax`` and FWHM = 2 × half-light radius, per source."""
    flux, _, aflag = sep.sum_circle(sub, x, y, rmax, err=rms, mask=bad, subpix=5)
    r50, rflag = sep.flux_radius(sub, x, y, np.full(x.size, rmax), 0.5, normflux=flux,
                                 mask=bad, subpix=5)
    fwhm = 2.0 * np.asarray(r50, dtype=np.float64)
    ok = (np.asarray(flux) > 0) & (rflag == 0) & np.isfinite(fwhm) & (fwhm > 0)
    ok &= (aflag & sep.APER_TRUNC) == 0
    return np.where(ok, flux, np.nan), np.where(ok, fwhm, np.nan)


#: a source whose peak holds this many times the share of its flux that the frame's bright
#: sources' peaks hold is a cosmic ray or hot pixel, not a star
_SHARPNESS_FACTOR = 3.0


def _not_cosmic(obj: np.ndarray) -> np.ndarray:
    """Boolean keep-mask dropping cosmic rays and hot pixels by their sharpness (peak / flux).

    In real frames of a few stars cosmic rays can be half the detections, so the typical
    sharpness is taken from the brightest third by flux (stars: Nickel 60-600 s lights have
    stars at 0.02-0.06 and cosmic rays at 0.3-1.0); a source more than
    :data:`_SHARPNESS_FACTOR` times sharper goes.
    """
    flux = np.asarray(obj["flux"], dtype=np.float64)
    sharp = np.asarray(obj["peak"], dtype=np.float64) / np.where(flux > 0, flux, np.nan)
    bright = np.argsort(-np.nan_to_num(flux, nan=-np.inf))[: max(3, flux.size // 3)]
    typical = float(np.nanmedian(sharp[bright])) if np.isfinite(sharp[bright]).any() else np.nan
    if not np.isfinite(typical):
        return np.isfinite(sharp)
    return np.isfinite(sharp) & (sharp <= _SHARPNESS_FACTOR * typical)


def _shape_outliers(fwhm: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Boolean keep-mask dropping hot pixels / cosmic rays (FWHM < half the frame's) and
    elongated blends (a/b far above the frame's typical elongation, so trails survive)."""
    typical = float(np.median(fwhm))
    elong = a / b
    typical_elong = float(np.median(elong))
    return (fwhm >= 0.5 * typical) & (elong <= max(1.5 * typical_elong, typical_elong + 0.5))


def detect_stars(data: np.ndarray, mask: np.ndarray | None = None, *, threshold: float = 5.0,
                 max_stars: int = 300, saturation: float | None = None, sampled_sky: bool = False) -> Stars:
    """Detect stars in a calibrated frame and measure them.

    Parameters
    ----------
    data : numpy.ndarray
        2-D image (ADU). NaN/inf pixels are treated as masked.
    mask : numpy.ndarray, optional
        Bad-pixel map of the same shape; a pixel is bad where it is nonzero (the ``MASK``
        extension of a calibrated frame works as is).
    threshold : float
        Detection threshold in units of the global sky rms.
    max_stars : int
        Keep at most this many stars, the brightest by flux.
    saturation : float, optional
        Level (ADU, in ``data``) at which a star's peak counts as saturated. Without it, a
        plateau of pixels at the image maximum is taken as the clipping level; saturated
        pixels flagged in ``mask`` are excluded either way.
    sampled_sky : bool
        Measure the sky of a frame of a million pixels or more on every other pixel of every
        other row (a quarter of the time; each mesh's sky from a quarter of its pixels). Only
        for frames whose pixels' noise does not depend on their position in a 2 × 2 cell:
        not for a debayered or CFA frame, whose sampled pixels would all be one colour's.

    Returns
    -------
    Stars
        Brightest first. Sources are dropped when flagged by sep (cut by the edge, deblending
        overflow), within 2 px of a masked pixel, saturated, far sharper than the frame's
        typical star (hot pixels, cosmic rays), far more elongated than typical (unresolved
        blends) or when the windowed centroid fails.
    """
    if not threshold > 0 or max_stars < 0:
        raise InputError(f"detect_stars needs threshold > 0 and max_stars ≥ 0, got "
                         f"{threshold} and {max_stars}")
    image, bad = _prepare(data, mask)
    any_bad = bool(bad.any())
    if any_bad and bad.all():
        raise InputError("detect_stars: every pixel of the image is masked or not finite")
    maskarg = bad if any_bad else None
    sub, background, rms = _subtract_background(image, maskarg, sampled_sky)
    level = _saturation_level(image, bad, saturation, rms, background)
    if any_bad:
        sub[bad] = 0.0
    empty = Stars(*(np.empty(0) for _ in range(7)), background=background, background_rms=rms)
    if not rms > 0:
        return empty
    obj = _extract(sub, threshold, rms, maskarg)
    obj = obj[_clean_sources(obj, image, bad, level)] if obj.size else obj
    obj = obj[_not_cosmic(obj)] if obj.size else obj
    if obj.size == 0 or max_stars == 0:
        return empty
    # Measure only the brightest candidates (isophotal flux): enough spares for the cuts below.
    obj = obj[np.argsort(-obj["flux"], kind="stable")[: max(4 * max_stars, 200)]]
    guess = float(np.median(2.0 * np.sqrt(math.log(2.0) * (obj["a"] ** 2 + obj["b"] ** 2))))
    rmax = float(np.clip(4.0 * guess, 6.0, 60.0))
    flux, fwhm = _measure(sub, maskarg, obj["x"], obj["y"], rmax, rms)
    ok = np.isfinite(flux)
    obj, flux, fwhm = obj[ok], flux[ok], fwhm[ok]
    if obj.size == 0:
        return empty
    ok = _shape_outliers(fwhm, obj["a"], obj["b"])
    obj, flux, fwhm = obj[ok], flux[ok], fwhm[ok]
    sig = float(np.median(fwhm)) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    xw, yw, wflag = sep.winpos(sub, obj["x"], obj["y"], sig, mask=maskarg)
    moved = np.hypot(xw - obj["x"], yw - obj["y"])
    ny, nx = image.shape
    ok = (wflag == 0) & np.isfinite(xw) & np.isfinite(yw) & (moved < max(2.0, 2.355 * sig))
    ok &= (xw > 0) & (yw > 0) & (xw < nx - 1) & (yw < ny - 1)
    order = np.flatnonzero(ok)[np.argsort(-flux[ok], kind="stable")][:max_stars]
    return Stars(x=np.asarray(xw[order], dtype=np.float64), y=np.asarray(yw[order], np.float64),
                 flux=flux[order].astype(np.float64), fwhm=fwhm[order].astype(np.float64),
                 a=obj["a"][order].astype(np.float64), b=obj["b"][order].astype(np.float64),
                 theta=obj["theta"][order].astype(np.float64), background=background,
                 background_rms=rms)


# --------------------------------------------------------------------------------------------
# Quality
# --------------------------------------------------------------------------------------------


def frame_quality(stars: Stars, shape: tuple[int, int]) -> FrameQuality:
    """Summarise a star catalogue as a :class:`FrameQuality`.

    FWHM and eccentricity are medians over the stars in the central 80 % of the frame (in
    each axis; all stars when fewer than 5 are there, since field-edge optics distort
    shapes), restricted to the brighter half when at least 10 remain (noise makes faint
    stars look elongated).

    Parameters
    ----------
    stars : Stars
        The frame's catalogue.
    shape : tuple of int
        The frame's ``(ny, nx)``.
    """
    if len(shape) != 2 or min(shape) <= 0:
        raise InputError(f"frame_quality needs the frame's (ny, nx), got {shape}")
    n = len(stars)
    if n == 0:
        return FrameQuality(0, math.nan, math.nan, float(stars.background),
                            float(stars.background_rms))
    ny, nx = shape
    x, y = np.asarray(stars.x), np.asarray(stars.y)
    central = (np.abs(x - (nx - 1) / 2) <= 0.4 * nx) & (np.abs(y - (ny - 1) / 2) <= 0.4 * ny)
    use = central if np.count_nonzero(central) >= _MIN_QUALITY_STARS else np.ones(n, bool)
    flux = np.asarray(stars.flux)
    if np.count_nonzero(use) >= 10:
        use &= flux >= np.median(flux[use])
    a, b = np.asarray(stars.a)[use], np.asarray(stars.b)[use]
    ecc = np.sqrt(np.clip(1.0 - (b / a) ** 2, 0.0, 1.0))
    return FrameQuality(n_stars=n, fwhm=float(np.median(np.asarray(stars.fwhm)[use])),
                        eccentricity=float(np.median(ecc)), background=float(stars.background),
                        noise=float(stars.background_rms))


def _centre_spread(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based standard deviation of a group."""
    centre = float(np.median(values))
    return centre, float(MAD_TO_STD * np.median(np.abs(values - centre)))


def _group_reasons(q: FrameQuality, group: dict[str, tuple[float, float]]) -> list[str]:
    """Reasons one frame with stars stands out of its group (medians and spreads)."""
    reasons: list[str] = []
    med_e, sd_e = group["eccentricity"]
    trailed = q.eccentricity > med_e + max(5.0 * sd_e, 0.15) and q.eccentricity > 0.5
    med_f, sd_f = group["fwhm"]
    # A trail inflates the FWHM too: focus is judged only on frames that are not trailed.
    blurred = not trailed and q.fwhm > 1.5 * med_f and q.fwhm > med_f + 5.0 * sd_f
    med_n, _ = group["n_stars"]
    # Trailing and defocus also lose faint stars: then only the sky makes a frame cloudy.
    few = q.n_stars < 0.5 * med_n and not (trailed or blurred)
    med_b, sd_b = group["background"]
    med_noise, _ = group["noise"]
    bright = q.background > med_b + max(5.0 * sd_b, 0.5 * abs(med_b), 5.0 * med_noise)
    cloud: list[str] = []
    if few:
        cloud.append(f"{q.n_stars} stars vs {med_n:.0f} typical")
    if bright:
        cloud.append(f"background {q.background / med_b:.1f}× the group's" if med_b > 0 else
                     f"background {q.background:.4g} vs {med_b:.4g} ADU typical")
    if cloud:
        reasons.append("cloudy: " + ", ".join(cloud))
    if trailed:
        reasons.append(f"trailed: eccentricity {q.eccentricity:.2f} vs {med_e:.2f} typical")
    if blurred:
        reasons.append(f"out of focus: FWHM {q.fwhm:.1f} px vs {med_f:.1f} px typical")
    return reasons


def _exposure_classes(exptimes: Sequence[float | None]) -> list[int]:
    """Frames whose exposures are within a factor 1.5 of each other share a class (index); an
    unknown exposure is a class of its own kind (-1)."""
    reps: list[float] = []
    out = []
    for t in exptimes:
        if t is None or not t > 0:
            out.append(-1)
            continue
        match = next((k for k, r in enumerate(reps) if max(r, t) / min(r, t) <= 1.5), None)
        if match is None:
            reps.append(float(t))
            match = len(reps) - 1
        out.append(match)
    return out


def flag_outliers(qualities: Sequence[FrameQuality], names: Sequence[str],
                  exptimes: Sequence[float | None] | None = None) -> list[str | None]:
    """Name the frames of a group that should not be stacked, with a one-line reason each.

    Each frame is judged against the median and MAD of the frames that have stars, with
    absolute floors so that a few near-identical frames flag nothing:

    * no stars: fewer than 5 stars → ``"no stars found"`` (any group size);
    * cloudy: fewer than half the group's median star count, and/or a background above the
      median by more than max(5 MAD-σ, 50 % of the median, 5 × the typical noise);
    * trailed: eccentricity above median + max(5 MAD-σ, 0.15) and above 0.5;
    * out of focus: FWHM above 1.5 × the median and above median + 5 MAD-σ (not judged on
      trailed frames, whose FWHM the trail inflates).

    Group comparisons need at least 3 frames with stars; with fewer only "no stars found" is
    reported. Several reasons are joined by ``"; "``.

    With ``exptimes``, depth is judged per unit exposure: a frame's star count is compared with
    the frames of a like exposure (within a factor 1.5; at least 3 of them, else not judged), and
    its background per second with every frame's. A 3 s frame among 60 s ones is shallow, not
    cloudy (its weight in the stack says how much it adds).

    Parameters
    ----------
    qualities : sequence of FrameQuality
        One per frame.
    names : sequence of str
        The frames' names, same length (they label the error when the lengths differ).

    Returns
    -------
    list of str or None
        Per frame, the reason or None.
    """
    if len(names) != len(qualities):
        raise InputError(f"flag_outliers got {len(qualities)} qualities but {len(names)} names "
                         f"({', '.join(map(str, names[:3]))}…)")
    reasons: list[str | None] = [None] * len(qualities)
    with_stars = [i for i, q in enumerate(qualities)
                  if q.n_stars >= _MIN_QUALITY_STARS and math.isfinite(q.fwhm)]
    for i, q in enumerate(qualities):
        if q.n_stars < _MIN_QUALITY_STARS:
            reasons[i] = "no stars found" if q.n_stars == 0 else \
                f"no stars found (only {q.n_stars} detected, needs {_MIN_QUALITY_STARS})"
    if len(with_stars) < 3:
        return reasons
    group = {key: _centre_spread(np.array([getattr(qualities[i], key) for i in with_stars],
                                          dtype=np.float64))
             for key in ("n_stars", "fwhm", "eccentricity", "background", "noise")}
    classes = _exposure_classes(exptimes) if exptimes is not None else [0] * len(qualities)
    mixed = len({classes[i] for i in with_stars}) > 1
    for i in with_stars:
        q, own = qualities[i], dict(group)
        if mixed:
            alike = [k for k in with_stars if classes[k] == classes[i] and classes[i] >= 0]
            own["n_stars"] = _centre_spread(np.array([qualities[k].n_stars for k in alike], np.float64)) \
                if len(alike) >= 3 else (0.0, 0.0)                    # too few alike: not judged
            t = exptimes[i]
            rates = [(qualities[k].background / exptimes[k], qualities[k].noise / exptimes[k])
                     for k in with_stars if classes[k] >= 0]
            if t and t > 0 and len(rates) >= 3:      # background per second, in the frame's units
                own["background"] = tuple(v * t for v in _centre_spread(np.array([r[0] for r in rates])))
                own["noise"] = (float(np.median([r[1] for r in rates])) * t, 0.0)
        found = _group_reasons(q, own)
        if found:
            reasons[i] = "; ".join(found)
    return reasons
