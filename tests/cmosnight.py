"""A cooled-CMOS night as capture programs write it, with its truth and a plain reduction.

Independent of ccdcal (numpy and astropy only), for the CMOS tests (issue 27): a 14-bit ADC
whose data are stored left-shifted to 16 bits (every value a multiple of 4), a black level set
by the OFFSET register, GAIN and OFFSET written as camera settings, EGAIN at the native depth,
a dark current clamped on chip (the mean does not grow with time) with hot pixels that grow
linearly and an amp-glow corner that grows as t**1.5, cosmic rays in darks and lights,
temperature jitter around the set point, dark flats at the flats' exposure and no biases.

The same night is written in any of the capture programs' dialects (:data:`DIALECTS`), so a
test can check that every dialect gives one inventory and one plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

SHIFT = 2                         # 14-bit ADC, stored as 16 bits
NATIVE_EGAIN = 1.0                # e-/ADU at the native 14 bits (what EGAIN says)
STORED_GAIN = NATIVE_EGAIN / 2**SHIFT   # e-/ADU of the stored 16-bit values
READ_NOISE = 1.6                  # e-
BLACK = 800.0                     # stored ADU of the black level (OFFSET register 50)
GAIN_SETTING, OFFSET_SETTING = 100, 50


@dataclass
class CmosNight:
    """The truth of a written night (electrons per second unless said)."""

    shape: tuple[int, int]
    flat: np.ndarray                      # relative response, mean 1
    sky: float                            # e-/s per pixel in the lights
    hot: np.ndarray                       # e-/s of the hot pixels (0 elsewhere)
    glow: np.ndarray                      # e- at 1 s of the glow; grows as t**1.5
    light_exptime: float = 120.0
    flat_exptime: float = 2.0
    files: dict[str, list[Path]] = field(default_factory=dict)   # kind -> paths


def _truth(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r2 = ((yy - ny / 2) / ny) ** 2 + ((xx - nx / 2) / nx) ** 2
    flat = (1.0 - 0.6 * r2) * rng.normal(1.0, 0.01, shape)          # vignetting and pixel response
    flat /= flat.mean()
    hot = np.zeros(shape)
    idx = rng.choice(ny * nx, max(4, ny * nx // 2000), replace=False)
    hot.flat[idx] = rng.uniform(2.0, 20.0, idx.size)               # e-/s
    # amp glow: a corner 1/4 of the frame wide, falling off over ~12 % of the width
    dist = np.hypot(yy - (ny - 1), xx - (nx - 1)) / max(ny, nx)
    glow = 0.25 * np.exp(-dist / 0.12)                              # e- at t = 1 s (×t**1.5)
    return flat, hot, glow


def _cosmics(rng: np.random.Generator, shape: tuple[int, int], exptime: float) -> np.ndarray:
    hits = np.zeros(shape)
    n = rng.poisson(2 + exptime / 20.0)
    ys, xs = rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)
    hits[ys, xs] = rng.uniform(500.0, 5000.0, n)
    return hits


def _raw(rng: np.random.Generator, electrons: np.ndarray) -> np.ndarray:
    """Electrons -> stored 16-bit ADU: shot and read noise, the black level, 14-bit quantisation,
    left-shifted, clipped at the shifted maximum."""
    signal = rng.poisson(np.clip(electrons, 0, None)) + rng.normal(0.0, READ_NOISE, electrons.shape)
    native = np.round(signal / NATIVE_EGAIN + BLACK / 2**SHIFT)
    native = np.clip(native, 0, 2**(16 - SHIFT) - 1)
    return (native * 2**SHIFT).astype(np.uint16)


#: Capture programs: how each writes the frame type, the exposure, the settings and its name.
DIALECTS = ("nina3", "nina2", "ekos", "sgp", "apt", "asiair", "sharpcap", "qhy")


def _cards(dialect: str, kind: str, exptime: float, temp: float, filt: str | None) -> list[tuple]:
    """The header cards ``dialect`` writes for a frame of ``kind`` (light, dark, flat, darkflat)."""
    typ = {"light": "LIGHT", "dark": "DARK", "flat": "FLAT", "darkflat": "DARK"}[kind]
    cards: list[tuple] = []
    if dialect == "nina3":
        cards += [("IMAGETYP", typ), ("EXPOSURE", exptime), ("EXPTIME", exptime), ("SWCREATE", "N.I.N.A. 3.1")]
    elif dialect == "nina2":
        cards += [("IMAGETYP", "DARKFLAT" if kind == "darkflat" else typ), ("EXPOSURE", exptime),
                  ("EXPTIME", exptime), ("SWCREATE", "N.I.N.A. 2.3")]
    elif dialect == "ekos":
        frame = typ.capitalize()
        cards += [("IMAGETYP", f"{frame} Frame"), ("FRAME", frame), ("EXPTIME", exptime)]
    elif dialect == "sgp":
        cards += [("IMAGETYP", f"{typ:<8}"), ("EXPOSURE", exptime),
                  ("CREATOR", "Sequence Generator Pro v3.1.0.479")]
    elif dialect == "apt":
        cards += [("IMAGETYP", {"LIGHT": "Light Frame", "DARK": "Dark Frame", "FLAT": "Flat Field"}[typ]),
                  ("EXPTIME", exptime), ("SWCREATE", "Astro Photography Tool - APT v.3.54")]
    elif dialect == "asiair":
        cards += [("EXPTIME", exptime), ("EXPOSURE", exptime), ("CREATOR", "ZWO ASIAIR Plus")]
    elif dialect == "sharpcap":
        cards += [("EXPTIME", exptime), ("SWCREATE", "SharpCap v4.1.12946.0")]
    elif dialect == "qhy":
        cards += [("FRAMETYP", typ.capitalize()), ("EXPTIME", exptime), ("BLKLEVEL", OFFSET_SETTING)]
    else:
        raise ValueError(dialect)
    cards += [("GAIN", float(GAIN_SETTING) if dialect == "ekos" else GAIN_SETTING, "Sensor gain")]
    if dialect != "qhy":
        cards += [("OFFSET", OFFSET_SETTING, "Sensor gain offset")]
    cards += [("EGAIN", NATIVE_EGAIN, "Electrons per A/D unit"), ("CCD-TEMP", temp, "[C] sensor temperature"),
              ("XBINNING", 1), ("YBINNING", 1), ("INSTRUME", "ZWO ASI2600MM Pro"), ("ROWORDER", "TOP-DOWN")]
    if dialect not in ("ekos",):
        cards += [("SET-TEMP", -10.0)]
    if filt is not None and kind in ("light", "flat", "darkflat"):
        cards += [("FILTER", filt)]
    if kind == "light":
        cards += [("OBJECT", "NGC 7000")]
    return cards


def _name(dialect: str, kind: str, exptime: float, filt: str | None, i: int) -> str:
    """The file's path below the night's folder, as ``dialect`` names it."""
    label = {"light": "Light", "dark": "Dark", "flat": "Flat", "darkflat": "DarkFlat"}[kind]
    f = filt or "L"
    if dialect == "ekos":
        return f"NGC7000/{label}/{f}/NGC7000_{label}_{f}_{exptime:g}_secs_{i:03d}.fits"
    if dialect in ("asiair", "sharpcap"):
        stem = {"darkflat": "Dark"}.get(kind, label)       # dark flats are darks at the flats' exposure
        exp = f"{exptime * 1000:.1f}ms" if exptime < 1 else f"{exptime:.1f}s"
        return f"{label}/{stem}_{exp}_Bin1_2600MM_gain{GAIN_SETTING}_{i:04d}.fit"
    folder = "DARKFLAT" if (dialect == "nina2" and kind == "darkflat") else label.upper()
    return f"{folder}/2024-08-01_{kind}_{f}_{exptime:g}s_{i:04d}.fits"


def write_night(root: Path, *, dialect: str = "nina3", seed: int = 5, shape: tuple[int, int] = (96, 128),
                n_dark: int = 7, n_flat: int = 7, n_light: int = 4, filt: str | None = "Ha") -> CmosNight:
    """Write a CMOS night below ``root`` in ``dialect``; return its truth.

    Lights and darks of 120 s, flats and dark flats of 2 s, no biases. Temperatures jitter by
    0.2 °C around the set point of −10 °C.
    """
    rng = np.random.default_rng(seed)
    flat, hot, glow = _truth(np.random.default_rng(1000 + seed), shape)
    night = CmosNight(shape=shape, flat=flat, sky=3.0, hot=hot, glow=glow)
    counts = {"dark": n_dark, "darkflat": n_flat, "flat": n_flat, "light": n_light}
    for kind, n in counts.items():
        exptime = night.flat_exptime if kind in ("flat", "darkflat") else night.light_exptime
        for i in range(1, n + 1):
            dark = hot * exptime + glow * exptime**1.5 + _cosmics(rng, shape, exptime)
            if kind == "flat":
                electrons = dark + flat * rng.uniform(18000.0, 24000.0) / 4   # a quarter of full well
            elif kind == "light":
                electrons = dark + flat * night.sky * exptime
            else:
                electrons = dark
            temp = round(-10.0 + rng.normal(0.0, 0.2), 1)
            path = root / _name(dialect, kind, exptime, filt, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            header = fits.Header()
            for card in _cards(dialect, kind, exptime, temp, filt):
                header[card[0]] = card[1:] if len(card) > 2 else card[1]
            fits.PrimaryHDU(_raw(rng, electrons), header=header).writeto(path, overwrite=True)
            night.files.setdefault(kind, []).append(path)
    return night


def plain_reduction(night: CmosNight) -> list[np.ndarray]:
    """The lights as a careful user reduces them with numpy: median master dark (bias left in)
    subtracted, flats minus the median dark flat, each normalised by its median and
    median-combined; no bias, no scaling. In stored ADU."""
    def stack(paths: list[Path]) -> np.ndarray:
        return np.median([fits.getdata(p).astype(np.float64) for p in paths], axis=0)

    dark, dark_flat = stack(night.files["dark"]), stack(night.files["darkflat"])
    flats = [fits.getdata(p).astype(np.float64) - dark_flat for p in night.files["flat"]]
    flat = np.median([f / np.median(f) for f in flats], axis=0)
    return [(fits.getdata(p).astype(np.float64) - dark) / flat for p in night.files["light"]]
