"""Nights written the way other observatories write them: biases typed as short darks, header
placeholders, DARKTIME as a shutter time, frames already calibrated, no bias at all. Each is
reduced with no options and checked against a plain reduction of the same frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.cli import main
from ccdcal.pipeline.run import ReduceOptions, reduce

SIZE = 64
PEDESTAL, RN, GAIN, RATE = 1411.0, 6.0, 1.4, 2.0       # ADU, ADU, e-/ADU, ADU/s
SKY = 2000.0
CENTRAL = (slice(SIZE // 4, 3 * SIZE // 4), slice(SIZE // 4, 3 * SIZE // 4))


def _flat_field() -> np.ndarray:
    y, x = np.mgrid[:SIZE, :SIZE] / (SIZE - 1) - 0.5
    return 1.0 - 0.25 * (x**2 + y**2)


def _frame(rng, signal: np.ndarray | float, *, cosmic: bool = True) -> np.ndarray:
    electrons = rng.poisson(np.clip(np.broadcast_to(signal, (SIZE, SIZE)), 0, None) * GAIN) / GAIN
    data = PEDESTAL + electrons + rng.normal(0.0, RN, (SIZE, SIZE))
    if cosmic:
        hits = rng.random((SIZE, SIZE)) < 0.002
        data[hits] += rng.uniform(300, 3000, hits.sum())
    return np.clip(np.round(data), 0, 65535).astype(np.uint16)


def _write(path: Path, data: np.ndarray, **cards) -> None:
    header = fits.Header()
    for key, value in cards.items():
        header[key.replace("_", "-") if key == "CCD_TEMP" else key] = value
    fits.PrimaryHDU(data, header).writeto(path)


def robotic_night(root: Path, seed: int = 1, zero_name: str = "bias") -> Path:
    """Biases are IMAGETYP='DARK' with EXPTIME 0.1 (file names say bias); lights have a
    DARKTIME that is the shutter-open time; DATAMAX = 0.0 and CCDTEMP = -99 are placeholders."""
    rng = np.random.default_rng(seed)
    raw = root / "raw"
    raw.mkdir(parents=True)
    flat = _flat_field()
    common = {"DATAMAX": 0.0, "CCDTEMP": -99.0, "BIASSEC": "[0,513:0,1536]", "DATASEC": "[513,513:1536,1536]"}
    for i in range(5):
        _write(raw / f"rbo_2019-11-12T01:0{i}:00_{zero_name}_binning2x2_filter-none_{i:03d}.fits",
               _frame(rng, RATE * 0.1), IMAGETYP="DARK", EXPTIME=0.1, **common)
    for i in range(4):
        _write(raw / f"rbo_dark_120s_{i:03d}.fits", _frame(rng, RATE * 120), IMAGETYP="DARK", EXPTIME=120.0,
               **common)
    for i, level in enumerate((9000.0, 15000.0, 22000.0, 30000.0)):
        t = level / 3000.0
        _write(raw / f"rbo_flat_V_{i:03d}.fits", _frame(rng, level * flat + RATE * t), IMAGETYP="FLAT",
               EXPTIME=t, FILTER="V", **common)
    for i in range(2):
        _write(raw / f"rbo_ngc1234_V_{i:03d}.fits", _frame(rng, SKY * flat + RATE * 90, cosmic=False),
               IMAGETYP="LIGHT", EXPTIME=90.0, DARKTIME=19.5 + i, FILTER="V", OBJECT="NGC 1234", **common)
    return raw


def plain_reduction(raw: Path) -> dict[str, np.ndarray]:
    """A careful reduction in numpy: median bias from the 0.1 s frames, dark rate from the 120 s
    darks, flat from bias/dark-subtracted flats, each normalised; lights calibrated with them."""
    def load(pattern):
        return [(fits.getheader(p), fits.getdata(p).astype(np.float64)) for p in sorted(raw.glob(pattern))]

    bias = np.median([d for _, d in load("*T01:0*")], axis=0)
    rate = np.median([d - bias for _, d in load("*dark_120s*")], axis=0) / 120.0
    flats = [(d - bias - rate * h["EXPTIME"]) for h, d in load("*flat*")]
    flat = np.median([f / np.median(f) for f in flats], axis=0)
    flat /= np.median(flat[CENTRAL])       # normalised on the central half, the usual convention
    return {p.name: (fits.getdata(p) - bias - rate * fits.getheader(p)["EXPTIME"]) / flat
            for p in sorted(raw.glob("*ngc*"))}


@pytest.mark.parametrize("zero_name", ["bias", "shortdark"])
def test_biases_typed_as_short_darks_serve_as_bias_and_no_pedestal_is_left(tmp_path, zero_name):
    # named *bias*: classified as bias (a 0.1 s DARK whose name says bias); named otherwise: the
    # plan finds no bias frames and uses the 0.1 s darks as the zero level, and says so
    raw = robotic_night(tmp_path, zero_name=zero_name)
    result = reduce([raw], tmp_path / "out", options=ReduceOptions(report=False))
    bias_job = next(m for m in result.plan.masters if m.kind.value == "bias")
    assert sorted(f.name for f in bias_job.members) == sorted(p.name for p in raw.glob("*T01:0*"))
    if zero_name != "bias":
        assert "used as bias" in result.plan.describe()
    assert all(j.recipe.bias and j.recipe.dark for j in result.plan.lights)
    reference = plain_reduction(raw)
    truth = SKY * np.median(_flat_field()[CENTRAL])  # the sky, flat-fielded on the central half
    for name, ref in reference.items():
        data = fits.getdata(tmp_path / "out" / "calibrated" / name.replace(".fits", ".fits")).astype(np.float64)
        # a pedestal left in is +70 %, the dark current +9 %
        assert np.median(data) == pytest.approx(truth, rel=0.01), "the pedestal or dark current stayed in"
        assert np.median(data) == pytest.approx(np.median(ref), rel=0.005)
        # the 120 s dark is scaled by 90/120 from EXPTIME, not by DARKTIME (a shutter-open time)
        h = fits.getheader(tmp_path / "out" / "calibrated" / name)
        assert h["DARKSCAL"] == pytest.approx(90.0 / 120.0, rel=1e-3)


def test_placeholder_saturation_does_not_mask_every_pixel(tmp_path):
    raw = robotic_night(tmp_path)
    result = reduce([raw], tmp_path / "out", options=ReduceOptions(report=False))
    assert not any("saturated" in flag for f in result.plan.masters for m in f.members for flag in m.flags)
    for job in result.plan.lights:
        mask = fits.getdata(tmp_path / "out" / job.output, "MASK")
        assert np.mean(mask & 1) < 0.001, "saturation bit set where nothing is saturated"


def test_frame_already_calibrated_is_not_calibrated_again(tmp_path):
    raw = robotic_night(tmp_path)
    rng = np.random.default_rng(3)
    done = (_frame(rng, SKY, cosmic=False).astype(np.float64) - PEDESTAL + 100).astype(np.uint16)
    _write(raw / "focus.fit", done, IMAGETYP="Light Frame", EXPTIME=90.0, FILTER="V", CALSTAT="D",
           PEDESTAL=-100)
    result = reduce([raw], tmp_path / "out", options=ReduceOptions(report=False))
    assert "focus.fit" not in {j.frame.name for j in result.plan.lights}
    reason = next(s.reason for s in result.skipped if s.path.endswith("focus.fit"))
    assert "already calibrated" in reason


def _no_bias_night(root: Path) -> Path:
    raw = robotic_night(root)
    for p in raw.glob("*bias*"):
        p.unlink()
    for p in raw.glob("*dark*"):
        p.unlink()
    return raw


def test_a_light_that_would_keep_its_pedestal_is_skipped_with_exit_3(tmp_path, capsys):
    raw = _no_bias_night(tmp_path)
    code = main(["reduce", str(raw), "-o", str(tmp_path / "out"), "--no-report"])
    assert code == 3
    out = capsys.readouterr()
    assert "pedestal" in out.out + out.err
    assert not list((tmp_path / "out" / "calibrated").glob("*.fits"))


def test_allow_uncorrected_keeps_the_light_and_says_so(tmp_path):
    raw = _no_bias_night(tmp_path)
    result = reduce([raw], tmp_path / "out", options=ReduceOptions(report=False, allow_uncorrected=True))
    assert len(result.lights) == 2
    header = fits.getheader(tmp_path / "out" / result.lights[0])
    assert header["UNCORR"] is True
    assert any("UNCORRECTED" in n for j in result.plan.lights for n in j.notes)
