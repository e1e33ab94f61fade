"""The plan: grouping and matching criteria, the per-kind planners and the index of masters they
share, on small hand-built inventories (no pixels are read)."""

from __future__ import annotations

import ast
import inspect
import textwrap
from pathlib import Path

import pytest

from ccdcal.planning import plan as plan_module
from ccdcal.planning.inventory import FrameInfo, FrameKind, Inventory, Skipped
from ccdcal.planning.plan import (
    CALIBRATION_CRITERIA,
    GROUP_LABELS,
    BiasMaster,
    DarkMaster,
    MasterIndex,
    PlanContext,
    PlanOptions,
    build_plan,
    geometry,
    group_frames,
    plan_biases,
    plan_darks,
    plan_flats,
    plan_lights,
)

B, D, F, L = FrameKind.BIAS, FrameKind.DARK, FrameKind.FLAT, FrameKind.LIGHT
BINNED = {"binning": (2, 2), "shape": (32, 32)}


def _info(name: str, kind: FrameKind, exptime: float | None = None, temp: float | None = None, *,
          filt: str | None = None, level: float | None = None, noise: float = 5.0,
          **kw) -> FrameInfo:
    metrics = {"level": level, "noise": noise} if level is not None else None
    return FrameInfo(path=Path(name), hdu=kw.pop("hdu", 0), kind=kind, exptime=exptime, filter=filt,
                     binning=kw.pop("binning", (1, 1)), shape=kw.pop("shape", (64, 64)),
                     ccd_temp=temp, metrics=metrics, **kw)


def _biases(n: int, temp: float = -10.0, *, prefix: str = "bias", **kw) -> list[FrameInfo]:
    return [_info(f"{prefix}{i}.fits", B, 0.0, temp, level=1000.0, **kw) for i in range(n)]


def _darks(n: int, exptime: float, temp: float = -10.0, *, prefix: str = "dark",
           **kw) -> list[FrameInfo]:
    return [_info(f"{prefix}{exptime:g}_{i}.fits", D, exptime, temp, level=1010.0, **kw)
            for i in range(n)]


def _flats(n: int, filt: str | None, temp: float = -10.0, *, exptime: float | None = 3.0,
           **kw) -> list[FrameInfo]:
    return [_info(f"flat{filt}{i}.fits", F, exptime, temp, filt=filt, level=20000.0, **kw)
            for i in range(n)]


def _ctx(frames: list[FrameInfo], **options) -> PlanContext:
    return PlanContext.of(frames, PlanOptions(**options))


# -- the criteria as data --------------------------------------------------------------------------
def test_criteria_table_names_what_groups_and_matches_each_kind():
    assert CALIBRATION_CRITERIA[B]["group"] == ("geometry", "temperature cluster")
    assert CALIBRATION_CRITERIA[D]["group"] == ("geometry", "exposure", "temperature cluster")
    assert CALIBRATION_CRITERIA[F]["group"] == ("geometry", "filter")
    for kind, criteria in CALIBRATION_CRITERIA.items():
        assert criteria["group"][0] == "geometry" and criteria["match"][0] == "geometry", kind
        assert set(criteria["group"]) <= set(GROUP_LABELS), kind
    assert [k for k, c in CALIBRATION_CRITERIA.items() if c["scaled"]] == [F]


def test_group_frames_follows_the_table():
    frames = [*_darks(2, 60.0), _info("d60.3.fits", D, 60.3, -10.1),
              _info("d60.fits", D, 60.0, -3.0), *_darks(1, 300.0)]
    groups = group_frames(frames, D, PlanOptions())
    geom = geometry(frames[0])
    # 60 and 60.3 s are one exposure within 1 %; -3 degC is its own temperature cluster
    assert {k: [f.name for f in v] for k, v in groups.items()} == {
        (geom, 60.0, 0): ["dark60_0.fits", "dark60_1.fits", "d60.3.fits"],
        (geom, 60.0, 1): ["d60.fits"],
        (geom, 300.0, 0): ["dark300_0.fits"],
    }
    tight = group_frames(frames, D, PlanOptions(exptime_tolerance=0.001))
    assert (geom, 60.3, 0) in tight
    flats = [*_flats(2, "V"), *_flats(1, None), *_flats(1, "R")]
    assert list(group_frames(flats, F, PlanOptions())) == [(geom, "V"), (geom, None), (geom, "R")]
    assert group_frames([], B, PlanOptions()) == {}


