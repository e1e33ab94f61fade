"""Every combine algorithm against a plain numpy oracle, on random stacks with NaNs, masks and ties."""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccdcal.combining.engine import combine

MAD_TO_STD = 1.482602218505602


# Sums run in sorted order, one value after another, like the kernel, so that values sitting
# exactly on a rejection threshold (common with tied integer data) are decided the same way.
def _sum(values):
    return functools.reduce(operator.add, (float(v) for v in values), 0.0)


def _mean(x):
    return _sum(x) / x.size


def _std(x, ddof=0):
    mean = _mean(x)
    return np.sqrt(_sum((x - mean) ** 2) / (x.size - ddof))


# -- the oracle: one pixel at a time, numpy on 1-D arrays, definitions as in ccdcal.combining.engine ---
def _bounds(x, frames, reject, center, low, high, scales, zeros, gain, rdnoise, snoise):
    def centre():
        return np.median(x) if center == "median" else _mean(x)

    if reject == "sigma":
        c, s = centre(), _std(x)
    elif reject == "mad":
        c, s = centre(), MAD_TO_STD * np.median(np.abs(x - np.median(x)))
        if s == 0:     # quantised values, half of them equal: the spread of all (issue 27)
            s = _std(x)
    elif reject == "winsorized":
        c, s = centre(), _std(x)
        for _ in range(10):
            new = 1.134 * _std(np.clip(x, c - 1.5 * s, c + 1.5 * s))
            done = abs(new - s) <= 0.0005 * s
            s = new
            if done:
                break
    elif reject == "percentile":
        c = np.median(x)
        s = abs(c)
    elif reject == "linear-fit":
        k = np.arange(x.size, dtype=float)
        kbar = (x.size - 1) / 2.0
        slope = _sum((k - kbar) * (x - _mean(x))) / _sum((k - kbar) ** 2)
        c = (_mean(x) - slope * kbar) + slope * k
        s = _mean(np.abs(x - c))
    elif reject == "ccdclip":
        c = centre()
        level = np.maximum((c - zeros[frames]) / scales[frames], 0.0)
        s = scales[frames] * np.sqrt((rdnoise / gain) ** 2 + level / gain + (snoise * level) ** 2)
    else:
        raise AssertionError(reject)
    return c - s * low, c + s * high


def oracle_pixel(values, valid, unc, *, scales, zeros, weights, method, nlow, nhigh, reject,
                 center, maxiters, low, high, gain=1.0, rdnoise=0.0, snoise=0.0):
    n = values.size
    frames = np.flatnonzero(np.isfinite(values) & valid)
    x = values[frames].astype(np.float64) * scales[frames] + zeros[frames]
    order = np.argsort(x, kind="stable")
    x, frames = x[order], frames[order]
    nl = nh = 0
    if nlow + nhigh and x.size > nlow + nhigh:
        x, frames = x[nlow: x.size - nhigh], frames[nlow: x.size - nhigh]
        nl, nh = nlow, nhigh
    passes = 0
    while reject != "none" and x.size >= 3 and (maxiters is None or passes < maxiters):
        passes += 1
        lower, upper = _bounds(x, frames, reject, center, low, high, scales, zeros, gain, rdnoise, snoise)
        is_low = x < lower
        is_high = (x > upper) & ~is_low
        if not (is_low.any() or is_high.any()):
            break
        if reject == "ccdclip" and (is_low | is_high).all():
            break  # IRAF's nkeep: a pass that would reject every value rejects none
        nl += int(is_low.sum())
        nh += int(is_high.sum())
        keep = ~(is_low | is_high)
        x, frames = x[keep], frames[keep]
        if reject == "percentile":
            break
    if x.size == 0:
        return np.nan, np.nan, nl, nh
    w = weights[frames] if method != "median" else np.ones(x.size)
    result = np.median(x) if method == "median" else _sum(w * x) / _sum(w)
    if unc is not None:
        err = np.sqrt(_sum((w * scales[frames] * unc[frames]) ** 2)) / _sum(w)
    elif x.size > 1:
        std = _std(x, ddof=1)
        err = std / np.sqrt(x.size) if method == "median" else std * np.sqrt(_sum(w**2)) / _sum(w)
    else:
        err = 0.0
    if method == "median":
        err *= 1.2533
    elif method == "sum":
        result *= n
        err *= n
    return result, err, nl, nh


