"""Robust statistics shared by every module: the MAD-to-sigma constant, a MAD standard
deviation, an iteratively clipped one, and a clipped level with its spread."""

from __future__ import annotations

import math

import numpy as np

#: 1 / Φ⁻¹(3/4): the MAD of a normal distribution times this is its standard deviation.
MAD_TO_STD = 1.482602218505602


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
