"""Hot pixels stand out from their neighbourhood; amp glow, warm corners and gradients are the
dark's signal, never defects (issue 27)."""

from __future__ import annotations

import numpy as np

from ccdcal.calibration.masters import dark_structure, hot_pixel_mask


def _dark(rng, shape=(300, 400), glow=True):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    level = np.full(shape, 800.0)
    if glow:   # a corner glowing to 60x the noise, falling off over ~40 px, and a gentle gradient
        level += 150.0 * np.exp(-np.hypot(yy - ny, xx - nx) / 40.0) + 0.01 * xx
    noise = np.sqrt(2.5**2 + np.maximum(level - 800.0, 0) / 4.0)        # read noise + glow shot noise
    dark = level + rng.normal(0.0, 1.0, shape) * noise
    hot = np.zeros(shape, bool)
    idx = rng.choice(dark.size, 120, replace=False)
    hot.flat[idx] = True
    dark.flat[idx] += rng.uniform(40.0, 400.0, idx.size)                # 16x-160x the read noise
    return dark.astype(np.float32), hot, level


def test_glow_is_not_masked_and_hot_pixels_are_found_in_it_too():
    rng = np.random.default_rng(4)
    dark, hot, level = _dark(rng)
    found = hot_pixel_mask(dark, sigma=5.0)
    glowing = level > 800.0 + 10 * 2.5
    assert glowing.mean() > 0.02                           # the glow covers a real part of the frame
    assert (found & ~hot).mean() < 1e-4                    # almost no false pixel (a Gaussian 5σ: 3e-7)
    assert found[glowing & ~hot].sum() == 0                # and none in the glow
    assert found[hot].mean() > 0.95                        # hot pixels found, in the glow as elsewhere
    assert found[hot & glowing].sum() >= 0.9 * (hot & glowing).sum()


def test_a_flat_dark_is_judged_as_before_against_its_median():
    """A dark without structure (a CCD's) has no local background: the frame's median and MAD
    judge every pixel, so the mask is exactly the global rule's."""
    rng = np.random.default_rng(5)
    dark, hot, _ = _dark(rng, glow=False)
    assert dark_structure(dark, float(np.median(dark)), 2.5) is None
    centre = np.median(dark)
    spread = 1.4826 * np.median(np.abs(dark - centre))
    np.testing.assert_array_equal(hot_pixel_mask(dark, sigma=5.0), dark - np.float32(centre) > 5.0 * spread)


def test_a_frame_too_small_for_blocks_uses_the_global_rule():
    rng = np.random.default_rng(6)
    dark = rng.normal(100.0, 2.0, (20, 20)).astype(np.float32)
    dark[3, 4] = 200.0
    assert dark_structure(dark, 100.0, 2.0) is None
    assert hot_pixel_mask(dark).sum() == 1 and hot_pixel_mask(dark)[3, 4]
