"""Issue 12 (the whole night at the I/O floor): the estimates that replace full passes are as
precise as stated, and the report reads no light the light task already looked at."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xxhash

from ccdcal.calibration import masters
from ccdcal.io.hashing import HASH, file_hash, remember_hashes


class _Rows:
    """A row source that counts the rows it serves."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.shape = data.shape
        self.rows_read = 0

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        self.rows_read += y1 - y0
        return self.data[y0:y1]


def _vignetted_flat(level: float, seed: int, shape=(3000, 4096)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    r2 = ((x - shape[1] / 2) ** 2 + (y - shape[0] / 2) ** 2) / (shape[1] / 2) ** 2
    truth = level * (1 - 0.25 * r2)                       # 25 % vignetting at the corners
    return (truth + rng.normal(0, np.sqrt(truth), shape)).astype(np.float32)


def _scales(frames, sample_pixels):
    from ccdcal.combining.engine import CombineOptions, measure_factors

    sources = [_Rows(f) for f in frames]
    options = CombineOptions.create(len(frames), scale="median")
    factors = measure_factors(sources, options, sample_pixels=sample_pixels)
    return factors.scales, sum(s.rows_read for s in sources)


def test_sampled_flat_scales_are_within_their_stated_precision():
    """combine.region_level_rows states ~1e-4 of the level for flats spread by ~10 %; a sample
    that missed the vignetting (e.g. only the central rows, or edge-anchored bands) is off by
    several 1e-3. The truth is numpy's median of every pixel, computed here."""
    frames = [_vignetted_flat(level, seed) for seed, level in enumerate((12000.0, 31000.0, 20000.0))]
    levels = np.array([np.median(f.astype(np.float64)) for f in frames])
    truth = levels.mean() / levels
    sampled, rows_read = _scales(frames, masters.LEVEL_SAMPLE_PIXELS)
    assert np.max(np.abs(sampled / truth - 1)) < 1.5e-4
    assert rows_read <= 3 * 3000 // 4                     # a quarter of the rows, or fewer, were read


def test_small_regions_are_measured_whole():
    rng = np.random.default_rng(5)
    frames = [rng.normal(level, 30, (200, 300)).astype(np.float32) for level in (1000.0, 1400.0)]
    sampled, rows_read = _scales(frames, masters.LEVEL_SAMPLE_PIXELS)
    whole, _ = _scales(frames, None)
    assert rows_read == 2 * 200 and np.array_equal(sampled, whole)


def test_input_hashes_are_taken_from_the_previous_run_only_when_unchanged(tmp_path):
    path = tmp_path / "a.fits"
    path.write_bytes(b"x" * 5000)
    st = path.stat()
    fake = "0" * 32
    # a record of another algorithm (a manifest from before XXH3) is not taken
    assert remember_hashes([{"path": str(path), "size": st.st_size, "mtime": st.st_mtime, "sha256": fake}]) == 0
    assert remember_hashes([{"path": str(path), "size": st.st_size, "mtime": st.st_mtime, HASH: fake}]) == 1
    assert file_hash(path) == fake
    path.write_bytes(b"y" * 5000)                        # same size, new content and mtime
    os.utime(path, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert file_hash(path) == xxhash.xxh3_128(b"y" * 5000).hexdigest()
    st2 = path.stat()
    assert remember_hashes([{"path": str(path), "size": st2.st_size, "mtime": st.st_mtime, HASH: fake}]) == 0


def test_the_report_reads_no_light_or_master_the_tasks_previewed(tmp_path, monkeypatch):
    """The light tasks leave each light's previews, and the masters' previews are made beside
    them from the masters in memory: the report reads no output back. Removed, the report makes
    them itself from the files, the same (JSON and PNG) and the same page."""
    import json
    import re

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2)
    out = tmp_path / "out"
    loaded = []
    original = report_module._load
    monkeypatch.setattr(report_module, "_load", lambda d, rel: (loaded.append(str(rel)), original(d, rel))[1])
    result = reduce([raw], out, options=ReduceOptions())
    assert not loaded
    made = sorted((out / "previews").glob("light-*.json"))
    assert len(made) == len(result.lights) > 0
    made_masters = sorted((out / "previews").glob("master-*.json"))
    assert len(made_masters) == len(result.masters) > 0
    by_task = {p.name: p.read_bytes() for p in [*made, *made_masters]}
    pngs = {p.name: p.read_bytes() for p in (out / "previews").glob("*.png")}

    def page():   # the report without its folder and time line
        return re.sub(r'<div class="meta">[^<]*</div>', "", (out / "report.html").read_text())

    first = page()
    reduce([raw], out, options=ReduceOptions())          # everything up to date: only the report is rebuilt
    assert not loaded and page() == first

    for p in [*made, *made_masters]:                     # gone: the report makes them itself, the same
        p.unlink()
    report_module.build_report(out)
    assert len([rel for rel in loaded if "calibrated" in rel]) == len(made)
    assert len([rel for rel in loaded if "masters" in rel]) == len(made_masters)
    for p in [*made, *made_masters]:
        assert json.loads(p.read_bytes()) == json.loads(by_task[p.name]), p.name
    assert {p.name: p.read_bytes() for p in (out / "previews").glob("*.png")} == pngs
    assert page() == first


def test_a_master_preview_that_fails_in_its_task_stops_nothing(tmp_path, monkeypatch):
    """A preview task that raises (here: any not on the main thread) leaves the run whole: every
    light in the manifest, and the report makes the masters' previews itself."""
    import json
    import threading

    from ccdcal.demo import write_night
    from ccdcal.pipeline import tasks as tasks_module
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    original = report_module.write_master_previews
    failed = []

    def only_on_the_main_thread(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            failed.append(args[1])
            raise MemoryError("no room for a preview")
        return original(*args, **kwargs)

    monkeypatch.setattr(report_module, "write_master_previews", only_on_the_main_thread)
    monkeypatch.setattr(tasks_module, "write_master_previews", only_on_the_main_thread)   # the tasks' name
    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2)
    out = tmp_path / "out"
    result = reduce([raw], out, options=ReduceOptions())
    assert sorted(failed) == sorted(result.masters)
    manifest = json.loads((out / "manifest.json").read_text())
    lights = [rel for rel, entry in manifest["outputs"].items() if entry["kind"] == "light"]
    assert sorted(lights) == sorted(result.lights) and len(lights) > 0
    assert len(list((out / "previews").glob("master-*.json"))) == len(result.masters) > 0


def test_previews_left_damaged_by_a_power_cut_are_made_again(tmp_path, monkeypatch):
    """The previews are a cache written without fsync; after a power cut a PNG may be empty or
    older than its JSON. The report checks each PNG against the hash its JSON recorded: the
    damaged ones (emptied, or another preview's bytes) are made again from the outputs, the same
    bytes as before; the intact ones are taken as they are."""
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2, n_light=2)
    out = tmp_path / "out"
    reduce([raw], out, options=ReduceOptions())
    previews = out / "previews"
    pngs = {p.name: p.read_bytes() for p in previews.glob("*.png")}
    lights = sorted(previews.glob("light-*-thumb.png"))
    masters = sorted(previews.glob("master-*.png"))
    assert len(lights) >= 2 and masters
    lights[0].write_bytes(b"")                                   # emptied
    masters[0].write_bytes(pngs[lights[1].name])                 # another PNG in its place
    loaded = []
    original = report_module._load
    monkeypatch.setattr(report_module, "_load", lambda d, rel: (loaded.append(str(rel)), original(d, rel))[1])
    report_module.build_report(out)
    assert len(loaded) == 2                                     # those two outputs, nothing else
    assert {p.name: p.read_bytes() for p in previews.glob("*.png")} == pngs


