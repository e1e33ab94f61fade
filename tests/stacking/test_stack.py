"""Stacking on the reference grid: noise, sharpness, trails rejected at 3-4 frames, background
and transparency matched, header and file, the memory budget."""

from __future__ import annotations

import math
import tracemalloc
import warnings

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.errors import CcdcalWarning, InputError
from ccdcal.stacking.engine import StackResult, stack
from starfield import (
    catalogue,
    centroid,
    observe,
    robust_sigma,
    rotation,
    shift,
    star_free,
    write_light,
)

SHAPE = (256, 256)


def _frames(tmp_path, stars, matrices, *, skies=None, transparencies=None, trail=None, seed=0, shape=SHAPE):
    paths = []
    for i, matrix in enumerate(matrices):
        sky = 1000.0 if skies is None else skies[i]
        t = 1.0 if transparencies is None else transparencies[i]
        data, sigma = observe(shape, stars, matrix, sky=sky, transparency=t, seed=seed + i)
        if trail is not None and trail[0] == i:
            data, sigma = _add_trail(data, sigma, trail[1])
        paths.append(write_light(tmp_path / f"light{i:02d}.fits", data, sigma, exptime=60.0,
                                 mjd=60000.0 + i * 90 / 86400))
    return paths


def _add_trail(data, sigma, brightness):
    """A satellite trail: a Gaussian line (σ 0.8 px) from corner to corner."""
    ny, nx = data.shape
    gy, gx = np.mgrid[0:ny, 0:nx]
    distance = (gy - 0.8 * gx - 20.0) / math.sqrt(1 + 0.8**2)
    line = brightness * np.exp(-0.5 * (distance / 0.8) ** 2)
    data = data + line.astype(np.float32)
    return data, np.sqrt(sigma**2 + line).astype(np.float32)