# -- biases ----------------------------------------------------------------------------------------
def test_plan_biases_leaves_out_a_cluster_no_frame_needs():
    frames = [*_biases(4), _info("warm.fits", B, 0.0, 5.0, level=1000.0),
              _info("light.fits", L, 10.0, -10.2)]
    ctx = _ctx(frames)
    jobs, index = plan_biases(frames, ctx)
    assert [(j.name, j.label, len(j.members)) for j in jobs] == [
        ("master_bias.fits", "master bias   1x1_64x64", 4)]
    assert jobs[0].temperature == pytest.approx(-10.0)
    assert ctx.skipped == [Skipped("warm.fits", "bias at +5.0 °C left out: no frame was taken at"
                                   " that temperature (within --temp-tolerance)")]
    geom = geometry(frames[0])
    assert index.biases == {geom: (BiasMaster(-10.0, "master_bias.fits"),)}
    assert index.counts == {"master_bias.fits": 4}
    assert ctx.warnings == []


def test_plan_biases_builds_each_needed_cluster_with_its_temperature_in_the_name():
    frames = [*_biases(3, -10.0), *_biases(1, 0.0, prefix="w"),
              _info("warm_light.fits", L, 1.0, 0.3)]
    ctx = _ctx(frames)
    jobs, index = plan_biases(frames, ctx)
    assert [(j.name, j.label) for j in jobs] == [
        ("master_bias_-10C.fits", "master bias   1x1_64x64  -10.0 °C"),
        ("master_bias_+0C.fits", "master bias   1x1_64x64  +0.0 °C")]
    assert ctx.warnings == ["master bias 1x1_64x64 from a single frame (w0.fits): noisy"]
    assert index.bias_for(frames[-1]) == ("master_bias_+0C.fits", ())


def test_plan_biases_leaves_out_gross_level_outliers_unless_kept():
    frames = [*_biases(5), _info("offset.fits", B, 0.0, -10.0, level=1030.0)]
    jobs, _ = plan_biases(frames, _ctx(frames))
    assert [f.name for f in jobs[0].excluded] == ["offset.fits"]
    assert jobs[0].excluded_reasons[0].startswith("level +30 ADU from its group's 1000 ADU")
    jobs, _ = plan_biases(frames, _ctx(frames, keep_flagged=True))
    assert len(jobs[0].members) == 6 and not jobs[0].excluded


def test_plan_biases_names_masters_by_geometry_when_there_are_several():
    frames = [*_biases(3), *_biases(2, prefix="b2_", **BINNED)]
    jobs, index = plan_biases(frames, _ctx(frames))
    assert [j.name for j in jobs] == ["master_bias_1x1_64x64.fits", "master_bias_2x2_32x32.fits"]
    assert [j.settings.method for j in jobs] == ["mean", "median"]
    assert len(index.biases) == 2


