"""Every choice of a reduction, as one frozen object (the keys of a ``--config`` TOML file)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..combining.options import REJECTS, parse_memory
from ..errors import ConfigError
from ..io.headers import BAYER_PATTERNS
from ..planning.plan import PlanOptions
from ..sections import parse_section

#: The group of every option, declared by its field (``metadata["group"]``):
#: ``plan`` goes to the planner (:meth:`ReduceOptions.plan_options`, so into the recipes and master
#: settings that fingerprint an output); ``physics`` changes output pixels or headers beyond the
#: recipe (:meth:`ReduceOptions.physics`, part of every fingerprint); ``stack`` is a setting of the
#: stacks (in their own fingerprint); ``run`` is how and where the run goes, which no output
#: depends on.
PLAN, PHYSICS, STACK, RUN = "plan", "physics", "stack", "run"
GROUPS = (PLAN, PHYSICS, STACK, RUN)


def _option(default: Any, group: str) -> Any:
    return field(default=default, metadata={"group": group})


@dataclass(frozen=True)
class ReduceOptions:
    """Every choice of a reduction. The same names are the keys of a ``--config`` TOML file.
    Each field declares its group (:data:`GROUPS`)."""

    memory: str = _option("1GiB", RUN)
    combine_method: str | None = _option(None, PLAN)  # None: mean of the survivors (median of 1-2 frames)
    sigma_clip: tuple[float, float] | None = _option((3.0, 3.0), PLAN)
    reject: str = _option("auto", PLAN)  # auto: noise-model clip (read noise, gain); see plan
    keep_flagged: bool = _option(False, PLAN)  # keep even bias/dark frames far off their group's level
    allow_uncorrected: bool = _option(False, PLAN)  # calibrate lights that would keep their pedestal
    clip_extrema: tuple[int, int] | None = _option(None, PLAN)
    overscan: bool = _option(True, PLAN)
    overscan_model: str = _option("legendre", PLAN)
    overscan_order: int = _option(3, PLAN)
    scale_region: str | None = _option(None, PLAN)
    temp_tolerance: float = _option(2.0, PLAN)
    scale_darks: str = _option("auto", PLAN)  # auto: CCD darks scaled by exposure, CMOS darks only matched
    masters: tuple[str, ...] = _option((), PLAN)  # folders of masters of earlier runs, for what a night lacks
    flat_max_age: float = _option(30.0, PLAN)  # days: a library flat further from a light is not used
    bayer_pattern: str | None = _option(None, PLAN)  # colour frames without BAYERPAT: RGGB, BGGR, GRBG, GBRG
    flat_cfa: str = _option("channel", PLAN)  # colour flats: each CFA colour to 1 (PixInsight) or one level (Siril)
    flat_floor: float = _option(0.1, PHYSICS)
    exclude_flagged: bool = _option(False, PLAN)
    strict: bool = _option(False, RUN)
    report: bool = _option(True, RUN)
    workers: int | None = _option(None, RUN)
    scheduler: str | None = _option(None, RUN)  # None: threads here; "local:N" or "tcp://host:port": dask
    dask_report: bool = _option(False, RUN)  # save dask's performance report (dask-report.html)
    stack: bool = _option(False, PLAN)  # stack the calibrated lights per target and filter
    stack_keep_all: bool = _option(False, STACK)  # keep frames flagged cloudy, trailed or out of focus
    debayer: str = _option("bilinear", STACK)  # how colour (CFA) lights are debayered for the stack: bilinear, mhc, rcd
    # calibration physics (issue 4); gain in e-/ADU, read noise in e-, saturation in raw ADU
    gain: float | None = _option(None, PHYSICS)  # None: EGAIN, or GAIN stated in e-/ADU, else measured from flats
    read_noise: float | None = _option(None, PHYSICS)  # None: RDNOISE, else measured from the biases (or overscan)
    saturation: float | None = _option(None, PHYSICS)  # None: SATURATE/DATAMAX of the frame
    to_electrons: bool = _option(False, PHYSICS)
    uncertainty: bool = _option(True, PHYSICS)
    dark_optimize: bool = _option(False, PHYSICS)
    cosmic_rays: bool = _option(False, PHYSICS)
    bad_pixel_map: str | None = _option(None, PHYSICS)
    hot_sigma: float = _option(5.0, PHYSICS)
    flat_norm: str = _option("median", PHYSICS)

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
        if isinstance(values.get("masters"), (str, os.PathLike)):
            values["masters"] = (values["masters"],)
        if isinstance(values.get("masters"), list):
            values["masters"] = tuple(str(v) for v in values["masters"])
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
        parse_memory(self.memory)
        if self.combine_method not in (None, "median", "mean"):
            raise ConfigError(f"combine_method {self.combine_method!r}: use 'median' or 'mean'")

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
        if self.bayer_pattern is not None and self.bayer_pattern.upper() not in BAYER_PATTERNS:
            raise ConfigError(f"bayer_pattern {self.bayer_pattern!r}: use one of {', '.join(BAYER_PATTERNS)}")
        if self.debayer not in ("bilinear", "mhc", "rcd"):
            raise ConfigError(f"debayer {self.debayer!r}: use bilinear, mhc or rcd")
        if self.flat_cfa not in ("channel", "scalar"):
            raise ConfigError(f"flat_cfa {self.flat_cfa!r}: use channel or scalar")
        if self.scale_darks not in ("auto", "always", "never"):
            raise ConfigError(f"scale_darks {self.scale_darks!r}: use auto, always or never")
        if not 0 < self.flat_floor < 1:
            raise ConfigError(f"flat_floor must be between 0 and 1, got {self.flat_floor}")

    @classmethod
    def group(cls, name: str) -> tuple[str, ...]:
        """The names of the options of group ``name`` (one of :data:`GROUPS`), in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("group") == name)

    def plan_options(self) -> PlanOptions:
        """The planner's choices: every ``plan`` option, and the lights' steps as the plan prints them."""
        return PlanOptions(**{k: getattr(self, k) for k in self.group(PLAN)}, light_steps=self.light_steps())

    def light_steps(self) -> tuple[str, ...]:
        """What every light gets beyond overscan and masters, as the plan prints it."""
        scaling = {"auto": "dark scaled by exposure (CCD; a CMOS dark only at its own exposure)",
                   "always": "dark scaled by exposure", "never": "dark only at its own exposure"}[self.scale_darks]
        steps = ["dark scale optimised (minimum noise)" if self.dark_optimize else scaling]
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

    def physics(self) -> dict[str, Any]:
        """The options that change output pixels or headers beyond the recipe (part of every
        fingerprint): the ``physics`` group. The memory budget and the workers are not: results do
        not depend on them."""
        return {k: getattr(self, k) for k in self.group(PHYSICS)}

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
