"""What is in a pile of raw frames: one :class:`FrameInfo` per image HDU, classified from headers.

Real headers lie or say nothing (biases marked DARK with EXPTIME 0, flats labelled
'Light Frame', sky flats told apart only by OBJECT), so classification combines the
frame-type keywords, the OBJECT name, the exposure time and words in the file name,
and records every guess as a warning. Frames that cannot be classified are listed
as skipped, never guessed silently.

Header values are evidence, not truth: placeholders (CCD-TEMP = -99, DATAMAX = 0), a
DARKTIME shorter than the exposure, negative exposure times and section keywords
written in another convention are ignored, each with a warning; a header that says the
frame was already calibrated (MaxIm DL's CALSTAT, IRAF's ZEROCOR/DARKCOR/FLATCOR, ccdcal's
own outputs) is recorded in :attr:`FrameInfo.calibrated`.
"""

from __future__ import annotations

import enum
import math
import os
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io.fits.verify import VerifyError

from .._repr import inventory_html
from .._shared import _kernels, state
from .._shared.names import printable
from .._shared.progress import ProgressOption, resolve_progress, steps
from ..errors import CcdcalError, InputError
from ..io.frames import FrameSource, file_stem, find_fits, header_value, image_hdus, read_header
from ..io.hashing import hash_around, remember_hash
from ..io.headers import (
    SETTEMP_KEYS,
    TEMP_KEYS,
    TYPE_KEYS,
    bayer_pattern,
    binning,
    calibration_steps,
    camera_settings,
    exposure_time,
    filter_name,
    format_number,
    normalised_type,
    read_dark_time,
    read_date,
    read_exposure,
    read_saturation,
    read_sections,
    read_temperature,
    saturation_problem,
)
from ..qa.stats import (
    default_saturation_of,
    flag_outliers,
    frame_metrics,
    metrics_from_counts,
    subsample_step,
)
from ..sections import to_slices


class FrameKind(enum.StrEnum):
    BIAS = "bias"
    DARK = "dark"
    FLAT = "flat"
    LIGHT = "light"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


DARK_BIAS_EXPTIME = 0.1  # s: a frame typed DARK but named bias is a bias up to this exposure

# Frame-type words as acquisition software writes them, normalised (upper case, no blanks).
_TYPE_WORDS: dict[str, FrameKind] = {word: kind for kind, words in {
    FrameKind.BIAS: ["BIAS", "ZERO", "BIASFRAME", "ZEROFRAME", "BIASFRAMES", "OFFSET", "OFFSETFRAME", "BIASIMAGE"],
    FrameKind.DARK: ["DARK", "DARKFRAME", "DARKCURRENT", "DARKIMAGE", "THERMAL"],
    FrameKind.FLAT: ["FLAT", "FLATFIELD", "FLATFRAME", "SKYFLAT", "DOMEFLAT", "TWIFLAT", "TWILIGHTFLAT",
                     "LAMPFLAT", "SCREENFLAT", "DFLAT", "SFLAT", "FLATFIELDFRAME", "DOMEFLATFIELD", "TWILIGHT",
                     "SKYFLATFIELD", "PIXFLAT", "FLATIMAGE"],
    FrameKind.LIGHT: ["LIGHT", "LIGHTFRAME", "OBJECT", "SCIENCE", "SCI", "TARGET", "EXPOSE", "OBJ",
                      "STANDARD", "STD", "FOCUS", "LIGHTIMAGE", "SKY"],
}.items() for word in words}

_NAME_WORDS = {
    FrameKind.BIAS: {"bias", "biases", "zero", "zeros", "offset", "offsets", "masterbias"},
    FrameKind.DARK: {"dark", "darks", "masterdark", "thermal"},
    FrameKind.FLAT: {"flat", "flats", "skyflat", "skyflats", "domeflat", "domeflats", "twiflat",
                     "twiflats", "flatfield", "flatfields", "masterflat", "twilight", "dflat", "sflat"},
    FrameKind.LIGHT: {"light", "lights", "object", "science", "sci", "target"},
}