# -- darks -----------------------------------------------------------------------------------------
def test_plan_darks_groups_by_exposure_and_subtracts_the_bias():
    frames = [*_biases(3), *_darks(2, 60.0), _info("d60.3.fits", D, 60.3, -10.0, level=1010.0),
              *_darks(1, 300.0), _info("notime.fits", D, None, -10.0)]
    ctx = _ctx(frames)
    _, index = plan_biases(frames, ctx)
    jobs, index2 = plan_darks(frames, index, ctx)
    assert [(j.name, j.label, len(j.members)) for j in jobs] == [
        ("master_dark_60s.fits", "master dark   60 s  -10.0 °C   bias-subtracted", 3),
        ("master_dark_300s.fits", "master dark   300 s  -10.0 °C   bias-subtracted", 1)]
    assert {r.bias for j in jobs for r in j.recipes} == {"master_bias.fits"}
    assert ctx.skipped == [Skipped("notime.fits", "dark without exposure time (EXPTIME/EXPOSURE);"
                                   " fix the header")]
    assert ctx.warnings == ["master dark 300 s from a single frame (dark300_0.fits): noisy"]
    geom = geometry(frames[0])
    assert index2.darks == {geom: (DarkMaster(60.0, -10.0, "master_dark_60s.fits"),
                                   DarkMaster(300.0, -10.0, "master_dark_300s.fits"))}
    assert index2.counts == {"master_bias.fits": 3, "master_dark_60s.fits": 3,
                             "master_dark_300s.fits": 1}
    # the index is extended, not changed
    assert index.darks == {} and index2.biases == index.biases


def test_plan_darks_without_bias_and_at_two_temperatures():
    frames = [*_darks(3, 60.0, -10.0), *_darks(3, 60.0, 0.0, prefix="warm")]
    ctx = _ctx(frames)
    _, index = plan_biases(frames, ctx)
    jobs, _ = plan_darks(frames, index, ctx)
    unsubtracted = "   NOT bias-subtracted (no bias frames)"
    assert [(j.name, j.label) for j in jobs] == [
        ("master_dark_60s_-10C.fits", "master dark   60 s  -10.0 °C" + unsubtracted),
        ("master_dark_60s_+0C.fits", "master dark   60 s  +0.0 °C" + unsubtracted)]
    assert all(r.bias is None for j in jobs for r in j.recipes)


# -- flats -----------------------------------------------------------------------------------------
def test_plan_flats_one_per_filter_each_frame_with_its_bias_and_dark():
    frames = [*_biases(3), *_darks(3, 30.0), *_flats(3, "V"), *_flats(1, None, exptime=None),
              _info("dim.fits", F, 3.0, -10.0, filt="R", level=900.0)]
    ctx = _ctx(frames)
    _, index = plan_biases(frames, ctx)
    _, index = plan_darks(frames, index, ctx)
    jobs, index = plan_flats(frames, index, ctx)
    # in filter order, None as "None"
    assert [(j.name, j.label, j.filter) for j in jobs] == [
        ("master_flat_nofilter.fits", "master flat   (no filter)", None),
        ("master_flat_V.fits", "master flat   V", "V")]
    assert jobs[1].settings.scale == "median"
    v = jobs[1].recipes[0]
    assert (v.bias, v.dark) == ("master_bias.fits", "master_dark_30s.fits")
    assert v.dark_scale == pytest.approx(0.1)
    none = jobs[0].recipes[0]
    assert (none.bias, none.dark, none.dark_scale) == ("master_bias.fits", None, 0.0)
    assert ctx.skipped == [Skipped("dim.fits", "flat left out of its master: its level (900 ADU)"
                                   " is not above the bias (1000 ADU): not a usable flat")]
    assert ctx.warnings == ["master flat None from a single frame (flatNone0.fits): noisy"]
    assert index.flats == {geometry(frames[0]): {"V": "master_flat_V.fits",
                                                 None: "master_flat_nofilter.fits"}}


# -- the index: matching ---------------------------------------------------------------------------
GEOM = geometry(_info("x.fits", L))


def _index(**kw) -> MasterIndex:
    return MasterIndex(**{"temp_tolerance": 2.0, "exptime_tolerance": 0.01, **kw})


