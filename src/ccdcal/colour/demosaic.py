"""One-shot-colour frames: the Bayer pattern made colours, after calibration, never before.

:func:`debayer` turns a calibrated CFA frame (one plane) into red, green and blue planes, with
its uncertainty carried through the interpolation weights and its mask honoured: a bad pixel
(hot, saturated, a cosmic ray) is never used, and its own colour is made from good pixels of
that colour around it (the CFA-aware cosmetic correction: a hot red pixel is replaced from red
neighbours). Three methods: ``bilinear``, ``rcd`` (ratio corrected demosaicing, Siril's default:
the sharpest, see :func:`ccdcal.colour._kernels.rcd_refine`) and ``mhc`` (Malvar, He and Cutler 2004: gradient-
corrected 5x5 linear filters, sharper edges with no more noise; bilinear where a bad pixel is
in its window). :class:`DebayeredRows` serves one colour of a CFA file by rows, so the stacker
resamples and stacks each colour without holding a debayered frame. :func:`debayer_file` writes
an RGB cube (NAXIS3 = 3: R, G, B, as Siril and PixInsight write colour FITS).

Debayering is a step of its own (``ccdcal debayer``, :func:`debayer_file`) and of stacking; the
calibrated lights stay CFA (one plane with its pattern), as Siril and PixInsight write them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .._shared import state
from ..errors import InputError
from ..io.frames import FrameSource, as_sigma, ccddata_planes, clean_header, uncertainty_kind
from ..io.guard import refuse_overwrite
from ..io.headers import BAYER_PATTERNS
from ..io.writer import write_fits
from ..masks import MASK_NO_DATA
from ._kernels import MHC_FILTERS, RCD_MARGIN, debayer_rows, rcd_refine
from .cells import frame_pattern

CHANNELS = ("R", "G", "B")
METHODS = {"bilinear": 0, "mhc": 1, "rcd": 2}
#: the methods that make a band's three colours at the cost of one (RCD refines all three from
#: the bilinear ones: 120 ms a 1536×1024 frame either way), whose colours are best stacked
#: together (:func:`colour_sources`); bilinear and MHC make one colour for a third of the cost
ALL_AT_ONCE = frozenset({"rcd"})
_MARGIN = 2   # rows of the CFA either side a band of colours needs (the 5x5 window)
_RAW_SCRATCH = 4 << 20   # bytes of a file's raw rows decoded at a time


def channel_map(pattern: str) -> np.ndarray:
    """The colour index (0 R, 1 G, 2 B) of each cell of a 2x2 pattern (``RGGB``: [[0, 1], [1, 2]])."""
    pattern = str(pattern).upper()
    if pattern not in BAYER_PATTERNS:
        raise InputError(f"Bayer pattern {pattern!r}: use one of {', '.join(BAYER_PATTERNS)}")
    return np.array([[CHANNELS.index(pattern[0]), CHANNELS.index(pattern[1])],
                     [CHANNELS.index(pattern[2]), CHANNELS.index(pattern[3])]], np.int64)


def _method(method: str) -> int:
    if method not in METHODS:
        raise InputError(f"debayer method {method!r}: use {' or '.join(METHODS)}")
    return METHODS[method]


class Debayered(NamedTuple):
    """Colour planes of a CFA frame: ``data`` and ``uncertainty`` (3, ny, nx) float32 (R, G, B;
    uncertainty None when the frame had none), ``mask`` (3, ny, nx) bool (True: no good pixel of
    that colour nearby)."""

    data: np.ndarray
    mask: np.ndarray
    uncertainty: np.ndarray | None


def debayer(data: np.ndarray, pattern: str, *, method: str = "bilinear", mask: np.ndarray | None = None,
            uncertainty: np.ndarray | None = None, row0: int = 0, only: int | None = None) -> Debayered:
    """Red, green and blue planes of a calibrated CFA frame.

    Parameters
    ----------
    data : ndarray (ny, nx)
        The CFA frame, calibrated (bias, dark and flat applied to the one plane first).
    pattern : str
        Its Bayer pattern at pixel (0, 0) of ``data`` (RGGB, BGGR, GRBG, GBRG).
    method : {"bilinear", "mhc", "rcd"}
    mask : ndarray, optional
        Non-zero where a pixel is bad: never used; its colour made from its neighbours.
    uncertainty : ndarray, optional
        σ of each pixel; a made value gets the weighted mean of its pixels' variances (see
        :mod:`ccdcal.colour._kernels`: interpolation error included).
    row0 : int
        The image row of ``data``'s row 0 (for a band of rows: the phase of the pattern).
    only : int, optional
        Make only this colour (0 R, 1 G, 2 B); the other planes are returned empty (NaN, bad).
    """
    return _debayer(data, pattern, method, mask, uncertainty, row0, only, None)


class _Workspace:
    """Buffers of a band's debayering, reused from band to band: a fresh array of a few MiB
    costs a page fault per page each time it is made (a 132-row band of 1536 columns took
    4.8 ms with fresh planes, 1 ms of which the kernel). Each colour source keeps the planes
    it serves from (:class:`DebayeredRows`); the temporaries of a call (the CFA rows, its bad
    pixels and variance, RCD's planes) are one set per thread (:func:`scratch`), whatever the
    number of sources."""

    def __init__(self) -> None:
        self._store: dict[str, np.ndarray] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self._store.get(name)
        if buf is None or buf.size < n:
            buf = self._store[name] = np.empty(n, dtype)
        return buf[:n].reshape(shape)


# one workspace per thread that debayers (by thread id; a workspace let go is simply made again)
_SCRATCH = state.Cache("debayering scratch, per thread", until="run", max_items=8)


def scratch() -> _Workspace:
    """This thread's buffers for the temporaries of a band's debayering."""
    return _SCRATCH.get_or_make(threading.get_ident(), _Workspace)


def _debayer(data: np.ndarray, pattern: str, method: str, mask: np.ndarray | None,
             uncertainty: np.ndarray | None, row0: int, only: int | None, work: _Workspace | None) -> Debayered:
    """:func:`debayer`; with ``work``, into its buffers (valid until its next use), and with
    ``only`` the other colours' planes left as they were (not read by the caller)."""
    cfa = np.ascontiguousarray(data, dtype=np.float32)
    if cfa.ndim != 2:
        raise InputError(f"a CFA frame has one plane; got shape {cfa.shape}")
    ny, nx = cfa.shape

    def plane(name: str, shape: tuple[int, ...], dtype: Any, kept: bool = True) -> np.ndarray:
        """A new array, or a reused one: from ``work`` if the result holds it, else from this
        thread's scratch (used during this call only)."""
        if work is None:
            return np.empty(shape, dtype)
        return (work if kept else scratch()).take(name, shape, dtype)

    bad = np.isfinite(cfa, out=plane("bad", (ny, nx), np.bool_, kept=False))
    np.logical_not(bad, out=bad)
    if mask is not None:
        bad |= np.asarray(mask) != 0
    has_var = uncertainty is not None
    if has_var:
        var = np.square(np.asarray(uncertainty, np.float32), out=plane("var", (ny, nx), np.float32, kept=False))
    else:
        var = np.zeros((1, 1), np.float32)
    # made into this thread's scratch, the colours served then copied into ``work``'s planes
    out = plane("out", (3, ny, nx), np.float32, kept=False)
    out_bad = plane("out_bad", (3, ny, nx), np.bool_, kept=False)
    out_var = plane("out_var", (3, ny, nx), np.float32, kept=False)
    made = range(3) if only is None else (int(only),)
    code, chan = _method(method), channel_map(pattern)
    if code == METHODS["rcd"]:      # RCD starts from the three bilinear colours
        debayer_rows(cfa, bad, var, has_var, chan, row0, 0, ny, 0, MHC_FILTERS, -1, out, out_bad, out_var)
        rcd_refine(chan, row0, out, out_bad, plane("rcd", (7, ny, nx), np.float64, kept=False))
    else:
        debayer_rows(cfa, bad, var, has_var, chan, row0, 0, ny, code, MHC_FILTERS,
                     -1 if only is None else int(only), out, out_bad, out_var)
    if work is None:
        for c in set(range(3)) - set(made):     # the colours not made: empty
            out[c] = np.nan
            out_bad[c] = True
    sigma = None
    if has_var:
        sigma = plane("sigma", (3, ny, nx), np.float32, kept=False)
        if work is None and only is not None:
            sigma.fill(np.nan)
        for c in made:
            np.sqrt(np.maximum(out_var[c], 0.0, out=out_var[c]), out=sigma[c])
    if work is None:
        return Debayered(out, out_bad, sigma)
    return Debayered(*(None if planes is None else _kept(work, name, planes, made)
                       for name, planes in (("data", out), ("mask", out_bad), ("sigma", sigma))))


def _kept(work: _Workspace, name: str, planes: np.ndarray, made: Any) -> np.ndarray:
    """The colours ``made`` of ``planes`` copied into ``work``'s buffer ``name``, as (3, ny, nx):
    of one colour, a view whose three planes are that colour's (the others were not made; a
    source holds one plane per band, not three)."""
    if len(made) == 3:
        kept = work.take(name, planes.shape, planes.dtype)
        kept[...] = planes
        return kept
    one = work.take(name, planes.shape[1:], planes.dtype)
    one[...] = planes[made[0]]
    return np.lib.stride_tricks.as_strided(one, (3, *one.shape), (0, *one.strides), writeable=False)


def superpixel(data: np.ndarray, pattern: str) -> np.ndarray:
    """A quick colour view of a CFA frame at half size (3, ny/2, nx/2): each 2x2 cell's red, mean
    green and blue (previews and thumbnails; no interpolation)."""
    data = np.asarray(data, dtype=np.float32)
    ny, nx = (data.shape[0] // 2) * 2, (data.shape[1] // 2) * 2
    chan = channel_map(pattern)
    out = np.zeros((3, ny // 2, nx // 2), np.float32)
    count = np.zeros(3, np.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            c = chan[dy, dx]
            out[c] += data[dy:ny:2, dx:nx:2]
            count[c] += 1
    return out / count[:, None, None]


class _CfaFile:
    """A CFA file's planes (data, and MASK and UNCERT when present) and its last debayered band:
    what the colour sources of one frame share (:func:`colour_sources`)."""

    def __init__(self, path: Path, pattern: str, method: str, only: int | None):
        self.pattern, self.method, self.only = pattern, method, only   # only: the one colour made (None: all)
        self.data = FrameSource(path)
        mask, unc = ccddata_planes(self.data)
        self.mask = None if mask is None else FrameSource(path, hdu=mask.index)
        self.unc = None if unc is None else FrameSource(path, hdu=unc.index)
        self.unc_kind = "std" if unc is None else uncertainty_kind(unc.header)
        self.band: tuple[int, int, Debayered] | None = None
        self.work = _Workspace()

    def close(self) -> None:
        for source in (self.data, self.mask, self.unc):
            if source is not None:
                source.close()
        self.band = None
        self.work = _Workspace()


class DebayeredRows:
    """One colour of a CFA file (its data, and its ``MASK`` and ``UNCERT`` extensions when
    present) served by rows: a row source for :func:`ccdcal.stacking.engine.stack`.

    Each band of rows is debayered once (with a margin of CFA rows around it) and its data,
    mask and uncertainty are served from that; reading it again costs nothing. Only ``channel``
    is made, unless ``all_colours`` (:meth:`colours` then holds the three). The three colours of
    :func:`colour_sources` share one file and one band: a band debayered for one is served to the
    others (used by one thread at a time).
    """

    #: it opens its file itself (its own handles, its own band): one thread may read it while
    #: others read other sources (the stack measures the frames' backgrounds so)
    reads_own_file = True

    def __init__(self, path: str | os.PathLike, channel: int, pattern: str, *, method: str = "bilinear",
                 all_colours: bool = False, _file: _CfaFile | None = None):
        self.path = Path(path)
        self.channel = int(channel)
        self.name = f"{self.path.name}[{CHANNELS[self.channel]}]"
        self._file = _file or _CfaFile(self.path, pattern, method, None if all_colours else self.channel)
        self.shape = self._file.data.shape
        self.header = self._file.data.header

    def colours(self, y0: int, y1: int) -> Debayered:
        """The three colours of rows ``y0:y1`` (the band debayered once, then served from memory;
        the planes are valid until the next band is debayered)."""
        f = self._file
        if f.band is not None and f.band[0] <= y0 and y1 <= f.band[1]:
            a, _, band = f.band
            return Debayered(band.data[:, y0 - a:y1 - a], band.mask[:, y0 - a:y1 - a],
                             None if band.uncertainty is None else band.uncertainty[:, y0 - a:y1 - a])
        margin = RCD_MARGIN if f.method == "rcd" else _MARGIN
        a, b = max(0, y0 - margin), min(self.shape[0], y1 + margin)
        temp = scratch()
        data = temp.take("cfa", (b - a, self.shape[1]), np.float32)
        f.data.fill_rows(a, b, data, temp.take("raw", (_RAW_SCRATCH,), np.uint8))
        mask = f.mask.read_rows(a, b) if f.mask is not None else None
        unc = as_sigma(f.unc.read_rows(a, b), f.unc_kind) if f.unc is not None else None
        colours = _debayer(data, f.pattern, f.method, mask, unc, a, f.only, f.work)
        inner = Debayered(colours.data[:, y0 - a:y1 - a], colours.mask[:, y0 - a:y1 - a],
                          None if unc is None else colours.uncertainty[:, y0 - a:y1 - a])
        f.band = (y0, y1, inner)
        return inner

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        return self.colours(y0, y1).data[self.channel].copy()

    def fill_rows(self, y0: int, y1: int, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """Rows ``y0:y1`` of the colour served into ``out`` (float32; what the resampler uses:
        no array made per band)."""
        out[...] = self.colours(y0, y1).data[self.channel]

    def read_mask_rows(self, y0: int, y1: int) -> np.ndarray:
        return self.colours(y0, y1).mask[self.channel].copy()

    def read_measured_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` of the colour served where its filter measured them: the CFA's own
        pixels of that colour, NaN at the others and where the file's MASK marks them (what a
        colour's background and noise are measured on; nothing debayered)."""
        f = self._file
        rows = f.data.read_rows(y0, y1).astype(np.float32, copy=True)
        chan = channel_map(f.pattern)
        for dy in (0, 1):
            for dx in (0, 1):
                if chan[(y0 + dy) % 2, dx] != self.channel:
                    rows[dy::2, dx::2] = np.nan
        if f.mask is not None:
            rows[f.mask.read_rows(y0, y1) != 0] = np.nan
        return rows

    @property
    def read_uncertainty_rows(self) -> Callable[[int, int], np.ndarray] | None:
        """σ of rows ``y0:y1`` of the colour served, or None when the file has no UNCERT plane."""
        return None if self._file.unc is None else self._uncertainty_rows

    def _uncertainty_rows(self, y0: int, y1: int) -> np.ndarray:
        return self.colours(y0, y1).uncertainty[self.channel].copy()

    def close(self) -> None:
        self._file.close()


def colour_sources(path: str | os.PathLike, pattern: str, method: str = "bilinear") -> list[DebayeredRows]:
    """The red, green and blue of a CFA file as three row sources sharing one file and one band
    (each band debayered once for the three): for stacking the three colours together
    (:func:`ccdcal.stacking.engine.stack_colours`), one thread at a time per file."""
    shared = _CfaFile(Path(path), pattern, method, None)
    return [DebayeredRows(path, c, pattern, method=method, _file=shared) for c in range(3)]


def _all_colours(path: Path, pattern: str, method: str) -> Debayered:
    """The three colours of a whole CFA file (its MASK and UNCERT honoured)."""
    rows = DebayeredRows(path, 1, pattern, method=method, all_colours=True)
    try:
        return rows.colours(0, rows.shape[0])
    finally:
        rows.close()


def rgb_header(header: Any) -> Any:
    """A colour image's header from its CFA frame's: the Bayer cards dropped (the colours are made)."""
    out = clean_header(header)
    for key in ("BAYERPAT", "XBAYROFF", "YBAYROFF", "COLORTYP"):
        out.remove(key, ignore_missing=True, remove_all=True)
    out["CTYPE3"] = ("RGB", "planes: red, green, blue")
    return out


def debayer_file(path: str | os.PathLike, output: str | os.PathLike, *, method: str = "bilinear",
                 pattern: str | None = None) -> Path:
    """Write the colours of a calibrated CFA file as an RGB cube: primary (3, ny, nx) float32,
    ``UNCERT`` (3, ny, nx) when the input had one, ``MASK`` (3, ny, nx; MASK_NO_DATA where no
    good pixel of that colour was near)."""
    _debayered_file(Path(path), Path(output), method, pattern)
    return Path(output)


def _debayered_file(path: Path, output: Path | None, method: str, pattern: str | None) -> Debayered:
    """The colours of a CFA file, written as an RGB cube to ``output`` when given (once made)."""
    if output is not None:
        refuse_overwrite([path], files=[output])
    with FrameSource(path) as src:
        header = src.header.copy()
        used = frame_pattern(header, src.shape, pattern)
    if used is None:
        raise InputError(f"{path}: no BAYERPAT in its header: a mono frame (pass the pattern for a colour one)")
    colours = _all_colours(path, used, method)
    if output is None:
        return colours
    out_header = rgb_header(header)
    out_header["HISTORY"] = f"ccdcal: debayered ({method}) from {path.name}, Bayer pattern {used}"
    write_fits(output, colours.data, out_header, uncertainty=colours.uncertainty,
               mask=np.where(colours.mask, np.uint8(MASK_NO_DATA), np.uint8(0)))
    return colours


def debayer_image(obj: Any, output: str | os.PathLike | None = None, *, method: str = "bilinear",
                  pattern: str | None = None) -> Debayered:
    """Red, green and blue planes of a calibrated CFA frame (``ccdcal.debayer``).

    Parameters
    ----------
    obj : path-like, CCDData or ndarray
        A calibrated CFA frame: a FITS file (its ``MASK`` and ``UNCERT`` used when present), a
        CCDData (its mask and uncertainty) or an array.
    output : path-like, optional
        Also write the colours as an RGB cube (:func:`debayer_file`; a file input only).
    method : {"bilinear", "mhc", "rcd"}
    pattern : str, optional
        The Bayer pattern when the header does not give one (an array always needs it).

    Returns
    -------
    Debayered
    """
    if isinstance(obj, (str, os.PathLike)):
        return _debayered_file(Path(obj), None if output is None else Path(output), method, pattern)
    if output is not None:
        raise InputError("output= needs a file input (its header goes into the RGB cube)")
    header = getattr(obj, "header", None)
    data = np.asarray(getattr(obj, "data", obj), dtype=np.float32)
    used = frame_pattern(header, data.shape, pattern)
    if used is None:
        raise InputError("the frame's Bayer pattern is unknown: pass pattern= (RGGB, BGGR, GRBG or GBRG)")
    mask = getattr(obj, "mask", None)
    unc = getattr(getattr(obj, "uncertainty", None), "array", None)
    return debayer(data, used, method=method, mask=mask, uncertainty=unc)
