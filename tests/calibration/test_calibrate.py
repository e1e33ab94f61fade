"""calibrate: overscan models, the fused pass vs ccdproc, dark optimisation, uncertainty, masks, gain."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ccdcal.calibration.arithmetic import (
    CalibratedRows,
    Master,
    calibrate_frame,
    optimize_dark_scale,
)
from ccdcal.calibration.masters import (
    choose_dark,
    gain_from_flat_pair,
    hot_pixel_mask,
    normalise_flat,
    read_noise_from_pair,
)
from ccdcal.calibration.overscan import OverscanSpec, overscan_fit, overscan_geometry
from ccdcal.calibration.recipe import Recipe
from ccdcal.io.headers import header_gain
from ccdcal.masks import (
    MASK_COSMIC_RAY,
    MASK_HOT,
    MASK_LOW_FLAT,
    MASK_NO_DATA,
    MASK_SATURATED,
    MASK_USER,
)
from ccdcal.sections import Section

NY, NX, NOVER = 64, 64, 16


def _raw_night(seed: int = 3):
    """Arrays of a tiny camera: raw light (with overscan), bias, dark (bias-subtracted), flat."""
    rng = np.random.default_rng(seed)
    rows = np.arange(NY)[:, None]
    level = 1000.0 + 3.0 * rows / NY
    bias = rng.normal(10.0, 2.0, (NY, NX)).astype(np.float32)
    dark = np.full((NY, NX), 30.0, dtype=np.float32)
    dark[rng.integers(0, NY, 40), rng.integers(0, NX, 40)] = rng.uniform(500, 3000, 40)
    flat = (1.0 + 0.1 * rng.normal(size=(NY, NX))).astype(np.float32)
    flat /= flat.mean()
    raw = np.empty((NY, NX + NOVER), dtype=np.float32)
    raw[:, :NX] = level + bias + 0.3 * dark + 500.0 * flat + rng.normal(0, 5, (NY, NX))
    raw[:, NX:] = level + rng.normal(0, 5, (NY, NOVER))
    return np.round(raw).astype(np.float32), bias, dark, flat


def test_calibrate_frame_matches_ccdproc_ccd_process():
    """Overscan (median per row), trim, bias, exposure-scaled dark, flat: identical inputs and settings."""
    ccdproc = pytest.importorskip("ccdproc")
    import astropy.units as u
    from astropy.nddata import CCDData

    raw, bias, dark, flat = _raw_night()
    biassec, trimsec = f"[{NX + 1}:{NX + NOVER},1:{NY}]", f"[1:{NX},1:{NY}]"
    spec, trim = overscan_geometry(raw.shape, biassec, trimsec, model="median")
    ours = calibrate_frame(raw, overscan=spec, trim=trim, bias=Master(bias), dark=Master(dark, exptime=300.0),
                           dark_scale=90.0 / 300.0, flat=Master(flat), uncertainty=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ccdproc.ccd_process(
            CCDData(raw, unit="adu"), oscan=biassec, oscan_median=True, oscan_model=None, trim=trimsec,
            master_bias=CCDData(bias, unit="adu"), dark_frame=CCDData(dark, unit="adu"),
            master_flat=CCDData(flat, unit=""), data_exposure=90.0 * u.s, dark_exposure=300.0 * u.s,
            dark_scale=True)
    np.testing.assert_allclose(ours.data, theirs.data, rtol=1e-6, atol=1e-3)
    # and the lazy row pass used for masters gives the same numbers
    rows = CalibratedRows(_ArraySource(raw), Recipe(spec, trim, "b", "d", 0.3, "f"),
                          {"b": bias, "d": dark, "f": flat}).read()
    np.testing.assert_array_equal(rows, ours.data)


class _ArraySource:
    def __init__(self, data):
        self.data, self.shape = data, data.shape

    def read_rows(self, y0, y1):
        return np.array(self.data[y0:y1], dtype=np.float32)


@pytest.mark.parametrize("model", ["legendre", "chebyshev", "spline", "median", "mean"])
def test_overscan_models_recover_injected_ramp(model):
    rng = np.random.default_rng(1)
    n = 400
    y = np.linspace(0, 1, n)
    truth = 1000.0 + 12.0 * y - 5.0 * y**2
    strip = truth[:, None] + rng.normal(0, 4.0, (n, 32))
    strip[[50, 51, 200], :] += 300.0  # a few hot lines the fits must reject
    spec = OverscanSpec(Section(1, 32, 1, n), axis=1, model=model, order=3)
    fit = overscan_fit(strip, spec)
    resid = fit.model - truth
    if model in ("median", "mean"):
        good = np.ones(n, bool)
        good[[50, 51, 200]] = False
        assert abs(np.mean(resid[good])) < 0.2 and np.std(resid[good]) < 1.5
    else:
        assert np.max(np.abs(resid)) < 0.6      # the ramp, and not the hot lines
        assert fit.rejected >= 3
    assert fit.noise == pytest.approx(4.0, rel=0.1)


def test_overscan_axis_from_the_region_shape_or_given():
    spec, trim = overscan_geometry((100, 132), "[101:132,1:100]", None)
    assert spec.axis == 1 and trim == Section(1, 100, 1, 100)
    spec, trim = overscan_geometry((132, 100), "[1:100,101:132]", None)
    assert spec.axis == 0 and trim == Section(1, 100, 1, 100)
    spec, _ = overscan_geometry((100, 132), "[101:132,1:100]", None, axis=0)
    assert spec.axis == 0
    # DATASEC only (Lick Nickel): the strip right of the data, less a 2-column margin
    spec, trim = overscan_geometry((1024, 1056), None, "[1:1024,1:1024]", model="median")
    assert str(spec.region) == "[1027:1056,1:1024]" and spec.derived and "median per row" in spec.describe()


def test_dark_optimisation_recovers_injected_dark_scale():
    rng = np.random.default_rng(5)
    n = 128
    dark_true = np.full((n, n), 20.0)
    hot = rng.integers(0, n, (300, 2))
    dark_true[hot[:, 0], hot[:, 1]] = rng.uniform(200, 5000, 300)
    dark = dark_true + rng.normal(0, 2.0, (n, n))  # a master dark: low noise
    y, x = np.mgrid[0:n, 0:n]
    sky = 300.0 + 0.5 * x + 0.2 * y
    stars = np.zeros((n, n))
    for cy, cx in rng.uniform(5, n - 5, (20, 2)):
        stars += 5000.0 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 4.0)
    k_true = 0.4173
    light = sky + stars + k_true * dark_true
    light = rng.poisson(light * 1.5) / 1.5 + rng.normal(0, 5.0, (n, n))
    k, used = optimize_dark_scale(light, dark)
    assert used > 100
    assert k == pytest.approx(k_true, rel=0.01)
    # through calibrate_frame: DARKSCAL replaced, exposure ratio kept alongside
    result = calibrate_frame(light, dark=Master(dark.astype(np.float32)), dark_scale=0.3, dark_optimize=True,
                             uncertainty=False)
    assert result.dark_optimized and result.dark_scale == pytest.approx(k_true, rel=0.01)
    assert result.dark_scale_exposure == 0.3


def test_dark_optimisation_keeps_the_exposure_ratio_when_the_dark_has_no_structure():
    rng = np.random.default_rng(2)
    dark = rng.normal(20.0, 1.0, (64, 64)).astype(np.float32)
    light = rng.normal(500.0, 5.0, (64, 64)).astype(np.float32)
    result = calibrate_frame(light, dark=Master(dark), dark_scale=0.5, dark_optimize=True, uncertainty=False)
    assert not result.dark_optimized and result.dark_scale == 0.5
    assert any("no structure" in n for n in result.notes)


def test_uncertainty_matches_the_scatter_of_many_noise_realisations():
    rng = np.random.default_rng(11)
    n, trials, gain, rn = 24, 1500, 1.8, 6.0
    y, x = np.mgrid[0:n, 0:n]
    signal = 50.0 + 40.0 * x + 3.0 * y                       # 50 .. ~1000 ADU: read and Poisson dominated
    bias_true, dark_true = np.full((n, n), 100.0), np.full((n, n), 40.0)
    flat_true = 0.8 + 0.4 * y / n
    sb, sd, sf = 1.5, 2.0, 0.01                              # master uncertainties (ADU, ADU, relative)
    k = 0.5
    outs, sigmas = [], []
    for _ in range(trials):
        charge = rng.poisson((signal * flat_true + k * dark_true) * gain) / gain
        raw = bias_true + charge + rng.normal(0, rn, (n, n))
        bias = Master((bias_true + rng.normal(0, sb, (n, n))).astype(np.float32),
                      uncertainty=np.full((n, n), sb, np.float32))
        dark = Master((dark_true + rng.normal(0, sd, (n, n))).astype(np.float32),
                      uncertainty=np.full((n, n), sd, np.float32))
        flat = Master((flat_true * (1 + rng.normal(0, sf, (n, n)))).astype(np.float32),
                      uncertainty=(flat_true * sf).astype(np.float32))
        r = calibrate_frame(raw, bias=bias, dark=dark, dark_scale=k, flat=flat, gain=gain, read_noise=rn)
        outs.append(r.data)
        sigmas.append(r.uncertainty)
    empirical = np.std(np.array(outs), axis=0, ddof=1)
    predicted = np.mean(np.array(sigmas), axis=0)
    ratio = empirical / predicted
    assert np.mean(ratio) == pytest.approx(1.0, abs=0.02)
    assert np.percentile(np.abs(ratio - 1), 90) < 0.06  # each pixel, within its sampling noise
    assert np.mean(np.array(outs), axis=0) == pytest.approx(signal, rel=0.01, abs=0.5)


def test_flat_below_the_floor_is_masked_never_inf():
    raw = np.full((8, 8), 100.0, np.float32)
    flat = np.ones((8, 8), np.float32)
    flat[2, 3], flat[4, 4], flat[5, 5] = 0.0, 0.05, np.nan
    r = calibrate_frame(raw, flat=Master(flat), gain=1.0, read_noise=1.0)
    assert np.all(np.isfinite(r.data)) and np.all(np.isfinite(r.uncertainty))
    assert r.mask[2, 3] & MASK_LOW_FLAT and r.mask[4, 4] & MASK_LOW_FLAT and r.mask[5, 5] & MASK_LOW_FLAT
    assert r.count(MASK_LOW_FLAT) == 3 and r.data[2, 3] == 100.0


def test_saturation_is_checked_on_the_raw_values():
    raw = np.full((8, 12), 1000.0, np.float32)
    raw[3, 3] = 65535.0
    raw[4, 4] = 60000.0            # below saturation raw; far above after any scaling
    spec, trim = overscan_geometry(raw.shape, "[9:12,1:8]", None, model="median")
    r = calibrate_frame(raw, overscan=spec, trim=trim, saturation=65535.0, uncertainty=False)
    assert r.mask[3, 3] & MASK_SATURATED and not r.mask[4, 4] & MASK_SATURATED
    assert r.count(MASK_SATURATED) == 1


def test_hot_pixels_come_from_the_master_dark():
    rng = np.random.default_rng(4)
    dark = rng.normal(10.0, 2.0, (64, 64)).astype(np.float32)
    dark[7, 9] = 200.0
    assert hot_pixel_mask(dark).sum() == 1 and hot_pixel_mask(dark)[7, 9]
    r = calibrate_frame(np.full((64, 64), 500.0, np.float32), dark=Master(dark), uncertainty=False)
    assert r.mask[7, 9] & MASK_HOT and r.count(MASK_HOT) == 1
    # a master's own MASK bits are carried over (no data in the bias, hot in the dark)
    mask = np.zeros((64, 64), np.uint8)
    mask[1, 1] = MASK_NO_DATA
    r = calibrate_frame(np.full((64, 64), 500.0, np.float32), bias=Master(np.zeros((64, 64), np.float32), mask=mask),
                        uncertainty=False)
    assert r.mask[1, 1] == MASK_NO_DATA


def test_user_bad_pixel_map_in_raw_or_trimmed_shape():
    raw = np.full((8, 12), 1000.0, np.float32)
    spec, trim = overscan_geometry(raw.shape, "[9:12,1:8]", None, model="median")
    bpm = np.zeros((8, 12), bool)
    bpm[2, 5] = True
    r = calibrate_frame(raw, overscan=spec, trim=trim, bad_pixels=bpm, uncertainty=False)
    assert r.mask[2, 5] == MASK_USER and r.count(MASK_USER) == 1
    r = calibrate_frame(raw, overscan=spec, trim=trim, bad_pixels=bpm[:, :8], uncertainty=False)
    assert r.mask[2, 5] == MASK_USER


def test_cosmic_rays_are_flagged_not_cleaned():
    pytest.importorskip("astroscrappy")
    rng = np.random.default_rng(8)
    raw = (rng.poisson(300.0 * 1.5, (64, 64)) / 1.5 + rng.normal(0, 4, (64, 64))).astype(np.float32)
    raw[20, 30:33] += 2000.0
    raw[40, 10] += 1500.0
    r = calibrate_frame(raw, gain=1.5, read_noise=4.0, cosmic_rays=True)
    assert all(r.mask[20, c] & MASK_COSMIC_RAY for c in (30, 31, 32)) and r.mask[40, 10] & MASK_COSMIC_RAY
    assert r.count(MASK_COSMIC_RAY) < 12
    assert r.data[40, 10] > 1000.0


def test_gain_conversion_to_electrons():
    raw = np.full((8, 8), 1000.0, np.float32)
    r = calibrate_frame(raw, gain=2.0, read_noise=5.0, to_electrons=True)
    assert r.unit == "electron" and np.all(r.data == 2000.0)
    assert r.uncertainty[0, 0] == pytest.approx(2.0 * np.sqrt(25.0 + 1000.0 / 2.0))
    from ccdcal.errors import InputError

    with pytest.raises(InputError, match="gain"):
        calibrate_frame(raw, to_electrons=True)


def test_header_gain_is_trusted_only_in_electrons_per_adu():
    from astropy.io import fits

    nickel = fits.Header([("GAIN", 1, "DCS GAIN INDEX")])
    assert header_gain(nickel)[0] is None
    sbig = fits.Header([("EGAIN", 2.06, "Electronic gain in e-/ADU"), ("GAIN", 120, "Sensor gain")])
    assert header_gain(sbig) == (2.06, "EGAIN")
    assert header_gain(fits.Header([("GAIN", 1.3, "[e-/ADU] gain")])) == (1.3, "GAIN")


def test_read_noise_and_gain_measured_from_frame_pairs():
    rng = np.random.default_rng(9)
    pattern = rng.normal(0, 10, (200, 200))
    b1 = np.round(1000 + pattern + rng.normal(0, 4.5, pattern.shape))
    b2 = np.round(1000 + pattern + rng.normal(0, 4.5, pattern.shape))
    assert read_noise_from_pair(b1, b2) == pytest.approx(4.5 * np.sqrt(1 + 1 / (12 * 4.5**2)), rel=0.03)
    prnu = rng.normal(1, 0.01, (200, 200))
    f1 = rng.poisson(prnu * 20000 * 1.8) / 1.8 + rng.normal(0, 4.5, prnu.shape)
    f2 = rng.poisson(prnu * 23000 * 1.8) / 1.8 + rng.normal(0, 4.5, prnu.shape)
    assert gain_from_flat_pair(f1, f2, read_noise=4.5, region=(slice(None), slice(None))) == pytest.approx(1.8, rel=0.04)


def test_flat_normalisation_median_or_clipped_mean():
    flat = np.full((40, 40), 20000.0, np.float32)
    flat[20, 20] = 1e6
    norm, level = normalise_flat(flat)
    assert level == 20000.0 and np.median(norm) == 1.0
    _, clipped = normalise_flat(flat, method="clipped-mean")
    assert clipped == pytest.approx(20000.0)


def test_nearest_master_dark_prefers_longer():
    darks = {"d60": 60.0, "d300": 300.0, "d30": 30.0}
    assert choose_dark(60.0, darks) == "d60"
    assert choose_dark(90.0, darks) == "d300"
    assert choose_dark(600.0, darks) == "d300"
    # With frame counts, among the longer darks the one adding least noise (scale/sqrt(N)):
    # for a 23 s flat, 30 s x1 adds 0.77 sigma, 60 s x11 0.12, 300 s x1 0.077.
    ladder = {"d30": 30.0, "d60": 60.0}
    assert choose_dark(23.0, ladder) == "d30"
    assert choose_dark(23.0, ladder, counts={"d30": 1, "d60": 11}) == "d60"
    assert choose_dark(23.0, {**ladder, "d300": 300.0}, counts={"d30": 1, "d60": 11, "d300": 1}) == "d300"
    assert choose_dark(60.0, {**ladder, "d300": 300.0}, counts={"d30": 1, "d60": 11, "d300": 1}) == "d60"


def test_mask_bit_counts_from_one_histogram_equal_counts_per_bit():
    from ccdcal.calibration.arithmetic import CalibratedFrame

    rng = np.random.default_rng(11)
    mask = (rng.random((37, 53)) < 0.3).astype(np.uint8) * rng.integers(0, 256, (37, 53)).astype(np.uint8)
    frame = CalibratedFrame.__new__(CalibratedFrame)
    frame.mask = mask
    bits = [1, 2, 4, 8, 16, 32, 64, 128]
    expected = [int(((mask & b) != 0).sum()) for b in bits]      # plain numpy, bit by bit
    assert frame.counts(bits) == expected
    assert sum(expected) > 0 and frame.counts([]) == []