def test_bias_for_takes_the_nearest_temperature_with_a_note_beyond_the_tolerance():
    index = _index(biases={GEOM: (BiasMaster(-10.0, "cold.fits"), BiasMaster(0.0, "warm.fits"))},
                   counts={"cold.fits": 3, "warm.fits": 9})
    assert index.bias_for(_info("l.fits", L, 1.0, -9.0)) == ("cold.fits", ())
    assert index.bias_for(_info("l.fits", L, 1.0, 4.5)) == (
        "warm.fits", ("nearest master bias is 4.5 °C away from the frame's 4.5 °C",))
    assert index.bias_for(_info("l.fits", L, 1.0, None)) == ("warm.fits", ())     # the larger
    assert index.bias_for(_info("l.fits", L, 1.0, -5.0)) == (                      # tie: the larger
        "warm.fits", ("nearest master bias is 5.0 °C away from the frame's -5.0 °C",))
    assert index.bias_for(_info("l.fits", L, 1.0, -9.0, **BINNED)) == (
        None, ("no master bias for this binning/size",))


def test_dark_for_exact_scaled_and_unscalable():
    index = _index(darks={GEOM: (DarkMaster(60.0, -10.0, "d60.fits"),
                                 DarkMaster(300.0, -10.0, "d300.fits"))},
                   counts={"d60.fits": 5, "d300.fits": 5})
    light = _info("l.fits", L, 300.0, -10.0)
    assert index.dark_for(light, "bias.fits") == ("d300.fits", 1.0, ())
    assert index.dark_for(light, None) == ("d300.fits", 1.0, ())
    name, scale, notes = index.dark_for(_info("l.fits", L, 120.0, -10.0), "bias.fits")
    assert (name, scale, notes) == ("d300.fits", pytest.approx(0.4),
                                    ("no 120 s dark: the 300 s dark is scaled by 0.4",))
    assert index.dark_for(_info("l.fits", L, 120.0, -10.0), None) == (
        None, 0.0, ("no bias frames, so darks cannot be scaled to 120 s; none applied",))
    assert index.dark_for(_info("l.fits", L, None, -20.0), "bias.fits") == (
        None, 0.0, ("nearest master dark is 10.0 °C away from the frame's -20.0 °C",
                    "no exposure time: dark not applied"))
    binned = _info("l.fits", L, 300.0, -10.0, **BINNED)
    assert index.dark_for(binned, "bias.fits") == (None, 0.0, ())


def test_dark_for_treats_temperatures_within_tolerance_as_equal():
    index = _index(darks={GEOM: (DarkMaster(60.0, -10.02, "d60.fits"),
                                 DarkMaster(300.0, -9.98, "d300.fits"),
                                 DarkMaster(300.0, -20.0, "cold300.fits"))},
                   counts={"d60.fits": 5, "d300.fits": 5, "cold300.fits": 5})
    assert index.dark_for(_info("l.fits", L, 300.0, -10.03), "b.fits")[0] == "d300.fits"
    assert index.dark_for(_info("l.fits", L, 300.0, -19.0), "b.fits")[0] == "cold300.fits"


def test_flat_for_filter_only_flat_and_notes():
    index = _index(flats={GEOM: {"V": "fV.fits", "R": "fR.fits"}})
    assert index.flat_for(_info("l.fits", L, filt="V")) == ("fV.fits", ())
    assert index.flat_for(_info("l.fits", L, filt="B")) == (
        None, ("no master flat for filter 'B' (have: V, R)",))
    assert index.flat_for(_info("l.fits", L)) == (
        None, ("no master flat for filter None (have: V, R)",))
    only = _index(flats={GEOM: {"V": "fV.fits"}})
    assert only.flat_for(_info("l.fits", L)) == (
        "fV.fits", ("the light has no filter keyword; the only master flat is used",))
    assert only.flat_for(_info("l.fits", L, filt="V", **BINNED)) == (
        None, ("no flat frames for this binning/size: not flat-fielded",))


# -- lights ----------------------------------------------------------------------------------------
def _masters(frames: list[FrameInfo], ctx: PlanContext):
    biases, index = plan_biases(frames, ctx)
    darks, index = plan_darks(frames, index, ctx)
    flats, index = plan_flats(frames, index, ctx)
    return [*biases, *darks, *flats], index


