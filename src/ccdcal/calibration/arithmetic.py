"""The one calibration arithmetic: (raw − overscan − bias − k·dark) / flat, as small steps
(:func:`subtract_overscan`, :func:`subtract_bias`, :func:`subtract_dark`, :func:`safe_flat`)
that the row pass and the whole-frame pass both use; per-pixel uncertainty, bad-pixel masks
and dark optimisation.

Pure functions over arrays, plus :class:`CalibratedRows`, which applies a recipe to
any row source lazily, row tile by row tile, so that master frames can be stacked
from calibrated members without holding them all in memory, and
:func:`calibrate_frame`, which calibrates one whole frame with uncertainty and mask.

Mask bits are those of :mod:`ccdcal.masks`.

Units: raw frames, masters and the arithmetic are in ADU; ``gain`` is in e-/ADU;
read noise is in ADU inside this module (header ``RDNOISE`` is in electrons, as in IRAF).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._shared import state
from .._shared._kernels import subtract_scaled
from .._shared.robust import robust_std
from ..errors import InputError
from ..masks import (
    MASK_COSMIC_RAY,
    MASK_HOT,
    MASK_LOW_FLAT,
    MASK_NO_DATA,
    MASK_SATURATED,
    MASK_USER,
)
from ..sections import Section
from ._kernels import calibrate_pass, calibrated_sigma, flag_at_or_above
from .masters import STRUCTURE_LEVEL, dark_structure, hot_pixel_mask, low_flat_mask
from .overscan import OverscanFit, OverscanSpec, overscan_fit, overscan_image, trim_offsets
from .recipe import Recipe


# -- the lazy row pass ------------------------------------------------------------------------
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
    subtract_bias(data, bias)
    subtract_dark(data, dark, dark_scale)
    if flat is not None:
        data /= safe_flat(flat, flat_floor)
    return data


def subtract_overscan(raw: np.ndarray, model: np.ndarray, spec: OverscanSpec, first_row: int = 0) -> np.ndarray:
    """Subtract an overscan model (:func:`~ccdcal.calibration.overscan.overscan_image`) from float32 raw rows
    starting at ``first_row``, in place; returns ``raw``."""
    if spec.axis == 1:
        raw -= model[first_row: first_row + raw.shape[0], None].astype(np.float32)
    else:
        raw -= model[None, :].astype(np.float32)
    return raw


def subtract_bias(data: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """``data −= bias`` in float32, in place (nothing without a bias)."""
    if bias is not None:
        data -= np.asarray(bias, dtype=np.float32)
    return data


def subtract_dark(data: np.ndarray, dark: np.ndarray | None, scale: float) -> np.ndarray:
    """``data −= float32(scale)·dark`` in place (nothing without a dark or with scale 0)."""
    if dark is not None and scale != 0.0:
        dark = np.asarray(dark, dtype=np.float32)
        if data.flags.c_contiguous and dark.flags.c_contiguous and data.shape == dark.shape:
            subtract_scaled(data, dark, np.float32(scale))   # the same float32 arithmetic, no temporary
        else:
            data -= np.float32(scale) * dark
    return data


def safe_flat(flat: np.ndarray, flat_floor: float) -> np.ndarray:
    """The flat with every pixel below ``flat_floor`` (or not finite) replaced by 1. The floor is
    a float32, whatever its type, as in :func:`ccdcal.calibration.masters.low_flat_mask` and the lights'
    kernel (numpy would compare with an np.float64 floor in float64)."""
    flat = np.asarray(flat, dtype=np.float32)
    return np.where(np.isfinite(flat) & (flat >= np.float32(flat_floor)), flat, np.float32(1.0))


# products of masters that every light of a night needs (read-only, made once; the lights' stage)
_DERIVED = state.Cache("products of masters", until="lights", max_items=8)   # 2 per set of masters


def glow_region(dark: Master) -> np.ndarray | None:
    """Where a master dark glows (amp glow, a warm corner: the blocks of
    :func:`ccdcal.calibration.masters.dark_structure` above the frame's level), as a read-only
    boolean plane made once per master; None when the dark has no structure."""
    def make() -> np.ndarray:
        data = np.asarray(dark.data, dtype=np.float32)
        sample = data.reshape(-1)[:: max(1, data.size // 1_000_000)]
        centre, noise = float(np.nanmedian(sample)), robust_std(sample)
        structure = dark_structure(data, centre, noise) if noise > 0 else None
        if structure is None:
            return np.zeros((0, 0), bool)
        return structure[0] > np.float32(centre + STRUCTURE_LEVEL * noise)

    region = _derived("glow region", (dark,), (), make)
    return region if region.size and region.any() and not region.all() else None


def black_level(dark: Master) -> float:
    """The typical level of a master dark that was not bias-subtracted (its median, from a regular
    sample of about 250,000 pixels): the black level and the mean dark current a light of a night
    without biases keeps until the dark is subtracted."""
    def median() -> np.ndarray:
        flat = dark.data.reshape(-1)
        sample = flat[:: max(1, flat.size // 250_000)]
        return np.array(np.nanmedian(sample), dtype=np.float64)

    return float(_derived("black level", (dark,), (), median))


def _derived(what: str, masters: tuple[Master | None, ...], args: tuple[Any, ...], make: Any) -> np.ndarray:
    """``make()`` for these master objects, made once and shared (read-only) by the lights that
    use them; the most recently used are kept. Keyed by the objects (the entry holds them, so
    an id is not reused meanwhile): the master kept in memory while its file is written is the
    object cached as that file afterwards, and a master read again is a new object. A thread
    that asks while another makes the same thing waits for it; other keys do not wait."""
    key = (what, *(None if m is None else id(m) for m in masters), *args)

    def made() -> tuple[tuple[Any, ...], np.ndarray]:
        value = make()
        value.flags.writeable = False
        return masters, value

    return _DERIVED.get_or_make(key, made)[1]


class CalibratedRows:
    """A raw frame with its :class:`Recipe` applied lazily, row tile by row tile.

    Quacks like a row source (``shape``, ``read_rows``, ``header``, ``path``), so
    :func:`ccdcal.combining.engine.combine` can stack calibrated members straight from disk.

    Parameters
    ----------
    source : row source
        The raw frame (e.g. :class:`ccdcal.io.frames.FrameSource`).
    recipe : Recipe
        What to do.
    masters : mapping of str to ndarray
        The master frames named in the recipe (already trimmed).
    flat_floor : float
        See :func:`apply_masters`.
    """

    def __init__(self, source: Any, recipe: Recipe, masters: dict[str, np.ndarray] | None = None,
                 *, flat_floor: float = 0.1, overscan: OverscanFit | None = None):
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
        self.overscan: OverscanFit | None = overscan    # given: a fit made earlier (a band task)
        self.overscan_level: float | None = None if overscan is None else overscan.level
        # rows decoded straight into a caller's buffer (fill_rows): no overscan, no trimmed columns
        self._direct = (recipe.overscan is None and callable(getattr(source, "fill_rows", None))
                        and self._offset[1] == 0 and self.shape[1] == tuple(source.shape)[1])

    @property
    def raw_bytes_per_row(self) -> int:
        """Scratch bytes :meth:`fill_rows` needs per row (its source's, when it decodes there)."""
        return int(getattr(self.source, "raw_bytes_per_row", 0) or 0) if self._direct else 0

    def fit_overscan(self) -> OverscanFit | None:
        """The overscan fit of this frame (read from its overscan strip once), or None."""
        if self.recipe.overscan is not None and self.overscan is None:
            spec = self.recipe.overscan
            rows, cols = spec.region.slices()
            strip = self.source.read_rows(rows.start, rows.stop)[:, cols]
            self.overscan = overscan_fit(strip, spec)
            self.overscan_level = self.overscan.level
        return self.overscan

    def _overscan_model(self) -> np.ndarray:
        if self._overscan is None:
            fit = self.fit_overscan()
            self._overscan = overscan_image(fit, self.recipe.overscan, tuple(self.source.shape))
        return self._overscan

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Calibrated rows ``y0:y1`` of the trimmed frame, float32."""
        r0, c0 = self._offset
        raw = self.source.read_rows(r0 + y0, r0 + y1)
        if self.recipe.overscan is not None:
            subtract_overscan(raw, self._overscan_model(), self.recipe.overscan, r0 + y0)
        data = raw[:, c0: c0 + self.shape[1]]
        return self._apply_masters(np.ascontiguousarray(data), y0, y1)

    def fill_rows(self, y0: int, y1: int, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """:meth:`read_rows` into the float32 array ``out`` (the same values): decoded there and
        calibrated in place when the frame has no overscan or trimmed columns (a combine's tile
        then takes no copy of the rows), else copied from :meth:`read_rows`."""
        if not self._direct:
            out[...] = self.read_rows(y0, y1)
            return
        r0 = self._offset[0]
        self.source.fill_rows(r0 + y0, r0 + y1, out, scratch)
        self._apply_masters(out, y0, y1)

    def _apply_masters(self, data: np.ndarray, y0: int, y1: int) -> np.ndarray:
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
    facts: dict[str, Any] = field(default_factory=dict)   # header facts: RDNADU, GAINMEAS, NCOMBINE

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

    # one fused pass (numba), float32 throughout: the formula's operations in its order, with
    # non-finite σ_bias, σ_dark, σ_F and calibrated values taken as 0 (±inf as ±float32 max)
    signal = np.asarray(signal, dtype=np.float32)
    if signal.ndim != 2:
        raise InputError(f"the uncertainty needs a 2-D frame, got shape {signal.shape}")
    planes = []
    for name, plane in (("bias uncertainty", bias_uncertainty), ("dark uncertainty", dark_uncertainty),
                        ("flat", flat), ("flat uncertainty", flat_uncertainty), ("calibrated", calibrated)):
        if plane is not None and np.shape(plane) != signal.shape:
            raise InputError(f"the {name} is {np.shape(plane)}, the frame {signal.shape}")
        planes.append(_plane(plane))
    flags = np.array([bias_uncertainty is not None, dark_uncertainty is not None and bool(dark_scale),
                      flat is not None, flat is not None and flat_uncertainty is not None and calibrated is not None],
                     np.bool_)
    out = np.empty(signal.shape, np.float32)
    calibrated_sigma(signal, np.float32(gain), np.float32(np.float32(read_noise) ** 2), planes[0], planes[1],
                     np.float32(dark_scale), planes[2], planes[3], planes[4], flags, out)
    return out


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

    def counts(self, bits: Any) -> list[int]:
        """:meth:`count` of each of ``bits``, from one pass over the mask: a histogram of the
        values of its flagged pixels (a few in a hundred)."""
        mask = np.asarray(self.mask, np.uint8)
        hist = np.bincount(mask[mask != 0])
        present = [(int(v), int(hist[v])) for v in np.flatnonzero(hist)]
        return [sum(n for v, n in present if v & bit) for bit in bits]


def _overscan_and_trim(raw: np.ndarray, overscan: OverscanSpec | None, trim: Section | None,
                       saturation: float | None, bad_pixels: np.ndarray | None, mask_out: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, OverscanFit | None]:
    """The first steps of :func:`calibrate_frame` on a float32 ``raw`` (changed in place): the
    saturation and user masks judged on the raw values, the overscan fitted and subtracted
    (:func:`subtract_overscan`, as the row pass does), the frame trimmed. Returns (data, mask,
    fit); the mask is ``mask_out`` when given (uint8, the trimmed shape)."""
    shape = raw.shape
    fit = None
    if overscan is not None:
        rows, cols = overscan.region.slices()
        fit = overscan_fit(raw[rows, cols], overscan)
        model = overscan_image(fit, overscan, shape)
    ty, tx = (slice(None), slice(None)) if trim is None else trim.slices()
    out_shape = raw[ty, tx].shape
    if mask_out is not None and mask_out.shape == out_shape and mask_out.dtype == np.uint8:
        mask = mask_out
        mask.fill(0)
    else:
        mask = np.zeros(out_shape, dtype=np.uint8)
    if saturation is not None:
        flag_at_or_above(raw[ty, tx], np.float32(saturation), mask, np.uint8(MASK_SATURATED))
    if bad_pixels is not None:
        bpm = np.asarray(bad_pixels)
        if bpm.shape == shape and shape != out_shape:
            bpm = bpm[ty, tx]
        if bpm.shape != out_shape:
            raise InputError(f"the bad-pixel map is {bpm.shape[1]}x{bpm.shape[0]}; the frame is"
                             f" {shape[1]}x{shape[0]} raw, {out_shape[1]}x{out_shape[0]} trimmed")
        mask[bpm != 0] |= MASK_USER
    if fit is not None:
        subtract_overscan(raw, model, overscan)
    return np.ascontiguousarray(raw[ty, tx]), mask, fit


def _master_masks(mask: np.ndarray, bias: Master | None, dark: Master | None, flat: Master | None, *,
                  hot_sigma: float, flat_floor: float) -> None:
    """Add the masters' mask bits to ``mask`` (in place): those they carry, else derived from
    their data (hot pixels of a dark, weak pixels of a flat). Their union is made once per set
    of masters (:func:`_derived`)."""
    if bias is None and dark is None and flat is None:
        return
    mask |= _mask_union(mask.shape, bias, dark, flat, hot_sigma=hot_sigma, flat_floor=flat_floor)


def _mask_union(shape: tuple[int, ...], bias: Master | None, dark: Master | None, flat: Master | None, *,
                hot_sigma: float, flat_floor: float) -> np.ndarray:
    """The union of the masters' mask bits (:func:`_add_master_masks`), made once per set of masters."""

    def union() -> np.ndarray:
        bits = np.zeros(shape, dtype=np.uint8)
        _add_master_masks(bits, bias, dark, flat, hot_sigma=hot_sigma, flat_floor=flat_floor)
        return bits

    return _derived("mask", (bias, dark, flat), (float(hot_sigma), float(flat_floor)), union)


def prepare_shared(bias: Master | None, dark: Master | None, flat: Master | None, *, hot_sigma: float,
                   flat_floor: float) -> None:
    """Make now what :func:`calibrate_frame` shares between the lights calibrated on these masters
    (the union of the masters' mask bits), so that the first lights need not: ``reduce`` does it
    while the last master's file is written."""
    shapes = [m.data.shape for m in (bias, dark, flat) if m is not None]
    if shapes and all(shape == shapes[0] for shape in shapes):   # else calibrate_frame says why
        _mask_union(shapes[0], bias, dark, flat, hot_sigma=hot_sigma, flat_floor=flat_floor)


def _add_master_masks(mask: np.ndarray, bias: Master | None, dark: Master | None, flat: Master | None, *,
                      hot_sigma: float, flat_floor: float) -> None:
    for master, keep in ((bias, MASK_NO_DATA), (dark, MASK_NO_DATA | MASK_HOT), (flat, MASK_NO_DATA | MASK_LOW_FLAT)):
        if master is not None:
            bits = master.bits(keep)
            if bits is not None:
                mask |= bits
    if dark is not None and (dark.mask is None or dark.mask.dtype == bool):
        mask[hot_pixel_mask(dark.data, sigma=hot_sigma)] |= MASK_HOT
    if flat is not None:
        mask[low_flat_mask(flat.data, flat_floor)] |= MASK_LOW_FLAT


def _calibrate_pass(data: np.ndarray, bias: Master | None, dark: Master | None, scale: float,
                    flat: Master | None, flat_floor: float, bias_for_sigma: Master | None,
                    sigma: np.ndarray | None, gain: float | None, read_noise: float | None,
                    pedestal: float = 0.0) -> None:
    """``data`` (float32, C-contiguous) minus ``bias`` and ``scale``·``dark``, divided by the
    flat floored at ``flat_floor`` (:func:`safe_flat`, applied pixel by pixel), in place; σ into
    ``sigma`` when given (:func:`calibrated_uncertainty`'s formula, with ``bias_for_sigma``'s
    uncertainty even when the bias was subtracted before; the Poisson term of the signal above
    ``pedestal``)."""

    use_dark = dark is not None and scale != 0.0
    want = sigma is not None
    bias_unc = None if bias_for_sigma is None else bias_for_sigma.uncertainty
    dark_unc = None if dark is None else dark.uncertainty
    flat_unc = None if flat is None else flat.uncertainty
    flags = np.array([bias is not None, use_dark, flat is not None, want,
                      want and bias_unc is not None, want and dark_unc is not None and bool(scale),
                      want and flat is not None and flat_unc is not None], np.bool_)
    for what, array in (("bias", bias_unc), ("dark", dark_unc), ("flat", flat_unc)):   # data: checked by the caller
        if array is not None and array.shape != data.shape:
            raise InputError(f"the uncertainty of the master {what} is {array.shape}, the frame {data.shape}")
    calibrate_pass(data, _plane(None if bias is None else bias.data), _plane(None if dark is None else dark.data),
                   np.float32(scale), _plane(None if flat is None else flat.data), np.float32(flat_floor),
                   np.float32(gain if want else 1.0),
                   np.float32(np.float32(read_noise) ** 2) if want else np.float32(0.0),
                   _plane(bias_unc if flags[4] else None), _plane(dark_unc if flags[5] else None),
                   _plane(flat_unc if flags[6] else None), flags, sigma if want else _PLACEHOLDER,
                   np.float32(pedestal))


_PLACEHOLDER = np.zeros((1, 1), np.float32)   # what a kernel gets for an absent plane (never read)


def _plane(array: np.ndarray | None) -> np.ndarray:
    """A plane as the kernels take it: C-contiguous float32, or the placeholder when absent."""
    return _PLACEHOLDER if array is None else np.ascontiguousarray(array, dtype=np.float32)


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
    overwrite_raw: bool = False,
    uncertainty_out: np.ndarray | None = None,
    mask_out: np.ndarray | None = None,
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
    overwrite_raw : bool
        ``raw`` (C-contiguous float32) may be calibrated in place instead of copied: for a
        caller that read it for this and needs it no more (saves a frame of memory).
    uncertainty_out, mask_out : ndarray, optional
        Arrays of the trimmed shape (float32, uint8) the uncertainty and the mask are written
        into instead of new ones: a caller calibrating many frames reuses its memory.

    Notes
    -----
    Bias, dark, flat and uncertainty are one pass over the pixels
    (:func:`ccdcal.calibration._kernels.calibrate_pass`), with numpy's float32 rounding at each step.
    """
    if not (overwrite_raw and isinstance(raw, np.ndarray) and raw.dtype == np.float32 and raw.flags.writeable
            and raw.flags.c_contiguous):
        raw = np.array(raw, dtype=np.float32, copy=True)
    if raw.ndim != 2:
        raise InputError(f"expected a 2-D raw frame, got shape {raw.shape}")
    data, mask, fit = _overscan_and_trim(raw, overscan, trim, saturation, bad_pixels, mask_out)
    for what, master in (("bias", bias), ("dark", dark), ("flat", flat)):
        if master is not None and master.data.shape != data.shape:
            raise InputError(f"master {what} {master.name or ''} is {master.data.shape[1]}x{master.data.shape[0]}"
                             f" but the frame is {data.shape[1]}x{data.shape[0]} after trimming")
    notes: list[str] = []
    scale_used, optimized, npix = None, False, 0
    bias_done = False
    if dark is not None:
        scale_used = float(dark_scale)
        if dark_optimize:   # the scale is fitted to the frame above bias, before the dark
            subtract_bias(data, None if bias is None else bias.data)
            bias_done = True
            k, npix = optimize_dark_scale(data, dark.data, mask=mask != 0)
            if k is None:
                notes.append(f"dark optimisation: the master dark has no structure ({npix} pixels); "
                             f"exposure ratio {dark_scale:.4g} kept")
            else:
                scale_used, optimized = k, True
    _master_masks(mask, bias, dark, flat, hot_sigma=hot_sigma, flat_floor=flat_floor)
    if read_noise is None and fit is not None and np.isfinite(fit.noise):
        read_noise = fit.noise
    sigma = None
    if uncertainty:
        if gain is None or read_noise is None:
            notes.append("no uncertainty: " + ("the gain (e-/ADU) is unknown; pass it" if gain is None
                                               else "the read noise is unknown; pass it"))
        elif not gain > 0:
            raise InputError(f"gain must be positive to compute the uncertainty, got {gain!r}")
        elif uncertainty_out is not None and uncertainty_out.shape == data.shape \
                and uncertainty_out.dtype == np.float32 and uncertainty_out.flags.c_contiguous:
            sigma = uncertainty_out
        else:
            sigma = np.empty(data.shape, np.float32)
    # without a bias or an overscan the frame keeps its black level, which is no charge: the
    # Poisson term is of the signal above the dark's typical level (glow and hot pixels count)
    keeps_black = bias is None and not bias_done and fit is None and dark is not None
    pedestal = black_level(dark) if (keeps_black and sigma is not None) else 0.0
    _calibrate_pass(data, None if bias is None or bias_done else bias, dark, scale_used or 0.0, flat, flat_floor,
                    bias, sigma, gain, read_noise, pedestal)
    if cosmic_rays:
        mask[cosmic_ray_mask(data, gain=gain, read_noise=read_noise, mask=mask != 0)] |= MASK_COSMIC_RAY
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



