"""Headers that tell the truth, and outputs that round-trip through CCDData (synthetic night)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty
from astropy.time import Time

from ccdcal._shared.robust import robust_std
from ccdcal.masks import MASK_HOT, MASK_SATURATED


def _outputs(root):
    out = root / "out"
    return sorted((out / "masters").glob("*.fits")) + sorted((out / "calibrated").glob("*.fits"))


def test_every_output_round_trips_through_ccddata_with_valid_checksums(demo_night):
    for path in _outputs(demo_night):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a CHECKSUM/DATASUM mismatch warns
            with fits.open(path, checksum=True) as hdul:
                assert [h.name for h in hdul] == ["PRIMARY", "UNCERT", "MASK"]
                for hdu in hdul:
                    assert "CHECKSUM" in hdu.header and "DATASUM" in hdu.header
                data = hdul[0].data
        ccd = CCDData.read(path)
        assert isinstance(ccd.uncertainty, StdDevUncertainty) and ccd.uncertainty.array.shape == ccd.shape
        assert ccd.mask is not None and ccd.mask.shape == ccd.shape
        np.testing.assert_array_equal(ccd.data, data)
        assert str(ccd.unit) in ("adu", "")
        assert fits.getdata(path, "MASK").dtype == np.uint8


def test_light_header_records_masters_scale_gain_and_noise(demo_night):
    out = demo_night / "out"
    truth = json.loads((demo_night / "truth" / "truth.json").read_text())
    h = fits.getheader(out / "calibrated" / "m51_V_001.fits")
    for key, master in (("B", "master_bias.fits"), ("D", "master_dark_300s.fits"), ("F", "master_flat_V.fits")):
        assert h["CAL" + {"B": "BIAS", "D": "DARK", "F": "FLAT"}[key]] == master
        assert h["CALSUM" + key] == fits.getheader(out / "masters" / master)["DATASUM"]
    assert h["DARKSCAL"] == pytest.approx(90.0 / 300.0) and h["DARKEXPR"] == pytest.approx(0.3)
    assert h["DARKOPT"] is False and h["CALDARKT"] == 300.0
    assert h["FLATNORM"] == fits.getheader(out / "masters" / "master_flat_V.fits")["FLATNORM"]
    assert h["GAIN"] == truth["gain"] and h["GAINSRC"] == "EGAIN" and h["BUNIT"] == "adu"
    assert h["RDNADU"] == pytest.approx(truth["read_noise_adu"], rel=0.05)
    assert h["RDNOISE"] == pytest.approx(truth["read_noise_adu"] * truth["gain"], rel=0.05)
    assert h["EXPTIME"] == 90.0 and h["OVSCMOD"] == "legendre" and h["OVSCORD"] == 3 and "OVSCC0" in h
    assert h["MJD-AVG"] == pytest.approx(h["MJD-OBS"] + 45.0 / 86400.0)
    assert h["SATRAW"] == 65535.0 and h["NSATUR"] > 0 and h["NHOTPIX"] > 0
    history = "\n".join(str(x) for x in h["HISTORY"])
    for step in ("overscan [257:288,1:256]", "median per row, Legendre order 3", "trimmed to [1:256,1:256]",
                 "subtracted master bias master_bias.fits", "master_dark_300s.fits x 0.3 (exposure ratio)",
                 "divided by master flat master_flat_V.fits", "UNCERT"):
        assert step in history
    assert any("MASK bit 8" in str(c) for c in h["COMMENT"])
    assert "BIASSEC" not in h and "TRIMSEC" not in h


def test_light_mask_and_uncertainty_match_the_truth(demo_night):
    path = demo_night / "out" / "calibrated" / "m51_V_001.fits"
    data, sigma, mask = (fits.getdata(path, ext) for ext in (0, "UNCERT", "MASK"))
    truth = demo_night / "truth"
    signal = fits.getdata(truth / "signal_m51_V_001.fits")
    bad = fits.getdata(truth / "bad_m51_V_001.fits").astype(bool)
    hot = fits.getdata(truth / "hot.fits").astype(bool)
    raw = fits.getdata(demo_night / "raw" / "m51_V_001.fits")[:, :256]
    assert (raw >= 65535).sum() > 0
    np.testing.assert_array_equal(mask & MASK_SATURATED > 0, raw >= 65535)
    assert np.mean(mask[hot] & MASK_HOT > 0) > 0.9
    pull = ((data - signal) / sigma)[(mask == 0) & ~bad]
    assert robust_std(pull) == pytest.approx(1.0, abs=0.05)


def test_master_headers(demo_night):
    masters = demo_night / "out" / "masters"
    raw = demo_night / "raw"
    truth = json.loads((demo_night / "truth" / "truth.json").read_text())
    h = fits.getheader(masters / "master_bias.fits")
    assert h["IMAGETYP"] == "MASTER BIAS" and h["NCOMBINE"] == 9 and h["EXPTIME"] == 0.0 and h["BUNIT"] == "adu"
    assert h["RDNADU"] == pytest.approx(truth["read_noise_adu"], rel=0.05)
    members = sorted(raw.glob("bias_*.fits"))
    mids = [Time(fits.getheader(m)["DATE-OBS"]).mjd + fits.getheader(m)["EXPTIME"] / 2 / 86400 for m in members]
    assert h["MJD-OBS"] == pytest.approx(np.mean(mids), abs=1e-7)
    assert Time(h["DATE-OBS"]).mjd == pytest.approx(np.mean(mids), abs=1e-6)

    d = fits.getheader(masters / "master_dark_300s.fits")
    assert d["IMAGETYP"] == "MASTER DARK" and d["EXPTIME"] == 300.0 and d["DARKTIME"] == 300.0
    assert d["NCOMBINE"] == 5 and d["NHOTPIX"] > 0
    members = sorted(raw.glob("dark_300s_*.fits"))
    mids = [Time(fits.getheader(m)["DATE-OBS"]).mjd + 150.0 / 86400 for m in members]
    assert d["MJD-OBS"] == pytest.approx(np.mean(mids), abs=1e-7)
    hot_truth = fits.getdata(demo_night / "truth" / "hot.fits").astype(bool)
    dmask = fits.getdata(masters / "master_dark_300s.fits", "MASK")
    assert np.mean(dmask[hot_truth] & MASK_HOT > 0) > 0.9 and np.mean(dmask[~hot_truth] & MASK_HOT > 0) < 1e-3

    f = fits.getheader(masters / "master_flat_V.fits")
    assert f["IMAGETYP"] == "MASTER FLAT" and f["NCOMBINE"] == 5 and 15000 < f["FLATNORM"] < 45000
    assert f["GAINMEAS"] == pytest.approx(truth["gain"], rel=0.05)
    assert CCDData.read(masters / "master_flat_V.fits").unit.physical_type == "dimensionless"


def test_calibrate_command_converts_to_electrons(demo_night, tmp_path):
    from ccdcal.cli import main

    masters = demo_night / "out" / "masters"
    code = main(["calibrate", str(demo_night / "raw" / "m51_R_001.fits"), "-o", str(tmp_path),
                 "--bias", str(masters / "master_bias.fits"), "--dark", str(masters / "master_dark_60s.fits"),
                 str(masters / "master_dark_300s.fits"), "--flat", str(masters / "master_flat_R.fits"),
                 "--electrons", "--dark-optimize"])
    assert code == 0
    path = tmp_path / "m51_R_001.fits"
    h = fits.getheader(path)
    assert h["BUNIT"] == "electron" and h["GAIN"] == 1.0 and h["GAINORIG"] == 1.5
    assert h["CALDARK"] == "master_dark_300s.fits" and h["DARKOPT"] is True
    assert h["DARKSCAL"] == pytest.approx(0.3, rel=0.03)
    ccd = CCDData.read(path)
    assert str(ccd.unit) == "electron"
    reduced = fits.getdata(demo_night / "out" / "calibrated" / "m51_R_001.fits")
    assert np.median(ccd.data / 1.5 - reduced) == pytest.approx(0.0, abs=0.5)
    ratio = ccd.uncertainty.array / fits.getdata(demo_night / "out" / "calibrated" / "m51_R_001.fits", "UNCERT")
    assert np.median(ratio) == pytest.approx(1.5, rel=0.01)


def test_master_cards_are_written_in_one_place_in_a_fixed_order():
    import numpy as np

    from ccdcal.io.headers import master_cards

    cards = master_cards("flat", member_rejected=np.array([[1, 2]]), npix=100, flat_level=1234.5,
                         n_nodata=0, gain_measured=1.51234, overscan_levels=[10.0, 12.0], history=["a"])
    assert list(cards) == ["NREJLO", "NREJHI", "REJL001", "REJH001", "FLATNORM", "FLATFLOR", "NNODATA",
                           "GAINMEAS", "OVSCMEAN", "HISTORY"]
    assert cards["GAINMEAS"][0] == 1.5123 and cards["OVSCMEAN"][0] == 11.0 and cards["HISTORY"] == ["a"]
    bias = master_cards("bias", member_rejected=None, npix=100, read_noise_measured=5.0, detector_gain=2.0,
                        detector_gain_source="EGAIN")
    assert list(bias) == ["NNODATA", "RDNADU", "RDNOISE", "HISTORY"] and bias["RDNOISE"][0] == 10.0


# -- the e-/ADU of CMOS data stored left-shifted (issue 27) ------------------------------------------
def test_egain_at_the_native_depth_is_divided_by_the_shift_of_the_stored_data():
    from astropy.io import fits

    from ccdcal.io.headers import adc_shift, header_gain, resolve_detector

    rng = np.random.default_rng(1)
    native14 = rng.integers(100, 16000, 5000)
    assert adc_shift(native14 * 4) == 2 and adc_shift((native14 * 16).astype(np.float32)) == 4
    assert adc_shift(native14 | 1) == 0                           # a CCD's 16-bit data
    assert adc_shift(np.full(10, 1600)) == 0                       # too few values to tell
    assert adc_shift(native14 * 4 + 0.5) == 0                      # not integers
    nina = fits.Header([("BITPIX", 16), ("GAIN", 100, "Sensor gain"), ("EGAIN", 1.0022, "Electrons per A/D unit")])
    assert header_gain(nina) == (1.0022, "EGAIN")                  # data not known to be shifted
    gain, source = header_gain(nina, shift=2)
    assert gain == 1.0022 / 4 and "14-bit" in source
    sharpcap = fits.Header([("BITPIX", 16), ("EGAIN", 0.1226), ("EGAINSAV", 0.00766), ("ADCBITS", 12)])
    assert header_gain(sharpcap, shift=4)[0] == 0.00766            # at the saved depth: as written
    del sharpcap["EGAINSAV"]
    assert header_gain(sharpcap)[0] == 0.1226 / 16                 # ADCBITS says 12 bits
    zwo = fits.Header([("BITPIX", 16), ("BZERO", 32768), ("GAIN", 120)])
    assert header_gain(zwo, shift=2)[0] is None                    # a setting is never e-/ADU
    det = resolve_detector(zwo, shift=2)
    assert det.gain is None and det.saturation == 65532            # saturated at the shifted maximum
    assert resolve_detector(zwo, shift=0).saturation == 65535


def test_dates_as_capture_programs_write_them():
    """DATE-OBS with 7 decimals (N.I.N.A. since 2025, SharpCap, SGP), 3 (INDI) or none (APT, MaxIm)
    is one instant; a date with the time of day in TIME-OBS too; DATE-LOC (local) never counts."""
    from astropy.io import fits

    from ccdcal.io.headers import start_mjd

    base = start_mjd(fits.Header([("DATE-OBS", "2025-06-01T22:15:03")]))
    for text, fraction in (("2025-06-01T22:15:03.1234567", 0.1234567), ("2025-06-01T22:15:03.123", 0.123),
                           ("2025-06-01 22:15:03", 0.0)):
        assert abs(start_mjd(fits.Header([("DATE-OBS", text)])) - base - fraction / 86400) * 86400 < 1e-4
    split = fits.Header([("DATE-OBS", "2025-06-01"), ("TIME-OBS", "22:15:03")])
    assert abs(start_mjd(split) - base) * 86400 < 1e-3
    assert start_mjd(fits.Header([("DATE-LOC", "2025-06-02T00:15:03")])) is None


def test_dates_convert_as_astropy_converts_them_leap_second_days_included():
    """Issue 31: the light's time keywords are converted without astropy.time (a millisecond a
    light); the values are astropy's to the last bit, on random dates and on leap-second days."""
    from ccdcal.io.headers import _date_obs_mjd, _isot

    rng = np.random.default_rng(31)
    dates = []
    for _ in range(500):
        places = int(rng.integers(0, 7))
        seconds = f"{rng.uniform(0, 59.9):0{3 + places if places else 2}.{places}f}"
        dates.append(f"{int(rng.integers(1990, 2040)):04d}-{int(rng.integers(1, 13)):02d}-"
                     f"{int(rng.integers(1, 29)):02d}T{int(rng.integers(0, 24)):02d}:"
                     f"{int(rng.integers(0, 60)):02d}:{seconds}")
    dates += ["2016-12-31T23:59:59.5", "2015-06-30T18:00:00", "2017-01-01T00:00:00.000", "2016-12-31 12:00:00"]
    for date in dates:
        mjd = _date_obs_mjd({"DATE-OBS": date})
        assert mjd == Time(date.replace(" ", "T"), format="isot", scale="utc").mjd, date
    for mjd in [*rng.uniform(45000, 65000, 500), 57753.4654, 57203.89, 59000.9999999999, 59001.0]:
        assert _isot(float(mjd)) == Time(float(mjd), format="mjd", scale="utc").isot, mjd


def test_dates_before_1972_are_left_to_astropy():
    """UTC before 1972 had rate offsets and steps that astropy follows: those dates are its."""
    from ccdcal.io.headers import _date_obs_mjd, _isot

    for date in ["1968-01-31T12:00:00", "1965-03-01T00:00:00.5", "1971-12-31T23:59:59"]:
        assert _date_obs_mjd({"DATE-OBS": date}) == Time(date, format="isot", scale="utc").mjd
    for mjd in (39886.5, 41316.9, 40000.25):
        assert _isot(mjd) == Time(mjd, format="mjd", scale="utc").isot
