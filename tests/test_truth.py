"""Known truth: the synthetic night's injected bias, dark current and flats are recovered."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

LIGHTS = ["m51_V_001", "m51_V_002", "m51_R_001", "m51_R_002"]


def load(path):
    return fits.getdata(path).astype(np.float64)


@pytest.mark.parametrize("filt", ["V", "R"])
def test_master_flat_matches_injected_flat(demo_night, filt):
    master = load(demo_night / "out" / "masters" / f"master_flat_{filt}.fits")
    truth = load(demo_night / "truth" / f"flat_{filt}.fits")
    rms = np.sqrt(np.mean((master / truth - 1.0) ** 2))
    assert rms < 0.005, f"master flat {filt} differs from the truth by {rms:.2%} RMS"


def test_master_bias_recovers_structure_above_overscan(demo_night):
    master = load(demo_night / "out" / "masters" / "master_bias.fits")
    truth = load(demo_night / "truth" / "bias.fits")
    info = json.loads((demo_night / "truth" / "truth.json").read_text())
    # The residual is the read noise of a mean of 9 frames (rn/3), cosmic rays of the members
    # rejected: no pixel further than 6 of those sigma.
    sigma = info["read_noise_adu"] / 3
    assert np.std(master - truth) < 1.1 * sigma
    assert np.max(np.abs(master - truth)) < 6 * sigma, "a member's cosmic ray is left in the master bias"
    assert abs(np.median(master - truth)) < 0.5


def test_master_dark_rate_matches_truth(demo_night):
    truth = load(demo_night / "truth" / "dark_rate.fits")
    info = json.loads((demo_night / "truth" / "truth.json").read_text())
    rn, gain = info["read_noise_adu"], info["gain"]
    for t in (60.0, 300.0):
        master = load(demo_night / "out" / "masters" / f"master_dark_{t:g}s.fits")
        hot = load(demo_night / "truth" / "hot.fits") > 0
        assert np.allclose(master[hot] / t, truth[hot], rtol=0.1, atol=0.05)
        assert abs(np.median(master - truth * t)) < 0.5
        # every pixel: the noise of a mean of 5 darks (read + shot) and of the master bias (9 frames);
        # a member's cosmic ray left in would stand 20-600 of these sigma high
        sigma = np.sqrt((rn**2 + truth * t / gain) / 5 + rn**2 / 9)
        chi = (master - truth * t) / sigma
        assert np.std(chi) < 1.1
        assert np.max(np.abs(chi)) < 6.5, f"dark {t:g} s: a residual of {np.max(np.abs(chi)):.0f} sigma"


def _expected_sigma(signal, flat, dark, info, exptime):
    """Per-pixel noise of a calibrated light (ADU): read noise and Poisson noise of sky+stars+dark."""
    electrons = (np.clip(signal * flat, 0, None) + dark * exptime) * info["gain"]
    return np.sqrt(info["read_noise_adu"] ** 2 + electrons / info["gain"] ** 2) / flat


@pytest.mark.parametrize("name", LIGHTS)
def test_calibrated_light_equals_injected_signal_within_noise(demo_night, name):
    info = json.loads((demo_night / "truth" / "truth.json").read_text())
    data = load(demo_night / "out" / "calibrated" / f"{name}.fits")
    signal = load(demo_night / "truth" / f"signal_{name}.fits")
    bad = load(demo_night / "truth" / f"bad_{name}.fits") > 0
    flat = load(demo_night / "truth" / f"flat_{name.split('_')[1]}.fits")
    dark = load(demo_night / "truth" / "dark_rate.fits")
    assert data.shape == signal.shape, "the overscan must be trimmed off"
    sigma = _expected_sigma(signal, flat, dark, info, info["light_exptime"])
    chi = ((data - signal) / sigma)[~bad]
    assert abs(np.median(data - signal)) < 1.0, "zero point off: bias/dark not removed right"
    # the masters add (rn/3)^2 and a little more: the scatter is the single-frame noise within 5 %
    assert 0.97 < np.std(chi) < 1.05, f"scatter is {np.std(chi):.3f}x the expected noise"
    # no holes: a cosmic ray left in a master would dig one into every light
    assert np.min(chi) > -6.0, f"a hole of {np.min(chi):.1f} sigma"


@pytest.mark.parametrize("name", LIGHTS)
def test_no_vignetting_left(demo_night, name):
    data = load(demo_night / "out" / "calibrated" / f"{name}.fits")
    n = data.shape[0]
    q = n // 8
    centre = np.median(data[3 * q: 5 * q, 3 * q: 5 * q])
    for corner in (data[:q, :q], data[:q, -q:], data[-q:, :q], data[-q:, -q:]):
        assert abs(np.median(corner) / centre - 1) < 0.01


@pytest.mark.parametrize("name", LIGHTS)
def test_no_hot_pixels_left(demo_night, name):
    info = json.loads((demo_night / "truth" / "truth.json").read_text())
    data = load(demo_night / "out" / "calibrated" / f"{name}.fits")
    signal = load(demo_night / "truth" / f"signal_{name}.fits")
    hot = (load(demo_night / "truth" / "hot.fits") > 0) & ~(load(demo_night / "truth" / f"bad_{name}.fits") > 0)
    flat = load(demo_night / "truth" / f"flat_{name.split('_')[1]}.fits")
    dark = load(demo_night / "truth" / "dark_rate.fits")
    raw = fits.getdata(demo_night / "raw" / f"{name}.fits").astype(np.float64)[:, : data.shape[1]]
    assert np.max(raw[hot] - np.median(raw)) > 1000, "the test needs real hot pixels in the raw light"
    chi = (data - signal)[hot] / _expected_sigma(signal, flat, dark, info, info["light_exptime"])[hot]
    assert np.max(np.abs(chi)) < 5.5


def test_calibrated_header_tells_what_was_done(demo_night):
    h = fits.getheader(demo_night / "out" / "calibrated" / "m51_V_001.fits")
    assert h["CALBIAS"] == "master_bias.fits"
    assert h["CALDARK"] == "master_dark_300s.fits"
    assert h["DARKSCAL"] == pytest.approx(90 / 300)
    assert h["CALFLAT"] == "master_flat_V.fits"
    assert "BIASSEC" not in h and "BZERO" not in h
    assert h["BUNIT"] == "adu"
    history = " ".join(h["HISTORY"])
    assert "overscan" in history and "trimmed" in history
    m = fits.getheader(demo_night / "out" / "masters" / "master_flat_V.fits")
    assert m["IMAGETYP"] == "MASTER FLAT" and m["NCOMBINE"] == 5


def test_rerun_is_idempotent(demo_night, tmp_path):
    from ccdcal.pipeline.run import ReduceOptions, reduce

    before = {p.name: p.read_bytes() for p in (demo_night / "out" / "calibrated").iterdir()}
    result = reduce([demo_night / "raw"], demo_night / "out", options=ReduceOptions(report=False))
    assert result.reused == len(result.plan.masters) + len(result.plan.lights)
    after = {p.name: p.read_bytes() for p in (demo_night / "out" / "calibrated").iterdir()}
    assert before == after


@pytest.mark.parametrize("master", ["master_bias", "master_dark_300s", "master_flat_V"])
def test_every_master_says_what_its_rejection_did(demo_night, master):
    # the calibration frames carry cosmic rays: the header counts the rejected values of each
    # member, and a rejection map is written for the report
    h = fits.getheader(demo_night / "out" / "masters" / f"{master}.fits")
    n = h["NCOMBINE"]
    per_member = [h[f"REJH{i:03d}"] for i in range(1, n + 1)]
    assert sum(per_member) == h["NREJHI"] > 0
    assert all(count > 0 for count in per_member), "every member had cosmic rays to reject"
    assert (demo_night / "out" / "previews" / f"rejection-{master}.png").exists()
