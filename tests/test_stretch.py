"""Stretches follow their closed-form definitions: monotone, 0 -> 0, 1 -> 1, background on target."""

from __future__ import annotations

import io
import math
import statistics

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats
from hypothesis import given
from hypothesis import strategies as st

from ccdcal import stretch as S

unit = st.floats(min_value=1e-4, max_value=1 - 1e-4)


def _closed_mtf(m, x):
    return (m - 1) * x / ((2 * m - 1) * x - m)


@pytest.fixture
def sky() -> np.ndarray:
    """A small sky: background 1000 ADU, noise 7, a galaxy-like blob and hot pixels."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:200, 0:240]
    blob = 3000.0 * np.exp(-(((x - 120) / 15.0) ** 2 + ((y - 100) / 9.0) ** 2))
    data = rng.normal(1000.0, 7.0, (200, 240)) + blob
    data[[5, 50, 150], [7, 70, 170]] = 60000.0
    return data.astype(np.float32)


# -- the curves ------------------------------------------------------------------------------------
@given(m=unit, x=st.floats(min_value=0, max_value=1))
def test_mtf_equals_closed_form(m, x):
    expected = 0.0 if x == 0 else _closed_mtf(m, x)
    assert float(S.mtf(m, x)) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(m=unit)
def test_mtf_fixes_ends_and_maps_m_to_half(m):
    assert float(S.mtf(m, 0.0)) == 0.0
    assert float(S.mtf(m, 1.0)) == pytest.approx(1.0, abs=1e-12)
    assert float(S.mtf(m, m)) == pytest.approx(0.5, abs=1e-9)


@given(m=unit)
def test_mtf_is_monotone(m):
    y = S.mtf(m, np.linspace(0, 1, 1001))
    assert np.all(np.diff(y) >= -1e-15)


@given(background=unit, target=unit)
def test_midtones_balance_puts_background_on_target(background, target):
    m = S.midtones_balance(background, target)
    assert 0 < m < 1
    # derived balance: m = (t - 1) b / ((2t - 1) b - t), i.e. MTF with its arguments swapped
    assert m == pytest.approx(_closed_mtf(target, background), rel=1e-12)
    # the round trip loses digits where the background is within 1e-4 of 1 (cancellation in
    # (2m - 1) b - m): 1e-7 relative still catches any wrong formula
    assert float(S.mtf(m, background)) == pytest.approx(target, rel=1e-7, abs=1e-12)


def test_midtones_balance_is_identity_when_background_is_at_an_end():
    assert S.midtones_balance(0.0) == 0.5 and S.midtones_balance(1.0) == 0.5


def test_rnc_scurve_equals_normalised_closed_form():
    x = np.linspace(0, 1, 501)

    def f(v):
        return 5 / (1 + np.exp(-5 * (v - 0.42))) - 0.58

    expected = (f(x) - f(0)) / (f(1) - f(0))
    y = S.rnc_scurve(x)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-15)
    assert y[0] == 0.0 and y[-1] == pytest.approx(1.0, abs=1e-15)
    assert np.all(np.diff(y) > 0)
    assert S.rnc_scurve(0.1) < 0.1 and S.rnc_scurve(0.6) > 0.6  # an S: darker shadows, brighter mids


# -- image stretches -----------------------------------------------------------------------------
def _is_monotone(data, stretched):
    order = np.argsort(data, axis=None, kind="stable")
    return np.all(np.diff(stretched.ravel()[order]) >= -1e-12)


def test_midtone_stretch_reproduces_the_notebook_steps(sky):
    y = S.midtone_stretch(sky, low_clip=2.8, bg=0.25)
    d = sky.astype(np.float64)
    x = (d - d.min()) / (d.max() - d.min())
    mean, median, std = sigma_clipped_stats(x, sigma=3.0, maxiters=5)
    c0 = mean - 2.8 * std
    xp = np.clip((x - c0) / (1 - c0), 0, 1)
    b = (median - c0) / (1 - c0)
    m = b * (0.25 - 1) / (2 * b * 0.25 - 0.25 - b)
    np.testing.assert_allclose(y, _closed_mtf(m, xp), rtol=1e-9, atol=1e-12)
    assert float(S.mtf(m, b)) == pytest.approx(0.25, abs=1e-12)  # background on target
    assert y.min() == 0.0 and y.max() == pytest.approx(1.0)
    assert _is_monotone(sky, y)


def test_auto_stf_puts_the_median_on_target(sky):
    y = S.auto_stf(sky, shadows=2.8, target=0.25)
    assert np.median(y) == pytest.approx(0.25, abs=1e-6)
    d = sky.astype(np.float64)
    x = (d - d.min()) / (d.max() - d.min())
    med = np.median(x)
    c0 = med - 2.8 * 1.4826 * np.median(np.abs(x - med))
    np.testing.assert_allclose(y, S.mtf(S.midtones_balance((med - c0) / (1 - c0)),
                                        np.clip((x - c0) / (1 - c0), 0, 1)), atol=1e-6)
    assert _is_monotone(sky, y) and y.min() == 0.0 and y.max() == pytest.approx(1.0)


def _plain_auto_stf(data: np.ndarray) -> np.ndarray:
    """The auto-STF in plain numpy: min..max of the finite values, infinities clipped to them,
    median and MAD of the non-NaN values (the order of the steps as the definition gives it)."""
    d = data.astype(np.float64)
    finite = d[np.isfinite(d)]
    x = np.clip((d - finite.min()) / (finite.max() - finite.min()), 0, 1)
    kept = x[~np.isnan(x)]
    med = np.median(kept)
    mad_to_std = 1.0 / statistics.NormalDist().inv_cdf(0.75)       # 1.4826…
    c0 = max(med - 2.8 * mad_to_std * np.median(np.abs(kept - med)), 0.0)
    b = (med - c0) / (1 - c0)
    m = b * (0.25 - 1) / (2 * b * 0.25 - 0.25 - b)
    return _closed_mtf(m, np.clip((x - c0) / (1 - c0), 0, 1))


@pytest.mark.parametrize("shape", [(200, 240), (199, 241)])       # even and odd counts
@pytest.mark.parametrize("dtype", ["<f4", ">f4", "<f8", "<i4"])
def test_auto_stf_equals_a_plain_numpy_stretch_with_nan_and_infinities(sky, shape, dtype):
    data = np.resize(sky, shape).astype(np.float64)
    if dtype[1] == "f":
        data[3, 4] = np.nan
        data[7, :9] = np.inf
        data[9, :5] = -np.inf
    data = data.astype(dtype)
    y = S.auto_stf(data)
    expected = _plain_auto_stf(data)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(data.astype(np.float64)))
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    if dtype[1] == "f":
        assert np.allclose(y[7, :9], 1.0, atol=1e-12) and (y[9, :5] == 0.0).all()    # a display clips them


def test_to_uint8_rounds_half_to_even_as_numpy_and_clips():
    y = np.concatenate([np.arange(256) / 255.0, (np.arange(255) + 0.5) / 255.0,
                        [-0.3, 1.7, np.nan, np.inf, -np.inf]])
    expected = np.round(np.nan_to_num(np.clip(y, 0, 1), nan=0.0) * 255.0).astype(np.uint8)
    np.testing.assert_array_equal(S.to_uint8(y), expected)
    np.testing.assert_array_equal(S.to_uint8(y.reshape(-1, 1)[::-1]), expected.reshape(-1, 1)[::-1])


@pytest.mark.parametrize("target", [0.1, 0.25, 0.4])
def test_auto_stf_honours_other_targets(sky, target):
    assert np.median(S.auto_stf(sky, target=target)) == pytest.approx(target, abs=1e-6)


def test_mtf_rnc_is_the_s_curve_twice_after_the_midtone_stretch(sky):
    expected = S.rnc_scurve(S.rnc_scurve(S.midtone_stretch(sky)))
    np.testing.assert_array_equal(S.stretch(sky, "mtf-rnc"), expected)


def test_linear_uses_astropy_zscale_limits(sky):
    from astropy.visualization import ZScaleInterval

    lo, hi = ZScaleInterval().get_limits(sky.astype(np.float64).ravel())
    assert S.zscale_limits(sky) == pytest.approx((lo, hi))
    y = S.linear_stretch(sky)
    np.testing.assert_allclose(y, np.clip((sky - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert 900 < lo < 1000 < hi < 1100


def test_asinh_equals_closed_form():
    data = np.linspace(-10.0, 110.0, 121).reshape(11, 11)
    y = S.asinh_stretch(data, softening=0.05, limits=(0.0, 100.0))
    x = np.clip(data / 100.0, 0, 1)
    np.testing.assert_allclose(y, np.arcsinh(x / 0.05) / math.asinh(1 / 0.05), rtol=1e-12)
    assert y.min() == 0.0 and y.max() == pytest.approx(1.0)
    assert _is_monotone(data, y)


@pytest.mark.parametrize("method", S.METHODS)
def test_every_method_maps_into_unit_interval_and_keeps_nan(sky, method):
    data = sky.copy()
    data[0, 0] = np.nan
    y = S.stretch(data, method)
    assert y.shape == data.shape and np.isnan(y[0, 0])
    finite = y[np.isfinite(y)]
    assert finite.min() >= 0.0 and finite.max() <= 1.0


@pytest.mark.parametrize("method", S.METHODS)
def test_constant_image_does_not_crash(method):
    y = S.stretch(np.full((8, 8), 5.0), method)
    assert np.all((y >= 0) & (y <= 1))


def test_unknown_method_is_rejected(sky):
    with pytest.raises(ValueError, match="unknown stretch"):
        S.stretch(sky, "gamma")


# -- display helpers -----------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "mode", "top"), [(8, "L", 255), (16, "I;16", 65535)])
def test_png_roundtrip(bits, mode, top):
    from PIL import Image

    y = np.linspace(0, 1, 12).reshape(3, 4)
    png = S.png_bytes(y, bits=bits, flip=False)
    image = Image.open(io.BytesIO(png))
    assert image.mode == mode and image.size == (4, 3)
    pixels = np.asarray(image)
    assert pixels[0, 0] == 0 and pixels[-1, -1] == top
    flipped = np.asarray(Image.open(io.BytesIO(S.png_bytes(y, bits=bits))))
    np.testing.assert_array_equal(flipped, pixels[::-1])


@pytest.mark.parametrize(("shape", "bits", "mode"), [((37, 53), 8, "L"), ((37, 53), 16, "I;16"),
                                                    ((3, 37, 53), 8, "RGB")])
@pytest.mark.parametrize("flip", [False, True])
def test_a_stored_png_decodes_to_the_pixels_pillow_writes(shape, bits, mode, flip):
    # compress_level 0 writes the PNG itself (rows unfiltered, zlib stored): Pillow reads it back
    # as the same pixels as its own compressed PNG of the same image
    from PIL import Image

    y = np.random.default_rng(3).random(shape)
    stored = Image.open(io.BytesIO(S.png_bytes(y, bits=bits, flip=flip, compress_level=0)))
    packed = Image.open(io.BytesIO(S.png_bytes(y, bits=bits, flip=flip, compress_level=6)))
    assert stored.mode == packed.mode == mode and stored.size == (shape[-1], shape[-2])
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(packed))
    expected = S.to_uint8(y) if bits == 8 else S.to_uint16(y)
    expected = np.moveaxis(expected, 0, -1) if len(shape) == 3 else expected
    np.testing.assert_array_equal(np.asarray(stored), expected[::-1] if flip else expected)


@pytest.mark.parametrize(("shape", "bits"), [((300, 701), 8), ((300, 701), 16), ((3, 300, 701), 8)])
@pytest.mark.parametrize("level", [1, 6, 9])
def test_a_large_png_deflated_in_parts_decodes_to_the_pixels(monkeypatch, shape, bits, level):
    # large images are deflated in parts at once (one zlib stream, sync-flushed parts): Pillow and
    # zlib itself read them back as the pixels, whatever the level, the depth and the part size
    import zlib

    from PIL import Image

    monkeypatch.setattr(S, "_PARALLEL_PNG_BYTES", 1000)
    monkeypatch.setattr(S, "_DEFLATE_PART", 50_000 + 17)     # parts end mid-row
    monkeypatch.setattr(S, "cpus", lambda: 2)
    y = np.random.default_rng(4).random(shape)
    y[..., :100, :] = 0.25                                      # runs that deflate far
    png = S.png_bytes(y, bits=bits, compress_level=level)
    expected = S.display_pixels(y, bits=bits)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), expected)
    start = png.index(b"IDAT") + 4
    size = int.from_bytes(png[start - 8:start - 4], "big")
    rows = zlib.decompress(png[start:start + size])            # checks the Adler-32 too
    assert len(rows) == expected.shape[0] * (1 + expected[0].nbytes)
    assert size < 0.9 * len(rows)                                 # it did deflate


def test_downsample_block_averages_and_ignores_nan():
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    data[0, 0] = np.nan
    small = S.downsample(data, 2)
    np.testing.assert_allclose(small, [[(1 + 4 + 5) / 3, 4.5], [10.5, 12.5]])
    assert S.downsample(np.zeros((1001, 333)), 200).shape == (167, 56)
    assert S.downsample(data, 10) is not None and S.downsample(data, 10).shape == (4, 4)


# -- command line ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "mode"), [([], "L"), (["--bits", "16", "--method", "asinh"], "I;16"),
                                            (["--method", "mtf-rnc"], "L"), (["--method", "linear"], "L")])
def test_cli_stretch_writes_png(tmp_path, sky, args, mode):
    from PIL import Image

    from ccdcal.cli import main
    from ccdcal.io.writer import write_fits

    src = write_fits(tmp_path / "sky.fits", sky)
    out = tmp_path / "png" / "sky.png"
    assert main(["stretch", str(src), "-o", str(out), *args]) == 0
    with Image.open(out) as image:
        assert image.mode == mode and image.size == (240, 200)


def test_cli_stretch_fits_keeps_the_stretched_image(tmp_path, sky, capsys):
    from astropy.io import fits

    from ccdcal.cli import main
    from ccdcal.io.writer import write_fits

    src = write_fits(tmp_path / "sky.fits", sky)
    assert main(["stretch", str(src), "-o", str(tmp_path / "view.png"), "--method", "mtf", "--fits"]) == 0
    kept = fits.getdata(tmp_path / "view.fits")
    np.testing.assert_allclose(kept, S.midtone_stretch(sky), atol=1e-6)
    # never over the input
    assert main(["stretch", str(src), "-o", str(tmp_path / "sky.png"), "--fits"]) == 2
    assert "is the input" in capsys.readouterr().err
    np.testing.assert_array_equal(fits.getdata(src), sky)


def test_cli_stretch_rejects_bad_target(tmp_path, sky, capsys):
    from ccdcal.cli import main
    from ccdcal.io.writer import write_fits

    src = write_fits(tmp_path / "sky.fits", sky)
    assert main(["stretch", str(src), "-o", str(tmp_path / "x.png"), "--target", "1.5"]) == 2
    assert "--target" in capsys.readouterr().err


def test_a_colour_image_is_stretched_unlinked_by_default_and_linked_on_request(tmp_path):
    """Unlinked: each colour's background lands on the target (a neutral background); linked:
    one transfer for every colour (equal values stay equal, a red background stays below a
    blue one), as PixInsight's STF link button does. Also through `ccdcal stretch --linked`."""
    from astropy.io import fits

    from ccdcal.cli import main
    from ccdcal.stretch import stretch

    rng = np.random.default_rng(9)
    red = rng.normal(100.0, 5.0, (64, 64))
    rgb = np.stack([red, rng.normal(200.0, 5.0, (64, 64)), red.copy()])
    rgb[2] += 200.0                                   # blue: the red background raised by 200
    rgb[:, 30:34, 30:34] += 5000.0                    # a star
    unlinked = stretch(rgb, "autostf")
    assert np.allclose(np.median(unlinked, axis=(1, 2)), 0.25, atol=0.01)
    linked = stretch(rgb, "autostf", linked=True)
    assert np.median(linked[0]) < np.median(linked[1]) < np.median(linked[2])
    same = stretch(np.stack([red, red, red]), "autostf", linked=True)
    assert np.array_equal(same[0], same[1]) and np.array_equal(same[1], same[2])
    fits.PrimaryHDU(rgb.astype(np.float32)).writeto(tmp_path / "rgb.fits")
    assert main(["stretch", str(tmp_path / "rgb.fits"), "-o", str(tmp_path / "a.png"), "--linked"]) == 0
    assert main(["stretch", str(tmp_path / "rgb.fits"), "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_png_text_chunk_round_trip_and_damage():
    """A text chunk added to a PNG is read back (by Pillow too); a file cut short, a damaged
    chunk or a missing key is a ValueError, never a wrong text."""
    import io

    from PIL import Image

    from ccdcal.stretch import png_bytes, png_text, png_with_text

    for level in (0, 1):
        png = png_with_text(png_bytes(np.linspace(0, 1, 60).reshape(6, 10), compress_level=level), "k",
                            '{"a": [1, 2.5, NaN], "b": "x y"}')
        assert png_text(png, "k") == '{"a": [1, 2.5, NaN], "b": "x y"}'
        with Image.open(io.BytesIO(png)) as image:
            assert image.text == {"k": '{"a": [1, 2.5, NaN], "b": "x y"}'} and image.size == (10, 6)
        with pytest.raises(ValueError, match="no text"):
            png_text(png, "other")
        for cut in (len(png) - 20, 40, 8):
            with pytest.raises(ValueError):
                png_text(png[:cut], "k")
        at = png.index(b"tEXt") + 6                        # a byte of the text changed
        with pytest.raises(ValueError, match="damaged"):
            png_text(png[:at] + bytes([png[at] ^ 1]) + png[at + 1:], "k")
    with pytest.raises(ValueError):
        png_text(b"GIF89a", "k")
