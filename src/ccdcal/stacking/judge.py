"""Judging frames before a stack: each frame's stars and quality, and the outliers of the group.

Star detection (``sep``) holds the GIL, so threads cannot share it. When the frames are many and
large, :func:`judge_frames` uses one helper process (:mod:`ccdcal.stacking.helper`, running
:func:`serve_helper`) that judges frames beside this process: both take the next frame
from one queue, so the results and their order are the same as judged alone. The helper is only
a speed-up: if it cannot start, fails or dies, this process judges what it left. It reads and
writes nothing but the frames it is given and pickles over its own pipes.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from .._shared.progress import ProgressOption, steps
from ..colour.cells import cell_luminance, frame_pattern
from ..errors import InputError
from ..io.headers import exposure_of
from .helper import HelperProcess, start_helper
from .stars import detect_stars, flag_outliers, frame_quality

#: frames sent to the helper ahead of its replies
HELPER_AHEAD = 2
#: the helper's first message: its imports are done, it takes frames from now on
HELPER_READY = "ready"

# one frame judged: (quality, stars, error, exposure, pattern, warnings as (category, text))
Judged = tuple[Any, Any, str | None, float | None, str | None, list[tuple[type[Warning], str]]]


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


def read_frame(path: str, given: str | None = None) -> tuple[np.ndarray, np.ndarray | None, Any, str | None]:
    """A frame's data, mask, header and Bayer pattern (None: mono; ``given`` for colour frames
    whose header names none); a colour frame's data as the mean of each 2 × 2 cell
    (:func:`ccdcal.colour.cells.cell_luminance`: its pixel (y, x) lies at (y + 0.5, x + 0.5)
    of the frame)."""
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
        data, mask = cell_luminance(data, mask)
    return data, mask, header, pattern


def judge_one(path: str, bayer_pattern: str | None, max_stars: int, *, keep_warnings: bool = False) -> Judged:
    """One frame's quality, stars, error (an unreadable frame), exposure and pattern; with
    ``keep_warnings`` the warnings raised on the way are kept and returned (a helper process
    hands them back), else they go out as they come and the list is empty."""
    quality = found = error = exptime = pattern = None
    with warnings.catch_warnings(record=keep_warnings) as caught:
        if keep_warnings:
            warnings.simplefilter("always")
        try:
            data, mask, header, pattern = read_frame(path, bayer_pattern)
            exptime = exposure_of(header)
            found = detect_stars(data, mask, max_stars=max_stars, sampled_sky=True)
            shape = data.shape
            if pattern is not None:     # the cells' means: placed on the frame
                shape = (shape[0] + 1, shape[1] + 1)
                found = replace(found, x=found.x + 0.5, y=found.y + 0.5)
            quality = frame_quality(found, shape)
        except InputError as exc:
            error = str(exc)
    said = [(w.category, str(w.message)) for w in caught] if keep_warnings else []
    return quality, found, error, exptime, pattern, said


class _Feeder:
    """The thread in this process that keeps a helper process fed with frames."""

    def __init__(self, process: HelperProcess, take: Callable[[], int | None], job: Callable[[int], tuple[Any, ...]],
                 done: Callable[[int, Judged], None]):
        self._process, self._take, self._job, self._done = process, take, job, done
        self.left: list[int] = []      # taken but not judged (the helper failed): judge them here
        self.ready = False             # the helper said it is ready: it may hold frames from then on
        self._thread = threading.Thread(target=self._feed, name="ccdcal-judge-helper", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        """Once the helper says it is ready (its imports done: frames sent before would wait in
        its pipe while this process could judge them), keep :data:`HELPER_AHEAD` frames sent
        ahead (this thread waits for the GIL while detection runs here, so the helper must not
        wait for it), take the replies in order."""
        sent: list[int] = []
        try:
            if self._process.receive() != HELPER_READY:
                raise ValueError("not a helper")
            self.ready = True
            while True:
                while len(sent) < HELPER_AHEAD and (index := self._take()) is not None:
                    sent.append(index)
                    self._process.send(self._job(index))
                if not sent:
                    break
                got, judged = self._process.receive()
                if got != sent[0]:
                    raise ValueError("out of step")
                self._done(sent.pop(0), judged)
        except Exception:  # noqa: BLE001 - any failure of the helper: this process judges what it held
            self.left.extend(sent)
        self._process.close()

    def join(self, timeout: float) -> None:
        """Wait for the frames the helper holds; one that takes ``timeout`` s or longer is
        ended, and its frames are judged here. A helper not ready yet holds none (it takes
        frames only once ready, and every frame is taken): it is ended now."""
        if not self.ready:
            self.stop()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop()

    def stop(self) -> None:
        """End the helper now (this process stopped judging early) and wait for this thread."""
        self._process.kill()
        self._thread.join()


def _judge_all(paths: list[str], bayer_pattern: str | None, max_stars: int, results: list[Judged | None],
               process: HelperProcess | None, first: Callable[[], None] | None = None) -> Iterator[int]:
    """Judge every frame into ``results`` (with the helper ``process`` when given), yielding each
    index as it is done (the helper's too). ``first`` runs here once the helper has its first
    frames, before this process takes one."""
    lock = threading.Lock()
    queue = iter(range(len(paths)))
    finished: list[int] = []

    def take() -> int | None:
        with lock:
            return next(queue, None)

    def done(index: int, judged: Judged) -> None:
        with lock:
            results[index] = judged
            finished.append(index)

    helper = None if process is None else _Feeder(process, take, lambda i: (i, paths[i], bayer_pattern, max_stars),
                                                  done)
    slowest = 0.0
    try:
        if first is not None:
            first()
        while (index := take()) is not None:
            start = time.perf_counter()
            done(index, judge_one(paths[index], bayer_pattern, max_stars))
            slowest = max(slowest, time.perf_counter() - start)
            with lock:
                ready, finished[:] = list(finished), []
            yield from ready
        if helper is not None:
            helper.join(timeout=30.0 + 10.0 * HELPER_AHEAD * slowest)
            for index in helper.left:
                done(index, judge_one(paths[index], bayer_pattern, max_stars))
            helper = None
        yield from finished
    finally:
        if helper is not None:
            helper.stop()


def judge_frames(paths: Any, *, keep_all: bool = False, max_stars: int = 300,
                 progress: ProgressOption = None, bayer_pattern: str | None = None,
                 helper: HelperProcess | None = None,
                 meanwhile: Callable[[], None] | None = None) -> tuple[list[FrameVerdict], list[Any]]:
    """Stars and quality of every frame, and the outliers of the group left out with the reason.
    A colour frame (a Bayer pattern in its header, or ``bayer_pattern`` given) is judged on the
    mean of its colours; colour and mono frames together are an InputError. A frame that cannot
    be read is left out with the reason.

    Returns the verdicts (each with its pattern)
    and the star lists (None where none was measured).

    ``helper``: a helper process already started (:func:`ccdcal.stacking.helper.start_helper`; the
    command line starts one before its own imports), ended here; without one, one is started
    when it is worth it.

    ``meanwhile``: work of this process's own (numba's start) done while the frames are judged:
    with a helper, here before this process judges a frame (the helper judges meanwhile, and
    this process's work and its judging do not wait on each other's turns at the interpreter);
    else in a thread beside the judging (whose reading and numpy work leave it turns).
    """
    paths = [str(p) for p in paths]
    results: list[Judged | None] = [None] * len(paths)
    process = helper if helper is not None else start_helper(paths)
    beside = None
    if meanwhile is not None and process is None:
        beside = threading.Thread(target=meanwhile, name="ccdcal-meanwhile", daemon=True)
        beside.start()
    for _ in steps(_judge_all(paths, bayer_pattern, max_stars, results, process,
                              meanwhile if process is not None else None), "finding stars", progress,
                   total=len(paths)):
        pass
    if beside is not None:
        beside.join()
    for *_, said in results:
        for category, text in said:
            warnings.warn(text, category, stacklevel=3)
    qualities, stars, errors, exptimes, patterns = ([r[k] for r in results] for k in range(5))
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


def serve_helper() -> None:
    """The helper process's loop: :data:`HELPER_READY` out first, then (index, path, pattern,
    max stars) in, (index, judged) out, until the end of its input, where it exits at once. Only
    the pickles reach the pipe: anything else printed goes to stderr."""
    source = sys.stdin.buffer
    sink = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    pickle.dump(HELPER_READY, sink)
    sink.flush()
    while True:
        try:
            index, path, pattern, max_stars = pickle.load(source)
        except EOFError:    # the end: no interpreter teardown (0.3 s of the caller's wait)
            sink.close()
            os._exit(0)
        pickle.dump((index, judge_one(path, pattern, max_stars, keep_warnings=True)), sink)
        sink.flush()