@dataclass(frozen=True)
class FrameInfo:
    """One image HDU of a raw file, as the headers (and, failing them, the file name) describe it.

    Attributes
    ----------
    path : Path
        The raw file.
    hdu : int
        Index of the image HDU in the file.
    kind : FrameKind
        bias, dark, flat, light or unknown.
    exptime : float or None
        Exposure time in seconds.
    filter : str or None
        Filter name as written in the header (None when no filter keyword, or clear/open).
    binning : (int, int)
        (x, y) on-chip binning.
    shape : (int, int)
        (ny, nx) of the raw image, numpy order.
    ccd_temp, set_temp : float or None
        Measured and set-point detector temperature in deg C.
    date_obs : str or None
        Start of the exposure (ISO) when the header gives it.
    object : str or None
        OBJECT keyword.
    biassec, trimsec : str or None
        Overscan and useful-data sections, IRAF syntax, as found (TRIMSEC, else DATASEC);
        None when absent or not a FITS section of this image (with a warning).
    darktime : float or None
        DARKTIME in seconds; None when absent, negative or shorter than the exposure.
    saturate : float or None
        Saturation level in ADU (SATURATE, DATAMAX, SATLEVEL, MAXLIN); None when absent or
        a placeholder (0 or negative; below the frame's median once the pixels are read).
    calibrated : tuple of str
        Steps the header says were already applied (``"overscan"``, ``"trim"``, ``"bias"``,
        ``"dark"``, ``"flat"``, ``"master"`` for a combined master), from MaxIm DL's
        CALSTAT, IRAF's ccdproc keywords, astropy ccdproc's log keywords and ccdcal's own
        keywords; empty for a raw frame.
    n_hdus : int
        How many image HDUs the file has (masters are kept apart per HDU when > 1).
    warnings : tuple of str
        Every guess made while classifying, and header problems.
    flags : tuple of str
        Reasons the frame looks unlike the rest of its calibration group (empty when clean).
    metrics : dict or None
        Pixel QA numbers behind the flags.
    camera : tuple of (str, str)
        The camera settings the frame was taken at (GAIN as a setting, OFFSET, readout mode;
        :func:`ccdcal.io.headers.camera_settings`): frames at other settings share no master.
    bayer : str or None
        A one-shot-colour frame's Bayer pattern at pixel (0, 0) of the array as stored
        (:func:`ccdcal.io.headers.bayer_pattern`: ROWORDER and offsets applied); None for mono.
    """

    path: Path
    hdu: int
    kind: FrameKind
    exptime: float | None
    filter: str | None
    binning: tuple[int, int]
    shape: tuple[int, int]
    ccd_temp: float | None = None
    set_temp: float | None = None
    date_obs: str | None = None
    object: str | None = None
    biassec: str | None = None
    trimsec: str | None = None
    darktime: float | None = None
    saturate: float | None = None
    calibrated: tuple[str, ...] = ()
    n_hdus: int = 1
    warnings: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    metrics: dict[str, float] | None = field(default=None, compare=False)
    camera: tuple[tuple[str, str], ...] = ()
    bayer: str | None = None

    @property
    def name(self) -> str:
        """File name, with the HDU index when the file has several image HDUs."""
        return self.path.name if self.n_hdus == 1 else f"{self.path.name}[{self.hdu}]"

    @property
    def stem(self) -> str:
        """File name without FITS (or XISF) suffixes (``d1047.fits.fz`` -> ``d1047``), plus ``_hduN`` for MEF."""
        name = file_stem(self.path)
        return name if self.n_hdus == 1 else f"{name}_hdu{self.hdu}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        out["kind"] = self.kind.value
        out["binning"] = list(self.binning)
        out["shape"] = list(self.shape)
        out["warnings"] = list(self.warnings)
        out["flags"] = list(self.flags)
        out["calibrated"] = list(self.calibrated)
        return out