def test_plan_lights_in_path_order_with_numbered_outputs_and_notes():
    frames = [*_biases(3), *_darks(3, 300.0), *_flats(3, "V"),
              _info("z/m31.fits", L, 120.0, -10.0, filt="V"),
              _info("a/m31.fits", L, 300.0, -10.0, filt="R")]
    ctx = _ctx(frames)
    masters, index = _masters(frames, ctx)
    lights = plan_lights(frames, index, masters, ctx)
    assert [(j.frame.name, j.output) for j in lights] == [
        ("m31.fits", "calibrated/m31.fits"), ("m31.fits", "calibrated/m31_2.fits")]
    assert lights[0].recipe.flat is None
    assert lights[0].notes == ("no master flat for filter 'R' (have: V)",)
    r = lights[1].recipe
    assert (r.bias, r.dark, r.flat) == ("master_bias.fits", "master_dark_300s.fits",
                                        "master_flat_V.fits")
    assert r.dark_scale == pytest.approx(0.4)
    assert lights[1].notes == ("no 120 s dark: the 300 s dark is scaled by 0.4",)
    assert ctx.skipped == [] and all(j.uncorrected is None for j in lights)


def test_plan_lights_skips_what_cannot_be_calibrated():
    frames = [*_darks(3, 300.0), *_flats(3, "V", exptime=None),
              _info("notime.fits", L, None, -10.0, filt="V"),
              _info("odd.fits", L, 10.0, -10.0, **BINNED),
              _info("flatonly.fits", L, 30.0, -10.0, filt="V")]
    ctx = _ctx(frames)
    masters, index = _masters(frames, ctx)
    assert plan_lights(frames, index, masters, ctx) == []
    assert [(s.path, s.reason.split(";")[0].split(",")[0]) for s in ctx.skipped] == [
        ("flatonly.fits", "neither a master bias nor a dark of its exposure applies to it"),
        ("notime.fits", "no exposure time (EXPTIME/EXPOSURE/ITIME)"),
        ("odd.fits", "no master bias")]
    assert ctx.skipped[2].reason == ("no master bias, dark or flat matches its geometry (32x32"
                                     " binned 2x2); add calibration frames taken the same way, or pass"
                                     " --allow-uncorrected to take it as it is")


def test_plan_lights_pedestal_rule_and_allow_uncorrected():
    # darks of 300 s without biases: a 300 s light is dark-subtracted, but its flat (3 s) was not
    frames = [*_darks(3, 300.0), *_flats(3, "V"), _info("m31.fits", L, 300.0, -10.0, filt="V")]
    ctx = _ctx(frames)
    masters, index = _masters(frames, ctx)
    assert plan_lights(frames, index, masters, ctx) == []
    why = ("its flat (master_flat_V.fits) could not be bias-corrected, so it is normalised with the"
           " pedestal in")
    assert ctx.skipped == [Skipped("m31.fits", f"{why}, so its pedestal would stay in; add"
                                   " bias frames (or darks of its exposure), or pass"
                                   " --allow-uncorrected")]
    ctx = _ctx(frames, allow_uncorrected=True)
    masters, index = _masters(frames, ctx)
    (light,) = plan_lights(frames, index, masters, ctx)
    assert light.uncorrected == why
    assert light.notes[-1] == f"UNCORRECTED: {why}; the pedestal stays in (--allow-uncorrected)"


