"""Issue 14 end to end: judge, register and stack star fields with known transforms.

The truth (star catalogue, each frame's transform, a satellite trail, clouds, trailing) is
made here with tests/starfield.py, independently of the code under test; ``ccdcal stack``
runs as a user runs it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from astropy.io import fits

import starfield as sf
from ccdcal.stacking.workflow import stack_files

SHAPE = (300, 320)


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """Eight frames: reference, shifts, a rotation, a meridian flip, a 1 % scale change, one
    with a satellite trail; plus a cloudy one, a trailed one and one with no stars."""
    root = tmp_path_factory.mktemp("field")
    stars = sf.catalogue(SHAPE, 90, seed=5)
    scale = np.diag([1.01, 1.01, 1.0]) @ sf.rotation(2.0, SHAPE, 3.2, -4.1)
    truths = {
        "f0_ref": np.eye(3),
        "f1_shift": sf.shift(7.37, -3.81),
        "f2_shift": sf.shift(-5.52, 6.23),
        "f3_rot": sf.rotation(12.0, SHAPE, 2.5, 1.5),
        "f4_flip": sf.rotation(180.0, SHAPE, -1.7, 2.2),
        "f5_scale": scale,
        "f6_trail": sf.shift(1.11, 2.22),
        "f7_shift": sf.shift(-2.9, -1.3),
    }
    paths = {}
    cosmic = {}
    for k, (name, matrix) in enumerate(truths.items()):
        data, sigma = sf.observe(SHAPE, stars, matrix, seed=10 + k)
        # cosmic rays, as every real light has: 40 hits of 1-2 pixels, 2000-20000 ADU, not masked
        hits = np.random.default_rng(100 + k)
        ys, xs = hits.integers(5, SHAPE[0] - 5, 40), hits.integers(5, SHAPE[1] - 5, 40)
        data[ys, xs] += hits.uniform(2000, 20000, 40).astype(np.float32)
        data[ys, xs + 1] += hits.uniform(0, 3000, 40).astype(np.float32)
        cosmic[name] = (xs, ys)
        if name == "f6_trail":
            yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
            trail = np.abs((yy - 40) - 0.6 * xx) < 1.5
            data[trail] += 3000.0
            sigma[trail] = np.sqrt(sigma[trail] ** 2 + 3000.0)
        paths[name] = sf.write_light(root / f"{name}.fits", data, sigma, mjd=60000.0 + k / 1440)
    cloudy, s = sf.observe(SHAPE, stars, sf.shift(1.0, 1.0), sky=3500.0, transparency=0.12, seed=40)
    paths["x_cloudy"] = sf.write_light(root / "x_cloudy.fits", cloudy, s)
    trailed = sum(sf.render(SHAPE, sf.source_positions(stars, sf.shift(dx, 0.3 * dx)), stars[:, 2] / 10)
                  for dx in np.linspace(0, 9, 10))
    rng = np.random.default_rng(41)
    trailed = 1000 + trailed + rng.normal(size=SHAPE) * np.sqrt(25 + 1000 + trailed)
    paths["x_trailed"] = sf.write_light(root / "x_trailed.fits", trailed.astype(np.float32),
                                        np.sqrt(25 + trailed).astype(np.float32))
    empty = (1000 + rng.normal(size=SHAPE) * math.sqrt(1025)).astype(np.float32)
    paths["x_empty"] = sf.write_light(root / "x_empty.fits", empty, np.full(SHAPE, 32.0, np.float32))
    return {"root": root, "stars": stars, "truths": truths, "paths": paths, "cosmic": cosmic}


@pytest.fixture(scope="module")
def run(field):
    return stack_files(sorted(field["paths"].values()), field["root"] / "stack.fits",
                       reference=field["paths"]["f0_ref"])


def _grid_error(found: np.ndarray, truth: np.ndarray) -> float:
    ys, xs = np.mgrid[10:SHAPE[0] - 10:12j, 10:SHAPE[1] - 10:12j]
    pts = np.vstack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    a, b = found @ pts, truth @ pts
    return float(np.sqrt(np.mean(np.sum((a[:2] / a[2] - b[:2] / b[2]) ** 2, axis=0))))


def test_transforms_are_recovered_to_five_hundredths_of_a_pixel(field, run):
    by_name = {v.path.split("/")[-1][:-5]: v for v in run.frames}
    for name, truth in field["truths"].items():
        v = by_name[name]
        assert v.used, (name, v.reason)
        assert _grid_error(np.asarray(v.matrix).reshape(3, 3), truth) < 0.05, name


def test_transparency_scales_keep_star_fluxes_on_the_reference_grid(field, run):
    """Every frame was observed at transparency 1; f5 at a 1 % larger scale, so on the reference
    grid (values per pixel) its stars sum to |det| = 1.0201 times their flux: its scale is 1/1.0201."""
    used = [v for v in run.frames if v.used]
    for v, scale in zip(used, run.result.scales, strict=True):
        expected = 1 / 1.01**2 if "f5_scale" in v.path else 1.0
        assert abs(scale / expected - 1) < 0.008, (v.path, scale)


def test_outliers_are_left_out_with_their_reason(run):
    reasons = {v.path.split("/")[-1]: v.reason for v in run.frames}
    assert "cloudy" in reasons["x_cloudy.fits"]
    assert "trailed" in reasons["x_trailed.fits"]
    assert "no stars" in reasons["x_empty.fits"]
    assert sum(v.used for v in run.frames) == 8
    assert any("x_empty.fits left out" in w for w in run.warnings)


def test_stack_is_on_the_reference_grid_sharp_deep_and_without_the_trail(field, run):
    stack = run.result
    with fits.open(field["paths"]["f0_ref"]) as h:
        single = h[0].data.astype(float)
    stars = field["stars"]
    bright = stars[(stars[:, 2] > 2e4) & (stars[:, 0] > 20) & (stars[:, 0] < SHAPE[1] - 20)
                   & (stars[:, 1] > 20) & (stars[:, 1] < SHAPE[0] - 20)]
    offsets, fwhm_ratio = [], []
    for x, y, _ in bright:
        cx, cy, _, fw = sf.centroid(stack.data, x, y, background=float(np.nanmedian(stack.data)))
        _, _, _, fw1 = sf.centroid(single, x, y, background=float(np.median(single)))
        offsets.append(math.hypot(cx - x, cy - y))
        fwhm_ratio.append(fw / fw1)
    assert np.median(offsets) < 0.1 and max(offsets) < 0.2          # stars where the reference has them
    assert abs(np.median(fwhm_ratio) - 1) < 0.10                      # as sharp as one frame
    # noise: 8 frames, measured in 3x3 bins of star-free sky (resampling correlates neighbours)
    free = sf.star_free(SHAPE, stars, 12.0) & ~stack.mask

    def binned_noise(image):
        img = np.where(free, image - np.nanmedian(image[free]), np.nan)[: SHAPE[0] // 3 * 3, : SHAPE[1] // 3 * 3]
        blocks = img.reshape(SHAPE[0] // 3, 3, SHAPE[1] // 3, 3).transpose(0, 2, 1, 3).reshape(-1, 9)
        blocks = blocks[np.isfinite(blocks).all(axis=1)].mean(axis=1)
        return sf.robust_sigma(blocks)

    ratio = binned_noise(stack.data) / binned_noise(single)
    assert abs(ratio / (1 / math.sqrt(8)) - 1) < 0.10
    # the satellite trail of one frame is gone
    yy, xx = np.mgrid[0:SHAPE[0], 0:SHAPE[1]]
    trail = (np.abs((yy - 40 - 2.22) - 0.6 * (xx - 1.11)) < 1.0) & free
    sky = float(np.nanmedian(stack.data[free]))
    sigma = float(np.nanmedian(stack.uncertainty[free]))
    assert np.nanmax(np.abs(stack.data[trail] - sky)) < 6 * sigma
    assert (stack.rejected[trail] >= 1).mean() > 0.9
    # the cosmic rays of every frame are gone too (checked where they land on the reference grid,
    # away from stars and the stack's edges)
    for name, (xs, ys) in field["cosmic"].items():
        m = field["truths"][name]
        p = m @ np.vstack([xs, ys, np.ones(xs.size)])
        for x, y in zip(np.round(p[0]).astype(int), np.round(p[1]).astype(int), strict=True):
            if 3 <= x < SHAPE[1] - 3 and 3 <= y < SHAPE[0] - 3 and free[y - 2:y + 3, x - 2:x + 3].all():
                assert abs(stack.data[y, x] - sky) < 6 * sigma, (name, x, y)


def test_cli_writes_the_stack_preview_and_frames_table(field, tmp_path):
    out = tmp_path / "m.fits"
    proc = subprocess.run([sys.executable, "-m", "ccdcal.cli", "stack", str(field["root"] / "f*.fits"), "-o",
                           str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    assert len(table["frames"]) == 8 and all(f["used"] for f in table["frames"])
    with fits.open(out) as h:
        assert [x.name for x in h] == ["PRIMARY", "UNCERT", "COVERAGE", "WEIGHT", "REJECT", "MASK"]
        assert h[0].header["NCOMBINE"] == 8
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_no_frame_with_stars_is_a_one_line_error(field, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ccdcal.cli", "stack", str(field["paths"]["x_empty"]), "-o",
                           str(tmp_path / "none.fits")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "no stars" in proc.stderr
    assert not (tmp_path / "none.fits").exists()


def test_colour_and_mono_frames_together_are_refused_in_one_line_even_beside_an_unreadable_one(field, tmp_path):
    """Two frames of the field stated colour (BAYERPAT) among mono ones, and a file that is not
    FITS: the stack says in one line that colour and mono must be stacked apart (naming the
    colour frames), exits 2 and writes nothing; the unreadable file alone would only be left
    out."""
    frames = [field["paths"][name] for name in ("f0_ref", "f1_shift", "f2_shift")]
    for k, name in enumerate(("f3_rot", "f7_shift")):
        with fits.open(field["paths"][name]) as hdul:
            hdul[0].header["BAYERPAT"] = "RGGB"
            hdul.writeto(tmp_path / f"colour_{k}.fits")
        frames.append(tmp_path / f"colour_{k}.fits")
    (tmp_path / "junk.fits").write_bytes(b"not a FITS file at all")
    out = tmp_path / "mixed.fits"
    proc = subprocess.run([sys.executable, "-m", "ccdcal.cli", "stack", *map(str, frames), str(tmp_path / "junk.fits"),
                           "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "colour" in lines[0] and "mono" in lines[0] and "colour_0.fits" in lines[0]
    assert not out.exists() and not out.with_suffix(".png").exists()


def test_reduce_stack_makes_one_stack_per_target_and_filter_resumably(tmp_path):
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce

    raw = write_night(tmp_path / "raw", size=256, seed=8, n_light=3)
    options = ReduceOptions(stack=True)
    dry = reduce([raw], tmp_path / "out", options=options, dry_run=True)
    assert "stack M51 V: 3 lights" in dry.plan.describe()
    result = reduce([raw], tmp_path / "out", options=options)
    assert sorted(result.stacks) == ["stacked/M51_R.fits", "stacked/M51_V.fits"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    entry = manifest["outputs"]["stacked/M51_V.fits"]
    assert [f["used"] for f in entry["frames"]] == [True, True, True]
    assert (tmp_path / "out" / entry["preview"]).read_bytes()[:4] == b"\x89PNG"
    with fits.open(tmp_path / "out" / "stacked" / "M51_V.fits") as h:
        assert h[0].header["NCOMBINE"] == 3
        stacked = h[0].data
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<h2>Stacks</h2>" in html and "M51 V — 3 of 3 frames" in html
    # the stack is deeper than one calibrated light: background noise down by about sqrt(3)
    with fits.open(tmp_path / "out" / "calibrated" / "m51_V_001.fits") as h:
        single = h[0].data
    band = (slice(20, 236), slice(20, 236))
    assert sf.robust_sigma(stacked[band] - np.nanmedian(stacked[band])) < 0.8 * sf.robust_sigma(
        single[band] - np.nanmedian(single[band]))
    again = reduce([raw], tmp_path / "out", options=options)       # resumable: kept, not redone
    assert sorted(again.stacks) == sorted(result.stacks) and again.reused >= len(result.stacks)


@pytest.mark.realdata
def test_real_nickel_lights_register_through_cosmic_rays(real_data, tmp_path_factory):
    """Real Lick Nickel lights (60-600 s, V, many cosmic rays, few stars): the star lists are
    stars, not cosmic rays (FWHM of the seeing, 7-10 px here), and a frame registers to a
    shifted crop and to a meridian-flipped copy of itself to < 0.05 px. Each light is a
    different target, so two exposures of one field cannot be tested on this data."""
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.stacking.judge import read_frame as _read_frame
    from ccdcal.stacking.register import detect_stars, find_transform

    out = tmp_path_factory.mktemp("nickel-stack")
    reduce([real_data / "nickel-lick" / "raw"], out, options=ReduceOptions(report=False))
    for name in ("d1047", "d1048", "d1052", "d1074", "d1083"):
        data, mask, _, _ = _read_frame(str(out / "calibrated" / f"{name}.fits"))
        a = (data[0:900, 0:950], mask[0:900, 0:950])
        b = (data[13:913, 7:957], mask[13:913, 7:957])
        c = (np.ascontiguousarray(a[0][::-1, ::-1]), np.ascontiguousarray(a[1][::-1, ::-1]))
        stars_a = detect_stars(*a)
        assert len(stars_a) >= 8 and np.median(stars_a.fwhm) > 5.0, name     # seeing, not cosmic rays
        shifted = np.array([[1.0, 0, 7], [0, 1.0, 13], [0, 0, 1]])
        flipped = np.array([[-1.0, 0, 949], [0, -1.0, 899], [0, 0, 1]])
        ys, xs = np.mgrid[10:890:10j, 10:940:10j]
        grid = np.vstack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
        for frame, truth in ((b, shifted), (c, flipped)):
            t = find_transform(detect_stars(*frame), stars_a)
            err = np.sqrt(np.mean(np.sum(((np.asarray(t.matrix) @ grid) - truth @ grid)[:2] ** 2, axis=0)))
            assert err < 0.05, (name, err)


def test_the_stack_header_says_the_total_exposure_under_both_names(tmp_path):
    """EXPTIME and its synonym EXPOSURE (N.I.N.A., SGP) both hold the total, never one frame's."""
    from astropy.io import fits as pyfits

    from ccdcal.io.headers import stack_header

    headers = [pyfits.Header([("EXPTIME", 120.0), ("EXPOSURE", 120.0), ("MJD-OBS", 60000.0 + i / 100)])
               for i in range(6)]
    out = stack_header(headers, [f"f{i}" for i in range(6)], reference=0, scales=np.ones(6), zeros=np.zeros(6),
                       weights=np.ones(6), how="test")
    assert out["EXPTIME"] == out["EXPOSURE"] == 720.0 and out["EXPMEAN"] == 120.0