@dataclass(frozen=True)
class Skipped:
    """An input that was not used, and why."""

    path: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class Inventory:
    """The classified frames of a scan, and the inputs that were skipped."""

    frames: tuple[FrameInfo, ...]
    skipped: tuple[Skipped, ...] = ()

    def of_kind(self, kind: FrameKind) -> list[FrameInfo]:
        return [f for f in self.frames if f.kind == kind]

    def to_json(self) -> list[dict[str, Any]]:
        """A list with one object per frame (skipped inputs have kind 'unknown' and their reason as a flag)."""
        rows = [f.to_json() for f in self.frames]
        for s in self.skipped:
            rows.append({"path": s.path, "hdu": None, "kind": "unknown", "filter": None, "exptime": None,
                         "shape": None, "flags": [], "warnings": [], "calibrated": [],
                         "skipped": s.reason})
        return rows

    def _repr_html_(self) -> str:
        return inventory_html(self)


# -- header reading -------------------------------------------------------------------------
def header_kind(header: Any) -> tuple[FrameKind | None, str | None]:
    """Frame kind from the type keywords (IMAGETYP, OBSTYPE, ...), and the keyword=value it came from."""
    for key in TYPE_KEYS:
        raw = header_value(header, (key,))
        if raw is None:
            continue
        word = normalised_type(raw)
        if word in _TYPE_WORDS:
            return _TYPE_WORDS[word], f"{key}={str(raw).strip()!r}"
        for token, kind in _TYPE_WORDS.items():  # 'MASTER BIAS', 'BIAS_FRAME_2', 'FLAT V'
            if len(token) >= 4 and token in word:
                return kind, f"{key}={str(raw).strip()!r}"
        return FrameKind.UNKNOWN, f"{key}={str(raw).strip()!r}"
    return None, None


def name_kind(text: str) -> FrameKind | None:
    """Frame kind from words in a file name or OBJECT value ('flat-expos23s', 'sky flat', 'bias_003')."""
    tokens = [t for t in re.split(r"[^a-z]+", text.lower()) if t]
    found = {kind for kind, words in _NAME_WORDS.items() for t in tokens if t in words}
    if len(found) == 1:
        return found.pop()
    # More than one word (e.g. 'flat_dark'): a calibration word beats 'light'.
    found.discard(FrameKind.LIGHT)
    return found.pop() if len(found) == 1 else None


def classify(header: Any, path: Path) -> tuple[FrameKind, list[str]]:
    """Decide the kind of a frame from its header and file name; return it with the warnings.

    Rules, in order:

    1. The type keyword (IMAGETYP/OBSTYPE/...) in any common spelling.
    2. A DARK with zero exposure is a bias (Lick's Nickel camera writes biases so); so
       is a DARK whose file name or OBJECT says bias and whose exposure is at most 0.1 s.
    3. A LIGHT/OBJECT whose OBJECT or file name says flat/bias/dark is that calibration
       frame (sky flats written as OBJECT; SBIG flats saved as 'Light Frame').
    4. No type keyword: words in the file name, then in OBJECT.
    5. Otherwise unknown (the frame is skipped and listed).
    """
    warnings: list[str] = []
    exptime = exposure_time(header)
    obj = header_value(header, ("OBJECT", "OBJNAME", "TARGET"))
    obj_kind = name_kind(str(obj)) if obj is not None else None
    file_kind = name_kind(path.name)
    kind, source = header_kind(header)

    if kind == FrameKind.DARK and exptime == 0:
        warnings.append(f"{source} with EXPTIME 0: treated as a bias")
        return FrameKind.BIAS, warnings
    if kind == FrameKind.DARK and exptime is not None and exptime <= DARK_BIAS_EXPTIME:
        for hint, where in ((file_kind, "the file name"), (obj_kind, f"OBJECT={str(obj).strip()!r}")):
            if hint == FrameKind.BIAS:
                warnings.append(f"{source} with EXPTIME {format_number(exptime)} s but {where} says bias:"
                                " treated as a bias")
                return FrameKind.BIAS, warnings
    if kind == FrameKind.LIGHT:
        for hint, where in ((obj_kind, f"OBJECT={str(obj).strip()!r}"), (file_kind, "the file name")):
            if hint in (FrameKind.FLAT, FrameKind.BIAS, FrameKind.DARK):
                if hint == FrameKind.BIAS and exptime not in (None, 0.0):
                    continue
                warnings.append(f"{source} but {where} says {hint.value}: treated as a {hint.value}")
                return hint, warnings
        if exptime == 0:
            warnings.append(f"{source} with EXPTIME 0: treated as a bias")
            return FrameKind.BIAS, warnings
        return FrameKind.LIGHT, warnings
    if kind is not None and kind != FrameKind.UNKNOWN:
        return kind, warnings

    for hint, where in ((file_kind, "the file name"), (obj_kind, f"OBJECT={str(obj).strip()!r}")):
        if hint is not None:
            lead = f"{source} not understood" if source else "no frame-type keyword"
            warnings.append(f"{lead}; classified as {hint.value} from {where}")
            return hint, warnings
    if kind is None and exptime == 0:
        warnings.append("no frame-type keyword; EXPTIME 0, so treated as a bias")
        return FrameKind.BIAS, warnings
    reason = f"{source} is not a frame type ccdcal knows" if source else "no frame-type keyword (IMAGETYP/OBSTYPE)"
    warnings.append(reason + "; rename the file (bias/dark/flat/light) or fix the header")
    return FrameKind.UNKNOWN, warnings


