"""A night written by another program than ``ccdcal demo``, in other header conventions, reduced
with no options: every light must come out trimmed, flat to 1 %, free of hot pixels, right zero point.

Conventions here: NOAO-style OBSTYPE ('zero', 'dark', 'dome flat', 'object'), EXPOSURE only,
FILTER1/FILTER2 with 'Clear', CCDSUM '2 2', a 16-column *prescan on the left* (BIASSEC) with
DATASEC, DATE-OBS + UT split, DETTEMP, RICE tile-compressed .fits.fz files for the flats.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

NY, NX, PRESCAN = 160, 240, 16
GAIN, RN = 2.0, 3.0


def _write(path, data, cards, compressed=False):
    header = fits.Header()
    for k, v in cards.items():
        header[k] = v
    header["CCDSUM"] = "2 2"
    header["BIASSEC"] = f"[1:{PRESCAN},1:{NY}]"
    header["DATASEC"] = f"[{PRESCAN + 1}:{PRESCAN + NX},1:{NY}]"
    header["DETTEMP"] = -95.0
    data = np.clip(np.round(data), 0, 65535).astype(np.uint16)
    if compressed:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, header=header, compression_type="RICE_1")]).writeto(path)
    else:
        fits.PrimaryHDU(data, header=header).writeto(path)


@pytest.fixture(scope="module")
def other_night(tmp_path_factory):
    rng = np.random.default_rng(11)
    raw = tmp_path_factory.mktemp("other") / "raw"
    raw.mkdir()
    y, x = np.mgrid[0:NY, 0:NX]
    bias_struct = 5.0 * np.sin(x / 17.0)                        # structure in the data area only
    dark_rate = np.full((NY, NX), 0.05)
    hot = rng.choice(NY * NX, 40, replace=False)
    dark_rate.flat[hot] = rng.uniform(2.0, 30.0, 40)
    flat = (1.0 - 0.3 * ((x - NX / 2) ** 2 + (y - NY / 2) ** 2) / (NX / 2) ** 2) * rng.normal(1, 0.01, (NY, NX))
    q = (slice(NY // 4, NY - NY // 4), slice(NX // 4, NX - NX // 4))
    flat /= np.median(flat[q])

    def frame(signal, level):
        img = np.empty((NY, PRESCAN + NX))
        img[:, :PRESCAN] = level
        img[:, PRESCAN:] = level + bias_struct + rng.poisson(np.clip(signal, 0, None) * GAIN) / GAIN
        return img + rng.normal(0, RN, img.shape)

    day = {"DATE-OBS": "2025-01-20"}
    for i in range(7):
        _write(raw / f"a{i:03d}.fits", frame(0, 500 + 3 * i), {"OBSTYPE": "zero", "EXPOSURE": 0.0, "UT": f"01:{i:02d}:00", **day})
    for t in (30.0, 120.0):
        for i in range(5):
            _write(raw / f"b{int(t)}_{i}.fits", frame(dark_rate * t, 505 - i), {"OBSTYPE": "dark", "EXPOSURE": t, **day})
    for i, level in enumerate((12000, 20000, 28000, 36000, 44000)):
        _write(raw / f"c{i}.fits.fz", frame(flat * level + dark_rate * 5, 510 + i),
               {"OBSTYPE": "dome flat", "EXPOSURE": 5.0, "FILTER1": "r", "FILTER2": "Clear", **day}, compressed=True)
    truth = {}
    for i in range(3):
        sky = 300.0 + 50 * i
        _write(raw / f"d{i}.fits", frame(flat * sky + dark_rate * 45.0, 498 + 2 * i),
               {"OBSTYPE": "object", "OBJECT": "NGC 2903", "EXPOSURE": 45.0, "FILTER1": "r", "FILTER2": "Clear", **day})
        truth[f"d{i}"] = sky
    from ccdcal.pipeline.run import ReduceOptions, reduce

    out = raw.parent / "out"
    result = reduce([raw], out, options=ReduceOptions(report=False))
    return out, result, truth, dark_rate, hot


def test_every_light_is_calibrated_with_the_right_masters(other_night):
    out, result, truth, _, _ = other_night
    assert not result.skipped
    assert sorted(p.name for p in (out / "calibrated").iterdir()) == [f"{n}.fits" for n in sorted(truth)]
    for job in result.plan.lights:
        r = job.recipe
        assert r.bias and r.flat and r.dark and result.plan.master(r.dark).exptime == 120.0
        assert r.dark_scale == pytest.approx(45.0 / 120.0)
        assert r.overscan is not None and str(r.overscan.region) == f"[1:{PRESCAN},1:{NY}]"


@pytest.mark.parametrize("name", ["d0", "d1", "d2"])
def test_light_trimmed_flat_zero_point_and_no_hot_pixels(other_night, name):
    out, _, truth, dark_rate, hot = other_night
    data = fits.getdata(out / "calibrated" / f"{name}.fits").astype(np.float64)
    assert data.shape == (NY, NX), "prescan must be trimmed off"
    sky = truth[name]
    assert np.median(data) == pytest.approx(sky, rel=0.01), "zero point"
    b = 20
    centre = np.median(data[NY // 2 - b: NY // 2 + b, NX // 2 - b: NX // 2 + b])
    for corner in (data[:b, :b], data[:b, -b:], data[-b:, :b], data[-b:, -b:]):
        assert abs(np.median(corner) / centre - 1) < 0.01, "not flat to 1 %"
    noise = np.sqrt(RN**2 + sky / GAIN)
    hot_values = data.flat[hot]
    assert np.max(np.abs(hot_values - sky)) < 6 * np.sqrt(noise**2 + dark_rate.flat[hot].max() * 45 / GAIN)
