"""Cooled-CMOS nights as capture programs write them (issue 27), from tests/cmosnight.py."""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.errors import InputError
from ccdcal.planning.inventory import scan
from cmosnight import DIALECTS, READ_NOISE, plain_reduction, write_night


def _kinds(folder: Path) -> Counter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inventory = scan(folder, flag=False)
    assert not inventory.skipped, inventory.skipped
    return Counter((f.kind.value, f.exptime, f.filter) for f in inventory.frames)


@pytest.fixture(scope="module")
def dialect_nights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmos-dialects")
    nights = {}
    for dialect in DIALECTS:
        write_night(root / dialect, dialect=dialect, shape=(24, 32), n_dark=3, n_flat=3, n_light=2)
        nights[dialect] = root / dialect
    return nights


def test_the_generator_writes_left_shifted_14_bit_data(dialect_nights):
    data = fits.getdata(next((dialect_nights["nina3"]).rglob("*.fits")))
    assert data.dtype.kind in "ui" and np.all(data % 4 == 0) and data.max() <= 65532


def test_every_dialect_gives_one_inventory(dialect_nights):
    """N.I.N.A. 2 and 3, Ekos, SGP, APT, ASIAIR, SharpCap and QHY spellings of one night (dark
    flats typed DARK or DARKFLAT, 'Flat Field', FRAMETYP, EXPOSURE only, no type keyword at all)
    classify alike: darks of 120 s and 2 s, flats and lights."""
    expected = Counter({("dark", 120.0, None): 3, ("dark", 2.0, "Ha"): 3, ("flat", 2.0, "Ha"): 3,
                        ("light", 120.0, "Ha"): 2})
    for dialect, folder in dialect_nights.items():
        kinds = _kinds(folder)
        # a dark flat may or may not carry the flats' filter: the count per kind and exposure is what matters
        assert Counter({(k, t): n for (k, t, _), n in kinds.items()}) == \
            Counter({(k, t): n for (k, t, _), n in expected.items()}), dialect


@pytest.mark.parametrize("dialect", ["nina3", "nina2", "ekos", "sgp", "apt", "qhy"])
def test_type_keywords_classify_without_telling_file_names(dialect_nights, tmp_path, dialect):
    """The dialects that write a type keyword classify from it alone (anonymous names, one folder)."""
    for i, path in enumerate(sorted(dialect_nights[dialect].rglob("*.fits"))):
        shutil.copy(path, tmp_path / f"frame_{i:04d}.fits")
    kinds = _kinds(tmp_path)
    assert {(k, t) for k, t, _ in kinds} == {("dark", 120.0), ("dark", 2.0), ("flat", 2.0), ("light", 120.0)}


# -- a CMOS night reduced with no options, against a plain numpy reduction of the same frames ------
@pytest.fixture(scope="module", params=["nina3", "ekos", "qhy"])
def reduced_cmos(request, tmp_path_factory):
    from ccdcal.pipeline.run import ReduceOptions, reduce

    root = tmp_path_factory.mktemp(f"cmos-{request.param}")
    night = write_night(root / "raw", dialect=request.param, shape=(192, 256))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = reduce(root / "raw", root / "out", options=ReduceOptions(report=False))
    assert len(result.lights) == len(night.files["light"]) and not result.skipped
    lights = []
    for job in result.plan.lights:
        with fits.open(root / "out" / job.output) as hdul:
            lights.append({"data": hdul[0].data.astype(np.float64), "header": hdul[0].header.copy(),
                           "unc": hdul["UNCERT"].data.astype(np.float64) if "UNCERT" in hdul else None,
                           "mask": hdul["MASK"].data.copy(), "path": job.frame.path})
    order = {p: i for i, p in enumerate(night.files["light"])}
    lights.sort(key=lambda light: order[light["path"]])
    return night, lights, plain_reduction(night), result


