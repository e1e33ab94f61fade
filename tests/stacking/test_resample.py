"""Resampling onto the reference grid: centroids, constants, masks and edges, uncertainty,
row bands that read only the source rows they need."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ccdcal.combining.engine import combine
from ccdcal.errors import InputError
from ccdcal.stacking.resample import ResampledRows, resample_array
from starfield import catalogue, centroid, observe, rotation, shift, source_positions, write_light

SHAPE = (128, 160)


@pytest.mark.parametrize("interpolation", ["lanczos3", "bicubic", "bilinear"])
def test_subpixel_shift_brings_stars_back_onto_the_reference(tmp_path, interpolation):
    stars = catalogue(SHAPE, 20, seed=2, flux=(2e4, 6e4))
    matrix = shift(0.37, -0.61)
    reference, _ = observe(SHAPE, stars, np.eye(3), noise=False)
    frame, sigma = observe(SHAPE, stars, matrix, noise=False)
    path = write_light(tmp_path / "shifted.fits", frame, sigma)
    with ResampledRows(path, matrix, SHAPE, interpolation=interpolation) as rows:
        out = rows.read_rows(0, SHAPE[0])
    for x, y, _ in stars:
        cx, cy, flux, _ = centroid(out, x, y, background=1000.0)
        rx, ry, rflux, _ = centroid(reference, x, y, background=1000.0)
        assert abs(cx - rx) < 0.05 and abs(cy - ry) < 0.05
        assert flux == pytest.approx(rflux, rel=0.01)
    # the frame itself is off by the shift: the test is not empty
    fx, fy = source_positions(stars[:1], matrix)[0]
    assert abs(centroid(frame, fx, fy, background=1000.0)[0] - stars[0, 0]) > 0.3


@pytest.mark.parametrize("interpolation", ["lanczos3", "bicubic", "bilinear"])
@pytest.mark.parametrize("matrix", [shift(0.5, 0.5), shift(-3.21, 7.9), rotation(33.0, SHAPE, 1.3, -0.4),
                                    np.array([[1.01, 0.02, -1.5], [-0.015, 0.99, 2.2], [1e-6, -2e-6, 1.0]])])
def test_a_constant_stays_constant(interpolation, matrix):
    image = np.full(SHAPE, 1234.5, np.float32)
    data, mask, unc = resample_array(image, matrix, SHAPE, interpolation=interpolation,
                                     uncertainty=np.full(SHAPE, 2.0, np.float32))
    assert (~mask).sum() > 0.5 * mask.size
    assert np.max(np.abs(data[~mask] / 1234.5 - 1.0)) < 1e-5
    assert np.all(np.isnan(data[mask])) and np.all(np.isnan(unc[mask]))
    assert np.all(unc[~mask] <= 2.0 * 1.01) and np.all(unc[~mask] > 0.5)  # Σw² ≈ 1 near whole pixels


def test_identity_and_quarter_turns_copy_values_exactly():
    rng = np.random.default_rng(1)
    image = rng.normal(100, 10, (50, 60)).astype(np.float32)
    data, mask, _ = resample_array(image, np.eye(3), (50, 60))
    assert np.array_equal(data, image) and not mask.any()
    quarter = np.array([[0.0, -1.0, 49.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # (x, y) -> (49 - y, x)
    data, mask, _ = resample_array(image, quarter, (60, 50))
    assert np.array_equal(data, np.rot90(image, -1)) and not mask.any()
    data, mask, _ = resample_array(image, rotation(180, (50, 60)), (50, 60))
    assert np.array_equal(data, image[::-1, ::-1]) and not mask.any()


@pytest.mark.parametrize("interpolation", ["lanczos3", "bicubic", "bilinear"])
def test_masked_nan_and_edge_pixels_are_masked_never_averaged(tmp_path, interpolation):
    image = np.full(SHAPE, 500.0, np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    image[40, 50] = 1e6  # a hot pixel, flagged
    mask[40, 50] = 2
    image[80, 100] = np.nan
    sigma = np.full(SHAPE, 3.0, np.float32)
    matrix = shift(0.4, -0.3)
    path = write_light(tmp_path / "masked.fits", image, sigma, mask)
    with ResampledRows(path, matrix, SHAPE, interpolation=interpolation) as rows:
        data = rows.read_rows(0, SHAPE[0])
        bad = rows.read_mask_rows(0, SHAPE[0])
        unc = rows.read_uncertainty_rows(0, SHAPE[0])
    assert bad.dtype == bool and data.dtype == np.float32 and unc.dtype == np.float32
    # every value left is the constant: neither the hot pixel nor the NaN leaked in
    assert np.max(np.abs(data[~bad] - 500.0)) < 1e-3
    assert np.all(np.isnan(data[bad])) and np.all(np.isnan(unc[bad]))
    assert bad[40, 50] and bad[int(round(80 - 0.3)), int(round(100 + 0.4))]  # where they landed
    assert bad.sum() < 0.1 * bad.size
    # edges: output pixels whose kernel reaches outside the frame
    assert bad[:, 0].all() and bad[-1, :].all()
    assert not bad[SHAPE[0] // 2, 5:-5].any()
    # the same in memory
    arr, arr_mask, _ = resample_array(image, matrix, SHAPE, interpolation=interpolation, mask=mask)
    assert np.array_equal(arr_mask, bad) and np.array_equal(arr, data, equal_nan=True)


def test_uncertainty_is_propagated_through_the_weights():
    rng = np.random.default_rng(3)
    shape = (400, 400)
    noise = rng.normal(0, 5.0, shape).astype(np.float32)
    for matrix in (shift(0.5, 0.5), shift(0.2, 0.7), np.eye(3)):
        data, mask, unc = resample_array(noise, matrix, shape, uncertainty=np.full(shape, 5.0, np.float32))
        # one phase everywhere: the predicted σ is one number, and the measured scatter matches it
        predicted = float(np.median(unc[~mask]))
        assert np.ptp(unc[~mask]) < 1e-4
        assert np.std(data[~mask]) == pytest.approx(predicted, rel=0.02)
    # Lanczos-3 at half a pixel in x and y: sqrt(Σw²) per axis
    d = np.arange(-2, 4) - 0.5
    w = np.sinc(d) * np.sinc(d / 3)
    w /= w.sum()
    _, mask, unc = resample_array(noise, shift(0.5, 0.5), shape, uncertainty=np.full(shape, 5.0, np.float32))
    assert float(np.median(unc[~mask])) == pytest.approx(5.0 * float(np.sum(w**2)), rel=1e-5)


class CountingRows:
    """A row source that records which source rows were read."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.shape = data.shape
        self.reads: list[tuple[int, int]] = []

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        self.reads.append((y0, y1))
        return self.data[y0:y1].astype(np.float32)


