"""Star detection, frame quality and registration of calibrated light frames for stacking.

Three steps, each a function of arrays and small frozen dataclasses:

* :func:`detect_stars` finds point sources with ``sep`` (background, extraction,
  windowed centroids) and returns a :class:`Stars` catalogue.
* :func:`frame_quality` summarises a catalogue (star count, FWHM, eccentricity, sky) and
  :func:`flag_outliers` names the frames of a group that are cloudy, trailed, out of focus or
  starless.
* :func:`find_transform` matches two catalogues by triangle invariants, picks the consensus
  similarity transform (RANSAC over triangle matches), then refines an affine (or similarity)
  transform by least squares on every matched star; :func:`register_frames` does it for a list.

Coordinates everywhere are 0-based pixel centres with ``x`` the column and ``y`` the row, as
in ``sep`` and numpy (``data[y, x]``). A :class:`Transform` maps a point of the frame onto the
reference grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import sep

from ccdcal._shared.jit import njit
from ccdcal._shared.robust import MAD_TO_STD
from ccdcal.errors import CcdcalError, InputError

__all__ = [
    "FrameQuality",
    "RegistrationError",
    "Stars",
    "Transform",
    "detect_stars",
    "find_transform",
    "flag_outliers",
    "frame_quality",
    "register_frames",
]

#: sep flags that disqualify a source: cut by the frame edge, deblending overflow, singular
#: moments.
_BAD_SEP_FLAGS = sep.OBJ_TRUNC | sep.OBJ_DOVERFLOW | sep.OBJ_SINGU
#: Pixels around a source's isophotal box that must be free of masked pixels.
_MASK_MARGIN = 2
#: Fewer stars than this and a frame has "no stars" for quality and flagging.
_MIN_QUALITY_STARS = 5
#: Nearest neighbours (besides the star itself) that form triangles with each control star.
_TRIANGLE_NEIGHBOURS = 5
#: Matching radius in the (shortest/longest, middle/longest) side-ratio plane.
_INVARIANT_RADIUS = 0.03
#: Triangles whose longest side is shorter than this (px) are too noisy to describe.
_MIN_TRIANGLE_SIDE = 4.0
#: Proposed similarity scales outside this range are discarded (no sane pair of frames).
_SCALE_RANGE = (0.2, 5.0)
#: Matched stars at or above which the refinement fits an affine rather than a similarity.
_AFFINE_MIN_MATCHES = 10


class RegistrationError(CcdcalError):
    """Two star lists could not be matched; the message says why in one line."""

    exit_code = 1


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


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Transform:
    """A 2-D affine map from a frame's pixel grid onto the reference grid.

    Attributes
    ----------
    matrix : numpy.ndarray
        3×3 homogeneous float64 matrix: ``[xr, yr, 1] = matrix @ [x, y, 1]`` with ``(x, y)``
        in the frame and ``(xr, yr)`` in the reference; 0-based pixel centres, x = column.
    n_matched : int
        Stars matched between the two lists in the final fit.
    rms : float
        RMS residual of those stars after the fit (px, reference grid).
    """

    matrix: np.ndarray
    n_matched: int = 0
    rms: float = 0.0

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
            raise InputError(f"a Transform needs a finite 3×3 matrix, got shape {matrix.shape}")
        matrix.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)

    @classmethod
    def identity(cls, n_matched: int = 0) -> Transform:
        """The identity (the reference frame onto itself)."""
        return cls(np.eye(3), n_matched=n_matched, rms=0.0)

    @property
    def rotation(self) -> float:
        """Rotation angle (degrees, counter-clockwise in x/y, in (-180, 180])."""
        m = self.matrix
        angle = math.degrees(math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1]))
        return angle + 360.0 if angle <= -180.0 else angle

    @property
    def scale(self) -> float:
        """Linear scale factor, ``sqrt(|det|)`` of the 2×2 part."""
        return math.sqrt(abs(float(np.linalg.det(self.matrix[:2, :2]))))

    @property
    def shift(self) -> tuple[float, float]:
        """(dx, dy): where the frame's pixel (0, 0) lands on the reference grid."""
        return float(self.matrix[0, 2]), float(self.matrix[1, 2])

    def apply(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple:
        """Map frame coordinates to the reference grid; arrays broadcast, scalars give floats."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        m = self.matrix
        xr = m[0, 0] * x + m[0, 1] * y + m[0, 2]
        yr = m[1, 0] * x + m[1, 1] * y + m[1, 2]
        if xr.ndim == 0:
            return float(xr), float(yr)
        return xr, yr

    def inverse(self) -> Transform:
        """The map from the reference grid back onto the frame (rms in frame pixels)."""
        scale = self.scale
        return Transform(np.linalg.inv(self.matrix), n_matched=self.n_matched,
                         rms=self.rms / scale if scale > 0 else self.rms)

    def __repr__(self) -> str:
        dx, dy = self.shift
        return (f"Transform(shift=({dx:.2f}, {dy:.2f}), rotation={self.rotation:.3f}°, "
                f"scale={self.scale:.5f}, n_matched={self.n_matched}, rms={self.rms:.3f})")


def _control(stars: Stars, max_control: int) -> np.ndarray:
    """(m, 2) positions of the brightest ``max_control`` stars."""
    order = np.argsort(-np.asarray(stars.flux, dtype=np.float64), kind="stable")[:max_control]
    return np.column_stack([np.asarray(stars.x, np.float64)[order],
                            np.asarray(stars.y, np.float64)[order]])


@njit(cache=True, nogil=True)
def nearest(query: np.ndarray, points: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """For each of the (q, 2) ``query`` points, the distance to and the index of the nearest of
    the (p, 2) ``points`` closer than ``bound``; (inf, p) where none is. Star lists hold at most
    a few hundred stars: a direct search is faster than building a tree."""
    n, m = query.shape[0], points.shape[0]
    dist = np.full(n, np.inf)
    index = np.full(n, m, np.int64)
    for i in range(n):
        best, k = bound * bound, m
        qx, qy = query[i, 0], query[i, 1]
        for j in range(m):
            dx, dy = qx - points[j, 0], qy - points[j, 1]
            d2 = dx * dx + dy * dy
            if d2 < best:
                best, k = d2, j
        if k < m:
            dist[i], index[i] = math.sqrt(best), k
    return dist, index


@njit(cache=True, nogil=True, inline="always")
def _within(a: np.ndarray, i: int, b: np.ndarray, j: int, r2: float) -> bool:
    d2 = 0.0
    for c in range(a.shape[1]):
        d2 += (a[i, c] - b[j, c]) ** 2
    return d2 <= r2


@njit(cache=True, nogil=True)
def _pairs_within(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pair (i, j) with ``|a[i] − b[j]| ≤ radius`` (rows of equal width), in order of i then j:
    counted, then filled (no list grows in the kernel)."""
    r2 = radius * radius
    count = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            count += _within(a, i, b, j, r2)
    ia, ib = np.empty(count, np.int64), np.empty(count, np.int64)
    k = 0
    for i in range(a.shape[0]):
        for j in range(b.shape[0]):
            if _within(a, i, b, j, r2):
                ia[k], ib[k] = i, j
                k += 1
    return ia, ib


def _triangles(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with its nearest neighbours, vertices in canonical order.

    Returns the vertex indices ``(T, 3)``, ordered as the vertex opposite the shortest,
    middle and longest side, and invariants ``(T, 3)``: shortest/longest and middle/longest
    side ratios (rotation-, scale- and shift-free) plus the orientation (±1, scaled so that
    mirror-image triangles never match).
    """
    n = len(xy)
    k = min(_TRIANGLE_NEIGHBOURS + 1, n)
    d2 = np.square(xy[:, None, :] - xy[None, :, :]).sum(axis=2)
    nn = np.argsort(d2, axis=1, kind="stable")[:, :k]
    combos = np.array(list(itertools.combinations(range(k), 3)))
    tri = np.unique(np.sort(nn[:, combos].reshape(-1, 3), axis=1), axis=0)
    pts = xy[tri]  # (T, 3, 2)
    opposite = np.stack([np.hypot(*(pts[:, 1] - pts[:, 2]).T),
                         np.hypot(*(pts[:, 0] - pts[:, 2]).T),
                         np.hypot(*(pts[:, 0] - pts[:, 1]).T)], axis=1)
    order = np.argsort(opposite, axis=1, kind="stable")
    tri = np.take_along_axis(tri, order, axis=1)
    sides = np.take_along_axis(opposite, order, axis=1)
    keep = sides[:, 2] >= _MIN_TRIANGLE_SIDE
    tri, sides = tri[keep], sides[keep]
    p = xy[tri]
    cross = ((p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1])
             - (p[:, 1, 1] - p[:, 0, 1]) * (p[:, 2, 0] - p[:, 0, 0]))
    inv = np.column_stack([sides[:, 0] / sides[:, 2], sides[:, 1] / sides[:, 2],
                           10.0 * np.sign(cross)])
    return tri, inv


def _proposals(xy_f: np.ndarray, xy_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Similarity transforms ``z → a z + b`` (complex) proposed by matched triangles."""
    tri_f, inv_f = _triangles(xy_f)
    tri_r, inv_r = _triangles(xy_r)
    if len(tri_f) == 0 or len(tri_r) == 0:
        return np.empty(0, complex), np.empty(0, complex)
    i_f, i_r = _pairs_within(np.ascontiguousarray(inv_f), np.ascontiguousarray(inv_r), _INVARIANT_RADIUS)
    if i_f.size == 0:
        return np.empty(0, complex), np.empty(0, complex)
    zf = xy_f[tri_f[i_f], 0] + 1j * xy_f[tri_f[i_f], 1]
    zr = xy_r[tri_r[i_r], 0] + 1j * xy_r[tri_r[i_r], 1]
    a, b = _similarity_complex(zf, zr, np.ones(zf.shape))
    scale = np.abs(a)
    ok = np.isfinite(a) & (scale > _SCALE_RANGE[0]) & (scale < _SCALE_RANGE[1])
    return a[ok], b[ok]


def _similarity_complex(zs: np.ndarray, zd: np.ndarray,
                        w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares ``zd ≈ a zs + b`` along the last axis (complex points)."""
    wsum = w.sum(axis=-1)
    ms = (w * zs).sum(axis=-1) / wsum
    md = (w * zd).sum(axis=-1) / wsum
    ds, dd = zs - ms[..., None], zd - md[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (w * dd * np.conj(ds)).sum(axis=-1) / (w * np.abs(ds) ** 2).sum(axis=-1)
    return a, md - a * ms


def _consensus(a: np.ndarray, b: np.ndarray, xy_f: np.ndarray, xy_r: np.ndarray,
               tolerance: float) -> tuple[int, np.ndarray | None]:
    """The proposal with the most control stars landing within ``tolerance`` of a reference
    control star (ties: smallest summed squared distance); its count and 3×3 matrix.

    Proposals are tried in the order of their votes (how many proposals agree with each to
    within 0.3° of rotation, 1 % of scale and ``tolerance`` of shift: a true transform is
    proposed by many matched triangles, a chance match by one), the best voted first; the
    search ends at a chunk whose best proposal places 80 % of the shorter control list of 10 or
    more stars (no chance alignment does; the refinement that follows fits all the matched stars
    anyway)."""
    zf = xy_f[:, 0] + 1j * xy_f[:, 1]
    key = np.column_stack([np.round(np.log(np.abs(a)) / 0.01), np.round(np.angle(a) / math.radians(0.3)),
                           np.round(b.real / tolerance), np.round(b.imag / tolerance)]).astype(np.int64)
    _, group, votes = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    order = np.argsort(-votes[group.ravel()], kind="stable")
    a, b = a[order], b[order]
    # short lists (under 10 control stars) are searched whole: a chance alignment of a few stars
    # could otherwise end the search
    shorter = min(len(xy_f), len(xy_r))
    enough = math.ceil(0.8 * shorter) if shorter >= 10 else shorter + 1
    best_count, best_cost, best = 0, math.inf, None
    chunk = max(1, 200_000 // max(1, len(zf)))
    starts = [0, *range(min(64, len(a)), len(a), chunk)]
    for start, stop in zip(starts, [*starts[1:], len(a)], strict=True):
        if start >= stop:
            continue
        za = a[start:stop, None] * zf[None, :] + b[start:stop, None]
        d, _ = nearest(np.column_stack([za.real.ravel(), za.imag.ravel()]), xy_r, tolerance)
        d = d.reshape(za.shape)
        hit = np.isfinite(d)
        count = hit.sum(axis=1)
        cost = np.where(hit, d * d, 0.0).sum(axis=1)
        score = count * 1e6 - cost / (tolerance * tolerance * (len(zf) + 1))
        j = int(np.argmax(score))
        if count[j] > best_count or (count[j] == best_count and cost[j] < best_cost):
            best_count, best_cost, best = int(count[j]), float(cost[j]), start + j
        if best_count >= enough:
            break
    if best is None:
        return 0, None
    return best_count, _complex_matrix(a[best], b[best])


def _complex_matrix(a: complex, b: complex) -> np.ndarray:
    """The 3×3 matrix of ``z → a z + b``."""
    return np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0.0, 0.0, 1.0]])


def _fit(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares matrix mapping ``src`` onto ``dst``: affine with
    ``_AFFINE_MIN_MATCHES`` or more pairs, similarity with fewer."""
    if len(src) < _AFFINE_MIN_MATCHES:
        a, b = _similarity_complex(src[:, 0] + 1j * src[:, 1], dst[:, 0] + 1j * dst[:, 1], w)
        return _complex_matrix(complex(a), complex(b))
    sw = np.sqrt(w)[:, None]
    design = np.column_stack([src, np.ones(len(src))]) * sw
    coef, *_ = np.linalg.lstsq(design, dst * sw, rcond=None)
    return np.vstack([coef.T, [0.0, 0.0, 1.0]])


def _centroid_variance(stars: Stars) -> np.ndarray:
    """Per-star centroid variance (px²), ≈ (FWHM / S/N)² plus a (0.01 px)² floor, S/N from the
    flux against the sky noise in a disc of radius FWHM."""
    flux = np.asarray(stars.flux, np.float64)
    fwhm = np.asarray(stars.fwhm, np.float64)
    noise = float(stars.background_rms) * math.sqrt(math.pi) * fwhm
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma2 = (fwhm * noise / flux) ** 2 + 1e-4
    sigma2 = np.where(np.isfinite(sigma2) & (sigma2 > 0), sigma2, np.nan)
    fill = float(np.nanmedian(sigma2)) if np.isfinite(sigma2).any() else 1.0
    return np.where(np.isfinite(sigma2), sigma2, fill)


def _match(matrix: np.ndarray, xy_f: np.ndarray, xy_r: np.ndarray,
           tol: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one nearest-neighbour pairs (frame index, reference index) within ``tol``."""
    p = np.ascontiguousarray(xy_f @ matrix[:2, :2].T + matrix[:2, 2])
    d, j = nearest(p, xy_r, tol)
    i = np.flatnonzero(np.isfinite(d))
    i = i[np.argsort(d[i], kind="stable")]
    _, first = np.unique(j[i], return_index=True)
    i = np.sort(i[first])
    return i, j[i]


def _clipped_fit(src: np.ndarray, dst: np.ndarray,
                 w: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Fit, then drop pairs beyond 4σ of the residuals and refit (up to 3 times); returns the
    matrix, the pairs kept and their RMS residual (px)."""
    for _ in range(4):
        matrix = _fit(src, dst, w)
        resid = np.hypot(*(src @ matrix[:2, :2].T + matrix[:2, 2] - dst).T)
        sigma = math.sqrt(float(np.median(resid ** 2)) / (2.0 * math.log(2.0)))
        keep = resid <= max(4.0 * sigma, 0.05)
        if keep.all() or keep.sum() < 3:
            break
        src, dst, w = src[keep], dst[keep], w[keep]
    return matrix, len(src), float(np.sqrt(np.mean(resid ** 2)))


def _refine(matrix: np.ndarray, stars: Stars, reference: Stars,
            tolerance: float) -> tuple[np.ndarray, int, float]:
    """Match every star under ``matrix`` and refit, three times with shrinking tolerance;
    returns the matrix, the number of matched stars and their RMS residual (px)."""
    xy_f = np.column_stack([np.asarray(stars.x, np.float64), np.asarray(stars.y, np.float64)])
    xy_r = np.column_stack([np.asarray(reference.x, np.float64),
                            np.asarray(reference.y, np.float64)])
    var_f, var_r = _centroid_variance(stars), _centroid_variance(reference)
    tol, n_matched, rms = tolerance, 0, math.nan
    for _ in range(3):
        i, j = _match(matrix, xy_f, xy_r, tol)
        if len(i) < 3:
            break
        scale2 = abs(float(np.linalg.det(matrix[:2, :2])))
        w = 1.0 / (var_f[i] * scale2 + var_r[j])
        matrix, n_matched, rms = _clipped_fit(xy_f[i], xy_r[j], w)
        tol = min(tol, max(tolerance / 3.0, 5.0 * rms))
    return matrix, n_matched, rms


def find_transform(stars: Stars, reference_stars: Stars, *, max_control: int = 50,
                   tolerance: float = 3.0) -> Transform:
    """Find the transform that maps ``stars`` (a frame) onto ``reference_stars``.

    Triangles are built from each of the brightest ``max_control`` stars of both lists and
    its 5 nearest neighbours, described by their side ratios and orientation, and matched by
    those; each triangle match proposes a similarity (any rotation including a 180°
    meridian flip, any shift, scale within 0.2–5; mirror images are not matched). The
    proposal putting the most control stars within ``tolerance`` px of a reference star wins;
    then all stars are matched one-to-one under it and an affine (≥ 10 matches) or similarity
    is fitted by weighted least squares, three times with shrinking tolerance and 4σ clipping.

    Parameters
    ----------
    stars, reference_stars : Stars
        The frame's and the reference's catalogues.
    max_control : int
        Brightest stars of each list used for triangle matching.
    tolerance : float
        Match radius (px, reference grid) for the consensus count and the first refinement.

    Raises
    ------
    RegistrationError
        Fewer than 3 stars in either list, or no transform matched enough control stars (at
        least 4, or all of a shorter list, and at least 20 % of the smaller control list).
    """
    if max_control < 3 or not tolerance > 0:
        raise InputError(f"find_transform needs max_control ≥ 3 and tolerance > 0, got "
                         f"{max_control} and {tolerance}")
    for label, cat in (("in the frame", stars), ("in the reference", reference_stars)):
        if len(cat) < 3:
            raise RegistrationError(f"only {len(cat)} stars found {label}; needs at least 3")
    xy_f, xy_r = _control(stars, max_control), _control(reference_stars, max_control)
    a, b = _proposals(xy_f, xy_r)
    smaller = min(len(xy_f), len(xy_r))
    need = min(smaller, max(4, math.ceil(0.2 * smaller)))
    count, matrix = _consensus(a, b, xy_f, xy_r, tolerance) if a.size else (0, None)
    if matrix is None or count < need:
        raise RegistrationError(f"no transform matched more than {count} stars (needs {need} "
                                f"of the brightest {smaller})")
    matrix, n_matched, rms = _refine(matrix, stars, reference_stars, tolerance)
    if n_matched < 3:
        raise RegistrationError(f"no transform matched more than {max(count, n_matched)} stars "
                                f"after refinement")
    return Transform(matrix, n_matched=n_matched, rms=rms)


def register_frames(stars_list: Sequence[Stars], reference_index: int, *, max_control: int = 50,
                    tolerance: float = 3.0) -> list[Transform | RegistrationError]:
    """Transforms of every frame onto the frame ``reference_index``.

    Returns, per frame, its :class:`Transform` (the identity for the reference) or the
    :class:`RegistrationError` that explains why it could not be registered.
    """
    if not -len(stars_list) <= reference_index < len(stars_list):
        raise InputError(f"reference_index {reference_index} is outside the {len(stars_list)} "
                         f"frames")
    reference = stars_list[reference_index]
    ref_pos = reference_index % len(stars_list)
    out: list[Transform | RegistrationError] = []
    for k, stars in enumerate(stars_list):
        if k == ref_pos:
            out.append(Transform.identity(n_matched=len(reference)))
            continue
        try:
            out.append(find_transform(stars, reference, max_control=max_control,
                                      tolerance=tolerance))
        except RegistrationError as exc:
            out.append(exc)
    return out
