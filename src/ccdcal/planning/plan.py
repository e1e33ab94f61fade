"""The plan of a reduction: which masters are built from which frames, and which masters each
frame gets, and why. Pure decisions over :class:`~ccdcal.planning.inventory.FrameInfo`; nothing is read.

Matching rules (the same for calibration members and lights):

- geometry first: the same binning, raw shape, image HDU and trim section;
- temperatures within ``temp_tolerance`` are equal (detectors jitter by tenths of a
  degree); biases and darks are grouped into temperature clusters;
- bias: the master bias of that geometry and temperature cluster (a cluster no frame
  needs, such as one warm bias, is left out with the reason);
- dark: among the master darks within the tolerance (else those of the nearest
  temperature, with a note), the exact exposure, else the one adding least noise among
  the longer ones, else the longest; scaled by the exposure ratio (only when a bias
  exists to remove the bias from the dark, otherwise an exact-exposure dark is used
  unscaled); see :func:`ccdcal.calibration.masters.choose_dark`;
- flat: the master flat of the same geometry and filter.

The grouping and matching criteria are data (:data:`CALIBRATION_CRITERIA`). One planner per
kind applies them, in order: :func:`plan_biases`, :func:`plan_darks`, :func:`plan_flats`, then
:func:`plan_lights`. Each one extends the :class:`MasterIndex` of the masters planned before
it, and chooses a frame's masters through that index.

Masters are stacked by default with a mean of the values that survive a noise-model clip
(``reject="auto"``): σ of each value from the detector's read noise and gain, not from the
same few values, so a cosmic ray is rejected at any group size (a sample-σ clip cannot
reject one outlier among 7 or fewer values at 3σ). Bias and dark frames whose level is
off from their group by more than :data:`GROSS_LEVEL_NOISE` times the per-pixel noise are
left out of the master (``keep_flagged`` keeps them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from .._repr import plan_html
from .._shared.names import NameBook, printable, safe_part, unique_stem
from .._shared.robust import MAD_TO_STD
from ..calibration.masters import choose_dark, dark_scale_for
from ..calibration.overscan import OverscanSpec, overscan_geometry
from ..calibration.recipe import Recipe
from ..io.headers import is_cmos
from .inventory import (
    CFA_CELLS,
    FrameInfo,
    FrameKind,
    Inventory,
    Skipped,
    frame_temperature,
    looks_like_cfa,
    temperature_groups,
)
from .library import Library

KIND_ORDER = {FrameKind.BIAS: 0, FrameKind.DARK: 1, FrameKind.FLAT: 2}
#: A bias or dark without overscan whose median level is off from its group's by more than this
#: many times the group's per-pixel noise (and by more than 5 robust spreads of the group's
#: levels) is left out of the master: it would shift every pixel of it. With an overscan the
#: raw level may drift freely; the overscan takes it out.
GROSS_LEVEL_NOISE = 2.0
#: Darks this short (s) carry no measurable dark current: without bias frames they are the zero level.
ZERO_EXPOSURE = 1.0

#: What makes the frames of one kind one master ("group"), what a frame is matched on when its
#: master of that kind is chosen ("match", see :class:`MasterIndex`), and whether the members
#: are scaled to a common level before stacking (BANZAI's CALIBRATION_SET_CRITERIA, as data).
#: Each grouping key labels the frames of one geometry through :data:`GROUP_LABELS`.
CALIBRATION_CRITERIA: dict[FrameKind, dict[str, Any]] = {
    FrameKind.BIAS: {"group": ("geometry", "temperature cluster"),
                     "match": ("geometry", "nearest temperature cluster"),
                     "scaled": False},
    FrameKind.DARK: {"group": ("geometry", "exposure", "temperature cluster"),
                     "match": ("geometry", "temperature within tolerance", "exposure"),
                     "scaled": False},
    FrameKind.FLAT: {"group": ("geometry", "filter"),
                     "match": ("geometry", "filter"),
                     "scaled": True},
}


@dataclass(frozen=True)
class CombineSettings:
    """How a master is stacked (see :func:`ccdcal.combining.engine.combine`)."""

    method: str = "mean"
    sigma_clip: tuple[float, float] | None = (3.0, 3.0)
    clip_extrema: tuple[int, int] | None = None
    scale: str | None = None
    scale_region: str | None = None
    reject: str = "auto"      # "auto": noise-model clip (σ from read noise and gain); or a combine() name

    def describe(self) -> str:
        parts = [self.method]
        if self.clip_extrema:
            parts.append(f"minmax {self.clip_extrema[0]}/{self.clip_extrema[1]}")
        if self.sigma_clip and self.reject != "none":
            what = "noise-model clip" if self.reject == "auto" else self.reject
            parts.append(f"{what} {self.sigma_clip[0]:g}/{self.sigma_clip[1]:g}")
        if self.scale:
            where = f" of {self.scale_region}" if self.scale_region else " of the central half"
            parts.append(f"scaled by {self.scale}{where}")
        return ", ".join(parts)


def member_steps(recipes: tuple[Recipe, ...]) -> list[str]:
    """The distinct recipes of a master's members, dark scales shown as one range."""
    groups: dict[Recipe, list[float]] = {}
    for r in recipes:
        groups.setdefault(replace(r, dark_scale=1.0), []).append(r.dark_scale)
    steps = []
    for base, scales in groups.items():
        text = base.describe()
        if base.dark:
            lo, hi = min(scales), max(scales)
            span = f"×{lo:.3g}" if lo == hi else f"×{lo:.3g}–{hi:.3g}"
            text = text.replace("dark ×1", f"dark {span}")
        steps.append(text)
    return sorted(steps)


