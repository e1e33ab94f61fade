"""The defaults are right on small, messy calibration sets: rejection that works at every group
size, dark matching that treats temperature jitter as equal, biases grouped by temperature, and
gross outlier frames left out of their masters."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from ccdcal.calibration.masters import noise_model
from ccdcal.combining.engine import combine
from ccdcal.combining.options import sample_sigma_can_reject
from ccdcal.errors import CcdcalWarning
from ccdcal.planning.inventory import FrameInfo, FrameKind, Inventory
from ccdcal.planning.plan import PlanOptions, build_plan

RN, GAIN = 6.0, 1.6          # ADU, e-/ADU
SHAPE = (64, 64)
OUTLIER = 2000.0              # ADU


def _one_outlier_per_pixel(rng, n: int, levels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` frames at the given levels (ADU above bias) with read and shot noise; every pixel
    has one 2000 ADU outlier in one frame. Returns the frames and the outlier frame per pixel."""
    frames = []
    hit = rng.integers(0, n, SHAPE)
    for i, level in enumerate(levels):
        shot = rng.poisson(np.full(SHAPE, level * GAIN)) / GAIN
        frame = shot + rng.normal(0.0, RN, SHAPE)
        frame[hit == i] += OUTLIER
        frames.append(frame.astype(np.float32))
    return frames, hit


@pytest.mark.parametrize("kind", [FrameKind.BIAS, FrameKind.DARK, FrameKind.FLAT])
def test_default_rejection_removes_one_outlier_per_pixel_at_every_group_size(kind):
    rng = np.random.default_rng(int(kind == FrameKind.DARK) + 2 * int(kind == FrameKind.FLAT))
    for n in range(3, 21):
        if kind == FrameKind.FLAT:
            levels = rng.uniform(8000.0, 30000.0, n)          # twilight flats, each its own level
        elif kind == FrameKind.DARK:
            levels = np.full(n, 40.0)
        else:
            levels = np.zeros(n)
        frames, _ = _one_outlier_per_pixel(rng, n, levels)
        # what the pipeline measures: the pair floor (read noise, + dark shot noise), gain from two flats
        floor = float(np.sqrt(RN**2 + levels[0] / GAIN)) if kind != FrameKind.FLAT else None
        model = noise_model(kind, n=n, floor=floor, bias_read_noise=RN if kind != FrameKind.BIAS else None,
                            gain_measured=GAIN if kind == FrameKind.FLAT else None)
        assert model.reject != "none"
        scale = "median" if kind == FrameKind.FLAT else None
        result = combine(frames, method="mean", scale=scale, sigma_clip=(3.0, 3.0), **model.combine_keywords())
        # the outlier is the largest value of its pixel: it survives where nothing was rejected high
        survived = result.nhigh_rejected == 0
        assert survived.mean() <= 0.01, f"{kind} n={n}: {survived.mean():.1%} of the outliers survive"
        truth = float(np.mean(levels * result.scales)) if scale else float(levels[0])
        noise = float(np.sqrt(RN**2 + truth / GAIN)) / np.sqrt(n - 1)
        assert np.median(result.data) == pytest.approx(truth, abs=noise), f"{kind} n={n}: level off"
        # and the good values are kept: few rejections besides the outliers
        extra = (result.nlow_rejected.astype(int) + result.nhigh_rejected - 1).clip(0).mean()
        assert extra < 0.1, f"{kind} n={n}: {extra:.2f} good values rejected per pixel"


def test_sample_sigma_clip_cannot_reject_in_small_groups():
    # Samuelson's bound: the facts the defaults are built on, checked numerically
    assert not sample_sigma_can_reject(7, 3.0, center="median")
    assert sample_sigma_can_reject(8, 3.0, center="median")
    assert not sample_sigma_can_reject(10, 3.0, center="mean")
    assert sample_sigma_can_reject(11, 3.0, center="mean")
    rng = np.random.default_rng(5)
    for n in range(3, 8):
        frames, _ = _one_outlier_per_pixel(rng, n, np.zeros(n))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = combine(frames, method="mean", sigma_clip=(3.0, 3.0))
        assert result.nhigh_rejected.sum() == 0, "a sample-sigma clip rejected where it cannot"
        assert any(issubclass(w.category, CcdcalWarning) and "cannot reject" in str(w.message) for w in caught)