def _binned(image, f=4):
    ny, nx = image.shape
    return image[: ny // f * f, : nx // f * f].reshape(ny // f, f, nx // f, f).mean(axis=(1, 3))


def _flux(image, x, y, radius=7):
    """Aperture flux with the sky from the median of the box border."""
    ix, iy = int(round(x)), int(round(y))
    box = image[iy - radius - 3: iy + radius + 4, ix - radius - 3: ix + radius + 4].astype(np.float64)
    gy, gx = np.mgrid[iy - radius - 3: iy + radius + 4, ix - radius - 3: ix + radius + 4]
    r = np.hypot(gx - x, gy - y)
    sky = np.median(box[r > radius + 1])
    return float((box[r <= radius] - sky).sum())


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """9 frames: 7 shifted by whole and subpixel amounts, one turned by 180°, the reference."""
    tmp = tmp_path_factory.mktemp("nine")
    stars = catalogue(SHAPE, 50, seed=11)
    rng = np.random.default_rng(12)
    matrices = [np.eye(3)] + [shift(*rng.uniform(-5, 5, 2)) for _ in range(7)]
    matrices.insert(4, rotation(180.0, SHAPE, 0.35, -0.15))
    paths = _frames(tmp, stars, matrices, seed=100)
    return stars, matrices, paths, stack(paths, matrices)


def test_stack_of_nine_averages_the_noise_down(nine):
    stars, matrices, paths, result = nine
    free = star_free(SHAPE, stars) & (result.coverage == 9)
    single = fits.getdata(paths[0]).astype(np.float64)
    n = len(paths)
    # per pixel the resampled frames are smoother (interpolation averages neighbours), so the
    # stack's pixel noise is below σ/√N; the propagated uncertainty predicts it
    pixel = robust_sigma(result.data[free])
    assert pixel == pytest.approx(float(np.median(result.uncertainty[free])), rel=0.1)
    assert 0.75 < pixel / (robust_sigma(single[free]) / math.sqrt(n)) < 1.02
    # in 4×4 bins (the noise an aperture sees) resampling changes nothing: σ/√N within 10 %
    fb = _binned(free.astype(float)) == 1
    ratio = robust_sigma(_binned(result.data)[fb]) / (robust_sigma(_binned(single)[fb]) / math.sqrt(n))
    assert ratio == pytest.approx(1.0, abs=0.1)
    # little is rejected where nothing is wrong (good values: ~0.3-0.5 % at 3σ)
    assert result.rejected.sum() < 0.01 * n * result.rejected.size


def test_stack_keeps_stars_as_sharp_as_the_reference(nine):
    stars, matrices, paths, result = nine
    reference, _ = observe(SHAPE, stars, np.eye(3), noise=False)
    ratios, offsets = [], []
    for x, y, flux in stars:
        if flux < 1e4 or result.coverage[int(y), int(x)] < 9:
            continue
        got = centroid(result.data, x, y, background=result.backgrounds[0])
        want = centroid(reference, x, y, background=1000.0)
        if flux > 3e4:  # the centroids of fainter ones have noise of several 0.01 px
            offsets.append(math.hypot(got[0] - want[0], got[1] - want[1]))
        ratios.append(got[3] / want[3])
    assert len(ratios) > 10
    assert np.median(ratios) == pytest.approx(1.0, abs=0.05)
    assert np.all(np.abs(np.array(ratios) - 1.0) < 0.1)
    assert len(offsets) > 5 and np.median(offsets) < 0.03 and np.max(offsets) < 0.06


def test_stack_header_planes_and_file(nine, tmp_path):
    stars, matrices, paths, result = nine
    assert isinstance(result, StackResult)
    h = result.header
    assert h["NCOMBINE"] == 9 and h["IMCMB001"] == "light00.fits" and h["IMCMB009"] == "light08.fits"
    assert h["EXPTIME"] == 540.0 and h["EXPMEAN"] == 60.0
    assert h["SCAL001"] == 1.0 and h["ZERO001"] == 0.0 and "WGHT009" in h
    start, end = 60000.0, 60000.0 + (8 * 90 + 60) / 86400
    assert h["MJD-OBS"] == start and h["MJD-END"] == pytest.approx(end)
    assert start < h["MJD-MID"] < end and h["DATE-AVG"].startswith("2023-02-25T00:0")
    assert result.data.dtype == np.float32 and result.uncertainty.dtype == np.float32
    assert result.coverage.dtype == np.int16 and result.rejected.dtype == np.uint16
    assert result.weight.dtype == np.float32 and result.mask.dtype == bool
    assert result.coverage.max() == 9 and result.weight.max() == pytest.approx(9.0, rel=1e-5)
    assert np.array_equal(result.mask, result.coverage == 0)
    out = result.write(tmp_path / "stack.fits")
    with fits.open(out) as hdul:
        assert [hdu.name for hdu in hdul] == ["PRIMARY", "UNCERT", "COVERAGE", "WEIGHT", "REJECT", "MASK"]
        assert np.array_equal(hdul["COVERAGE"].data, result.coverage)
        assert np.array_equal(hdul["REJECT"].data, result.rejected)
        assert np.array_equal(hdul[0].data, result.data, equal_nan=True)
        assert hdul[0].header["NCOMBINE"] == 9
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("count", [4, 3])
def test_a_satellite_trail_is_rejected_with_few_frames(tmp_path, count):
    stars = catalogue(SHAPE, 25, seed=21)
    matrices = [np.eye(3), shift(2.4, -1.3), shift(-1.7, 3.1), rotation(180.0, SHAPE, 0.5, 0.25)][:count]
    paths = _frames(tmp_path, stars, matrices, trail=(1, 3000.0), seed=7 * count)
    result = stack(paths, matrices)
    # the trail in the reference grid: the frame's line moved by its shift (2.4, -1.3)
    gy, gx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    distance = ((gy + 1.3) - 0.8 * (gx - 2.4) - 20.0) / math.sqrt(1 + 0.8**2)
    every = (result.coverage + result.rejected) == count  # with fewer than 3 values nothing is rejected
    near = (np.abs(distance) < 3) & star_free(SHAPE, stars, 12) & every
    core = (np.abs(distance) < 1) & near
    assert near.sum() > 200
    background = result.backgrounds[0]
    excess = (result.data[near] - background) / result.uncertainty[near]
    # pure noise reaches 4-5σ somewhere among a few thousand pixels: the trail leaves no more
    # than that, and its faint wings (below 3σ in their frame, so kept) bias the mean < 0.5σ
    assert np.max(np.abs(excess)) < 5.5 and np.percentile(np.abs(excess), 99) < 3.5
    assert abs(np.mean(excess)) < 0.5 and abs(np.mean((result.data[core] - background)
                                                        / result.uncertainty[core])) < 0.5
    # the REJECT plane shows it: the trail's core values were rejected, and they came from frame 1
    assert np.mean(result.rejected[core] >= 1) > 0.95
    assert result.frame_rejected[1, 1] >= core.sum()
    # without rejection the trail is there
    plain = stack(paths, matrices, reject="none")
    assert np.max((plain.data[core] - background) / plain.uncertainty[core]) > 20


def test_background_and_transparency_are_matched(tmp_path):
    stars = catalogue(SHAPE, 40, seed=31, flux=(1e4, 6e4))
    matrices = [np.eye(3), shift(1.5, -2.25), shift(-3.3, 0.7), rotation(180.0, SHAPE, -0.5, 0.5),
                shift(0.25, 4.0)]
    skies = [1000.0, 1500.0, 1000.0, 1500.0, 1200.0]
    transparencies = [1.0, 0.7, 0.7, 1.0, 0.85]
    paths = _frames(tmp_path, stars, matrices, skies=skies, transparencies=transparencies, seed=300)
    result = stack(paths, matrices)
    assert result.scales == pytest.approx(1.0 / np.array(transparencies), rel=0.02)
    assert result.zeros + result.scales * result.backgrounds == pytest.approx(result.backgrounds[0], abs=1e-6)
    # the background is flat: the same level everywhere, that of the reference
    free = star_free(SHAPE, stars) & (result.coverage == 5)
    halves = [result.data[:128][free[:128]], result.data[128:][free[128:]],
              result.data[:, :128][free[:, :128]], result.data[:, 128:][free[:, 128:]]]
    levels = [float(np.median(h)) for h in halves]
    assert max(levels) - min(levels) < 1.0 and np.median(levels) == pytest.approx(1000.0, abs=1.5)
    # stars have the reference's flux
    reference, _ = observe(SHAPE, stars, np.eye(3), noise=False)
    inside = [(x, y, f) for x, y, f in stars
              if 12 < x < SHAPE[1] - 12 and 12 < y < SHAPE[0] - 12 and result.coverage[int(y), int(x)] == 5]
    ratios = np.array([_flux(result.data, x, y) / _flux(reference, x, y) for x, y, _ in inside])
    bright = np.array([f > 3e4 for _, _, f in inside])  # aperture noise < 0.7 %; 1e4: ~1.5 %
    assert len(ratios) > 20 and bright.sum() > 5
    assert np.median(ratios) == pytest.approx(1.0, abs=0.01)
    assert np.all(np.abs(ratios[bright] - 1.0) < 0.02)
    # scales from the caller (matched stars) are used as given
    given = stack(paths, matrices, scales=1.0 / np.array(transparencies), reject="none")
    assert np.array_equal(given.scales, 1.0 / np.array(transparencies))
    assert given.header["SCAL002"] == pytest.approx(1 / 0.7)


def test_frames_without_uncertainty_use_a_noise_model(tmp_path):
    stars = catalogue(SHAPE, 25, seed=41)
    matrices = [np.eye(3), shift(1.2, 0.6), shift(-2.5, 1.5)]
    paths = []
    for i, matrix in enumerate(matrices):
        data, _ = observe(SHAPE, stars, matrix, seed=500 + i)
        if i == 2:
            data, _ = _add_trail(data, np.ones_like(data), 3000.0)
        paths.append(write_light(tmp_path / f"bare{i}.fits", data, None))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CcdcalWarning)      # the normal case for other tools' lights:
        result = stack(paths, matrices)                     # said once as a note, not a warning
    assert any("3 frame(s) without an UNCERT plane" in n for n in result.notes)
    free = star_free(SHAPE, stars) & (result.coverage == 3)
    assert robust_sigma(result.data[free]) == pytest.approx(float(np.median(result.uncertainty[free])), rel=0.1)
    assert result.frame_rejected[2, 1] > 200
    with pytest.raises(InputError, match="UNCERT"):
        stack(paths, matrices, reject="noise")