@dataclass(frozen=True)
class MasterJob:
    """One master frame to build."""

    kind: FrameKind
    name: str                          # output file name under masters/
    label: str                         # what the plan prints
    members: tuple[FrameInfo, ...]
    recipes: tuple[Recipe, ...]        # one per member: overscan, trim, bias/dark to remove
    settings: CombineSettings
    excluded: tuple[FrameInfo, ...] = ()
    excluded_reasons: tuple[str, ...] = ()     # one per excluded frame
    exptime: float | None = None
    temperature: float | None = None
    filter: str | None = None
    geometry: tuple = ()
    cfa: str | None = None                     # a flat of a colour camera: "channel" (each CFA colour to 1) or "scalar"

    @property
    def output(self) -> str:
        return f"masters/{self.name}"

    @property
    def depends_on(self) -> set[str]:
        return {m for r in self.recipes for m in (r.bias, r.dark) if m}


@dataclass(frozen=True)
class LightJob:
    """One light to calibrate, with its recipe and the reasons for the choices."""

    frame: FrameInfo
    output: str                        # calibrated/<stem>.fits
    recipe: Recipe
    notes: tuple[str, ...] = ()
    uncorrected: str | None = None     # why the pedestal stays in (kept only with allow_uncorrected)


@dataclass(frozen=True)
class StackJob:
    """The calibrated lights of one target in one filter, to be judged, registered and stacked."""

    target: str
    filter: str | None
    lights: tuple[LightJob, ...]
    output: str                        # stacked/<target>_<filter>.fits


@dataclass(frozen=True)
class Plan:
    masters: tuple[MasterJob, ...]
    lights: tuple[LightJob, ...]
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()
    light_steps: tuple[str, ...] = ()
    stacks: tuple[StackJob, ...] = ()
    library: tuple[str, ...] = ()            # masters of earlier runs the recipes use (their paths)

    def _repr_html_(self) -> str:
        return plan_html(self)

    def master(self, name: str) -> MasterJob:
        return next(m for m in self.masters if m.name == name)

    def describe(self) -> str:
        """The plan as lines a person reads (what ``reduce --dry-run`` prints)."""
        lines = []
        for job in self.masters:
            count = f"{len(job.members)} frame" + ("s" if len(job.members) != 1 else "")
            lines.append(f"{job.label:<44} {count:>10}   {job.settings.describe()}")
            for step in member_steps(job.recipes):
                lines.append(f"    each frame: {step}")
            for f, why in zip(job.excluded, job.excluded_reasons or ("flagged",) * len(job.excluded),
                              strict=True):
                lines.append(f"    left out: {f.name} ({why})")
            lines.append(f"    -> {job.output}")
        if not self.lights:
            lines.append("no lights: building masters only")
        elif self.light_steps:
            lines.append(f"each light: {', '.join(self.light_steps)}")
        for light in self.lights:
            r = light.recipe
            chosen = []
            if r.bias:
                chosen.append("bias")
            if r.dark:
                chosen.append(f"dark {light.frame.exptime:g} s (library)" if r.dark in self.library else
                              f"dark {self.master(r.dark).exptime:g} s ×{r.dark_scale:.3g}")
            if r.flat:
                chosen.append(f"flat {light.frame.filter or ''} (library)" if r.flat in self.library else
                              f"flat {self.master(r.flat).filter or ''}".rstrip())
            lines.append(f"light {light.frame.name:<36} <- {', '.join(chosen) or 'nothing'}")
            for note in light.notes:
                lines.append(f"    note: {note}")
        for job in self.stacks:
            lines.append(f"stack {job.target} {job.filter or ''}: {len(job.lights)} lights, judged and registered"
                         f" -> {job.output}")
        for s in self.skipped:
            lines.append(f"skipped {s.path}: {s.reason}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "masters": [
                {"kind": m.kind.value, "label": m.label, "output": m.output,
                 "members": [str(f.path) for f in m.members],
                 "excluded": [str(f.path) for f in m.excluded],
                 "excluded_reasons": list(m.excluded_reasons),
                 "description": m.settings.describe(), "exptime": m.exptime, "filter": m.filter}
                for m in self.masters
            ],
            "lights": [
                {"input": str(j.frame.path), "hdu": j.frame.hdu, "output": j.output,
                 "bias": self._out(j.recipe.bias), "dark": self._out(j.recipe.dark),
                 "dark_scale": j.recipe.dark_scale if j.recipe.dark else None,
                 "flat": self._out(j.recipe.flat), "notes": list(j.notes)}
                for j in self.lights
            ],
            "stacks": [{"target": j.target, "filter": j.filter, "output": j.output,
                        "lights": [x.output for x in j.lights]} for j in self.stacks],
            "skipped": [s.to_json() for s in self.skipped],
            "warnings": list(self.warnings),
        }

    @staticmethod
    def _out(name: str | None) -> str | None:
        return f"masters/{name}" if name else None


@dataclass(frozen=True)
class PlanOptions:
    """The choices of :func:`build_plan` (a subset of the reduce options)."""

    overscan: bool = True
    overscan_model: str = "legendre"
    overscan_order: int = 3
    combine_method: str | None = None            # None: mean of the survivors (median of 1-2 frames)
    sigma_clip: tuple[float, float] | None = (3.0, 3.0)
    reject: str = "auto"
    clip_extrema: tuple[int, int] | None = None
    scale_region: str | None = None
    temp_tolerance: float = 2.0
    exclude_flagged: bool = False
    keep_flagged: bool = False                   # keep even gross level outliers in their masters
    allow_uncorrected: bool = False              # calibrate lights that keep their pedestal (with a note)
    exptime_tolerance: float = 0.01              # relative: 60 s and 60.3 s darks are one group
    scale_darks: str = "auto"                    # auto: CCD darks scaled by exposure, CMOS darks matched only
    flat_max_age: float = 30.0                   # days: a library flat further from a light is not used
    masters: tuple[str, ...] = ()                # folders of masters of earlier runs (read by the caller)
    bayer_pattern: str | None = None             # the pattern of colour frames whose header has none
    flat_cfa: str = "channel"                    # a colour camera's flat: each CFA colour to 1, or one scalar
    light_steps: tuple[str, ...] = ()            # what every light gets beyond its masters (for the plan text)
    stack: bool = False                          # stack the calibrated lights per target and filter


def geometry(info: FrameInfo) -> tuple:
    """Frames that can share masters have equal geometry and camera settings (a master never
    crosses a GAIN, OFFSET or readout mode)."""
    return (info.binning, info.shape, info.hdu if info.n_hdus > 1 else 0, info.trimsec, info.biassec, info.camera)


