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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .._shared.progress import ProgressOption, resolve_progress
from ..colour.demosaic import ALL_AT_ONCE, DebayeredRows, colour_sources, rgb_header
from ..errors import CcdcalWarning, InputError
from ..io.guard import refuse_overwrite
from ..io.writer import write_bytes
from ..stretch import downsample, png_bytes, stretch
from .engine import StackResult, stack, stack_colours
from .helper import HelperProcess
from .judge import FrameVerdict, judge_frames
from .register import (
    RegistrationError,
    find_transform,
    nearest,
)

#: matched stars closer than this (px, after the transform) measure the flux ratio
FLUX_MATCH_RADIUS = 1.5


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
                bayer_pattern: str | None = None, judge_helper: HelperProcess | None = None) -> StackRun:
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
    debayer : {"bilinear", "mhc", "rcd"}
        How colour (CFA) frames are debayered (see :mod:`ccdcal.colour.demosaic`).
    bayer_pattern : str, optional
        The pattern of colour frames whose header does not give one (RGGB, BGGR, GRBG, GBRG).
    judge_helper : HelperProcess, optional
        A helper process for finding stars, already started
        (:func:`ccdcal.stacking.helper.start_helper`; the command line starts it before its
        imports); by default one is started when the frames are many and large.
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

    try:
        progress = resolve_progress(progress)
        paths = [str(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
        if not paths:
            raise InputError("no frames to stack")
        if output is not None:
            refuse_overwrite([*paths, *([reference] if reference is not None else [])],
                             files=[output, Path(output).with_suffix(".png")])
    except BaseException:
        if judge_helper is not None:      # not to be used: ended now
            judge_helper.kill()
        raise
    # numba's first start (~0.45 s) while the frames are judged
    verdicts, stars = judge_frames(paths, keep_all=keep_all, progress=progress, bayer_pattern=bayer_pattern,
                                   helper=judge_helper, meanwhile=_start_numba)
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
        with ThreadPoolExecutor(max_workers=1) as pool:     # the preview is made while the stack is written
            png = pool.submit(preview_png, run.result.data) if preview else None
            run.output = run.result.write(output)
            if png is not None:         # written after the stack, as it always was
                run.preview = Path(output).with_suffix(".png")
                write_bytes(run.preview, png.result())
    return run


def _start_numba() -> None:
    """Load a first compiled kernel: numba starts its machinery once per process (about 0.45 s),
    here in a thread beside the judging (whose reading and numpy work leave the GIL free)."""
    nearest(np.zeros((1, 2)), np.zeros((1, 2)), 1.0)


def _colour_stack(frames: list[tuple[str, str]], matrices: list[np.ndarray], reference: int,
                  options: dict[str, Any], method: str) -> StackResult:
    """Each colour of the CFA ``frames`` stacked on its own (one transform per frame), as one
    colour result: planes (3, ny, nx), the frames' factors and the header of the green stack.

    RCD makes the three colours of a band at the cost of one (``ALL_AT_ONCE``; 12 frames of
    1536×1024: 120 ms a frame for one colour or three), so its colours are stacked together, each band of a frame
    debayered once for the three (11.5 → 8.5 s). Bilinear and Malvar-He-Cutler make one colour
    at a third of the cost of three: their colours are stacked one after another, each frame's
    bands debayered for the colour stacked (as fast, and the three colours' resampled bands are
    not held at once: a peak of 690 MB against 1.19 GB)."""
    if method in ALL_AT_ONCE:
        sources = [colour_sources(path, pattern, method) for path, pattern in frames]
        try:
            results = stack_colours([[colours[c] for colours in sources] for c in range(3)], matrices,
                                    reference=reference, **options)
        finally:
            for colours in sources:
                colours[0].close()
    else:
        results = []
        for channel in range(3):
            each = [DebayeredRows(path, channel, pattern, method=method) for path, pattern in frames]
            try:
                results.append(stack(each, matrices, reference=reference, **options))
            finally:
                for source in each:
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


def preview_png(data: np.ndarray) -> bytes:
    """An auto-stretched PNG of the stack (ccdcal.stretch), at most 1600 px on a side; a colour
    stack in colour (each colour stretched on its own: a neutral background)."""
    return png_bytes(stretch(downsample(data, 1600), "autostf"))


def write_preview(data: np.ndarray, path: Path) -> Path:
    """:func:`preview_png` of ``data`` written to ``path``."""
    write_bytes(path, preview_png(data))
    return path