def test_bands_read_only_the_source_rows_they_need_and_match_the_whole_frame():
    shape = (256, 256)
    stars = catalogue(shape, 30, seed=4)
    matrix = rotation(45.0, shape, 2.5, -1.25)
    frame, _ = observe(shape, stars, matrix, seed=1)
    counting = CountingRows(frame)
    rows = ResampledRows(counting, matrix, shape)
    whole, whole_mask, _ = resample_array(frame, matrix, shape)
    height = 16
    span = rows.input_band_height(height)
    # a 45° rotation needs about sin45·nx + cos45·height source rows (+ the kernel)
    assert span == pytest.approx(math.sqrt(0.5) * (shape[1] + height), abs=12)
    assert span > 4 * height
    for y0 in range(0, shape[0], height):
        band = rows.read_rows(y0, y0 + height)
        assert np.array_equal(band, whole[y0:y0 + height], equal_nan=True)
        assert np.array_equal(rows.read_mask_rows(y0, y0 + height), whole_mask[y0:y0 + height])
        lo, hi = rows.needed_input_rows(y0, y0 + height)
        if hi > lo:
            assert counting.reads[-1] == (lo, hi) and hi - lo <= span < shape[0]
    # each band was resampled once for its data and mask (the last band is cached)
    assert len(counting.reads) <= shape[0] // height
    assert rows.read_uncertainty_rows is None  # no uncertainty plane, no noise model
    assert ResampledRows.input_rows_for(np.eye(3), shape, shape, height) <= height + 8