def _geom_text(geom: tuple, *, camera: bool = False) -> str:
    (bx, by), (ny, nx), hdu, _, _, settings = geom
    text = f"{bx}x{by}_{nx}x{ny}"
    if camera:
        text += "".join(f"_{name.lower()}{value}" for name, value in settings)
    return text + (f"_hdu{hdu}" if hdu else "")


def settings_text(camera: tuple[tuple[str, str], ...]) -> str:
    """Camera settings as the plan names them: ``GAIN 100, OFFSET 50``."""
    return ", ".join(f"{name} {printable(value)}" for name, value in camera)


def _settings(n: int, options: PlanOptions, *, scale: bool) -> CombineSettings:
    method = options.combine_method or ("mean" if n >= 3 else "median")
    reject = options.reject if (n >= 3 and options.sigma_clip) else "none"
    return CombineSettings(
        method=method,
        reject=reject,
        sigma_clip=options.sigma_clip if reject != "none" else None,
        clip_extrema=options.clip_extrema if options.clip_extrema and n > sum(options.clip_extrema) else None,
        scale="median" if scale else None,
        scale_region=options.scale_region,
    )


def _group_exptime(values: list[float], tolerance: float) -> list[float]:
    """Representative exposure of each value: values within ``tolerance`` (relative) share one."""
    reps: list[float] = []
    out = []
    for v in values:
        match = next((r for r in reps if abs(r - v) <= tolerance * max(r, v, 1e-9)), None)
        if match is None:
            reps.append(v)
            match = v
        out.append(match)
    return out


#: How each grouping key of :data:`CALIBRATION_CRITERIA` labels the frames of one geometry:
#: frames with equal labels for every key of their kind share a master.
GROUP_LABELS: dict[str, Callable[[Sequence[FrameInfo], PlanOptions], list[Any]]] = {
    "geometry": lambda frames, options: [geometry(f) for f in frames],
    "temperature cluster": lambda frames, options: temperature_groups(
        [frame_temperature(f) for f in frames], options.temp_tolerance),
    "exposure": lambda frames, options: _group_exptime(
        [f.exptime for f in frames], options.exptime_tolerance),
    "filter": lambda frames, options: [f.filter for f in frames],
}


def steps_done(info: FrameInfo) -> set[str]:
    """The calibration steps a frame's header says were done, beyond overscan subtraction and
    trimming (which leave a frame usable as raw): a frame with any is not calibrated again."""
    return set(info.calibrated) - {"overscan", "trim"}


def _raw_frames(frames: list[FrameInfo], skipped: list[Skipped]) -> list[FrameInfo]:
    """The frames that are raw: those whose header says they were calibrated are listed as skipped.

    Overscan subtraction and trimming alone (IRAF's OVERSCAN/TRIM) leave a frame usable: its
    sections say what is left, and no overscan is fitted where none remains.
    """
    raw = []
    for f in frames:
        done = steps_done(f)
        if not done:
            raw.append(f)
            continue
        what = "a master frame" if "master" in done else f"already calibrated ({', '.join(sorted(done))})"
        skipped.append(Skipped(str(f.path), f"its header says it is {what}: not calibrated again;"
                               " give ccdcal the raw frames"))
    return raw


def _zero_level_from_short_darks(frames: list[FrameInfo], warnings: list[str]) -> list[FrameInfo]:
    """Without bias frames, darks of at most :data:`ZERO_EXPOSURE` s serve as the bias.

    Robotic observatories write biases as 0.1 s darks; their dark current is below the read
    noise, and without a zero level the longer darks could not be scaled and every light
    would keep its pedestal.
    """
    have_bias = {geometry(f) for f in frames if f.kind == FrameKind.BIAS}
    out = []
    used: dict[tuple, list[FrameInfo]] = {}
    for f in frames:
        geom = geometry(f)
        if (f.kind == FrameKind.DARK and geom not in have_bias and f.exptime is not None
                and 0 <= f.exptime <= ZERO_EXPOSURE):
            note = f"a {f.exptime:g} s dark used as bias (no bias frames; dark current negligible)"
            f = replace(f, kind=FrameKind.BIAS, warnings=(*f.warnings, note))
            used.setdefault(geom, []).append(f)
        out.append(f)
    for geom, group in used.items():
        times = sorted({g.exptime for g in group})
        warnings.append(f"no bias frames for {_geom_text(geom)}: {len(group)} dark(s) of "
                        f"{', '.join(f'{t:g}' for t in times)} s used as bias: {', '.join(g.name for g in group)}")
    return out


def _ignored_sections(frames: tuple[FrameInfo, ...]) -> list[str]:
    """One plan warning per distinct section keyword that the scan ignored, with its frame count."""
    seen: dict[str, list[str]] = {}
    for f in frames:
        for w in f.warnings:
            if w.endswith("ignored") and re.match(r"(BIAS|TRIM|DATA|CCD)SEC ", w):
                seen.setdefault(w, []).append(f.name)
    return [f"{w} ({len(names)} frame{'s' if len(names) != 1 else ''}, e.g. {names[0]})"
            for w, names in seen.items()]


def pedestal_left(bias: str | None, dark: str | None, flat_job: MasterJob | None = None) -> str | None:
    """Why a light would keep its pedestal (None when it is removed): the one rule, for planned
    masters and for masters given by hand (``flat_job`` None: a flat given by hand is taken as
    it is)."""
    if not (bias or dark):
        return "neither a master bias nor a dark of its exposure applies to it"
    if flat_job is not None and not any(r.bias or r.dark for r in flat_job.recipes):
        return f"its flat ({flat_job.name}) could not be bias-corrected, so it is normalised with the pedestal in"
    return None


def _mean_temperature(group: Sequence[FrameInfo]) -> float | None:
    known = [t for t in map(frame_temperature, group) if t is not None]
    return sum(known) / len(known) if known else None


