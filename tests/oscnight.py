"""A one-shot-colour (Bayer) night with its truth, independent of ccdcal (numpy and astropy only).

Stars of known colours (R/G and B/G per star), a sky of known colour, a flat panel with its own
tint (R:G:B = 0.5 : 1 : 0.7 of the light that reaches the sensor), vignetting and a dust donut,
dithered lights (whole and sub-pixel shifts), bias frames, read and shot noise. The sensor has
the same quantum efficiency in every colour, so a star's colour in a stack whose flat was
normalised per CFA colour is its true colour; a single-level flat gives it the panel's tint
inverted (R x2, B x1/0.7).

The camera's pattern is ``pattern`` at its first read-out row; frames are written TOP-DOWN, or
BOTTOM-UP (rows stored last read-out row first, as some capture programs write them; the truth's
star positions are then those of the stored arrays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.special import erf

GAIN, READ_NOISE, BIAS = 1.0, 4.0, 500.0            # e-/ADU, e-, ADU
PANEL_TINT = {"R": 0.5, "G": 1.0, "B": 0.7}
SKY = {"R": 40.0, "G": 60.0, "B": 50.0}              # e- per pixel per light
FWHM = 3.2


@dataclass
class OscNight:
    shape: tuple[int, int]
    pattern: str
    stars: np.ndarray                     # (n, 5): x, y (reference grid = light 0), G flux, R/G, B/G
    shifts: list[tuple[float, float]]     # per light: (dx, dy) of the sky on the sensor
    files: dict[str, list[Path]] = field(default_factory=dict)


def _colour_of(pattern: str, shape: tuple[int, int]) -> np.ndarray:
    """The letter index (0 R, 1 G, 2 B) of every pixel of a frame whose pixel (0, 0) is ``pattern[0]``."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    cells = np.array([["RGB".index(pattern[0]), "RGB".index(pattern[1])],
                      ["RGB".index(pattern[2]), "RGB".index(pattern[3])]])
    return cells[yy % 2, xx % 2]


def _stars_image(shape: tuple[int, int], xy: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Gaussian stars integrated over each pixel (analytic), summed."""
    ny, nx = shape
    sigma = FWHM / (2 * math.sqrt(2 * math.log(2)))
    image = np.zeros(shape)
    for (x, y), f in zip(xy, flux, strict=True):
        x0, x1 = max(0, int(x) - 8), min(nx, int(x) + 9)
        y0, y1 = max(0, int(y) - 8), min(ny, int(y) + 9)
        ex = np.arange(x0, x1 + 1) - 0.5 - x
        ey = np.arange(y0, y1 + 1) - 0.5 - y
        px = np.diff(0.5 * (1 + erf(ex / (sigma * math.sqrt(2)))))
        py = np.diff(0.5 * (1 + erf(ey / (sigma * math.sqrt(2)))))
        image[y0:y1, x0:x1] += f * np.outer(py, px)
    return image


def _vignetting(shape: tuple[int, int]) -> np.ndarray:
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    r2 = ((yy - ny / 2) / ny) ** 2 + ((xx - nx / 2) / nx) ** 2
    v = 1.0 - 0.8 * r2
    dust = np.hypot(yy - 0.3 * ny, xx - 0.7 * nx)
    v *= 1.0 - 0.12 * ((dust > 5) & (dust < 11))                  # a dust donut
    return v


def write_night(root: Path, *, pattern: str = "RGGB", shape: tuple[int, int] = (160, 200), seed: int = 3,
                n_bias: int = 5, n_flat: int = 5, n_light: int = 6, n_stars: int = 30,
                bottom_up: bool = False) -> OscNight:
    """Biases, flats (a tinted panel) and dithered lights of one field, below ``root``."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    stars = []
    while len(stars) < n_stars:
        x, y = rng.uniform(14, nx - 14), rng.uniform(14, ny - 14)
        if all(math.hypot(x - a, y - b) > 14 for a, b, *_ in stars):
            stars.append((x, y, math.exp(rng.uniform(math.log(4e3), math.log(3e4))),
                          rng.uniform(0.5, 1.6), rng.uniform(0.4, 1.4)))
    night = OscNight(shape=shape, pattern=pattern, stars=np.array(stars), shifts=[])
    colour = _colour_of(pattern, shape)
    vignetting = _vignetting(shape)
    header = [("BAYERPAT", pattern), ("ROWORDER", "BOTTOM-UP" if bottom_up else "TOP-DOWN"), ("XBAYROFF", 0),
              ("YBAYROFF", 0),
              ("INSTRUME", "ZWO ASI2600MC Pro"), ("GAIN", 100, "Sensor gain"), ("SWCREATE", "N.I.N.A. 3.1")]

    def write(kind: str, i: int, electrons: np.ndarray, exptime: float, extra: list) -> None:
        data = rng.poisson(np.clip(electrons, 0, None)) / GAIN + BIAS + rng.normal(0, READ_NOISE / GAIN, shape)
        path = root / f"{kind}_{i:03d}.fits"
        path.parent.mkdir(parents=True, exist_ok=True)
        h = fits.Header([("IMAGETYP", kind.upper()), ("EXPTIME", exptime), *header, *extra])
        stored = np.clip(np.round(data), 0, 65535).astype(np.uint16)
        fits.PrimaryHDU(stored[::-1] if bottom_up else stored, h).writeto(path)
        night.files.setdefault(kind, []).append(path)

    for i in range(n_bias):
        write("bias", i, np.zeros(shape), 0.0, [])
    panel = np.choose(colour, [PANEL_TINT[c] for c in "RGB"])
    for i in range(n_flat):
        write("flat", i, 20000.0 * panel * vignetting * rng.uniform(0.9, 1.1), 2.0, [("FILTER", "L")])
    for i in range(n_light):
        dx, dy = (0.0, 0.0) if i == 0 else (rng.uniform(-6, 6), rng.uniform(-6, 6))
        night.shifts.append((dx, dy))
        xy = night.stars[:, :2] + [dx, dy]
        green = _stars_image(shape, xy, night.stars[:, 2])
        planes = {"G": green, "R": _stars_image(shape, xy, night.stars[:, 2] * night.stars[:, 3]),
                  "B": _stars_image(shape, xy, night.stars[:, 2] * night.stars[:, 4])}
        light = np.choose(colour, [planes[c] + SKY[c] for c in "RGB"]) * vignetting
        write("light", i, light, 60.0, [("FILTER", "L"), ("OBJECT", "M 13")])
    if bottom_up:      # the truth on the stored arrays: rows reversed
        night.stars[:, 1] = ny - 1 - night.stars[:, 1]
        night.shifts = [(dx, -dy) for dx, dy in night.shifts]
    return night