def test_bad_arguments_are_input_errors(tmp_path):
    paths = _frames(tmp_path, catalogue((64, 64), 3, seed=1, margin=10), [np.eye(3)] * 2, shape=(64, 64))
    with pytest.raises(InputError, match="transforms"):
        stack(paths, [np.eye(3)])
    with pytest.raises(InputError, match="reject"):
        stack(paths, [np.eye(3)] * 2, reject="sigma")
    with pytest.raises(InputError, match="reference"):
        stack(paths, [np.eye(3)] * 2, reference=2)
    with pytest.raises(InputError, match="scales"):
        stack(paths, [np.eye(3)] * 2, scales=[1.0])
    with pytest.warns(CcdcalWarning, match="at least 3"):
        stack(paths, [np.eye(3)] * 2, scale=False)
    with pytest.warns(CcdcalWarning, match="too few bright bins"):  # 3 faint stars
        stack(paths, [np.eye(3)] * 2, reject="none")


def test_a_small_budget_gives_the_same_stack_within_its_memory(tmp_path):
    shape = (1024, 1024)
    stars = catalogue(shape, 150, seed=51)
    matrices = [np.eye(3), rotation(45.0, shape, 3.3, -2.1), rotation(30.0, shape, -1.7, 0.4),
                rotation(-20.0, shape, 0.5, 0.5)]
    paths = _frames(tmp_path, stars, matrices, seed=600, shape=shape)
    large = stack(paths, matrices, memory="1GiB")
    budget = 32 * 2**20
    tracemalloc.start()
    try:
        small = stack(paths, matrices, memory=budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * budget
    for plane in ("data", "uncertainty", "coverage", "weight", "rejected", "mask"):
        assert np.array_equal(getattr(small, plane), getattr(large, plane), equal_nan=True), plane
    assert np.array_equal(small.scales, large.scales)
    # the rotated frames' corners leave holes the others fill: coverage varies, nothing is lost
    assert small.coverage.max() == 4 and small.coverage[512, 512] == 4


@pytest.mark.parametrize("budget", ["whole", "two bands", "tight"])
def test_frames_resampled_one_per_thread_stack_as_one_thread_does(tmp_path, monkeypatch, budget):
    """Files are resampled a frame per thread (reading and decoding in parallel too) when the
    budget gives as few bands so; the stack is the one a single thread makes, value for value,
    whole (one band) and in bands. A budget that one reader's rows fit in fewer bands keeps one
    reader; frames in memory (no file of their own) share the threads by rows."""
    from ccdcal.stacking import engine
    from ccdcal.stacking import resample as rs

    shape = (200, 230)
    stars = catalogue(shape, 40, seed=61)
    matrices = [np.eye(3), rotation(0.4, shape, 2.3, -1.1), shift(-3.6, 1.2), rotation(179.0, shape, 0.7, 0.2),
                rotation(-0.8, shape, 1.5, 2.5)]
    paths = _frames(tmp_path, stars, matrices, seed=700, shape=shape)
    sources = [rs.ResampledRows(p, m, shape) for p, m in zip(paths, matrices, strict=True)]

    def bands(memory, readers):
        plan = engine._plan(sources, shape, memory, readers)
        return None if plan is None else -(-shape[0] // plan.rows)

    sizes = range(2**20, 16 * 2**20, 2**15)
    memory = {"whole": 2**30,
              "two bands": next(m for m in sizes if bands(m, 3) == bands(m, 1) == 2),
              "tight": next(m for m in sizes if bands(m, 1) is not None and bands(m, 3) != bands(m, 1))}[budget]
    readers = 1 if budget == "tight" else 3
    used = []
    real = engine._resample_together

    def spy(works, y0, y1):
        used.append(len(works[0].buffers))
        return real(works, y0, y1)

    monkeypatch.setattr(engine, "_resample_together", spy)
    results = {}
    for workers in (1, 3):
        monkeypatch.setattr(rs, "default_workers", lambda workers=workers: workers)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CcdcalWarning)        # the budget is enough: no warning
            results[workers] = stack(paths, matrices, memory=memory)
        assert set(used) == {min(workers, readers)}
        assert len(used) == (1 if budget == "whole" else bands(memory, 1))
        used.clear()
    arrays = [fits.getdata(p).astype(np.float32) for p in paths]
    results["memory"] = stack(arrays, matrices, memory=memory, reject="none")
    assert set(used) == {1}                               # arrays: no file of their own
    one, three = results[1], results[3]
    for plane in ("data", "uncertainty", "coverage", "weight", "rejected", "mask"):
        assert np.array_equal(getattr(one, plane), getattr(three, plane), equal_nan=True), plane
    assert np.array_equal(one.scales, three.scales) and np.array_equal(one.zeros, three.zeros)
    assert one.coverage.max() == 5


@pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning")
def test_ccddata_frames_stack_like_their_files(tmp_path):
    from astropy.nddata import CCDData

    stars = catalogue((96, 128), 8, seed=61)
    matrices = [np.eye(3), shift(1.5, -0.5), shift(-0.75, 2.25)]
    paths = _frames(tmp_path, stars, matrices, seed=700, shape=(96, 128))
    frames = [CCDData.read(p, unit="adu") for p in paths]
    from_files = stack(paths, matrices, memory="8MiB")
    from_memory = stack(frames, matrices)
    assert np.array_equal(from_files.data, from_memory.data, equal_nan=True)
    assert np.array_equal(from_files.uncertainty, from_memory.uncertainty, equal_nan=True)
    assert from_memory.header["EXPTIME"] == 180.0


def test_the_reference_wcs_is_kept(tmp_path):
    from astropy.wcs import WCS

    shape = (64, 80)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [40.5, 32.5]
    wcs.wcs.cdelt = [-2e-4, 2e-4]
    stars = catalogue(shape, 4, seed=71, margin=10)
    paths = []
    for i, matrix in enumerate([shift(1.0, 0.0), np.eye(3), shift(0.0, -1.0)]):
        data, sigma = observe(shape, stars, matrix, seed=800 + i)
        header = wcs.to_header() if i == 1 else None
        paths.append(write_light(tmp_path / f"w{i}.fits", data, sigma, header=header))
    result = stack(paths, [shift(1.0, 0.0), np.eye(3), shift(0.0, -1.0)], reference=1, scale=False)
    h = result.header
    assert h["CTYPE1"] == "RA---TAN" and h["CRVAL1"] == 150.0 and h["CRPIX2"] == 32.5
    assert h["STACKREF"] == "w1.fits" and result.data.shape == shape


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 12, 13, 16])
def test_the_sorting_network_sorts_every_zero_one_input(n):
    """Batcher's network of n places sorts all 2^n inputs of zeros and ones, so it sorts any n
    values (the 0-1 principle); random values with ties too, up to 32."""
    from ccdcal.stacking.engine import sorting_network

    def apply(values, pairs):       # rows of values, each through the network
        work = np.array(values, dtype=np.float64, ndmin=2)
        for i, j in pairs:
            work[:, i], work[:, j] = np.minimum(work[:, i], work[:, j]), np.maximum(work[:, i], work[:, j])
        return work

    pairs = sorting_network(n)
    assert np.all(pairs[:, 0] < pairs[:, 1]) and (n > 1 or pairs.size == 0)
    bits = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
    assert np.all(np.diff(apply(bits, pairs), axis=1) >= 0)
    rng = np.random.default_rng(n)
    for size in (n, 2 * n, 32):
        values = rng.integers(0, 5, (50, size)).astype(float)
        assert np.array_equal(apply(values, sorting_network(size)), np.sort(values, axis=1))