def frame_info(path: Path, hdu: int, header: Any, shape: tuple[int, int], n_hdus: int = 1) -> FrameInfo:
    """Describe one image HDU from its (merged primary + extension) header.

    Values that cannot be true (placeholders, a dark time shorter than the exposure,
    sections of another convention) are left out, and each is explained in
    :attr:`FrameInfo.warnings`.
    """
    kind, warnings = classify(header, path)
    exptime, exp_key, problems = read_exposure(header)
    warnings.extend(problems)
    darktime, problems = read_dark_time(header, exptime, exp_key)
    warnings.extend(problems)
    ccd_temp, problems = read_temperature(header, TEMP_KEYS)
    warnings.extend(problems)
    set_temp, problems = read_temperature(header, SETTEMP_KEYS)
    warnings.extend(problems)
    saturate, problems = read_saturation(header)
    warnings.extend(problems)
    biassec, trimsec, problems = read_sections(header, shape)
    warnings.extend(problems)
    calibrated, problems = calibration_steps(header)
    warnings.extend(problems)
    bayer, problem = bayer_pattern(header, shape)
    if problem:
        warnings.append(problem)
    if kind in (FrameKind.DARK, FrameKind.FLAT, FrameKind.LIGHT) and exptime is None:
        warnings.append("no exposure time (EXPTIME/EXPOSURE/ITIME)")
    obj = header_value(header, ("OBJECT", "OBJNAME"))
    return FrameInfo(
        path=path,
        hdu=hdu,
        kind=kind,
        exptime=exptime,
        filter=filter_name(header) if kind in (FrameKind.FLAT, FrameKind.LIGHT) else None,
        binning=binning(header),
        shape=shape,
        ccd_temp=ccd_temp,
        set_temp=set_temp,
        date_obs=read_date(header),
        object=str(obj).strip() if obj is not None else None,
        biassec=biassec,
        trimsec=trimsec,
        darktime=darktime,
        saturate=saturate,
        calibrated=calibrated,
        n_hdus=n_hdus,
        warnings=tuple(warnings),
        camera=camera_settings(header),
        bayer=bayer,
    )


def _merged(primary: Any, header: Any) -> Any:
    if primary is None or primary is header:
        return header
    merged = primary.copy()
    for card in header.cards:
        if card.keyword in ("COMMENT", "HISTORY", ""):
            continue
        try:
            merged[card.keyword] = (card.value, card.comment)
        except (ValueError, KeyError):
            continue
    return merged


_CCDDATA_PLANES = {"UNCERT", "MASK"}