def test_resampled_rows_feed_the_combine_engine(tmp_path):
    stars = catalogue(SHAPE, 15, seed=5)
    matrices = [np.eye(3), shift(2.3, -1.6), rotation(180, SHAPE, 0.4, 0.2)]
    paths = []
    for i, matrix in enumerate(matrices):
        data, sigma = observe(SHAPE, stars, matrix, seed=i)
        paths.append(write_light(tmp_path / f"f{i}.fits", data, sigma))
    sources = [ResampledRows(p, m, SHAPE) for p, m in zip(paths, matrices, strict=True)]
    result = combine(sources, method="mean", memory="4MiB")
    assert result.header["NCOMBINE"] == 3 and result.header["IMCMB002"] == "f1.fits"
    assert not result.mask[10:-10, 10:-10].any()
    assert np.all(np.isfinite(result.uncertainty[10:-10, 10:-10]))
    for source in sources:
        source.close()


def test_bad_transforms_and_names_are_input_errors():
    image = np.zeros((10, 10), np.float32)
    with pytest.raises(InputError, match="singular"):
        resample_array(image, np.zeros((3, 3)), (10, 10))
    with pytest.raises(InputError, match="3x3"):
        resample_array(image, np.eye(4), (10, 10))
    with pytest.raises(InputError, match="interpolation"):
        resample_array(image, np.eye(3), (10, 10), interpolation="cubic")
    with pytest.raises(InputError, match="infinity"):
        resample_array(image, [[1, 0, 0], [0, 1, 0], [0.2, 0, 1]], (10, 10))  # inverse: w = 1 - 0.2x


def test_bicubic_is_keys_cubic_convolution():
    """Keys (1981), a = −0.5: half a pixel weighs −1/16, 9/16, 9/16, −1/16, so a value midway
    between four columns is their weighted sum; and the kernel reproduces quadratics exactly
    (its design order), where bilinear cannot."""
    shape = (40, 40)
    rng = np.random.default_rng(8)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    data, mask, unc = resample_array(image, shift(-0.5, 0.0), shape, interpolation="bicubic",
                                     uncertainty=np.full(shape, 2.0, np.float32))
    y, x = 20, 20                      # output x = 20 takes source x = 20.5
    want = (-image[y, 19] + 9 * image[y, 20] + 9 * image[y, 21] - image[y, 22]) / 16
    assert data[y, x] == pytest.approx(want, rel=1e-5)
    assert unc[y, x] == pytest.approx(2.0 * math.sqrt((1 + 81 + 81 + 1) / 256), rel=1e-5)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    ramp = (0.3 * xx**2 - 0.2 * xx * yy + 0.1 * yy**2 + 5 * xx + 1000).astype(np.float64)
    matrix = shift(0.37, -0.61)
    inner = (slice(5, -5), slice(5, -5))
    # positions are rounded to 1/8192 px: 0.0035 at this ramp's steepest (29 per px)
    for kind, tolerance in (("bicubic", 0.006), ("bilinear", None)):
        out, mask, _ = resample_array(ramp, matrix, shape, interpolation=kind)
        truth = (0.3 * (xx - 0.37) ** 2 - 0.2 * (xx - 0.37) * (yy + 0.61) + 0.1 * (yy + 0.61) ** 2
                 + 5 * (xx - 0.37) + 1000)
        error = np.max(np.abs(out[inner] - truth[inner]))
        if tolerance is None:
            assert error > 0.05                    # bilinear misses the curvature: the test is not empty
        else:
            assert error < tolerance