@pytest.mark.parametrize("n", [3, 12, 38])
def test_the_median_by_network_rejects_what_sorting_every_pixel_does(n):
    """A pixel's values are sorted only where clipping takes one (its median from the sorting
    network, run across a tile of pixels, otherwise): the same coverage, rejections per pixel
    and per frame as sorting every pixel, and the same means but for the order of the sums, on
    values with outliers, holes, ties, σ of their own, a level and signal tolerance, from 0 to
    n values a pixel (38: more than ranks sort, a merge sort)."""
    from ccdcal.stacking import _kernels

    rng = np.random.default_rng(7 + n)
    rows, nx = 40, 150
    data = (1000 + 30 * rng.standard_normal((n, rows, nx))).astype(np.float32)
    data[:, :, :20] = np.round(data[:, :, :20] / 50) * 50            # ties
    data[rng.random(data.shape) < 0.01] += 4000                    # cosmic rays
    data[rng.random(data.shape) < 0.01] -= 800                     # cold values
    data[:, 10:12, 30:60] += 20000                                  # a star
    bad = rng.random(data.shape) < np.linspace(0, 1 - 2 / n, nx)     # from no hole to all values but ~2 a pixel
    err = (30 * rng.uniform(0.8, 1.2, data.shape)).astype(np.float32)
    scales, zeros = rng.uniform(0.9, 1.1, n), rng.uniform(-20, 20, n)
    weights = rng.uniform(0.5, 1.5, n)
    params = np.array([3.0, 3.0, 0.05, 1000.0, 1.0])
    out = {}
    for name, network in (("network", _kernels.sorting_network(n)), ("sorted", np.empty((0, 2), np.int64))):
        planes = (np.empty((rows, nx), np.float32), np.empty((rows, nx), np.float32), np.empty((rows, nx), np.int16),
                  np.empty((rows, nx), np.float32), np.empty((rows, nx), np.uint16))
        member = np.zeros((n, 2), np.int64)
        _kernels.stack_rows(data, bad, err, scales, zeros, weights, params, network, 0, rows, *planes, member)
        out[name] = (*planes, member)
    a, b = out["network"], out["sorted"]
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[4], b[4]) and np.array_equal(a[5], b[5])
    assert a[4].sum() > 0.01 * rows * nx and (a[2] < 3).any()     # it rejected, and some pixels had few values
    assert (a[4] == 0).mean() > 0.05                                # and many pixels took the network's path
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12, atol=1e-3, equal_nan=True)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(a[3], b[3], rtol=1e-6)