def scan_file(path: Path) -> tuple[list[FrameInfo], list[Skipped]]:
    """Classify every image HDU of one file; problems become :class:`Skipped` entries."""
    try:
        hdus, problems = image_hdus(path)
    except InputError as exc:
        return [], [Skipped(str(path), str(exc).removeprefix(f"{path}: "))]
    skipped = [Skipped(str(path), p) for p in problems]
    if len(hdus) > 1:
        # The uncertainty and mask planes of a CCDData file (ccdcal's masters and calibrated
        # frames) are not frames of their own.
        hdus = [hdus[0]] + [h for h in hdus[1:] if str(h.header.get("EXTNAME", "")).strip().upper()
                            not in _CCDDATA_PLANES]
    if not hdus and not problems:
        skipped.append(Skipped(str(path), "no image data in any HDU"))
    primary = None
    if hdus and hdus[0].index != 0:
        try:
            primary = read_header(path, 0)
        except CcdcalError:
            primary = None
    infos = []
    for h in hdus:
        try:
            infos.append(frame_info(path, h.index, _merged(primary, h.header), h.shape, n_hdus=len(hdus)))
        except (ValueError, TypeError, KeyError, IndexError, OverflowError, VerifyError) as exc:
            where = str(path) if len(hdus) == 1 else f"{path}[{h.index}]"
            skipped.append(Skipped(where, f"its header cannot be read ({type(exc).__name__}:"
                                          f" {printable(str(exc))[:120]}); fix the header"))
    return infos, skipped


def scan(paths: Iterable[str | os.PathLike], *, flag: bool = True, progress: ProgressOption = None,
         exclude: str | os.PathLike | Iterable[str | os.PathLike] | None = None, executor: Any = None,
         header_executor: Any = None) -> Inventory:
    """Find and classify every image HDU under ``paths`` (files, folders, globs).

    Parameters
    ----------
    paths : path-like or iterable of path-like
        Files, folders (searched recursively for FITS names) or glob patterns.
    flag : bool
        Also read the pixels of calibration frames and flag the ones that look unlike
        the rest of their group (see :func:`flag_groups`).
    progress : bool or callable, optional
        True: a progress bar (a widget in Jupyter, else on stderr); False or None: silent; or
        a function ``f(items, description, total=None)`` wrapping the work (see
        :func:`ccdcal._shared.progress.resolve_progress`). The library itself never prints.
    exclude : path-like or iterable of path-like, optional
        Folders whose files are never scanned (the output folders of a reduction).
    executor : optional
        Where the pixel checks of the calibration frames run (:mod:`ccdcal.pipeline.executor`; default
        this thread).
    header_executor : optional
        Where the headers are read, file by file, results in order (``reduce``'s light worker
        processes on a night of many small frames; default this thread).

    Raises
    ------
    InputError
        If a path does not exist, or nothing FITS-like is found.
    TypeError
        If ``progress`` is none of the above.
    """
    progress = resolve_progress(progress)
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    broken: list[tuple[str, str]] = []
    files = find_fits(paths, broken)
    if exclude is not None:
        skip = {Path(f).resolve() for f in ([exclude] if isinstance(exclude, (str, os.PathLike)) else exclude)}
        files = [p for p in files if skip.isdisjoint(p.resolve().parents)]
    if not files:
        raise InputError("no FITS files found (.fits, .fit, .fts, .fz, .gz, .xisf); check the path")
    frames: list[FrameInfo] = []
    skipped: list[Skipped] = [Skipped(where, why) for where, why in broken]

    scanned = (header_executor.map if header_executor is not None else map)(scan_file, files)
    for path, (infos, skips) in zip(files, steps(scanned, "scanning", progress, total=len(files)), strict=True):
        skipped.extend(skips)
        for info in infos:
            if info.kind == FrameKind.UNKNOWN:
                skipped.append(Skipped(str(path) if info.n_hdus == 1 else f"{path}[{info.hdu}]",
                                       info.warnings[-1] if info.warnings else "not classified"))
            else:
                frames.append(info)
    inventory = Inventory(tuple(frames), tuple(skipped))
    if flag:
        inventory = flag_groups(inventory, progress=progress, executor=executor)
    return inventory


# -- grouping and bad-frame flags ----------------------------------------------------------
def temperature_groups(values: Sequence[float | None], tolerance: float) -> list[int]:
    """Cluster temperatures: sorted values further apart than ``tolerance`` start a new group.

    ``None`` (no temperature) joins group 0.
    """
    known = sorted({v for v in values if v is not None})
    labels: dict[float, int] = {}
    group, last = 0, None
    for v in known:
        if last is not None and v - last > tolerance:
            group += 1
        labels[v] = group
        last = v
    return [0 if v is None else labels[v] for v in values]


