"""A synthetic raw night with known truth, written like a real camera would write it.

uint16 FITS (BZERO 32768), MaxIm-DL-style headers, an overscan strip whose level
drifts frame to frame, a bias with a fixed column pattern, dark current with hot
pixels (darks at 60 s and 300 s), twilight flats at 15k–45k ADU with vignetting and
dust donuts in two filters, and lights (90 s: no dark matches) with sky, stars and a
few saturated pixels. Every frame, calibration frames included, has cosmic rays. The
truth is written to ``ROOT/truth``.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io.frames import is_fits_name, read_header
from .io.writer import write_text

GAIN = 1.5            # e-/ADU
READ_NOISE = 4.5      # ADU
BIAS_LEVEL = 1000.0   # ADU, in the overscan
DATA_OFFSET = 12.0    # ADU: the data area sits this much above the overscan
OVERSCAN = 32         # columns
SATURATION = 65535
DARK_TIMES = (60.0, 300.0)
FLAT_FILTERS = ("V", "R")
LIGHT_EXPTIME = 90.0
SKY = 600.0           # ADU in a 90 s light, flat-field corrected


@dataclass(frozen=True)
class Truth:
    """What went into the night, in ADU of the trimmed data area (ny, nx)."""

    bias: np.ndarray        # bias structure above the overscan level
    dark_rate: np.ndarray   # ADU/s
    flats: dict[str, np.ndarray]  # normalised to median 1 over the central half
    hot: np.ndarray         # bool: hot pixels


def _header(kind: str, exptime: float, index: int, filt: str | None, size: int, obj: str | None = None):
    from astropy.io import fits

    h = fits.Header()
    h["IMAGETYP"] = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "light": "Light Frame"}[kind]
    h["EXPTIME"] = (exptime, "[s] exposure duration")
    h["EXPOSURE"] = (exptime, "[s] exposure duration")
    minutes = {"bias": 0, "dark": 20, "flat": 90, "light": 180}[kind] + 2 * index
    # from 19:00 UT on, past midnight into the next day for a long night (not hour 24 and more)
    start = datetime.datetime(2024, 3, 14, 19) + datetime.timedelta(minutes=minutes)
    h["DATE-OBS"] = (start.strftime("%Y-%m-%dT%H:%M:%S.000"), "UT start of exposure")
    h["XBINNING"] = 1
    h["YBINNING"] = 1
    h["CCD-TEMP"] = (-10.0 + 0.1 * np.sin(index), "[C] sensor temperature")
    h["SET-TEMP"] = (-10.0, "[C] cooler set point")
    h["EGAIN"] = (GAIN, "[e-/ADU] electronic gain")
    h["INSTRUME"] = "ccdcal synthetic camera"
    h["TELESCOP"] = "ccdcal demo 0.4m"
    h["SWCREATE"] = "ccdcal demo"
    h["BIASSEC"] = (f"[{size + 1}:{size + OVERSCAN},1:{size}]", "overscan region")
    h["TRIMSEC"] = (f"[1:{size},1:{size}]", "useful data")
    if filt:
        h["FILTER"] = filt
    if obj:
        h["OBJECT"] = obj
    return h


def _truth(rng: np.random.Generator, size: int) -> Truth:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    columns = rng.normal(0.0, 2.0, size)                       # fixed column pattern
    bias = DATA_OFFSET + columns[None, :] + 4.0 * (x / size) + 2.0 * (y / size)
    dark_rate = np.full((size, size), 0.02) + 0.01 * np.exp(-((x - size) ** 2 + y**2) / (0.1 * size) ** 2)
    hot = np.zeros((size, size), dtype=bool)
    n_hot = max(20, size * size // 2000)
    hy, hx = rng.integers(0, size, n_hot), rng.integers(0, size, n_hot)
    hot[hy, hx] = True
    dark_rate[hy, hx] = rng.uniform(0.5, 60.0, n_hot)           # up to 18000 ADU in 300 s
    r2 = ((x - size / 2) ** 2 + (y - size / 2) ** 2) / (size / 2) ** 2
    prnu = rng.normal(1.0, 0.01, (size, size))
    flats = {}
    for i, filt in enumerate(FLAT_FILTERS):
        vignette = 1.0 - 0.22 * r2 - 0.03 * i * (x / size)
        dust = np.ones((size, size))
        for _ in range(4):
            cy, cx = rng.uniform(0.15, 0.85, 2) * size
            radius, width = rng.uniform(0.03, 0.06) * size, 0.012 * size
            ring = np.exp(-((np.hypot(x - cx, y - cy) - radius) ** 2) / (2 * width**2))
            dust *= 1.0 - rng.uniform(0.03, 0.06) * ring
        flat = vignette * dust * prnu
        q = size // 4
        flats[filt] = flat / np.median(flat[q:size - q, q:size - q])
    return Truth(bias=bias, dark_rate=dark_rate, flats=flats, hot=hot)


def _field(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """The night's star field: (n, 3) x, y, peak; the first two saturate."""
    xy = rng.uniform(8, size - 8, (n, 2))
    peaks = np.concatenate([[200000.0, 200000.0], rng.uniform(150, 20000, n - 2)])
    return np.column_stack([xy, peaks])


