"""Star detection, frame quality flags and registration on synthetic star fields.

The truth is built independently of the code under test: a star catalogue on the reference
grid, a known affine map ``A`` (reference → frame) applied to the catalogue positions, and the
frame rendered from the mapped catalogue with pixel-integrated Gaussian PSFs, sky and noise.
The expected registration (frame → reference) is then ``A⁻¹``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy.special import erf

from ccdcal.errors import CcdcalError, InputError
from ccdcal.stacking.register import (
    FrameQuality,
    RegistrationError,
    Stars,
    Transform,
    detect_stars,
    find_transform,
    flag_outliers,
    frame_quality,
    register_frames,
)

SIZE = 512
SKY = 1000.0
FWHM = 3.0
#: Catalogue area on the reference grid: wide enough that any rotated frame is full of stars.
LO, HI = -300.0, SIZE + 300.0
DENSITY = 150 / SIZE**2


def make_catalogue(seed: int = 1, density: float = DENSITY) -> tuple[np.ndarray, np.ndarray]:
    """Star positions (n, 2) over [LO, HI)² and power-law fluxes N(>F) ∝ F⁻¹, 2500–3e5 ADU."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(density * (HI - LO) ** 2)
    xy = rng.uniform(LO, HI, size=(n, 2))
    flux = np.minimum(2500.0 / (1.0 - rng.uniform(size=n)), 3e5)
    return xy, flux


def affine(rotation_deg: float = 0.0, scale: float = 1.0, shift=(0.0, 0.0),
           centre=(0.0, 0.0)) -> np.ndarray:
    """3×3 matrix: rotate and scale about ``centre``, then shift."""
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    lin = scale * np.array([[c, -s], [s, c]])
    centre = np.asarray(centre, dtype=np.float64)
    m = np.eye(3)
    m[:2, :2] = lin
    m[:2, 2] = centre - lin @ centre + np.asarray(shift)
    return m


def apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    return xy @ m[:2, :2].T + m[:2, 2]


def _pixel_profile(centre: float, sigma: float, start: int, count: int) -> np.ndarray:
    """Fraction of a unit 1-D Gaussian in each pixel [i-0.5, i+0.5) from ``start``."""
    edges = np.arange(start, start + count + 1) - 0.5
    return 0.5 * np.diff(erf((edges - centre) / (math.sqrt(2.0) * sigma)))


def render(xy: np.ndarray, flux: np.ndarray, *, fwhm: float = FWHM, sky: float = SKY,
           seed: int = 0, trail: float = 0.0, shape=(SIZE, SIZE)) -> np.ndarray:
    """Image of Gaussian stars (pixel-integrated) on a flat sky with Poisson-like noise.

    With ``trail`` > 0 each star is 10 PSFs spread evenly along a ``trail``-px line at 35°.
    """
    ny, nx = shape
    image = np.full(shape, sky, dtype=np.float64)
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    half = int(math.ceil(5 * sigma)) + 1
    steps = np.linspace(-trail / 2, trail / 2, 10) if trail > 0 else np.zeros(1)
    direction = np.array([math.cos(math.radians(35)), math.sin(math.radians(35))])
    for (x0, y0), f in zip(xy, flux, strict=True):
        for t in steps:
            x, y = x0 + t * direction[0], y0 + t * direction[1]
            i0, j0 = int(round(x)) - half, int(round(y)) - half
            if i0 + 2 * half < 0 or j0 + 2 * half < 0 or i0 >= nx or j0 >= ny:
                continue
            stamp = np.outer(_pixel_profile(y, sigma, j0, 2 * half + 1),
                             _pixel_profile(x, sigma, i0, 2 * half + 1)) * (f / len(steps))
            ci, cj = max(i0, 0), max(j0, 0)
            ce, re = min(i0 + 2 * half + 1, nx), min(j0 + 2 * half + 1, ny)
            image[cj:re, ci:ce] += stamp[cj - j0:re - j0, ci - i0:ce - i0]
    rng = np.random.default_rng(seed)
    return (image + rng.normal(size=shape) * np.sqrt(image)).astype(np.float32)


