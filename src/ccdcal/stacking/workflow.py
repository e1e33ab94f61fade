"""Stack calibrated lights into one deep image: judge the frames, register them, stack them.

1. **Judge** (what PixInsight's SubframeSelector and Siril's plots are used for): stars are
   detected in every frame (:func:`ccdcal.stacking.register.detect_stars`) and each frame gets its
   number of stars, FWHM, eccentricity, background and noise; frames that are outliers of
   their group (clouds, trailing, bad focus, no stars) are left out with the reason
   (``keep_all`` keeps all but those without stars).
2. **Register**: each frame's stars are matched to the reference's by triangle invariants and
   the transform refined on all matched stars (:func:`ccdcal.stacking.register.find_transform`);
   frames that cannot be registered are left out with the reason. The matched stars also
   give a check of the transparency: the median flux ratio to the reference.
3. **Stack** (:func:`ccdcal.stacking.engine.stack`): resampled onto the reference grid, background-
   matched and scaled to the reference's transparency (measured there), noise-model
   rejection, inverse-variance weights.

The reference is the given frame, else the kept frame with the most stars (ties: the
sharpest).

One-shot-colour frames (a Bayer pattern in their header, or given) are debayered after their
calibration, never before (:mod:`ccdcal.colour.demosaic`): stars are found and matched on the
mean of the three colours, and each colour is resampled, matched, rejected, weighted and
stacked on its own (one transform per frame for all three); the stack is an RGB cube.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._shared.progress import ProgressOption, resolve_progress, steps
from ..colour.demosaic import DebayeredRows, debayer, frame_pattern, luminance, rgb_header
from ..errors import CcdcalWarning, InputError
from ..io.guard import refuse_overwrite
from ..io.headers import exposure_of
from ..io.writer import write_bytes
from ..stretch import downsample, png_bytes, stretch
from .engine import StackResult, stack
from .register import (
    RegistrationError,
    detect_stars,
    find_transform,
    flag_outliers,
    frame_quality,
    nearest,
)

#: matched stars closer than this (px, after the transform) measure the flux ratio
FLUX_MATCH_RADIUS = 1.5


@dataclass(frozen=True)
class FrameVerdict:
    """One frame as judged and registered.

    Attributes
    ----------
    path : str
    quality : ccdcal.stacking.register.FrameQuality or None
        Stars, FWHM, eccentricity, background, noise (None when unreadable).
    matrix : tuple of 9 floats or None
        Frame → reference transform (row-major 3×3), when registered.
    n_matched, rms : int, float
        Stars matched and their residual (px) in the registration.
    flux_ratio : float or None
        Median flux(reference) / flux(frame) of the matched stars, over ``|det|`` of the transform
        (resampling keeps values per pixel): the frame's scale on the reference grid.
    reason : str or None
        Why it was left out (None: stacked).
    pattern : str or None
        Its Bayer pattern (None: mono), the frame judged and stacked in colour.
    weight : float or None
        Its weight in the stack (1/(scale·σ_bg)², the frames' mean 1: noise and transparency
        from the data; for a colour stack the green's), once stacked.
    """

    path: str
    quality: Any = None
    matrix: tuple[float, ...] | None = None
    n_matched: int = 0
    rms: float = float("nan")
    flux_ratio: float | None = None
    reason: str | None = None
    reference: bool = False
    weight: float | None = None
    pattern: str | None = None

    @property
    def used(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        q = self.quality
        return {"path": self.path, "used": self.used, "reference": self.reference, "reason": self.reason,
                "stars": None if q is None else int(q.n_stars), "fwhm": None if q is None else _num(q.fwhm),
                "eccentricity": None if q is None else _num(q.eccentricity),
                "background": None if q is None else _num(q.background),
                "noise": None if q is None else _num(q.noise), "matched": self.n_matched, "rms": _num(self.rms),
                "flux_ratio": None if self.flux_ratio is None else _num(self.flux_ratio),
                "weight": None if self.weight is None else _num(self.weight)}


def _num(value: Any) -> float | None:
    value = float(value)
    return round(value, 4) if np.isfinite(value) else None


@dataclass
class StackRun:
    """What :func:`stack_files` did: the stack (when one was made), its file and every frame's verdict."""

    frames: list[FrameVerdict]
    result: Any = None                    # ccdcal.stacking.engine.StackResult
    output: Path | None = None
    preview: Path | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # what the stack assumed, said once

    @property
    def reference(self) -> str | None:
        return next((f.path for f in self.frames if f.reference), None)

    def table(self) -> Any:
        """The frames table as an astropy Table (one row per frame)."""
        from astropy.table import Table

        return Table(rows=[f.to_json() for f in self.frames])

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


def _read_frame(path: str, given: str | None = None) -> tuple[np.ndarray, np.ndarray | None, Any, str | None]:
    """A frame's data, mask, header and Bayer pattern (None: mono; ``given`` for colour frames
    whose header names none); a colour frame's data as the mean of its colours."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            data = np.asarray(hdul[0].data, dtype=np.float32)
            mask = np.asarray(hdul["MASK"].data) if "MASK" in hdul else None
            header = hdul[0].header.copy()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: cannot be read as a calibrated frame ({exc})") from exc
    if data.ndim != 2:
        raise InputError(f"{path}: expected a 2-D image, got shape {data.shape}")
    pattern = frame_pattern(header, data.shape, given)
    if pattern is not None:
        data, mask = luminance(debayer(data, pattern, mask=mask))
    return data, mask, header, pattern


def judge_frames(paths: Any, *, keep_all: bool = False, max_stars: int = 300,
                 progress: ProgressOption = None, bayer_pattern: str | None = None
                 ) -> tuple[list[FrameVerdict], list[Any]]:
    """Stars and quality of every frame, and the outliers of the group left out with the reason.
    A colour frame (a Bayer pattern in its header, or ``bayer_pattern`` given) is judged on the
    mean of its colours; colour and mono frames together are an InputError. A frame that cannot
    be read is left out with the reason.

    Returns the verdicts (each with its pattern) and the star lists (None where none was measured).
    """

    paths = [str(p) for p in paths]
    qualities, stars, errors, exptimes, patterns = [], [], [], [], []
    for path in steps(paths, "finding stars", progress):
        quality = found = error = exptime = pattern = None
        try:
            data, mask, header, pattern = _read_frame(path, bayer_pattern)
            exptime = exposure_of(header)
            found = detect_stars(data, mask, max_stars=max_stars)
            quality = frame_quality(found, data.shape)
        except InputError as exc:
            error = str(exc)
        for kept, value in ((qualities, quality), (stars, found), (errors, error), (exptimes, exptime),
                            (patterns, pattern)):
            kept.append(value)
    read = [i for i, e in enumerate(errors) if e is None]
    if len({patterns[i] is None for i in read}) > 1:
        colour = [Path(paths[i]).name for i in read if patterns[i]][:3]
        raise InputError(f"some frames are colour (a Bayer pattern: {', '.join(colour)} ...) and some mono;"
                         " stack them apart")
    measured = [i for i, q in enumerate(qualities) if q is not None]
    flags = flag_outliers([qualities[i] for i in measured], [Path(paths[i]).name for i in measured],
                          [exptimes[i] for i in measured])
    reasons: list[str | None] = list(errors)
    for i, flag in zip(measured, flags, strict=True):
        if flag and (not keep_all or "no stars" in flag):
            reasons[i] = flag
    return [FrameVerdict(path=p, quality=q, reason=r, pattern=b)
            for p, q, r, b in zip(paths, qualities, reasons, patterns, strict=True)], stars


def _pick_reference(verdicts: list[FrameVerdict], reference: Any) -> int:
    if reference is not None:
        wanted = Path(reference).resolve()
        for i, v in enumerate(verdicts):
            if Path(v.path).resolve() == wanted:
                if not v.used:
                    raise InputError(f"{reference}: the reference frame was left out ({v.reason}); choose another")
                return i
        raise InputError(f"{reference}: the reference is not one of the frames to stack")
    kept = [i for i, v in enumerate(verdicts) if v.used]
    if not kept:
        raise InputError("no frame can be stacked: " + "; ".join(f"{Path(v.path).name}: {v.reason}"
                                                                  for v in verdicts[:3]))
    return max(kept, key=lambda i: (verdicts[i].quality.n_stars, -verdicts[i].quality.fwhm))


def flux_ratio(stars: Any, reference: Any, matrix: np.ndarray) -> float | None:
    """Median flux(reference) / flux(frame) of the stars that land within
    :data:`FLUX_MATCH_RADIUS` of a reference star under ``matrix`` (the brighter half of them
    when there are 6 or more; None with fewer than 3)."""
    if len(stars) == 0 or len(reference) == 0:
        return None
    xy = matrix @ np.vstack([stars.x, stars.y, np.ones(len(stars))])
    dist, index = nearest(np.column_stack([xy[0] / xy[2], xy[1] / xy[2]]),
                          np.column_stack([reference.x, reference.y]).astype(np.float64), FLUX_MATCH_RADIUS)
    ok = np.isfinite(dist) & (stars.flux > 0)
    ok[ok] &= reference.flux[index[ok]] > 0
    if ok.sum() < 3:
        return None
    ref_flux, flux = reference.flux[index[ok]], stars.flux[ok]
    if ref_flux.size >= 6:      # the brighter half: their ratios carry the least photon noise
        bright = ref_flux >= np.median(ref_flux)
        ref_flux, flux = ref_flux[bright], flux[bright]
    return float(np.median(ref_flux / flux))


def register_verdicts(verdicts: list[FrameVerdict], stars: list[Any], ref: int) -> list[FrameVerdict]:
    """Each kept frame's transform to the reference and its flux ratio; frames that cannot be
    registered are left out with the reason."""
    from dataclasses import replace

    out = []
    for i, v in enumerate(verdicts):
        if i == ref:
            out.append(replace(v, matrix=tuple(np.eye(3).ravel()), n_matched=len(stars[i]), rms=0.0,
                               flux_ratio=1.0, reference=True))
            continue
        if not v.used:
            out.append(v)
            continue
        try:
            t = find_transform(stars[i], stars[ref])
        except RegistrationError as exc:
            out.append(replace(v, reason=f"not registered: {exc}"))
            continue
        matrix = np.asarray(t.matrix, float)
        ratio = flux_ratio(stars[i], stars[ref], matrix)
        if ratio is not None:
            # resampling keeps values per pixel: a star's summed flux on the reference grid is
            # its flux in the frame times |det| of the transform (1.02 for a 1 % scale change)
            ratio /= abs(float(np.linalg.det(matrix[:2, :2])))
        out.append(replace(v, matrix=tuple(matrix.ravel()), n_matched=int(t.n_matched), rms=float(t.rms),
                           flux_ratio=ratio))
    return out


def stack_files(paths: Any, output: str | os.PathLike | None = None, *, reference: Any = None,
                reject: str = "auto", weights: str = "noise", interpolation: str = "lanczos3",
                keep_all: bool = False, memory: str | int = "1GiB", preview: bool = True,
                progress: ProgressOption = None, debayer: str = "bilinear",
                bayer_pattern: str | None = None) -> StackRun:
    """Judge, register and stack calibrated lights (see the module docstring).

    Parameters
    ----------
    paths : sequence of path-like
        Calibrated lights (ccdcal's, with UNCERT and MASK, or any 2-D FITS images).
    output : path-like, optional
        Where to write the stack (FITS: data, UNCERT, COVERAGE, WEIGHT, REJECT, MASK) and,
        with ``preview``, a PNG next to it (same name, ``.png``).
    reference : path-like, optional
        The frame whose grid and WCS the stack takes (default: the best frame).
    reject, weights, interpolation, memory
        As :func:`ccdcal.stacking.engine.stack`.
    keep_all : bool
        Keep frames flagged as outliers (clouds, trailing, focus); frames without stars or
        that cannot be registered are always left out.
    debayer : {"bilinear", "mhc"}
        How colour (CFA) frames are debayered (see :mod:`ccdcal.colour.demosaic`).
    bayer_pattern : str, optional
        The pattern of colour frames whose header does not give one (RGGB, BGGR, GRBG, GBRG).
    progress : bool or callable, optional
        True: progress bars while stars are found and while the rows are stacked (a widget
        in Jupyter, else on stderr); False or None: silent; or a function
        ``f(items, description, total=None)`` (see :func:`ccdcal._shared.progress.resolve_progress`;
        the CLI passes its terminal bars). The library itself never prints.

    Returns
    -------
    StackRun

    Raises
    ------
    TypeError
        If ``progress`` is none of the above (before any frame is read).
    """

    progress = resolve_progress(progress)
    paths = [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise InputError("no frames to stack")
    if output is not None:
        refuse_overwrite([*paths, *([reference] if reference is not None else [])],
                         files=[output, Path(output).with_suffix(".png")])
    verdicts, stars = judge_frames(paths, keep_all=keep_all, progress=progress, bayer_pattern=bayer_pattern)
    ref = _pick_reference(verdicts, reference)
    verdicts = register_verdicts(verdicts, stars, ref)
    run = StackRun(frames=verdicts)
    for v in verdicts:
        if not v.used:
            run.warnings.append(f"{Path(v.path).name} left out of the stack: {v.reason}")
            warnings.warn(run.warnings[-1], CcdcalWarning, stacklevel=2)
    used = [v for v in verdicts if v.used]
    # the transparency scales are measured by the stack on the reference grid (bright pixels
    # of the resampled frames against the reference's): on synthetic fields within 0.65 % of
    # the truth, where the matched stars' aperture flux ratio (kept in the table as a check)
    # was biased by up to 1.8 %
    matrices = [np.asarray(v.matrix).reshape(3, 3) for v in used]
    ref_used = next(k for k, v in enumerate(used) if v.reference)
    if used[0].pattern is None:
        run.result = stack([v.path for v in used], matrices, reference=ref_used, reject=reject,
                           weights=weights, interpolation=interpolation, memory=memory, progress=progress)
    else:
        run.result = _colour_stack([(v.path, v.pattern) for v in used], matrices, ref_used,
                                   dict(reject=reject, weights=weights, interpolation=interpolation, memory=memory,
                                        progress=progress), debayer)
    run.notes = list(run.result.notes)
    frame_weights = iter(np.asarray(run.result.weights, dtype=np.float64))
    run.frames = [replace(v, weight=float(next(frame_weights))) if v.used else v for v in run.frames]
    if output is not None:
        run.output = run.result.write(output)
        if preview:
            run.preview = write_preview(run.result.data, Path(output).with_suffix(".png"))
    return run


def _colour_stack(frames: list[tuple[str, str]], matrices: list[np.ndarray], reference: int,
                  options: dict[str, Any], method: str) -> StackResult:
    """Each colour of the CFA ``frames`` stacked on its own (one transform per frame), as one
    colour result: planes (3, ny, nx), the frames' factors and the header of the green stack."""
    results = []
    for channel in range(3):
        sources = [DebayeredRows(path, channel, pattern, method=method) for path, pattern in frames]
        try:
            results.append(stack(sources, matrices, reference=reference, **options))
        finally:
            for source in sources:
                source.close()
    green = results[1]
    header = rgb_header(green.header)
    header["DEBAYER"] = (method, "how the CFA frames were debayered (after calibration)")
    for name, result in zip("RGB", results, strict=True):
        header[f"BKG{name}"] = (float(np.median(result.backgrounds)), f"[adu] median background of the frames, {name}")
    return StackResult(
        data=np.stack([r.data for r in results]), uncertainty=np.stack([r.uncertainty for r in results]),
        coverage=np.stack([r.coverage for r in results]), weight=np.stack([r.weight for r in results]),
        rejected=np.stack([r.rejected for r in results]), mask=np.stack([r.mask for r in results]), header=header,
        scales=green.scales, zeros=green.zeros, weights=green.weights, backgrounds=green.backgrounds,
        noise=green.noise, frame_rejected=sum(r.frame_rejected for r in results),
        notes=list(dict.fromkeys(n.replace(f"[{name}]", "") for r, name in zip(results, "RGB", strict=True)
                                 for n in r.notes)))


def write_preview(data: np.ndarray, path: Path) -> Path:
    """An auto-stretched PNG of the stack (ccdcal.stretch), at most 1600 px on a side; a colour
    stack in colour (each colour stretched on its own: a neutral background)."""

    write_bytes(path, png_bytes(stretch(downsample(data, 1600), "autostf")))
    return path