def test_a_light_holds_no_more_than_the_bytes_per_pixel_the_pipeline_budgets():
    """``lights_in_flight`` divides --memory by LIGHT_BYTES_PER_PIXEL × pixels: a light's own
    arrays (tracemalloc sees numpy's) must stay within it, less the raw frame read before."""
    import tracemalloc

    from ccdcal.calibration.arithmetic import Master, calibrate_frame
    from ccdcal.pipeline.run import LIGHT_BYTES_PER_PIXEL

    n = 512
    rng = np.random.default_rng(0)

    def master(level):
        return Master(data=np.full((n, n), level, np.float32), uncertainty=np.full((n, n), 1.0, np.float32),
                      mask=np.zeros((n, n), np.uint8), name="m", datasum="", exptime=300.0, level=1.0, facts={})

    bias, dark, flat = master(1000.0), master(20.0), master(1.0)
    raw = (1000 + rng.normal(500, 30, (n, n))).astype(np.float32)
    calibrate_frame(raw, bias=bias, dark=dark, dark_scale=1.0, flat=flat, gain=1.5, read_noise=5.0,
                    saturation=60000.0, uncertainty=True)      # numba's kernels loaded before tracing
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = calibrate_frame(raw, bias=bias, dark=dark, dark_scale=1.0, flat=flat, gain=1.5, read_noise=5.0,
                                 saturation=60000.0, uncertainty=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert result.uncertainty is not None
    assert peak / n**2 <= LIGHT_BYTES_PER_PIXEL - 4


def test_lights_in_flight_follow_the_memory_budget(tmp_path):
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions
    from ccdcal.pipeline.run import LIGHT_BYTES_PER_PIXEL, lights_in_flight
    from ccdcal.planning.inventory import scan
    from ccdcal.planning.plan import build_plan

    write_night(tmp_path / "raw", size=64, seed=1, n_light=3)
    plan = build_plan(scan([tmp_path / "raw"]), ReduceOptions().plan_options())
    ny, nx = plan.lights[0].frame.shape                  # raw size, overscan included
    one = LIGHT_BYTES_PER_PIXEL * ny * nx
    assert lights_in_flight(plan, ReduceOptions(memory=str(one))) == 1
    assert lights_in_flight(plan, ReduceOptions(memory=str(3 * one + 1))) == 3
    assert lights_in_flight(plan, ReduceOptions(memory=str(one // 2))) == 1


def _sigma_formula(signal, read_noise, gain, bias_u=None, dark_u=None, dark_scale=1.0, flat=None, flat_u=None,
                   cal=None):
    """The documented formula in plain numpy float32 (independent of the library's kernel):
    var = rn² + max(S, 0)/g + σ_B² + (k·σ_D)²;  σ² = var/F² + (C·σ_F/F)²; non-finite σ and C as
    numpy's nan_to_num."""
    f32 = np.float32
    clean = lambda a: np.nan_to_num(a.astype(f32), nan=0.0)  # noqa: E731
    var = np.maximum(signal, f32(0)) / f32(gain) + f32(read_noise) ** 2
    if bias_u is not None:
        var = var + clean(bias_u) * clean(bias_u)
    if dark_u is not None and dark_scale:
        d = f32(dark_scale) * clean(dark_u)
        var = var + d * d
    if flat is not None:
        var = var / (flat * flat)
        if flat_u is not None and cal is not None:
            t = clean(cal) * (clean(flat_u) / flat)
            var = var + t * t
    return np.sqrt(var).astype(f32)


def test_uncertainty_plane_is_the_documented_formula_bit_for_bit():
    """The light's σ plane comes from a fused numba kernel; a plain numpy evaluation of the
    formula (in the test) gives the same bits, NaN, infinities and negative signal included."""
    from ccdcal.calibration.arithmetic import calibrated_uncertainty

    rng = np.random.default_rng(3)
    shape = (64, 96)

    def plane(level, spread):
        return (level + spread * rng.standard_normal(shape)).astype(np.float32)

    signal, bias_u, dark_u, flat, flat_u, cal = (plane(500, 400), plane(2, 0.5), plane(1, 0.3), plane(1, 0.05),
                                                 plane(0.003, 0.001), plane(480, 400))
    for arr in (bias_u, dark_u, flat_u, cal, signal):
        arr[rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5)] = np.nan
    bias_u[0, 0], dark_u[1, 1], flat_u[2, 2], cal[3, 3] = np.inf, -np.inf, np.inf, -np.inf
    cases = [{}, {"bias_u": bias_u}, {"bias_u": bias_u, "dark_u": dark_u, "dark_scale": 1.7},
             {"bias_u": bias_u, "dark_u": dark_u, "dark_scale": 0.5, "flat": flat},
             {"bias_u": bias_u, "dark_u": dark_u, "dark_scale": 2.0, "flat": flat, "flat_u": flat_u, "cal": cal}]
    names = {"bias_u": "bias_uncertainty", "dark_u": "dark_uncertainty", "dark_scale": "dark_scale", "flat": "flat",
             "flat_u": "flat_uncertainty", "cal": "calibrated"}
    with np.errstate(invalid="ignore", over="ignore"):
        for kw in cases:
            got = calibrated_uncertainty(signal, read_noise=7.3, gain=1.37, **{names[k]: v for k, v in kw.items()})
            want = _sigma_formula(signal, 7.3, 1.37, **kw)
            assert got.dtype == np.float32
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), sorted(kw)


def _astropy_written(path, data, header, uncertainty, mask):
    from astropy.io import fits

    primary = fits.PrimaryHDU(data, header=header.copy())
    primary.header["BUNIT"] = ("adu", "physical unit of the data")
    uh = fits.Header()
    uh["UTYPE"] = ("StdDevUncertainty", "uncertainty type (astropy.nddata)")
    uh["BUNIT"] = "adu"
    fits.HDUList([primary, fits.ImageHDU(uncertainty, header=uh, name="UNCERT"),
                  fits.ImageHDU(mask, name="MASK")]).writeto(path, checksum=True)


def test_fits_writer_matches_astropy_and_its_checksums_verify(tmp_path):
    """The streamed writer against astropy's own writer: the same bytes wherever the
    checksum timestamps do not enter, CHECKSUM/DATASUM that astropy verifies, and the
    hash it remembers equal to hashing the file afterwards."""
    import warnings

    from astropy.io import fits

    from ccdcal.io.frames import write_fits
    from ccdcal.io.hashing import _HASHES, _hash_key

    rng = np.random.default_rng(5)
    for shape in [(1, 1), (7, 13), (5, 3), (333, 517)]:      # odd sizes: partial words and blocks
        data = rng.normal(100, 30, shape).astype(np.float32)
        data.flat[0] = np.nan
        data.flat[-1] = -np.inf
        unc = np.abs(rng.normal(5, 1, shape)).astype(np.float32)
        mask = rng.integers(0, 256, shape).astype(np.uint8)
        header = fits.Header([("OBJECT", "M51"), ("LONGCOMM", "a" * 60, "b" * 40), ("EXPTIME", 300.0)])
        ours, theirs = tmp_path / f"ours{shape}.fits", tmp_path / f"theirs{shape}.fits"
        write_fits(ours, data, header, uncertainty=unc, mask=mask, unit="adu")
        _astropy_written(theirs, data, header, unc, mask)
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # astropy warns when a checksum does not verify
            with fits.open(ours, checksum=True) as a, fits.open(theirs) as b:
                assert len(a) == len(b) == 3
                for ha, hb in zip(a, b, strict=True):
                    assert np.array_equal(ha.data, hb.data, equal_nan=True)
                    assert ha.header["DATASUM"] == hb.header["DATASUM"]
                    keys_a = [(c.keyword, c.value) for c in ha.header.cards if c.keyword != "CHECKSUM"]
                    keys_b = [(c.keyword, c.value) for c in hb.header.cards if c.keyword != "CHECKSUM"]
                    assert keys_a == keys_b
        raw_a, raw_b = ours.read_bytes(), theirs.read_bytes()
        assert len(raw_a) == len(raw_b) and len(raw_a) % 2880 == 0
        # the data units are byte for byte astropy's (headers differ only in the checksum cards)
        with fits.open(theirs) as b:
            for hdu in b:
                start, size = hdu.fileinfo()["datLoc"], hdu.fileinfo()["datSpan"]
                assert raw_a[start:start + size] == raw_b[start:start + size]
        assert _HASHES[_hash_key(ours)] == xxhash.xxh3_128(raw_a).hexdigest()


def test_light_statistics_of_the_report_are_within_the_precision_of_their_subsample(tmp_path):
    """The report's light statistics come from a 2^18-pixel regular subsample; against
    numpy's statistics of every pixel they are as close as report.STATS_PIXELS states
    (median to ~0.0025 σ, std to ~0.14 %: bounds at about 4x those)."""
    import json

    from astropy.stats import sigma_clipped_stats

    from ccdcal.report.page import STATS_PIXELS, write_light_previews

    rng = np.random.default_rng(12)
    shape = (2048, 2048)
    sky, sigma = 800.0, 30.0
    data = rng.normal(sky, sigma, shape).astype(np.float32)
    y, x = rng.integers(10, 2038, (2, 300))
    for yy, xx in zip(y, x, strict=True):                 # stars: a tail the clipping must remove
        data[yy - 2:yy + 3, xx - 2:xx + 3] += rng.uniform(200, 20000)
    write_light_previews(tmp_path, "calibrated/light.fits", data)
    stats = json.loads((tmp_path / "previews" / "light-light.json").read_text())["stats"]
    assert STATS_PIXELS <= stats["npix"] < 1.1 * STATS_PIXELS
    _, median, std = sigma_clipped_stats(data, sigma=3.0, maxiters=5)
    assert abs(stats["clipped_median"] - median) < 0.01 * sigma
    assert abs(stats["median"] - np.median(data)) < 0.01 * sigma
    assert abs(stats["clipped_std"] / std - 1) < 0.006


def test_dark_subtraction_in_place_rounds_as_numpy_does():
    """subtract_dark's kernel (no frame-sized temporary) against numpy's data - float32(k)*dark."""
    from ccdcal.calibration.arithmetic import subtract_dark

    rng = np.random.default_rng(3)
    for scale in (0.0167, 1.0, 1 / 3, 2.7):
        data = rng.normal(1000, 50, (300, 517)).astype(np.float32)
        dark = rng.normal(20, 9, (300, 517)).astype(np.float32)
        dark[0, 0], dark[1, 1] = np.nan, np.inf
        expected = data - np.float32(scale) * dark
        assert np.array_equal(subtract_dark(data.copy(), dark, scale), expected, equal_nan=True)
        view = data[:, 3:-2]                             # not contiguous: numpy's own path
        assert np.array_equal(subtract_dark(view.copy(), dark[:, 3:-2], scale), expected[:, 3:-2], equal_nan=True)


def test_the_scan_hashes_the_files_it_reads_as_xxhash_hashes_them(tmp_path):
    """reduce's pixel checks take each raw 16-bit file's hash from the pixels they read (the
    bytes around them read again): equal to xxhash over the whole file, for a primary image
    and for an image in an extension followed by another HDU; a dry scan hashes nothing."""
    from astropy.io import fits

    from ccdcal.io import hashing
    from ccdcal.planning.inventory import flag_groups, scan

    rng = np.random.default_rng(8)
    paths = []
    for i in range(4):
        data = (rng.normal(1000, 7, (37, 53)) + 32768).astype(np.uint16)
        header = fits.Header([("IMAGETYP", "BIAS"), ("EXPTIME", 0.0)])
        path = tmp_path / f"bias_{i}.fits"
        if i % 2:   # the image in HDU 1, a table after it
            table = fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.arange(5.0))])
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header), table]).writeto(path)
        else:
            fits.PrimaryHDU(data, header).writeto(path)
        paths.append(path)
    inventory = scan([tmp_path], flag=False)
    keys = {p: hashing._hash_key(p) for p in paths}
    with hashing._HASH_LOCK:
        for key in keys.values():
            hashing._HASHES.pop(key, None)
    flag_groups(inventory)
    assert not any(key in hashing._HASHES for key in keys.values())
    flagged = flag_groups(inventory, hash_files=True)
    for path, key in keys.items():
        assert hashing._HASHES[key] == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    assert all("_hash" not in (f.metrics or {}) for f in flagged.frames)


