"""The plan of a reduction: which masters are built from which frames, and which masters each
frame gets, and why. Pure decisions over :class:`~ccdcal.inventory.FrameInfo`; nothing is read.

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
  unscaled); see :func:`ccdcal.calibrate.choose_dark`;
- flat: the master flat of the same geometry and filter.

Masters are stacked by default with a mean of the values that survive a noise-model clip
(``reject="auto"``): σ of each value from the detector's read noise and gain, not from the
same few values, so a cosmic ray is rejected at any group size (a sample-σ clip cannot
reject one outlier among 7 or fewer values at 3σ). Bias and dark frames whose level is
off from their group by more than :data:`GROSS_LEVEL_NOISE` times the per-pixel noise are
left out of the master (``keep_flagged`` keeps them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibrate import OverscanSpec, Recipe, dark_scale_for, overscan_geometry
from .calibrate import choose_dark as pick_dark
from .inventory import (
    FrameInfo,
    FrameKind,
    Inventory,
    Skipped,
    frame_temperature,
    temperature_groups,
)

KIND_ORDER = {FrameKind.BIAS: 0, FrameKind.DARK: 1, FrameKind.FLAT: 2}
#: A bias or dark without overscan whose median level is off from its group's by more than this
#: many times the group's per-pixel noise (and by more than 5 robust spreads of the group's
#: levels) is left out of the master: it would shift every pixel of it. With an overscan the
#: raw level may drift freely; the overscan takes it out.
GROSS_LEVEL_NOISE = 2.0
#: Darks this short (s) carry no measurable dark current: without bias frames they are the zero level.
ZERO_EXPOSURE = 1.0


@dataclass(frozen=True)
class CombineSettings:
    """How a master is stacked (see :func:`ccdcal.combine.combine`)."""

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
    from dataclasses import replace

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
class Plan:
    masters: tuple[MasterJob, ...]
    lights: tuple[LightJob, ...]
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()
    light_steps: tuple[str, ...] = ()

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
                chosen.append(f"dark {self.master(r.dark).exptime:g} s ×{r.dark_scale:.3g}")
            if r.flat:
                chosen.append(f"flat {self.master(r.flat).filter or ''}".rstrip())
            lines.append(f"light {light.frame.name:<36} <- {', '.join(chosen) or 'nothing'}")
            for note in light.notes:
                lines.append(f"    note: {note}")
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
    light_steps: tuple[str, ...] = ()            # what every light gets beyond its masters (for the plan text)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "none"


def geometry(info: FrameInfo) -> tuple:
    """Frames that can share masters have equal geometry."""
    return (info.binning, info.shape, info.hdu if info.n_hdus > 1 else 0, info.trimsec, info.biassec)


def _geom_text(geom: tuple) -> str:
    (bx, by), (ny, nx), hdu, _, _ = geom
    text = f"{bx}x{by}_{nx}x{ny}"
    return text + (f"_hdu{hdu}" if hdu else "")


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


def _raw_frames(frames: list[FrameInfo], skipped: list[Skipped]) -> list[FrameInfo]:
    """The frames that are raw: those whose header says they were calibrated are listed as skipped.

    Overscan subtraction and trimming alone (IRAF's OVERSCAN/TRIM) leave a frame usable: its
    sections say what is left, and no overscan is fitted where none remains.
    """
    raw = []
    for f in frames:
        done = set(f.calibrated) - {"overscan", "trim"}
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
    from dataclasses import replace

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


def _pedestal_left(bias: str | None, dark: str | None, flat_job: MasterJob | None) -> str | None:
    """Why a light would keep its pedestal (None when it is removed)."""
    if not (bias or dark):
        return "neither a master bias nor a dark of its exposure applies to it"
    if flat_job is not None and not any(r.bias or r.dark for r in flat_job.recipes):
        return f"its flat ({flat_job.name}) could not be bias-corrected, so it is normalised with the pedestal in"
    return None


def build_plan(inventory: Inventory, options: PlanOptions | None = None) -> Plan:
    """Decide every master and every light's calibration from an inventory."""
    options = options or PlanOptions()
    skipped = list(inventory.skipped)
    warnings: list[str] = []
    frames = _raw_frames(list(inventory.frames), skipped)
    frames = _zero_level_from_short_darks(frames, warnings)

    overscans: dict[tuple, tuple[OverscanSpec | None, Any]] = {}

    def base_recipe(info: FrameInfo) -> Recipe:
        geom = geometry(info)
        if geom not in overscans:
            spec, trim = overscan_geometry(info.shape, info.biassec, info.trimsec,
                                           model=options.overscan_model, order=options.overscan_order)
            overscans[geom] = (spec if options.overscan else None, trim)
        spec, trim = overscans[geom]
        return Recipe(overscan=spec, trim=trim)

    raw_bias_levels: dict[tuple, list[float]] = {}
    for f in frames:
        if f.kind == FrameKind.BIAS and f.metrics and np.isfinite(f.metrics.get("level", np.nan)):
            raw_bias_levels.setdefault(geometry(f), []).append(f.metrics["level"])
    bias_levels = {g: float(np.median(v)) for g, v in raw_bias_levels.items()}

    def unusable(info: FrameInfo) -> str | None:
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
            floor = bias_levels.get(geometry(info), 0.0)
            if not np.isfinite(level) or level <= floor:
                return f"its level ({level:.6g} ADU) is not above the bias ({floor:.6g} ADU): not a usable flat"
        return None

    # -- group calibration frames ------------------------------------------------------------
    def gross_outliers(members: list[FrameInfo]) -> dict[int, str]:
        """Bias/dark frames whose level is far off their group's (index -> reason)."""
        rows = [(i, f.metrics.get("level", np.nan), f.metrics.get("noise", np.nan))
                for i, f in enumerate(members) if f.metrics]
        rows = [r for r in rows if np.isfinite(r[1]) and np.isfinite(r[2]) and r[2] > 0]
        if len(rows) < 3:
            return {}
        if any(base_recipe(members[i]).overscan is not None for i, _, _ in rows):
            return {}
        levels = np.array([r[1] for r in rows])
        level = float(np.median(levels))
        noise = float(np.median([r[2] for r in rows]))
        spread = 1.4826 * float(np.median(np.abs(levels - level)))
        far = {i: f"level {lv - level:+.4g} ADU from its group's {level:.6g} ADU, "
                  f"{abs(lv - level) / noise:.1f}x the per-pixel noise"
               for i, lv, _ in rows if abs(lv - level) > max(GROSS_LEVEL_NOISE * noise, 5 * spread)}
        return far if len(far) * 2 < len(rows) else {}

    def usable(members: list[FrameInfo]) -> tuple[list[FrameInfo], list[FrameInfo], list[str]]:
        good = []
        for f in members:
            why = unusable(f)
            if why:
                skipped.append(Skipped(str(f.path), f"{f.kind.value} left out of its master: {why}"))
            else:
                good.append(f)
        members = good
        if options.keep_flagged:
            return members, [], []
        far = gross_outliers(members) if members and members[0].kind != FrameKind.FLAT else {}
        if options.exclude_flagged:
            flagged = {i: "; ".join(f.flags) for i, f in enumerate(members) if f.flags}
            far = {**flagged, **far} if len(flagged) < len(members) else far
            if len(flagged) == len(members) and members:
                warnings.append(f"all {len(members)} frames of a group are flagged; kept them all")
        keep = [f for i, f in enumerate(members) if i not in far]
        drop = [f for i, f in enumerate(members) if i in far]
        return keep, drop, [far[i] for i in sorted(far)]

    biases: dict[tuple, list[tuple[float | None, str]]] = {}  # geom -> [(temperature, name)]
    darks: dict[tuple, list[tuple[float, float | None, str]]] = {}  # geom -> [(exptime, temp, name)]
    dark_counts: dict[str, int] = {}
    flats: dict[tuple, dict[str | None, str]] = {}
    jobs: list[MasterJob] = []
    geoms = {geometry(f) for f in frames}
    many_geoms = len(geoms) > 1

    def master_name(stem: str, geom: tuple) -> str:
        return f"{stem}_{_geom_text(geom)}.fits" if many_geoms else f"{stem}.fits"

    def mean_temperature(group: list[FrameInfo]) -> float | None:
        known = [t for t in map(frame_temperature, group) if t is not None]
        return sum(known) / len(known) if known else None

    def nearest_bias(info: FrameInfo, candidates: list[tuple[float | None, str]],
                     sizes: dict[str, int]) -> tuple[str, str | None]:
        """The bias cluster for a frame (and a note when it is outside the tolerance)."""
        temp = frame_temperature(info)
        known = [c for c in candidates if c[0] is not None]
        if temp is None or not known:
            return max(candidates, key=lambda c: sizes.get(c[1], 0))[1], None
        best = min(known, key=lambda c: (abs(c[0] - temp), -sizes.get(c[1], 0)))
        off = abs(best[0] - temp)
        note = (f"nearest master bias is {off:.1f} °C away from the frame's {temp:.1f} °C"
                if off > options.temp_tolerance else None)
        return best[1], note

    by_geom: dict[tuple, list[FrameInfo]] = {}
    for f in frames:
        by_geom.setdefault(geometry(f), []).append(f)

    for geom, members in by_geom.items():
        bias_frames = [f for f in members if f.kind == FrameKind.BIAS]
        if not bias_frames:
            continue
        labels = temperature_groups([frame_temperature(f) for f in bias_frames], options.temp_tolerance)
        clusters: dict[int, list[FrameInfo]] = {}
        for f, label in zip(bias_frames, labels, strict=True):
            clusters.setdefault(label, []).append(f)
        # Build the clusters some frame needs (and the largest one); a bias taken at another
        # temperature than everything else is left out rather than averaged in.
        trial = [(mean_temperature(g), str(k)) for k, g in clusters.items()]
        sizes = {str(k): len(g) for k, g in clusters.items()}
        needed = {max(sizes, key=sizes.__getitem__)}
        for f in members:
            if f.kind != FrameKind.BIAS:
                needed.add(nearest_bias(f, trial, sizes)[0])
        several = sum(1 for k in clusters if str(k) in needed) > 1
        for k, group in sorted(clusters.items()):
            temp = mean_temperature(group)
            if str(k) not in needed:
                where = f"{temp:+.1f} °C" if temp is not None else "another temperature"
                for f in group:
                    skipped.append(Skipped(str(f.path), f"bias at {where} left out: no frame was taken at"
                                           " that temperature (within --temp-tolerance)"))
                continue
            keep, drop, reasons = usable(group)
            if not keep:
                continue
            stem = "master_bias" + (f"_{temp:+.0f}C" if several and temp is not None else "")
            name = master_name(stem, geom)
            biases.setdefault(geom, []).append((temp, name))
            if len(keep) == 1:
                warnings.append(f"master bias {_geom_text(geom)} from a single frame ({keep[0].name}): noisy")
            label = f"master bias   {_geom_text(geom)}" + (f"  {temp:+.1f} °C" if several and temp is not None else "")
            jobs.append(MasterJob(
                kind=FrameKind.BIAS, name=name, label=label,
                members=tuple(keep), recipes=tuple(base_recipe(f) for f in keep),
                settings=_settings(len(keep), options, scale=False), excluded=tuple(drop),
                excluded_reasons=tuple(reasons), temperature=temp, geometry=geom))

    bias_sizes = {j.name: len(j.members) for j in jobs}

    def bias_for(info: FrameInfo, geom: tuple, notes: list[str] | None = None) -> str | None:
        candidates = biases.get(geom)
        if not candidates:
            return None
        name, note = nearest_bias(info, candidates, bias_sizes)
        if note and notes is not None:
            notes.append(note)
        return name

    for geom, members in by_geom.items():
        dark_frames = [f for f in members if f.kind == FrameKind.DARK]
        no_time = [f for f in dark_frames if f.exptime is None]
        for f in no_time:
            skipped.append(Skipped(str(f.path), "dark without exposure time (EXPTIME/EXPOSURE); fix the header"))
        dark_frames = [f for f in dark_frames if f.exptime is not None]
        if not dark_frames:
            continue
        temps = temperature_groups([frame_temperature(f) for f in dark_frames], options.temp_tolerance)
        times = _group_exptime([f.exptime for f in dark_frames], options.exptime_tolerance)
        groups: dict[tuple[float, int], list[FrameInfo]] = {}
        for f, t, g in zip(dark_frames, times, temps, strict=True):
            groups.setdefault((t, g), []).append(f)
        several_temps = len(set(temps)) > 1
        for (exptime, _tgroup), group in sorted(groups.items()):
            keep, drop, reasons = usable(group)
            if not keep:
                continue
            temp = mean_temperature(keep)
            stem = f"master_dark_{exptime:g}s" + (f"_{temp:+.0f}C" if several_temps and temp is not None else "")
            name = master_name(stem, geom)
            bias = bias_for(keep[0], geom)
            recipes = tuple(Recipe(r.overscan, r.trim, bias=bias) for r in map(base_recipe, keep))
            if len(keep) == 1:
                warnings.append(f"master dark {exptime:g} s from a single frame ({keep[0].name}): noisy")
            label = f"master dark   {exptime:g} s" + (f"  {temp:+.1f} °C" if temp is not None else "")
            label += "   bias-subtracted" if bias else "   NOT bias-subtracted (no bias frames)"
            darks.setdefault(geom, []).append((exptime, temp, name))
            dark_counts[name] = len(keep)
            jobs.append(MasterJob(
                kind=FrameKind.DARK, name=name, label=label, members=tuple(keep), recipes=recipes,
                settings=_settings(len(keep), options, scale=False), excluded=tuple(drop),
                excluded_reasons=tuple(reasons), exptime=exptime, temperature=temp, geometry=geom))

    def choose_dark(info: FrameInfo, geom: tuple, bias: str | None) -> tuple[str | None, float, list[str]]:
        candidates = darks.get(geom, [])
        notes: list[str] = []
        if not candidates:
            return None, 0.0, notes
        temp = frame_temperature(info)
        known = [c for c in candidates if c[1] is not None]
        if temp is not None and known:
            nearest = min(abs(c[1] - temp) for c in known)
            if nearest > options.temp_tolerance:
                notes.append(f"nearest master dark is {nearest:.1f} °C away from the frame's {temp:.1f} °C")
        t = info.exptime
        if t is None:
            notes.append("no exposure time: dark not applied")
            return None, 0.0, notes
        name = pick_dark(t, {c[2]: c[0] for c in candidates}, tolerance=options.exptime_tolerance,
                         counts=dark_counts, temperature=temp, temperatures={c[2]: c[1] for c in candidates},
                         temp_tolerance=options.temp_tolerance)
        t_dark = next(c[0] for c in candidates if c[2] == name)
        if abs(t_dark - t) <= options.exptime_tolerance * max(t, 1e-9):
            return name, 1.0 if not bias else dark_scale_for(t, t_dark), notes
        if not bias:
            notes.append(f"no bias frames, so darks cannot be scaled to {t:g} s; none applied")
            return None, 0.0, notes
        scale = dark_scale_for(t, t_dark)
        notes.append(f"no {t:g} s dark: the {t_dark:g} s dark is scaled by {scale:.4g}")
        return name, scale, notes

    for geom, members in by_geom.items():
        flat_frames = [f for f in members if f.kind == FrameKind.FLAT]
        by_filter: dict[str | None, list[FrameInfo]] = {}
        for f in flat_frames:
            by_filter.setdefault(f.filter, []).append(f)
        for filt, group in sorted(by_filter.items(), key=lambda kv: str(kv[0])):
            keep, drop, reasons = usable(group)
            if not keep:
                continue
            name = master_name(f"master_flat_{_slug(filt or 'nofilter')}", geom)
            recipes = []
            for f in keep:
                bias = bias_for(f, geom)
                dark, scale, _ = choose_dark(f, geom, bias)
                r = base_recipe(f)
                recipes.append(Recipe(r.overscan, r.trim, bias=bias, dark=dark, dark_scale=scale))
            if len(keep) == 1:
                warnings.append(f"master flat {filt} from a single frame ({keep[0].name}): noisy")
            flats.setdefault(geom, {})[filt] = name
            jobs.append(MasterJob(
                kind=FrameKind.FLAT, name=name, label=f"master flat   {filt or '(no filter)'}",
                members=tuple(keep), recipes=tuple(recipes),
                settings=_settings(len(keep), options, scale=True), excluded=tuple(drop),
                excluded_reasons=tuple(reasons), filter=filt, geometry=geom))

    # -- lights -----------------------------------------------------------------------------
    lights: list[LightJob] = []
    used_outputs: set[str] = set()
    for info in sorted((f for f in frames if f.kind == FrameKind.LIGHT), key=lambda f: str(f.path)):
        geom = geometry(info)
        notes: list[str] = []
        if info.exptime is None and darks.get(geom):
            skipped.append(Skipped(str(info.path), "no exposure time (EXPTIME/EXPOSURE/ITIME), so the master"
                                   " dark cannot be scaled to it; add the keyword to the header"))
            continue
        bias = bias_for(info, geom, notes)
        if bias is None:
            notes.append("no master bias for this binning/size")
        dark, scale, dark_notes = choose_dark(info, geom, bias)
        notes.extend(dark_notes)
        flat_map = flats.get(geom, {})
        flat = flat_map.get(info.filter)
        if flat is None and flat_map:
            if info.filter is None and len(flat_map) == 1:
                flat = next(iter(flat_map.values()))
                notes.append("the light has no filter keyword; the only master flat is used")
            else:
                notes.append(f"no master flat for filter {info.filter!r} (have: {', '.join(map(str, flat_map))})")
        elif flat is None:
            notes.append("no flat frames for this binning/size: not flat-fielded")
        if not (bias or dark or flat):
            size = f"{info.shape[1]}x{info.shape[0]} binned {info.binning[0]}x{info.binning[1]}"
            skipped.append(Skipped(str(info.path), f"no master bias, dark or flat matches its geometry ({size});"
                                   " add calibration frames taken the same way"))
            continue
        uncorrected = _pedestal_left(bias, dark, flat and next(j for j in jobs if j.name == flat))
        if uncorrected and not options.allow_uncorrected:
            skipped.append(Skipped(str(info.path), f"{uncorrected}, so its pedestal would stay in; add bias"
                                   " frames (or darks of its exposure), or pass --allow-uncorrected"))
            continue
        if uncorrected:
            notes.append(f"UNCORRECTED: {uncorrected}; the pedestal stays in (--allow-uncorrected)")
        out = f"calibrated/{info.stem}.fits"
        n = 2
        while out in used_outputs:
            out = f"calibrated/{info.stem}_{n}.fits"
            n += 1
        used_outputs.add(out)
        base = base_recipe(info)
        recipe = Recipe(base.overscan, base.trim, bias=bias, dark=dark, dark_scale=scale, flat=flat)
        lights.append(LightJob(frame=info, output=out, recipe=recipe, notes=tuple(notes),
                               uncorrected=uncorrected))

    warnings.extend(_ignored_sections(inventory.frames))
    jobs.sort(key=lambda j: (KIND_ORDER[j.kind], j.name))
    return Plan(masters=tuple(jobs), lights=tuple(lights), skipped=tuple(skipped), warnings=tuple(warnings),
                light_steps=options.light_steps)