def oracle(stack, valid, unc, **kw):
    n, ny, nx = stack.shape
    data = np.empty((ny, nx))
    err = np.empty((ny, nx))
    nlow = np.zeros((ny, nx), int)
    nhigh = np.zeros((ny, nx), int)
    for y in range(ny):
        for x in range(nx):
            data[y, x], err[y, x], nlow[y, x], nhigh[y, x] = oracle_pixel(
                stack[:, y, x], valid[:, y, x], None if unc is None else unc[:, y, x], **kw)
    return data, err, nlow, nhigh


# -- random stacks: few distinct values (ties), NaNs, masks ----------------------------------------
@st.composite
def stacks(draw, max_frames=11):
    n = draw(st.integers(1, max_frames))
    ny = draw(st.integers(1, 3))
    nx = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["ties", "normal", "outliers"]))
    if kind == "ties":
        stack = rng.integers(0, 4, (n, ny, nx)).astype(np.float32) * 10 + 100
    else:
        stack = rng.normal(100, 5, (n, ny, nx)).astype(np.float32)
        if kind == "outliers":
            hits = rng.random((n, ny, nx)) < 0.15
            stack[hits] += rng.choice([-80.0, 200.0, 3000.0], hits.sum()).astype(np.float32)
    stack[rng.random((n, ny, nx)) < draw(st.sampled_from([0.0, 0.1, 0.3]))] = np.nan
    valid = rng.random((n, ny, nx)) >= draw(st.sampled_from([0.0, 0.0, 0.15]))
    return stack, valid, rng


def _run(stack, valid, unc=None, **kw):
    frames = []
    for i in range(stack.shape[0]):
        if unc is not None:
            from astropy.nddata import CCDData, StdDevUncertainty

            frames.append(CCDData(stack[i], unit="adu", mask=~valid[i],
                                  uncertainty=StdDevUncertainty(unc[i])))
        elif not valid.all():
            frames.append(np.ma.MaskedArray(stack[i], mask=~valid[i]))
        else:
            frames.append(stack[i])
    return combine(frames, **kw)