def frame_temperature(info: FrameInfo) -> float | None:
    """Set point when the header gives one (stable), else the measured temperature."""
    return info.set_temp if info.set_temp is not None else info.ccd_temp


def calibration_group_key(info: FrameInfo) -> tuple:
    """Key of the group a calibration frame is compared with for flagging."""
    base = (info.kind.value, info.binning, info.shape, info.hdu if info.n_hdus > 1 else 0)
    if info.kind == FrameKind.DARK:
        return base + (round(info.exptime or 0.0, 3),)
    if info.kind == FrameKind.FLAT:
        return base + (info.filter,)
    return base


def _raw16_metrics(src: Any, info: FrameInfo, raw: np.ndarray,
                   hashed: list[Any] | None = None) -> dict[str, float]:
    """:func:`ccdcal.qa.stats.frame_metrics` of a 16-bit integer frame without decoding it: the
    counts from a histogram of the stored integers (one pass over the raw bytes, in a buffer
    reused for every frame of the size), the distribution from the decoded subsample rows.
    The same numbers as decoding the whole frame (tested)."""

    ny, nx = src.shape
    rows, cols = to_slices(info.trimsec, (ny, nx)) if info.trimsec else (slice(0, ny), slice(0, nx))
    src.read_raw(0, ny, raw)
    if hashed is not None:  # the file's hash while its pixels are in memory (see pixel_metrics)
        hashed.append(hash_around(src.path, src.data_offset, raw))
    hists = np.zeros((_kernels.HIST16_PARTS, 65536), np.int64)
    blank = _kernels.NO_BLANK if src.blank is None else int(src.blank)
    _kernels.hist_be16(raw[rows], cols.start, cols.stop, blank, hists)
    counts = hists.sum(axis=0)
    # the value of each stored integer, decoded as FrameSource decodes it (the BLANK bin, NaN
    # here, counts nothing)
    values = np.empty(65536, np.float32)
    src.decode_stored(np.arange(-32768, 32768, dtype=np.int16), values)
    npix = (rows.stop - rows.start) * (cols.stop - cols.start)
    present = np.flatnonzero(counts)
    lo, hi = (float(values[present].min()), float(values[present].max())) if present.size else (np.nan, np.nan)
    step = subsample_step(npix)
    # the regular subsample decoded from the bytes already in memory (not read again)
    stored = raw[rows.start:rows.stop:step, cols][:, ::step].view(">i2")
    sample = np.empty(stored.shape, np.float32)
    src.decode_stored(stored, sample)
    return metrics_from_counts(
        sample, npix=npix, nonfinite=npix - int(counts.sum()), zero_count=int(counts[values == 0].sum()),
        lo=lo, hi=hi, count_at_or_above=lambda level: int(counts[values >= level].sum()),
        default_saturation=default_saturation_of(np.empty(0, np.float32), src.adc_maximum),
        saturation=info.saturate)


_HASHED = "_hash"  # the file's (hash key, hash) in what pixel_metrics returns
# per thread and frame size: the raw buffer reused from frame to frame (freed when the run ends)
_BUFFERS = state.Cache("raw frame buffers", max_items=8)


def pixel_metrics(info: FrameInfo, *, hash_file: bool = False) -> dict[str, float] | str:
    """:func:`ccdcal.qa.stats.frame_metrics` of one frame's pixels (a task: reads the file itself),
    or why it cannot be read. ``hash_file``: also the file's hash (for the manifest), while the pixels of a raw
    16-bit frame are in memory (the file is then read once for both)."""

    try:
        with FrameSource(info.path, info.hdu) as src:
            if src.raw16:
                hashed: list[Any] | None = [] if hash_file else None
                key = (threading.get_ident(), tuple(src.shape))
                buffer = _BUFFERS.get(key)
                if buffer is None:
                    buffer = np.empty(src.shape, np.uint16)
                    _BUFFERS.put(key, buffer)
                metrics = _raw16_metrics(src, info, buffer, hashed)
                if hashed and hashed[0] is not None:
                    metrics[_HASHED] = hashed[0]    # taken out by flag_groups (this may be a worker)
            else:
                data = src.read()
                if info.trimsec:
                    data = data[to_slices(info.trimsec, data.shape)]
                metrics = frame_metrics(data, saturation=info.saturate, adc_maximum=src.adc_maximum)
            if info.kind == FrameKind.FLAT and info.bayer is None:
                metrics.update(cfa_cells(src))
            return metrics
    except InputError as exc:
        return str(exc)