def _nearest_bias(temp: float | None, candidates: Sequence[tuple[float | None, Hashable]],
                  sizes: Mapping[Hashable, int], tolerance: float) -> tuple[Any, str | None]:
    """The bias (or bias cluster) nearest ``temp``, as ``(temperature, name)`` candidates give it:
    the largest when either temperature is unknown; ties go to the larger. The note says when
    it is further than ``tolerance``."""
    known = [c for c in candidates if c[0] is not None]
    if temp is None or not known:
        return max(candidates, key=lambda c: sizes.get(c[1], 0))[1], None
    best = min(known, key=lambda c: (abs(c[0] - temp), -sizes.get(c[1], 0)))
    off = abs(best[0] - temp)
    note = (f"nearest master bias is {off:.1f} °C away from the frame's {temp:.1f} °C"
            if off > tolerance else None)
    return best[1], note


class BiasMaster(NamedTuple):
    """A master bias of one geometry."""

    temperature: float | None          # mean of its cluster, °C (None: unknown)
    name: str


class DarkMaster(NamedTuple):
    """A master dark of one geometry."""

    exptime: float
    temperature: float | None          # mean of its members, °C (None: unknown)
    name: str


@dataclass(frozen=True)
class MasterIndex:
    """The masters a plan builds, per geometry, as matching a frame to them needs them.

    :func:`plan_biases` starts it, :func:`plan_darks` and :func:`plan_flats` return it extended
    (nothing changes it in place); the ``*_for`` methods make the choices of
    :data:`CALIBRATION_CRITERIA` ``"match"`` and return them with the notes a light carries.
    """

    biases: Mapping[tuple, tuple[BiasMaster, ...]] = field(default_factory=dict)
    darks: Mapping[tuple, tuple[DarkMaster, ...]] = field(default_factory=dict)
    flats: Mapping[tuple, Mapping[str | None, str]] = field(default_factory=dict)  # filter -> name
    counts: Mapping[str, int] = field(default_factory=dict)     # master name -> frames combined
    temp_tolerance: float = 2.0
    exptime_tolerance: float = 0.01
    scale_darks: str = "auto"
    library: Library = field(default_factory=Library)   # masters of earlier runs, for what the night lacks
    flat_max_age: float = 30.0

    def bias_for(self, info: FrameInfo) -> tuple[str | None, tuple[str, ...]]:
        """The master bias of the frame's geometry whose temperature is nearest the frame's (the
        one of most frames when a temperature is unknown), and the notes."""
        candidates = self.biases.get(geometry(info))
        if not candidates:
            found = self.library.bias_for(info, self.temp_tolerance)
            if found is not None:
                return found.name, (f"master bias from the library: {found.describe()}",)
            return None, (_other_settings("bias", self.biases, info) or "no master bias for this binning/size",)
        name, note = _nearest_bias(frame_temperature(info), candidates, self.counts,
                                   self.temp_tolerance)
        return name, (note,) if note else ()

    def dark_for(self, info: FrameInfo,
                 bias: str | None) -> tuple[str | None, float, tuple[str, ...]]:
        """The master dark of the frame's geometry (see :func:`ccdcal.calibration.masters.choose_dark`), its
        scale and the notes. A dark of another exposure is used only when ``bias`` (the frame's
        master bias) is given: without it the dark's bias level would be scaled too."""
        candidates = self.darks.get(geometry(info), ())
        if not candidates:
            return self._library_dark(info, bias)
        notes: list[str] = []
        temp = frame_temperature(info)
        known = [c for c in candidates if c.temperature is not None]
        if temp is not None and known:
            nearest = min(abs(c.temperature - temp) for c in known)
            if nearest > self.temp_tolerance:
                notes.append(f"nearest master dark is {nearest:.1f} °C away from the frame's"
                             f" {temp:.1f} °C")
        t = info.exptime
        if t is None:
            return None, 0.0, (*notes, "no exposure time: dark not applied")
        name = choose_dark(t, {c.name: c.exptime for c in candidates},
                           tolerance=self.exptime_tolerance, counts=dict(self.counts),
                           temperature=temp,
                           temperatures={c.name: c.temperature for c in candidates},
                           temp_tolerance=self.temp_tolerance)
        t_dark = next(c.exptime for c in candidates if c.name == name)
        if abs(t_dark - t) <= self.exptime_tolerance * max(t, 1e-9):
            return name, 1.0 if not bias else dark_scale_for(t, t_dark), tuple(notes)
        if not bias:
            notes.append(f"no bias frames, so darks cannot be scaled to {t:g} s; none applied")
            return None, 0.0, tuple(notes)
        if self.scale_darks == "never" or (self.scale_darks == "auto" and is_cmos(info.camera)):
            why = "--scale-darks never" if self.scale_darks == "never" else \
                "a CMOS dark is not scaled by exposure (amp glow and a clamped dark current do not grow with it)"
            notes.append(f"no {t:g} s dark: {why}; none applied (--scale-darks always scales the {t_dark:g} s one)")
            return None, 0.0, tuple(notes)
        scale = dark_scale_for(t, t_dark)
        notes.append(f"no {t:g} s dark: the {t_dark:g} s dark is scaled by {scale:.4g}")
        if is_cmos(info.camera):
            notes.append("a CMOS dark scaled by exposure (--scale-darks always): what its glow leaves is"
                         " measured in the light (GLOWRES, and in the report)")
        return name, scale, tuple(notes)

    def _library_dark(self, info: FrameInfo, bias: str | None) -> tuple[str | None, float, tuple[str, ...]]:
        """A dark of the frame's exposure from the library when the night has none (never scaled;
        one that holds its bias is not used where a bias is subtracted too)."""
        other = _other_settings("dark", self.darks, info)
        found = self.library.dark_for(info, self.temp_tolerance, self.exptime_tolerance)
        if found is None:
            return None, 0.0, (other,) if other else ()
        if bias and not found.bias_subtracted:
            return None, 0.0, (f"the library dark {found.name} holds its bias and the frame's bias is subtracted"
                               " too (it would be removed twice): not used",)
        return found.name, 1.0, (f"master dark from the library: {found.describe()}",)

    def flat_for(self, info: FrameInfo) -> tuple[str | None, tuple[str, ...]]:
        """The master flat of the frame's geometry and filter (the only one when the frame has
        no filter), and the notes."""
        by_filter = self.flats.get(geometry(info), {})
        flat = by_filter.get(info.filter)
        if flat is not None:
            return flat, ()
        found, why = self.library.flat_for(info, self.temp_tolerance, self.flat_max_age)
        if found is not None:
            return found.name, (f"master flat from the library: {found.describe()}",)
        if why:
            return None, (why,)
        if not by_filter:
            return None, (_other_settings("flat", self.flats, info)
                          or "no flat frames for this binning/size: not flat-fielded",)
        if info.filter is None and len(by_filter) == 1:
            only = next(iter(by_filter.values()))
            return only, ("the light has no filter keyword; the only master flat is used",)
        have = ", ".join(map(str, by_filter))
        return None, (f"no master flat for filter {info.filter!r} (have: {have})",)