def test_combine_counts_rejections_per_member():
    rng = np.random.default_rng(9)
    frames, hit = _one_outlier_per_pixel(rng, 5, np.zeros(5))
    result = combine(frames, method="mean", reject="ccdclip", gain=1.0, read_noise=RN, pedestal=np.inf)
    per_frame = np.bincount(hit.ravel(), minlength=5)
    assert np.all(result.member_rejected[:, 1] >= per_frame)
    assert np.all(result.member_rejected[:, 1] <= per_frame + 0.01 * hit.size)
    assert result.member_rejected.sum() == int(result.nlow_rejected.sum()) + int(result.nhigh_rejected.sum())


# -- the plan ------------------------------------------------------------------------------------
def _info(name: str, kind: FrameKind, exptime: float | None, temp: float | None, *,
          level: float | None = None, noise: float = 5.0, filt: str | None = None) -> FrameInfo:
    metrics = {"level": level, "noise": noise} if level is not None else None
    return FrameInfo(path=Path(name), hdu=0, kind=kind, exptime=exptime, filter=filt, binning=(1, 1),
                     shape=(64, 64), ccd_temp=temp, metrics=metrics)


def _night(*extra: FrameInfo, bias_temps=(-10.0,) * 5, dark_temps=None) -> list[FrameInfo]:
    frames = [_info(f"bias{i}.fits", FrameKind.BIAS, 0.0, t, level=1000.0) for i, t in enumerate(bias_temps)]
    dark_temps = dark_temps or {60.0: -10.02, 300.0: -9.98}
    for t, temp in dark_temps.items():
        frames += [_info(f"dark{t:g}_{i}.fits", FrameKind.DARK, t, temp + 0.1 * (i - 2), level=1010.0)
                   for i in range(5)]
    return frames + list(extra)


def test_dark_matching_treats_temperatures_within_tolerance_as_equal():
    # the 60 s dark group is 0.03 degC closer to the light, but the 300 s dark is the right one
    light = _info("light.fits", FrameKind.LIGHT, 300.0, -10.03)
    plan = build_plan(Inventory(tuple(_night(light)), ()))
    job = plan.lights[0]
    assert job.recipe.dark == "master_dark_300s.fits"
    assert job.recipe.dark_scale == pytest.approx(1.0)
    assert not any("no 300 s dark" in n for n in job.notes)
    assert "no 300 s dark" not in plan.describe()


def test_flats_of_one_group_get_the_same_dark_despite_jitter():
    flats = [_info(f"flat{i}.fits", FrameKind.FLAT, 300.0, -10.0 + (0.3 if i % 2 else -0.3), filt="V",
                   level=20000.0) for i in range(4)]
    plan = build_plan(Inventory(tuple(_night(*flats)), ()))
    darks = {r.dark for r in plan.master("master_flat_V.fits").recipes}
    assert darks == {"master_dark_300s.fits"}


def test_dark_outside_tolerance_is_not_preferred_over_one_inside():
    # 300 s darks were taken 10 degC colder; the 60 s darks at the light's temperature are scaled
    light = _info("light.fits", FrameKind.LIGHT, 300.0, -10.0)
    frames = _night(light, dark_temps={60.0: -10.0, 300.0: -20.0})
    job = build_plan(Inventory(tuple(frames), ())).lights[0]
    assert job.recipe.dark.startswith("master_dark_60s")
    assert job.recipe.dark_scale == pytest.approx(5.0)


def test_nearest_dark_when_none_within_tolerance_with_a_note():
    light = _info("light.fits", FrameKind.LIGHT, 300.0, 0.0)
    frames = _night(light, dark_temps={300.0: -10.0, 60.0: -20.0}, bias_temps=(-10.0,) * 5)
    job = build_plan(Inventory(tuple(frames), ())).lights[0]
    assert job.recipe.dark.startswith("master_dark_300s")
    assert any("away from the frame" in n for n in job.notes)


