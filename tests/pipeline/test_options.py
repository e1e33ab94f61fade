"""Every reduce option declares its group, and the planner's choices and the fingerprinted physics
are derived from those declarations, never from a list kept by hand."""

from __future__ import annotations

import dataclasses

from ccdcal.pipeline.options import GROUPS, PHYSICS, PLAN, RUN, ReduceOptions
from ccdcal.planning.plan import PlanOptions


def test_every_option_declares_its_group():
    undeclared = [f.name for f in dataclasses.fields(ReduceOptions) if f.metadata.get("group") not in GROUPS]
    assert not undeclared


def test_the_plan_group_is_what_the_planner_takes():
    shared = {f.name for f in dataclasses.fields(PlanOptions)} & {f.name for f in dataclasses.fields(ReduceOptions)}
    assert set(ReduceOptions.group(PLAN)) == shared
    options = ReduceOptions(overscan_order=5, temp_tolerance=1.0, stack=True)
    planned = options.plan_options()
    assert all(getattr(planned, k) == getattr(options, k) for k in ReduceOptions.group(PLAN))


def test_physics_is_the_physics_group_and_a_run_option_changes_no_fingerprint():
    options = ReduceOptions()
    assert set(options.physics()) == set(ReduceOptions.group(PHYSICS))
    assert {"bad_pixel_map", "flat_floor", "gain", "hot_sigma"} <= set(options.physics())
    for name in ReduceOptions.group(RUN):
        other = dataclasses.replace(options, **{name: _another(getattr(options, name))})
        assert other.physics() == options.physics() and other.plan_options() == options.plan_options(), name


def _another(value):
    if isinstance(value, bool):
        return not value
    if value is None:
        return 2
    return "2GiB" if isinstance(value, str) else value
