"""The notebook API: every public name works twice and is listed; results render as HTML;
``calibrate`` and ``imexamine`` take files, arrays or CCDData and agree with plain numpy."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData

import ccdcal


def _frames(tmp_path, n=3, level=1000.0, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        data = (level + rng.normal(0, 5, (40, 50))).astype(np.float32)
        path = tmp_path / f"bias_{i}.fits"
        fits.PrimaryHDU(data, fits.Header({"IMAGETYP": "BIAS", "EXPTIME": 0.0})).writeto(path)
        paths.append(path)
    return paths


def test_every_public_name_works_twice_and_is_listed(tmp_path):
    paths = _frames(tmp_path)
    for _ in range(2):
        assert callable(ccdcal.combine) and callable(ccdcal.calibrate) and callable(ccdcal.scan)
        result = ccdcal.combine(paths, method="mean")
        assert result.data.shape == (40, 50)
        importlib.import_module("ccdcal.combining.engine")      # importing the module must not shadow the function
        importlib.import_module("ccdcal.calibration.arithmetic")
        assert ccdcal.imexamine(paths)["npix"][0] == 2000
        assert ccdcal.stretch.mtf(0.5, 0.3) == pytest.approx(0.3)
        assert len(ccdcal.scan([tmp_path]).frames) == 3
    names = dir(ccdcal)
    for name in ("scan", "reduce", "combine", "calibrate", "imexamine", "stretch", "show", "CombineResult"):
        assert name in names and name in ccdcal.__all__
    with pytest.raises(AttributeError):
        ccdcal.no_such_thing  # noqa: B018


def test_imexamine_regions_in_iraf_syntax_and_numpy_slices_agree_with_numpy(tmp_path):
    paths = _frames(tmp_path)
    iraf = ccdcal.imexamine(paths, "[11:30,5:20]")
    sliced = ccdcal.imexamine([str(p) for p in paths], np.s_[4:20, 10:30])
    for i, p in enumerate(paths):
        box = fits.getdata(p)[4:20, 10:30].astype(np.float64)
        assert iraf["npix"][i] == box.size == sliced["npix"][i]
        assert iraf["median"][i] == pytest.approx(np.median(box), rel=1e-6)
        assert iraf["std"][i] == pytest.approx(np.std(box), rel=1e-4)
        assert sliced["mean"][i] == pytest.approx(box.mean(), rel=1e-6)
    assert list(iraf["frame"]) == [p.name for p in paths]
    glob_table = ccdcal.imexamine(str(tmp_path / "bias_*.fits"))
    assert len(glob_table) == 3


def test_calibrate_arrays_equals_plain_numpy():
    rng = np.random.default_rng(3)
    raw = rng.uniform(1000, 2000, (30, 40)).astype(np.float32)
    bias = rng.normal(1000, 2, (30, 40)).astype(np.float32)
    dark = rng.uniform(0, 50, (30, 40)).astype(np.float32)
    flat = rng.uniform(0.8, 1.2, (30, 40)).astype(np.float32)
    flat_norm = flat / np.median(flat[7:23, 10:30])   # normalised on the central half
    out = ccdcal.calibrate(raw, bias=bias, dark=dark, flat=flat, dark_scale=0.5, gain=1.5, read_noise=6.0)
    assert isinstance(out, CCDData)
    expected = (raw - bias - np.float32(0.5) * dark) / flat_norm
    np.testing.assert_allclose(out.data, expected, rtol=1e-5)
    assert out.uncertainty is not None and out.mask.dtype == bool
    assert out.header["DARKSCAL"] == 0.5


def test_calibrate_files_is_the_task_reduce_runs(tmp_path):
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce

    raw = write_night(tmp_path / "raw", size=64, seed=5, n_light=1)
    result = reduce([raw], tmp_path / "out", options=ReduceOptions(report=False))
    job = next(j for j in result.plan.lights if j.recipe.dark)
    masters = tmp_path / "out" / "masters"
    ccd = ccdcal.calibrate(job.frame.path, bias=masters / job.recipe.bias,
                           dark=sorted(masters.glob("master_dark*")), flat=masters / job.recipe.flat)
    with fits.open(tmp_path / "out" / job.output) as hdul:
        np.testing.assert_array_equal(ccd.data, hdul[0].data)
        np.testing.assert_array_equal(ccd.uncertainty.array, hdul["UNCERT"].data)
        np.testing.assert_array_equal(ccd.mask, hdul["MASK"].data != 0)
    written = ccdcal.calibrate([job.frame.path], bias=masters / job.recipe.bias,
                               dark=sorted(masters.glob("master_dark*")), flat=masters / job.recipe.flat,
                               output=tmp_path / "by_hand")
    assert [p.name for p in written] == [job.output.split("/")[-1]]


def test_results_render_as_html_in_a_notebook(tmp_path):
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions

    raw = write_night(tmp_path / "raw", size=64, seed=2, n_light=1)
    inventory = ccdcal.scan([raw])
    assert "<table" in inventory._repr_html_() and "bias_001.fits" in inventory._repr_html_()
    result = ccdcal.reduce([raw], tmp_path / "out", options=ReduceOptions())
    assert "master_flat_V.fits" in result.plan._repr_html_()
    page = result._repr_html_()
    assert "report.html" in page and "lights calibrated" in page
    combined = ccdcal.combine(sorted(raw.glob("bias_*.fits")), method="mean", reject="mad")
    html = combined._repr_html_()
    assert "data:image/png;base64," in html and "rejected" in html


def test_show_gives_a_png_for_paths_arrays_and_results(tmp_path):
    paths = _frames(tmp_path)
    for image in (paths[0], fits.getdata(paths[0]), ccdcal.combine(paths)):
        png = ccdcal.show(image, "asinh")._repr_png_()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_combine_result_to_ccddata_and_write(tmp_path):
    paths = _frames(tmp_path, n=5)
    result = ccdcal.combine(paths, method="mean", reject="mad")
    ccd = result.to_ccddata()
    np.testing.assert_array_equal(ccd.data, result.data)
    np.testing.assert_array_equal(ccd.uncertainty.array, result.uncertainty)
    assert ccd.header["NCOMBINE"] == 5
    out = result.write(tmp_path / "master.fits")
    back = CCDData.read(out, hdu_uncertainty="UNCERT", hdu_mask="MASK")
    np.testing.assert_array_equal(back.data, result.data)


def test_a_long_demo_night_has_valid_start_times(tmp_path):
    # 70 lights in each of two filters run past midnight: each DATE-OBS is a real UTC time
    # (hour < 24, the next day after midnight), the lights two minutes apart
    import datetime

    from astropy.io import fits

    from ccdcal.demo import write_night

    raw = write_night(tmp_path / "raw", size=32, n_bias=1, n_dark=1, n_flat=1, n_light=70)
    starts = sorted(datetime.datetime.fromisoformat(fits.getheader(p)["DATE-OBS"])
                    for p in raw.glob("*.fits") if fits.getheader(p)["IMAGETYP"] == "Light Frame")
    assert len(starts) == 140 and starts[-1] == datetime.datetime(2024, 3, 15, 0, 18)
    steps = {b - a for a, b in zip(starts, starts[1:], strict=False)}
    assert steps <= {datetime.timedelta(0), datetime.timedelta(minutes=2)}
