"""``reduce``: scan -> plan -> build masters -> calibrate lights -> manifest and report.

The manifest (OUT/manifest.json) records, per output, a fingerprint of everything
it was made from (input contents, recipe, options, ccdcal version); a rerun keeps
outputs whose fingerprint is unchanged and redoes the rest, so an interrupted run
is finished by running the same command again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .calibrate import CalibratedRows, Recipe, normalise_flat
from .errors import CcdcalError, ConfigError, InputError, OutputError
from .frames import FrameSource, clean_header, write_fits, write_text
from .inventory import FrameKind, Inventory, Skipped, scan
from .plan import LightJob, MasterJob, Plan, PlanOptions, build_plan, member_steps

MASTER_TYPES = {FrameKind.BIAS: "MASTER BIAS", FrameKind.DARK: "MASTER DARK", FrameKind.FLAT: "MASTER FLAT"}


@dataclass(frozen=True)
class ReduceOptions:
    """Every choice of a reduction. The same names are the keys of a ``--config`` TOML file."""

    memory: str = "1GiB"
    combine_method: str | None = None          # None: mean of the survivors (median of 1-2 frames)
    sigma_clip: tuple[float, float] | None = (3.0, 3.0)
    reject: str = "auto"                       # auto: noise-model clip (read noise, gain); see plan
    keep_flagged: bool = False                 # keep even bias/dark frames far off their group's level
    allow_uncorrected: bool = False            # calibrate lights that would keep their pedestal
    clip_extrema: tuple[int, int] | None = None
    overscan: bool = True
    overscan_model: str = "legendre"
    overscan_order: int = 3
    scale_region: str | None = None
    temp_tolerance: float = 2.0
    flat_floor: float = 0.1
    exclude_flagged: bool = False
    strict: bool = False
    report: bool = True
    workers: int | None = None
    # calibration physics (issue 4); gain in e-/ADU, read noise in e-, saturation in raw ADU
    gain: float | None = None                  # None: EGAIN, or GAIN stated in e-/ADU, else measured from flats
    read_noise: float | None = None            # None: RDNOISE, else measured from the biases (or overscan)
    saturation: float | None = None            # None: SATURATE/DATAMAX of the frame
    to_electrons: bool = False
    uncertainty: bool = True
    dark_optimize: bool = False
    cosmic_rays: bool = False
    bad_pixel_map: str | None = None
    hot_sigma: float = 5.0
    flat_norm: str = "median"

    @classmethod
    def from_sources(cls, config: str | os.PathLike | None, overrides: dict[str, Any]) -> ReduceOptions:
        """Options from a TOML file (top level or a ``[reduce]`` table), then non-None overrides."""
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        if config:
            import tomllib

            path = Path(config)
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as exc:
                raise ConfigError(f"{path}: no such config file") from exc
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
            data = data.get("reduce", data)
            for key, value in data.items():
                norm = key.replace("-", "_")
                if norm not in names:
                    raise ConfigError(f"{path}: unknown option {key!r}; known: {', '.join(sorted(names))}")
                values[norm] = value
        for key, value in overrides.items():
            if key in names and value is not None:
                values[key] = value
        for key in ("sigma_clip", "clip_extrema"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
            if values.get(key) in (False, "none", "None"):
                values[key] = None
        try:
            options = cls(**values)
        except TypeError as exc:
            raise ConfigError(f"invalid options: {exc}") from exc
        options.validate()
        return options

    def validate(self) -> None:
        from .combine import parse_memory
        from .sections import parse_section

        parse_memory(self.memory)
        if self.combine_method not in (None, "median", "mean"):
            raise ConfigError(f"combine_method {self.combine_method!r}: use 'median' or 'mean'")
        from .combine import REJECTS

        if self.reject not in ("auto", *REJECTS):
            raise ConfigError(f"reject {self.reject!r}: use auto, {', '.join(REJECTS)}")
        if self.reject == "ccdclip" and not (self.gain and self.read_noise):
            raise ConfigError("reject 'ccdclip' needs --gain and --read-noise; 'auto' measures them")
        if self.keep_flagged and self.exclude_flagged:
            raise ConfigError("keep_flagged and exclude_flagged contradict each other; choose one")
        if self.scale_region:
            parse_section(self.scale_region)
        for key in ("sigma_clip", "clip_extrema"):
            value = getattr(self, key)
            if value is not None and (len(value) != 2 or any(v < 0 for v in value)):
                raise ConfigError(f"{key} must be two non-negative numbers, got {value!r}")
        if not 0 < self.flat_floor < 1:
            raise ConfigError(f"flat_floor must be between 0 and 1, got {self.flat_floor}")

    def plan_options(self) -> PlanOptions:
        return PlanOptions(
            overscan=self.overscan, overscan_model=self.overscan_model, overscan_order=self.overscan_order,
            combine_method=self.combine_method, sigma_clip=self.sigma_clip, clip_extrema=self.clip_extrema,
            reject=self.reject, scale_region=self.scale_region, temp_tolerance=self.temp_tolerance,
            exclude_flagged=self.exclude_flagged, keep_flagged=self.keep_flagged,
            allow_uncorrected=self.allow_uncorrected,
            light_steps=self.light_steps())

    def light_steps(self) -> tuple[str, ...]:
        """What every light gets beyond overscan and masters, as the plan prints it."""
        steps = ["dark scale optimised (minimum noise)" if self.dark_optimize else "dark scaled by exposure"]
        masks = ["saturated", f"hot (> {self.hot_sigma:g} sigma in the dark)", f"flat < {self.flat_floor:g}"]
        if self.cosmic_rays:
            masks.append("cosmic rays (astroscrappy)")
        if self.bad_pixel_map:
            masks.append(f"bad pixels of {Path(self.bad_pixel_map).name}")
        steps.append("mask: " + ", ".join(masks))
        if self.uncertainty:
            steps.append("uncertainty (read + Poisson + masters)")
        steps.append("converted to electrons" if self.to_electrons else "kept in ADU")
        return tuple(steps)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class ReduceResult:
    """What a reduction did."""

    out_dir: Path
    plan: Plan
    masters: list[str] = field(default_factory=list)       # outputs written or kept, relative to out_dir
    lights: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    reused: int = 0
    report: Path | None = None
    warnings: list[str] = field(default_factory=list)      # every warning the library raised in the run


# -- fingerprints ------------------------------------------------------------------------------
_HASHES: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, cached per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _HASH_LOCK:
        _HASHES[key] = value
    return value


def _input_record(path: Path, hdu: int) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "hdu": hdu, "size": st.st_size, "mtime": st.st_mtime, "sha256": file_sha256(path)}


def _physics(options: ReduceOptions) -> dict[str, Any]:
    """The options that change output pixels or headers beyond the recipe (part of every fingerprint).

    The memory budget is not among them: results do not depend on the tile size.
    """
    names = ("gain", "read_noise", "saturation", "to_electrons", "uncertainty", "dark_optimize", "cosmic_rays",
             "bad_pixel_map", "hot_sigma", "flat_norm")
    return {k: getattr(options, k) for k in names}


def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _recipe_json(recipe: Recipe) -> dict[str, Any]:
    return {"overscan": recipe.overscan.describe() if recipe.overscan else None,
            "trim": str(recipe.trim) if recipe.trim else None, "bias": recipe.bias, "dark": recipe.dark,
            "dark_scale": recipe.dark_scale, "flat": recipe.flat}


# -- the run -----------------------------------------------------------------------------------
class _Run:
    def __init__(self, out_dir: Path, options: ReduceOptions, force: bool, progress: bool):
        self.out_dir = out_dir
        self.options = options
        self.force = force
        self.progress = progress
        self.masters: dict[str, np.ndarray] = {}
        self.master_prints: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self.old = self._load_manifest()
        self.outputs: dict[str, Any] = {}
        self.master_files: dict[str, Any] = {}          # name -> calibrate.Master (data, UNCERT, MASK)
        self.master_facts: dict[str, dict[str, Any]] = {}  # name -> header facts (RDNADU, GAINMEAS, ...)
        self.bad_pixels: dict[str, np.ndarray] = {}
        self.lock = threading.Lock()

    def _load_manifest(self) -> dict[str, Any]:
        path = self.out_dir / "manifest.json"
        if self.force or not path.exists():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("outputs", {})
        except (OSError, ValueError):
            return {}

    def up_to_date(self, rel: str, fingerprint: str) -> bool:
        entry = self.old.get(rel)
        path = self.out_dir / rel
        if not entry or entry.get("fingerprint") != fingerprint or not path.exists():
            return False
        return entry.get("sha256") == file_sha256(path)

    def record(self, rel: str, fingerprint: str, inputs: list[dict[str, Any]], extra: dict[str, Any]) -> None:
        with self.lock:
            self.outputs[rel] = {"fingerprint": fingerprint, "sha256": file_sha256(self.out_dir / rel),
                                 "inputs": inputs, **extra}

    def missing_master(self, recipe: Recipe) -> str | None:
        for name in (recipe.bias, recipe.dark, recipe.flat):
            if name and name in self.failed:
                return f"its master {name} could not be built ({self.failed[name]})"
        return None


def _ascii(text: str) -> str:
    """FITS cards hold printable ASCII only."""
    text = text.replace("×", "x").replace("°C", "C").replace("°", "deg").replace("—", "-").replace("–", "-").replace("←", "<-")
    return text.encode("ascii", "replace").decode("ascii")


def _master_header(job: MasterJob, result_header: Any, extra: dict[str, Any]) -> Any:
    header = result_header.copy()
    header["IMAGETYP"] = (MASTER_TYPES[job.kind], "ccdcal master frame")
    if job.kind == FrameKind.BIAS:
        header["EXPTIME"] = (0.0, "[s] bias frames have no exposure")
    if job.kind == FrameKind.DARK and job.exptime is not None:
        header["EXPTIME"] = (job.exptime, "[s] exposure of every member dark")
        header["DARKTIME"] = (job.exptime, "[s] dark time of the master")
    if job.kind == FrameKind.FLAT and job.filter:
        header["FILTER"] = (job.filter, "filter of the member flats")
    if "MJD-AVG" in header:
        # The epoch of a master is the members' mean mid-exposure.
        header["MJD-OBS"] = (header["MJD-AVG"], "[d] mean mid-exposure of the members")
        header["DATE-OBS"] = (header.get("DATE-AVG", ""), "mean mid-exposure of the members (UTC)")
    header["BUNIT"] = "adu" if job.kind != FrameKind.FLAT else "adu/adu"
    for key in ("BIASSEC", "TRIMSEC", "DATASEC", "CHECKSUM", "DATASUM"):
        header.remove(key, ignore_missing=True, remove_all=True)
    steps = member_steps(job.recipes)
    header["HISTORY"] = _ascii(f"ccdcal {__version__}: {job.label.split('   ')[0].strip()} from {len(job.members)} frames")
    for step in steps:
        header["HISTORY"] = _ascii(f"each member: {step}")
    header["HISTORY"] = f"combined: {job.settings.describe()}"
    for key, value in extra.items():
        if key == "HISTORY":
            for line in value:
                header["HISTORY"] = _ascii(line)
        else:
            header[key] = value
    return header


def _option_gain(run: _Run, header: Any) -> tuple[float | None, str]:
    """Gain (e-/ADU) from the options, else from what the header states in e-/ADU."""
    from .calibrate import header_gain

    if run.options.gain:
        return float(run.options.gain), "option"
    return header_gain(header)


def _master_file(run: _Run, name: str | None) -> Any:
    """A master as :class:`ccdcal.calibrate.Master` (data, UNCERT, MASK, header facts), cached per run."""
    from astropy.io import fits

    from .calibrate import Master

    if not name:
        return None
    cache = run.master_files
    with run.lock:
        if name in cache:
            return cache[name]
    path = run.out_dir / "masters" / name
    with fits.open(path, memmap=False) as hdul:
        header = hdul[0].header
        unc = hdul["UNCERT"].data.astype(np.float32) if "UNCERT" in hdul else None
        mask = hdul["MASK"].data.astype(np.uint8) if "MASK" in hdul else None
        master = Master(data=run.masters[name], uncertainty=unc, mask=mask, name=name,
                        datasum=str(header.get("DATASUM", run.master_prints.get(name, ""))),
                        exptime=header.get("DARKTIME", header.get("EXPTIME")),
                        level=header.get("FLATNORM"))
        facts = {k: header.get(k) for k in ("RDNADU", "GAINMEAS", "NCOMBINE")}
    with run.lock:
        cache[name] = master
        run.master_facts[name] = facts
    return master


def _master_fact(run: _Run, name: str | None, key: str) -> Any:
    if not name:
        return None
    _master_file(run, name)
    return run.master_facts.get(name, {}).get(key)


#: Pixels of the central band that pair statistics (read noise, gain, noise floor) use: the
#: relative precision of a clipped std from N pixel differences is about 1/sqrt(2N), 0.07 %.
PAIR_SAMPLE_PIXELS = 1 << 20


@dataclass(frozen=True)
class NoiseModel:
    """How a master's members are clipped: σ of each value from the detector, not the sample.

    ``reject`` is a :func:`ccdcal.combine.combine` algorithm; for ``ccdclip`` the value of
    frame i at level L (ADU) has σ = sqrt(rn² + max(L − pedestal, 0)/gain) ADU with ``rn =
    read_noise/gain``; ``pedestal = inf`` keeps read noise alone (biases; darks of unknown gain).
    """

    reject: str
    gain: float | None = None            # e-/ADU
    read_noise: float | None = None      # e-
    pedestal: float = 0.0                # ADU
    sensitivity_noise: float = 0.0       # fraction of the level (darks: temperature jitter)
    read_noise_measured: float | None = None   # ADU, from two member biases
    gain_measured: float | None = None         # e-/ADU, from two member flats
    history: tuple[str, ...] = ()

    def combine_keywords(self) -> dict[str, Any]:
        if self.reject == "none":
            return {}
        if self.reject != "ccdclip":
            return {"reject": self.reject}
        return {"reject": "ccdclip", "gain": self.gain, "read_noise": self.read_noise, "pedestal": self.pedestal,
                "sensitivity_noise": self.sensitivity_noise}


def _central_band(source: Any) -> np.ndarray:
    """The central rows of a (calibrated) member, about :data:`PAIR_SAMPLE_PIXELS` pixels."""
    ny, nx = (int(v) for v in source.shape)
    height = min(ny, max(8, PAIR_SAMPLE_PIXELS // max(nx, 1)))
    y0 = (ny - height) // 2
    return np.asarray(source.read_rows(y0, y0 + height), dtype=np.float32)


def _closest_pair(job: MasterJob) -> tuple[int, int]:
    """The two members whose raw levels (scan metrics) are closest."""
    levels = [f.metrics.get("level", np.nan) if f.metrics else np.nan for f in job.members]
    logs = np.log(np.clip(np.nan_to_num(np.asarray(levels, dtype=np.float64), nan=1.0), 1e-9, None))
    best, pair = np.inf, (0, 1)
    for i in range(len(logs)):
        for j in range(i + 1, len(logs)):
            if abs(logs[i] - logs[j]) < best:
                best, pair = abs(logs[i] - logs[j]), (i, j)
    return pair


def _noise_model(run: _Run, job: MasterJob, sources: list[Any]) -> NoiseModel:
    """Measure what the rejection of one master needs, then :func:`noise_model`."""
    from .calibrate import gain_from_flat_pair, header_read_noise, read_noise_from_pair

    settings = job.settings
    if settings.reject != "auto":
        if settings.reject == "ccdclip":
            return NoiseModel("ccdclip", gain=run.options.gain, read_noise=run.options.read_noise)
        return NoiseModel(settings.reject)
    n = len(sources)
    gain, gain_source = _option_gain(run, sources[0].header)
    rn_e = run.options.read_noise or header_read_noise(sources[0].header)
    pair = (0, 1) if job.kind != FrameKind.FLAT else _closest_pair(job)
    floor = gain_measured = None
    typical = 0.0
    history: list[str] = []
    if n >= 2:
        a, b = (_central_band(sources[k]) for k in pair)
        names = f"{job.members[pair[0]].name} - {job.members[pair[1]].name}"
        floor = read_noise_from_pair(a, b)
        floor = floor if np.isfinite(floor) and floor > 0 else None
        typical = float(np.nanmedian(a)) if job.kind == FrameKind.DARK else 0.0
        if job.kind == FrameKind.BIAS and floor is not None:
            history.append(f"read noise from {names}: {floor:.3f} adu")
        if job.kind == FrameKind.DARK and floor is not None:
            history.append(f"noise floor of {names}: {floor:.3f} adu")
        if job.kind == FrameKind.FLAT:
            rn_adu = rn_e / gain if (rn_e and gain) else _master_fact(run, job.recipes[0].bias, "RDNADU")
            measured = gain_from_flat_pair(a, b, read_noise=float(rn_adu or 0.0))
            if np.isfinite(measured) and measured > 0:
                gain_measured = float(measured)
                history.append(f"gain measured from {names}: {measured:.3f} e-/adu")
    model = noise_model(job.kind, n=n, gain=gain, gain_source=gain_source, read_noise=rn_e,
                        bias_read_noise=_master_fact(run, job.recipes[0].bias, "RDNADU"), floor=floor,
                        typical=typical,
                        gain_measured=gain_measured, bias_subtracted=job.recipes[0].bias is not None,
                        thresholds=settings.sigma_clip or (3.0, 3.0))
    return dataclasses.replace(model, history=tuple(history) + model.history)


#: Fraction of a dark's level added to its noise model: dark current changes by ~7 % per °C,
#: set points jitter by tenths of a degree, and hot pixels flicker, so hot pixels scatter
#: more than their shot noise (without it, their values would be rejected as outliers).
DARK_SENSITIVITY_NOISE = 0.05


def noise_model(kind: FrameKind, *, n: int, gain: float | None = None, gain_source: str = "",
                read_noise: float | None = None, bias_read_noise: float | None = None,
                floor: float | None = None, typical: float = 0.0, gain_measured: float | None = None,
                bias_subtracted: bool = True, thresholds: tuple[float, float] = (3.0, 3.0)) -> NoiseModel:
    """The default (``auto``) rejection of a master of ``n`` members of ``kind``.

    Parameters
    ----------
    kind : FrameKind
        BIAS, DARK or FLAT.
    n : int
        Members; fewer than 3 get no rejection.
    gain : float, optional
        e-/ADU from the options or a header that states it in e-/ADU (never a camera setting).
    read_noise : float, optional
        e- from the options or the header (used with ``gain``).
    bias_read_noise : float, optional
        ADU, measured on the biases (the master bias's RDNADU).
    floor : float, optional
        ADU: clipped std of the difference of two members / sqrt(2) (read noise for biases;
        read noise and typical dark shot noise for darks).
    typical : float
        ADU: the members' typical (median) level, where ``floor`` was measured.
    gain_measured : float, optional
        e-/ADU from two member flats (photon transfer).
    bias_subtracted : bool
        Whether the members have had a bias removed (else their level holds a pedestal).

    Returns
    -------
    NoiseModel
        Biases: σ = read noise. Darks: σ = sqrt(rn² + dark/gain + (0.05·dark)²) with a known
        gain, else sqrt(floor² + excess + (0.05·excess)²) for the excess over the typical level
        (1 e-/ADU assumed); see :data:`DARK_SENSITIVITY_NOISE`. Flats (scaled):
        σ_i = s_i·sqrt(rn² + level_i/gain) with the known or measured gain. MAD clipping where
        none of that can be had.
    """
    low, high = thresholds
    rn_known = read_noise / gain if (read_noise and gain) else None
    if n < 3:
        return NoiseModel("none", read_noise_measured=floor if kind == FrameKind.BIAS else None,
                          gain_measured=gain_measured)
    if kind == FrameKind.BIAS:
        rn = rn_known or floor
        if rn is None:
            return NoiseModel("mad", history=("rejection: MAD clip (read noise unknown)",))
        return NoiseModel("ccdclip", gain=1.0, read_noise=rn, pedestal=math.inf, read_noise_measured=floor,
                          history=(f"rejection: values beyond {low:g}/{high:g} x the read noise"
                                   f" ({rn:.3f} adu) from the median",))
    if gain is None and kind == FrameKind.FLAT and gain_measured:
        gain, gain_source = gain_measured, "photon transfer of two member flats"
    rn = rn_known or bias_read_noise
    snoise = DARK_SENSITIVITY_NOISE if kind == FrameKind.DARK else 0.0
    jitter = f" + ({snoise:g} level)^2" if snoise else ""
    if gain is not None and rn is not None and bias_subtracted:
        return NoiseModel("ccdclip", gain=gain, read_noise=rn * gain, pedestal=0.0, sensitivity_noise=snoise,
                          gain_measured=gain_measured,
                          history=(f"rejection: sigma = sqrt(({rn:.3f} adu)^2 + level/{gain:.4g}{jitter}) per"
                                   f" value (gain from {gain_source})",))
    if kind == FrameKind.DARK and floor is not None:
        return NoiseModel("ccdclip", gain=1.0, read_noise=floor, pedestal=typical, sensitivity_noise=snoise,
                          history=(f"rejection: sigma = sqrt(({floor:.3f} adu)^2 + excess{jitter}) for the"
                                   f" excess over the typical {typical:.4g} adu (gain unknown: 1 e-/adu assumed)",))
    return NoiseModel("mad", gain_measured=gain_measured,
                      history=("rejection: MAD clip (no read noise and gain for a noise model)",))


def _rejection_keywords(job: MasterJob, result: Any) -> dict[str, Any]:
    """How many values of each member the combine rejected, low and high."""
    counts = result.member_rejected
    if counts is None:
        return {}
    npix = int(np.prod(result.data.shape))
    low, high = int(counts[:, 0].sum()), int(counts[:, 1].sum())
    out: dict[str, Any] = {
        "NREJLO": (low, "values rejected below the centre, all members"),
        "NREJHI": (high, "values rejected above the centre, all members"),
    }
    if len(job.members) <= 999:
        for i, (lo, hi) in enumerate(counts, start=1):
            out[f"REJL{i:03d}"] = (int(lo), f"values of IMCMB{i:03d} rejected low ({lo / npix:.3%})")
            out[f"REJH{i:03d}"] = (int(hi), f"values of IMCMB{i:03d} rejected high ({hi / npix:.3%})")
    return out


def _write_rejection_map(run: _Run, job: MasterJob, result: Any) -> None:
    """previews/rejection-<master>.png: the fraction of values rejected per pixel, binned.

    Black is nothing rejected; white is as many rejections per pixel as the busiest bin had.
    """
    from .frames import write_bytes
    from .stretch import png_bytes

    if result.member_rejected is None:
        return
    counts = result.nlow_rejected.astype(np.float32) + result.nhigh_rejected.astype(np.float32)
    ny, nx = counts.shape
    step = max(1, -(-max(ny, nx) // 800))
    h, w = ny // step, nx // step
    if h == 0 or w == 0:
        return
    binned = counts[: h * step, : w * step].reshape(h, step, w, step).mean(axis=(1, 3))
    top = float(binned.max())
    shown = binned / top if top > 0 else binned
    write_bytes(run.out_dir / "previews" / f"rejection-{Path(job.name).stem}.png", png_bytes(np.sqrt(shown)))


def _build_master(run: _Run, job: MasterJob, inputs: list[dict[str, Any]]) -> None:
    from .calibrate import MASK_HOT, MASK_LOW_FLAT, MASK_NO_DATA, hot_pixel_mask, low_flat_mask
    from .combine import combine

    sources = [CalibratedRows(FrameSource(f.path, f.hdu), r, run.masters, flat_floor=run.options.flat_floor)
               for f, r in zip(job.members, job.recipes, strict=True)]
    settings = job.settings
    noise = _noise_model(run, job, sources)
    result = combine(sources, method=settings.method, scale=settings.scale, scale_region=settings.scale_region,
                     clip_extrema=settings.clip_extrema, sigma_clip=settings.sigma_clip,
                     memory=run.options.memory, **noise.combine_keywords())
    data = result.data
    uncertainty = result.uncertainty
    extra: dict[str, Any] = {}
    history: list[str] = list(noise.history)
    extra.update(_rejection_keywords(job, result))
    _write_rejection_map(run, job, result)
    nodata = np.asarray(result.mask, dtype=bool) | ~np.isfinite(data)
    mask = np.where(nodata, np.uint8(MASK_NO_DATA), np.uint8(0))
    gain, gain_source = _option_gain(run, sources[0].header)
    if job.kind == FrameKind.FLAT:
        region = None
        if settings.scale_region:
            from .sections import to_slices

            region = to_slices(settings.scale_region, data.shape)
        data, level = normalise_flat(data, region, method=run.options.flat_norm)
        if uncertainty is not None:
            uncertainty = uncertainty / np.float32(level)
        mask[low_flat_mask(data, run.options.flat_floor) & ~nodata] |= MASK_LOW_FLAT
        data = np.where(np.isfinite(data), data, np.float32(1.0)).astype(np.float32)
        extra["FLATNORM"] = (level, f"[adu] level the flat was divided by ({run.options.flat_norm})")
        extra["FLATFLOR"] = (run.options.flat_floor, "flat pixels below this are masked")
        history.append(f"normalised by the {run.options.flat_norm} of "
                       f"{settings.scale_region or 'the central half'}: {level:.6g} adu")
        if noise.gain_measured is not None:
            extra["GAINMEAS"] = (round(noise.gain_measured, 4), "[e-/adu] photon-transfer gain, 2 member flats")
    else:
        data = np.where(np.isfinite(data), data, np.float32(0.0)).astype(np.float32)
    if job.kind == FrameKind.BIAS and noise.read_noise_measured is not None:
        rn = noise.read_noise_measured
        extra["RDNADU"] = (round(rn, 4), "[adu] read noise, from two member biases")
        if gain is not None:
            extra["RDNOISE"] = (round(rn * gain, 4), f"[e-] read noise (gain {gain:g} from {gain_source})")
    if job.kind == FrameKind.DARK:
        hot = hot_pixel_mask(data, sigma=run.options.hot_sigma) & ~nodata
        mask[hot] |= MASK_HOT
        extra["NHOTPIX"] = (int(hot.sum()), f"hot pixels (> {run.options.hot_sigma:g} sigma), MASK bit 2")
    if uncertainty is not None:
        uncertainty = np.where(np.isfinite(uncertainty), uncertainty, np.float32(0.0)).astype(np.float32)
    levels = [s.overscan_level for s in sources if s.overscan_level is not None]
    if levels:
        extra["OVSCMEAN"] = (float(np.mean(levels)), "[adu] mean overscan level of the members")
    extra["NNODATA"] = (int(nodata.sum()), "pixels without a valid value, MASK bit 32")
    extra["HISTORY"] = history
    header = _master_header(job, result.header, extra)
    rel = job.output
    write_fits(run.out_dir / rel, data, header, uncertainty=uncertainty, mask=mask,
               unit="adu/adu" if job.kind == FrameKind.FLAT else "adu")
    for s in sources:
        s.source.close()
    run.masters[job.name] = data
    run.master_files.pop(job.name, None)


def _load_master(run: _Run, job: MasterJob) -> None:
    with FrameSource(run.out_dir / job.output, 0) as src:
        run.masters[job.name] = src.read()


def _light_header(job: LightJob, raw_header: Any, plan: Plan, run: _Run, overscan_level: float | None,
                  *, result: Any = None, masters: dict[str, Any] | None = None, gain_source: str | None = None) -> Any:
    from .calibrate import describe_calibration

    header = clean_header(raw_header)
    recipe = job.recipe
    if recipe.trim is not None:
        # Keep world and physical coordinates right after trimming (IRAF LTV convention).
        dx, dy = recipe.trim.x1 - 1, recipe.trim.y1 - 1
        for axis, shift in (("1", dx), ("2", dy)):
            if shift and f"CRPIX{axis}" in header:
                header[f"CRPIX{axis}"] = header[f"CRPIX{axis}"] - shift
            header[f"LTV{axis}"] = (float(header.get(f"LTV{axis}", 0.0)) - shift, "offset of trimmed image")
    for key in ("BIASSEC", "TRIMSEC", "DATASEC"):
        header.remove(key, ignore_missing=True, remove_all=True)
    _time_keywords(header)
    header["BUNIT"] = "adu"
    header["HISTORY"] = f"ccdcal {__version__}: calibrated {time.strftime('%Y-%m-%dT%H:%M:%S')}"
    if job.uncorrected:
        header["UNCORR"] = (True, "pedestal NOT removed (--allow-uncorrected)")
        header["HISTORY"] = _ascii(f"WARNING: {job.uncorrected}; the pedestal stays in")
    if result is not None:
        masters = masters or {}
        describe_calibration(header, result, bias=masters.get("bias"), dark=masters.get("dark"),
                             flat=masters.get("flat"), flat_floor=run.options.flat_floor, gain_source=gain_source)
        if recipe.dark and result.dark_scale is not None:
            dark_job = plan.master(recipe.dark)
            header["CALDARKT"] = (dark_job.exptime, "[s] exposure of the master dark applied")
        return header
    if recipe.overscan is not None:
        header["HISTORY"] = _ascii(recipe.overscan.describe())
        if overscan_level is not None:
            header["OVSCMEAN"] = (overscan_level, "[adu] mean overscan level subtracted")
    if recipe.trim is not None:
        header["HISTORY"] = f"trimmed to {recipe.trim}"
    for key, name, what in (("CALBIAS", recipe.bias, "master bias"), ("CALDARK", recipe.dark, "master dark"),
                            ("CALFLAT", recipe.flat, "master flat")):
        if name:
            header[key] = (name, f"{what} applied")
            header[key[:3] + "SUM" + key[3]] = (run.master_prints.get(name, ""), f"DATASUM of the {what}")
            header["HISTORY"] = f"{what} {name} subtracted" if key != "CALFLAT" else f"divided by master flat {name}"
    if recipe.dark:
        header["DARKSCAL"] = (recipe.dark_scale, "master dark multiplied by this (exposure ratio)")
    return header


def _time_keywords(header: Any) -> None:
    """MJD-OBS from DATE-OBS when missing, and MJD-AVG/DATE-AVG (mid-exposure) of a light."""
    from astropy.time import Time

    from .calibrate import exposure_of
    from .frames import header_value

    mjd = header_value(header, ("MJD-OBS", "MJD_OBS"))
    if not isinstance(mjd, (int, float)) or isinstance(mjd, bool):
        date = header_value(header, ("DATE-OBS", "DATE_OBS"))
        if not isinstance(date, str):
            return
        try:
            mjd = Time(date.replace(" ", "T"), format="isot", scale="utc").mjd
        except ValueError:
            return
        header["MJD-OBS"] = (mjd, "[d] start of exposure, from DATE-OBS")
    exptime = exposure_of(header)
    if exptime is not None and "MJD-AVG" not in header:
        mid = float(mjd) + exptime / 86400.0 / 2.0
        header["MJD-AVG"] = (mid, "[d] mid-exposure")
        header["DATE-AVG"] = (Time(mid, format="mjd", scale="utc").isot, "mid-exposure (UTC)")


def _bad_pixel_map(run: _Run) -> np.ndarray | None:
    path = run.options.bad_pixel_map
    if not path:
        return None
    cache = run.bad_pixels
    with run.lock:
        if path not in cache:
            with FrameSource(path) as src:
                cache[path] = src.read() != 0
        return cache[path]


def _adc_maximum(header: Any) -> float | None:
    """The largest raw value an integer image can hold (65535 for unsigned 16-bit): saturated there."""
    bitpix = header.get("BITPIX") if header is not None else None
    if bitpix not in (8, 16, 32) or float(header.get("BSCALE", 1.0)) != 1.0:
        return None
    bzero = float(header.get("BZERO", 0.0))
    return float(2 ** (bitpix - 1) - 1 + bzero) if bitpix != 8 else 255.0 + bzero


def _calibrate_light(run: _Run, plan: Plan, job: LightJob) -> tuple[str, str | None]:
    """Calibrate one light; returns (output, None) or (input path, reason skipped)."""
    from .calibrate import calibrate_frame, header_read_noise

    why = run.missing_master(job.recipe)
    if why:
        return str(job.frame.path), why
    options = run.options
    inputs = [_input_record(job.frame.path, job.frame.hdu)]
    fp = _fingerprint(__version__, inputs, _recipe_json(job.recipe), options.flat_floor, _physics(options),
                      [run.master_prints.get(n) for n in (job.recipe.bias, job.recipe.dark, job.recipe.flat)])
    if run.up_to_date(job.output, fp):
        run.record(job.output, fp, inputs, {"kind": "light", "reused": True})
        return job.output, None
    recipe = job.recipe
    try:
        with FrameSource(job.frame.path, job.frame.hdu) as src:
            raw = src.read()
            raw_header = src.header
        if not np.isfinite(raw).any():
            return str(job.frame.path), "every pixel is NaN or infinite; remove the file from the inputs"
        masters = {"bias": _master_file(run, recipe.bias), "dark": _master_file(run, recipe.dark),
                   "flat": _master_file(run, recipe.flat)}
        gain, gain_source = _option_gain(run, raw_header)
        if gain is None:
            measured = _master_fact(run, recipe.flat, "GAINMEAS")
            if measured:
                gain, gain_source = float(measured), f"photon transfer of {recipe.flat}"
        rn_e = options.read_noise or header_read_noise(raw_header)
        if rn_e and gain:
            read_noise = rn_e / gain
        else:
            read_noise = _master_fact(run, recipe.bias, "RDNADU")
        saturation = options.saturation if options.saturation is not None else job.frame.saturate
        if saturation is None:
            saturation = _adc_maximum(raw_header)
        result = calibrate_frame(
            raw, overscan=recipe.overscan, trim=recipe.trim, bias=masters["bias"], dark=masters["dark"],
            dark_scale=recipe.dark_scale, dark_optimize=options.dark_optimize, flat=masters["flat"],
            flat_floor=options.flat_floor, gain=gain, read_noise=read_noise, saturation=saturation,
            cosmic_rays=options.cosmic_rays, bad_pixels=_bad_pixel_map(run), hot_sigma=options.hot_sigma,
            to_electrons=options.to_electrons, uncertainty=options.uncertainty)
        level = result.overscan.level if result.overscan is not None else None
        header = _light_header(job, raw_header, plan, run, level, result=result, masters=masters,
                               gain_source=gain_source)
        write_fits(run.out_dir / job.output, result.data, header, uncertainty=result.uncertainty,
                   mask=result.mask, unit=result.unit)
    except OutputError:
        raise
    except CcdcalError as exc:
        return str(job.frame.path), str(exc)
    run.record(job.output, fp, inputs, {"kind": "light"})
    return job.output, None


def _datasum(path: Path) -> str:
    from astropy.io import fits

    return str(fits.getheader(path, 0).get("DATASUM", ""))


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output folder ({exc.strerror}); choose another with -o") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"{out_dir}: the output folder is not writable; choose another with -o")
    for stale in list(out_dir.glob(".*.partial")) + list(out_dir.glob("*/.*.partial")):
        try:
            stale.unlink()
        except OSError:
            pass


def reduce(paths: Any, out_dir: str | os.PathLike, *, options: ReduceOptions | None = None,
           dry_run: bool = False, force: bool = False, progress: bool = False) -> ReduceResult:
    """Reduce a night: build every master and calibrate every light found under ``paths``.

    Parameters
    ----------
    paths : path-like or sequence of path-like
        Raw files, folders or glob patterns.
    out_dir : path-like
        Output folder: ``masters/``, ``calibrated/``, ``previews/``, ``report.html``, ``manifest.json``.
    options : ReduceOptions, optional
        Every choice; the defaults reduce a typical night correctly.
    dry_run : bool
        Build and print the plan only.
    force : bool
        Redo every output even when the manifest says it is up to date.
    progress : bool
        Progress bars and tables on the terminal.

    Returns
    -------
    ReduceResult
    """
    import contextlib
    import warnings

    caught: list[str] = []

    @contextlib.contextmanager
    def recorded():
        # every warning of the run also goes to the manifest and the report
        with warnings.catch_warnings():
            previous = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if str(message) not in caught:
                    caught.append(str(message))
                previous(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            yield

    with recorded():
        return _reduce(paths, out_dir, options=options, dry_run=dry_run, force=force, progress=progress,
                       caught=caught)


def _reduce(paths: Any, out_dir: str | os.PathLike, *, options: ReduceOptions | None, dry_run: bool,
            force: bool, progress: bool, caught: list[str]) -> ReduceResult:
    from .ui import print_plan, print_summary, track, warn

    options = options or ReduceOptions()
    options.validate()
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out_dir = Path(out_dir)
    inventory = scan(list(paths), exclude=out_dir, progress=progress)
    plan = build_plan(inventory, options.plan_options())
    if dry_run:
        if progress:
            print_plan(plan)
        return ReduceResult(out_dir=out_dir, plan=plan, skipped=list(plan.skipped))
    _check_out_dir(out_dir)
    if progress:
        for w in plan.warnings:
            warn(w)
        for f in inventory.frames:
            for flag in f.flags:
                warn(f"{f.name}: {flag}" + ("" if options.exclude_flagged else " (kept; --exclude-flagged drops it)"))
    if options.strict and plan.skipped:
        s = plan.skipped[0]
        raise InputError(f"{s.path}: {s.reason} (--strict: {len(plan.skipped)} input(s) would be skipped)")

    run = _Run(out_dir, options, force, progress)
    result = ReduceResult(out_dir=out_dir, plan=plan, skipped=list(plan.skipped), warnings=caught)
    for job in track(plan.masters, "building masters", enabled=progress):
        why = next((run.missing_master(r) for r in job.recipes if run.missing_master(r)), None)
        if why:
            run.failed[job.name] = why
            result.skipped.append(Skipped(job.label.split("   ")[0].strip(), why))
            continue
        inputs = [_input_record(f.path, f.hdu) for f in job.members]
        fp = _fingerprint(__version__, inputs, [_recipe_json(r) for r in job.recipes],
                          dataclasses.asdict(job.settings), options.flat_floor, _physics(options),
                          sorted(run.master_prints.get(n) for n in job.depends_on))
        try:
            if run.up_to_date(job.output, fp):
                _load_master(run, job)
                result.reused += 1
            else:
                _build_master(run, job, inputs)
        except OutputError:
            raise
        except CcdcalError as exc:
            if options.strict:
                raise
            run.failed[job.name] = str(exc)
            result.skipped.append(Skipped(job.label.split("   ")[0].strip(), str(exc)))
            continue
        run.master_prints[job.name] = _datasum(out_dir / job.output)
        run.record(job.output, fp, inputs, {"kind": job.kind.value})
        result.masters.append(job.output)
        _write_manifest(run, inventory, plan, result)

    from .executor import make_executor

    executor = make_executor(options.workers)  # lights share this process's masters
    try:
        outcomes = executor.map(lambda job: _calibrate_light(run, plan, job), plan.lights)
        for output, reason in track(outcomes, "calibrating lights", enabled=progress, total=len(plan.lights)):
            if reason is None:
                result.lights.append(output)
            else:
                if options.strict:
                    raise InputError(f"{output}: {reason}")
                result.skipped.append(Skipped(output, reason))
    finally:
        executor.close()
    result.reused += sum(1 for v in run.outputs.values() if v.get("reused"))
    _write_manifest(run, inventory, plan, result)
    if options.report:
        try:
            from .report import build_report
        except ImportError:
            build_report = None
        if build_report is not None:
            result.report = build_report(out_dir, _manifest(run, inventory, plan, result))
    if progress:
        print_summary(result)
    return result


def _manifest(run: _Run, inventory: Inventory, plan: Plan, result: ReduceResult) -> dict[str, Any]:
    inputs = []
    for f in inventory.frames:
        row = f.to_json()
        inputs.append(row)
    data = {
        "ccdcal_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": run.options.to_json(),
        "inputs": inputs,
        "plan_text": plan.describe(),
        **plan.to_json(),
        "skipped": [s.to_json() for s in result.skipped],
        "run_warnings": list(result.warnings),
        "outputs": dict(sorted(run.outputs.items())),
    }
    return data


def _write_manifest(run: _Run, inventory: Inventory, plan: Plan, result: ReduceResult) -> None:
    manifest = _manifest(run, inventory, plan, result)
    # Outputs of the previous run that this one has not reached yet stay listed, so a
    # run killed now still knows they are up to date.
    for rel, entry in run.old.items():
        manifest["outputs"].setdefault(rel, entry)
    write_text(run.out_dir / "manifest.json", json.dumps(manifest, indent=1, default=str))


@dataclass
class VerifyResult:
    """What :func:`verify` found: outputs that check out, and problems (path, reason)."""

    ok: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    stale: list[tuple[str, str]] = field(default_factory=list)


def verify(out_dir: str | os.PathLike) -> VerifyResult:
    """Check every output listed in OUT/manifest.json: present, same SHA-256 as recorded, and
    FITS CHECKSUM/DATASUM valid; outputs whose inputs changed since are reported as stale."""
    import warnings

    from astropy.io import fits

    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.exists():
        raise InputError(f"{out_dir}: no manifest.json here; is this a ccdcal reduce output folder?")
    try:
        outputs = json.loads(path.read_text(encoding="utf-8"))["outputs"]
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{path}: unreadable manifest ({exc}); rerun reduce to rewrite it") from exc
    result = VerifyResult()
    for rel, entry in sorted(outputs.items()):
        target = out_dir / rel
        if not target.exists():
            result.problems.append((rel, "missing"))
            continue
        if file_sha256(target) != entry.get("sha256"):
            result.problems.append((rel, "content differs from the manifest (modified or corrupted)"))
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with fits.open(target, checksum=True) as hdul:
                    for hdu in hdul:
                        _ = hdu.data
            except (OSError, ValueError) as exc:
                result.problems.append((rel, f"unreadable FITS ({exc})"))
                continue
        bad = [str(w.message) for w in caught if "checksum" in str(w.message).lower() or "datasum" in str(w.message).lower()]
        if bad:
            result.problems.append((rel, f"CHECKSUM/DATASUM mismatch: {bad[0]}"))
            continue
        changed = []
        for record in entry.get("inputs", []):
            src = Path(record["path"])
            if not src.exists():
                changed.append(f"{src.name} is gone")
            elif file_sha256(src) != record.get("sha256"):
                changed.append(f"{src.name} changed")
        if changed:
            result.stale.append((rel, "; ".join(changed)))
        result.ok.append(rel)
    return result