@pytest.mark.parametrize("interpolation", ["lanczos3", "bicubic"])
def test_uncertainty_in_star_cores_is_the_weighted_sum_of_variances(interpolation):
    """σ_out² = Σw²σ² over the kernel (written out here from the kernels' formulas), within 0.2 %
    where σ changes steeply (a star's core, σ² = 25 + value) and to 1e-4 on the sky."""
    shape = (64, 64)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    star = 1000.0 + 4e4 * np.exp(-0.5 * ((xx - 30.3) ** 2 + (yy - 31.6) ** 2) / 1.3**2)
    sigma = np.sqrt(25.0 + star).astype(np.float32)
    dx, dy = 0.37, -0.61
    _, mask, unc = resample_array(star.astype(np.float32), shift(dx, dy), shape, interpolation=interpolation,
                                  uncertainty=sigma)
    half = 3 if interpolation == "lanczos3" else 2

    def kernel(d):
        t = np.abs(d)
        if half == 3:
            return np.where(t < 3, np.sinc(d) * np.sinc(d / 3), 0.0)
        return np.where(t <= 1, (1.5 * t - 2.5) * t * t + 1, np.where(t < 2, ((-0.5 * t + 2.5) * t - 4) * t + 2, 0.0))

    def exact(x, y):
        sx, sy = x - dx, y - dy                       # the source position of output (x, y)
        ix, iy = math.floor(sx), math.floor(sy)
        cols = np.arange(ix - half + 1, ix + half + 1)
        rows = np.arange(iy - half + 1, iy + half + 1)
        wx, wy = kernel(sx - cols), kernel(sy - rows)
        wx, wy = wx / wx.sum(), wy / wy.sum()
        w2 = np.outer(wy, wx) ** 2
        return math.sqrt(float((w2 * sigma[np.ix_(rows, cols)].astype(np.float64) ** 2).sum()))

    core = [(x, y) for y in range(29, 35) for x in range(28, 34)]
    worst = max(abs(unc[y, x] / exact(x, y) - 1) for x, y in core)
    assert worst < 1e-3          # the tabulated phases (1/8192 px) in a core this steep: 2e-4
    for x, y in [(10, 10), (50, 12), (12, 50)]:
        assert unc[y, x] == pytest.approx(exact(x, y), rel=1e-4)
    assert not mask[29:35, 28:34].any()


@pytest.mark.parametrize("taps", [2, 4, 6])
def test_footprint_counts_equal_plain_box_sums(taps):
    # the running column sums against a box sum of each footprint, rows past the band's end
    # counted as good, for every chunk of rows a thread may be given
    from ccdcal.stacking.resample import _footprint_counts

    rng = np.random.default_rng(taps)
    for shape in ((1, 5), (7, 3), (40, 33), (13, 64)):
        bad = (rng.random(shape) < 0.2).astype(np.float32)
        padded = np.zeros((shape[0] + taps, shape[1] + taps))
        padded[:shape[0], :shape[1]] = bad
        box = np.array([[padded[r:r + taps, x:x + taps].sum() for x in range(shape[1])]
                        for r in range(shape[0])])
        for r0, r1 in ((0, shape[0]), (min(2, shape[0]), shape[0]), (0, min(3, shape[0]))):
            near = np.full(shape, -1.0, np.float32)
            _footprint_counts(bad, taps, near, r0, r1)
            np.testing.assert_array_equal(near[r0:r1], box[r0:r1])
            assert (near[:r0] == -1).all() and (near[r1:] == -1).all()


def _star_image(shape, xy, flux, sigma=1.3):
    """Gaussian stars integrated over each pixel (written here, not by the code under test)."""
    from scipy.special import erf

    ny, nx = shape
    image = np.full(shape, 1000.0)
    ex, ey = np.arange(nx + 1) - 0.5, np.arange(ny + 1) - 0.5
    for (x, y), f in zip(xy, flux, strict=True):
        px = np.diff(0.5 * (1 + erf((ex - x) / (sigma * math.sqrt(2)))))
        py = np.diff(0.5 * (1 + erf((ey - y) / (sigma * math.sqrt(2)))))
        image += f * np.outer(py, px)
    return image


def _turn(degrees, dx=3.37, dy=-4.61):
    t = math.radians(degrees)
    return np.array([[math.cos(t), -math.sin(t), dx], [math.sin(t), math.cos(t), dy], [0.0, 0.0, 1.0]])