def _check(result, expected):
    data, err, nlow, nhigh = expected
    np.testing.assert_array_equal(result.nlow_rejected, nlow)
    np.testing.assert_array_equal(result.nhigh_rejected, nhigh)
    np.testing.assert_array_equal(result.mask, np.isnan(data))
    np.testing.assert_allclose(result.data, data.astype(np.float32), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(result.uncertainty, err.astype(np.float32), rtol=1e-5, atol=1e-4)
    assert result.data.dtype == np.float32 and result.uncertainty.dtype == np.float32


ALGORITHMS = ["sigma", "mad", "winsorized", "percentile", "linear-fit", "ccdclip"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("reject", ALGORITHMS)
@SETTINGS
@given(case=stacks(), method=st.sampled_from(["median", "mean", "sum"]),
       center=st.sampled_from(["median", "mean"]), extrema=st.sampled_from([None, (1, 1), (0, 2), (2, 0)]),
       thresholds=st.sampled_from([(3.0, 3.0), (1.5, 2.0), (1.0, 1.0), (0.5, 0.3)]),
       maxiters=st.sampled_from([None, 1, 2]), scaled=st.booleans())
def test_kernel_matches_oracle(reject, case, method, center, extrema, thresholds, maxiters, scaled):
    stack, valid, rng = case
    n = stack.shape[0]
    scales = rng.uniform(0.5, 2.0, n) if scaled else np.ones(n)
    zeros = rng.uniform(-5, 5, n) if scaled else np.zeros(n)
    weights = rng.uniform(0.5, 2.0, n) if method != "median" and scaled else None
    if reject == "percentile":
        thresholds = (thresholds[0] / 10, thresholds[1] / 10)
    noise = {"gain": 1.5, "read_noise": 4.0, "sensitivity_noise": 0.01} if reject == "ccdclip" else {}
    result = _run(stack, valid, method=method, scale=scales, zero=zeros, weights=weights,
                  clip_extrema=extrema, sigma_clip=thresholds, reject=reject, center=center,
                  maxiters=maxiters, **noise)
    expected = oracle(stack, valid, None, scales=scales, zeros=zeros,
                      weights=np.ones(n) if weights is None else weights, method=method,
                      nlow=extrema[0] if extrema else 0, nhigh=extrema[1] if extrema else 0,
                      reject=reject, center=center, maxiters=maxiters, low=thresholds[0],
                      high=thresholds[1], gain=1.5, rdnoise=4.0, snoise=0.01)
    _check(result, expected)


@SETTINGS
@given(case=stacks(), method=st.sampled_from(["median", "mean", "sum"]),
       extrema=st.sampled_from([None, (1, 1), (1, 0), (3, 3)]))
def test_extrema_only_and_plain_combine_match_oracle(case, method, extrema):
    stack, valid, rng = case
    n = stack.shape[0]
    result = _run(stack, valid, method=method, clip_extrema=extrema)
    expected = oracle(stack, valid, None, scales=np.ones(n), zeros=np.zeros(n), weights=np.ones(n),
                      method=method, nlow=extrema[0] if extrema else 0,
                      nhigh=extrema[1] if extrema else 0, reject="none", center="median",
                      maxiters=None, low=3.0, high=3.0)
    _check(result, expected)


@settings(max_examples=25, deadline=None)
@given(case=stacks(), method=st.sampled_from(["median", "mean", "sum"]))
def test_input_uncertainties_are_propagated(case, method):
    stack, valid, rng = case
    n = stack.shape[0]
    unc = rng.uniform(1, 5, stack.shape).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, n)
    result = _run(stack, valid, unc, method=method, scale=scales, sigma_clip=(2.0, 2.0))
    expected = oracle(stack, valid, unc, scales=scales, zeros=np.zeros(n), weights=np.ones(n),
                      method=method, nlow=0, nhigh=0, reject="sigma", center="median",
                      maxiters=None, low=2.0, high=2.0)
    _check(result, expected)


def test_flat_scaled_before_rejection():
    # Seven flats at 1000 ADU and one at 3000: unscaled, a 2.5-sigma clip rejects the bright
    # one everywhere; scaled first, no value of 8 can sit 2.5 sigma from the mean (at most 7/sqrt(8)).
    rng = np.random.default_rng(3)
    base = rng.normal(1.0, 0.01, (20, 20))
    levels = [1000, 1010, 990, 1000, 1005, 995, 1000, 3000]
    frames = [(lvl * (base + rng.normal(0, 0.002, base.shape))).astype(np.float32) for lvl in levels]
    clip = {"sigma_clip": (2.5, 2.5), "center": "mean", "maxiters": 1}
    unscaled = combine(frames, method="mean", **clip)
    assert unscaled.nhigh_rejected.min() >= 1
    result = combine(frames, method="mean", scale="median", **clip)
    assert result.nlow_rejected.sum() == 0 and result.nhigh_rejected.sum() == 0
    np.testing.assert_allclose(result.data / result.data.mean(), base / base.mean(), rtol=5e-3)


def test_pixel_rejected_everywhere_is_masked():
    stack = np.full((3, 2, 2), 5.0, np.float32)
    stack[:, 0, 0] = np.nan
    result = combine(list(stack), method="mean")
    assert result.mask[0, 0] and np.isnan(result.data[0, 0])
    assert not result.mask[1, 1] and result.data[1, 1] == 5.0