def _other_settings(what: str, table: Mapping[tuple, Any], info: FrameInfo) -> str | None:
    """Why a frame gets no master ``what`` although masters of its geometry exist at other camera
    settings (a master never crosses a GAIN, OFFSET or readout mode); None when none do."""
    geom = geometry(info)
    others = sorted({settings_text(g[-1]) or "no settings written" for g in table
                     if g[:-1] == geom[:-1] and g[-1] != geom[-1]})
    if not others:
        return None
    return (f"no master {what} at {settings_text(geom[-1]) or 'these camera settings'} (the master {what}s are at"
            f" {'; '.join(others)}): none applied")


@dataclass(frozen=True)
class PlanContext:
    """What the planners share: the options, and the plan's lists of skipped inputs and of
    warnings, which each planner extends in its turn (their order is the plan's)."""

    options: PlanOptions
    many_geometries: bool = False                  # master names then carry the geometry
    many_cameras: bool = False                     # ... and the camera settings
    library: Library = field(default_factory=Library)   # masters of earlier runs (--masters)
    bias_levels: Mapping[tuple, float] = field(default_factory=dict)   # -> median raw bias level
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    names: NameBook = field(default_factory=NameBook, compare=False)   # every output name, once
    _overscans: dict[tuple, tuple[OverscanSpec | None, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, frames: Sequence[FrameInfo], options: PlanOptions | None = None, *,
           skipped: list[Skipped] | None = None, warnings: list[str] | None = None,
           library: Library | None = None) -> PlanContext:
        """The context of a plan of ``frames`` (appending to ``skipped`` and ``warnings``)."""
        levels: dict[tuple, list[float]] = {}
        for f in frames:
            level = f.metrics.get("level", np.nan) if f.metrics else np.nan
            if f.kind == FrameKind.BIAS and np.isfinite(level):
                levels.setdefault(geometry(f), []).append(level)
        return cls(options=options or PlanOptions(),
                   many_geometries=len({geometry(f) for f in frames}) > 1,
                   many_cameras=len({f.camera for f in frames}) > 1,
                   bias_levels={g: float(np.median(v)) for g, v in levels.items()},
                   skipped=[] if skipped is None else skipped,
                   warnings=[] if warnings is None else warnings,
                   library=library or Library())

    def recipe(self, info: FrameInfo) -> Recipe:
        """The frame's overscan and trim (one fit per geometry), with no master yet."""
        geom = geometry(info)
        if geom not in self._overscans:
            spec, trim = overscan_geometry(info.shape, info.biassec, info.trimsec,
                                           model=self.options.overscan_model,
                                           order=self.options.overscan_order)
            self._overscans[geom] = (spec if self.options.overscan else None, trim)
        spec, trim = self._overscans[geom]
        return Recipe(overscan=spec, trim=trim)

    def settings_label(self, geom: tuple) -> str:
        """What a master's label adds for its camera settings (a CMOS camera's, or when the night
        has several): ``"   GAIN 100, OFFSET 50"``; empty otherwise."""
        settings = geom[-1]
        return f"   {settings_text(settings)}" if settings and (self.many_cameras or is_cmos(settings)) else ""

    def master_name(self, stem: str, geom: tuple, key: Any, label: str = "") -> str:
        """``<stem>.fits`` (with the geometry when the night has several), unique to ``key``
        (the group's identity): two groups whose values make one name get two names."""
        # the camera settings are header text: one safe part of a file name, like any header value
        name = f"{stem}_{safe_part(_geom_text(geom, camera=self.many_cameras))}.fits" if self.many_geometries \
            else f"{stem}.fits"
        return self.names.claim(f"masters/{name}", repr((geom, key)), label=label)[len("masters/"):]

    def skip(self, info: FrameInfo, reason: str) -> None:
        self.skipped.append(Skipped(str(info.path), reason))


# -- which frames go into a master -------------------------------------------------------------
def _unusable(info: FrameInfo, ctx: PlanContext) -> str | None:
    """Why a calibration frame cannot go into any master (whatever --exclude-flagged says)."""
    m = info.metrics
    if not m:
        return None
    if m.get("nonfinite_frac", 0.0) >= 0.5:
        return f"{m['nonfinite_frac']:.0%} of its pixels are NaN or infinite"
    if m.get("zero_frac", 0.0) >= 0.5:
        return f"{m['zero_frac']:.0%} of its pixels are 0"
    if info.kind == FrameKind.FLAT:
        level = m.get("level", np.nan)
        floor = ctx.bias_levels.get(geometry(info), 0.0)
        if not np.isfinite(level) or level <= floor:
            return (f"its level ({level:.6g} ADU) is not above the bias ({floor:.6g} ADU):"
                    " not a usable flat")
    return None


def _gross_outliers(members: list[FrameInfo], ctx: PlanContext) -> dict[int, str]:
    """Bias/dark frames whose level is far off their group's (index -> reason)."""
    rows = [(i, f.metrics.get("level", np.nan), f.metrics.get("noise", np.nan))
            for i, f in enumerate(members) if f.metrics]
    rows = [r for r in rows if np.isfinite(r[1]) and np.isfinite(r[2]) and r[2] > 0]
    if len(rows) < 3:
        return {}
    if any(ctx.recipe(members[i]).overscan is not None for i, _, _ in rows):
        return {}
    levels = np.array([r[1] for r in rows])
    level = float(np.median(levels))
    noise = float(np.median([r[2] for r in rows]))
    spread = MAD_TO_STD * float(np.median(np.abs(levels - level)))
    far = {i: f"level {lv - level:+.4g} ADU from its group's {level:.6g} ADU, "
              f"{abs(lv - level) / noise:.1f}x the per-pixel noise"
           for i, lv, _ in rows if abs(lv - level) > max(GROSS_LEVEL_NOISE * noise, 5 * spread)}
    return far if len(far) * 2 < len(rows) else {}


def _usable(members: list[FrameInfo],
            ctx: PlanContext) -> tuple[list[FrameInfo], list[FrameInfo], list[str]]:
    """The members of one master that go in, those left out, and why each is left out.

    Unusable frames are skipped; gross level outliers (not of flats) and, with
    ``exclude_flagged``, flagged frames are left out, unless ``keep_flagged``.
    """
    good = []
    for f in members:
        why = _unusable(f, ctx)
        if why:
            ctx.skip(f, f"{f.kind.value} left out of its master: {why}")
        else:
            good.append(f)
    members = good
    if ctx.options.keep_flagged:
        return members, [], []
    far = _gross_outliers(members, ctx) if members and members[0].kind != FrameKind.FLAT else {}
    if ctx.options.exclude_flagged:
        flagged = {i: "; ".join(f.flags) for i, f in enumerate(members) if f.flags}
        far = {**flagged, **far} if len(flagged) < len(members) else far
        if len(flagged) == len(members) and members:
            ctx.warnings.append(f"all {len(members)} frames of a group are flagged; kept them all")
    keep = [f for i, f in enumerate(members) if i not in far]
    drop = [f for i, f in enumerate(members) if i in far]
    return keep, drop, [far[i] for i in sorted(far)]


def _by_geometry(frames: Sequence[FrameInfo]) -> dict[tuple, list[FrameInfo]]:
    """The frames by :func:`geometry`, geometries in order of first appearance."""
    out: dict[tuple, list[FrameInfo]] = {}
    for f in frames:
        out.setdefault(geometry(f), []).append(f)
    return out


def group_frames(frames: Sequence[FrameInfo], kind: FrameKind,
                 options: PlanOptions) -> dict[tuple, list[FrameInfo]]:
    """Frames of one geometry, of ``kind``, grouped by ``CALIBRATION_CRITERIA[kind]["group"]``:
    key -> frames, keys in order of first appearance (temperature clusters are formed among
    these frames only)."""
    columns = [GROUP_LABELS[c](frames, options) for c in CALIBRATION_CRITERIA[kind]["group"]]
    groups: dict[tuple, list[FrameInfo]] = {}
    for f, *key in zip(frames, *columns, strict=True):
        groups.setdefault(tuple(key), []).append(f)
    return groups


def _in_order(groups: dict[tuple, list[FrameInfo]]) -> list[tuple[tuple, list[FrameInfo]]]:
    """The groups in planning order: by key, filter names (and None) as text."""
    def sortable(key: tuple) -> tuple:
        return tuple(str(v) if v is None or isinstance(v, str) else v for v in key)
    return sorted(groups.items(), key=lambda kv: sortable(kv[0]))


def _master_job(kind: FrameKind, name: str, label: str, members: tuple[list, list, list[str]],
                recipes: list[Recipe], ctx: PlanContext, **extra: Any) -> MasterJob:
    keep, drop, reasons = members
    scale = CALIBRATION_CRITERIA[kind]["scaled"]
    return MasterJob(kind=kind, name=name, label=label, members=tuple(keep), recipes=tuple(recipes),
                     settings=_settings(len(keep), ctx.options, scale=scale), excluded=tuple(drop),
                     excluded_reasons=tuple(reasons), **extra)


# -- the planners ------------------------------------------------------------------------------
def _needed_clusters(clusters: dict[tuple, list[FrameInfo]], members: list[FrameInfo],
                     tolerance: float) -> set[tuple]:
    """The bias clusters some frame of the geometry (of any other kind) is nearest to, and the
    largest one."""
    trial = [(_mean_temperature(g), k) for k, g in clusters.items()]
    sizes = {k: len(g) for k, g in clusters.items()}
    needed = {max(sizes, key=sizes.__getitem__)}
    for f in members:
        if f.kind != FrameKind.BIAS:
            needed.add(_nearest_bias(frame_temperature(f), trial, sizes, tolerance)[0])
    return needed


def plan_biases(frames: Sequence[FrameInfo],
                ctx: PlanContext) -> tuple[list[MasterJob], MasterIndex]:
    """One master bias per geometry and temperature cluster, and the index that lists them.

    Only the clusters some frame of the geometry needs (and the largest) are built: a bias
    taken at another temperature than everything else is skipped rather than averaged in.
    """
    jobs: list[MasterJob] = []
    biases: dict[tuple, list[BiasMaster]] = {}
    for geom, members in _by_geometry(frames).items():
        bias_frames = [f for f in members if f.kind == FrameKind.BIAS]
        clusters = group_frames(bias_frames, FrameKind.BIAS, ctx.options)
        if not clusters:
            continue
        needed = _needed_clusters(clusters, members, ctx.options.temp_tolerance)
        for key, group in _in_order(clusters):
            temp = _mean_temperature(group)
            if key not in needed:
                where = f"{temp:+.1f} °C" if temp is not None else "another temperature"
                for f in group:
                    ctx.skip(f, f"bias at {where} left out: no frame was taken at that temperature"
                                " (within --temp-tolerance)")
                continue
            keep, drop, reasons = _usable(group, ctx)
            if not keep:
                continue
            tagged = len(needed) > 1 and temp is not None
            name = ctx.master_name("master_bias" + (f"_{temp:+.0f}C" if tagged else ""), geom,
                                   ("bias", key))
            biases.setdefault(geom, []).append(BiasMaster(temp, name))
            if len(keep) == 1:
                ctx.warnings.append(f"master bias {_geom_text(geom)} from a single frame"
                                    f" ({keep[0].name}): noisy")
            label = f"master bias   {_geom_text(geom)}" + (f"  {temp:+.1f} °C" if tagged else "")
            label += ctx.settings_label(geom)
            recipes = [ctx.recipe(f) for f in keep]
            jobs.append(_master_job(FrameKind.BIAS, name, label, (keep, drop, reasons), recipes,
                                    ctx, temperature=temp, geometry=geom))
    index = MasterIndex(biases={g: tuple(b) for g, b in biases.items()},
                        counts={j.name: len(j.members) for j in jobs},
                        temp_tolerance=ctx.options.temp_tolerance,
                        exptime_tolerance=ctx.options.exptime_tolerance,
                        scale_darks=ctx.options.scale_darks, library=ctx.library,
                        flat_max_age=ctx.options.flat_max_age)
    return jobs, index


def plan_darks(frames: Sequence[FrameInfo], index: MasterIndex,
               ctx: PlanContext) -> tuple[list[MasterJob], MasterIndex]:
    """One master dark per geometry, exposure group and temperature cluster, its frames
    bias-subtracted with the master bias of its first member; and the index with them."""
    jobs: list[MasterJob] = []
    darks: dict[tuple, list[DarkMaster]] = {}
    for geom, members in _by_geometry(frames).items():
        timed = []
        for f in (f for f in members if f.kind == FrameKind.DARK):
            if f.exptime is None:
                ctx.skip(f, "dark without exposure time (EXPTIME/EXPOSURE); fix the header")
            else:
                timed.append(f)
        groups = group_frames(timed, FrameKind.DARK, ctx.options)
        several_temps = len({cluster for _, _, cluster in groups}) > 1
        for (_, exptime, _), group in _in_order(groups):
            keep, drop, reasons = _usable(group, ctx)
            if not keep:
                continue
            temp = _mean_temperature(keep)
            tag = f"_{temp:+.0f}C" if several_temps and temp is not None else ""
            name = ctx.master_name(f"master_dark_{exptime:g}s{tag}", geom, ("dark", exptime, temp))
            bias, _ = index.bias_for(keep[0])
            if len(keep) == 1:
                ctx.warnings.append(f"master dark {exptime:g} s from a single frame"
                                    f" ({keep[0].name}): noisy")
            label = f"master dark   {exptime:g} s"
            label += f"  {temp:+.1f} °C" if temp is not None else ""
            label += "   bias-subtracted" if bias else "   NOT bias-subtracted (no bias frames)"
            label += ctx.settings_label(geom)
            darks.setdefault(geom, []).append(DarkMaster(exptime, temp, name))
            recipes = [replace(ctx.recipe(f), bias=bias) for f in keep]
            jobs.append(_master_job(FrameKind.DARK, name, label, (keep, drop, reasons), recipes,
                                    ctx, exptime=exptime, temperature=temp, geometry=geom))
    counts = {**index.counts, **{j.name: len(j.members) for j in jobs}}
    return jobs, replace(index, darks={g: tuple(d) for g, d in darks.items()}, counts=counts)


def plan_flats(frames: Sequence[FrameInfo], index: MasterIndex,
               ctx: PlanContext) -> tuple[list[MasterJob], MasterIndex]:
    """One master flat per geometry and filter, each frame with its own bias and dark; and the
    index with them."""
    jobs: list[MasterJob] = []
    flats: dict[tuple, dict[str | None, str]] = {}
    for geom, members in _by_geometry(frames).items():
        groups = group_frames([f for f in members if f.kind == FrameKind.FLAT], FrameKind.FLAT,
                              ctx.options)
        for (_, filt), group in _in_order(groups):
            keep, drop, reasons = _usable(group, ctx)
            if not keep:
                continue
            name = ctx.master_name(f"master_flat_{safe_part(filt) if filt else 'nofilter'}", geom,
                                   ("flat", filt), f"the master flat of FILTER {filt!r}")
            recipes = []
            for f in keep:
                bias, _ = index.bias_for(f)
                dark, scale, _ = index.dark_for(f, bias)
                recipes.append(replace(ctx.recipe(f), bias=bias, dark=dark, dark_scale=scale))
            if len(keep) == 1:
                ctx.warnings.append(f"master flat {filt} from a single frame"
                                    f" ({keep[0].name}): noisy")
            flats.setdefault(geom, {})[filt] = name
            label = f"master flat   {filt or '(no filter)'}" + ctx.settings_label(geom)
            cfa = ctx.options.flat_cfa if all(f.bayer for f in keep) else None
            if cfa is None and sum(looks_like_cfa(f.metrics) for f in keep) * 2 > len(keep):
                cells = " : ".join(f"{keep[0].metrics[k]:.2f}" for k in CFA_CELLS)
                ctx.warnings.append(
                    f"the flats of FILTER {filt!r} look like a colour camera's (their 2x2 pixel cells stand at"
                    f" {cells}, the greens on a diagonal) but say no Bayer pattern (BAYERPAT): calibrated as"
                    " mono; pass --bayer-pattern RGGB, BGGR, GRBG or GBRG if the camera is colour")
            label += {"channel": "   each CFA colour normalised to 1", "scalar": "   one level for every CFA colour",
                      None: ""}[cfa]
            jobs.append(_master_job(FrameKind.FLAT, name, label, (keep, drop, reasons), recipes,
                                    ctx, filter=filt, geometry=geom, cfa=cfa))
    return jobs, replace(index, flats=flats)


def light_output(info: FrameInfo, names: NameBook, stem: str | None = None, folder: str = "calibrated/") -> str:
    """``calibrated/<stem>.fits``, numbered from _2 when another light has that name (without
    case: a.fits and A.fits are one file on macOS and Windows); a stem too long for a file
    name is cut (with a hash)."""
    stem = stem or info.stem
    stem = stem if len(stem) <= 200 else unique_stem(stem, 200)
    key = f"{info.path}[{info.hdu}]"
    out, n = f"{folder}{stem}.fits", 2
    while not names.free(out, key):
        out, n = f"{folder}{stem}_{n}.fits", n + 1
    return names.claim(out, key)


def plan_lights(frames: Sequence[FrameInfo], index: MasterIndex, masters: Sequence[MasterJob],
                ctx: PlanContext) -> list[LightJob]:
    """Every light (in path order) with the masters the index chooses for it, and the notes.

    A light is skipped, with the reason, when darks exist but its exposure is unknown, when no
    master matches it, and when its pedestal would stay in (:func:`pedestal_left`) unless
    ``allow_uncorrected``.
    """
    lights: list[LightJob] = []
    for info in sorted((f for f in frames if f.kind == FrameKind.LIGHT), key=lambda f: str(f.path)):
        if info.exptime is None and index.darks.get(geometry(info)):
            ctx.skip(info, "no exposure time (EXPTIME/EXPOSURE/ITIME), so the master dark cannot be"
                           " scaled to it; add the keyword to the header")
            continue
        bias, bias_notes = index.bias_for(info)
        dark, scale, dark_notes = index.dark_for(info, bias)
        flat, flat_notes = index.flat_for(info)
        notes = [*bias_notes, *dark_notes, *flat_notes]
        if not (bias or dark or flat) and not ctx.options.allow_uncorrected:
            size = f"{info.shape[1]}x{info.shape[0]} binned {info.binning[0]}x{info.binning[1]}"
            ctx.skip(info, f"no master bias, dark or flat matches its geometry ({size}); add calibration"
                           " frames taken the same way, or pass --allow-uncorrected to take it as it is")
            continue
        flat_job = next((j for j in masters if j.name == flat), None)   # a library flat: taken as it is
        uncorrected = pedestal_left(bias, dark, flat_job)
        if not (bias or dark or flat):
            uncorrected = "no master bias, dark or flat matches it: nothing is removed"
        if uncorrected and not ctx.options.allow_uncorrected:
            ctx.skip(info, f"{uncorrected}, so its pedestal would stay in; add bias frames"
                           " (or darks of its exposure), or pass --allow-uncorrected")
            continue
        if uncorrected:
            notes.append(f"UNCORRECTED: {uncorrected}; the pedestal stays in (--allow-uncorrected)")
        recipe = replace(ctx.recipe(info), bias=bias, dark=dark, dark_scale=scale, flat=flat)
        lights.append(LightJob(frame=info, output=light_output(info, ctx.names), recipe=recipe,
                               notes=tuple(notes), uncorrected=uncorrected))
    return lights


def build_plan(inventory: Inventory, options: PlanOptions | None = None, library: Library | None = None) -> Plan:
    """Decide every master and every light's calibration from an inventory.

    Frames already calibrated are skipped and short darks stand in for missing biases; then
    :func:`plan_biases`, :func:`plan_darks`, :func:`plan_flats` and :func:`plan_lights` run in
    that order, each matching against the masters planned before it, and against the masters
    of earlier runs in ``library`` (:func:`ccdcal.planning.library.read_library`) for what the
    night lacks; the library's files that were refused are listed as skipped.
    """
    options = options or PlanOptions()
    library = library or Library()
    skipped = list(inventory.skipped) + list(library.refused)
    warnings: list[str] = []
    frames = _raw_frames(list(inventory.frames), skipped)
    if options.bayer_pattern:    # the user's pattern for colour frames that do not say theirs
        frames = [f if f.bayer else replace(f, bayer=options.bayer_pattern) for f in frames]
    frames = _zero_level_from_short_darks(frames, warnings)
    ctx = PlanContext.of(frames, options, skipped=skipped, warnings=warnings, library=library)
    biases, index = plan_biases(frames, ctx)
    darks, index = plan_darks(frames, index, ctx)
    flats, index = plan_flats(frames, index, ctx)
    masters = [*biases, *darks, *flats]
    lights = plan_lights(frames, index, masters, ctx)
    stacks = plan_stacks(lights, ctx.names) if options.stack else ()
    warnings.extend(_ignored_sections(inventory.frames))
    warnings.extend(ctx.names.notes)
    masters.sort(key=lambda j: (KIND_ORDER[j.kind], j.name))
    named = {m.name for m in library.masters}
    used = sorted(named & {n for job in [*masters, *lights] for r in (job.recipes if isinstance(job, MasterJob)
                                                                   else (job.recipe,))
                           for n in (r.bias, r.dark, r.flat) if n})
    plan = Plan(masters=tuple(masters), lights=tuple(lights), skipped=tuple(skipped),
                warnings=tuple(warnings), light_steps=options.light_steps, stacks=stacks, library=tuple(used))
    _check_unique_outputs(plan)
    return plan


def _check_unique_outputs(plan: Plan) -> None:
    """Two jobs never write one file: the NameBook makes names unique, and this says so."""
    seen: dict[str, str] = {}
    for out in [j.output for j in plan.masters] + [j.output for j in plan.lights] + [s.output for s in plan.stacks]:
        if out is None:
            continue
        if out.casefold() in seen:
            raise RuntimeError(f"the plan writes {out} twice (also as {seen[out.casefold()]}): a ccdcal bug")
        seen[out.casefold()] = out


def plan_stacks(lights: Sequence[LightJob], names: NameBook | None = None) -> tuple[StackJob, ...]:
    """One stack per target (OBJECT) and filter with at least two lights, written as
    ``stacked/<target>_<filter>.fits`` (a name no other stack of the plan has)."""
    names = names if names is not None else NameBook()
    groups: dict[tuple[str, str | None], list[LightJob]] = {}
    for job in lights:
        groups.setdefault(((job.frame.object or "unknown").strip() or "unknown", job.frame.filter), []).append(job)
    stacks = []
    for (target, filt), jobs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        if len(jobs) < 2:
            continue
        output = names.claim(f"stacked/{safe_part(target)}_{safe_part(filt or 'none')}.fits",
                             repr((target, filt)),
                             label=f"the stack of OBJECT {target!r} in FILTER {filt!r}")
        stacks.append(StackJob(target=target, filter=filt, lights=tuple(jobs), output=output))
    return tuple(stacks)
