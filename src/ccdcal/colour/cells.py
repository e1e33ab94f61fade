"""What a CFA frame's 2 × 2 cells give before any debayering: the pattern of a frame, and the
mean of each cell (what colour frames are judged and registered on). NumPy only (no numba), so
the judging helper process (:mod:`ccdcal.stacking.judge`) loads it in no time."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..io.headers import bayer_pattern

__all__ = ["cell_luminance", "frame_pattern"]


def cell_luminance(data: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The mean of each 2 × 2 cell of a CFA frame (one red, two green and one blue pixel, whatever
    the pattern and its phase) and where it has no value (a bad or non-finite pixel in the cell):
    what stars are found and matched on. Pixel (y, x) of it lies at (y + 0.5, x + 0.5) of the
    frame; shape (ny − 1, nx − 1). Its noise is the same in every cell (the cells that do not
    overlap are independent), so a sampled sky measures it as it is; a debayered colour's is not
    (a made value's noise depends on its place in the cell)."""
    cfa = np.asarray(data, dtype=np.float32)
    lum = cfa[:-1, :-1] + cfa[1:, :-1]
    lum += cfa[:-1, 1:]
    lum += cfa[1:, 1:]
    lum *= 0.25
    bad = ~np.isfinite(lum)
    if mask is not None:
        m = np.asarray(mask) != 0
        bad |= m[:-1, :-1] | m[1:, :-1] | m[:-1, 1:] | m[1:, 1:]
    lum[bad] = np.nan
    return lum, bad


def frame_pattern(header: Any, shape: tuple[int, int], given: str | None = None) -> str | None:
    """The pattern of a frame: its header's (:func:`ccdcal.io.headers.bayer_pattern`), else ``given``."""
    found, _ = bayer_pattern(header, shape)
    return found or (given.upper() if given else None)