def test_each_stacked_frame_states_its_weight(tmp_path):
    """Weights from the data (noise and transparency: 1/(s·σ_bg)², mean 1) per frame, in the run's
    table (to_json) as in the header's WGHTnnn: a frame with twice the noise weighs a quarter."""
    from ccdcal.stacking.workflow import stack_files
    from starfield import catalogue, observe, shift, write_light

    stars = catalogue((128, 128), 20, seed=5)
    paths = []
    for i in range(4):
        data, sigma = observe((128, 128), stars, shift(1.3 * i, -0.7 * i), seed=60 + i)
        if i == 3:   # the same sky, twice the noise
            noisy = data + np.random.default_rng(9).normal(0.0, 1.0, data.shape) * np.sqrt(3) * sigma
            data, sigma = noisy, 2 * sigma
        paths.append(write_light(tmp_path / f"w{i}.fits", data.astype(np.float32), sigma.astype(np.float32)))
    run = stack_files(paths, tmp_path / "stack.fits", preview=False)
    weights = [f.to_json()["weight"] for f in run.frames]
    assert all(w is not None for w in weights) and np.mean(weights) == pytest.approx(1.0, abs=0.01)
    assert weights[3] / np.mean(weights[:3]) == pytest.approx(0.25, rel=0.15)
    header = fits.getheader(tmp_path / "stack.fits")
    assert [round(header[f"WGHT{i + 1:03d}"], 3) for i in range(4)] == [round(w, 3) for w in weights]


def test_an_unreadable_frame_is_left_out_with_its_reason_not_the_stack(field, tmp_path):
    """One broken file among the lights costs that file, never the stack."""
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  = not a fits file" + b" " * 3000)
    paths = [field["paths"][k] for k in ("f0_ref", "f1_shift", "f2_shift", "f7_shift")] + [broken]
    run = stack_files(paths, tmp_path / "stack.fits", reference=field["paths"]["f0_ref"])
    left = {v.path.split("/")[-1]: v.reason for v in run.frames if not v.used}
    assert list(left) == ["broken.fits"] and "cannot be read" in left["broken.fits"]
    assert run.output.exists() and sum(v.used for v in run.frames) == 4
