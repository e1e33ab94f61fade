"""One path per calculation: ``ccdcal calibrate`` given ``reduce``'s masters writes exactly the
lights ``reduce`` wrote (every plane); the library prints nothing and warns instead."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.cli import main
from ccdcal.errors import CcdcalWarning
from ccdcal.pipeline.run import ReduceOptions, reduce


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    from nightgen import make_night

    root = tmp_path_factory.mktemp("onepath")
    make_night(root / "raw", seed=4)
    result = reduce([root / "raw"], root / "out", options=ReduceOptions(report=False))
    return root, result


def test_calibrate_command_reproduces_reduce_lights_plane_by_plane(reduced, tmp_path):
    root, result = reduced
    assert result.lights
    for job in result.plan.lights:
        r = job.recipe
        args = ["calibrate", str(job.frame.path), "-o", str(tmp_path)]
        masters = root / "out" / "masters"
        if r.bias:
            args += ["--bias", str(masters / r.bias)]
        if r.dark:
            # every master dark, so the command must choose the same one the plan chose
            args += ["--dark", *map(str, sorted(masters.glob("master_dark*.fits")))]
        if r.flat:
            args += ["--flat", str(masters / r.flat)]
        assert main(args) == 0
        with fits.open(root / "out" / job.output) as a, fits.open(tmp_path / job.output.split("/")[-1]) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for ha, hb in zip(a, b, strict=True):
                np.testing.assert_array_equal(ha.data, hb.data)
            for key in ("CALDARK", "DARKSCAL", "CALFLAT", "GAIN", "RDNOISE", "SATRAW", "EXPTIME"):
                assert a[0].header.get(key) == b[0].header.get(key), key


def test_reduce_without_progress_prints_nothing_and_warns(tmp_path, capsys):
    from nightgen import make_night

    make_night(tmp_path / "raw", seed=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = reduce([tmp_path / "raw"], tmp_path / "out", options=ReduceOptions(report=False))
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert result.lights
    ccdcal_warnings = [w for w in caught if issubclass(w.category, CcdcalWarning)]
    assert all(str(w.message) in result.warnings for w in ccdcal_warnings)


def test_calibrate_scale_darks_never_applies_no_dark_of_another_exposure(tmp_path):
    """`calibrate --scale-darks never` keeps the plan's rule: a dark of another exposure is not
    scaled onto the light (no CALDARK); `auto` scales it, as reduce does for a CCD. The demo's
    lights are 90 s and its darks 60 s and 300 s."""
    from ccdcal.demo import write_night

    raw = write_night(tmp_path / "raw", size=64, n_bias=5, n_dark=3, n_flat=3, n_light=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = reduce([raw], tmp_path / "out", options=ReduceOptions(report=False))
    job = result.plan.lights[0]
    assert job.recipe.dark and job.recipe.dark_scale not in (None, 1.0)
    masters = tmp_path / "out" / "masters"
    for mode in ("auto", "never"):
        out = tmp_path / mode
        assert main(["calibrate", str(job.frame.path), "-o", str(out), "--bias", str(masters / job.recipe.bias),
                     "--dark", str(masters / job.recipe.dark), "--scale-darks", mode]) == 0
        header = fits.getheader(next(out.rglob("*.fits")))
        assert (header.get("CALDARK") is None) == (mode == "never"), mode
