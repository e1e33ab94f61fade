"""Region statistics (IRAF imexamine-style) and per-frame QA metrics for flagging bad frames.

Everything here takes numpy arrays and returns numbers: :func:`region_stats` answers
"what is in ``[x1:x2,y1:y2]``", :func:`frame_metrics` measures a frame cheaply, and
:func:`flag_outliers` compares the frames of one calibration group with each other.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .._shared._kernels import mean_std
from .._shared.robust import MAD_TO_STD, clipped_stats_sorted, sorted_median
from ..errors import InputError
from ..io.headers import saturation_problem
from ..sections import Section, parse_section

# Absolute limits, applied to every frame whatever the size of its group.
ZERO_FRAC_LIMIT = 1e-4  # raw pixels at exactly 0 ADU: ADC floor or a readout failure
SATURATED_FRAC_LIMIT = 0.01  # 1 % of pixels at full scale (a bad column is ~0.1 %)

# Group (robust z-score) limits: a frame is flagged only when the deviation is both
# improbable (|z| > Z_LIMIT) and large in absolute/relative terms, so that tight groups
# (ten biases agreeing to 0.5 ADU) do not flag harmless drifts.
Z_LIMIT = 5.0
MIN_GROUP = 3


@dataclass(frozen=True)
class RegionStats:
    """Statistics of one image region, in the units of the data (ADU for raw frames).

    ``mean``, ``median``, ``std`` (population, ddof=0), ``min`` and ``max`` are over
    all finite pixels of the region; ``clipped_*`` follow astropy's
    ``sigma_clipped_stats`` (centre = median, spread = std, symmetric clip at
    ``sigma``, at most ``maxiters`` iterations). ``region`` is the FITS section
    (1-based, inclusive) actually measured.
    """

    region: str
    npix: int
    mean: float
    median: float
    std: float
    min: float
    max: float
    clipped_mean: float
    clipped_median: float
    clipped_std: float

    def to_dict(self) -> dict[str, float | int | str]:
        """The statistics as a plain dict (JSON-ready; NaN stays NaN)."""
        return asdict(self)


def _resolve_region(region: str | Section | None, shape: tuple[int, int]) -> Section:
    if region is None or (isinstance(region, str) and region.strip() == ""):
        return Section(1, shape[1], 1, shape[0])
    section = region if isinstance(region, Section) else parse_section(region)
    return section.resolve(shape)


def region_stats(
    data: np.ndarray,
    region: str | Section | None = None,
    *,
    sigma: float = 3.0,
    maxiters: int = 5,
) -> RegionStats:
    """Statistics of ``data`` inside an IRAF section, like IRAF ``imstat``/``imexamine``.

    Parameters
    ----------
    data : ndarray, (ny, nx)
        The image, numpy order (row = y).
    region : str or Section, optional
        ``"[x1:x2,y1:y2]"``, 1-based and inclusive at both ends, x = column; ``*`` for
        a whole axis. The whole frame by default.
    sigma : float
        Clipping threshold in standard deviations for the ``clipped_*`` values.
    maxiters : int
        Maximum number of clipping iterations (0: until nothing changes, as in astropy).

    Returns
    -------
    RegionStats
        NaN/inf pixels are ignored; a region without finite pixels gives ``npix=0``
        and NaN values.

    Raises
    ------
    InputError
        If the region cannot be parsed or lies outside the image.
    """
    image = np.asarray(data)
    if image.ndim != 2:
        raise InputError(f"expected a 2-D image, got an array of shape {image.shape}")
    section = _resolve_region(region, image.shape)
    rows, cols = section.slices()
    values = image[rows, cols]
    values = values[np.isfinite(values)]
    npix = int(values.size)
    if npix == 0:
        nan = math.nan
        return RegionStats(str(section), 0, nan, nan, nan, nan, nan, nan, nan, nan)
    # sorted in their own type (float32 sorts 3x faster), then widened: the same order
    ordered = np.sort(values).astype(np.float64, copy=False)
    cmean, cmedian, cstd = clipped_stats_sorted(ordered, sigma, maxiters)
    mean, std = mean_std(ordered, 0, npix)
    return RegionStats(
        region=str(section),
        npix=npix,
        mean=float(mean),
        median=sorted_median(ordered),
        std=float(std),
        min=float(ordered[0]),
        max=float(ordered[-1]),
        clipped_mean=float(cmean),
        clipped_median=float(cmedian),
        clipped_std=float(cstd),
    )


# -- per-frame QA metrics ----------------------------------------------------------------------
def default_saturation_of(data: np.ndarray, adc_maximum: float | None = None) -> float:
    if adc_maximum is not None and math.isfinite(adc_maximum) and adc_maximum > 0:
        return 0.999 * float(adc_maximum)
    if np.issubdtype(data.dtype, np.integer):
        return 0.999 * float(np.iinfo(data.dtype).max)
    return 0.999 * 65535.0  # float frames read from the usual unsigned 16-bit ADC


def _block_medians(sample: np.ndarray, blocks: int = 8, finite: bool = False) -> np.ndarray:
    """Medians of ``blocks`` x ``blocks`` blocks (NaN ignored; ``finite``: there is none, and
    numpy's plain median, the same numbers several times faster, serves)."""
    ny, nx = sample.shape
    by, bx = max(ny // blocks, 1), max(nx // blocks, 1)
    nby, nbx = ny // by, nx // bx
    trimmed = sample[: nby * by, : nbx * bx].reshape(nby, by, nbx, bx).swapaxes(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.median if finite else np.nanmedian)(trimmed.reshape(nby, nbx, by * bx), axis=2)


def frame_metrics(data: np.ndarray, *, saturation: float | None = None,
                  adc_maximum: float | None = None) -> dict[str, float]:
    """Cheap QA numbers of one raw frame, used to compare the frames of a calibration group.

    Pixel counts (``zero_frac``, ``saturated_frac``, ``min``, ``max``) use every pixel;
    the distribution statistics use a regular subsample of about 65,000 pixels (every
    k-th row and column), which keeps a 1k x 1k frame well under 0.1 s.

    Parameters
    ----------
    data : ndarray, (ny, nx)
        The raw frame in ADU.
    saturation : float, optional
        Pixels at or above this value count as saturated (the camera's SATURATE value).
        A level that cannot be real (see :func:`saturation_problem`: not positive, or
        below the frame's median) is a header placeholder and is replaced by the default.
    adc_maximum : float, optional
        The largest value the raw integer data can hold (65535 for unsigned 16-bit,
        known from BITPIX/BZERO when ``data`` has been decoded to float). The default
        saturation is 0.999 x this, else 0.999 x the maximum of the integer dtype, or
        0.999 x 65535 for float data (the usual 16-bit ADC).

    Returns
    -------
    dict of str to float
        ``level`` (median, ADU), ``noise`` (3-sigma clipped std, ADU), ``zero_frac`` (fraction
        of pixels exactly 0), ``saturated_frac``, ``gradient`` (range of the medians of
        8 x 8 blocks, ADU: large-scale structure), ``column_pattern`` (robust spread of
        the column medians, ADU), ``nonfinite_frac`` and the :class:`RegionStats`
        numbers ``mean``, ``median``, ``std``, ``min``, ``max``, ``clipped_mean``,
        ``clipped_median``, ``clipped_std`` (whole frame, subsampled except min/max),
        plus ``npix`` (all pixels) and ``saturation`` (the threshold used: compare it
        with ``saturation`` to know whether the given level was rejected).
    """
    image = np.asarray(data)
    if image.ndim != 2 or image.size == 0:
        raise InputError(f"expected a non-empty 2-D image, got an array of shape {image.shape}")
    npix = image.size
    finite = np.isfinite(image) if image.dtype.kind == "f" else None
    nonfinite = 0 if finite is None else int(npix - np.count_nonzero(finite))
    zero_count = int(np.count_nonzero(image == 0))
    lo = hi = math.nan
    if nonfinite < npix:
        lo, hi = ((float(np.nanmin(image)), float(np.nanmax(image))) if nonfinite
                  else (float(image.min()), float(image.max())))
    step = subsample_step(npix)
    return metrics_from_counts(image[::step, ::step], npix=npix, nonfinite=nonfinite, zero_count=zero_count,
                               lo=lo, hi=hi, count_at_or_above=lambda level: int(np.count_nonzero(image >= level)),
                               default_saturation=default_saturation_of(image, adc_maximum), saturation=saturation)


def subsample_step(npix: int) -> int:
    """The row and column step of the regular subsample :func:`frame_metrics` uses."""
    return max(1, int(math.sqrt(npix / 65536.0)))


def metrics_from_counts(sample: np.ndarray, *, npix: int, nonfinite: int, zero_count: int, lo: float, hi: float,
                        count_at_or_above: Any, default_saturation: float,
                        saturation: float | None = None) -> dict[str, float]:
    """:func:`frame_metrics` from its parts: the regular subsample ``image[::k, ::k]`` (k from
    :func:`subsample_step`) and what needs every pixel — the number of pixels, of non-finite
    ones and of zeros, the finite min and max, and ``count_at_or_above(level)``. Lets a
    caller count from a histogram of the stored integers instead of a decoded frame."""
    from astropy.stats import sigma_clipped_stats

    zero_frac = zero_count / npix
    if nonfinite == npix:
        sat = default_saturation if saturation is None or saturation_problem(float(saturation)) else float(saturation)
        nan = math.nan
        keys = ("level", "noise", "gradient", "column_pattern", "mean", "median", "std",
                "min", "max", "clipped_mean", "clipped_median", "clipped_std")
        return {**dict.fromkeys(keys, nan), "zero_frac": zero_frac,
                "saturated_frac": 0.0, "nonfinite_frac": 1.0,
                "npix": float(npix), "saturation": sat}
    sample = np.asarray(sample, dtype=np.float64)
    flat = sample[np.isfinite(sample)] if nonfinite else sample.ravel()
    level = float(np.median(flat))
    # Only a sane level counts pixels as saturated: a placeholder (DATAMAX = 0) would
    # call every pixel saturated.
    if saturation is None or saturation_problem(float(saturation), level):
        sat = default_saturation
    else:
        sat = float(saturation)
    saturated_frac = count_at_or_above(sat) / npix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmean, cmedian, cstd = sigma_clipped_stats(flat, sigma=3.0, maxiters=5)
    # The clipped std, not 1.4826 x MAD: raw frames are integers, and the MAD of a
    # 5-ADU noise quantises to whole ADU (every bias of a night shows 4.448).
    noise = float(cstd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        finite = flat.size == sample.size and bool(np.isfinite(flat).all())   # no NaN in the sample
        blocks = _block_medians(sample, finite=finite)
        gradient = float(np.nanmax(blocks) - np.nanmin(blocks))
        columns = (np.median if finite else np.nanmedian)(sample, axis=0)
    columns = columns[np.isfinite(columns)]
    col_centre = float(np.median(columns))
    column_pattern = MAD_TO_STD * float(np.median(np.abs(columns - col_centre)))
    return {
        "level": level,
        "noise": noise,
        "zero_frac": float(zero_frac),
        "saturated_frac": float(saturated_frac),
        "gradient": gradient,
        "column_pattern": column_pattern,
        "nonfinite_frac": nonfinite / npix,
        "npix": float(npix),
        "mean": float(np.mean(flat)),
        "median": level,
        "std": float(np.std(flat)),
        "min": lo,
        "max": hi,
        "clipped_mean": float(cmean),
        "clipped_median": float(cmedian),
        "clipped_std": float(cstd),
        "saturation": sat,
    }


# -- flagging ------------------------------------------------------------------------------------
def _robust_centre_scale(values: np.ndarray) -> tuple[float, float]:
    centre = float(np.median(values))
    scale = MAD_TO_STD * float(np.median(np.abs(values - centre)))
    return centre, scale


def _z(value: float, centre: float, scale: float, floor: float) -> float:
    return (value - centre) / max(scale, floor, 1e-12)


def _fmt(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _pct(frac: float) -> str:
    pct = 100.0 * frac
    return f"{pct:.2g}%" if pct < 10 else f"{pct:.0f}%"


def _get(metric: Mapping[str, float], key: str) -> float:
    value = metric.get(key) if metric else None
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def flag_outliers(metrics: Sequence[Mapping[str, float]], *, kind: str) -> list[list[str]]:
    """Reasons to distrust each frame of one calibration group (empty list = clean).

    Parameters
    ----------
    metrics : sequence of mapping
        :func:`frame_metrics` of every frame of the group (same kind, and same filter
        for flats / exposure time for darks). ``None`` or empty entries are skipped.
    kind : {"bias", "dark", "flat"}
        How the numbers are interpreted: flat levels may legitimately differ (twilight),
        so flats are compared by relative noise and relative structure.

    Returns
    -------
    list of list of str
        One list of human-readable reasons per frame, in input order.

    Notes
    -----
    Absolute checks, every group size: more than 0.01 % of the pixels at exactly
    0 ADU; more than 1 % at or above the saturation level; any NaN/inf pixel.

    Group checks, groups of at least 3 frames with metrics: robust z-score
    ``z = (x - median) / (1.4826 MAD)`` over the group, flagged when ``|z| > 5`` *and*
    the deviation is large in absolute terms:

    - level: bias/dark by more than 3 x the group's per-pixel noise; flat by more
      than 30 % of the group level (twilight flats spread widely and are scaled anyway).
    - noise: bias/dark noise, flat noise relative to its level; off by more than 30 %.
    - structure: large-scale gradient and column pattern, in units of the noise for
      bias/dark and of the level for flats; flagged when larger than the group by
      more than 1 noise (bias/dark) or 2 % of the level (flats) and by more than 50 %.
    - zero or saturated pixels far above the group (more than 10 x the group median
      and more than 0.01 % / 0.1 % of the pixels).
    """
    kind = (kind or "").lower()
    present = [i for i, m in enumerate(metrics) if m]
    reasons: list[list[str]] = [_absolute_reasons(m) if m else [] for m in metrics]
    if len(present) < MIN_GROUP:
        return reasons
    _group_reasons(metrics, present, reasons, is_flat=kind == "flat")
    return reasons


def _absolute_reasons(m: Mapping[str, float]) -> list[str]:
    """The checks of one frame alone: zeros, saturation, NaN."""
    reasons = []
    zero_frac, sat_frac = _get(m, "zero_frac"), _get(m, "saturated_frac")
    nonfinite = _get(m, "nonfinite_frac")
    if zero_frac > ZERO_FRAC_LIMIT:
        reasons.append(f"{_pct(zero_frac)} of pixels at 0 ADU")
    if sat_frac > SATURATED_FRAC_LIMIT:
        reasons.append(f"{_pct(sat_frac)} of pixels saturated (>= {_fmt(_get(m, 'saturation'))} ADU)")
    if nonfinite > 0:
        reasons.append(f"{_pct(nonfinite)} of pixels are NaN or infinite")
    return reasons


def _group_reasons(metrics: Sequence[Mapping[str, float]], present: list[int], reasons: list[list[str]], *,
                   is_flat: bool) -> None:
    """The checks of a frame against its group (see :func:`flag_outliers`); appends to ``reasons``."""

    def column(key: str) -> np.ndarray:
        return np.array([_get(metrics[i], key) for i in present], dtype=np.float64)

    level, noise = column("level"), column("noise")
    gradient, pattern = column("gradient"), column("column_pattern")
    zeros, saturated = column("zero_frac"), column("saturated_frac")
    ok = np.isfinite(level) & np.isfinite(noise)
    if np.count_nonzero(ok) < MIN_GROUP:
        return
    safe_level = np.where(np.abs(level) > 0, np.abs(level), np.nan)
    group_noise = float(np.nanmedian(noise[ok]))

    def check(values: np.ndarray, name: str, floor: float, large, describe) -> None:
        good = np.isfinite(values)
        if np.count_nonzero(good) < MIN_GROUP:
            return
        centre, scale = _robust_centre_scale(values[good])
        for j, value in enumerate(values):
            if not np.isfinite(value):
                continue
            z = _z(value, centre, scale, floor)
            if abs(z) > Z_LIMIT and large(value, centre):
                reasons[present[j]].append(describe(value, centre, z))

    # level
    if is_flat:
        check(level, "level", 1e-6 * float(np.nanmedian(np.abs(level))) + 1e-9,
              lambda v, c: abs(v - c) > 0.30 * abs(c),
              lambda v, c, z: f"level {_fmt(v)} ADU vs group {_fmt(c)} ({(v - c) / c:+.0%}, robust z={z:+.0f})")
    else:
        check(level, "level", 0.05 * group_noise,
              lambda v, c: abs(v - c) > 3.0 * group_noise,
              lambda v, c, z: f"level {_fmt(v)} ADU vs group {_fmt(c)} ({v - c:+.1f} ADU, robust z={z:+.0f})")

    # noise
    if is_flat:
        rel_noise = noise / safe_level
        check(rel_noise, "noise", 0.01 * float(np.nanmedian(rel_noise)),
              lambda v, c: abs(v - c) > 0.30 * abs(c),
              lambda v, c, z: f"noise {_pct(v)} of level vs group {_pct(c)} (robust z={z:+.0f})")
    else:
        check(noise, "noise", 0.01 * group_noise,
              lambda v, c: abs(v - c) > 0.30 * abs(c),
              lambda v, c, z: f"noise {_fmt(v)} ADU vs group {_fmt(c)} (robust z={z:+.0f})")

    # structure: only excess structure is suspicious
    unit = safe_level if is_flat else np.full_like(noise, group_noise if group_noise > 0 else np.nan)
    absolute = 0.02 if is_flat else 1.0
    unit_name = "of level" if is_flat else "x noise"
    for values, label in ((gradient / unit, "large-scale gradient"), (pattern / unit, "column pattern")):
        finite = values[np.isfinite(values)]
        if finite.size < MIN_GROUP:
            continue
        floor = 0.05 * float(np.median(finite)) + (0.002 if is_flat else 0.05)

        def describe(v, c, z, label=label):
            if is_flat:
                return f"{label} {_pct(v)} {unit_name} vs group {_pct(c)} (robust z={z:+.0f})"
            return f"{label} {v:.2g} {unit_name} vs group {c:.2g} (robust z={z:+.0f})"

        check(values, label, floor,
              lambda v, c: v - c > absolute and v > 1.5 * c,
              describe)

    # zero / saturated pixels far above the group, even below the absolute limits
    for values, label, minimum in ((zeros, "at 0 ADU", 1e-5),
                                   (saturated, "saturated", 1e-3)):
        good = np.isfinite(values)
        if np.count_nonzero(good) < MIN_GROUP:
            continue
        centre = float(np.median(values[good]))
        for j, value in enumerate(values):
            already = any(label in r for r in reasons[present[j]])
            if (good[j] and not already and value > minimum and value > 10 * centre):
                reasons[present[j]].append(
                    f"{_pct(value)} of pixels {label} vs group {_pct(centre)}"
                )