def frame(m: np.ndarray, *, seed: int, cat_seed: int = 1, flux_factor: float = 1.0,
          **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render the catalogue mapped by ``m`` (reference → frame); image and the frame truth."""
    xy, flux = make_catalogue(cat_seed)
    fxy = apply(m, xy)
    ny, nx = kw.get("shape", (SIZE, SIZE))
    inside = (fxy[:, 0] > -20) & (fxy[:, 0] < nx + 20) & (fxy[:, 1] > -20) & (fxy[:, 1] < ny + 20)
    return render(fxy[inside], flux[inside] * flux_factor, seed=seed, **kw), fxy[inside], \
        flux[inside] * flux_factor


@pytest.fixture(scope="module")
def reference() -> Stars:
    image, _, _ = frame(np.eye(3), seed=100)
    return detect_stars(image)


def grid_error(t: Transform, truth_ref_to_frame: np.ndarray) -> float:
    """RMS (px) over a grid across the frame between ``t`` and the true frame → reference map."""
    g = np.linspace(0, SIZE - 1, 9)
    gx, gy = np.meshgrid(g, g)
    pts = np.column_stack([gx.ravel(), gy.ravel()])
    expected = apply(np.linalg.inv(truth_ref_to_frame), pts)
    xr, yr = t.apply(pts[:, 0], pts[:, 1])
    return float(np.sqrt(np.mean((xr - expected[:, 0]) ** 2 + (yr - expected[:, 1]) ** 2)))


CASES = {
    "shift": affine(shift=(13.37, -7.21)),
    "rotation 30 off-centre": affine(30.0, centre=(120.0, 380.0), shift=(4.2, -2.7)),
    "meridian flip": affine(180.0, centre=(SIZE / 2, SIZE / 2), shift=(21.6, -14.3)),
    "scale 1% + rotation 5": affine(5.0, 1.01, centre=(200.0, 300.0), shift=(-6.5, 9.1)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transform_recovered_to_005_px(name: str, reference: Stars) -> None:
    truth = CASES[name]
    image, _, _ = frame(truth, seed=10 + list(CASES).index(name))
    stars = detect_stars(image)
    t = find_transform(stars, reference)
    err = grid_error(t, truth)
    assert err < 0.05, (name, err, t)
    assert t.n_matched >= 50 and t.rms < 0.3
    inv = np.linalg.inv(truth)
    assert t.scale == pytest.approx(math.sqrt(abs(np.linalg.det(inv[:2, :2]))), abs=2e-4)
    expected_rot = math.degrees(math.atan2(inv[1, 0] - inv[0, 1], inv[0, 0] + inv[1, 1]))
    assert (t.rotation - expected_rot + 180) % 360 - 180 == pytest.approx(0, abs=0.02)
    back = t.inverse()
    assert np.allclose(back.matrix @ t.matrix, np.eye(3), atol=1e-9)


def test_register_frames_gives_identity_for_reference_and_errors_in_place(reference) -> None:
    image, _, _ = frame(CASES["shift"], seed=5)
    few = detect_stars(render(np.array([[100.0, 100.0], [300.0, 200.0]]),
                              np.array([5e4, 4e4]), seed=6))
    out = register_frames([reference, detect_stars(image), few], 0)
    assert isinstance(out[0], Transform) and np.array_equal(out[0].matrix, np.eye(3))
    assert isinstance(out[1], Transform) and grid_error(out[1], CASES["shift"]) < 0.05
    assert isinstance(out[2], RegistrationError)


def test_two_stars_raise_registration_error(reference: Stars) -> None:
    stars = detect_stars(render(np.array([[100.0, 100.0], [300.0, 200.0]]),
                                np.array([5e4, 4e4]), seed=7))
    assert len(stars) == 2
    with pytest.raises(RegistrationError, match="only 2 stars found in the frame; needs at least 3"):
        find_transform(stars, reference)
    assert issubclass(RegistrationError, CcdcalError)


def test_unrelated_fields_do_not_match(reference: Stars) -> None:
    image, _, _ = frame(np.eye(3), seed=8, cat_seed=99)
    with pytest.raises(RegistrationError, match="no transform matched more than"):
        find_transform(detect_stars(image), reference)


def test_empty_frame_has_no_stars_and_is_flagged() -> None:
    rng = np.random.default_rng(3)
    image = (SKY + rng.normal(size=(SIZE, SIZE)) * math.sqrt(SKY)).astype(np.float32)
    stars = detect_stars(image)
    q = frame_quality(stars, image.shape)
    assert q.n_stars == 0 and math.isnan(q.fwhm)
    assert q.background == pytest.approx(SKY, rel=0.01)
    assert q.noise == pytest.approx(math.sqrt(SKY), rel=0.05)
    assert flag_outliers([q], ["empty.fits"]) == ["no stars found"]


def test_positions_and_fwhm_match_the_injected_catalogue() -> None:
    image, truth, flux = frame(np.eye(3), seed=11)
    stars = detect_stars(image)
    assert len(stars) > 100
    d, j = _nearest(np.column_stack([stars.x, stars.y]), truth)
    bright = (flux[j] > 1.5e4) & (d < 1.0)
    assert bright.sum() >= 15
    rms = float(np.sqrt(np.mean(d[bright] ** 2)))
    assert rms < 0.05, rms
    q = frame_quality(stars, image.shape)
    assert q.fwhm == pytest.approx(FWHM, rel=0.10)
    assert q.eccentricity < 0.4
    assert q.background == pytest.approx(SKY, rel=0.01)


def test_masked_and_nan_pixels_are_honoured() -> None:
    xy = np.array([[100.0, 100.0], [300.0, 200.0], [400.0, 420.0], [250.0, 320.0]])
    image = render(xy, np.full(4, 5e4), seed=12)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[100, 101] = 8  # a flagged cosmic ray on the first star
    image[200, 300] = np.nan  # a NaN on the second
    stars = detect_stars(image, mask)
    found = sorted(zip(np.round(stars.x), np.round(stars.y), strict=True))
    assert found == [(250.0, 320.0), (400.0, 420.0)]


def test_input_types_and_errors() -> None:
    image, _, _ = frame(np.eye(3), seed=13)
    native = detect_stars(image)
    swapped = detect_stars(image.astype(">f8"))
    assert len(swapped) == len(native)
    assert np.allclose(swapped.x, native.x, atol=1e-3) and np.allclose(swapped.y, native.y, atol=1e-3)
    as_uint16 = detect_stars(np.clip(image, 0, 65535).astype(np.uint16))
    assert abs(len(as_uint16) - len(native)) <= 3
    with pytest.raises(InputError, match="mask shape"):
        detect_stars(image, np.zeros((10, 10), bool))
    with pytest.raises(InputError, match="2-D image"):
        detect_stars(image[0])
    with pytest.raises(InputError, match="3 qualities but 2 names"):
        flag_outliers([frame_quality(native, image.shape)] * 3, ["a", "b"])


def _nearest(found: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    return cKDTree(truth).query(found)


@pytest.fixture(scope="module")
def normal_group() -> list[FrameQuality]:
    out = []
    for k in range(5):
        m = affine(shift=(3.0 * k, -2.0 * k))
        image, _, _ = frame(m, seed=200 + k)
        out.append(frame_quality(detect_stars(image), image.shape))
    return out


def _flags_with(normal: list[FrameQuality], odd: FrameQuality) -> list[str | None]:
    qualities = [*normal, odd]
    return flag_outliers(qualities, [f"f{i}" for i in range(len(qualities))])


def test_trailed_frame_is_flagged(normal_group) -> None:
    image, _, _ = frame(np.eye(3), seed=300, trail=12.0)
    q = frame_quality(detect_stars(image), image.shape)
    flags = _flags_with(normal_group, q)
    assert flags[:5] == [None] * 5
    assert flags[5] is not None and flags[5].startswith("trailed: eccentricity"), flags[5]


def test_cloudy_frame_is_flagged(normal_group) -> None:
    image, _, _ = frame(np.eye(3), seed=301, flux_factor=0.15, sky=3 * SKY)
    q = frame_quality(detect_stars(image), image.shape)
    flags = _flags_with(normal_group, q)
    assert flags[:5] == [None] * 5
    assert flags[5] is not None and flags[5].startswith("cloudy: "), flags[5]
    assert "stars vs" in flags[5] and "the group's" in flags[5]


def test_defocused_frame_is_flagged(normal_group) -> None:
    image, _, _ = frame(np.eye(3), seed=302, fwhm=2 * FWHM)
    q = frame_quality(detect_stars(image), image.shape)
    assert q.fwhm == pytest.approx(2 * FWHM, rel=0.10)
    flags = _flags_with(normal_group, q)
    assert flags[:5] == [None] * 5
    assert flags[5] is not None and flags[5].startswith("out of focus: FWHM"), flags[5]


def test_small_groups_flag_nothing(normal_group) -> None:
    assert flag_outliers(normal_group[:3], ["a", "b", "c"]) == [None, None, None]
    assert flag_outliers(normal_group[:2], ["a", "b"]) == [None, None]
    assert flag_outliers(normal_group[:1], ["a"]) == [None]
    bad = FrameQuality(n_stars=40, fwhm=9.0, eccentricity=0.9, background=5000.0, noise=70.0)
    assert flag_outliers([normal_group[0], bad], ["a", "b"]) == [None, None]


def test_transform_value_semantics() -> None:
    t = Transform(affine(90.0, 2.0, shift=(5.0, -3.0)), n_matched=7, rms=0.1)
    assert t.rotation == pytest.approx(90.0)
    assert t.scale == pytest.approx(2.0)
    assert t.shift == pytest.approx((5.0, -3.0))
    assert t.apply(1.0, 0.0) == pytest.approx((5.0, -1.0))
    assert t.inverse().apply(*t.apply(3.0, 4.0)) == pytest.approx((3.0, 4.0))
    assert t.inverse().rms == pytest.approx(0.05)
    with pytest.raises(ValueError):
        t.matrix[0, 0] = 1.0


def test_detection_and_registration_are_fast(reference: Stars) -> None:
    image, _, _ = frame(CASES["meridian flip"], seed=400)
    start = time.perf_counter()
    find_transform(detect_stars(image), reference)
    assert time.perf_counter() - start < 2.0


def test_short_exposures_are_shallow_not_cloudy():
    """A night of 60 s and 3 s frames of one field (issue 29): the 3 s frames show fewer stars
    and a fainter sky, as they should; judged per unit exposure none is cloudy. A 60 s frame
    through cloud (few stars for its exposure) and one with a bright sky per second still are."""
    from ccdcal.stacking.register import FrameQuality, flag_outliers

    deep = [FrameQuality(100 + k, 3.0, 0.1, 600.0 + k, 12.0) for k in range(6)]
    shallow = [FrameQuality(21 + k, 3.0, 0.1, 30.0 + k, 3.0) for k in range(3)]
    names = [f"f{i}" for i in range(9)]
    exptimes = [60.0] * 6 + [3.0] * 3
    assert flag_outliers(deep + shallow, names, exptimes) == [None] * 9
    # without the exposures, the old verdict: the shallow frames look cloudy
    assert all(r and r.startswith("cloudy") for r in flag_outliers(deep + shallow, names)[6:])
    cloud = FrameQuality(30, 3.0, 0.1, 610.0, 12.0)               # 60 s, a third of the stars
    moon = FrameQuality(104, 3.0, 0.1, 4000.0, 30.0)              # 60 s, the sky 6x brighter
    verdicts = flag_outliers([*deep, cloud, moon, *shallow], [*names[:6], "cloud", "moon", *names[6:]],
                             [60.0] * 8 + [3.0] * 3)
    assert verdicts[6].startswith("cloudy: 30 stars") and "background" in verdicts[7]
    assert verdicts[:6] == [None] * 6 and verdicts[8:] == [None] * 3


@pytest.mark.parametrize("shape", [(1024, 1280), (1025, 1279)])
def test_a_sky_sampled_on_a_quarter_of_the_pixels_finds_the_same_stars(shape):
    """``sampled_sky``: a large mono frame's sky measured on every other pixel of every other row
    (even and odd sides) gives the stars of the full measurement at the same places (1/100 px)
    and the sky's level and rms within 1 %, with a gradient and masked rows; its fluxes are as
    true (median within 1 % of the injected ones, as the full measurement's); and its sky map is
    within 1.4× the full map's error against the injected sky (meshes of 32 sampled pixels:
    1.55×), 3 % of the pixels' noise."""
    from ccdcal.stacking.stars import _subtract_background
    from starfield import catalogue, observe

    stars = catalogue(shape, 400, seed=5)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    sky = 0.05 * xx + 0.03 * yy                                  # a gradient of 90 ADU on 1000
    errors = []
    for seed in (3, 4):
        data, _ = observe(shape, stars, np.eye(3), seed=seed)
        data += sky.astype(np.float32)
        errors.append([math.sqrt(float(np.mean(((data - _subtract_background(data, None, sampled)[0])
                                                 - 1000.0 - sky)[50:-50, 50:-50] ** 2)))
                       for sampled in (False, True)])
    (full_error, sampled_error) = np.mean(errors, axis=0)
    assert sampled_error < 1.4 * full_error and sampled_error < 0.03 * 32.0
    mask = np.zeros(shape, np.uint8)
    mask[200:203, :] = 1
    full = detect_stars(data, mask)
    sampled = detect_stars(data, mask, sampled_sky=True)
    near = np.hypot(full.x[:, None] - sampled.x[None], full.y[:, None] - sampled.y[None])
    j = near.argmin(axis=1)
    matched = near[np.arange(len(full)), j] < 0.5
    assert len(full) == 300 and matched.sum() >= 0.98 * len(full)
    assert np.max(near[np.arange(len(full)), j][matched]) < 0.01
    assert sampled.background == pytest.approx(full.background, rel=0.01)
    assert sampled.background_rms == pytest.approx(full.background_rms, rel=0.01)
    for found in (full, sampled):
        k = np.hypot(stars[:, :1] - found.x[None], stars[:, 1:2] - found.y[None]).argmin(axis=0)
        assert np.median(np.hypot(stars[k, 0] - found.x, stars[k, 1] - found.y)) < 0.05   # the stars
        assert abs(np.median(found.flux / stars[k, 2]) - 1) < 0.01
