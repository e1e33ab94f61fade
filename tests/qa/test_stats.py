"""Region statistics agree with astropy's sigma_clipped_stats and numpy on the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.stats import sigma_clipped_stats

from ccdcal.errors import InputError
from ccdcal.qa.stats import RegionStats, frame_metrics, region_stats


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(42)
    data = rng.normal(1000.0, 7.0, size=(60, 80)).astype(np.float32)
    data[10, 20] = 60000.0  # hot pixel
    data[:, 0] += 500.0  # a bright first column, to catch off-by-one errors at the edge
    data[-1, :] -= 300.0  # a dark last row
    return data


def _reference(values: np.ndarray, sigma: float = 3.0, maxiters: int = 5) -> dict[str, float]:
    v = values.astype(np.float64).ravel()
    cmean, cmedian, cstd = sigma_clipped_stats(v, sigma=sigma, maxiters=maxiters)
    return {"npix": v.size, "mean": v.mean(), "median": np.median(v), "std": v.std(),
            "min": v.min(), "max": v.max(), "clipped_mean": cmean,
            "clipped_median": cmedian, "clipped_std": cstd}


def _assert_matches(result: RegionStats, expected: dict[str, float]) -> None:
    got = result.to_dict()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-9), key


def test_whole_frame_matches_astropy_and_numpy(image):
    result = region_stats(image)
    assert result.region == "[1:80,1:60]"
    _assert_matches(result, _reference(image))


@pytest.mark.parametrize(
    ("region", "rows", "cols"),
    [
        ("[1:10,1:5]", slice(0, 5), slice(0, 10)),  # first column and row included
        ("[71:80,51:60]", slice(50, 60), slice(70, 80)),  # last column and row included
        ("[1:1,1:60]", slice(0, 60), slice(0, 1)),  # a single column
        ("[*,60:60]", slice(59, 60), slice(0, 80)),  # the last row
        ("[20:30,*]", slice(0, 60), slice(19, 30)),
        ("[30:20,5:1]", slice(0, 5), slice(19, 30)),  # reversed ranges: same pixels
        ("[21,11]", slice(10, 11), slice(20, 21)),  # one pixel: the hot one
    ],
)
def test_region_is_one_based_and_inclusive(image, region, rows, cols):
    result = region_stats(image, region)
    _assert_matches(result, _reference(image[rows, cols]))
    assert result.npix == image[rows, cols].size


def test_sigma_and_maxiters_are_passed_through(image):
    result = region_stats(image, "[2:80,1:59]", sigma=2.0, maxiters=1)
    _assert_matches(result, _reference(image[0:59, 1:80], sigma=2.0, maxiters=1))


def test_nan_pixels_are_ignored(image):
    data = image.copy()
    data[5:8, 5:8] = np.nan
    result = region_stats(data)
    _assert_matches(result, _reference(data[np.isfinite(data)]))
    assert result.npix == data.size - 9


def test_region_without_finite_pixels_gives_nan():
    result = region_stats(np.full((4, 4), np.nan), "[1:2,1:2]")
    assert result.npix == 0 and np.isnan(result.mean)


@pytest.mark.parametrize("region", ["[0:10,1:5]", "[1:81,1:5]", "[1:10,1:61]", "1:10,1:5", "[a:b,c:d]"])
def test_bad_region_is_an_input_error(image, region):
    with pytest.raises(InputError):
        region_stats(image, region)


def test_to_dict_has_the_documented_keys_and_is_json_ready(image):
    got = region_stats(image, "[1:10,1:10]").to_dict()
    assert list(got) == ["region", "npix", "mean", "median", "std", "min", "max",
                         "clipped_mean", "clipped_median", "clipped_std"]
    assert json.loads(json.dumps(got)) == got


def test_frame_metrics_reports_levels_and_pixel_fractions():
    rng = np.random.default_rng(3)
    data = rng.normal(1000.0, 7.0, size=(512, 512)).astype(np.float32)
    data[:2, :] = 0.0
    data[100:104, :] = 65535.0
    m = frame_metrics(data)
    assert m["level"] == pytest.approx(1000.0, abs=1.0)
    assert m["noise"] == pytest.approx(7.0, rel=0.1)
    assert m["zero_frac"] == pytest.approx(2 / 512)
    assert m["saturated_frac"] == pytest.approx(4 / 512)
    assert m["min"] == 0.0 and m["max"] == 65535.0
    assert m["saturation"] == pytest.approx(0.999 * 65535)
    assert frame_metrics(data, saturation=1020.0)["saturated_frac"] > 0.002


def test_frame_metrics_uses_the_integer_dtype_range():
    data = np.full((64, 64), 4095, dtype=np.uint16)
    assert frame_metrics(data)["saturated_frac"] == 0.0
    data8 = np.full((64, 64), 255, dtype=np.uint8)
    assert frame_metrics(data8)["saturated_frac"] == 1.0


def test_frame_metrics_sees_large_scale_gradient():
    rng = np.random.default_rng(4)
    flat = rng.normal(1000.0, 7.0, size=(256, 256))
    ramp = flat + np.linspace(0, 100, 256)[None, :]
    assert frame_metrics(flat)["gradient"] < 10
    assert frame_metrics(ramp)["gradient"] > 70



# -- command line ----------------------------------------------------------------------------------
def test_cli_stats_json_has_one_object_per_file_and_region(tmp_path, image, capsys):
    from ccdcal.cli import main
    from ccdcal.io.writer import write_fits

    paths = [write_fits(tmp_path / f"f{i}.fits", image + i) for i in range(2)]
    rc = main(["stats", *map(str, paths), "--region", "[1:10,1:5]", "--region", "[71:80,51:60]", "--json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["path"], r["region"]) for r in rows] == [
        (str(p), reg) for p in paths for reg in ("[1:10,1:5]", "[71:80,51:60]")]
    assert list(rows[0]) == ["path", "region", "npix", "mean", "median", "std", "min", "max",
                             "clipped_mean", "clipped_median", "clipped_std"]
    expected = _reference(image[50:60, 70:80] + 1)
    for key, value in expected.items():
        assert rows[3][key] == pytest.approx(value, rel=1e-6), key


def test_cli_stats_csv_and_bad_region(tmp_path, image, capsys):
    from ccdcal.cli import main
    from ccdcal.io.writer import write_fits

    path = write_fits(tmp_path / "f.fits", image)
    assert main(["stats", str(path), "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,region,npix,mean,median,std,min,max,clipped_mean,clipped_median,clipped_std"
    assert len(lines) == 2 and '"[1:80,1:60]"' in lines[1]
    assert main(["stats", str(path), "--region", "[1:81,1:5]"]) == 2
    assert "outside the image" in capsys.readouterr().err


@pytest.mark.parametrize("seed", range(12))
def test_clipped_statistics_match_astropy_on_awkward_samples(seed):
    """Ties, a handful of pixels, all equal, heavy tails, outliers on one side, every maxiters."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 3, 4, 7, 50, 1000, 20000]))
    kind = seed % 4
    if kind == 0:
        values = np.round(rng.normal(100.0, 3.0, n))                  # integers: many ties
    elif kind == 1:
        values = np.full(n, 42.0)                                      # all equal
    elif kind == 2:
        values = rng.standard_cauchy(n) * 5 + 1000                     # heavy tails
    else:
        values = rng.normal(0.0, 1.0, n)
        values[: max(1, n // 20)] += 50.0                              # outliers on one side
    image = values.reshape(1, -1).astype(np.float64)
    for sigma, maxiters in ((3.0, 5), (2.0, 1), (2.5, 0), (1.5, 10)):
        _assert_matches(region_stats(image, sigma=sigma, maxiters=maxiters),
                        _reference(values, sigma=sigma, maxiters=maxiters))
