"""Synthetic star fields for the resampling and stacking tests: Gaussian stars rendered
analytically (pixel-integrated) at catalogue positions seen through a known transform, sky and
Gaussian noise, written as ccdcal calibrated lights (data, UNCERT, MASK)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from astropy.io import fits
from scipy.special import erf

FWHM = 3.0
SIGMA_PSF = FWHM / (2 * math.sqrt(2 * math.log(2)))
READ_NOISE = 5.0  # e-, gain 1 e-/ADU


def catalogue(shape: tuple[int, int], count: int, seed: int, *, margin: int = 12,
              flux: tuple[float, float] = (3e3, 6e4)) -> np.ndarray:
    """(count, 3) x, y, flux of stars in the reference grid, apart from each other."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    stars: list[tuple[float, float, float]] = []
    while len(stars) < count:
        x, y = rng.uniform(margin, nx - margin), rng.uniform(margin, ny - margin)
        if all((x - a) ** 2 + (y - b) ** 2 > 15**2 for a, b, _ in stars):
            stars.append((x, y, math.exp(rng.uniform(math.log(flux[0]), math.log(flux[1])))))
    return np.array(stars)


def shift(dx: float, dy: float) -> np.ndarray:
    """Source → reference: a source pixel (x, y) lands at (x + dx, y + dy)."""
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def rotation(degrees: float, shape: tuple[int, int], dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Source → reference: a rotation by ``degrees`` about the centre of ``shape``, then a shift."""
    ny, nx = shape
    cx, cy = (nx - 1) / 2, (ny - 1) / 2
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, -s, cx - c * cx + s * cy + dx], [s, c, cy - s * cx - c * cy + dy], [0, 0, 1.0]])


def source_positions(stars: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Star positions (x, y) in a frame whose transform to the reference is ``matrix``."""
    inv = np.linalg.inv(matrix)
    p = inv @ np.vstack([stars[:, 0], stars[:, 1], np.ones(len(stars))])
    return (p[:2] / p[2]).T


def render(shape: tuple[int, int], positions: np.ndarray, fluxes: np.ndarray) -> np.ndarray:
    """Pixel-integrated Gaussian stars (FWHM 3 px), float64."""
    ny, nx = shape
    image = np.zeros(shape)
    half = int(math.ceil(6 * SIGMA_PSF))
    root = math.sqrt(2) * SIGMA_PSF
    for (x, y), f in zip(positions, fluxes, strict=True):
        x0, x1 = max(0, int(x) - half), min(nx, int(x) + half + 2)
        y0, y1 = max(0, int(y) - half), min(ny, int(y) + half + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.arange(x0, x1)
        gy = np.arange(y0, y1)
        px = 0.5 * (erf((gx + 0.5 - x) / root) - erf((gx - 0.5 - x) / root))
        py = 0.5 * (erf((gy + 0.5 - y) / root) - erf((gy - 0.5 - y) / root))
        image[y0:y1, x0:x1] += f * np.outer(py, px)
    return image


def observe(shape: tuple[int, int], stars: np.ndarray, matrix: np.ndarray, *, sky: float = 1000.0,
            transparency: float = 1.0, seed: int = 0, noise: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A calibrated frame (data, σ) of the star field through ``matrix``: gain 1, read noise 5 e-."""
    signal = sky + transparency * render(shape, source_positions(stars, matrix), stars[:, 2])
    rng = np.random.default_rng(seed)
    data = signal + (rng.normal(size=shape) * np.sqrt(READ_NOISE**2 + signal) if noise else 0.0)
    sigma = np.sqrt(READ_NOISE**2 + np.maximum(data, 0.0))
    return data.astype(np.float32), sigma.astype(np.float32)


def write_light(path: Path, data: np.ndarray, sigma: np.ndarray | None = None, mask: np.ndarray | None = None,
                *, exptime: float = 60.0, mjd: float = 60000.0, header: fits.Header | None = None) -> Path:
    """Write a calibrated light as ccdcal does: primary float32, UNCERT, MASK (uint8)."""
    header = fits.Header() if header is None else header.copy()
    header["EXPTIME"] = exptime
    header["MJD-OBS"] = mjd
    header["BUNIT"] = "adu"
    hdus = [fits.PrimaryHDU(data.astype(np.float32), header=header)]
    if sigma is not None:
        hdus.append(fits.ImageHDU(sigma.astype(np.float32), name="UNCERT"))
    hdus.append(fits.ImageHDU(np.zeros(data.shape, np.uint8) if mask is None else mask.astype(np.uint8),
                              name="MASK"))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def centroid(image: np.ndarray, x: float, y: float, radius: int = 5, background: float = 0.0
             ) -> tuple[float, float, float, float]:
    """(x, y, flux, FWHM from second moments) of the star near (x, y), background subtracted."""
    ix, iy = int(round(x)), int(round(y))
    cut = image[iy - radius: iy + radius + 1, ix - radius: ix + radius + 1].astype(np.float64) - background
    gy, gx = np.mgrid[iy - radius: iy + radius + 1, ix - radius: ix + radius + 1]
    total = cut.sum()
    cx, cy = (cut * gx).sum() / total, (cut * gy).sum() / total
    var = (cut * ((gx - cx) ** 2 + (gy - cy) ** 2)).sum() / total / 2
    return float(cx), float(cy), float(total), float(2 * math.sqrt(2 * math.log(2) * max(var, 0.0)))


def robust_sigma(values: np.ndarray) -> float:
    v = values[np.isfinite(values)]
    return float(1.482602218505602 * np.median(np.abs(v - np.median(v))))


def star_free(shape: tuple[int, int], stars: np.ndarray, radius: float = 10.0) -> np.ndarray:
    """bool image: True farther than ``radius`` px from every star of the reference grid."""
    ny, nx = shape
    free = np.ones(shape, bool)
    r = int(math.ceil(radius))
    for x, y, _ in stars:
        ix, iy = int(round(x)), int(round(y))
        free[max(0, iy - r): iy + r + 1, max(0, ix - r): ix + r + 1] = False
    return free
