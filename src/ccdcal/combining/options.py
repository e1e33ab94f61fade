"""Every choice of a combine, validated once (:class:`CombineOptions`), and the memory budget
(:func:`parse_memory`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..io.headers import header_gain, header_read_noise
from . import _kernels as K

METHODS = ("median", "mean", "sum")
SCALES = ("median", "mean", "clipped-mean", "none")
REJECTS = ("sigma", "mad", "winsorized", "percentile", "linear-fit", "ccdclip", "none")
CENTERS = ("median", "mean")
DEFAULT_THRESHOLDS = {"percentile": (0.2, 0.1)}  # every other algorithm: (3.0, 3.0)
DEFAULT_MEMORY = "1GiB"


def parse_memory(memory: str | int) -> int:
    """Bytes of a memory budget such as ``"1GiB"``, ``"256MiB"``, ``"500MB"`` or an int."""
    if isinstance(memory, (int, np.integer)) and not isinstance(memory, bool):
        if memory > 0:
            return int(memory)
        raise InputError(f"memory budget {memory!r} must be positive; write it like '1GiB' or '256MiB'")
    text = str(memory).strip().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
             "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "K": 1024,
             "M": 1024**2, "G": 1024**3, "B": 1}
    upper = text.upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                value = float(upper[: -len(unit)])
            except ValueError:
                break
            if value > 0 and math.isfinite(value):
                return int(value * units[unit])
            break
    try:
        value = float(text)
        if value > 0 and math.isfinite(value):
            return int(value)
    except ValueError:
        pass
    raise InputError(f"memory budget {memory!r} not understood; write it like '1GiB' or '256MiB'")


def _check_name(value: Any, allowed: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InputError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return value


def _pair(value: Any, what: str, kind: type) -> tuple[Any, Any]:
    try:
        low, high = value
        low, high = kind(low), kind(high)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be a pair (low, high), got {value!r}") from exc
    if kind is int and (low < 0 or high < 0):
        raise InputError(f"{what} counts must be 0 or more, got {value!r}")
    if kind is float and not (low > 0 and high > 0 and math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"{what} thresholds must be positive numbers, got {value!r}")
    return low, high


def _per_frame_spec(spec: Any, what: str) -> Any:
    """A level name or None as it is; per-frame values as (nested) tuples of float, so the
    options stay hashable and compare by value ("none" means None)."""
    if spec is None or isinstance(spec, str):
        return None if spec == "none" else spec
    try:
        values = np.asarray(spec, dtype=float).tolist()
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} values must be finite numbers") from exc

    def frozen(v: Any) -> Any:
        return tuple(frozen(x) for x in v) if isinstance(v, list) else v

    return frozen(values)


def given_factors(spec: Any, what: str, n: int) -> np.ndarray | None:
    """Given per-frame values (scale, zero or weights) checked against ``n`` frames, as
    float64 (n,); None for a level name or nothing."""
    if spec is None or isinstance(spec, str):
        return None
    values = np.asarray(spec, dtype=float)
    if values.shape != (n,):
        raise InputError(f"{what} has {values.size} values for {n} frames; give one per frame")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what} values must be finite numbers")
    if what == "scale" and np.any(values <= 0):
        raise InputError("scale factors must be positive")
    if what == "weights" and np.any(values <= 0):
        raise InputError("weights must be positive numbers")
    return values


@dataclass(frozen=True)
class CombineOptions:
    """Every choice of a combine, validated once: the keywords of :func:`combine` besides
    the frames and the memory budget, with the same names and meanings (see there).

    The constructor checks them (raising :class:`~ccdcal.errors.InputError` with the
    messages :func:`combine` gives) and fills in the defaults, so the fields say what will
    be done: ``reject`` and ``center`` are names; ``sigma_clip`` holds the thresholds
    (None only with ``reject="none"``); ``clip_extrema`` is None when no extrema are
    rejected; ``maxiters`` None repeats until a pass rejects nothing (1 with
    ``compat="ccdproc"``); ``gain`` (e-/ADU) and ``read_noise`` (e-) are numbers for
    ``ccdclip`` and None otherwise; ``scale`` and ``zero`` are a level name, a tuple of
    per-frame values or None; ``weights`` a tuple or None. :meth:`create` also reads ccdclip's
    gain and read noise from a header and checks per-frame values against the frame count.

    The object is frozen, hashable and picklable (it travels to worker processes), and it
    is the only code that knows how the kernels take their parameters
    (:meth:`kernel_params`).
    """

    method: str = "median"
    scale: str | tuple[float, ...] | None = None
    zero: str | tuple[float, ...] | None = None
    scale_region: str | None = None
    clip_extrema: tuple[int, int] | None = None
    sigma_clip: tuple[float, float] | None = None
    reject: str | None = None
    center: str | None = None
    maxiters: int | None = None
    weights: tuple[float, ...] | None = None
    gain: float | None = None
    read_noise: float | None = None
    sensitivity_noise: float = 0.0
    pedestal: float = 0.0
    compat: str | None = None

    def __post_init__(self) -> None:
        def resolve(**values: Any) -> None:
            for name, value in values.items():
                object.__setattr__(self, name, value)

        _check_name(self.method, METHODS, "method")
        if self.compat not in (None, "ccdproc"):
            raise InputError(f"compat {self.compat!r} is not understood; the only choice is 'ccdproc'")
        if self.clip_extrema is not None:
            resolve(clip_extrema=_pair(self.clip_extrema, "clip_extrema", int))
        reject = self.reject if self.reject is not None else ("sigma" if self.sigma_clip is not None else "none")
        _check_name(reject, REJECTS, "reject")
        if reject == "none" and self.sigma_clip is not None:
            raise InputError("sigma_clip thresholds were given with reject='none'; drop one of them")
        if self.sigma_clip is not None:
            resolve(sigma_clip=_pair(self.sigma_clip, "sigma_clip", float))
        elif reject != "none":
            resolve(sigma_clip=DEFAULT_THRESHOLDS.get(reject, (3.0, 3.0)))
        center = self.center if self.center is not None else ("mean" if self.compat else "median")
        resolve(reject=reject, center=_check_name(center, CENTERS, "center"))
        maxiters = self.maxiters
        if maxiters is not None and (not isinstance(maxiters, (int, np.integer)) or maxiters < 1):
            raise InputError(f"maxiters must be a whole number of at least 1, got {maxiters!r}")
        if self.weights is not None and self.method == "median":
            raise InputError("weights apply to mean and sum combines; use method='mean' or drop the weights")
        self._check_noise_model()
        resolve(maxiters=None if maxiters is None else int(maxiters), pedestal=float(self.pedestal),
                sensitivity_noise=float(self.sensitivity_noise))
        if self.compat:
            if reject not in ("sigma", "mad", "none"):
                raise InputError(f"compat='ccdproc' clips with 'sigma' or 'mad' only, not {reject!r}")
            if self.maxiters not in (None, 1):
                raise InputError("compat='ccdproc' clips in a single pass; leave maxiters unset")
            if self.zero is not None and not (isinstance(self.zero, str) and self.zero == "none"):
                raise InputError("compat='ccdproc' has no zero offsets; drop zero")
            resolve(maxiters=1)
        for what in ("scale", "zero"):
            spec = getattr(self, what)
            if isinstance(spec, str) and spec != "none":
                _check_name(spec, SCALES, what)
        resolve(scale=_per_frame_spec(self.scale, "scale"), zero=_per_frame_spec(self.zero, "zero"),
                weights=_per_frame_spec(self.weights, "weights"))

    def _check_noise_model(self) -> None:
        """ccdclip's gain and read noise, and the pedestal and sensitivity noise."""
        if self.reject == "ccdclip":
            gain, read_noise = self.gain, self.read_noise
            if not isinstance(gain, (int, float)) or not gain > 0:
                raise InputError("ccdclip needs the gain in e-/ADU; pass gain= (--gain) or set GAIN in the headers")
            if not isinstance(read_noise, (int, float)) or read_noise < 0:
                raise InputError("ccdclip needs the read noise in e-; pass read_noise= (--read-noise) or set RDNOISE")
            object.__setattr__(self, "gain", float(gain))
            object.__setattr__(self, "read_noise", float(read_noise))
        else:
            object.__setattr__(self, "gain", None)
            object.__setattr__(self, "read_noise", None)
        if math.isnan(self.pedestal) or self.pedestal == -math.inf:
            raise InputError(f"pedestal must be a number of ADU (or inf), got {self.pedestal!r}")
        if not (self.sensitivity_noise >= 0 and math.isfinite(self.sensitivity_noise)):
            raise InputError(f"sensitivity_noise must be 0 or more, got {self.sensitivity_noise!r}")

    @classmethod
    def create(cls, n_frames: int, *, header: Any = None, **choices: Any) -> CombineOptions:
        """Options for combining ``n_frames`` frames.

        ``choices`` are the fields (the keywords of :func:`combine`). With
        ``reject="ccdclip"``, a gain or read noise left None is read from ``header`` (the
        first frame's) by :mod:`ccdcal.io.headers`' rules: a gain only where the header states
        it in e-/ADU (EGAIN, or GAIN with an e-/ADU comment; a camera's GAIN *setting* such
        as ZWO's 0-600 never counts), RDNOISE/READNOIS/RON in e-. Per-frame ``scale``,
        ``zero`` and ``weights`` values must number ``n_frames``.
        """
        if choices.get("reject") == "ccdclip" and header is not None:
            if choices.get("gain") is None:
                choices["gain"] = header_gain(header)[0]
            if choices.get("read_noise") is None:
                choices["read_noise"] = header_read_noise(header)
        options = cls(**choices)
        options.check_frames(n_frames)
        return options

    def check_frames(self, n_frames: int) -> None:
        """Raise :class:`~ccdcal.errors.InputError` unless the per-frame values (scale, zero,
        weights) give one value for each of ``n_frames`` frames."""
        for what in ("scale", "zero", "weights"):
            given_factors(getattr(self, what), what, n_frames)

    @property
    def low(self) -> float:
        """The low rejection threshold (the default one where nothing is rejected)."""
        return (self.sigma_clip or DEFAULT_THRESHOLDS.get(self.reject, (3.0, 3.0)))[0]

    @property
    def high(self) -> float:
        """The high rejection threshold (the default one where nothing is rejected)."""
        return (self.sigma_clip or DEFAULT_THRESHOLDS.get(self.reject, (3.0, 3.0)))[1]

    @property
    def nlow(self) -> int:
        return 0 if self.clip_extrema is None else self.clip_extrema[0]

    @property
    def nhigh(self) -> int:
        return 0 if self.clip_extrema is None else self.clip_extrema[1]

    def kernel(self, *, has_uncertainty: bool = False) -> str:
        """The kernel that combines: ``"ccdproc"`` (compat), ``"fast"`` (the vectorised one:
        rejection none or sigma, or ccdclip of frames neither scaled nor offset without
        extrema rejection; no weights, no input uncertainties) or ``"general"``.
        ``has_uncertainty``: every frame carries one."""
        if self.compat:
            return "ccdproc"
        unscaled = all(spec is None or (isinstance(spec, str) and spec == "none") for spec in (self.scale, self.zero))
        rejects = ("none", "sigma") + (("ccdclip",) if unscaled and self.nlow + self.nhigh == 0 else ())
        simple = self.reject in rejects and self.weights is None and not has_uncertainty
        return "fast" if simple else "general"

    def kernel_params(self, *, has_mask: bool = False,
                      has_uncertainty: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The (iparams int64, fparams float64) arrays of the kernel :meth:`kernel` picks.

        ``combine_tile`` and ``combine_tile_sorted`` share one layout (``_kernels.I_*`` and
        ``F_*``); ``combine_tile_ccdproc`` has its own. ``has_mask``: the tiles carry a
        validity plane; ``has_uncertainty``: every frame carries uncertainties.
        """

        kernel = self.kernel(has_uncertainty=has_uncertainty)
        method = {"median": K.MEDIAN, "mean": K.MEAN, "sum": K.SUM}[self.method]
        center = K.CENTER_MEAN if self.center == "mean" else K.CENTER_MEDIAN
        if kernel == "ccdproc":
            # method, nlow, nhigh, do_extrema, do_sigma, center, spread, has_valid, has_weights
            ints = [method, self.nlow, self.nhigh, int(self.clip_extrema is not None),
                    int(self.reject != "none"), center,
                    K.SPREAD_MAD if self.reject == "mad" else K.SPREAD_STD,
                    int(has_mask), int(self.weights is not None)]
            return np.array(ints, np.int64), np.array([self.low, self.high], np.float64)
        rejects = {"none": K.REJECT_NONE, "sigma": K.SIGMA, "mad": K.MAD, "winsorized": K.WINSORIZED,
                   "percentile": K.PERCENTILE, "linear-fit": K.LINEAR_FIT, "ccdclip": K.CCDCLIP}
        general = kernel == "general"  # follows frame indices: rejections are counted per member
        ints = {K.I_METHOD: method, K.I_NLOW: self.nlow, K.I_NHIGH: self.nhigh,
                K.I_REJECT: rejects[self.reject], K.I_CENTER: center, K.I_MAXITERS: self.maxiters or 0,
                K.I_HAS_VALID: int(has_mask), K.I_HAS_UNC: int(general and has_uncertainty),
                K.I_NEED_INDEX: int(general)}
        floats = {K.F_LOW: self.low, K.F_HIGH: self.high,
                  K.F_GAIN: 1.0 if self.gain is None else self.gain,
                  K.F_RDNOISE: 0.0 if self.read_noise is None else self.read_noise,
                  K.F_SNOISE: self.sensitivity_noise, K.F_PEDESTAL: self.pedestal}
        iparams = np.zeros(len(ints), np.int64)
        fparams = np.zeros(len(floats), np.float64)
        for index, value in ints.items():
            iparams[index] = value
        for index, value in floats.items():
            fparams[index] = value
        return iparams, fparams


def sample_sigma_can_reject(n: int, threshold: float, *, center: str = "median") -> bool:
    """Whether a clip with σ from the same ``n`` values can ever reject one of them.

    With σ the population std of the sample (Samuelson's inequality), no value lies
    further than ``√(n−1)`` σ from the mean, and one outlier among ``n`` values no further
    than ``n/√(n−1)`` σ from the median. So at 3σ a sample-σ clip about the median never
    fires for n ≤ 7, about the mean for n ≤ 10, whatever the outlier's size.
    """
    if n < 3:
        return False
    bound = math.sqrt(n - 1) if center == "mean" else n / math.sqrt(n - 1)
    return bound > threshold
