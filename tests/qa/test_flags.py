"""Bad-frame detection: injected bad frames are caught with a reason; clean groups stay clean."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.qa.stats import flag_outliers, frame_metrics

SHAPE = (256, 256)


def _bias(rng, level=1000.0, noise=7.0):
    return rng.normal(level, noise, SHAPE).astype(np.float32)


def _dark(rng, level=1015.0, noise=9.0):
    frame = rng.normal(level, noise, SHAPE).astype(np.float32)
    hot = rng.integers(0, SHAPE[0] * SHAPE[1], 300)
    frame.flat[hot] = rng.uniform(5000, 60000, hot.size)  # hot pixels: normal for a dark
    return frame


def _vignetting():
    y, x = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    r2 = ((x - 128) ** 2 + (y - 128) ** 2) / 128.0**2
    return 1.0 - 0.15 * r2


def _flat(rng, level=30000.0, prnu=0.014, gain=2.0):
    electrons = level * _vignetting() * (1 + prnu * rng.standard_normal(SHAPE)) * gain
    return (rng.poisson(np.clip(electrons, 0, None)) / gain + 1000.0).astype(np.float32)


def _flags(frames, kind):
    return flag_outliers([frame_metrics(f) for f in frames], kind=kind)


@pytest.fixture
def rng():
    return np.random.default_rng(2024)


def test_clean_bias_group_is_not_flagged(rng):
    # A slow drift of the bias level, like the real Nickel biases (1015 -> 1009 ADU).
    frames = [_bias(rng, level=1015.0 - 0.7 * i) for i in range(10)]
    assert _flags(frames, "bias") == [[]] * 10


def test_clean_darks_with_hot_pixels_are_not_flagged(rng):
    assert _flags([_dark(rng) for _ in range(8)], "dark") == [[]] * 8


def test_twilight_flats_spanning_15k_to_45k_are_not_flagged(rng):
    frames = [_flat(rng, level) for level in np.linspace(15000, 45000, 7)]
    assert _flags(frames, "flat") == [[]] * 7


def test_flat_at_47k_among_flats_at_30k_is_flagged(rng):
    frames = [_flat(rng, 30000 + 150 * i) for i in range(6)] + [_flat(rng, 47000)]
    flags = _flags(frames, "flat")
    assert flags[:6] == [[]] * 6
    assert len(flags[6]) >= 1 and "level" in flags[6][0] and "robust z=+" in flags[6][0]


def test_bias_with_a_level_jump_is_flagged(rng):
    frames = [_bias(rng) for _ in range(8)] + [_bias(rng, level=1060.0)]
    flags = _flags(frames, "bias")
    assert flags[:8] == [[]] * 8
    assert any(r.startswith("level 1060 ADU vs group 1000") for r in flags[8])


def test_noisy_bias_is_flagged(rng):
    frames = [_bias(rng) for _ in range(6)] + [_bias(rng, noise=12.0)]
    flags = _flags(frames, "bias")
    assert flags[:6] == [[]] * 6
    assert any(r.startswith("noise") for r in flags[6])


def test_darks_with_pixels_at_zero_are_flagged(rng):
    frames = [_dark(rng) for _ in range(6)]
    frames[2][:3, :] = 0.0  # a readout dropout: three rows at 0 ADU
    frames[4].flat[:50] = 0.0
    flags = _flags(frames, "dark")
    assert flags[2] == ["1.2% of pixels at 0 ADU"]
    assert len(flags[4]) == 1 and "at 0 ADU" in flags[4][0]
    assert [flags[i] for i in (0, 1, 3, 5)] == [[]] * 4


def test_saturated_flat_is_flagged_even_alone(rng):
    frame = _flat(rng, 30000)
    frame[:40, :] = 65535.0
    flags = _flags([frame], "flat")
    assert flags == [["16% of pixels saturated (>= 65469 ADU)"]]


def test_bias_with_a_gradient_is_flagged(rng):
    frames = [_bias(rng) for _ in range(6)]
    frames[3] = frames[3] + np.linspace(0, 60, SHAPE[1], dtype=np.float32)[None, :]
    flags = _flags(frames, "bias")
    assert [flags[i] for i in (0, 1, 2, 4, 5)] == [[]] * 5
    assert any("gradient" in r for r in flags[3])


def test_flat_with_different_illumination_is_flagged(rng):
    frames = [_flat(rng, 30000) for _ in range(6)]
    frames[5] = frames[5] * np.linspace(0.8, 1.2, SHAPE[1], dtype=np.float32)[None, :]
    flags = _flags(frames, "flat")
    assert flags[:5] == [[]] * 5
    assert any("gradient" in r for r in flags[5])


def test_small_groups_get_only_absolute_checks(rng):
    frames = [_bias(rng), _bias(rng, level=1500.0)]
    assert _flags(frames, "bias") == [[], []]


def test_missing_metrics_are_skipped(rng):
    metrics = [frame_metrics(_bias(rng)) for _ in range(4)] + [None]
    assert flag_outliers(metrics, kind="bias") == [[]] * 5


# -- real data -----------------------------------------------------------------------------------
def _data_root() -> Path:
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    root = Path(os.environ.get("CCDCAL_TEST_DATA", default))
    if not root.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real test data not found at {root}; set CCDCAL_TEST_DATA")
        pytest.skip(f"real test data not found at {root}")
    return root


REAL_GROUPS = {
    "nickel-bias": ("nickel-lick/raw", [f"d{n}.fits" for n in range(1001, 1011)], "bias"),
    "nickel-skyflat-V": ("nickel-lick/raw", ["d1035.fits", "d1036.fits", "d1037.fits"], "flat"),
    "sbu-bias": ("sbu-stl1001e/raw", [f"biases-Neg5-Vis.{i:08d}.BIAS.FIT" for i in range(10)], "bias"),
    "sbu-dark-60s": ("sbu-stl1001e/raw",
                     [f"darks-expos1-Neg5-Vis.{i:08d}.DARK.FIT" for i in range(10)], "dark"),
    "sbu-flat": ("sbu-stl1001e/raw", [f"flat-expos23s-Neg5-Vis.{i:08d}.FIT" for i in range(10)], "flat"),
}


@pytest.mark.realdata
@pytest.mark.parametrize("group", sorted(REAL_GROUPS))
def test_real_calibration_groups_are_clean(group):
    from ccdcal.io.frames import FrameSource

    folder, names, kind = REAL_GROUPS[group]
    root = _data_root() / folder
    metrics = []
    for name in names:
        with FrameSource(root / name) as source:
            metrics.append(frame_metrics(source.read()))
    assert flag_outliers(metrics, kind=kind) == [[]] * len(names)


@pytest.mark.realdata
def test_real_bias_with_injected_offset_is_caught():
    from ccdcal.io.frames import FrameSource

    root = _data_root() / "nickel-lick/raw"
    metrics = []
    for n in range(1001, 1011):
        with FrameSource(root / f"d{n}.fits") as source:
            data = source.read()
        if n == 1005:
            data += 60.0
        metrics.append(frame_metrics(data))
    flags = flag_outliers(metrics, kind="bias")
    assert [i for i, f in enumerate(flags) if f] == [4]


def test_raw16_metrics_equal_the_decoded_frame_metrics(tmp_path):
    # the scan counts zeros, saturated pixels, min and max from a histogram of the stored
    # 16-bit integers and decodes its subsample from the stored bytes, instead of a decoded
    # copy; every number must equal the decoded path's
    import math

    from ccdcal.io.frames import FrameSource
    from ccdcal.planning.inventory import _raw16_metrics, scan
    from ccdcal.qa.stats import frame_metrics
    from ccdcal.sections import to_slices

    rng = np.random.default_rng(0)
    for case in range(12):
        ny, nx = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        if case in (3, 8):   # large enough for a subsample that skips rows and columns (step 2, 3)
            ny, nx = (611, 707) if case == 3 else (900, 1013)
        data = rng.integers(-2000, 3000, (ny, nx)).astype(np.int16)
        data[rng.random(data.shape) < 0.01] = 0
        data[rng.random(data.shape) < 0.01] = 32767
        cards = {"IMAGETYP": "BIAS", "EXPTIME": 0.0}
        if case % 3:
            cards.update({"BZERO": 32768.0, "BSCALE": 1.0} if case % 3 == 1 else {"BZERO": 100.0, "BSCALE": 2.5})
        if case % 4 == 0:
            cards["BLANK"] = -7
            data[rng.random(data.shape) < 0.02] = -7
        if case % 2:
            cards["TRIMSEC"] = f"[3:{nx - 2},2:{ny - 5}]"
        if case % 5 == 0:
            cards["SATURATE"] = float(rng.choice([0.0, 1000.0, 5e4]))
        path = tmp_path / f"f{case}.fits"
        fits.PrimaryHDU(data).writeto(path)
        with fits.open(path, mode="update", do_not_scale_image_data=True) as hdul:
            for key, value in cards.items():
                hdul[0].header[key] = value
        info = scan([path], flag=False).frames[0]
        with FrameSource(path) as src:
            assert src.raw16
            fast = _raw16_metrics(src, info, np.empty(src.shape, np.uint16))
            image = src.read()
            if info.trimsec:
                image = image[to_slices(info.trimsec, image.shape)]
            decoded = frame_metrics(image, saturation=info.saturate, adc_maximum=src.adc_maximum)
        assert fast.keys() == decoded.keys()
        for key, value in decoded.items():
            assert fast[key] == value or (math.isnan(fast[key]) and math.isnan(value)), (case, key)
