"""A library of masters from earlier runs (``reduce --masters DIR``): observers take darks once a
season and flats once a session, so a night may lack a kind of calibration frame that an
earlier run made a master of.

:func:`read_library` reads the headers of every FITS file under the given folders and keeps the
masters: ccdcal's own (``IMAGETYP = 'MASTER BIAS'`` ..., with their members' camera settings,
binning, temperature, exposure, filter and date) and those of other programs that say what they
are (``IMAGETYP = 'Master Dark'``, APP's ``CALFRAME``). A master that cannot be mixed with
ADU frames is refused with the reason: biases and darks of floats within [0, 1] (Siril and
PixInsight write masters as fractions of 65535) and masters with a MaxIm ``PEDESTAL`` added.
:class:`Library` matches them as the night's own masters are matched
(:class:`ccdcal.planning.plan.MasterIndex` asks it only for what the night lacks): the same
binning, image size and camera settings, the temperature within the tolerance, a dark of the
frame's own exposure, a flat of its filter no older than ``flat_max_age`` days.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from ..io.dates import mjd_isot, utc_mjd
from ..io.frames import datasum_of, find_fits
from ..io.hashing import file_hash
from ..io.headers import (
    SETTEMP_KEYS,
    TEMP_KEYS,
    binning,
    camera_settings,
    exposure_time,
    filter_name,
    normalised_type,
    read_temperature,
    start_mjd,
)
from ..sections import parse_section
from .inventory import FrameInfo, FrameKind, Skipped, frame_temperature

_KINDS = {"MASTERBIAS": FrameKind.BIAS, "MASTERDARK": FrameKind.DARK, "MASTERFLAT": FrameKind.FLAT,
          "MASTEROFFSET": FrameKind.BIAS, "MASTERDARKFLAT": FrameKind.DARK}


@dataclass(frozen=True)
class LibraryMaster:
    """One master of the library, as its header describes it."""

    name: str                       # its path: the name recipes give it
    kind: FrameKind
    key: tuple                      # (binning, (ny, nx), camera settings)
    exptime: float | None
    temperature: float | None
    filter: str | None
    mjd: float | None
    bias_subtracted: bool           # a dark whose members had a bias removed

    def describe(self) -> str:
        when = f", {mjd_isot(self.mjd)[:10]}" if self.mjd is not None else ""
        temp = f", {self.temperature:+.1f} °C" if self.temperature is not None else ""
        return f"{self.name} (library{when}{temp})"


def library_key(info: FrameInfo) -> tuple:
    """What a frame shares with a library master: binning, the image size once trimmed (masters are
    written trimmed) and the camera settings."""
    shape = parse_section(info.trimsec).resolve(info.shape).shape if info.trimsec else info.shape
    return (info.binning, shape, info.camera)


def frame_mjd(info: FrameInfo) -> float | None:
    """The frame's DATE-OBS as an MJD (None when absent or not a date)."""
    return utc_mjd(info.date_obs) if info.date_obs else None


@dataclass(frozen=True)
class Library:
    """Masters of earlier runs, and the files of the library folders that were not taken."""

    masters: tuple[LibraryMaster, ...] = ()
    refused: tuple[Skipped, ...] = ()

    def _candidates(self, kind: FrameKind, info: FrameInfo, temp_tolerance: float) -> list[LibraryMaster]:
        key, temp = library_key(info), frame_temperature(info)
        found = [m for m in self.masters if m.kind == kind and m.key == key]
        if temp is None:
            return found
        return [m for m in found if m.temperature is None or abs(m.temperature - temp) <= temp_tolerance]

    def bias_for(self, info: FrameInfo, temp_tolerance: float) -> LibraryMaster | None:
        """The library's master bias for the frame: the nearest in temperature."""
        found = self._candidates(FrameKind.BIAS, info, temp_tolerance)
        return min(found, key=lambda m: _distance(m, info), default=None)

    def dark_for(self, info: FrameInfo, temp_tolerance: float, exptime_tolerance: float) -> LibraryMaster | None:
        """The library's master dark of the frame's own exposure (a library dark is never scaled)."""
        t = info.exptime
        if t is None:
            return None
        found = [m for m in self._candidates(FrameKind.DARK, info, temp_tolerance)
                 if m.exptime is not None and abs(m.exptime - t) <= exptime_tolerance * max(t, 1e-9)]
        return min(found, key=lambda m: _distance(m, info), default=None)

    def flat_for(self, info: FrameInfo, temp_tolerance: float, max_age: float) -> tuple[LibraryMaster | None, str]:
        """The library's master flat of the frame's filter taken nearest in time, at most
        ``max_age`` days from the frame; and why none when one was too old."""
        found = [m for m in self.masters if m.kind == FrameKind.FLAT and m.key == library_key(info)
                 and m.filter == info.filter]
        when = frame_mjd(info)
        if when is None:
            return (found[0] if len(found) == 1 else None), ("" if len(found) <= 1 else
                                                             "the light has no date: no library flat chosen")
        dated = sorted((abs(m.mjd - when), m) for m in found if m.mjd is not None)
        if dated and dated[0][0] <= max_age:
            return dated[0][1], ""
        if dated:
            return None, (f"the nearest library flat of filter {info.filter!r} is {dated[0][0]:.0f} days from"
                          f" the light (more than {max_age:g}): not used")
        return None, ""