CFA_CELLS = ("cfa00", "cfa01", "cfa10", "cfa11")


def cfa_cells(src: Any, rows: int = 64) -> dict[str, float]:
    """The medians of the four cells of the 2x2 pixel pattern in the central rows of a frame, as
    fractions of their mean: a colour camera's flat shows its filters (green twice, on a
    diagonal), a mono camera's four equal values."""
    ny = int(src.shape[0])
    y0 = max(0, (ny - rows) // 2) // 2 * 2
    band = src.read_rows(y0, min(ny, y0 + rows))
    levels = [float(np.nanmedian(band[dy::2, dx::2])) for dy in (0, 1) for dx in (0, 1)]
    mean = float(np.mean(levels))
    return {k: (v / mean if mean > 0 else math.nan) for k, v in zip(CFA_CELLS, levels, strict=True)}


def looks_like_cfa(metrics: dict[str, float] | None) -> bool:
    """Whether a flat's :func:`cfa_cells` are a colour camera's: one diagonal pair equal (the
    greens, within 3 %) and the other two cells each more than 10 % away from them."""
    if not metrics or not all(k in metrics for k in CFA_CELLS):
        return False
    a, b, c, d = (metrics[k] for k in CFA_CELLS)
    for g1, g2, x1, x2 in ((a, d, b, c), (b, c, a, d)):
        green = (g1 + g2) / 2
        if green > 0 and abs(g1 - g2) <= 0.03 * green and min(abs(x1 - green), abs(x2 - green)) > 0.1 * green:
            return True
    return False


def flag_groups(inventory: Inventory, *, progress: ProgressOption = None, executor: Any = None,
                hash_files: bool = False) -> Inventory:
    """Read each calibration frame once and flag outliers inside its group (level, noise, zeros,
    saturation, structure), using :func:`ccdcal.qa.stats.flag_outliers`.

    A header saturation level below the frame's own median is a placeholder: it is
    replaced by None (with a warning), and saturated pixels are counted at the ADC
    maximum of the raw integers instead. The frames are read by :func:`pixel_metrics`
    tasks through ``executor`` (threads here, or a dask cluster), in any order.
    ``hash_files``: the tasks also take each file's hash for the manifest (``reduce``).
    """
    from functools import partial

    groups: dict[tuple, list[int]] = {}
    for i, info in enumerate(inventory.frames):
        if info.kind in (FrameKind.BIAS, FrameKind.DARK, FrameKind.FLAT):
            groups.setdefault(calibration_group_key(info), []).append(i)
    frames = list(inventory.frames)
    todo = [i for members in groups.values() for i in members]
    metrics: dict[int, dict[str, float]] = {}
    task = partial(pixel_metrics, hash_file=hash_files)
    results = (executor.map if executor is not None else map)(task, [frames[i] for i in todo])
    for i, value in zip(todo, steps(results, "checking frames", progress, total=len(todo)), strict=True):
        info = frames[i]
        if isinstance(value, str):
            frames[i] = replace(info, flags=info.flags + (f"unreadable: {value}",))
            continue
        hashed = value.pop(_HASHED, None)
        if hashed is not None:
            remember_hash(*hashed)
        metrics[i] = value
        why = saturation_problem(info.saturate, metrics[i]["level"])
        if why:
            frames[i] = replace(info, saturate=None, warnings=info.warnings + (
                f"saturation level {format_number(info.saturate)} ADU from the header is {why},"
                " a placeholder: ignored",))
    for members in groups.values():
        have = [i for i in members if i in metrics]
        reasons = flag_outliers([metrics[i] for i in have], kind=frames[have[0]].kind.value) if have else []
        for i, why in zip(have, reasons, strict=True):
            frames[i] = replace(frames[i], flags=frames[i].flags + tuple(why), metrics=metrics[i])
    return Inventory(tuple(frames), inventory.skipped)

