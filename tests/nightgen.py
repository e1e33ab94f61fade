"""Random small, messy observing nights with known truth, and a plain-numpy reference reduction.

Independent of ccdcal on purpose (numpy and astropy.io.fits only): :func:`make_night` writes the
raw FITS frames of a night drawn from a seed, :func:`reference_reduce` calibrates them with a
careful textbook median reduction, and :func:`score` measures a calibrated light against the
truth. The tests reduce the same night with ccdcal and require it to be no worse than the
reference.

The detector: a bias pedestal near 1000 ADU with a fixed column pattern and gradient, read noise
of 5-10 ADU, a gain of 1-2 e-/ADU, a low dark current with a few hundred hot pixels (up to
50 ADU/s), a vignetted flat field (corner 0.85-0.9 of the centre, 1 % pixel-to-pixel), Poisson
noise in electrons and cosmic rays in every frame. Each night draws its own header dialect,
numbers of frames, dark and light exposures, flat levels and sometimes one warm or offset bias.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

BIAS_WORDS = ("Bias Frame", "BIAS", "zero")
DARK_WORDS = ("Dark Frame", "DARK")
FLAT_WORDS = ("Flat Field", "FLAT")
LIGHT_WORDS = ("Light Frame", "OBJECT")
EXPTIME_KEYS = ("EXPTIME", "EXPOSURE")
TEMP_KEYS = ("CCD-TEMP", "CCDTEMP")
DARK_CHOICES = ((60.0, 300.0), (300.0,), (60.0,), (120.0, 300.0))
LIGHT_CHOICES = ((300.0,), (120.0,), (120.0, 300.0))
FILTER_CHOICES = (("V",), ("R",), ("V", "R"))
ANOMALIES = ("none", "none", "warm", "offset")


@dataclass
class LightTruth:
    """What went into one light frame.

    Attributes
    ----------
    name : str
        File stem (the calibrated output is ``calibrated/<name>.fits``).
    filter : str
        Filter name written in FILTER.
    exptime : float
        Exposure time (s).
    sky : float
        Sky level (ADU, before the flat field).
    signal : numpy.ndarray
        Sky plus stars (ADU, before the flat field): the ideal calibrated light.
    star_mask : numpy.ndarray
        True within a few PSF widths of a star.
    cr_mask : numpy.ndarray
        True on the light's own cosmic-ray pixels, dilated by 1 pixel.
    exact_dark : bool
        Whether a dark of exactly this exposure was taken.
    """

    name: str
    filter: str
    exptime: float
    sky: float
    signal: np.ndarray
    star_mask: np.ndarray
    cr_mask: np.ndarray
    exact_dark: bool


@dataclass
class Night:
    """The truth of a generated night.

    Attributes
    ----------
    root : pathlib.Path
        Folder holding the raw FITS files.
    seed : int
        Seed the night was drawn from.
    bias : numpy.ndarray
        Bias image: pedestal plus the fixed 2-D structure (ADU).
    dark_rate : numpy.ndarray
        Dark current (ADU/s), hot pixels included.
    flats : dict of str to numpy.ndarray
        Flat field per filter, normalised to a median of 1 in its central half.
    gain : float
        Gain (e-/ADU).
    read_noise : float
        Read noise (ADU).
    lights : list of LightTruth
        One entry per light frame.
    dark_times : tuple of float
        Exposure times of the darks (s).
    n_frames : dict of str to int
        Number of biases, darks (per exposure), flats (per filter) and lights.
    anomaly : str
        ``"none"``, ``"warm"`` (one bias 10 degC warm and higher) or ``"offset"`` (one bias at a
        different level, same temperature).
    cosmics : dict of str to int
        Number of cosmic-ray pixels in each raw file, by file stem.
    flat_levels : dict of str to list of float
        Level (ADU, at the flat's median) of each flat frame, per filter.
    """

    root: Path
    seed: int
    bias: np.ndarray
    dark_rate: np.ndarray
    flats: dict[str, np.ndarray]
    gain: float
    read_noise: float
    lights: list[LightTruth] = field(default_factory=list)
    dark_times: tuple[float, ...] = ()
    n_frames: dict[str, int] = field(default_factory=dict)
    anomaly: str = "none"
    cosmics: dict[str, int] = field(default_factory=dict)
    flat_levels: dict[str, list[float]] = field(default_factory=dict)


def dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a boolean mask by one pixel in all eight directions."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    ny, nx = mask.shape
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + ny, dx:dx + nx]
    return out


def central_median(image: np.ndarray) -> float:
    """Median of the central half (in each axis) of an image: the level a flat is normalised to.

    Quoting the sky where the optics are least vignetted is the common convention (and
    ccdcal's documented default); the whole-frame median would put it a few % lower.
    """
    ny, nx = image.shape
    return float(np.median(image[ny // 4:ny - ny // 4, nx // 4:nx - nx // 4]))


def _cosmic_rays(rng: np.random.Generator, shape: tuple[int, int], exptime: float) -> np.ndarray:
    """An image of cosmic-ray hits (ADU): ~0.1 % of pixels (more in long exposures), some tracks."""
    ny, nx = shape
    hits = np.zeros(shape)
    n = 1 + rng.poisson(ny * nx * 0.001 * (1.0 + exptime / 150.0))
    for _ in range(n):
        y, x = int(rng.integers(0, ny)), int(rng.integers(0, nx))
        hits[y, x] += rng.uniform(200.0, 3000.0)
        if rng.random() < 0.3:  # a 2-pixel track
            dy, dx = ((0, 1), (1, 0), (1, 1), (1, -1))[rng.integers(0, 4)]
            hits[min(y + dy, ny - 1), min(max(x + dx, 0), nx - 1)] += rng.uniform(200.0, 3000.0)
    return hits


class _Writer:
    """Turns expected signals into noisy raw frames and writes them with the night's dialect."""

    def __init__(self, root: Path, night: Night, set_point: float, *, design: np.random.Generator,
                 noise: np.random.Generator):
        self.root, self.night, self.set_point, self.rng = root, night, set_point, noise
        rng = design
        self.words = {
            "bias": BIAS_WORDS[rng.integers(len(BIAS_WORDS))],
            "dark": DARK_WORDS[rng.integers(len(DARK_WORDS))],
            "flat": FLAT_WORDS[rng.integers(len(FLAT_WORDS))],
            "light": LIGHT_WORDS[rng.integers(len(LIGHT_WORDS))],
        }
        self.exp_key = EXPTIME_KEYS[rng.integers(len(EXPTIME_KEYS))]
        self.temp_key = TEMP_KEYS[rng.integers(len(TEMP_KEYS))]
        start = dt.datetime(2024, 10, 5, 18, 30, 0)
        self.clock = start + dt.timedelta(days=int(rng.integers(0, 300)))

    def write(self, stem: str, kind: str, exptime: float, signal: np.ndarray, *,
              filt: str | None = None, warm: float = 0.0, offset: float = 0.0) -> np.ndarray:
        """Write one frame; returns its cosmic-ray hit image (ADU)."""
        rng, night = self.rng, self.night
        electrons = rng.poisson(np.clip(signal, 0.0, None) * night.gain)
        level = night.bias + offset + rng.normal(0.0, 0.3)  # small frame-to-frame level jitter
        data = level + electrons / night.gain + rng.normal(0.0, night.read_noise, signal.shape)
        hits = _cosmic_rays(rng, signal.shape, exptime)
        raw = np.clip(np.rint(data + hits), 0, 65535).astype(np.uint16)
        hdu = fits.PrimaryHDU(raw)  # uint16 is written as BITPIX 16 with BZERO 32768
        header = hdu.header
        header["IMAGETYP"] = self.words[kind]
        header[self.exp_key] = (float(exptime), "exposure time [s]")
        header[self.temp_key] = (round(self.set_point + warm + rng.uniform(-0.3, 0.3), 2),
                                 "CCD temperature [C]")
        header["DATE-OBS"] = self.clock.isoformat(timespec="seconds")
        if filt is not None:
            header["FILTER"] = filt
        if kind == "light":
            header["OBJECT"] = "NGC 7331"
        header["INSTRUME"] = "Random night camera"
        self.clock += dt.timedelta(seconds=exptime + 20.0)
        hdu.writeto(self.root / f"{stem}.fits", overwrite=True)
        night.cosmics[stem] = int(np.count_nonzero(hits))
        return hits


def make_night(root: Path, seed: int, size: int = 96) -> Night:
    """Write a random night's raw frames into ``root`` and return its truth.

    Parameters
    ----------
    root : pathlib.Path
        Output folder (created if missing).
    seed : int
        Seed of everything: detector, dialect, frame counts, exposures, noise.
    size : int
        Frames are ``size`` x ``size`` pixels.

    Returns
    -------
    Night
        The injected bias, dark current, flats, gain, read noise and per-light truth.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Two streams: the design of the night never depends on how many draws the pixel noise took.
    rng, noise = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    shape = (size, size)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1.0)

    column = rng.normal(0.0, 1.5, size)[None, :]
    gradient = rng.uniform(2.0, 5.0) * xx + rng.uniform(-3.0, 3.0) * yy
    bias = rng.uniform(980.0, 1020.0) + column + gradient
    dark_rate = rng.uniform(0.01, 0.05) * rng.lognormal(0.0, 0.3, shape)
    n_hot = int(rng.integers(100, 301))
    hot = rng.choice(size * size, n_hot, replace=False)
    dark_rate.flat[hot] = np.exp(rng.uniform(np.log(0.5), np.log(50.0), n_hot))

    r2 = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.5  # 0 at the centre, 1 in the corners
    vignetting = 1.0 - (1.0 - rng.uniform(0.85, 0.90)) * r2
    filters = FILTER_CHOICES[rng.integers(len(FILTER_CHOICES))]
    flats = {}
    for filt in filters:
        flat = vignetting * (1.0 + rng.normal(0.0, 0.01, shape))
        flats[filt] = flat / central_median(flat)

    night = Night(root=root, seed=seed, bias=bias, dark_rate=dark_rate, flats=flats,
                  gain=float(rng.uniform(1.0, 2.0)), read_noise=float(rng.uniform(5.0, 10.0)),
                  dark_times=DARK_CHOICES[rng.integers(len(DARK_CHOICES))],
                  anomaly=ANOMALIES[rng.integers(len(ANOMALIES))])
    set_point = float(rng.choice([-20.0, -15.0, -10.0, -5.0]))
    writer = _Writer(root, night, set_point, design=rng, noise=noise)
    bias_stem = ("bias_{:03d}", "Bias-{:03d}", "zero{:03d}")[rng.integers(3)]

    n_bias = int(rng.integers(3, 13))
    odd = int(rng.integers(n_bias))
    for i in range(n_bias):
        warm = 10.0 if night.anomaly == "warm" and i == odd else 0.0
        offset = 0.0
        if night.anomaly != "none" and i == odd:
            offset = float(rng.uniform(20.0, 30.0))
            offset *= 1.0 if night.anomaly == "warm" else float(rng.choice([-1.0, 1.0]))
        writer.write(bias_stem.format(i + 1), "bias", 0.0, np.zeros(shape), warm=warm,
                     offset=offset)
    night.n_frames["bias"] = n_bias

    for t in night.dark_times:
        n = int(rng.integers(3, 11))
        for i in range(n):
            writer.write(f"dark_{t:g}s_{i + 1:03d}", "dark", t, dark_rate * t)
        night.n_frames[f"dark {t:g}s"] = n

    for filt in filters:
        n = int(rng.integers(3, 11))
        for i in range(n):
            level = float(np.exp(rng.uniform(np.log(5000.0), np.log(30000.0))))
            night.flat_levels.setdefault(filt, []).append(level)
            t = round(float(rng.uniform(1.0, 10.0)), 1)
            writer.write(f"flat_{filt}_{i + 1:03d}", "flat", t, dark_rate * t + level * flats[filt],
                         filt=filt)
        night.n_frames[f"flat {filt}"] = n

    stars = np.zeros(shape)
    star_mask = np.zeros(shape, dtype=bool)
    psf = rng.uniform(1.2, 2.0)
    for _ in range(int(rng.integers(3, 8))):
        y0, x0 = rng.uniform(8.0, size - 8.0, 2)
        r2_star = ((yy * (size - 1) - y0) ** 2 + (xx * (size - 1) - x0) ** 2) / psf**2
        stars += np.exp(rng.uniform(np.log(300.0), np.log(20000.0))) * np.exp(-0.5 * r2_star)
        star_mask |= r2_star < (4.0 + 2.0 / psf) ** 2
    light_times = LIGHT_CHOICES[rng.integers(len(LIGHT_CHOICES))]
    n_light = int(rng.integers(2, 5))
    for i in range(n_light):
        filt = filters[i % len(filters)]
        t = light_times[i % len(light_times)]
        sky = float(rng.uniform(200.0, 2000.0))
        stem = f"ngc7331_{filt}_{i + 1:03d}"
        signal = sky + stars
        hits = writer.write(stem, "light", t, dark_rate * t + flats[filt] * signal, filt=filt)
        night.lights.append(LightTruth(name=stem, filter=filt, exptime=t, sky=sky, signal=signal,
                                       star_mask=star_mask.copy(), cr_mask=dilate(hits > 0),
                                       exact_dark=t in night.dark_times))
    night.n_frames["light"] = n_light
    return night


def _kind(imagetyp: str) -> str:
    word = imagetyp.strip().lower()
    for kind, starts in (("bias", ("bias", "zero")), ("dark", ("dark",)), ("flat", ("flat",)),
                         ("light", ("light", "object"))):
        if word.startswith(starts):
            return kind
    raise ValueError(f"unknown IMAGETYP {imagetyp!r}")


def reference_reduce(raw_dir: Path) -> dict[str, np.ndarray]:
    """Calibrate the lights of ``raw_dir`` with a plain median reduction (no ccdcal code).

    Master bias: median of the biases whose level agrees with the others (within 3 ADU or five
    robust spreads). Master dark per exposure: median of (dark - bias). Flat per filter: median
    of (flat - bias - dark scaled from the shortest dark at least as long) / its own median,
    normalised to a median of 1 in its central half. Light: (light - bias - dark) / flat, with
    the dark of exactly the light's exposure, else the longest dark scaled by the exposure ratio.

    Parameters
    ----------
    raw_dir : pathlib.Path
        Folder of raw ``*.fits`` files as written by :func:`make_night`.

    Returns
    -------
    dict of str to numpy.ndarray
        Calibrated light (ADU, float64) by file stem.
    """
    frames = []  # (kind, exptime, filter, stem, data)
    for path in sorted(Path(raw_dir).glob("*.fits")):
        with fits.open(path) as hdul:
            header, data = hdul[0].header, hdul[0].data.astype(np.float64)
        exptime = round(float(header.get("EXPTIME", header.get("EXPOSURE", 0.0))), 3)
        frames.append((_kind(header["IMAGETYP"]), exptime, header.get("FILTER"), path.stem, data))

    biases = [d for k, *_, d in frames if k == "bias"]
    levels = np.array([np.median(b) for b in biases])
    spread = max(3.0, 5.0 * 1.4826 * np.median(np.abs(levels - np.median(levels))))
    bias = np.median([b for b, lv in zip(biases, levels, strict=True)
                      if abs(lv - np.median(levels)) <= spread], axis=0)
    darks = {t: np.median([d - bias for k, tt, *_, d in frames if k == "dark" and tt == t], axis=0)
             for t in sorted({t for k, t, *_ in frames if k == "dark"})}

    def dark(t: float, *, longer: bool) -> np.ndarray:
        if longer:
            t_dark = min((d for d in darks if d >= t), default=max(darks))
        else:
            t_dark = t if t in darks else max(darks)
        return darks[t_dark] * (t / t_dark)

    flats = {}
    for filt in sorted({f for k, _, f, *_ in frames if k == "flat"}):
        parts = [d - bias - dark(t, longer=True)
                 for k, t, f, _, d in frames if k == "flat" and f == filt]
        flat = np.median([p / np.median(p) for p in parts], axis=0)
        flats[filt] = flat / central_median(flat)
    return {stem: (d - bias - dark(t, longer=False)) / flats[f]
            for k, t, f, stem, d in frames if k == "light"}


def score(calibrated: np.ndarray, night: Night, light: LightTruth) -> dict[str, float]:
    """Measure a calibrated light on its sky (away from stars and its own cosmic rays).

    Parameters
    ----------
    calibrated : numpy.ndarray
        The calibrated light (ADU).
    night : Night
        Truth of the night (gain, read noise, dark current, flat).
    light : LightTruth
        Truth of this light.

    Returns
    -------
    dict
        ``noise``: 1.4826 * MAD of the sky pixels. ``holes`` and ``spikes``: sky pixels more than
        7 sigma below / above the sky median, sigma being ``noise`` combined with the light's
        own shot noise of its dark current at that pixel (so that a hot pixel's own Poisson
        noise is no hole, but a master's error is). ``flatness``: level of the four corner
        boxes (a quarter of the side each) over the level of the central half, minus 1; a
        level is the mean of the sky pixels within 5 ``noise`` of the box's median (a median
        would differ by ~0.1 % between two equally good reductions of the same light).
        ``zero_point``: sky median over the true sky level. ``expected_noise``: median over the
        sky pixels of the light's own read and Poisson noise after flat-fielding (the noise of a
        reduction with noiseless masters).
    """
    data = np.asarray(calibrated, dtype=np.float64)
    sky = ~light.star_mask & ~light.cr_mask & np.isfinite(data)
    centre = float(np.median(data[sky]))
    noise = 1.4826 * float(np.median(np.abs(data[sky] - centre)))
    flat = night.flats[light.filter]
    own_dark = night.dark_rate * light.exptime / night.gain / flat**2  # ADU^2
    z = ((data - centre) / np.sqrt(noise**2 + own_dark))[sky]

    ny, nx = data.shape
    by, bx = ny // 4, nx // 4
    corners = np.zeros(data.shape, dtype=bool)
    for ys in (slice(0, by), slice(ny - by, ny)):
        for xs in (slice(0, bx), slice(nx - bx, nx)):
            corners[ys, xs] = True
    middle = np.zeros(data.shape, dtype=bool)
    middle[by:ny - by, bx:nx - bx] = True

    def level(box: np.ndarray) -> float:
        values = data[box & sky]
        return float(np.mean(values[np.abs(values - np.median(values)) < 5.0 * noise]))

    electrons = (light.signal * flat + night.dark_rate * light.exptime) * night.gain
    sigma = np.sqrt(night.read_noise**2 + electrons / night.gain**2) / flat
    return {"noise": noise, "holes": int(np.count_nonzero(z < -7.0)),
            "spikes": int(np.count_nonzero(z > 7.0)),
            "flatness": level(corners) / level(middle) - 1.0, "zero_point": centre / light.sky,
            "expected_noise": float(np.median(sigma[sky]))}
