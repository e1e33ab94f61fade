"""Pixel-wise combination of frames: per-frame scaling, extrema and sigma rejection, median/mean/sum.

This is the simple in-memory reference engine; the streaming numba engine replaces
its inside behind the same :func:`combine` signature.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

METHODS = ("median", "mean", "sum")
SCALES = ("median", "mean", "clipped-mean", "none")


@dataclass(frozen=True)
class CombineResult:
    """The result of :func:`combine`.

    Attributes
    ----------
    data : ndarray, float32, (ny, nx)
        The combined image, in the units of the (scaled) inputs.
    uncertainty : ndarray, float32, (ny, nx) or None
        Standard error of the combined value per pixel.
    nlow_rejected, nhigh_rejected : ndarray, uint16, (ny, nx)
        How many values were rejected below / above the centre at each pixel.
    mask : ndarray, bool, (ny, nx)
        True where no value survived (the data there is NaN).
    header : astropy.io.fits.Header
        NCOMBINE, scale factors, members, EXPTIME and MJD-OBS of the result.
    scales, zeros : ndarray, float64, (n,)
        The multiplicative and additive per-frame factors applied before rejection.
    """

    data: np.ndarray
    uncertainty: np.ndarray | None
    nlow_rejected: np.ndarray
    nhigh_rejected: np.ndarray
    mask: np.ndarray
    header: Any
    scales: np.ndarray = field(default_factory=lambda: np.ones(0))
    zeros: np.ndarray = field(default_factory=lambda: np.zeros(0))


def parse_memory(memory: str | int) -> int:
    """Bytes of a memory budget such as ``"1GiB"``, ``"256MiB"``, ``"500MB"`` or an int."""
    if isinstance(memory, (int, np.integer)):
        return int(memory)
    text = str(memory).strip().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "K": 1024,
             "M": 1024**2, "G": 1024**3, "B": 1}
    upper = text.upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            number = upper[: -len(unit)]
            try:
                value = float(number)
            except ValueError:
                break
            if value <= 0:
                break
            return int(value * units[unit])
    try:
        value = float(text)
        if value > 0:
            return int(value)
    except ValueError:
        pass
    raise InputError(f"memory budget {memory!r} not understood; write it like '1GiB' or '256MiB'")


def _load(frames: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    from .frames import read_image

    arrays, headers = [], []
    for frame in frames:
        data, header = read_image(frame)
        arrays.append(data)
        headers.append(header)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"cannot combine frames of different shapes {sorted(shapes)}")
    return np.stack(arrays), headers


def _level(values: np.ndarray, how: str) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan")
    if how == "median":
        return float(np.median(finite))
    if how == "mean":
        return float(np.mean(finite))
    from astropy.stats import sigma_clipped_stats

    return float(sigma_clipped_stats(finite, sigma=3.0, maxiters=5)[0])


def frame_levels(stack: np.ndarray, how: str, region: tuple[slice, slice] | None) -> np.ndarray:
    """Per-frame level (median, mean or clipped mean) of ``region`` of each frame of ``stack``."""
    sub = stack if region is None else stack[(slice(None),) + tuple(region)]
    return np.array([_level(frame, how) for frame in sub])


def combine(
    frames: Sequence[Any],
    *,
    method: str = "median",
    scale: str | Sequence[float] | None = None,
    scale_region: str | None = None,
    clip_extrema: tuple[int, int] | None = None,
    sigma_clip: tuple[float, float] | None = None,
    center: str = "median",
    maxiters: int = 5,
    memory: str | int = "1GiB",
) -> CombineResult:
    """Combine equal-shaped frames pixel by pixel.

    Order of operations (IRAF/Siril order): per-frame scale → min/max rejection →
    iterative sigma clipping of the surviving *scaled* values → combine.

    Parameters
    ----------
    frames : sequence of path-like, FrameSource, ndarray or CCDData
        Equal-shaped 2-D images.
    method : {"median", "mean", "sum"}
        How the surviving values are combined.
    scale : {"median", "mean", "clipped-mean", "none"}, sequence of float, or None
        Multiplicative per-frame scaling. A name measures each frame's level in
        ``scale_region`` and multiplies frame i by ``mean(levels) / level_i`` so all
        frames sit at a common level; a sequence gives the factors directly.
    scale_region : str, optional
        IRAF section ``[x1:x2,y1:y2]`` (1-based, inclusive) where levels are measured;
        the whole frame by default.
    clip_extrema : (nlow, nhigh), optional
        Reject the ``nlow`` lowest and ``nhigh`` highest values at each pixel.
    sigma_clip : (low, high), optional
        Reject values more than ``low``/``high`` standard deviations below/above the
        centre, iterating until nothing changes or ``maxiters``.
    center : {"median", "mean"}
        Centre of the sigma clipping.
    maxiters : int
        Maximum sigma-clipping iterations.
    memory : str or int
        Memory budget (used by the streaming engine).
    """
    from .sections import to_slices

    if method not in METHODS:
        raise InputError(f"method {method!r} is not one of {', '.join(METHODS)}")
    parse_memory(memory)
    if len(frames) == 0:
        raise InputError("nothing to combine: no frames given")
    stack, headers = _load(frames)
    n = stack.shape[0]
    region = to_slices(scale_region, stack.shape[1:]) if scale_region else None
    if scale is None or (isinstance(scale, str) and scale == "none"):
        scales = np.ones(n)
    elif isinstance(scale, str):
        if scale not in SCALES:
            raise InputError(f"scale {scale!r} is not one of {', '.join(SCALES)}")
        levels = frame_levels(stack, scale, region)
        if not np.all(np.isfinite(levels)) or np.any(levels <= 0):
            raise InputError("cannot scale frames whose level is zero, negative or undefined")
        scales = levels.mean() / levels
    else:
        scales = np.asarray(scale, dtype=float)
        if scales.shape != (n,):
            raise InputError(f"scale has {scales.size} factors for {n} frames")
    stack *= scales.astype(np.float32)[:, None, None]

    valid = np.isfinite(stack)
    nlow = np.zeros(stack.shape[1:], dtype=np.uint16)
    nhigh = np.zeros(stack.shape[1:], dtype=np.uint16)
    if clip_extrema is not None:
        lo, hi = clip_extrema
        order = np.argsort(np.where(valid, stack, np.inf), axis=0)
        count = valid.sum(axis=0)
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(n)[:, None, None], axis=0)
        reject_low = rank < lo
        reject_high = (rank >= count - hi) & (rank < count)
        keep_some = count > lo + hi
        reject_low &= keep_some
        reject_high &= keep_some
        nlow += reject_low.sum(axis=0).astype(np.uint16)
        nhigh += reject_high.sum(axis=0).astype(np.uint16)
        valid &= ~(reject_low | reject_high)
    if sigma_clip is not None:
        low, high = sigma_clip
        for _ in range(maxiters):
            data = np.where(valid, stack, np.nan)
            with np.errstate(all="ignore"), _quiet():
                mid = np.nanmedian(data, axis=0) if center == "median" else np.nanmean(data, axis=0)
                std = np.nanstd(data, axis=0)
            below = valid & (stack < mid - low * std)
            above = valid & (stack > mid + high * std)
            if not (below.any() or above.any()):
                break
            nlow += below.sum(axis=0).astype(np.uint16)
            nhigh += above.sum(axis=0).astype(np.uint16)
            valid &= ~(below | above)
    data = np.where(valid, stack, np.nan)
    count = valid.sum(axis=0)
    with np.errstate(all="ignore"), _quiet():
        if method == "median":
            result = np.nanmedian(data, axis=0)
        elif method == "mean":
            result = np.nanmean(data, axis=0)
        else:
            result = np.nanmean(data, axis=0) * n
        std = np.nanstd(data, axis=0, ddof=1) if n > 1 else np.zeros_like(result)
        err = std / np.sqrt(np.maximum(count, 1))
        if method == "median":
            err *= 1.2533
        elif method == "sum":
            err *= n
    mask = count == 0
    return CombineResult(
        data=result.astype(np.float32),
        uncertainty=err.astype(np.float32),
        nlow_rejected=nlow,
        nhigh_rejected=nhigh,
        mask=mask,
        header=combined_header(headers, method=method, scales=scales, frames=frames),
        scales=scales,
        zeros=np.zeros(n),
    )


class _quiet:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)


def _frame_name(frame: Any, index: int) -> str:
    path = getattr(frame, "path", frame)
    if isinstance(path, (str, os.PathLike)):
        return os.path.basename(os.fspath(path))
    return f"array {index}"


def combined_header(headers: Sequence[Any], *, method: str, scales: np.ndarray, frames: Sequence[Any]) -> Any:
    """Header of a combined frame: the first input's cards, plus NCOMBINE, members, scales,
    EXPTIME (mean for mean/median, total for sum) and MJD-OBS/DATE-OBS of the members' mid-point."""
    from astropy.io import fits
    from astropy.time import Time

    from .frames import clean_header, header_value

    first = next((h for h in headers if h is not None), None)
    out = clean_header(first)
    n = len(headers)
    out["NCOMBINE"] = (n, "number of frames combined")
    out["COMBMETH"] = (method, "ccdcal combine method")
    exptimes = [header_value(h, ("EXPTIME", "EXPOSURE", "ITIME", "EXPTIM")) for h in headers]
    exptimes = [float(e) for e in exptimes if isinstance(e, (int, float))]
    if len(exptimes) == n and n:
        total = float(np.sum(exptimes))
        out["EXPTIME"] = (total if method == "sum" else total / n, "[s] exposure of the combined frame")
    starts = []
    for h in headers:
        mjd = header_value(h, ("MJD-OBS", "MJD_OBS"))
        if isinstance(mjd, (int, float)):
            starts.append(float(mjd))
            continue
        date = header_value(h, ("DATE-OBS", "DATE_OBS"))
        if isinstance(date, str):
            try:
                starts.append(Time(date.replace(" ", "T"), format="isot", scale="utc").mjd)
            except ValueError:
                pass
    if len(starts) == n and n:
        mid = 0.5 * (min(starts) + max(starts))
        out["MJD-OBS"] = (mid, "[d] mid-point of the combined frames' starts")
        out["DATE-OBS"] = (Time(mid, format="mjd", scale="utc").isot, "mid-point of the members' starts")
    for i, (frame, factor) in enumerate(zip(frames, scales, strict=False)):
        out[f"IMCMB{i + 1:03d}"] = (_frame_name(frame, i)[-60:], "combined input")
        if i < 999:
            out[f"SCAL{i + 1:04d}"] = (float(factor), "scale factor of input") if i < 9999 else None
    return fits.Header(out)