# -- the whole plan --------------------------------------------------------------------------------
def _night() -> list[FrameInfo]:
    return [
        *[_info(f"bias{i}.fits", B, 0.0, -10.0 + 0.1 * i, level=1000.0 + 0.5 * i)
          for i in range(4)],
        _info("offset.fits", B, 0.0, -10.0, level=1030.0),
        _info("warm_bias.fits", B, 0.0, 5.0, level=1000.0),
        *_darks(3, 300.0),
        _info("dark60.fits", D, 60.2, -10.0, level=1002.0),
        _info("dark_notime.fits", D, None, -10.0),
        *_flats(3, "V"),
        _info("flatR.fits", F, 3.0, -10.0, filt="R", level=500.0),
        _info("done.fits", L, 300.0, -10.0, calibrated=("bias", "dark")),
        _info("m31.fits", L, 300.0, -10.0, filt="V"),
        _info("sub/m31.fits", L, 120.0, -13.5, filt="R"),
        _info("m31.fit", L, 60.0, -10.0, filt="B",
              warnings=("TRIMSEC [0:99,1:64] is not a section of this image: ignored",)),
        _info("odd.fits", L, 10.0, -10.0, **BINNED),
        *[_info(f"b2_{i}.fits", D, 0.1, None, **BINNED) for i in range(2)],
        _info("b2_dark.fits", D, 30.0, None, **BINNED),
        _info("b2_light.fits", L, 45.0, None, filt="V", **BINNED),
        _info("b2_light30.fits", L, 30.0, None, filt="V", **BINNED),
    ]


NIGHT_PLAN = """\
master bias   1x1_64x64                        4 frames   mean, noise-model clip 3/3
    each frame: as is
    left out: offset.fits (level +29 ADU from its group's 1001 ADU, 5.8x the per-pixel noise)
    -> masters/master_bias_1x1_64x64.fits
master bias   2x2_32x32                        2 frames   median
    each frame: as is
    -> masters/master_bias_2x2_32x32.fits
master dark   300 s  -10.0 °C   bias-subtracted   3 frames   mean, noise-model clip 3/3
    each frame: bias
    -> masters/master_dark_300s_1x1_64x64.fits
master dark   30 s   bias-subtracted            1 frame   median
    each frame: bias
    -> masters/master_dark_30s_2x2_32x32.fits
master dark   60.2 s  -10.0 °C   bias-subtracted    1 frame   median
    each frame: bias
    -> masters/master_dark_60.2s_1x1_64x64.fits
master flat   V                                3 frames   mean, noise-model clip 3/3, scaled by median of the central half
    each frame: bias, dark ×0.01
    -> masters/master_flat_V_1x1_64x64.fits
light b2_light.fits                        <- bias, dark 30 s ×1.5
    note: no 45 s dark: the 30 s dark is scaled by 1.5
    note: no flat frames for this binning/size: not flat-fielded
light b2_light30.fits                      <- bias, dark 30 s ×1
    note: no flat frames for this binning/size: not flat-fielded
light m31.fit                              <- bias, dark 60.2 s ×0.997
    note: no master flat for filter 'B' (have: V)
light m31.fits                             <- bias, dark 300 s ×1, flat V
light odd.fits                             <- bias, dark 30 s ×0.333
    note: no 10 s dark: the 30 s dark is scaled by 0.3333
    note: no flat frames for this binning/size: not flat-fielded
light m31.fits                             <- bias, dark 300 s ×0.4
    note: nearest master bias is 3.6 °C away from the frame's -13.5 °C
    note: nearest master dark is 3.5 °C away from the frame's -13.5 °C
    note: no 120 s dark: the 300 s dark is scaled by 0.4
    note: no master flat for filter 'R' (have: V)
skipped done.fits: its header says it is already calibrated (bias, dark): not calibrated again; give ccdcal the raw frames
skipped warm_bias.fits: bias at +5.0 °C left out: no frame was taken at that temperature (within --temp-tolerance)
skipped dark_notime.fits: dark without exposure time (EXPTIME/EXPOSURE); fix the header
skipped flatR.fits: flat left out of its master: its level (500 ADU) is not above the bias (1000.75 ADU): not a usable flat
warning: no bias frames for 2x2_32x32: 2 dark(s) of 0.1 s used as bias: b2_0.fits, b2_1.fits
warning: master dark 60.2 s from a single frame (dark60.fits): noisy
warning: master dark 30 s from a single frame (b2_dark.fits): noisy
warning: TRIMSEC [0:99,1:64] is not a section of this image: ignored (1 frame, e.g. m31.fit)"""


