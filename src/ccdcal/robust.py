"""Robust statistics shared by every module: the MAD-to-sigma constant, a MAD standard
deviation and an iteratively clipped one."""

from __future__ import annotations

import numpy as np

#: 1 / Φ⁻¹(3/4): the MAD of a normal distribution times this is its standard deviation.
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