def _stars(field: np.ndarray, size: int, dx: float, dy: float) -> np.ndarray:
    """The field seen with a pointing offset (dx, dy) px (dithered lights of one target)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    image = np.zeros((size, size))
    sigma = 1.4
    for cx0, cy0, peak in field:
        cx, cy = cx0 + dx, cy0 + dy
        if not (4 <= cx < size - 4 and 4 <= cy < size - 4):
            continue
        box = (slice(max(int(cy) - 10, 0), int(cy) + 11), slice(max(int(cx) - 10, 0), int(cx) + 11))
        image[box] += peak * np.exp(-((x[box] - cx) ** 2 + (y[box] - cy) ** 2) / (2 * sigma**2))
    return image


def _cosmic_rays(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosmic-ray hits of one frame: a mask (short tracks) and their ADU, about one per 10^4 px."""
    cosmic = np.zeros((size, size), dtype=bool)
    for _ in range(max(5, size * size // 10000)):
        cy, cx = rng.integers(2, size - 2, 2)
        length = rng.integers(1, 5)
        cosmic[cy, cx: cx + length] = True
    return cosmic, rng.uniform(300, 3000, cosmic.sum())


def _raw(rng, truth: Truth, electrons_adu: np.ndarray, drift: float, size: int,
         cosmic_rays: bool = True) -> np.ndarray:
    """A raw frame (ny, nx + overscan) in ADU as uint16, from the expected signal in ADU above bias.

    Every calibration frame gets cosmic rays, as real ones do (lights add their own, recorded
    in the truth).
    """
    signal = rng.poisson(np.clip(electrons_adu, 0, None) * GAIN) / GAIN
    if cosmic_rays:
        cosmic, adu = _cosmic_rays(rng, size)
        signal[cosmic] += adu
    frame = np.empty((size, size + OVERSCAN))
    rows = np.arange(size)[:, None]
    level = BIAS_LEVEL + drift + 1.5 * np.sin(rows / size * np.pi)   # overscan level varies along rows
    frame[:, :size] = level + truth.bias + signal
    frame[:, size:] = level
    frame += rng.normal(0.0, READ_NOISE, frame.shape)
    return np.clip(np.round(frame), 0, SATURATION).astype(np.uint16)


def _write(path: Path, data: np.ndarray, header) -> None:
    from astropy.io import fits

    hdu = fits.PrimaryHDU(data=data, header=header)  # uint16 -> BITPIX 16, BZERO 32768
    hdu.writeto(path, overwrite=True)


def _refuse_foreign_frames(raw_dir: Path) -> None:
    """A demo is written over an earlier demo only: a folder that holds anyone else's FITS
    frames (a real night) is refused before anything is written."""
    if not raw_dir.is_dir():
        return
    for path in sorted(raw_dir.iterdir()):
        if not (path.is_file() and is_fits_name(path)):
            continue
        try:
            ours = str(read_header(path).get("SWCREATE", "")) == "ccdcal demo"
        except Exception:  # noqa: BLE001 - unreadable: not a demo frame either
            ours = False
        if not ours:
            raise InputError(f"{path}: the demo would write over frames it did not make; choose an empty"
                             " or new folder for the demo")


def write_night(raw_dir: str | Path, *, seed: int = 2024, size: int = 512, n_bias: int = 9, n_dark: int = 5,
                n_flat: int = 5, n_light: int = 2) -> Path:
    """Write a raw night to ``raw_dir`` and its truth to ``raw_dir/../truth``; return ``raw_dir``.

    Parameters
    ----------
    raw_dir : path-like
        Folder for the raw FITS files (created).
    seed : int
        Random seed: the same seed writes the same night.
    size : int
        Width and height of the data area in pixels (the overscan adds 32 columns).
    n_bias, n_dark, n_flat, n_light : int
        Frames per group: biases; darks per exposure time; flats per filter; lights per filter.
    """
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    raw_dir = Path(raw_dir)
    truth_dir = raw_dir.parent / "truth"
    _refuse_foreign_frames(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    truth = _truth(rng, size)

    # one level drift per frame (1000 at least, so that nights of fewer frames stay as they were)
    frames = max(1000, n_bias + n_dark * len(DARK_TIMES) + (n_flat + n_light) * len(FLAT_FILTERS))
    drifts = iter(rng.normal(0.0, 4.0, frames) + np.linspace(0.0, 10.0, frames))
    for i in range(n_bias):
        _write(raw_dir / f"bias_{i + 1:03d}.fits", _raw(rng, truth, np.zeros((size, size)), next(drifts), size),
               _header("bias", 0.0, i, None, size))
    for t in DARK_TIMES:
        for i in range(n_dark):
            _write(raw_dir / f"dark_{t:03.0f}s_{i + 1:03d}.fits",
                   _raw(rng, truth, truth.dark_rate * t, next(drifts), size), _header("dark", t, i, None, size))
    for filt in FLAT_FILTERS:
        levels = rng.permutation(np.linspace(15000.0, 45000.0, n_flat))
        for i, level in enumerate(levels):
            exptime = round(float(level) / 9000.0, 2)
            expected = truth.flats[filt] * level + truth.dark_rate * exptime
            _write(raw_dir / f"flat_{filt}_{i + 1:03d}.fits", _raw(rng, truth, expected, next(drifts), size),
                   _header("flat", exptime, i, filt, size, obj="twilight flat"))
    signals = {}
    field = _field(rng, size, max(20, round(60 * (size / 512) ** 2)))
    for filt in FLAT_FILTERS:
        for i in range(n_light):
            name = f"m51_{filt}_{i + 1:03d}"
            sky = SKY * (1.0 + 0.1 * i)
            signal = sky + _stars(field, size, *rng.uniform(-4, 4, 2))
            expected = truth.flats[filt] * signal + truth.dark_rate * LIGHT_EXPTIME
            raw = _raw(rng, truth, expected, next(drifts), size, cosmic_rays=False).astype(np.float64)
            cosmic, adu = _cosmic_rays(rng, size)
            raw[:, :size][cosmic] += adu
            saturated = raw[:, :size] >= SATURATION
            raw = np.clip(raw, 0, SATURATION).astype(np.uint16)
            saturated |= raw[:, :size] >= SATURATION
            _write(raw_dir / f"{name}.fits", raw, _header("light", LIGHT_EXPTIME, i, filt, size, obj="M51"))
            signals[name] = (signal, cosmic, saturated)

    def save(name: str, data: np.ndarray) -> None:
        fits.PrimaryHDU(np.asarray(data, dtype=np.float32)).writeto(truth_dir / f"{name}.fits", overwrite=True)

    save("bias", truth.bias)
    save("dark_rate", truth.dark_rate)
    save("hot", truth.hot.astype(np.uint8))
    for filt, flat in truth.flats.items():
        save(f"flat_{filt}", flat)
    for name, (signal, cosmic, saturated) in signals.items():
        save(f"signal_{name}", signal)
        save(f"bad_{name}", (cosmic | saturated).astype(np.uint8))
    write_text(truth_dir / "truth.json", json.dumps({
        "gain": GAIN, "read_noise_adu": READ_NOISE, "bias_level": BIAS_LEVEL, "data_offset": DATA_OFFSET,
        "dark_times": DARK_TIMES, "flat_filters": FLAT_FILTERS, "light_exptime": LIGHT_EXPTIME,
        "sky": SKY, "size": size, "overscan_columns": OVERSCAN, "seed": seed,
        "files": {"bias": "bias above overscan (ADU)", "dark_rate": "ADU/s", "flat_<f>": "normalised flat",
                  "signal_<light>": "expected calibrated light (ADU)", "bad_<light>": "cosmic rays | saturated"},
    }, indent=1))
    return raw_dir