@pytest.mark.parametrize("interpolation", ["lanczos3", "bicubic"])
@pytest.mark.parametrize("degrees", [0.3, 1.1])
def test_two_pass_kernel_is_as_true_as_the_direct_one(monkeypatch, degrees, interpolation):
    """Small turns take the two-pass kernel (the kernel on axes sheared by the turn): against
    stars rendered at their true positions its error is the direct kernel's (rms within 2 %),
    its σ within 1 % of the direct kernel's, and the same pixels are invalid (2 % masked
    pixels, a NaN, the edges)."""
    from ccdcal.stacking import resample

    rng = np.random.default_rng(2)
    shape = (240, 260)
    xy = np.column_stack([rng.uniform(30, 230, 40), rng.uniform(30, 210, 40)])
    flux = rng.uniform(1e4, 5e4, 40)
    matrix = _turn(degrees)
    inverse = np.linalg.inv(matrix)
    truth = _star_image(shape, xy, flux)
    source = _star_image(shape, xy @ inverse[:2, :2].T + inverse[:2, 2], flux).astype(np.float32)
    sigma = np.sqrt(25.0 + source).astype(np.float32)
    mask = (rng.random(shape) < 0.02).astype(np.uint8)
    source[7, 9] = np.nan
    assert resample.shears_well(inverse)
    two = resample_array(source, matrix, shape, mask=mask, uncertainty=sigma, interpolation=interpolation)
    monkeypatch.setattr(resample, "shears_well", lambda minv: False)
    direct = resample_array(source, matrix, shape, mask=mask, uncertainty=sigma, interpolation=interpolation)
    assert np.array_equal(two[1], direct[1])
    inner = (slice(25, -25), slice(25, -25))
    good = ~direct[1][inner]
    rms = [math.sqrt(float(np.mean((out[0][inner] - truth[inner])[good] ** 2))) for out in (two, direct)]
    assert rms[0] == pytest.approx(rms[1], rel=0.02)
    assert rms[1] < (3.0 if interpolation == "lanczos3" else 5.0)    # not a comparison of two failures
    assert np.max(np.abs(two[2][inner][good] / direct[2][inner][good] - 1)) < 0.01


def test_two_pass_kernel_invalid_pixels_match_the_direct_ones_at_the_largest_turn(monkeypatch):
    """At the largest turn the two-pass kernel takes (tan θ = 0.02) and under flips, with 2 % bad
    pixels, every output pixel is invalid in both kernels or in neither: a direct tap that the
    sheared taps leave out weighs below NEGLIGIBLE (the reviewer's case: bilinear at 5° differed)."""
    from ccdcal.stacking import resample

    rng = np.random.default_rng(7)
    shape = (200, 300)
    source = rng.normal(100.0, 5.0, shape).astype(np.float32)
    mask = (rng.random(shape) < 0.02).astype(np.uint8)
    t = math.atan(0.0199)
    turns = [np.array([[math.cos(a), -math.sin(a), dx], [math.sin(a), math.cos(a), dy], [0, 0, 1.0]])
             for a in (t, -t) for dx, dy in ((0.9, 0.0), (0.37, -0.61), (-2.2, 1.45))]
    turns.append(np.array([[-1.0, 0, 299.3], [0, -1.0, 199.6], [0, 0, 1]]))
    for interpolation in ("lanczos3", "bicubic"):
        for matrix in turns:
            assert resample.shears_well(np.linalg.inv(matrix))
            two = resample_array(source, matrix, shape, mask=mask, interpolation=interpolation)[1]
            with monkeypatch.context() as m:
                m.setattr(resample, "shears_well", lambda minv: False)
                direct = resample_array(source, matrix, shape, mask=mask, interpolation=interpolation)[1]
            assert np.array_equal(two, direct), (interpolation, matrix)


def test_two_pass_kernel_only_for_small_affine_turns():
    from ccdcal.stacking.resample import ResampledRows, shears_well

    assert shears_well(np.linalg.inv(_turn(0.0))) and shears_well(np.linalg.inv(_turn(1.1)))
    flip = np.diag([-1.0, -1.0, 1.0])
    assert shears_well(flip)                                 # a meridian flip: exact copies either way
    assert not shears_well(np.linalg.inv(_turn(90.0))) and not shears_well(np.linalg.inv(_turn(1.2)))
    projective = np.eye(3)
    projective[2, 0] = 1e-5
    assert not shears_well(projective)
    image = np.zeros((16, 16), np.float32)
    assert ResampledRows(image, _turn(0.3), (16, 16))._sheared
    assert not ResampledRows(image, _turn(0.3), (16, 16), interpolation="bilinear")._sheared