def test_a_warm_bias_is_left_out_of_the_master_bias():
    temps = (0.0, 0.1, -0.1, 0.05, 0.0, 0.1, -0.05, 0.0, 0.02, -0.02, 10.0)
    light = _info("light.fits", FrameKind.LIGHT, 300.0, 0.0)
    frames = _night(light, bias_temps=temps, dark_temps={300.0: 0.0})
    plan = build_plan(Inventory(tuple(frames), ()))
    biases = [m for m in plan.masters if m.kind == FrameKind.BIAS]
    assert [b.name for b in biases] == ["master_bias.fits"]
    assert len(biases[0].members) == 10
    assert "bias10.fits" not in {f.name for f in biases[0].members}
    assert any(s.path == "bias10.fits" and "+10.0" in s.reason for s in plan.skipped)


def test_biases_at_two_temperatures_serve_their_own_cluster():
    temps = (-10.0, -10.1, -9.9, 0.0, 0.1, -0.1)
    lights = [_info("cold.fits", FrameKind.LIGHT, 300.0, -10.0), _info("warm.fits", FrameKind.LIGHT, 300.0, 0.0)]
    frames = _night(*lights, bias_temps=temps, dark_temps={300.0: -10.0})
    frames += [_info(f"wdark{i}.fits", FrameKind.DARK, 300.0, 0.0, level=1100.0) for i in range(3)]
    plan = build_plan(Inventory(tuple(frames), ()))
    by_light = {j.frame.name: j.recipe for j in plan.lights}
    assert by_light["cold.fits"].bias == "master_bias_-10C.fits"
    assert by_light["warm.fits"].bias == "master_bias_+0C.fits"
    warm_dark = plan.master(by_light["warm.fits"].dark)
    assert warm_dark.temperature == pytest.approx(0.0, abs=0.5)
    assert {r.bias for r in warm_dark.recipes} == {"master_bias_+0C.fits"}


def test_gross_level_outlier_is_left_out_unless_kept():
    frames = [_info(f"bias{i}.fits", FrameKind.BIAS, 0.0, -10.0, level=1000.0 + 0.5 * i) for i in range(6)]
    frames.append(_info("offset.fits", FrameKind.BIAS, 0.0, -10.0, level=1028.0))
    plan = build_plan(Inventory(tuple(frames), ()))
    job = plan.masters[0]
    assert [f.name for f in job.excluded] == ["offset.fits"]
    assert "+26.5 ADU" in job.excluded_reasons[0] and "noise" in job.excluded_reasons[0]
    assert "offset.fits" in plan.describe()
    kept = build_plan(Inventory(tuple(frames), ()), PlanOptions(keep_flagged=True)).masters[0]
    assert len(kept.members) == 7 and not kept.excluded


def test_mild_level_differences_stay_in():
    frames = [_info(f"bias{i}.fits", FrameKind.BIAS, 0.0, -10.0, level=1000.0 + 2.0 * (i % 3)) for i in range(6)]
    job = build_plan(Inventory(tuple(frames), ())).masters[0]
    assert len(job.members) == 6 and not job.excluded


def test_default_settings_clip_every_master_of_three_or_more():
    frames = _night()
    for job in build_plan(Inventory(tuple(frames), ())).masters:
        assert job.settings.method == "mean"
        assert job.settings.reject == "auto" and job.settings.sigma_clip == (3.0, 3.0)
        assert "noise-model clip" in job.settings.describe()


def test_ccdclip_never_takes_a_camera_gain_setting_as_electrons_per_adu():
    from astropy.io import fits
    from astropy.nddata import CCDData

    from ccdcal.errors import InputError

    rng = np.random.default_rng(1)
    frames = []
    for _ in range(4):
        header = fits.Header()
        header["GAIN"] = (120, "ZWO gain setting")
        frames.append(CCDData(rng.normal(1000, 5, (16, 16)).astype(np.float32), unit="adu", meta=header))
    with pytest.raises(InputError, match="gain"):
        combine(frames, reject="ccdclip", read_noise=5.0)
    for ccd in frames:
        ccd.header["EGAIN"] = (1.5, "electrons per ADU")
    assert combine(frames, reject="ccdclip", read_noise=5.0).data.shape == (16, 16)
