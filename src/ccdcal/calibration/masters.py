"""Master science: flat levels and normalisation, dark scaling and the dark-matching rule,
hot pixels, read noise and gain from member pairs. Pure functions over arrays.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._shared._kernels import block_mean
from .._shared.robust import MAD_TO_STD, clipped_std, median_function, robust_std
from ..errors import InputError
from ..masks import MASK_HOT, MASK_LOW_FLAT, MASK_NO_DATA
from ._kernels import finish_planes

FLAT_NORMS = ("median", "clipped-mean")


def central_region(shape: tuple[int, int]) -> tuple[slice, slice]:
    """The central half (in each axis) of an image of ``shape`` (ny, nx)."""
    ny, nx = shape
    return (slice(ny // 4, ny - ny // 4), slice(nx // 4, nx - nx // 4))


def flat_level(flat: np.ndarray, region: tuple[slice, slice] | None = None, *, method: str = "median") -> float:
    """Level of a combined flat in ``region`` (central half by default): median or 3σ-clipped mean."""
    if method not in FLAT_NORMS:
        raise InputError(f"flat normalisation {method!r} is not one of {', '.join(FLAT_NORMS)}")
    part = np.asarray(flat[region if region is not None else central_region(flat.shape)])
    if method == "median" and part.dtype == np.float32:
        # numpy's median of the values as float64, without the float64 copy: the middle
        # float32 values are exact in float64, and their mean is taken there as numpy does
        values = part[np.isfinite(part)]
        n = values.size
        if n == 0:
            return float("nan")
        k = n // 2
        if n % 2:
            return float(np.partition(values, k)[k])
        middle = np.partition(values, (k - 1, k))
        return (float(middle[k - 1]) + float(middle[k])) / 2.0
    values = np.asarray(part, dtype=np.float64)
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
    """Dead or weak pixels of a normalised flat: below ``flat_floor`` (a float32, as
    :func:`ccdcal.calibration.arithmetic.safe_flat` takes it) or not finite (bool)."""
    flat = np.asarray(flat)
    return ~np.isfinite(flat) | (flat < np.float32(flat_floor))


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
    """Hot pixels of a master dark (bool): pixels that stand out from their neighbourhood.

    A pixel is hot when it exceeds the dark's background by more than ``sigma`` times its
    noise: the larger of the background's robust standard deviation (1.4826 × MAD) and, when
    given, the pixel's own ``uncertainty``. The background is the frame's median, except where
    the dark has structure (amp glow, a warm corner, a gradient): there it is the local level
    and spread of blocks of pixels (:func:`dark_structure`), so glow is left to the dark's
    subtraction and never masked. The frame's median and MAD are those of a regular subsample
    of about a million finite pixels.
    """
    dark = np.asarray(dark, dtype=np.float32)
    finite = np.isfinite(dark)
    every = bool(finite.all())
    if not every and not finite.any():
        return np.zeros(dark.shape, dtype=bool)
    sample = dark.reshape(-1) if every else dark[finite]   # all finite: a view, not a copy
    if sample.size > 1_000_000:
        sample = sample[:: sample.size // 1_000_000]
    centre = float(np.median(sample))
    noise = robust_std(sample)
    structure = dark_structure(dark, centre, noise) if noise > 0 else None
    if structure is not None:
        background, local = structure
        if uncertainty is not None:
            local = np.maximum(local, np.nan_to_num(np.asarray(uncertainty, dtype=np.float32), nan=0.0))
        return finite & (dark - background > np.float32(sigma) * local)
    if uncertainty is not None:
        noise = np.maximum(noise, np.nan_to_num(np.asarray(uncertainty, dtype=np.float32), nan=0.0))
    if np.all(np.asarray(noise) <= 0):
        return np.zeros(dark.shape, dtype=bool)
    # finite & (dark - centre > sigma * noise), the same numpy operations a band of rows at a
    # time: no frame-sized temporaries (on a 4k frame 4x faster than whole-frame steps)
    hot = np.empty(dark.shape, dtype=bool)
    values, flags, shift = dark.reshape(-1), hot.reshape(-1), np.float32(centre)
    per_pixel = np.broadcast_to(noise, dark.shape).reshape(-1) if isinstance(noise, np.ndarray) else None
    for i in range(0, values.size, _BAND):
        part = slice(i, i + _BAND)
        limit = sigma * (noise if per_pixel is None else per_pixel[part])
        np.greater(values[part] - shift, limit, out=flags[part])
    hot &= finite
    return hot


#: A block of a dark has structure when its median is off the frame's by more than this many
#: times the frame's pixel noise, or its spread is this many times the frame's (a block median
#: of 16×16 pixels is known to 0.08 σ and its spread to 10 %: a flat dark never gets there).
STRUCTURE_LEVEL, STRUCTURE_SPREAD = 0.5, 1.5


def dark_structure(dark: np.ndarray, centre: float, noise: float) -> tuple[np.ndarray, np.ndarray] | None:
    """The background level and pixel noise of a master dark with structure (amp glow, warm
    corners, gradients), or None when it has none (then the frame's ``centre`` and ``noise``
    describe every pixel, and hot pixels are judged against them as on a CCD).

    The frame is cut into blocks (16–64 pixels a side, about 12 across its short side; edges
    mirrored), each block's median and robust spread are taken, blocks without structure
    (:data:`STRUCTURE_LEVEL`, :data:`STRUCTURE_SPREAD`) are given the frame's values, and the
    grid is interpolated bilinearly between block centres. Hot pixels are a few per block and
    leave its median and spread where they were.
    """
    ny, nx = dark.shape
    size = int(np.clip(min(ny, nx) // 12, 16, 64))
    if min(ny, nx) < 2 * size:
        return None
    nby, nbx = -(-ny // size), -(-nx // size)
    padded = dark if (ny % size == 0 and nx % size == 0) else \
        np.pad(dark, ((0, nby * size - ny), (0, nbx * size - nx)), mode="reflect")
    blocks = padded.reshape(nby, size, nbx, size).transpose(0, 2, 1, 3).reshape(nby, nbx, size * size)
    median = median_function(blocks)     # a 4096² dark: 1.3 s -> 0.6 s where every value is finite
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # an all-NaN block: the frame's values
        level = median(blocks, axis=2)
        spread = MAD_TO_STD * median(np.abs(blocks - level[..., None]), axis=2)
    level = np.where(np.isfinite(level), level, centre)
    spread = np.where(np.isfinite(spread), spread, noise)
    flat_block = (np.abs(level - centre) <= STRUCTURE_LEVEL * noise) & (spread <= STRUCTURE_SPREAD * noise)
    if flat_block.all():
        return None
    level = np.where(flat_block, centre, level)
    spread = np.where(flat_block, noise, np.maximum(spread, noise))
    return _bilinear(level, size, (ny, nx)), _bilinear(spread, size, (ny, nx))


def _bilinear(grid: np.ndarray, size: int, shape: tuple[int, int]) -> np.ndarray:
    """A grid of block values (blocks of ``size`` pixels) interpolated to every pixel of ``shape``
    (linear between block centres, constant beyond the outer ones), float32."""
    def axis(n_blocks: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = (np.arange(n) + 0.5) / size - 0.5
        lo = np.clip(np.floor(pos).astype(int), 0, max(n_blocks - 2, 0))
        hi = np.minimum(lo + 1, n_blocks - 1)
        w = np.clip(pos - lo, 0.0, 1.0)
        return lo, hi, w

    y0, y1, wy = axis(grid.shape[0], shape[0])
    x0, x1, wx = axis(grid.shape[1], shape[1])
    rows = grid[y0] * (1 - wy)[:, None] + grid[y1] * wy[:, None]
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


_BAND = 1 << 18   # pixels per step of hot_pixel_mask


def read_noise_from_pair(first: np.ndarray, second: np.ndarray) -> float:
    """Read noise (ADU) of one frame from two bias frames: robust std of their difference / sqrt(2).

    Fixed structure (bias pattern, hot pixels) cancels in the difference; a 4-sigma
    clipped standard deviation ignores the few pixels that do not (cosmic rays).
    """
    diff = np.subtract(first, second, dtype=np.float64)      # in float64, without two copies first
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


# -- rejection of a master: the noise model --------------------------------------------------
#: Pixels of the central band that pair statistics (read noise, gain, noise floor) use: the
#: relative precision of a clipped std from N pixel differences is about 1/sqrt(2N), 0.07 %.
PAIR_SAMPLE_PIXELS = 1 << 20


@dataclass(frozen=True)
class NoiseModel:
    """How a master's members are clipped: σ of each value from the detector, not the sample.

    ``reject`` is a :func:`ccdcal.combining.engine.combine` algorithm; for ``ccdclip`` the value of
    frame i at level L (ADU) has σ = sqrt(rn² + max(L − pedestal, 0)/gain) ADU with ``rn =
    read_noise/gain``; ``pedestal = inf`` keeps read noise alone (biases; darks of unknown gain).
    """

    reject: str
    gain: float | None = None            # e-/ADU
    read_noise: float | None = None      # e-
    pedestal: float = 0.0                # ADU
    sensitivity_noise: float = 0.0       # fraction of the level (darks: temperature jitter)
    read_noise_measured: float | None = None   # ADU, from two member biases
    gain_measured: float | None = None         # e-/ADU, from two member flats
    dark_noise: float | None = None            # ADU, a member dark's pixel noise (darks not bias-subtracted)
    history: tuple[str, ...] = ()

    def combine_keywords(self) -> dict[str, Any]:
        if self.reject == "none":
            return {}
        if self.reject != "ccdclip":
            return {"reject": self.reject}
        return {"reject": "ccdclip", "gain": self.gain, "read_noise": self.read_noise, "pedestal": self.pedestal,
                "sensitivity_noise": self.sensitivity_noise}


def central_band(source: Any) -> np.ndarray:
    """The central rows of a (calibrated) member, about :data:`PAIR_SAMPLE_PIXELS` pixels."""
    ny, nx = (int(v) for v in source.shape)
    height = min(ny, max(8, PAIR_SAMPLE_PIXELS // max(nx, 1)))
    y0 = (ny - height) // 2
    return np.asarray(source.read_rows(y0, y0 + height), dtype=np.float32)


LEVEL_SAMPLE_PIXELS = 1 << 21  # pixels of the row sample member flats' scale levels are measured on


def closest_pair(levels: list[float]) -> tuple[int, int]:
    """The two members whose levels (ADU; NaN when unknown) are closest in ratio."""
    logs = np.log(np.clip(np.nan_to_num(np.asarray(levels, dtype=np.float64), nan=1.0), 1e-9, None))
    best, pair = np.inf, (0, 1)
    for i in range(len(logs)):
        for j in range(i + 1, len(logs)):
            if abs(logs[i] - logs[j]) < best:
                best, pair = abs(logs[i] - logs[j]), (i, j)
    return pair


#: Fraction of a dark's level added to its noise model: dark current changes by ~7 % per °C,
#: set points jitter by tenths of a degree, and hot pixels flicker, so hot pixels scatter
#: more than their shot noise (without it, their values would be rejected as outliers).
DARK_SENSITIVITY_NOISE = 0.05


def noise_model(kind: str, *, n: int, gain: float | None = None, gain_source: str = "",
                read_noise: float | None = None, bias_read_noise: float | None = None,
                floor: float | None = None, typical: float = 0.0, gain_measured: float | None = None,
                bias_subtracted: bool = True, keeps_black: bool = False,
                thresholds: tuple[float, float] = (3.0, 3.0)) -> NoiseModel:
    """The default (``auto``) rejection of a master of ``n`` members of ``kind``.

    Parameters
    ----------
    kind : {"bias", "dark", "flat"}
        The kind of master.
    n : int
        Members; fewer than 3 get no rejection.
    gain : float, optional
        e-/ADU from the options or a header that states it in e-/ADU (never a camera setting).
    read_noise : float, optional
        e- from the options or the header (used with ``gain``).
    bias_read_noise : float, optional
        ADU, measured on the biases (the master bias's RDNADU).
    floor : float, optional
        ADU: clipped std of the difference of two members / sqrt(2) (read noise for biases;
        read noise and typical dark shot noise for darks).
    typical : float
        ADU: the members' typical (median) level, where ``floor`` was measured.
    gain_measured : float, optional
        e-/ADU from two member flats (photon transfer).
    bias_subtracted : bool
        Whether the members have had a bias removed (else their level holds a pedestal).
    keeps_black : bool
        Darks with neither a bias nor an overscan removed (a CMOS night without biases): their
        ``floor`` is kept as ``dark_noise``, the read noise of the lights they calibrate.

    Returns
    -------
    NoiseModel
        Biases: σ = read noise. Darks: σ = sqrt(rn² + dark/gain + (0.05·dark)²) with a known
        gain, else sqrt(floor² + excess + (0.05·excess)²) for the excess over the typical level
        (1 e-/ADU assumed); see :data:`DARK_SENSITIVITY_NOISE`. Flats (scaled):
        σ_i = s_i·sqrt(rn² + level_i/gain) with the known or measured gain. MAD clipping where
        none of that can be had.
    """
    low, high = thresholds
    rn_known = read_noise / gain if (read_noise and gain) else None
    if n < 3:
        return NoiseModel("none", read_noise_measured=floor if kind == "bias" else None,
                          gain_measured=gain_measured,
                          dark_noise=floor if (kind == "dark" and keeps_black) else None)
    if kind == "bias":
        rn = rn_known or floor
        if rn is None:
            return NoiseModel("mad", history=("rejection: MAD clip (read noise unknown)",))
        return NoiseModel("ccdclip", gain=1.0, read_noise=rn, pedestal=math.inf, read_noise_measured=floor,
                          history=(f"rejection: values beyond {low:g}/{high:g} x the read noise"
                                   f" ({rn:.3f} adu) from the median",))
    if gain is None and kind == "flat" and gain_measured:
        gain, gain_source = gain_measured, "photon transfer of two member flats"
    rn = rn_known or bias_read_noise
    snoise = DARK_SENSITIVITY_NOISE if kind == "dark" else 0.0
    jitter = f" + ({snoise:g} level)^2" if snoise else ""
    if gain is not None and rn is not None and bias_subtracted:
        return NoiseModel("ccdclip", gain=gain, read_noise=rn * gain, pedestal=0.0, sensitivity_noise=snoise,
                          gain_measured=gain_measured,
                          history=(f"rejection: sigma = sqrt(({rn:.3f} adu)^2 + level/{gain:.4g}{jitter}) per"
                                   f" value (gain from {gain_source})",))
    if kind == "dark" and floor is not None:
        # the excess over the typical level: with the gain where the darks keep the black level
        # (their floor is then the lights' read noise), else 1 e-/adu
        known = gain if (keeps_black and gain is not None) else None
        per = f"excess/{known:.4g}" if known else "excess"
        source = f"gain from {gain_source}" if known else "gain unknown: 1 e-/adu assumed"
        return NoiseModel("ccdclip", gain=known or 1.0, read_noise=floor * (known or 1.0), pedestal=typical,
                          sensitivity_noise=snoise, dark_noise=floor if keeps_black else None,
                          history=(f"rejection: sigma = sqrt(({floor:.3f} adu)^2 + {per}{jitter}) for the excess"
                                   f" over the typical {typical:.4g} adu ({source})",))
    return NoiseModel("mad", gain_measured=gain_measured,
                      history=("rejection: MAD clip (no read noise and gain for a noise model)",))


# -- a combined master, finished: normalisation, masks, counts -------------------------------------
@dataclass(frozen=True)
class FinishedMaster:
    """A master's planes and the facts that describe them (see :func:`finish_master`); their
    header cards are written by :func:`ccdcal.io.headers.master_cards`."""

    data: np.ndarray                      # float32
    uncertainty: np.ndarray | None        # float32
    mask: np.ndarray                      # uint8, bits of :mod:`ccdcal.masks`
    level: float | None                   # [adu] the level a flat was divided by (None: not a flat)
    n_hot: int | None                     # hot pixels masked in a dark (None: not a dark)
    n_nodata: int                         # pixels without a valid value
    history: tuple[str, ...]
    cfa_levels: tuple[float, ...] = ()    # a colour flat normalised per CFA colour: the 2x2 cells' levels


def finish_master(kind: str, data: np.ndarray, uncertainty: np.ndarray | None, nodata: np.ndarray, *,
                  flat_norm: str = "median", flat_floor: float = 0.1, hot_sigma: float = 5.0,
                  region: tuple[slice, slice] | None = None, region_text: str | None = None,
                  in_place: bool = False, cfa: str | None = None) -> FinishedMaster:
    """What a combined master becomes: a flat normalised to 1 (uncertainty too) with its weak
    pixels masked and its holes set to 1; a bias or dark with its holes set to 0 and, for a
    dark, its hot pixels masked. ``nodata`` marks pixels without a valid value (MASK bit 32).
    ``in_place``: ``data`` and ``uncertainty`` (float32, C-contiguous) may be overwritten (one
    pass, :func:`ccdcal.calibration._kernels.finish_planes`, and no new frames). ``cfa="channel"``:
    a colour camera's flat, whose four cells of the 2x2 Bayer pattern are then each normalised to
    1 (the flat's tint taken out, as PixInsight does by default; ``"scalar"`` or None: one level).
    """

    history: list[str] = []

    def own(array: np.ndarray) -> np.ndarray:
        usable = in_place and array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable
        return array if usable else np.array(array, dtype=np.float32, order="C")

    data = own(data)
    uncertainty = None if uncertainty is None else own(uncertainty)
    nodata = np.ascontiguousarray(nodata, dtype=bool)
    level = 1.0
    if kind == "flat":
        level = flat_level(data, region, method=flat_norm)
        if not np.isfinite(level) or level <= 0:
            raise InputError(f"the combined flat has a level of {level:g} in its central region; check the flat frames")
    mask = np.empty(data.shape, np.uint8)
    finish_planes(data, data if uncertainty is None else uncertainty, uncertainty is not None, nodata,
                  np.float32(level), kind == "flat", np.float32(flat_floor), np.uint8(MASK_NO_DATA),
                  np.uint8(MASK_LOW_FLAT), mask)
    n_hot = None
    cfa_levels: tuple[float, ...] = ()
    if kind == "flat":
        history.append(f"normalised by the {flat_norm} of {region_text or 'the central half'}: {level:.6g} adu")
        if cfa == "channel":
            cfa_levels = _normalise_cfa(data, uncertainty, mask, nodata, flat_norm, flat_floor)
            history.append("then each cell of the 2x2 CFA normalised to 1: "
                           + " ".join(f"{v:.5g}" for v in cfa_levels))
    if kind == "dark":
        hot = hot_pixel_mask(data, sigma=hot_sigma) & ~nodata
        mask[hot] |= MASK_HOT
        n_hot = int(hot.sum())
    return FinishedMaster(data, uncertainty, mask, level if kind == "flat" else None, n_hot,
                          int(np.count_nonzero(nodata)), tuple(history), cfa_levels)


def _normalise_cfa(data: np.ndarray, uncertainty: np.ndarray | None, mask: np.ndarray, nodata: np.ndarray,
                   method: str, flat_floor: float) -> tuple[float, ...]:
    """Divide each cell of the 2x2 CFA of a normalised flat by its own level (in place); the
    weak-pixel bits follow. Returns the four levels, (0,0), (0,1), (1,0), (1,1)."""
    levels = []
    for dy in (0, 1):
        for dx in (0, 1):
            cell = data[dy::2, dx::2]
            value = flat_level(cell, method=method)
            if not np.isfinite(value) or value <= 0:
                raise InputError(f"a CFA colour of the combined flat has a level of {value:g}; check the flat frames")
            cell /= np.float32(value)
            if uncertainty is not None:
                uncertainty[dy::2, dx::2] /= np.float32(value)
            levels.append(float(value))
    weak = low_flat_mask(data, flat_floor) & ~nodata
    mask &= np.uint8(~MASK_LOW_FLAT & 0xFF)
    mask[weak] |= MASK_LOW_FLAT
    return tuple(levels)


def rejection_map(nlow: np.ndarray, nhigh: np.ndarray, *, size: int = 800) -> np.ndarray | None:
    """Values rejected per pixel, block-averaged to at most ``size`` px and scaled to 0..1
    (square root, so single rejections show); None for an empty image."""

    ny, nx = nlow.shape
    step = max(1, -(-max(ny, nx) // size))
    h, w = ny // step, nx // step
    if h == 0 or w == 0:
        return None
    binned = np.empty((h, w), np.float32)
    # the counts summed as float32 (no integer overflow) block by block, not as a frame first
    block_mean(nlow[: h * step, : w * step], step, binned, nhigh[: h * step, : w * step])
    top = float(binned.max())
    return np.sqrt(binned / top) if top > 0 else binned
