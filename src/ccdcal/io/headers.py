"""What header keywords mean, read and written: exposure and dark time, gain (a camera's GAIN
setting is never taken as e-/ADU), read noise, the ADC maximum, dates; and the keywords
ccdcal writes into calibrated frames. Every other module asks here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from .._shared.names import printable
from ..errors import InputError
from ..masks import (
    MASK_BITS,
    MASK_COSMIC_RAY,
    MASK_HOT,
    MASK_LOW_FLAT,
    MASK_NO_DATA,
    MASK_SATURATED,
    MASK_USER,
)
from ..sections import parse_section
from .cards import CardPlan
from .dates import mjd_isot as _isot
from .dates import utc_mjd
from .frames import clean_header, header_value, refit_comments

if TYPE_CHECKING:
    from ..calibration.arithmetic import CalibratedFrame, Master

_GAIN_WORDS = ("e-/adu", "e/adu", "electrons/adu", "e-/dn", "e/dn", "e-/count", "electrons per adu", "e-/ad")


def header_gain(header: Any, *, shift: int = 0) -> tuple[float | None, str]:
    """Gain (e-/ADU) of the stored data that a header states unambiguously, and where it came from.

    ``EGAINSAV`` (SharpCap: e-/ADU at the saved bit depth) is taken as it is. ``EGAIN`` is
    trusted, but capture programs write it at the ADC's native depth (the camera SDK's value)
    while storing 12- or 14-bit data left-shifted to 16 bits: when the data are known to be
    shifted by ``shift`` bits (:func:`adc_shift`), or the header says ``ADCBITS`` < 16 on 16-bit
    data, it is divided by 2**shift, and the source says so. ``GAIN`` is trusted only when its
    comment says e-/ADU: on many cameras it is a gain *setting* or index (Nickel: ``DCS GAIN
    INDEX``; ZWO and QHY: 0–600).
    """
    if header is None:
        return None, "no header"
    saved = _positive(header.get("EGAINSAV"))
    if saved is not None:
        return saved, "EGAINSAV (e-/ADU at the saved bit depth)"
    for key in ("EGAIN", "GAIN", "CCDGAIN"):
        value = _positive(header.get(key)) if key in header else None
        if value is None:
            continue
        comment = str(header.comments[key]).lower().replace(" ", "")
        if key == "EGAIN":
            bits = _positive(header.get("ADCBITS"))
            if not shift and bits is not None and bits < 16 and header.get("BITPIX") == 16:
                shift = 16 - int(bits)
            if shift:
                return value / 2**shift, f"EGAIN {value:g} / {2**shift}: native {16 - shift}-bit ADC, data shifted"
            return value, key
        if any(w.replace(" ", "") in comment for w in _GAIN_WORDS):
            return value, key
    if "GAIN" in header:
        return None, f"GAIN = {header['GAIN']!r} ({header.comments['GAIN'] or 'no comment'}) is not stated in e-/ADU"
    return None, "no gain keyword"


def _positive(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        return None
    return float(value)


def adc_shift(values: np.ndarray, *, most: int = 8) -> int:
    """How many low bits are zero in every value of integer data (0 to ``most``): 2 for a 14-bit
    ADC stored in 16 bits (every value a multiple of 4), 4 for a 12-bit one. ``values`` is a
    sample of the raw pixels as read (BZERO applied); 0 when any is not an integer, or fewer
    than 64 values are non-zero (too few to tell). At most about 65,000 of the values are looked
    at (a regular sample): data of an unshifted ADC would need every one of them even to seem
    shifted by one bit (a chance of 2^-65000), and a light's calibration pays this per frame."""
    values = np.asarray(values).reshape(-1)
    values = values[:: max(1, values.size // 65536)]
    values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if values.size == 0:
        return 0
    ints = values.astype(np.int64)
    if values.dtype.kind == "f" and not np.array_equal(ints, values):
        return 0
    ints = ints[ints != 0]
    if ints.size < 64:
        return 0
    bits = int(np.bitwise_or.reduce(np.abs(ints)))
    shift = 0
    while shift < most and not bits & (1 << shift):
        shift += 1
    return shift


#: Camera settings that change a sensor's bias, dark and response: frames taken at other values
#: never share masters. (keyword, its name in the plan; QHY's BLKLEVEL is its OFFSET.)
CAMERA_SETTINGS = (("GAIN", "GAIN"), ("OFFSET", "OFFSET"), ("BLKLEVEL", "OFFSET"), ("READOUTM", "READOUTM"))


def camera_settings(header: Any) -> tuple[tuple[str, str], ...]:
    """The camera settings a frame was taken at, as ``(name, value)`` pairs in a fixed order:
    ``GAIN`` when it is a setting (not stated in e-/ADU; ZWO and QHY 0–600, INDI's ``120.000``
    equal to N.I.N.A.'s ``120``), ``OFFSET`` (or QHY's ``BLKLEVEL``) and the readout mode."""
    if header is None:
        return ()
    found: dict[str, str] = {}
    for key, name in CAMERA_SETTINGS:
        if key not in header or name in found:
            continue
        if key == "GAIN" and header_gain(header)[1] == "GAIN":
            continue                                   # stated in e-/ADU: a property, not a setting
        value = header[key]
        if isinstance(value, bool) or value is None:
            continue
        text = format_number(float(value)) if isinstance(value, (int, float)) else str(value).strip()
        if text:
            found[name] = text
    return tuple(found.items())


def is_cmos(settings: tuple[tuple[str, str], ...]) -> bool:
    """Whether :func:`camera_settings` show a CMOS camera: an offset register or a readout mode
    (a GAIN index alone is written by CCD controllers too)."""
    return any(name in ("OFFSET", "READOUTM") for name, _ in settings)


# -- the Bayer phase of a one-shot-colour frame ------------------------------------------------------
#: The 2x2 colour filter patterns ccdcal reads (the colour of pixels (0,0), (0,1), (1,0), (1,1)).
BAYER_PATTERNS = ("RGGB", "BGGR", "GRBG", "GBRG")
_NO_PATTERN = {"", "NONE", "INVALID", "MONO", "MONOCHROME", "GRAY", "GREY"}


def shift_pattern(pattern: str, dx: int, dy: int) -> str:
    """The 2x2 pattern seen from pixel (dx, dy) of ``pattern``'s array: an odd ``dx`` swaps its
    columns (RGGB -> GRBG), an odd ``dy`` its rows (RGGB -> GBRG)."""
    cells = [[pattern[0], pattern[1]], [pattern[2], pattern[3]]]
    return "".join(cells[(y + dy) % 2][(x + dx) % 2] for y in (0, 1) for x in (0, 1))


def bayer_pattern(header: Any, shape: tuple[int, int] | None = None) -> tuple[str | None, str | None]:
    """The Bayer pattern at pixel (0, 0) of the array as stored (numpy row 0), and why none when a
    pattern is written but not read (None: a mono frame, or a pattern ccdcal calibrates as it is).

    ``BAYERPAT`` names the cell at the camera's first read-out row (``COLORTYP`` when it holds a
    2x2 pattern). As Siril reads it: with ``ROWORDER = 'BOTTOM-UP'`` and an even image height the
    rows of the pattern swap; then an odd ``XBAYROFF`` swaps its columns and an odd
    ``YBAYROFF`` its rows. X-Trans and other patterns that are not 2x2 are refused.
    """
    if header is None:
        return None, None
    raw = header.get("BAYERPAT")
    if raw is None:
        colortyp = header.get("COLORTYP")
        raw = colortyp if isinstance(colortyp, str) and colortyp.strip().upper() in BAYER_PATTERNS else None
    if raw is None or isinstance(raw, bool):
        return None, None
    pattern = str(raw).strip().upper().replace(" ", "")
    if pattern in _NO_PATTERN:
        return None, None
    if pattern not in BAYER_PATTERNS:
        return None, (f"BAYERPAT = {printable(str(raw).strip())!r} is not a 2x2 Bayer pattern (X-Trans and"
                      " others are not read): calibrated as a mono frame, never debayered")
    ny = shape[0] if shape is not None else header.get("NAXIS2")
    if str(header.get("ROWORDER", "TOP-DOWN")).strip().upper() == "BOTTOM-UP" and isinstance(ny, int) and ny % 2 == 0:
        pattern = shift_pattern(pattern, 0, 1)
    dx, dy = (header_number(header.get(k)) or 0 for k in ("XBAYROFF", "YBAYROFF"))
    return shift_pattern(pattern, int(dx), int(dy)), None


def trimmed_pattern(pattern: str | None, trim: Any = None) -> str | None:
    """The Bayer pattern at pixel (0, 0) of an image trimmed by ``trim`` (a resolved Section)."""
    if not pattern:
        return None
    return shift_pattern(pattern, trim.x1 - 1, trim.y1 - 1) if trim is not None else pattern


def bayer_cards(pattern: str) -> dict[str, Any]:
    """The cards of an output whose pixel (0, 0) has ``pattern``: stated at the array's own row 0
    (TOP-DOWN, no offsets), so any reader finds the same colours."""
    return {"BAYERPAT": (pattern, "Bayer pattern at pixel (1,1) of this image"),
            "XBAYROFF": (0, "Bayer pattern offset in x"), "YBAYROFF": (0, "Bayer pattern offset in y"),
            "ROWORDER": ("TOP-DOWN", "row 1 is the first row read (Bayer phase)")}


def header_read_noise(header: Any) -> float | None:
    """Read noise in electrons from RDNOISE/READNOIS/RON, when the header has a positive number."""
    if header is None:
        return None
    for key in ("RDNOISE", "READNOIS", "RON", "READNOISE"):
        value = header.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def exposure_of(header: Any, *, dark: bool = False) -> float | None:
    """Seconds of exposure from a header (the scan's rule: EXPTIME, EXPOSURE, ITIME, ...;
    negative values ignored); ``dark=True`` prefers DARKTIME, unless it is shorter than the
    exposure (a shutter-open time, as some robotic observatories write).
    """
    if header is None:
        return None
    exposure, key, _ = read_exposure(header)
    if dark:
        darktime, _ = read_dark_time(header, exposure, key)
        if darktime is not None:
            return darktime
    return exposure


def _ascii(text: str) -> str:
    """FITS cards hold printable ASCII only."""
    text = (text.replace("×", "x").replace("°C", "C").replace("°", "deg").replace("—", "-").replace("–", "-")
            .replace("←", "<-"))
    return text.encode("ascii", "replace").decode("ascii")


def write_calibration_keywords(header: Any, result: CalibratedFrame, *, bias: Master | None = None,
                         dark: Master | None = None, flat: Master | None = None,
                         flat_floor: float = 0.1, gain_source: str | None = None) -> Any:
    """Write what :func:`calibrate_frame` did into ``header`` (an astropy Header, changed in place).

    Keywords: OVSCSEC/OVSCMOD/OVSCORD/OVSCMEAN/OVSCNOIS/OVSCCn (overscan model),
    CALBIAS/CALDARK/CALFLAT (master file names) with CALSUMB/CALSUMD/CALSUMF (their
    DATASUM), DARKSCAL (factor applied), DARKEXPR (exposure ratio), DARKOPT (optimised),
    FLATNORM/FLATFLOR, GAIN/RDNOISE (e-) and BUNIT for the unit of the data, SATURATE,
    NSATUR/NHOTPIX/NLOWFLAT/NCOSRAY/NUSERBAD/NNODATA (masked pixel counts), one HISTORY
    line per step and a COMMENT per mask bit. Returns ``header``.
    """
    spec, fit = result.overscan_spec, result.overscan
    if spec is not None and fit is not None:
        header["OVSCSEC"] = (str(spec.region), "overscan region subtracted (FITS, 1-based)")
        header["OVSCMOD"] = (spec.model, "overscan model along the readout direction")
        header["OVSCAXIS"] = ("row" if spec.axis == 1 else "column", "one overscan value per")
        if spec.model not in ("mean", "median"):
            header["OVSCORD"] = (spec.order, "polynomial order (spline: pieces)")
            header["OVSCREJ"] = (fit.rejected, "lines rejected by the fit")
        header["OVSCMEAN"] = (fit.level, "[adu] mean overscan level subtracted")
        if np.isfinite(fit.noise):
            header["OVSCNOIS"] = (fit.noise, "[adu] overscan scatter about the model")
        for i, c in enumerate(fit.coefficients[:10]):
            header[f"OVSCC{i}"] = (c, f"{spec.model} coefficient {i} (x in [-1,1])")
        header["HISTORY"] = _ascii(spec.describe())
    if result.trim is not None:
        header["HISTORY"] = f"trimmed to {result.trim}"
    for key, master, what in (("CALBIAS", bias, "master bias"), ("CALDARK", dark, "master dark"),
                              ("CALFLAT", flat, "master flat")):
        if master is None:
            continue
        header[key] = (master.name or "(array)", f"{what} applied")
        header["CALSUM" + key[3]] = (master.datasum or "", f"DATASUM of the {what}")
        if key == "CALBIAS":
            header["HISTORY"] = f"subtracted master bias {master.name or ''}".rstrip()
    if dark is not None:
        header["DARKSCAL"] = (result.dark_scale, "master dark x this was subtracted")
        header["DARKEXPR"] = (result.dark_scale_exposure, "exposure ratio t_frame / t_dark")
        header["DARKOPT"] = (result.dark_optimized, "DARKSCAL optimised to minimise the noise")
        if result.dark_optimized:
            header["DARKNPIX"] = (result.dark_pixels, "pixels the dark optimisation used")
        header["HISTORY"] = (f"subtracted master dark {dark.name or ''} x {result.dark_scale:.6g}"
                             + (" (optimised)" if result.dark_optimized else " (exposure ratio)"))
    if flat is not None:
        if flat.level is not None:
            header["FLATNORM"] = (flat.level, "[adu] level the master flat was divided by")
        header["FLATFLOR"] = (flat_floor, "flat pixels below this masked, not divided")
        header["HISTORY"] = f"divided by master flat {flat.name or ''} (normalised to 1)"
    if result.gain is not None:
        if result.unit == "electron":
            header["GAIN"] = (1.0, "[e-/unit] data are in electrons")
            header["GAINORIG"] = (result.gain, "[e-/adu] gain used for the conversion")
            header["HISTORY"] = f"multiplied by the gain {result.gain:.4g} e-/adu: data in electrons"
        else:
            header["GAIN"] = (result.gain, "[e-/adu] gain, source in GAINSRC")
        if gain_source:
            header["GAINSRC"] = (_ascii(gain_source)[:68], "where the gain came from")
    if result.read_noise is not None:
        if result.gain is not None:
            header["RDNOISE"] = (result.read_noise * result.gain, "[e-] read noise")
        header["RDNADU"] = (result.read_noise, "[adu] read noise")
    header["BUNIT"] = (result.unit, "physical unit of the data")
    if result.saturation is not None:
        header["SATRAW"] = (result.saturation, "[adu] saturation of the raw frame (MASK bit 1)")
        header.remove("SATURATE", ignore_missing=True)
        header.remove("DATAMAX", ignore_missing=True)
    if result.uncertainty is not None:
        header["HISTORY"] = "UNCERT: sqrt(rn^2 + max(S,0)/gain + bias_unc^2 + (k dark_unc)^2)/flat (+flat term)"
    for note in result.notes:
        header["HISTORY"] = _ascii(note)
    counted = (("NSATUR", MASK_SATURATED), ("NHOTPIX", MASK_HOT), ("NLOWFLAT", MASK_LOW_FLAT),
               ("NCOSRAY", MASK_COSMIC_RAY), ("NUSERBAD", MASK_USER), ("NNODATA", MASK_NO_DATA))
    for (key, bit), n in zip(counted, result.counts([bit for _, bit in counted]), strict=True):
        header[key] = (n, f"pixels with MASK bit {bit}")
    for bit, meaning in MASK_BITS.items():
        header["COMMENT"] = f"MASK bit {bit}: {meaning}"
    return header


# -- what the scan reads: exposure, dark time, temperature, saturation, sections, steps done ----
TYPE_KEYS = ("IMAGETYP", "IMAGETYPE", "OBSTYPE", "FRAMETYP", "FRAMETYPE", "IMTYPE", "EXPTYPE", "OBSTYP")
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE", "ITIME", "EXPTIM", "EXP_TIME", "EXPOSED", "EXPTIMEA")
DARKTIME_KEYS = ("DARKTIME", "DARK_TIME")
FILTER_KEYS = ("FILTER", "FILTNAME", "FILTNAM", "INSFLNAM", "FILTER1", "FILTER2", "FILT1", "FILTERID", "WHEEL")
TEMP_KEYS = ("CCD-TEMP", "CCDTEMP", "CCD_TEMP", "DET-TEMP", "DETTEMP", "TEMPDET", "CCDTEMP1", "DETTEM")
SETTEMP_KEYS = ("SET-TEMP", "SETTEMP", "SET_TEMP", "CCD-SET", "CCDSETT")
DATE_KEYS = ("DATE-OBS", "DATE_OBS", "DATEOBS", "DATE-BEG", "DATE")
SATURATE_KEYS = ("SATURATE", "DATAMAX", "SATLEVEL", "MAXLIN")
SECTION_KEYS = ("BIASSEC", "TRIMSEC", "DATASEC")
# Temperatures written where the camera knows none; anything outside the range too.
TEMP_PLACEHOLDERS = (-99.0, -100.0, -999.0)
TEMP_RANGE = (-150.0, 80.0)  # deg C a detector can physically be at
# Steps a header can say were already applied, in the order they are listed.
CALIBRATION_STEPS = ("overscan", "trim", "bias", "dark", "flat", "master")
EMPTY_FILTERS = {"", "CLEAR", "OPEN", "EMPTY", "NONE", "NO FILTER", "AIR", "N/A", "-"}


def header_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def normalised_type(value: Any) -> str:
    return re.sub(r"[\s_\-]+", "", str(value)).upper()


def saturation_problem(value: float | None, level: float | None = None) -> str | None:
    """Why a saturation level from a header cannot be the camera's, or None when it can.

    Headers write placeholders where they know nothing (``DATAMAX = 0``); a level at or
    below 0 ADU, not a finite number, or below the frame's own median level would call
    most of the frame saturated.

    Parameters
    ----------
    value : float or None
        The saturation level (SATURATE, DATAMAX, ...), ADU. None is not a problem.
    level : float, optional
        The median of the frame, when its pixels have been read.

    Returns
    -------
    str or None
        A short reason (``"not a positive number"``, ``"below the frame's median level
        1500 ADU"``), or None when the level is usable.
    """
    if value is None:
        return None
    if not math.isfinite(value):
        return "not a finite number"
    if value <= 0:
        return "not a positive number"
    if level is not None and math.isfinite(level) and value < level:
        return f"below the frame's median level {format_number(level)} ADU"
    return None


def format_number(value: float) -> str:
    """A header number as people write it (-99, 19.5, 65535)."""
    return f"{value:g}"


def read_exposure(header: Any) -> tuple[float | None, str | None, list[str]]:
    """The exposure time, the keyword it came from, and why other values were ignored."""
    problems: list[str] = []
    for key in EXPTIME_KEYS:
        value = header_number(header_value(header, (key,)))
        if value is None:
            continue
        if not np.isfinite(value) or value < 0:
            problems.append(f"{key} = {format_number(value)} is not an exposure time: ignored")
            continue
        return value, key, problems
    return None, None, problems


def exposure_time(header: Any) -> float | None:
    """Exposure time in seconds (EXPTIME, EXPOSURE, ITIME, ...); negative values are ignored."""
    return read_exposure(header)[0]


def read_dark_time(header: Any, exptime: float | None, exp_key: str | None) -> tuple[float | None, list[str]]:
    """DARKTIME, unless negative or shorter than the exposure (a shutter-open time written there)."""
    for key in DARKTIME_KEYS:
        value = header_number(header_value(header, (key,)))
        if value is None:
            continue
        if not np.isfinite(value) or value < 0:
            return None, [f"{key} = {format_number(value)} is not a dark time: ignored"]
        if exptime is not None and value < exptime - max(1e-3, 1e-3 * exptime):
            return None, [f"{key} = {format_number(value)} s is shorter than {exp_key} = {format_number(exptime)} s"
                          " (a shutter-open time?): ignored"]
        return value, []
    return None, []


def read_temperature(header: Any, keys: Sequence[str]) -> tuple[float | None, list[str]]:
    """The first temperature of ``keys`` that is not a placeholder, and the placeholders met."""
    problems: list[str] = []
    low, high = TEMP_RANGE
    for key in keys:
        value = header_number(header_value(header, (key,)))
        if value is None:
            continue
        if not np.isfinite(value) or value in TEMP_PLACEHOLDERS:
            problems.append(f"{key} = {format_number(value)} is a placeholder (unknown): ignored")
            continue
        if not low <= value <= high:
            problems.append(f"{key} = {format_number(value)} is outside {format_number(low)}..+{format_number(high)} °C,"
                            " a placeholder (unknown): ignored")
            continue
        return value, problems
    return None, problems


def read_saturation(header: Any) -> tuple[float | None, list[str]]:
    """The first saturation level of SATURATE/DATAMAX/SATLEVEL/MAXLIN that is not a placeholder."""
    problems: list[str] = []
    for key in SATURATE_KEYS:
        value = header_number(header_value(header, (key,)))
        if value is None:
            continue
        why = saturation_problem(value)
        if why:
            problems.append(f"{key} = {format_number(value)} is a placeholder ({why}): ignored")
            continue
        return value, problems
    return None, problems


def calibration_steps(header: Any) -> tuple[tuple[str, ...], list[str]]:
    """Steps the header says were already applied, and a warning that says so and where."""
    steps: set[str] = set()
    evidence: list[str] = []

    def present(key: str) -> Any:
        try:
            return header_value(header, (key,))
        except (KeyError, ValueError):
            return None

    calstat = present("CALSTAT")  # MaxIm DL: B, D, F for the steps it applied
    if calstat is not None:
        letters = str(calstat).upper()
        found = [step for letter, step in (("B", "bias"), ("D", "dark"), ("F", "flat")) if letter in letters]
        if found:
            steps.update(found)
            evidence.append(f"CALSTAT = {str(calstat).strip()!r}")
    pedestal = present("PEDESTAL")  # MaxIm DL adds it when it calibrates
    pedestal_number = header_number(pedestal)
    pedestal_note = (None if pedestal is None else
                     f"PEDESTAL = {format_number(pedestal_number) if pedestal_number is not None else pedestal}")
    for key, step in (("OVERSCAN", "overscan"), ("TRIM", "trim"), ("ZEROCOR", "bias"),
                      ("DARKCOR", "dark"), ("FLATCOR", "flat")):  # IRAF ccdproc: dated text
        value = present(key)
        if isinstance(value, str) and (key in ("ZEROCOR", "DARKCOR", "FLATCOR") or step in value.lower()):
            steps.add(step)
            evidence.append(key)
    for key, step in (("SUBTRACT_OVERSCAN", "overscan"), ("TRIM_IMAGE", "trim"), ("SUBTRACT_BIAS", "bias"),
                      ("SUBTRACT_DARK", "dark"), ("FLAT_CORRECT", "flat")):  # astropy ccdproc's log
        if present(key) is not None:
            steps.add(step)
            evidence.append(key.lower())
    for key, step in (("OVSCSEC", "overscan"), ("CALBIAS", "bias"), ("CALDARK", "dark"),
                      ("CALFLAT", "flat")):  # ccdcal's calibrated frames
        if present(key) is not None:
            steps.add(step)
            evidence.append(key)
    for key in TYPE_KEYS:
        value = present(key)
        if value is not None:
            if normalised_type(value).startswith("MASTER"):
                steps.add("master")
                evidence.append(f"{key} = {str(value).strip()!r}")
            break
    bunit = present("BUNIT")
    if isinstance(bunit, str) and bunit.replace(" ", "").lower() == "adu/adu":  # ccdcal's master flat
        steps.add("master")
        evidence.append("BUNIT = 'adu/adu'")
    ordered = tuple(step for step in CALIBRATION_STEPS if step in steps)
    warnings: list[str] = []
    if ordered:
        sources = "; ".join(evidence + ([pedestal_note] if pedestal_note else []))
        warnings.append(f"the header says this frame was already calibrated ({', '.join(ordered)};"
                        f" from {sources})")
    elif pedestal_note:
        warnings.append(f"{pedestal_note}: MaxIm DL adds a pedestal when it calibrates, but no CALSTAT"
                        " says which steps were done; treated as raw")
    return ordered, warnings


def filter_name(header: Any) -> str | None:
    """The filter: FILTER (or its variants); FILTER1+FILTER2 joined when both hold a real filter."""
    values = []
    for key in FILTER_KEYS:
        value = header_value(header, (key,))
        if value is None:
            continue
        text = str(value).strip()
        if text.upper() in EMPTY_FILTERS:
            continue
        if key in ("FILTER1", "FILTER2", "FILT1"):
            values.append(text)
            continue
        return text
    return "+".join(values) if values else None


def binning(header: Any) -> tuple[int, int]:
    x = header_number(header_value(header, ("XBINNING", "BINX", "CCDXBIN", "HBIN", "XBIN")))
    y = header_number(header_value(header, ("YBINNING", "BINY", "CCDYBIN", "VBIN", "YBIN")))
    if x is None or y is None:
        ccdsum = header_value(header, ("CCDSUM", "BINNING"))
        if isinstance(ccdsum, str):
            parts = re.split(r"[\s,x×]+", ccdsum.strip().lower())
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                x, y = float(parts[0]), float(parts[1])
        elif isinstance(ccdsum, (int, float)):
            x = y = float(ccdsum)

    def valid(v: float | None) -> int | None:  # binning is a small positive integer; anything else is noise
        return int(v) if v is not None and np.isfinite(v) and 1 <= v <= 64 and float(v).is_integer() else None

    bx, by = valid(x), valid(y)
    bx = bx or by or 1
    return bx, by or bx


def read_date(header: Any) -> str | None:
    """The observation date (:data:`DATE_KEYS`), with the time of day from TIME-OBS/UT when the
    date keyword holds only the day."""
    return _joined_date(header, DATE_KEYS)


_DAY = re.compile(r"^\d{4}-\d\d-\d\d$")


def _joined_date(header: Any, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` as a stripped string; a day alone (``2024-03-01``) joined with the
    time of day of TIME-OBS, TIME_OBS, UT, UTSTART or UT-START when one is given."""
    value = header_value(header, keys)
    if not isinstance(value, str):
        return None
    value = value.strip()
    time = header_value(header, ("TIME-OBS", "TIME_OBS", "UT", "UTSTART", "UT-START"))
    if _DAY.match(value) and isinstance(time, str):
        value = f"{value}T{time.strip()}"
    return value


# -- classification -------------------------------------------------------------------------
def read_sections(header: Any, shape: tuple[int, int]) -> tuple[str | None, str | None, list[str]]:
    """BIASSEC and TRIMSEC (else DATASEC) when each is a FITS section inside this image.

    A section written in another convention (``'[0,513:0,1536]'``, detector coordinates
    of a windowed read-out beyond the array) is ignored whole, with one warning naming
    what was found and why; it is never half-applied.
    """

    ny, nx = shape
    problems = []
    found: dict[str, str | None] = {}
    for key in SECTION_KEYS:
        value = header_value(header, (key,))
        found[key] = None
        if value is None:
            continue
        text = str(value).strip()
        try:
            section = parse_section(text)
        except InputError as exc:
            hint = ("0-based pixel numbers? FITS sections start at 1" if "start at 1" in str(exc)
                    else "written in another convention?")
            problems.append(f"{key} {text!r} is not a FITS section [x1:x2,y1:y2] of this {nx}x{ny}"
                            f" image ({hint}): ignored")
            continue
        try:
            section.resolve(shape)
        except InputError:
            problems.append(f"{key} {text!r} reaches beyond this {nx}x{ny} image (detector"
                            " coordinates of a windowed read-out, or another convention?): ignored")
            continue
        found[key] = text
    trim = found["TRIMSEC"] or found["DATASEC"]
    return found["BIASSEC"], trim, problems


# -- the detector: gain, read noise, saturation ---------------------------------------------------
@dataclass(frozen=True)
class Detector:
    """What the calibration of one frame knows of its detector, and where each value came from."""

    gain: float | None                # e-/ADU
    gain_source: str
    read_noise: float | None          # ADU
    saturation: float | None          # raw ADU


def resolve_detector(header: Any, *, gain: float | None = None, read_noise: float | None = None,
                     saturation: float | None = None, frame_saturation: float | None = None,
                     measured_gain: float | None = None, measured_gain_source: str = "",
                     bias_read_noise: float | None = None, shift: int) -> Detector:
    """The one rule for a frame's gain, read noise and saturation.

    Gain: the option, else a header that states it in e-/ADU (:func:`header_gain`; a camera's
    GAIN *setting* never counts), else the photon-transfer gain measured on the flats. Read
    noise (ADU): the option or RDNOISE (e-) divided by that gain, else the one measured on
    the biases (or, on a night without biases, the noise of the dark's members). Saturation: the
    option, else the frame's own keyword as the scan judged it (placeholders ignored), else the
    ADC maximum of its integer type, less the low bits a shifted ADC never sets (65532 for
    14-bit data stored in 16 bits). ``shift`` (:func:`adc_shift` of the frame's data, 0 where
    it is not shifted) is required: an EGAIN at the ADC's depth is divided by ``2**shift``.
    """
    if gain:
        g, source = float(gain), "option"
    else:
        g, source = header_gain(header, shift=shift)
        if g is None and measured_gain:
            g, source = float(measured_gain), measured_gain_source
    rn_e = read_noise or header_read_noise(header)
    rn = rn_e / g if (rn_e and g) else bias_read_noise
    sat = saturation if saturation is not None else frame_saturation
    if sat is None:
        sat = adc_maximum(header)
        if sat is not None and shift:
            sat -= 2**shift - 1
    return Detector(gain=g, gain_source=source, read_noise=None if rn is None else float(rn), saturation=sat)


def adc_maximum(header: Any) -> float | None:
    """The largest raw value an integer image can hold (65535 for unsigned 16-bit): saturated there."""
    bitpix = header.get("BITPIX") if header is not None else None
    if bitpix not in (8, 16, 32) or float(header.get("BSCALE", 1.0)) != 1.0:
        return None
    bzero = float(header.get("BZERO", 0.0))
    return float(2 ** (bitpix - 1) - 1 + bzero) if bitpix != 8 else 255.0 + bzero


def _mjd_keyword(header: Any) -> float | None:
    """MJD-OBS (or MJD_OBS) when it is a number, else None."""
    mjd = header_value(header, ("MJD-OBS", "MJD_OBS"))
    if isinstance(mjd, (int, float)) and not isinstance(mjd, bool):
        return float(mjd)
    return None


def _date_obs_mjd(header: Any) -> float | None:
    """DATE-OBS (or DATE_OBS, ISO 8601 UTC with any number of decimals, a space allowed before the
    time, or a date with the time in TIME-OBS/UT) as MJD, or None. DATE-LOC (local time) never counts."""
    date = _joined_date(header, ("DATE-OBS", "DATE_OBS"))
    return None if date is None else utc_mjd(date)


def start_mjd(header: Any) -> float | None:
    """The start of the exposure as MJD: MJD-OBS, else DATE-OBS; None when neither can be read."""
    mjd = _mjd_keyword(header)
    return mjd if mjd is not None else _date_obs_mjd(header)


def time_keywords(header: Any) -> None:
    """MJD-OBS from DATE-OBS when missing, and MJD-AVG/DATE-AVG (mid-exposure) of a light."""
    mjd = _mjd_keyword(header)
    if mjd is None:
        mjd = _date_obs_mjd(header)
        if mjd is None:
            return
        header["MJD-OBS"] = (mjd, "[d] start of exposure, from DATE-OBS")
    exptime = exposure_of(header)
    if exptime is not None and "MJD-AVG" not in header:
        mid = float(mjd) + exptime / 86400.0 / 2.0
        header["MJD-AVG"] = (mid, "[d] mid-exposure")
        header["DATE-AVG"] = (_isot(mid), "mid-exposure (UTC)")


# -- headers ccdcal writes ------------------------------------------------------------------------
def _frame_name(frame: Any, index: int) -> str:
    import os

    path = getattr(frame, "path", frame)
    if isinstance(path, (str, os.PathLike)):
        return os.path.basename(os.fspath(path))
    return f"array {index}"


def combined_header(headers: Sequence[Any], *, method: str, scales: np.ndarray, frames: Sequence[Any],
                    zeros: np.ndarray | None = None, names: Sequence[str] | None = None) -> Any:
    """Header of a combined frame.

    The first input's cards (storage keywords removed), plus NCOMBINE, COMBMETH, the
    members (IMCMBnnn) with their scale factors (SCALnnnn) and zero offsets (ZEROnnnn,
    when any is non-zero) for the first 999 members, and the time keywords of the
    result: EXPTIME is the members' mean for mean/median and their total for sum (removed
    when a member lacks it). For mean/median, MJD-OBS/DATE-OBS is the mean of the members'
    starts (so MJD-OBS + EXPTIME/2 is their mean mid-exposure); for sum it is the
    earliest start, with MJD-END the latest end. MJD-AVG/DATE-AVG is the mean
    mid-exposure time (exposure-weighted for sum).
    """

    from astropy.io import fits

    first = next((h for h in headers if h is not None), None)
    out = fits.Header(clean_header(first))
    n = len(headers)
    if names is None:
        names = [_frame_name(frame, i) for i, frame in enumerate(frames)]
    out["NCOMBINE"] = (n, "number of frames combined")
    out["COMBMETH"] = (method, "ccdcal combine method")

    known = [e for e in (exposure_of(h) for h in headers) if e is not None]
    exptime = None
    if n and len(known) == n:
        exptime = float(np.sum(known)) if method == "sum" else float(np.mean(known))
        out["EXPTIME"] = (exptime, "[s] exposure of the combined frame")
    else:
        for key in ("EXPTIME", "EXPOSURE"):
            if key in out:
                del out[key]

    starts = [mjd for mjd in map(start_mjd, headers) if mjd is not None]
    if n and len(starts) == n:
        durations = np.array(known if len(known) == n else [0.0] * n) / 86400.0
        begin = np.array(starts)
        mids = begin + durations / 2
        if method == "sum":
            start = float(begin.min())
            out["MJD-OBS"] = (start, "[d] start of the earliest member")
            out["MJD-END"] = (float((begin + durations).max()), "[d] end of the latest member")
            total = durations.sum()
            avg = float(np.sum(mids * durations) / total) if total > 0 else float(mids.mean())
        else:
            start = float(begin.mean())
            out["MJD-OBS"] = (start, "[d] mean of the members' starts")
            avg = float(mids.mean())
        out["DATE-OBS"] = (_isot(start), "start, as MJD-OBS")
        out["MJD-AVG"] = (avg, "[d] mean mid-exposure time of the members")
        out["DATE-AVG"] = (_isot(avg), "mean mid-exposure time")

    zeros = np.zeros(n) if zeros is None else np.asarray(zeros)
    any_zero = bool(np.any(zeros != 0))
    for i in range(min(n, 999)):
        out[f"IMCMB{i + 1:03d}"] = (str(names[i])[-68:], "combined input")
        out[f"SCAL{i + 1:04d}"] = (float(scales[i]), "scale factor of input")
        if any_zero:
            out[f"ZERO{i + 1:04d}"] = (float(zeros[i]), "zero offset of input")
    if n > 999:
        out["COMMENT"] = f"members beyond the 999th ({n - 999}) are not listed"
    return out


def _stack_time_keywords(out: Any, headers: Sequence[Any], weights: np.ndarray) -> None:
    """EXPTIME (total), EXPMEAN, MJD-OBS/DATE-OBS (first start), MJD-END/DATE-END (last end) and
    MJD-MID = MJD-AVG / DATE-AVG: the mid-exposure times averaged with the stack's weights (the
    epoch of the weighted mean). Keywords that cannot be computed for every frame are removed,
    as the reference's own would describe it alone."""
    n = len(headers)
    exposures = [exposure_of(h) for h in headers]
    starts = [start_mjd(h) for h in headers]
    known = all(e is not None for e in exposures)
    if known:
        out["EXPTIME"] = (float(np.sum(exposures)), "[s] total exposure of the stacked frames")
        if "EXPOSURE" in out:     # a synonym (N.I.N.A., SGP): the same total, never one frame's
            out["EXPOSURE"] = (float(np.sum(exposures)), "[s] total exposure of the stacked frames")
        out["EXPMEAN"] = (float(np.mean(exposures)), "[s] mean exposure of the frames")
    else:
        for key in ("EXPTIME", "EXPOSURE", "EXPMEAN"):
            out.remove(key, ignore_missing=True, remove_all=True)
    if not all(s is not None for s in starts):
        for key in ("MJD-OBS", "DATE-OBS", "MJD-AVG", "DATE-AVG", "MJD-MID", "MJD-END", "DATE-END"):
            out.remove(key, ignore_missing=True, remove_all=True)
        return
    begin = np.array(starts, np.float64)
    end = begin + (np.array(exposures, np.float64) / 86400.0 if known else np.zeros(n))
    mid = float(np.sum(weights * (begin + end) / 2.0) / np.sum(weights))
    out["MJD-OBS"] = (float(begin.min()), "[d] start of the earliest frame")
    out["DATE-OBS"] = (_isot(float(begin.min())), "start of the earliest frame (UTC)")
    out["MJD-END"] = (float(end.max()), "[d] end of the latest frame")
    out["DATE-END"] = (_isot(float(end.max())), "end of the latest frame (UTC)")
    out["MJD-MID"] = (mid, "[d] weighted mean mid-exposure of the frames")
    out["MJD-AVG"] = (mid, "[d] weighted mean mid-exposure of the frames")
    out["DATE-AVG"] = (_isot(mid), "weighted mean mid-exposure (UTC)")


def _celestial_wcs(out: Any, header: Any) -> None:
    """The reference's celestial WCS, as astropy writes it (SIP kept), when it has one."""
    if header is None or not any(str(key).startswith("CTYPE") for key in header):
        return
    import warnings

    from astropy.wcs import WCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            wcs = WCS(header)
        except (ValueError, KeyError, MemoryError, TypeError):
            return
        if wcs.has_celestial:
            out.update(wcs.to_header(relax=True))


def stack_header(headers: Sequence[Any], names: Sequence[str], *, reference: int, scales: np.ndarray,
                 zeros: np.ndarray, weights: np.ndarray, how: str = "") -> Any:
    """Header of a stack (:func:`ccdcal.stacking.engine.stack`).

    The reference's cards (storage keywords removed) and its celestial WCS, NCOMBINE, COMBMETH,
    the frames (IMCMBnnn) with their scale (SCALnnn), zero (ZEROnnn) and weight (WGHTnnn), the
    reference's name (STACKREF), ``how`` as a HISTORY line, and the times: EXPTIME (total),
    EXPMEAN, MJD-OBS/DATE-OBS (the earliest start), MJD-END/DATE-END (the latest end) and
    MJD-MID = MJD-AVG / DATE-AVG (the mid-exposures averaged with ``weights``); a time that
    cannot be computed for every frame is removed. 999 frames at most are listed.
    """

    out = clean_header(headers[reference])
    _celestial_wcs(out, headers[reference])
    n = len(headers)
    out["NCOMBINE"] = (n, "number of frames stacked")
    out["COMBMETH"] = ("stack", "ccdcal stack: resampled, matched, weighted mean")
    out["STACKREF"] = (str(names[reference])[-68:], "reference frame of the grid")
    _stack_time_keywords(out, headers, weights)
    for i in range(min(n, 999)):
        out[f"IMCMB{i + 1:03d}"] = (str(names[i])[-68:], "stacked frame")
        out[f"SCAL{i + 1:03d}"] = (float(scales[i]), "scale factor of the frame")
        out[f"ZERO{i + 1:03d}"] = (float(zeros[i]), "zero offset of the frame")
        out[f"WGHT{i + 1:03d}"] = (float(weights[i]), "weight of the frame")
    if n > 999:
        out["COMMENT"] = f"frames beyond the 999th ({n - 999}) are not listed"
    if how:
        out["HISTORY"] = f"ccdcal stack: {how}"
    return out


MASTER_TYPES = {"bias": "MASTER BIAS", "dark": "MASTER DARK", "flat": "MASTER FLAT"}


def rejection_keywords(member_rejected: np.ndarray | None, npix: int) -> dict[str, Any]:
    """NREJLO/NREJHI and, per member (up to 999), REJLnnn/REJHnnn: values rejected low/high."""
    if member_rejected is None:
        return {}
    out: dict[str, Any] = {
        "NREJLO": (int(member_rejected[:, 0].sum()), "values rejected below the centre, all members"),
        "NREJHI": (int(member_rejected[:, 1].sum()), "values rejected above the centre, all members"),
    }
    if len(member_rejected) <= 999:
        for i, (lo, hi) in enumerate(member_rejected, start=1):
            out[f"REJL{i:03d}"] = (int(lo), f"values of IMCMB{i:03d} rejected low ({lo / npix:.3%})")
            out[f"REJH{i:03d}"] = (int(hi), f"values of IMCMB{i:03d} rejected high ({hi / npix:.3%})")
    return out


def master_cards(kind: str, *, member_rejected: np.ndarray | None, npix: int, flat_level: float | None = None,
                 flat_norm: str = "median", flat_floor: float = 0.1, n_hot: int | None = None,
                 hot_sigma: float = 5.0, n_nodata: int = 0, gain_measured: float | None = None,
                 read_noise_measured: float | None = None, detector_gain: float | None = None,
                 detector_gain_source: str | None = None, dark_noise: float | None = None,
                 cfa_levels: Sequence[float] = (), overscan_levels: Sequence[float] = (),
                 history: Sequence[str] = ()) -> dict[str, Any]:
    """Every card a master carries beyond the combine's and :func:`master_header`'s own, in the
    order they are written: values rejected, the flat's level and floor, hot pixels, pixels
    without data, the measured gain and read noise, the members' overscan level, HISTORY.

    ``kind`` is "bias", "dark" or "flat"; ``read_noise_measured`` in ADU (a bias's), converted
    to e- with ``detector_gain`` where that is known; ``history`` lines are added last.
    """
    cards: dict[str, Any] = dict(rejection_keywords(member_rejected, npix))
    if kind == "flat":
        cards["FLATNORM"] = (flat_level, f"[adu] level the flat was divided by ({flat_norm})")
        cards["FLATFLOR"] = (flat_floor, "flat pixels below this are masked")
        if cfa_levels:
            cards["FLATCFA"] = ("channel", "each CFA colour normalised to 1 (2x2 cells below)")
            for i, value in enumerate(cfa_levels, 1):
                cards[f"FLATCFA{i}"] = (round(float(value), 6), f"level of CFA cell {i} (row-major 2x2)")
    if kind == "dark":
        cards["NHOTPIX"] = (n_hot, f"hot pixels (> {hot_sigma:g} sigma), MASK bit 2")
    cards["NNODATA"] = (n_nodata, "pixels without a valid value, MASK bit 32")
    if gain_measured is not None:
        cards["GAINMEAS"] = (round(gain_measured, 4), "[e-/adu] photon-transfer gain, 2 member flats")
    if kind == "bias" and read_noise_measured is not None:
        rn = read_noise_measured
        cards["RDNADU"] = (round(rn, 4), "[adu] read noise, from two member biases")
        if detector_gain is not None:
            cards["RDNOISE"] = (round(rn * detector_gain, 4),
                                f"[e-] read noise (gain {detector_gain:g} from {detector_gain_source})")
    if kind == "dark" and dark_noise is not None:
        cards["DARKNOIS"] = (round(dark_noise, 4), "[adu] pixel noise of a member, read noise of its lights")
    if overscan_levels:
        cards["OVSCMEAN"] = (float(np.mean(overscan_levels)), "[adu] mean overscan level of the members")
    cards["HISTORY"] = list(history)
    return cards


def master_header(combined: Any, *, kind: str, title: str, n_members: int, steps: list[str], settings: str,
                  exptime: float | None = None, filter_name: str | None = None,
                  extra: dict[str, Any] | None = None) -> Any:
    """The header of a master frame, from the combine's header (members, scales, epochs).

    ``kind`` is "bias", "dark" or "flat"; ``steps`` what was done to each member; ``extra``
    keywords (``HISTORY``: a list of lines) are added last.
    """

    header = combined.copy()
    header["IMAGETYP"] = (MASTER_TYPES[kind], "ccdcal master frame")
    if kind == "bias":
        header["EXPTIME"] = (0.0, "[s] bias frames have no exposure")
    if kind == "dark" and exptime is not None:
        header["EXPTIME"] = (exptime, "[s] exposure of every member dark")
        header["DARKTIME"] = (exptime, "[s] dark time of the master")
    if kind == "flat" and filter_name:
        header["FILTER"] = (filter_name, "filter of the member flats")
    if "MJD-AVG" in header:
        # The epoch of a master is the members' mean mid-exposure.
        header["MJD-OBS"] = (header["MJD-AVG"], "[d] mean mid-exposure of the members")
        header["DATE-OBS"] = (header.get("DATE-AVG", ""), "mean mid-exposure of the members (UTC)")
    header["BUNIT"] = "adu" if kind != "flat" else "adu/adu"
    for key in ("BIASSEC", "TRIMSEC", "DATASEC", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True, remove_all=True)
    header["HISTORY"] = _ascii(f"ccdcal {__version__}: {title} from {n_members} frames")
    for step in steps:
        header["HISTORY"] = _ascii(f"each member: {step}")
    header["HISTORY"] = f"combined: {settings}"
    for key, value in (extra or {}).items():
        if key == "HISTORY":
            for line in value:
                header["HISTORY"] = _ascii(line)
        else:
            header[key] = value
    return header


def light_header(raw_header: Any, result: CalibratedFrame, *, trim: Any = None, uncorrected: str | None = None,
                 bias: Master | None = None, dark: Master | None = None, flat: Master | None = None,
                 flat_floor: float = 0.1, gain_source: str | None = None, bayer: str | None = None) -> Any:
    """The header of a calibrated light: the raw header without its storage and section
    keywords, coordinates shifted for the trim (IRAF LTV), mid-exposure time, and every step
    (:func:`write_calibration_keywords`). A colour frame (``bayer``: its pattern at the raw
    array's pixel (0, 0)) gets the pattern of the trimmed image, stated TOP-DOWN without offsets
    (:func:`bayer_cards`): a trim by an odd number of pixels changes it."""
    import time

    header = clean_header(raw_header)
    if trim is not None:
        # Keep world and physical coordinates right after trimming (IRAF LTV convention).
        dx, dy = trim.x1 - 1, trim.y1 - 1
        for axis, shift in (("1", dx), ("2", dy)):
            if shift and f"CRPIX{axis}" in header:
                header[f"CRPIX{axis}"] = header[f"CRPIX{axis}"] - shift
            header[f"LTV{axis}"] = (float(header.get(f"LTV{axis}", 0.0)) - shift, "offset of trimmed image")
    for key in ("BIASSEC", "TRIMSEC", "DATASEC"):
        header.remove(key, ignore_missing=True, remove_all=True)
    if bayer:
        for key, value in bayer_cards(trimmed_pattern(bayer, trim)).items():
            header[key] = value
    time_keywords(header)
    cards = CardPlan(header)
    cards["BUNIT"] = "adu"
    cards["HISTORY"] = f"ccdcal {__version__}: calibrated {time.strftime('%Y-%m-%dT%H:%M:%S')}"
    if uncorrected:
        cards["UNCORR"] = (True, "pedestal NOT removed (--allow-uncorrected)")
        cards["HISTORY"] = _ascii(f"WARNING: {uncorrected}; the pedestal stays in")
    write_calibration_keywords(cards, result, bias=bias, dark=dark, flat=flat, flat_floor=flat_floor,
                         gain_source=gain_source)
    if dark is not None and result.dark_scale is not None:
        cards["CALDARKT"] = (dark.exptime, "[s] exposure of the master dark applied")
    # cleaned and fitted: written as it is (write_fits(cleaned=True))
    return refit_comments(*cards.apply())
