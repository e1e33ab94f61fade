"""compat="ccdproc" reproduces ccdproc.combine on random settings (within float32 rounding)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ccdcal.combining.engine import combine

ccdproc = pytest.importorskip("ccdproc")


def _ccdproc_combine(stack, masks, **kw):
    from astropy.nddata import CCDData

    ccds = [CCDData(stack[i].astype(np.float64), unit="adu", mask=None if masks is None else masks[i])
            for i in range(stack.shape[0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ccdproc.combine(ccds, mem_limit=1e9, **kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 12),
       method=st.sampled_from(["median", "mean", "sum"]),
       extrema=st.sampled_from([None, (1, 1), (2, 0), (0, 3)]),
       sigma=st.sampled_from([None, (1.0, 1.0), (2.0, 1.5), (3.0, 3.0)]),
       center=st.sampled_from(["mean", "median"]), spread=st.sampled_from(["sigma", "mad"]),
       scaled=st.booleans(), weighted=st.booleans(), nan_fraction=st.sampled_from([0.0, 0.1]),
       masked=st.booleans())
def test_compat_ccdproc_matches_ccdproc(seed, n, method, extrema, sigma, center, spread, scaled,
                                        weighted, nan_fraction, masked):
    from astropy.stats import mad_std

    assume(extrema is None or max(extrema) <= n)  # ccdproc itself fails beyond that
    rng = np.random.default_rng(seed)
    stack = rng.normal(100, 10, (n, 5, 6)).astype(np.float32)
    hits = rng.random(stack.shape) < 0.1
    stack[hits] += np.float32(500)
    stack[rng.random(stack.shape) < nan_fraction] = np.nan
    masks = rng.random(stack.shape) < 0.1 if masked else None
    scales = rng.uniform(0.5, 2.0, n) if scaled else None
    weights = rng.uniform(0.5, 2.0, n) if weighted and method != "median" else None

    kw = {"method": "average" if method == "mean" else method}
    if extrema:
        kw.update(clip_extrema=True, nlow=extrema[0], nhigh=extrema[1])
    if sigma:
        kw.update(sigma_clip=True, sigma_clip_low_thresh=sigma[0], sigma_clip_high_thresh=sigma[1],
                  sigma_clip_func=np.ma.median if center == "median" else np.ma.mean,
                  sigma_clip_dev_func=mad_std if spread == "mad" else np.ma.std)
    if scales is not None:
        kw["scale"] = scales
    if weights is not None:
        kw["weights"] = weights
    expected = _ccdproc_combine(stack, masks, **kw)

    frames = [np.ma.MaskedArray(stack[i], mask=masks[i]) if masked else stack[i] for i in range(n)]
    result = combine(frames, method=method, clip_extrema=extrema, sigma_clip=sigma,
                     reject=spread if sigma else None, center=center, scale=scales,
                     weights=weights, compat="ccdproc")

    np.testing.assert_array_equal(result.mask, expected.mask)
    want = np.asarray(expected.data, dtype=np.float32)
    np.testing.assert_allclose(result.data, want, rtol=2e-7, atol=0, equal_nan=True)
    want_err = np.asarray(expected.uncertainty.array, dtype=np.float32)
    np.testing.assert_allclose(result.uncertainty, want_err, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_compat_clips_unscaled_data():
    # ccdproc rejects extrema before scaling: the frame with the largest raw value loses its
    # pixel even though, scaled, it is the lowest.
    stack = np.array([[[10.0]], [[20.0]], [[30.0]]], np.float32)
    scales = [1.0, 1.0, 0.1]
    compat = combine(list(stack), method="mean", clip_extrema=(0, 1), scale=scales, compat="ccdproc")
    assert compat.data[0, 0] == pytest.approx(15.0)
    ours = combine(list(stack), method="mean", clip_extrema=(0, 1), scale=scales)
    assert ours.data[0, 0] == pytest.approx(6.5)