def _mad_std(values: np.ndarray) -> float:
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def test_a_cmos_light_keeps_its_glowing_corner(reduced_cmos):
    """Amp glow is signal, subtracted by the matched dark and never masked: < 1 % of each light
    is masked (the true hot pixels are), and the glow corner is within 1 % of the rest of the
    sky, as in the plain reduction."""
    night, lights, plain, _ = reduced_cmos
    ny, nx = night.shape
    corner = np.zeros(night.shape, bool)
    corner[-ny // 6:, -nx // 6:] = True
    assert night.glow[corner].min() * night.light_exptime ** 1.5 > 20 * READ_NOISE   # e-: strong glow there
    for light, ref in zip(lights, plain, strict=True):
        masked = light["mask"] != 0
        assert masked.mean() < 0.01
        assert masked[night.hot > 5.0].mean() > 0.9          # the hot pixels (> 5 e-/s) are found
        # and nothing else: a cosmic ray left in the master dark would be masked as "hot" here
        assert masked[night.hot == 0].mean() < 1e-4
        good = ~masked & (night.hot == 0)
        ours = np.median(light["data"][corner & good]) / np.median(light["data"][~corner & good])
        theirs = np.median(ref[corner & good]) / np.median(ref[~corner & good])
        assert abs(ours - 1) < 0.01 and abs(theirs - 1) < 0.01


def test_a_cmos_light_is_no_noisier_than_the_plain_reduction(reduced_cmos):
    """Noise relative to the sky level (the flat conventions differ by a constant) ≤ 1.03× the
    plain reduction's (median masters, matched darks, dark flats)."""
    night, lights, plain, _ = reduced_cmos
    for light, ref in zip(lights, plain, strict=True):
        good = (light["mask"] == 0) & (night.hot == 0)
        ours = _mad_std(light["data"][good]) / np.median(light["data"][good])
        theirs = _mad_std(ref[good]) / np.median(ref[good])
        assert ours <= 1.03 * theirs


def test_a_cmos_light_has_the_gain_of_its_stored_data_and_a_true_uncertainty(reduced_cmos):
    """EGAIN is written at the 14-bit ADC's depth and the data are stored ×4: the light's GAIN is
    the e-/ADU of the stored data (EGAIN / 4), the header says why, saturation is at 65532, and
    the UNCERT plane matches the real scatter (the difference of two lights) within 0.97–1.03."""
    from cmosnight import STORED_GAIN

    night, lights, _, _ = reduced_cmos
    for light in lights:
        header = light["header"]
        assert header["GAIN"] == pytest.approx(STORED_GAIN, rel=1e-6)
        assert "14-bit" in header["GAINSRC"]
        assert header["SATRAW"] == 65532
        assert light["unc"] is not None
    a, b = lights[0], lights[1]
    good = (a["mask"] == 0) & (b["mask"] == 0)
    z = (a["data"] - b["data"])[good] / np.hypot(a["unc"], b["unc"])[good]
    assert 0.97 <= 1 / _mad_std(z) <= 1.03      # ~49k pixels: the scatter is known to 0.5 %


def test_each_master_of_a_cmos_night_stays_with_its_exposure(reduced_cmos):
    """No bias: the 2 s darks calibrate the flats, the 120 s dark the lights, unscaled."""
    _, _, _, result = reduced_cmos
    darks = {job.exptime: job.name for job in result.plan.masters if job.kind.value == "dark"}
    flat = next(job for job in result.plan.masters if job.kind.value == "flat")
    assert {r.dark for r in flat.recipes} == {darks[2.0]} and {r.dark_scale for r in flat.recipes} == {1.0}
    for job in result.plan.lights:
        assert job.recipe.bias is None and job.recipe.dark == darks[120.0] and job.recipe.dark_scale == 1.0


# -- camera settings are calibration keys; CMOS darks are matched, not scaled ------------------------
def _plan(folder: Path, **options):
    from ccdcal.planning.plan import PlanOptions, build_plan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_plan(scan(folder, flag=False), PlanOptions(**options))


def test_a_master_never_crosses_a_camera_setting(tmp_path):
    """Darks at GAIN 120 do not calibrate lights at GAIN 100, and the plan says which key kept
    them apart; INDI's GAIN = 120.000 and N.I.N.A.'s GAIN = 120 are one setting."""
    from ccdcal.io.headers import camera_settings

    night = write_night(tmp_path / "raw", shape=(24, 32), n_dark=3, n_flat=3, n_light=2)
    for path in night.files["dark"]:
        fits.setval(path, "GAIN", value=120)
    plan = _plan(tmp_path / "raw")
    for job in plan.lights:
        assert job.recipe.dark is None
        assert any("no master dark at GAIN 100, OFFSET 50 (the master darks are at GAIN 120, OFFSET 50)" in n
                   for n in job.notes), job.notes
    assert camera_settings(fits.Header([("GAIN", 120.0), ("OFFSET", 30.0)])) == \
        camera_settings(fits.Header([("GAIN", 120), ("OFFSET", 30)])) == (("GAIN", "120"), ("OFFSET", "30"))
    assert camera_settings(fits.Header([("GAIN", 1.5, "[e-/ADU] gain")])) == ()      # a property, not a setting
    assert camera_settings(fits.Header([("GAIN", 100), ("BLKLEVEL", 50)])) == (("GAIN", "100"), ("OFFSET", "50"))


def _with_biases_and_long_lights(root: Path, night) -> None:
    """Three biases (dark flats retyped, 0 s) and lights of 300 s: no dark of the lights' exposure."""
    for i, path in enumerate(night.files["darkflat"][:3]):
        target = root / "BIAS" / f"bias_{i}.fits"
        target.parent.mkdir(exist_ok=True)
        shutil.copy(path, target)
        fits.setval(target, "IMAGETYP", value="BIAS")
        for key in ("EXPTIME", "EXPOSURE"):
            fits.setval(target, key, value=0.0)
    for path in night.files["light"]:
        for key in ("EXPTIME", "EXPOSURE"):
            fits.setval(path, key, value=300.0)


def test_a_cmos_dark_is_matched_by_exposure_never_scaled_unless_asked(tmp_path):
    night = write_night(tmp_path / "raw", shape=(24, 32), n_dark=3, n_flat=3, n_light=2)
    _with_biases_and_long_lights(tmp_path / "raw", night)
    plan = _plan(tmp_path / "raw")
    for job in plan.lights:
        assert job.recipe.bias is not None and job.recipe.dark is None
        assert any("a CMOS dark is not scaled by exposure" in n for n in job.notes), job.notes
    forced = _plan(tmp_path / "raw", scale_darks="always")
    assert {(j.recipe.dark, j.recipe.dark_scale) for j in forced.lights} == {("master_dark_120s.fits", 2.5)}
    # the same frames from a CCD (no offset register): the dark is scaled, as before
    for path in (tmp_path / "raw").rglob("*.fits"):
        with fits.open(path, mode="update") as hdul:
            del hdul[0].header["OFFSET"]
    ccd = _plan(tmp_path / "raw")
    assert {(j.recipe.dark, j.recipe.dark_scale) for j in ccd.lights} == {("master_dark_120s.fits", 2.5)}


def test_lights_without_calibration_frames_are_stacked_only_when_allowed(tmp_path):
    """A smart telescope's night (lights only): the plan says what is missing and skips them;
    --allow-uncorrected takes them as they are (marked UNCORRECTED) and stacks them."""
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from starfield import catalogue, observe, shift

    raw = tmp_path / "raw"
    raw.mkdir()
    stars = catalogue((160, 200), 30, seed=3)
    for i in range(4):
        data, _ = observe((160, 200), stars, shift(1.5 * i, -1.0 * i), seed=i)
        counts = np.clip(np.round((data + 800) / 4) * 4, 0, 65532).astype(np.uint16)
        header = fits.Header([("IMAGETYP", "Light"), ("EXPTIME", 10.0), ("GAIN", 80), ("OBJECT", "M 42"),
                              ("FILTER", "LP"), ("CREATOR", "ZWO Seestar S50")])
        fits.PrimaryHDU(counts, header).writeto(raw / f"Light_M42_10.0s_LP_{i}.fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused = reduce(raw, tmp_path / "out", options=ReduceOptions(report=False, stack=True))
        taken = reduce(raw, tmp_path / "out2", options=ReduceOptions(report=False, stack=True,
                                                                     allow_uncorrected=True))
    assert not refused.lights and len(refused.skipped) == 4
    assert all("--allow-uncorrected" in s.reason for s in refused.skipped)
    assert len(taken.lights) == 4 and len(taken.stacks) == 1
    assert all(job.uncorrected and "nothing is removed" in job.uncorrected for job in taken.plan.lights)
    with fits.open(tmp_path / "out2" / taken.stacks[0]) as hdul:
        assert hdul[0].header["NCOMBINE"] == 4


# -- a library of masters from another run ----------------------------------------------------------
def test_a_night_without_darks_is_calibrated_from_a_library_of_another_run(tmp_path):
    """Darks once a season: the night's lights and flats reduced against the masters of an
    earlier run (--masters) give the same lights as the run that had the darks; the plan says
    where each master came from; a master of other camera settings, a [0, 1] float master and a
    MaxIm master with a PEDESTAL are refused or passed over, each with its reason."""
    from ccdcal.pipeline.run import ReduceOptions, reduce

    night = write_night(tmp_path / "full", shape=(64, 96), n_dark=5, n_flat=5, n_light=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = reduce(tmp_path / "full", tmp_path / "first", options=ReduceOptions(report=False))
    library = tmp_path / "first" / "masters"
    # the library also holds masters that must not be taken
    dark = fits.getdata(library / "master_dark_120s.fits")
    other = fits.getheader(library / "master_dark_120s.fits")
    other["GAIN"] = 120
    fits.PrimaryHDU(dark, other).writeto(library / "gain120_dark.fits")
    fits.PrimaryHDU((dark / 65535).astype(np.float32),
                    fits.Header([("IMAGETYP", "Master Dark"), ("EXPTIME", 120.0)])).writeto(library / "siril_dark.fit")
    fits.PrimaryHDU(dark, fits.Header([("IMAGETYP", "Master Bias"), ("PEDESTAL", -100)])).writeto(
        library / "maxim_bias.fit")
    fits.PrimaryHDU(dark, fits.Header([("IMAGETYP", "Light Frame")])).writeto(library / "stray_light.fit")
    tonight = tmp_path / "tonight"
    for kind in ("flat", "light"):
        for path in night.files[kind]:
            target = tonight / path.relative_to(tmp_path / "full")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = reduce(tonight, tmp_path / "second", options=ReduceOptions(report=False, masters=(str(library),)))
    assert [j.kind.value for j in second.plan.masters] == ["flat"]
    darks = {Path(n).name for n in second.plan.library}
    assert darks == {"master_dark_2s.fits", "master_dark_120s.fits"}
    assert all(any("master dark from the library" in n for n in j.notes) for j in second.plan.lights)
    refused = {Path(s.path).name: s.reason for s in second.plan.skipped}
    assert "[0, 1]" in refused["siril_dark.fit"] and "PEDESTAL" in refused["maxim_bias.fit"]
    assert "not a master" in refused["stray_light.fit"] and "gain120_dark.fits" not in refused
    for a, b in zip(first.plan.lights, second.plan.lights, strict=True):
        np.testing.assert_array_equal(fits.getdata(tmp_path / "first" / a.output),
                                      fits.getdata(tmp_path / "second" / b.output))
    # the library is read, never written: a run into the folder that holds it is refused
    for out in (tmp_path / "first", tmp_path / "first" / "masters"):
        with pytest.raises(InputError, match="input"):
            reduce(tonight, out, options=ReduceOptions(report=False, masters=(str(library),)))


def test_a_library_flat_is_taken_only_within_its_age(tmp_path):
    from ccdcal.planning.library import read_library

    night = write_night(tmp_path / "raw", shape=(24, 32), n_dark=3, n_flat=3, n_light=1)
    lib = tmp_path / "lib"
    lib.mkdir()
    flat = np.ones((24, 32), np.float32)
    for name, date in (("old.fits", "2024-05-01T20:00:00"), ("recent.fits", "2024-07-25T20:00:00")):
        header = fits.Header([("IMAGETYP", "MASTER FLAT"), ("FILTER", "Ha"), ("DATE-OBS", date), ("GAIN", 100),
                              ("OFFSET", 50), ("XBINNING", 1), ("YBINNING", 1)])
        fits.PrimaryHDU(flat, header).writeto(lib / name)
    for path in night.files["light"]:
        fits.setval(path, "DATE-OBS", value="2024-08-01T22:00:00.1234567")      # 7 decimals, as N.I.N.A.
    shutil.rmtree(tmp_path / "raw" / "FLAT")
    from ccdcal.planning.plan import PlanOptions, build_plan

    def plan(max_age):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_plan(scan(tmp_path / "raw", flag=False), PlanOptions(flat_max_age=max_age),
                              read_library([lib]))
    assert Path(plan(30.0).lights[0].recipe.flat).name == "recent.fits"
    too_old = plan(5.0).lights[0]
    assert too_old.recipe.flat is None and any("7 days" in n for n in too_old.notes), too_old.notes


# -- containers: .fits.fz, .fits.gz and XISF hold the same night -----------------------------------
def _as_xisf(source: Path, target: Path, *, codec: str | None) -> None:
    """A FITS frame written as N.I.N.A. and INDI write XISF: UInt16 samples, the FITS keywords
    embedded (strings quoted), the frame type also as the image's imageType."""
    from xisf import XISF

    data = fits.getdata(source)
    header = fits.getheader(source)
    keywords = {}
    for card in header.cards:
        if card.keyword in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "BZERO", "BSCALE", "EXTEND"):
            continue
        value = f"'{card.value}'" if isinstance(card.value, str) else str(card.value)
        keywords[card.keyword] = [{"value": value, "comment": card.comment}]
    XISF.write(str(target), data.astype(np.uint16)[..., None], creator_app="ccdcal tests",
               image_metadata={"FITSKeywords": keywords}, codec=codec, shuffle=codec is not None)


def test_a_night_in_xisf_fz_and_gz_reduces_as_in_fits(tmp_path):
    from ccdcal.pipeline.run import ReduceOptions, reduce

    night = write_night(tmp_path / "fits", shape=(40, 56), n_dark=3, n_flat=3, n_light=2)
    containers = tmp_path / "containers"
    for i, path in enumerate(sorted(p for files in night.files.values() for p in files)):
        target = containers / path.relative_to(tmp_path / "fits")
        target.parent.mkdir(parents=True, exist_ok=True)
        kind = ("xisf", "xisf-zstd", "fz", "gz")[i % 4]
        if kind.startswith("xisf"):
            _as_xisf(path, target.with_suffix(".xisf"), codec="zstd" if kind == "xisf-zstd" else None)
        elif kind == "fz":
            data, header = fits.getdata(path, header=True)
            fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header, compression_type="RICE_1")]).writeto(
                target.with_name(target.name + ".fz"))
        else:
            import gzip

            target.with_name(target.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
    assert {p.suffix for p in containers.rglob("*.*") if p.is_file()} == {".xisf", ".fz", ".gz"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = reduce(tmp_path / "fits", tmp_path / "out-fits", options=ReduceOptions(report=False))
        mixed = reduce(containers, tmp_path / "out-mixed", options=ReduceOptions(report=False))
    assert not mixed.skipped and len(mixed.lights) == len(plain.lights) == 2
    assert [j.kind.value for j in mixed.plan.masters] == [j.kind.value for j in plain.plan.masters]
    for a, b in zip(plain.plan.lights, mixed.plan.lights, strict=True):
        assert b.recipe == a.recipe and Path(b.output).stem == Path(a.output).stem   # "x.xisf" -> "x.fits"
        np.testing.assert_array_equal(fits.getdata(tmp_path / "out-fits" / a.output),
                                      fits.getdata(tmp_path / "out-mixed" / b.output))


def test_a_bias_given_too_changes_nothing_on_a_cmos_night(tmp_path):
    """No double bias: lights minus a matched dark (its bias inside) give the same light whether or
    not biases are also in the night (then the dark is bias-subtracted and the light too)."""
    from ccdcal.pipeline.run import ReduceOptions, reduce

    night = write_night(tmp_path / "raw", shape=(40, 56), n_dark=3, n_flat=3, n_light=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = reduce(tmp_path / "raw", tmp_path / "without", options=ReduceOptions(report=False))
        for i, path in enumerate(night.files["darkflat"][:3]):   # three biases (0 s) join the night
            target = tmp_path / "raw" / "BIAS" / f"bias_{i}.fits"
            target.parent.mkdir(exist_ok=True)
            shutil.copy(path, target)
            fits.setval(target, "IMAGETYP", value="BIAS")
            for key in ("EXPTIME", "EXPOSURE"):
                fits.setval(target, key, value=0.0)
        with_bias = reduce(tmp_path / "raw", tmp_path / "with", options=ReduceOptions(report=False))
    assert all(j.recipe.bias is None for j in without.plan.lights)
    assert all(j.recipe.bias and j.recipe.dark == "master_dark_120s.fits" for j in with_bias.plan.lights)
    for a, b in zip(without.plan.lights, with_bias.plan.lights, strict=True):
        # the flats differ a little (the 2 s darks vs the bias and the 2 s darks): compare before it
        x = fits.getdata(tmp_path / "without" / a.output) * fits.getdata(tmp_path / "without/masters/master_flat_Ha.fits")
        y = fits.getdata(tmp_path / "with" / b.output) * fits.getdata(tmp_path / "with/masters/master_flat_Ha.fits")
        # no pedestal removed twice (that would be ~800 ADU): the same values but where the two
        # master darks' rejections chose differently (cosmic rays, a few % of pixels)
        assert np.mean(np.abs(x - y) < 0.05) > 0.95 and abs(float(np.median(x - y))) < 0.05


#: Header cards as capture programs write them, copied from the sources of ../shared/CMOS.md
#: (§1.1: N.I.N.A. 3 and INDI source, SharpCap, SGP, APT and ASIAIR/Seestar sample files).
REAL_HEADERS = {
    "nina": [("IMAGETYP", "LIGHT"), ("EXPOSURE", 300.0), ("EXPTIME", 300.0), ("GAIN", 120, "Sensor gain"),
             ("OFFSET", 30, "Sensor gain offset"), ("EGAIN", 1.0022, "[e-/ADU] Electrons per A/D unit"),
             ("CCD-TEMP", -10.0), ("SET-TEMP", -10.0), ("XBINNING", 1), ("YBINNING", 1),
             ("BAYERPAT", "RGGB"), ("ROWORDER", "TOP-DOWN"), ("SWCREATE", "N.I.N.A. 3.1.2.9001 (x64)"),
             ("DATE-OBS", "2025-06-01T22:15:03.1234567")],
    "indi": [("IMAGETYP", "Light Frame"), ("FRAME", "Light"), ("EXPTIME", 300.0), ("GAIN", 120.0),
             ("OFFSET", 30.0), ("CCD-TEMP", -9.8), ("XBINNING", 1), ("YBINNING", 1), ("ROWORDER", "TOP-DOWN"),
             ("INSTRUME", "ZWO CCD ASI294MC Pro"), ("DATE-OBS", "2025-06-01T22:15:03.123")],
    "sharpcap": [("EXPTIME", 300.0), ("GAIN", 300), ("OFFSET", 8), ("BLKLEVEL", 8),
                 ("EGAIN", 0.1226, "Electrons per ADU at true ADC bit depth"),
                 ("EGAINSAV", 0.00766, "Electrons per ADU at saved bit depth"), ("ADCBITS", 12),
                 ("BIASADU", 1082.9), ("CCD-TEMP", 12.7), ("SWCREATE", "SharpCap v4.1.12946.0, 64 bit"),
                 ("ROWORDER", "TOP-DOWN")],
    "sgp": [("IMAGETYP", "LIGHT   "), ("EXPOSURE", 300.0), ("GAIN", 120), ("OFFSET", 30), ("EGAIN", 3.99),
            ("CCD-TEMP", -10.0), ("SET-TEMP", -10.0), ("CREATOR", "Sequence Generator Pro v3.1.0.479")],
    "apt": [("IMAGETYP", "Light Frame"), ("EXPTIME", 300.0), ("GAIN", 120), ("EGAIN", 1.0022), ("SET-TEMP", -10.0),
            ("SWCREATE", "Astro Photography Tool - APT v.3.54")],
    "seestar": [("IMAGETYP", "Light   "), ("EXPTIME", 10.0), ("EXPOSURE", 10.0), ("GAIN", 80), ("CCD-TEMP", 21.9),
                ("BAYERPAT", "GRBG"), ("FILTER", "IRCUT"), ("CREATOR", "ZWO Seestar S50"),
                ("DATE-OBS", "2024-12-01T20:15:03.123456")],
}


@pytest.mark.parametrize("program", sorted(REAL_HEADERS))
def test_real_capture_program_headers(program):
    """Each real header is a light; GAIN is a setting (a calibration key, never e-/ADU); EGAIN is
    divided by the data's shift (SharpCap's EGAINSAV taken as written); the exposure is read from
    EXPOSURE alone (SGP); INDI's GAIN 120.000 is N.I.N.A.'s 120."""
    from ccdcal.io.headers import header_gain, is_cmos
    from ccdcal.planning.inventory import FrameKind, frame_info

    header = fits.Header()
    for card in REAL_HEADERS[program]:
        header[card[0]] = card[1:] if len(card) > 2 else card[1]
    info = frame_info(Path(f"{program}/Light_0001.fits"), 0, header, (100, 120))   # SharpCap: the name tells
    assert info.kind == FrameKind.LIGHT and info.exptime in (300.0, 10.0)
    settings = dict(info.camera)
    assert settings["GAIN"] == {"sharpcap": "300", "seestar": "80"}.get(program, "120")
    assert is_cmos(info.camera) == (program in ("nina", "indi", "sharpcap", "sgp"))
    shift = 4 if program == "sharpcap" else 2
    gain, source = header_gain(header, shift=shift)
    expected = {"nina": 1.0022 / 4, "sharpcap": 0.00766, "sgp": 3.99 / 4, "apt": 1.0022 / 4}.get(program)
    assert gain == pytest.approx(expected) if expected else gain is None
    if program == "indi":
        nina = frame_info(Path("n.fits"), 0, fits.Header([c[:2] for c in REAL_HEADERS["nina"]]), (100, 120))
        assert info.camera == nina.camera


def test_a_cmos_dark_scaled_on_request_shows_its_glow_residual(tmp_path):
    """Forced scaling of a CMOS dark (its glow grows as t^1.5, not t): the plan warns, each light
    carries GLOWRES (its glow region's level minus the rest), and the report shows it."""
    from ccdcal.pipeline.run import ReduceOptions, reduce

    night = write_night(tmp_path / "raw", shape=(96, 128), n_dark=3, n_flat=3, n_light=2)
    _with_biases_and_long_lights(tmp_path / "raw", night)       # lights say 300 s, darks 120 s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = reduce(tmp_path / "raw", tmp_path / "out", options=ReduceOptions(scale_darks="always"))
    assert all(any("GLOWRES" in n for n in j.notes) for j in result.plan.lights)
    from ccdcal.calibration.arithmetic import glow_region
    from ccdcal.pipeline.tasks import load_master
    from cmosnight import STORED_GAIN

    # the lights hold 120 s of glow; the dark's 120 s glow (less the 2 s "biases'") scaled by 2.5
    # leaves -1.5x it: the calibrated light against the true glow (flat-fielded, stored ADU)
    dark = next(j for j in result.plan.masters if j.kind.value == "dark")
    region = glow_region(load_master(tmp_path / "out" / "masters" / dark.name))
    glow = night.glow * (120.0**1.5 - 2.0**1.5) / STORED_GAIN / (night.flat / np.median(night.flat))
    for job in result.plan.lights:
        with fits.open(tmp_path / "out" / job.output) as hdul:
            data, good, residual = hdul[0].data.astype(np.float64), hdul["MASK"].data == 0, hdul[0].header["GLOWRES"]
        slope = np.polyfit(glow[good], data[good], 1)[0]
        assert slope == pytest.approx(-1.5, rel=0.15)
        # GLOWRES is what it says: the median in the glow region less the median elsewhere
        assert residual == pytest.approx(np.median(data[region & good]) - np.median(data[~region & good]), abs=0.01)
        assert residual < -50
    assert "GLOWRES" in (tmp_path / "out" / "report.html").read_text()


def test_a_master_bias_of_shifted_data_states_its_read_noise_with_the_stored_gain(tmp_path):
    """Biases of a 14-bit camera stored x4 with EGAIN at the ADC's depth: the master bias's RDNOISE
    (e-) is its read noise in ADU times EGAIN / 4, the gain of the stored data (as the lights')."""
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from cmosnight import STORED_GAIN

    night = write_night(tmp_path / "raw", shape=(64, 96), n_dark=5, n_flat=3, n_light=2)
    biases = tmp_path / "bias"
    biases.mkdir()
    rng = np.random.default_rng(8)
    header = fits.getheader(night.files["dark"][0])
    for i in range(5):     # zero-second frames of the same camera: the offset and read noise, x4
        data = (np.round(rng.normal(500.0, 3.0, night.shape)) * 4).astype(np.uint16)
        h = header.copy()
        h["IMAGETYP"], h["EXPOSURE"], h["EXPTIME"] = "BIAS", 0.0, 0.0
        fits.PrimaryHDU(data, h).writeto(biases / f"bias_{i}.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = reduce([tmp_path / "raw", biases], tmp_path / "out", options=ReduceOptions(report=False))
    bias = next(job for job in result.plan.masters if job.kind.value == "bias")
    master = fits.getheader(tmp_path / "out" / "masters" / bias.name)
    assert master["RDNOISE"] == pytest.approx(master["RDNADU"] * STORED_GAIN, rel=1e-3)
    # and the read noise is the one injected: 3 native ADU (+ the rounding's 1/12), stored x4
    assert master["RDNADU"] == pytest.approx(4 * np.sqrt(3.0**2 + 1 / 12), rel=0.05)