def _distance(master: LibraryMaster, info: FrameInfo) -> tuple[float, float]:
    temp = frame_temperature(info)
    dt = abs(master.temperature - temp) if (temp is not None and master.temperature is not None) else 0.0
    when = frame_mjd(info)
    age = abs(master.mjd - when) if (when is not None and master.mjd is not None) else 0.0
    return (dt, age)


def read_library(paths: Sequence[str | Path]) -> Library:
    """The masters under ``paths`` (folders or files), and every file refused with its reason."""
    if not paths:
        return Library()
    masters: list[LibraryMaster] = []
    refused: list[Skipped] = []
    broken: list[tuple[str, str]] = []
    for path in find_fits(list(paths), broken):
        try:
            master = _library_master(Path(path))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            refused.append(Skipped(str(path), f"not a readable master ({exc})"))
            continue
        if isinstance(master, str):
            refused.append(Skipped(str(path), master))
        else:
            masters.append(master)
    refused.extend(Skipped(where, why) for where, why in broken)
    return Library(masters=tuple(masters), refused=tuple(refused))


def _library_master(path: Path) -> LibraryMaster | str:
    """The master a file holds, or why it is not taken."""
    with fits.open(path, memmap=True) as hdul:       # pixels read only where sampled
        header = hdul[0].header
        typ = normalised_type(header.get("IMAGETYP", header.get("CALFRAME", "")))
        kind = _KINDS.get(typ)
        if kind is None:
            return f"not a master (IMAGETYP/CALFRAME {str(header.get('IMAGETYP', '')).strip()!r})"
        if header.get("NAXIS") != 2:
            return f"a {kind.value} master must be one 2-D image (NAXIS = {header.get('NAXIS')})"
        if "PEDESTAL" in header:
            return (f"PEDESTAL = {header['PEDESTAL']}: a master with a pedestal added (MaxIm DL) is not mixed"
                    " with raw ADU; export it without one")
        if header.get("BITPIX", 16) < 0 and kind != FrameKind.FLAT and _fraction_of_range(hdul[0].data):
            return (f"a master {kind.value} of floats within [0, 1] (Siril and PixInsight write masters as"
                    " fractions of 65535): not mixed with ADU frames; build it here or export it in ADU")
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    temp, _ = read_temperature(header, SETTEMP_KEYS)
    if temp is None:
        temp, _ = read_temperature(header, TEMP_KEYS)
    members = " ".join(str(h) for h in header.get("HISTORY", []) if str(h).startswith("each member:"))
    return LibraryMaster(
        name=str(path.resolve()), kind=kind, key=(binning(header), shape, camera_settings(header)),
        exptime=exposure_time(header) if kind == FrameKind.DARK else None, temperature=temp,
        filter=filter_name(header) if kind == FrameKind.FLAT else None, mjd=_master_mjd(header),
        bias_subtracted="bias" in members)


def _fraction_of_range(data: Any) -> bool:
    """Whether a float master's values lie within [0, 1] (judged on a regular sample of about
    250,000 pixels: the master is not copied whole at plan time)."""
    step = max(1, int(np.sqrt(data.size / 250_000)))
    values = np.asarray(data[::step, ::step], dtype=np.float64)
    finite = values[np.isfinite(values)]
    return bool(finite.size) and float(finite.min()) >= -0.5 and float(finite.max()) <= 1.5


def _master_mjd(header: Any) -> float | None:
    try:
        return start_mjd(header)
    except (ValueError, TypeError):
        return None


def library_print(path: Path) -> str:
    """A library master's identity in the fingerprints of what is built on it: its DATASUM (as for
    the masters built in the run), else the hash of its bytes."""
    return datasum_of(path) or file_hash(path)
