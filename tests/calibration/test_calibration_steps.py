"""The calibration and master steps are numpy's expressions bit for bit (from the whole-night suite
of issue 12)."""

from __future__ import annotations

import numpy as np


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


def _numpy_calibration(raw, bias, dark, scale, flat, flat_floor, gain, read_noise, bias_u, dark_u, flat_u):
    """The documented sequence in plain numpy float32, step by step: (raw − B − k·D) / F with F the
    flat floored to 1 below ``flat_floor``, and σ by :func:`_sigma_formula` of the signal above bias
    (without a bias: above the dark's median, the black level a frame keeps without one)."""
    f32 = np.float32
    data = raw.copy()
    if bias is not None:
        data = data - bias
    signal = data.copy()
    if bias is None and dark is not None:
        signal = (signal - f32(np.nanmedian(dark.astype(np.float64)))).astype(f32)
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


def test_the_masters_mask_union_is_made_once_per_set_of_masters(monkeypatch):
    """Every light of a night ORs the same mask bits from its masters; they are made once per
    set of master objects and shared, also by threads asking at the same moment (one makes,
    the others wait); another master object gets its own; the bits are those made directly."""
    import importlib
    import threading
    import time

    from ccdcal.calibration.arithmetic import Master, _add_master_masks, _master_masks

    calibrate = importlib.import_module("ccdcal.calibration.arithmetic")
    calibrate._DERIVED.clear()
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