def _numpy_calibration(raw, bias, dark, scale, flat, flat_floor, gain, read_noise, bias_u, dark_u, flat_u):
    """The documented sequence in plain numpy float32, step by step: (raw − B − k·D) / F with F the
    flat floored to 1 below ``flat_floor``, and σ by :func:`_sigma_formula` of the signal above bias."""
    f32 = np.float32
    data = raw.copy()
    if bias is not None:
        data = data - bias
    signal = data.copy()
    if dark is not None and scale:
        data = data - f32(scale) * dark
    floored = None
    if flat is not None:
        floored = np.where(np.isfinite(flat) & (flat >= flat_floor), flat, f32(1.0)).astype(f32)
        data = data / floored
    sigma = _sigma_formula(signal, read_noise, gain, bias_u=bias_u, dark_u=dark_u if dark is not None else None,
                           dark_scale=scale, flat=floored, flat_u=flat_u if flat is not None else None,
                           cal=data if flat is not None else None)
    return data, sigma


def test_the_one_pass_calibration_is_numpys_sequence_bit_for_bit():
    """calibrate_frame's bias, dark, flat and σ are one numba pass; numpy's step-by-step float32
    arithmetic (written here) gives the same bits for every combination of masters, with NaN,
    infinities, dead flat pixels and a zero dark scale, into reused output arrays too."""
    from ccdcal.calibration.arithmetic import Master, calibrate_frame

    rng = np.random.default_rng(11)
    shape = (70, 131)

    def plane(level, spread):
        return (level + spread * rng.standard_normal(shape)).astype(np.float32)

    raw = plane(1500, 600)
    bias, dark, flat = plane(1000, 5), plane(30, 10), plane(1.0, 0.08)
    bias_u, dark_u, flat_u = plane(1.0, 0.2), plane(0.7, 0.2), plane(0.002, 0.0005)
    raw[0, :3] = [np.nan, np.inf, -np.inf]
    bias[1, 1], dark[2, 2], flat[3, 3], flat[4, 4], flat[5, 5] = np.nan, np.inf, 0.0, 0.05, np.nan
    bias_u[6, 6], dark_u[7, 7], flat_u[8, 8] = np.inf, np.nan, np.inf
    # the floor's edge (0.1 as float32, and the float32 just below it), and a flat of +inf
    flat[9, 9], flat[10, 10], flat[11, 11] = np.float32(0.1), np.nextafter(np.float32(0.1), np.float32(0)), np.inf
    sigma_out, mask_out = np.full(shape, 7.0, np.float32), np.full(shape, 255, np.uint8)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        for has_bias, has_dark, has_flat, scale in [(1, 1, 1, 1.7), (1, 0, 0, 1.0), (0, 1, 0, 0.5), (1, 1, 0, 0.0),
                                                    (0, 0, 1, 1.0), (1, 0, 1, 1.0), (0, 0, 0, 1.0), (1, 1, 1, 1 / 3)]:
            masters_ = {
                "bias": Master(bias, bias_u, name="b") if has_bias else None,
                "dark": Master(dark, dark_u, name="d", exptime=300.0) if has_dark else None,
                "flat": Master(flat, flat_u, name="f", level=1.0) if has_flat else None,
            }
            want_data, want_sigma = _numpy_calibration(
                raw, bias if has_bias else None, dark if has_dark else None, scale, flat if has_flat else None,
                0.1, 1.37, 6.1, bias_u if has_bias else None, dark_u, flat_u)
            for reuse in (False, True):
                got = calibrate_frame(raw, **masters_, dark_scale=scale, gain=1.37, read_noise=6.1,
                                      uncertainty_out=sigma_out if reuse else None,
                                      mask_out=mask_out if reuse else None)
                case = (has_bias, has_dark, has_flat, scale, reuse)
                assert np.array_equal(got.data.view(np.uint32), want_data.view(np.uint32)), case
                assert np.array_equal(got.uncertainty.view(np.uint32), want_sigma.view(np.uint32)), case
                assert (got.uncertainty is sigma_out) == reuse and (got.mask is mask_out) == reuse
                assert got.mask[0, 0] == 0 and got.mask[1, 0] == 0     # a reused mask starts clear
        # dark optimisation: the bias is subtracted first, the fitted scale then used in the pass
        structured = dark.copy()
        structured[::7, ::5] += 400.0                        # hot pixels give the fit structure
        got = calibrate_frame(raw, bias=Master(bias, bias_u, name="b"),
                              dark=Master(structured, dark_u, name="d", exptime=300.0),
                              flat=Master(flat, flat_u, name="f", level=1.0), dark_scale=1.0, dark_optimize=True,
                              gain=1.37, read_noise=6.1)
        assert got.dark_optimized
        want_data, want_sigma = _numpy_calibration(raw, bias, structured, got.dark_scale, flat, 0.1, 1.37, 6.1,
                                                   bias_u, dark_u, flat_u)
        assert np.array_equal(got.data.view(np.uint32), want_data.view(np.uint32))
        assert np.array_equal(got.uncertainty.view(np.uint32), want_sigma.view(np.uint32))


