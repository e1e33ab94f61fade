"""Robust statistics shared by every module: the MAD-to-sigma constant, a MAD standard
deviation, an iteratively clipped one, and a clipped level with its spread."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ._kernels import mean_std
from .normal import MAD_TO_STD


def median_function(values: np.ndarray) -> Callable[..., Any]:
    """``np.median`` where every value is finite, else ``np.nanmedian``: the same values, and
    numpy's nanmedian is slow (along a short axis it goes through masked arrays; a 4096² dark's
    blocks take twice the time)."""
    return np.median if bool(np.isfinite(values).all()) else np.nanmedian


def robust_std(values: np.ndarray) -> float:
    """Standard deviation estimated as 1.4826 × the median absolute deviation (finite values only)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return _mad_std(values, float(np.median(values)))


def _mad_std(values: np.ndarray, median: float) -> float:
    """1.4826 × the median absolute deviation of finite float64 ``values`` whose median is given."""
    return float(MAD_TO_STD * np.median(np.abs(values - median)))


def clipped_std(values: np.ndarray, *, sigma: float = 4.0, maxiters: int = 5) -> float:
    """Standard deviation after iterative ``sigma`` clipping about the median (finite values only).

    Unlike the MAD, it is not biased by integer-quantised data (raw ADU differences).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size < 2:
        return float("nan")
    centre = float(np.median(values))
    spread = _mad_std(values, centre)           # robust_std's, without its median again
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


def clipped_level(values: np.ndarray, *, sigma: float = 3.0, maxiters: int = 10) -> tuple[float, float]:
    """Sigma-clipped median and standard deviation of the finite ``values``: clip at
    ``sigma``·σ about the median until nothing changes; σ is the std of the survivors
    corrected for the truncation of a normal distribution (×1/0.9866 at 3σ)."""
    v = np.asarray(values, np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size < 3:
        return float("nan"), float("nan")
    centre, spread = float(np.median(v)), robust_std(v)
    phi = math.exp(-sigma * sigma / 2) / math.sqrt(2 * math.pi)
    truncation = math.sqrt(1.0 - 2.0 * sigma * phi / math.erf(sigma / math.sqrt(2)))
    count = v.size
    for _ in range(maxiters):
        if not spread > 0:
            break
        kept = v[np.abs(v - centre) <= sigma * spread]
        if kept.size < 3:
            break
        centre, spread = float(np.median(kept)), float(np.std(kept)) / truncation
        if kept.size == count:
            break
        count = kept.size
    return centre, spread


def sorted_median(ordered: np.ndarray) -> float:
    """The median of sorted values (as numpy's: the mean of the two middle ones for an even count)."""
    n = ordered.size
    return float(ordered[n // 2]) if n % 2 else float(0.5 * (ordered[n // 2 - 1] + ordered[n // 2]))


def clipped_stats_sorted(ordered: np.ndarray, sigma: float, maxiters: int | None) -> tuple[float, float, float]:
    """astropy's ``sigma_clipped_stats`` (median centre, population std, a symmetric clip at
    ``sigma``, inclusive bounds, survivors clipped again until nothing changes or ``maxiters``)
    of *sorted* float64 values: the survivors are always one run of them, so each pass costs two
    binary searches, a median by index and one compiled mean and std
    (:func:`ccdcal._shared._kernels.mean_std`), not a median's partition and a masked copy. As in
    astropy, ``maxiters`` of 0 or None clips until nothing changes."""
    ordered = np.ascontiguousarray(ordered, dtype=np.float64)
    lo, hi = 0, ordered.size
    passes = 0
    while not maxiters or passes < maxiters:
        passes += 1
        run = ordered[lo:hi]
        centre, spread = sorted_median(run), float(mean_std(ordered, lo, hi)[1])
        new_lo = lo + int(np.searchsorted(run, centre - sigma * spread, side="left"))
        new_hi = lo + int(np.searchsorted(run, centre + sigma * spread, side="right"))
        if (new_lo, new_hi) == (lo, hi):
            break
        lo, hi = new_lo, new_hi
        if lo >= hi:
            return math.nan, math.nan, math.nan
    mean, std = mean_std(ordered, lo, hi)
    return float(mean), sorted_median(ordered[lo:hi]), float(std)