def test_plan_of_a_messy_night_is_exactly_this():
    plan = build_plan(Inventory(tuple(_night()), (Skipped("notes.txt", "not FITS"),)))
    # the scan's skipped inputs come first
    first = "skipped notes.txt: not FITS\nskipped done"
    assert plan.describe() == NIGHT_PLAN.replace("skipped done", first)
    plain = build_plan(Inventory(tuple(_night()), ()))
    assert plain.describe() == NIGHT_PLAN
    out = plain.to_json()
    assert [m["output"] for m in out["masters"]] == [
        "masters/master_bias_1x1_64x64.fits", "masters/master_bias_2x2_32x32.fits",
        "masters/master_dark_300s_1x1_64x64.fits", "masters/master_dark_30s_2x2_32x32.fits",
        "masters/master_dark_60.2s_1x1_64x64.fits", "masters/master_flat_V_1x1_64x64.fits"]
    assert [(j["input"], j["output"]) for j in out["lights"]] == [
        ("b2_light.fits", "calibrated/b2_light.fits"),
        ("b2_light30.fits", "calibrated/b2_light30.fits"),
        ("m31.fit", "calibrated/m31.fits"), ("m31.fits", "calibrated/m31_2.fits"),
        ("odd.fits", "calibrated/odd.fits"), ("sub/m31.fits", "calibrated/m31_3.fits")]
    assert out["lights"][3]["dark_scale"] == pytest.approx(1.0)
    assert out["masters"][1]["members"] == ["b2_0.fits", "b2_1.fits"]
    assert out["warnings"] == list(plain.warnings)


def test_build_plan_is_the_planners_in_order():
    # raw frames only, and a bias for every geometry (build_plan takes care of those first)
    frames = [f for f in _night() if f.kind != L and not f.name.startswith("b2_")]
    frames += [*_biases(3, prefix="b2_", **BINNED), *_darks(2, 30.0, **BINNED),
               _info("m31.fits", L, 300.0, -10.0, filt="V"), _info("m33.fits", L, 30.0, **BINNED)]
    plan = build_plan(Inventory(tuple(frames), ()))
    ctx = _ctx(frames)
    masters, index = _masters(frames, ctx)
    lights = plan_lights(frames, index, masters, ctx)
    assert sorted(masters, key=lambda j: (j.kind != B, j.kind != D, j.name)) == list(plan.masters)
    assert tuple(lights) == plan.lights
    assert ctx.skipped == list(plan.skipped) and ctx.warnings == list(plan.warnings)


# -- the structure the review asked for -----------------------------------------------------------
def test_no_function_of_the_plan_is_over_60_lines():
    tree = ast.parse(textwrap.dedent(inspect.getsource(plan_module)))
    long = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if ast.get_docstring(node):
                doc = node.body[0]
                lines -= doc.end_lineno - doc.lineno + 1
            if lines > 60:
                long.append(f"{node.name}: {lines}")
    assert not long


def test_camera_settings_in_a_master_name_are_one_safe_part():
    """A camera setting is header text: in a master's file name it is one safe part (no path
    separators, no spaces), and in its label printable."""
    from ccdcal.planning.plan import PlanContext, PlanOptions, settings_text

    ctx = PlanContext(options=PlanOptions(), many_geometries=True, many_cameras=True)
    geom = ((1, 1), (100, 100), 0, None, None, (("READOUTM", "../../../../tmp/evil Mode\x1b[2J"),))
    name = ctx.master_name("master_bias", geom, "bias")
    assert "/" not in name and " " not in name and "\x1b" not in name and name.endswith(".fits")
    assert name.startswith("master_bias_1x1_100x100_readoutm")
    assert "\x1b" not in settings_text(geom[-1])