def test_lights_calibrated_in_reused_memory_keep_nothing_of_the_light_before(tmp_path, monkeypatch):
    """The light tasks reuse their frame-sized arrays from light to light. The first light is
    saturated over a block the others are not; every plane of every light equals the run's
    whose arrays are all fresh (nothing given back for reuse), and reuse did happen."""
    from astropy.io import fits

    from ccdcal import reduce
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions
    from ccdcal.pipeline.tasks import BufferPool

    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=4, n_light=4)
    lights = sorted(p for p in raw.glob("*.fits") if "light" in fits.getval(p, "IMAGETYP").lower())
    with fits.open(lights[0], mode="update") as hdul:
        hdul[0].data[5:20, 5:20] = 65535
    reused = []
    take = BufferPool.take

    def spy(self, shape, dtype):
        free = self._free.get((tuple(shape), np.dtype(dtype).str))
        reused.append(bool(free))
        return take(self, shape, dtype)

    monkeypatch.setattr(BufferPool, "take", spy)
    first = reduce(raw, tmp_path / "reused", options=ReduceOptions(report=False))
    assert any(reused)
    monkeypatch.setattr(BufferPool, "give", lambda self, *arrays: None)
    reused.clear()
    second = reduce(raw, tmp_path / "fresh", options=ReduceOptions(report=False))
    assert not any(reused)
    assert sorted(first.lights) == sorted(second.lights) and len(first.lights) == 8   # two filters
    saturated = 0
    for rel in first.lights:
        with fits.open(tmp_path / "reused" / rel) as a, fits.open(tmp_path / "fresh" / rel) as b:
            for name in ("PRIMARY", "UNCERT", "MASK"):
                assert np.array_equal(a[name].data, b[name].data, equal_nan=True), (rel, name)
            saturated += int(np.count_nonzero(a["MASK"].data & 1) > 200)
    assert saturated == 1


def test_the_masters_mask_union_is_made_once_per_set_of_masters(monkeypatch):
    """Every light of a night ORs the same mask bits from its masters; they are made once per
    set of master objects and shared, also by threads asking at the same moment (one makes,
    the others wait); another master object gets its own; the bits are those made directly."""
    import importlib
    import threading
    import time
    from collections import OrderedDict

    from ccdcal.calibration.arithmetic import Master, _add_master_masks, _master_masks

    calibrate = importlib.import_module("ccdcal.calibration.arithmetic")
    monkeypatch.setattr(calibrate, "_DERIVED", OrderedDict())
    rng = np.random.default_rng(2)
    dark_data = rng.normal(5, 1, (40, 50)).astype(np.float32)
    dark_data[3, 4] = 500.0                                  # hot
    flat_data = rng.normal(1, 0.01, (40, 50)).astype(np.float32)
    flat_data[7, 8] = 0.01                                   # dead
    made = []
    original = calibrate._add_master_masks

    def slow(*a, **k):
        made.append(1)
        time.sleep(0.2)                                      # the other threads arrive meanwhile
        return original(*a, **k)

    monkeypatch.setattr(calibrate, "_add_master_masks", slow)
    dark = Master(dark_data, name="master_dark.fits", datasum="123")
    flat = Master(flat_data, name="master_flat.fits", datasum="77", level=1.0)
    results = []

    def light():
        mask = np.zeros(dark_data.shape, np.uint8)
        _master_masks(mask, None, dark, flat, hot_sigma=5.0, flat_floor=0.1)
        results.append(mask)

    threads = [threading.Thread(target=light) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    direct = np.zeros(dark_data.shape, np.uint8)
    _add_master_masks(direct, None, dark, flat, hot_sigma=5.0, flat_floor=0.1)
    assert len(made) == 1 and len(results) == 3
    assert all(np.array_equal(r, direct) for r in results)
    assert direct[3, 4] and direct[7, 8] and np.count_nonzero(direct) == 2
    light()
    assert len(made) == 1
    other = Master(dark_data.copy(), name="master_dark.fits", datasum="123")   # read again: a new object
    _master_masks(np.zeros(dark_data.shape, np.uint8), None, other, flat, hot_sigma=5.0, flat_floor=0.1)
    assert len(made) == 2


def test_what_the_first_lights_share_is_made_while_the_last_master_is_written(tmp_path, monkeypatch):
    """The masters' mask union is made once per set of masters (the flat is floored pixel by
    pixel in the kernel: never copied); those of the first lights before any light starts (while
    the last master's file is written), not in a light task; the planes are those of a run where
    the lights make them. A rerun whose masters
    are all kept prepares nothing, and a failure while preparing only leaves it to the lights."""
    import importlib
    import json

    from astropy.io import fits

    from ccdcal import reduce
    from ccdcal._shared.pool import kernels_threadsafe
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions

    if not kernels_threadsafe():
        pytest.skip("masters are written in a thread only on a threadsafe numba layer")
    calibrate = importlib.import_module("ccdcal.calibration.arithmetic")
    pipeline = importlib.import_module("ccdcal.pipeline.run")
    tasks = importlib.import_module("ccdcal.pipeline.tasks")
    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=6, n_light=3)             # two filters: two sets of masters
    made, in_light = [], []
    for name in ("safe_flat", "_add_master_masks"):         # the flat is floored in the kernel: no copy
        original = getattr(calibrate, name)

        def spy(*a, _name=name, _original=original, **k):
            made.append((_name, bool(in_light)))
            return _original(*a, **k)

        monkeypatch.setattr(calibrate, name, spy)
    calibrate_light = tasks.calibrate_light

    def light(*a, **k):                                     # whether a light task is running
        in_light.append(1)
        try:
            return calibrate_light(*a, **k)
        finally:
            in_light.pop()

    monkeypatch.setattr(tasks, "calibrate_light", light)
    options = ReduceOptions(report=False)
    first = reduce(raw, tmp_path / "prepared", options=options)
    assert len(first.lights) == 6
    in_flight = pipeline.lights_in_flight(first.plan, options)
    sets = {job.recipe.flat for job in first.plan.lights}
    first_sets = {job.recipe.flat for job in first.plan.lights[:in_flight]}
    # each thing once per set of masters; those of the first lights before any light task
    assert sorted(name for name, _ in made) == sorted(["_add_master_masks"] * len(sets))
    assert len(sets) == 2 and sum(not by_light for _, by_light in made) == len(first_sets) >= 1

    made.clear()
    reduce(raw, tmp_path / "prepared", options=options)     # all kept: nothing made, nothing read
    assert not made

    made.clear()
    monkeypatch.setattr(pipeline, "prepare_lights", lambda jobs, ctx: None)   # where reduce looks it up
    second = reduce(raw, tmp_path / "by-lights", options=options)
    assert made and all(by_light for _, by_light in made)
    for rel in first.lights:
        with fits.open(tmp_path / "prepared" / rel) as a, fits.open(tmp_path / "by-lights" / rel) as b:
            for name in ("PRIMARY", "UNCERT", "MASK"):
                assert np.array_equal(a[name].data, b[name].data, equal_nan=True), (rel, name)
    assert sorted(first.lights) == sorted(second.lights)

    def broken(jobs, ctx):
        raise MemoryError("no room to prepare")

    monkeypatch.setattr(pipeline, "prepare_lights", broken)
    third = reduce(raw, tmp_path / "failed-prepare", options=options)
    manifest = json.loads((tmp_path / "failed-prepare" / "manifest.json").read_text())
    assert sorted(third.lights) == sorted(first.lights) and not third.skipped
    assert sorted(rel for rel, e in manifest["outputs"].items() if e["kind"] != "light") == sorted(third.masters)