def test_rejection_costs_little_signal_to_noise_and_takes_every_cosmic_ray(tmp_path):
    """12 frames of Gaussian noise with their exact σ: the stack's error against the truth is within
    1 % of the plain mean's (3σ clipping about the median costs 1.9 %: a pixel loses a good value
    when its others lie to the other side); with cosmic rays of 15-60σ in 0.5 % of the values,
    every one is rejected and the error is that of the clean mean."""
    shape, n, sky, sigma = (256, 256), 12, 1000.0, 10.0
    rng = np.random.default_rng(21)
    clean = (sky + sigma * rng.standard_normal((n, *shape))).astype(np.float32)
    hits = rng.random(clean.shape) < 0.005
    dirty = clean + hits * rng.uniform(15 * sigma, 60 * sigma, clean.shape).astype(np.float32)
    plain = np.sqrt(np.mean((clean.astype(np.float64).mean(axis=0) - sky) ** 2))
    errors = {}
    for name, frames in (("clean", clean), ("dirty", dirty)):
        paths = [write_light(tmp_path / f"{name}{i:02d}.fits", frames[i], np.full(shape, sigma, np.float32),
                             exptime=60.0, mjd=60000.0 + i / 1000) for i in range(n)]
        result = stack(paths, [np.eye(3)] * n, zero=False, scale=False, weights="none")
        errors[name] = np.sqrt(np.mean((result.data.astype(np.float64) - sky) ** 2))
        if name == "dirty":         # every hit pixel lost at least its hits
            assert np.all(result.rejected >= hits.sum(axis=0))
    assert errors["clean"] <= 1.01 * plain
    assert errors["dirty"] <= 1.01 * plain


def test_the_stack_s_warnings_point_at_its_caller(tmp_path):
    """Two frames (no rejection), a budget below one band and frames without bright bins warn
    from the caller's line, for stack and stack_colours alike."""
    from ccdcal.stacking.engine import stack_colours

    rng = np.random.default_rng(3)
    frames = [rng.normal(100, 5, (40, 50)).astype(np.float32) for _ in range(2)]
    for call in (lambda: stack(frames, [np.eye(3)] * 2, memory=1024),
                 lambda: stack_colours([frames], [np.eye(3)] * 2, memory=1024)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        said = [w for w in caught if issubclass(w.category, CcdcalWarning)]
        assert len(said) == 3 and {w.filename for w in said} == {__file__}, [(w.filename, str(w.message)) for w in said]