def test_hot_pixels_are_numpys_whole_frame_expression():
    """hot_pixel_mask works a band of pixels at a time and samples without copying when every
    pixel is finite; the mask is numpy's whole-frame expression (written here) bit for bit,
    with and without NaN, with a per-pixel uncertainty, on a frame over the 1M-pixel sample."""
    from ccdcal._shared.robust import robust_std
    from ccdcal.calibration.masters import hot_pixel_mask

    def whole(dark, sigma, uncertainty=None):
        finite = np.isfinite(dark)
        sample = dark[finite]
        sample = sample[:: sample.size // 1_000_000] if sample.size > 1_000_000 else sample
        centre, noise = float(np.median(sample)), robust_std(sample)
        if uncertainty is not None:
            noise = np.maximum(noise, np.nan_to_num(uncertainty, nan=0.0))
        return finite & (dark - np.float32(centre) > sigma * noise)

    rng = np.random.default_rng(12)
    dark = rng.normal(20, 3, (1100, 1013)).astype(np.float32)
    dark[rng.integers(0, 1100, 3000), rng.integers(0, 1013, 3000)] += rng.uniform(5, 100, 3000).astype(np.float32)
    holed = dark.copy()
    holed[40:45, 100:300] = np.nan
    sigma_map = rng.uniform(2, 6, dark.shape).astype(np.float32)
    sigma_map[3, 3] = np.nan
    for frame in (dark, holed, dark[:97, :61]):
        for sigma in (5.0, 3.0):
            got = hot_pixel_mask(frame, sigma=sigma)
            assert np.array_equal(got, whole(frame, sigma)) and got.sum() > 10
            assert np.array_equal(hot_pixel_mask(frame, sigma=sigma, uncertainty=sigma_map[:frame.shape[0], :frame.shape[1]]),
                                  whole(frame, sigma, sigma_map[:frame.shape[0], :frame.shape[1]]))


def test_the_rejection_map_is_numpys_block_mean_of_the_counts():
    """rejection_map bins low + high rejections block by block; numpy's float64 block means of
    the summed counts (written here), square-rooted against their maximum, bit for bit."""
    from ccdcal.calibration.masters import rejection_map

    rng = np.random.default_rng(13)
    for shape in ((1700, 1650), (800, 801), (90, 60)):
        low = rng.integers(0, 3, shape).astype(np.uint8)
        high = (rng.random(shape) < 0.01).astype(np.uint8) * rng.integers(1, 255, shape).astype(np.uint8)
        step = max(1, -(-max(shape) // 800))
        h, w = shape[0] // step, shape[1] // step
        counts = (low.astype(np.float64) + high)[: h * step, : w * step]
        binned = counts.reshape(h, step, w, step).sum(axis=(1, 3)) / step**2
        expected = np.sqrt(binned.astype(np.float32) / np.float32(binned.max()))
        assert np.array_equal(rejection_map(low, high), expected), shape


def test_calibrated_member_rows_decode_into_the_tile_with_the_values_they_read(tmp_path):
    """CalibratedRows.fill_rows (a combine's tile of flat or dark members) decodes a frame
    without overscan or trimmed columns straight into the given buffer and calibrates it there;
    the values are those of read_rows, bit for bit, with and without a row trim, and with
    trimmed columns (then copied)."""
    from astropy.io import fits

    from ccdcal.calibration.arithmetic import CalibratedRows
    from ccdcal.calibration.recipe import Recipe
    from ccdcal.io.frames import FrameSource
    from ccdcal.sections import Section

    rng = np.random.default_rng(14)
    ny, nx = 90, 70
    stored = rng.integers(-32768, 32767, (ny, nx)).astype(np.int16)
    hdu = fits.PrimaryHDU(stored)
    hdu.header["BZERO"] = 32768
    hdu.writeto(tmp_path / "flat.fits")
    bias = rng.normal(1000, 5, (ny, nx)).astype(np.float32)
    dark = rng.normal(20, 3, (ny, nx)).astype(np.float32)
    for trim, direct in ((None, True), (Section(1, nx, 5, ny - 3), True), (Section(3, nx - 2, 1, ny), False)):
        shape = (ny, nx) if trim is None else trim.shape
        masters = {"b": bias[: shape[0], : shape[1]].copy(), "d": dark[: shape[0], : shape[1]].copy()}
        with FrameSource(tmp_path / "flat.fits") as src:
            rows = CalibratedRows(src, Recipe(None, trim, "b", "d", 0.37), masters)
            filled = []
            fill = src.fill_rows
            src.fill_rows = lambda y0, y1, out, scratch=None, _f=fill, _seen=filled: (
                _seen.append(out), _f(y0, y1, out, scratch))[1]
            expected = rows.read_rows(7, 40)
            filled.clear()
            tile = np.full((2, 33, shape[1]), np.nan, np.float32)
            scratch = np.empty(33 * rows.raw_bytes_per_row or 1, np.uint8)
            rows.fill_rows(7, 40, tile[1], scratch)
        assert np.array_equal(tile[1], expected) and np.isnan(tile[0]).all()
        assert (len(filled) == 1 and np.shares_memory(filled[0], tile)) == direct, trim
        assert rows.raw_bytes_per_row == (2 * nx if direct else 0)


def test_a_finished_master_is_numpys_element_wise_steps_bit_for_bit():
    """finish_master is one numba pass, in place on the combine's planes; numpy's element-wise
    steps written here (normalise, mask weak and empty pixels, fill holes) give the same bits,
    and the flat's level is numpy's float64 median of the central half (odd and even counts)."""
    from ccdcal.calibration.masters import finish_master, flat_level, hot_pixel_mask

    rng = np.random.default_rng(8)
    f32 = np.float32
    for kind, shape in (("flat", (60, 81)), ("flat", (61, 81)), ("bias", (50, 70)), ("dark", (50, 70))):
        level = 20000.0 if kind == "flat" else 1000.0
        data = rng.normal(level, level * 0.05, shape).astype(f32)
        unc = rng.normal(3, 0.5, shape).astype(f32)
        data[0, :4] = [np.nan, np.inf, -np.inf, level * 0.05]     # holes and a weak flat pixel
        unc[1, :2] = [np.nan, np.inf]
        if kind == "dark":
            data[10, 10] = level * 3                               # hot
        nodata = np.zeros(shape, bool)
        nodata[0, :2] = True
        nodata[5, 5] = True
        region = (slice(shape[0] // 4, shape[0] - shape[0] // 4), slice(shape[1] // 4, shape[1] - shape[1] // 4))
        want_level = float(np.median(data[region].astype(np.float64)[np.isfinite(data[region])]))
        d, u = data.copy(), unc.copy()
        mask = np.where(nodata, np.uint8(32), np.uint8(0))
        if kind == "flat":
            d, u = d / f32(want_level), u / f32(want_level)
            mask[(~np.isfinite(d) | (d < 0.1)) & ~nodata] |= 4
            d = np.where(np.isfinite(d), d, f32(1))
        else:
            d = np.where(np.isfinite(d), d, f32(0))
        if kind == "dark":
            mask[hot_pixel_mask(d, sigma=5.0) & ~nodata] |= 2
        u = np.where(np.isfinite(u), u, f32(0))
        for in_place in (False, True):
            a, b = data.copy(), unc.copy()
            done = finish_master(kind, a, b, nodata, flat_floor=0.1, hot_sigma=5.0, in_place=in_place)
            assert np.array_equal(done.data.view(np.uint32), d.view(np.uint32)), (kind, in_place)
            assert np.array_equal(done.uncertainty.view(np.uint32), u.view(np.uint32)), (kind, in_place)
            assert np.array_equal(done.mask, mask), (kind, in_place)
            assert (done.data is a) == in_place and np.array_equal(a, data, equal_nan=True) != in_place
            assert done.n_nodata == 3
            if kind == "flat":
                assert done.level == want_level
                assert flat_level(data) == want_level
                assert mask[0, 3] == 4 and mask[0, 2] == 4
            if kind == "dark":
                assert mask[10, 10] == 2 and done.n_hot >= 1


def test_16_bit_rows_decode_as_numpys_float32_steps(tmp_path):
    """FrameSource's decoding of 16-bit rows (whole frames and row bands into given buffers)
    against numpy's float32 steps on the stored integers and astropy's own reading, bit for
    bit, with BZERO, BSCALE and BLANK. (A numba decoding kernel was tried: no faster than
    numpy's conversion, 12-15 ms for a 4096² frame.)"""
    from astropy.io import fits

    from ccdcal.io.frames import FrameSource

    rng = np.random.default_rng(21)
    stored = rng.integers(-32768, 32768, (37, 53), dtype=np.int16)
    stored[0, :3] = [-32768, 32767, 0]
    for bscale, bzero, blank in ((1.0, 32768.0, None), (1.0, 0.0, None), (0.37, 12.5, -32768), (2.0, -3.0, 17)):
        path = tmp_path / f"frame_{bscale}_{bzero}.fits"
        hdu = fits.PrimaryHDU(stored)
        hdu.header["BSCALE"], hdu.header["BZERO"] = bscale, bzero
        if blank is not None:
            hdu.header["BLANK"] = blank
        hdu.writeto(path, output_verify="silentfix")
        want = stored.astype(np.float32)
        if bscale != 1.0:
            want *= np.float32(bscale)
        if bzero != 0.0:
            want += np.float32(bzero)
        if blank is not None:
            want[stored == blank] = np.nan
        with FrameSource(path) as src:
            assert src.raw16
            whole = src.read()
            band = np.empty((10, 53), np.float32)
            src.fill_rows(20, 30, band)
            # through a scratch of 3 rows and a bit (bands of 3, the last of 1), or less than a row
            banded, tiny = np.empty((37, 53), np.float32), np.empty((10, 53), np.float32)
            scratch = np.full(3 * src.raw_bytes_per_row + 5, 0xAB, np.uint8)
            src.fill_rows(0, 37, banded, scratch)
            src.fill_rows(20, 30, tiny, np.empty(7, np.uint8))
        assert np.array_equal(whole, want, equal_nan=True), (bscale, bzero, blank)
        assert np.array_equal(band, want[20:30], equal_nan=True)
        assert np.array_equal(banded, want, equal_nan=True)
        assert np.array_equal(tiny, want[20:30], equal_nan=True)
        if blank is None:
            with fits.open(path, do_not_scale_image_data=False) as hdul:
                reference = hdul[0].data.astype(np.float32)
            if bscale == 1.0:
                assert np.array_equal(whole, reference)


def test_frame_metrics_of_a_finite_frame_are_those_that_ignore_nan():
    """The scan's block and column medians use numpy's plain median when the sample has no NaN;
    numpy's nanmedian of the same sample (computed here) gives the same numbers; with NaN in
    the frame the NaN-aware path is taken."""
    from ccdcal.qa.stats import frame_metrics

    rng = np.random.default_rng(4)
    for shape in ((512, 512), (300, 700), (1024, 999)):
        frame = rng.normal(1000, 7, shape).round().astype(np.float32)
        frame[:, ::37] += 3                                   # a column pattern
        got = frame_metrics(frame)
        k = max(1, int(np.sqrt(frame.size / 65536.0)))
        sample = frame[::k, ::k].astype(np.float64)
        columns = np.nanmedian(sample, axis=0)
        assert got["column_pattern"] == 1.482602218505602 * float(np.median(np.abs(columns - np.median(columns))))
        ny, nx = sample.shape
        by, bx = ny // 8, nx // 8
        blocks = np.nanmedian(sample[: 8 * by, : 8 * bx].reshape(8, by, 8, bx).swapaxes(1, 2).reshape(8, 8, -1), axis=2)
        assert got["gradient"] == float(blocks.max() - blocks.min())
        holed = frame.copy()
        holed[::k, ::k][::5, ::3] = np.nan
        with np.errstate(invalid="ignore"):
            assert np.isfinite(frame_metrics(holed)["gradient"])


def test_the_command_keeps_freed_frames_for_the_next_ones():
    """With keep_freed_memory (what the ccdcal command calls first), a frame-sized array freed
    by a worker thread is reused by the next one: page faults counted by the kernel, a few
    against one per page of every frame in a process without it. Fresh processes, as the
    command's; the library itself leaves the allocator alone."""
    import subprocess
    import sys

    from ccdcal._shared import memory as _memory

    if _memory._glibc() is None:
        pytest.skip("glibc's allocator only")
    script = """
import resource, sys, threading
import numpy as np
from ccdcal._shared import memory as _memory

taken = _memory.keep_freed_memory() if sys.argv[1] == "keep" else None

def faults_making_frames():
    counts = []
    def work():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            frame = np.empty(16 << 20, np.float32)    # 64 MiB, in a worker thread
            frame.fill(1.0)
            del frame
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return counts[0]

faults_making_frames()                  # the heap grows once
print(taken, faults_making_frames())
"""
    counts = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        taken, faults = proc.stdout.split()
        counts[mode] = int(faults)
        if mode == "keep":
            assert taken == "True"
    assert counts["keep"] * 4 < counts["default"], counts


def test_on_a_layer_that_is_not_threadsafe_the_night_runs_one_kernel_at_a_time(tmp_path, monkeypatch):
    """Where numba's threading layer is workqueue (it aborts when two threads run kernels at
    once), the night runs its tasks one at a time, writes masters in order and reads tiles
    on the caller's thread: the same planes as the threaded run."""
    import importlib
    import threading

    from astropy.io import fits

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=4)
    threaded = reduce([raw], tmp_path / "threaded", options=ReduceOptions(report=False))
    monkeypatch.setattr(importlib.import_module("ccdcal._shared.pool"), "kernels_threadsafe", lambda: False)
    names = []
    real_start = threading.Thread.start

    def start(thread):
        names.append(thread.name)
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    alone = reduce([raw], tmp_path / "alone", options=ReduceOptions(report=False))
    monkeypatch.undo()
    assert not [n for n in names if "ccdcal-write" in n or "ccdcal-tiles" in n or "ThreadPoolExecutor" in n]
    assert sorted(alone.masters) == sorted(threaded.masters) and sorted(alone.lights) == sorted(threaded.lights)
    for rel in [*threaded.masters, *threaded.lights]:
        with fits.open(tmp_path / "threaded" / rel) as a, fits.open(tmp_path / "alone" / rel) as b:
            for ha, hb in zip(a, b, strict=True):
                assert np.array_equal(ha.data, hb.data, equal_nan=True), rel


def test_previews_of_an_output_rebuilt_within_the_timestamp_resolution_are_made_again(tmp_path, monkeypatch):
    """A master rewritten with other data but the same modification time (a FAT disk keeps
    2 s) is not taken for the old one: its DATASUM differs from the one its previews recorded,
    so the report makes them again from the new file."""
    import json
    import os

    from astropy.io import fits

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2)
    out = tmp_path / "out"
    result = reduce([raw], out, options=ReduceOptions())
    rel = next(m for m in result.masters if "bias" in m)
    path = out / rel
    facts_path = out / "previews" / f"master-{report_module._safe_stem(rel)}.json"
    before = json.loads(facts_path.read_text())
    stamp = path.stat().st_mtime_ns
    with fits.open(path) as hdul:
        hdul[0].data = hdul[0].data + np.float32(7.0)      # other data, same shape and size
        hdul.writeto(path, overwrite=True, checksum=True)
    os.utime(path, ns=(stamp, stamp))                      # and the old time
    assert facts_path.stat().st_mtime_ns >= path.stat().st_mtime_ns
    loaded = []
    original = report_module._load
    monkeypatch.setattr(report_module, "_load", lambda d, r: (loaded.append(str(r)), original(d, r))[1])
    report_module.build_report(out)
    assert loaded == [rel]
    after = json.loads(facts_path.read_text())
    assert after["datasum"] == str(fits.getheader(path)["DATASUM"]) != before["datasum"]
    assert after["stats"]["median"] == pytest.approx(before["stats"]["median"] + 7.0, abs=1e-3)



def _resident_fraction(path) -> float:
    """The fraction of a file's pages in the page cache: the file mapped and asked with
    Linux's mincore (through ctypes; mapping it reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as fh:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        pytest.skip("cannot map the file")
    try:
        status = ctypes.create_string_buffer(pages)
        if libc.mincore(address, size, status) != 0:
            pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(b & 1 for b in status.raw[:pages]) / pages
    finally:
        libc.munmap(address, size)


def _page_cache_drops_here(folder) -> bool:
    """Whether the filesystem of ``folder`` drops a durable file's pages when advised to (tmpfs
    cannot: its pages are the file)."""
    kept, probe = folder / "kept-probe.bin", folder / "probe.bin"
    for path in (kept, probe):
        with open(path, "wb") as fh:
            fh.write(os.urandom(1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
            if path == probe:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    # a filesystem whose cache is not the page cache (ZFS, some FUSE) keeps neither resident
    answer = _resident_fraction(kept) > 0.9 and _resident_fraction(probe) < 0.5
    kept.unlink()
    probe.unlink()
    return answer


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.sys.platform.startswith("linux"),
                    reason="page-cache advice and mincore are Linux's")
def test_an_output_written_uncached_leaves_its_pages_out_of_the_page_cache(tmp_path):
    """write_fits(cached=False) drops the file's pages once it is durable (the next output then
    reuses that memory); the default keeps them; both files are whole and verify."""
    from astropy.io import fits

    from ccdcal.io.frames import write_fits

    if not _page_cache_drops_here(tmp_path):
        pytest.skip("this filesystem keeps a file's pages in memory (tmpfs)")
    data = np.random.default_rng(3).normal(100, 5, (1024, 1024)).astype(np.float32)
    kept = write_fits(tmp_path / "kept.fits", data, uncertainty=data / 10, mask=np.zeros(data.shape, np.uint8))
    dropped = write_fits(tmp_path / "dropped.fits", data, uncertainty=data / 10,
                         mask=np.zeros(data.shape, np.uint8), cached=False)
    assert _resident_fraction(kept) > 0.9
    assert _resident_fraction(dropped) < 0.1
    for path in (kept, dropped):
        with fits.open(path, checksum=True) as hdul:     # read back (from the disk for "dropped")
            np.testing.assert_array_equal(hdul[0].data, data)
            assert len(hdul) == 3


def test_the_night_drops_from_the_page_cache_only_what_it_will_not_read_again(tmp_path, monkeypatch):
    """Lights leave the page cache once durable unless they are stacked next (read again);
    masters written beside the next combine (held in memory) bypass it (O_DIRECT where the
    filesystem takes it); the manifest, the report and a master written where no writer thread
    runs (read back from its file) stay cached."""
    import importlib

    from ccdcal import reduce
    from ccdcal._shared.pool import kernels_threadsafe
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions

    frames = importlib.import_module("ccdcal.io.frames")
    real = frames._commit
    commits: dict[str, bool] = {}

    def commit(tmp, path, cached=True):
        commits[path.name] = cached
        return real(tmp, path, cached)

    real_write = frames._write_hdus
    direct: dict[str, bool] = {}

    def write_hdus(tmp, hdul, is_direct=False):
        direct[tmp.name.split(".")[1]] = is_direct
        return real_write(tmp, hdul, is_direct)

    monkeypatch.setattr(frames, "_commit", commit)
    monkeypatch.setattr(frames, "_write_hdus", write_hdus)
    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=8, n_light=2)
    reduce(raw, tmp_path / "out")
    # the masters the writer thread writes bypass the page cache; the lights do not
    assert {k: v for k, v in direct.items() if k.startswith("master_")} and \
        all(v == kernels_threadsafe() for k, v in direct.items() if k.startswith("master_"))
    assert not any(v for k, v in direct.items() if k.startswith("m51_"))
    lights = [n for n in commits if n.startswith("m51_")]
    masters_ = [n for n in commits if n.startswith("master_")]
    assert lights and masters_
    assert not any(commits[n] for n in lights)
    assert all(not commits[n] for n in masters_) == kernels_threadsafe()
    assert commits["manifest.json"] and commits["report.html"]
    commits.clear()
    reduce(raw, tmp_path / "stacked", options=ReduceOptions(stack=True))
    stacked = [n for n in commits if n.startswith("m51_")]
    assert stacked and all(commits[n] for n in stacked)


def test_memory_warmed_ahead_is_the_memory_the_next_arrays_take():
    """warm_heap (in the command's process, with keep_freed_memory) faults pages in ahead: the
    frames a worker thread makes afterwards take a few page faults, against one per page
    without it; where keep_freed_memory does not hold it does nothing (freed memory would
    leave the process). Page faults counted by the kernel, in fresh processes."""
    import subprocess
    import sys

    from ccdcal._shared import memory as _memory

    if _memory._glibc() is None:
        pytest.skip("glibc's allocator only")
    script = """
import resource, sys, threading
import numpy as np
from ccdcal._shared import memory as _memory

# glibc's thresholds and warm_heap's blocks made small: 1 GiB asked, 112 MiB warmed (a free top of
# the heap above the trim threshold would go back to the system), in blocks below the threshold
_memory._KEEP, _memory._BLOCK = 128 << 20, 16 << 20
if sys.argv[1] != "plain" and not _memory.keep_freed_memory():
    print("untaken 0")
    sys.exit(0)
warmed = _memory.warm_heap(1 << 30) if sys.argv[1] == "warm" else None
counts = []
def work():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    frames = [np.ones(4 << 20, np.float32) for _ in range(6)]      # 6 x 16 MiB (below the threshold), kept
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(warmed, counts[0])
"""
    results = {}
    for mode in ("warm", "keep", "plain"):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        warmed, faults = proc.stdout.split()
        if warmed == "untaken":
            pytest.skip("this glibc refuses keep_freed_memory's settings")
        results[mode] = (warmed, int(faults))
    assert results["warm"][0] == "True"
    assert results["keep"][0] == "None"
    assert results["warm"][1] * 4 < results["keep"][1], results
    # without keep_freed_memory, warm_heap declines; stopped, it ends at once
    proc = subprocess.run([sys.executable, "-c", "from ccdcal._shared import memory as _memory; print(_memory.warm_heap(1 << 20))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
    stopped = ("import resource, threading\nimport numpy\nfrom ccdcal._shared import memory as _memory\n_memory.keep_freed_memory()\n"
               "stop = threading.Event(); stop.set()\n"
               "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
               "print(_memory.warm_heap(1 << 30, stop), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    proc = subprocess.run([sys.executable, "-c", stopped], capture_output=True, text=True, timeout=60)
    ran, faults = proc.stdout.split()
    assert ran == "True" and int(faults) < 100, proc.stdout + proc.stderr     # 1 GiB would be 512+ faults


def test_the_memory_warmed_for_a_night_is_what_its_lights_and_two_masters_hold(tmp_path, monkeypatch):
    """warm_bytes: for the largest input's primary image of N pixels, (lanes × 9 + 18) × N bytes
    with lanes as --memory and the workers allow, at most --memory; 0 where the inputs do not
    say (no 2-D primary image). The pipeline warms that much, locally only, never in a dry run."""
    import time

    from astropy.io import fits

    from ccdcal import reduce
    from ccdcal._shared import memory as _memory
    from ccdcal.demo import write_night
    from ccdcal.io.frames import primary_pixels
    from ccdcal.pipeline.options import ReduceOptions
    from ccdcal.pipeline.run import warm_bytes

    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=9, n_light=2)
    big = fits.PrimaryHDU(np.zeros((300, 200), np.uint16))
    big.header["HISTORY"] = "x" * 60
    for _ in range(80):                                        # a header of several blocks
        big.header.add_history("padding " * 8)
    big.writeto(raw / "zz_large.fits")
    assert primary_pixels(raw / "zz_large.fits") == 300 * 200
    npix = 300 * 200
    assert warm_bytes([raw], ReduceOptions(workers=2)) == (2 * 9 + 18) * npix
    assert warm_bytes([raw], ReduceOptions(workers=3)) == (3 * 9 + 18) * npix
    assert warm_bytes([raw], ReduceOptions(workers=2, memory=24 * npix)) == min(24 * npix, (9 + 18) * npix)
    cube = tmp_path / "cube"
    cube.mkdir()
    fits.PrimaryHDU(np.zeros((3, 40, 50), np.float32)).writeto(cube / "c.fits")
    assert warm_bytes([cube], ReduceOptions()) == 0
    assert warm_bytes([tmp_path / "missing"], ReduceOptions()) == 0

    # the output folder inside the inputs is left out (its files may be larger than any raw)
    inside = raw / "out"
    inside.mkdir()
    fits.PrimaryHDU(np.zeros((500, 500), np.float32)).writeto(inside / "big.fits")
    assert warm_bytes([raw], ReduceOptions(workers=2), exclude=inside) == (2 * 9 + 18) * npix
    assert warm_bytes([raw], ReduceOptions(workers=2)) == (2 * 9 + 18) * 500 * 500
    warmed = []
    monkeypatch.setattr(_memory, "_KEPT", True)
    monkeypatch.setattr(_memory, "warm_heap", lambda nbytes, stop=None: warmed.append(nbytes) or True)
    # the paths as a generator: warming does not use them up before the scan
    result = reduce((p for p in [raw]), inside, options=ReduceOptions(workers=2))
    assert len(result.lights) == 4                          # two per filter
    for _ in range(100):                                       # the thread has long finished
        if warmed:
            break
        time.sleep(0.05)
    assert warmed == [(2 * 9 + 18) * npix]
    warmed.clear()
    reduce(raw, tmp_path / "dry", dry_run=True)
    monkeypatch.setattr(_memory, "_KEPT", False)
    reduce(raw, tmp_path / "plain", options=ReduceOptions(workers=2))
    assert warmed == []


def _direct_io_here(folder) -> bool:
    """Whether the filesystem of ``folder`` takes an aligned O_DIRECT write."""
    import mmap

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = folder / "direct-probe.bin"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, 4096) as block:
            return os.write(fd, block) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _hdul_for_writing(shape=(301, 517)):
    from ccdcal.io.frames import add_checksums, fits_hdus

    data = np.random.default_rng(5).normal(100, 5, shape).astype(np.float32)
    hdul = fits_hdus(data, uncertainty=data / 10, mask=(data > 105).astype(np.uint8), unit="adu")
    add_checksums(hdul)
    return data, hdul


def test_a_file_written_directly_is_the_file_written_through_the_page_cache(tmp_path, monkeypatch):
    """write_hdus(direct=True): the same bytes as the buffered writer (sizes that are not
    multiples of the alignment, several staging flushes, the padded last block cut off), the
    checksums verify, and no page of it is left in the page cache where the filesystem takes
    O_DIRECT; where the OS or the filesystem refuses it (no O_DIRECT, EINVAL at the open or at
    the first write) the file is written through the page cache, whole."""
    from astropy.io import fits

    from ccdcal.io import frames

    data, hdul = _hdul_for_writing()
    plain = frames.write_hdus(tmp_path / "plain.fits", hdul)
    monkeypatch.setattr(frames._DirectFile, "_STAGE", 3 * 4096)        # many flushes
    direct = frames.write_hdus(tmp_path / "direct.fits", hdul, direct=True)
    assert direct.read_bytes() == plain.read_bytes()
    assert direct.stat().st_size % 4096 != 0
    with fits.open(direct, checksum=True) as read:
        np.testing.assert_array_equal(read[0].data, data)
    if hasattr(os, "O_DIRECT") and os.sys.platform.startswith("linux") and _page_cache_drops_here(tmp_path):
        frames.write_hdus(tmp_path / "again.fits", hdul, direct=True)
        assert _resident_fraction(tmp_path / "again.fits") < 0.1

    import errno

    real_open, real_write = os.open, os.write
    calls = {"n": 0}

    def refuse_direct_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refuse_first_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    def short_writes(fd, data):                 # half of each write (whole blocks) at a time
        half = len(data) // 2 // 4096 * 4096
        return real_write(fd, data[:half] if half else data)

    def refuse_the_tail(fd, data):              # a device wanting larger blocks than the padding
        if len(data) % (3 * 4096):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    for name in ("no_flag", "open", "write", "short", "tail"):
        with monkeypatch.context() as m:
            if name == "no_flag":
                m.delattr(os, "O_DIRECT", raising=False)
            elif name == "open":
                m.setattr(os, "open", refuse_direct_open)
            elif name == "write":
                m.setattr(os, "write", refuse_first_write)
            elif name == "short":
                m.setattr(os, "write", short_writes)
            else:
                m.setattr(os, "write", refuse_the_tail)
            out = frames.write_hdus(tmp_path / f"{name}.fits", hdul, direct=True)
        assert out.read_bytes() == plain.read_bytes(), name
    # a full disk in the middle of a direct write: the one-line error, no partial, the old file kept
    from ccdcal.errors import OutputError

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    if not _direct_io_here(tmp_path):
        return                                     # the writes above went through the page cache
    calls["n"] = 0
    old = (tmp_path / "direct.fits").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(OutputError, match="disk filled up"):
            frames.write_hdus(tmp_path / "direct.fits", hdul, direct=True)
    assert (tmp_path / "direct.fits").read_bytes() == old
    assert not list(tmp_path.glob(".*.partial"))


def test_the_read_noise_of_a_pair_is_the_written_out_clipped_std_bit_for_bit():
    """read_noise_from_pair (the difference in float64, one median less in clipped_std) gives the
    numbers of the steps written out here with numpy: median, 1.4826 × MAD about it, then up
    to 5 passes of 4σ clipping about the mean of the survivors (ddof=1), over √2; with integer
    bias frames and a cosmic ray grid, and with float frames holding a NaN."""
    from ccdcal.calibration.masters import read_noise_from_pair

    def written_out(first, second):
        v = first.astype(np.float64) - second.astype(np.float64)
        v = v[np.isfinite(v)].ravel()
        centre = float(np.median(v))
        spread = float(1.482602218505602 * np.median(np.abs(v - np.median(v))))
        kept = v
        for _ in range(5):
            new = v[np.abs(v - centre) <= 4.0 * spread]
            if new.size < 2:
                break
            centre, spread = float(np.mean(new)), float(np.std(new, ddof=1))
            if new.size == kept.size:
                break
            kept = new
        return spread / np.sqrt(2.0)

    rng = np.random.default_rng(12)
    a = rng.normal(1000, 7, (128, 1024)).round().astype(np.float32)
    b = rng.normal(1000, 7, (128, 1024)).round().astype(np.float32)
    a[::37, ::41] += 900.0
    c = rng.normal(10, 3, (128, 1024)).astype(np.float32)
    d = rng.normal(10, 3, (128, 1024)).astype(np.float32)
    c[5, 5] = np.nan
    for first, second in ((a, b), (c, d)):
        assert read_noise_from_pair(first, second) == written_out(first, second)


def test_a_flat_floor_given_as_numpy_float64_floors_the_data_as_it_masks():
    """The lights' kernel floors the flat at float32(floor); numpy would compare a float32 flat
    with a numpy float64 floor in float64, so a flat pixel equal to float32(0.7) could be divided
    yet masked. safe_flat and low_flat_mask take the floor as float32 too: a pixel is masked
    exactly when it is not divided, whatever the floor's type, and the numpy row pass
    (apply_masters) divides as the kernel does."""
    from ccdcal.calibration.arithmetic import MASK_LOW_FLAT, Master, apply_masters, calibrate_frame

    flat = np.ones((4, 5), np.float32)
    flat[1, 1], flat[2, 2] = np.float32(0.7), np.float32(0.5)
    raw = np.full((4, 5), 1000.0, np.float32)
    for floor in (0.7, np.float64(0.7), np.float32(0.7)):
        got = calibrate_frame(raw, flat=Master(flat, None, name="f", level=1.0), flat_floor=floor, uncertainty=False)
        masked = (got.mask & MASK_LOW_FLAT) != 0
        divided = got.data != raw
        assert np.array_equal(masked, (flat != 1.0) & ~divided), floor
        assert not masked[1, 1] and divided[1, 1] and masked[2, 2] and not divided[2, 2], floor
        assert np.array_equal(apply_masters(raw.copy(), flat=flat, flat_floor=floor), got.data), floor
