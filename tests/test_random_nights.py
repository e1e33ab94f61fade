"""Right by default on small, messy nights: ccdcal against a plain-numpy median reduction.

Each seed draws a night from :mod:`nightgen` (independent of ``ccdcal demo``): 3-12 frames per
master, cosmic rays in every frame, CCD-TEMP jitter of a few tenths of a degree, lights with and
without a dark of their exposure, flats at very different levels and sometimes a warm or offset
bias. ccdcal, run with its defaults, must calibrate every light no worse than the reference
reduction :func:`nightgen.reference_reduce` does.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.pipeline.run import ReduceOptions, reduce
from nightgen import LightTruth, Night, make_night, reference_reduce, score

# Chosen to cover the cases (checked by test_seeds_cover_the_messy_cases): a warm bias (4, 9, 25),
# an offset bias (3, 6, 22), 3-4 biases (0, 6), 3 darks (3, 9, 25), an exact dark among two
# exposures (3, 6, 12, 25), no exact dark (0, 6, 9, 22, 25), only darks shorter than the lights
# (0, 22), one filter and two.
SEEDS = (0, 3, 4, 6, 9, 12, 22, 25)
TIME_BUDGET_S = 90.0  # no new seed is started after this; the first MIN_SEEDS always run
MIN_SEEDS = 3

NOISE_RATIO = 1.02  # ccdcal's robust sky noise / the reference's
FLATNESS_TOLERANCE = 0.001  # |ccdcal's corner/centre - the reference's|
ZERO_POINT_TOLERANCE = 0.02  # |sky level / true sky - 1|, both reductions


def ccdcal_reduce(night: Night, out_dir: Path) -> dict[str, np.ndarray]:
    """Reduce the night with ccdcal's defaults; calibrated lights (ADU, float64) by name."""
    reduce([night.root], out_dir, options=ReduceOptions(report=False))
    calibrated = out_dir / "calibrated"
    return {light.name: fits.getdata(calibrated / f"{light.name}.fits").astype(np.float64)
            for light in night.lights}


def describe(night: Night) -> str:
    """One line: the night's frame counts and bias anomaly."""
    counts = ", ".join(f"{k} x{v}" for k, v in night.n_frames.items())
    return f"seed {night.seed}: {counts}; bias anomaly {night.anomaly}"


def compare(night: Night, ours: dict[str, np.ndarray],
            ref: dict[str, np.ndarray]) -> tuple[list[str], list[str]]:
    """Score ccdcal's and the reference's lights: one table row per light, and the failures."""
    rows, failures = [], []
    for light in night.lights:
        a, b = score(ours[light.name], night, light), score(ref[light.name], night, light)
        ratio = a["noise"] / b["noise"]
        dark = "exact dark" if light.exact_dark else "scaled dark"
        where = f"seed {night.seed} {light.name} ({light.exptime:g} s, {dark}, sky {light.sky:.0f})"
        rows.append(f"{where}: noise {a['noise']:.2f}/{b['noise']:.2f} = {ratio:.3f}, "
                    f"holes {a['holes']}/{b['holes']}, spikes {a['spikes']}/{b['spikes']}, "
                    f"flatness {a['flatness']:+.4f}/{b['flatness']:+.4f}, "
                    f"zero point {a['zero_point']:.4f}/{b['zero_point']:.4f}")
        if ratio > NOISE_RATIO:
            failures.append(f"{where}: sky noise {ratio:.3f}x the reference's (> {NOISE_RATIO})")
        if a["holes"] > b["holes"]:
            failures.append(f"{where}: {a['holes']} holes < -7 sigma on the sky, "
                            f"reference {b['holes']}")
        if a["spikes"] > b["spikes"]:  # e.g. hot pixels left in where a master dark has no value
            failures.append(f"{where}: {a['spikes']} spikes > +7 sigma on the sky, "
                            f"reference {b['spikes']}")
        if abs(a["flatness"] - b["flatness"]) > FLATNESS_TOLERANCE:
            failures.append(f"{where}: corner/centre {a['flatness']:+.4f}, "
                            f"reference {b['flatness']:+.4f}")
        for who, s in (("ccdcal", a), ("reference", b)):
            if abs(s["zero_point"] - 1.0) > ZERO_POINT_TOLERANCE:
                failures.append(f"{where}: {who} sky is {s['zero_point']:.4f} of the truth")
    return rows, failures


def test_ccdcal_no_worse_than_median_reference_on_random_nights(tmp_path):
    start = time.monotonic()
    rows, failures = [], []
    for i, seed in enumerate(SEEDS):
        if i >= MIN_SEEDS and time.monotonic() - start > TIME_BUDGET_S:
            break
        night = make_night(tmp_path / f"night{seed}" / "raw", seed)
        ours = ccdcal_reduce(night, tmp_path / f"night{seed}" / "out")
        seed_rows, seed_failures = compare(night, ours, reference_reduce(night.root))
        rows += [describe(night), *("  " + r for r in seed_rows)]
        failures += seed_failures
    table = ["ccdcal/reference per light:", *rows]
    print("\n".join(table))
    assert not failures, "\n".join([f"{len(failures)} requirement(s) failed:", *failures, *table])


def reference_noise(night: Night, light: LightTruth, own: float) -> float:
    """Sky noise the reference reduction should reach: the light's own (``own``) plus its
    masters', a median of n frames having ~1.4x the variance of their mean."""
    g, rn, t = night.gain, night.read_noise, light.exptime
    t_dark = t if t in night.dark_times else max(night.dark_times)
    k = t / t_dark
    n_bias = night.n_frames["bias"] - (night.anomaly != "none")  # the odd bias is left out
    n_dark = night.n_frames[f"dark {t_dark:g}s"]
    var_bias = 1.4 * rn**2 / n_bias
    var_dark = 1.4 * (rn**2 + float(np.median(night.dark_rate)) * t_dark / g) / n_dark
    levels = np.array(night.flat_levels[light.filter])
    var_flat = 1.4 * light.sky**2 * np.mean(1.0 / (levels * g) + (rn / levels) ** 2) / levels.size
    masters = (1.0 - k) ** 2 * var_bias + k**2 * var_dark + var_flat
    return float(np.sqrt(own**2 + masters * np.median(1.0 / night.flats[light.filter]) ** 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_generator_truth_is_recovered_by_the_reference(tmp_path, seed):
    night = make_night(tmp_path, seed)
    assert all(n >= 1 for n in night.cosmics.values()), "every raw frame has cosmic rays"
    assert all(3 <= n <= 12 for k, n in night.n_frames.items() if k != "light")
    assert 2 <= night.n_frames["light"] <= 4
    for flat in night.flats.values():
        c = flat.shape[0] // 2
        assert 0.84 < np.median(flat[:4, :4]) / np.median(flat[c - 4:c + 4, c - 4:c + 4]) < 0.91
    ref = reference_reduce(night.root)
    assert sorted(ref) == sorted(light.name for light in night.lights)
    for light in night.lights:
        s = score(ref[light.name], night, light)
        assert abs(s["zero_point"] - 1.0) < 0.02, f"{light.name}: sky {s['zero_point']:.4f}"
        assert abs(s["flatness"]) < 0.02, f"{light.name}: corner/centre {s['flatness']:+.4f}"
        predicted = reference_noise(night, light, s["expected_noise"])
        assert 0.9 < s["noise"] / predicted < 1.1, f"{light.name}: noise {s['noise']:.2f}, " \
                                                   f"predicted {predicted:.2f}"
        # The cosmic-ray map is the light's own hits: every strong positive outlier on the sky
        # (hot pixels left out) lies in it, and some lie in it.
        high = ref[light.name] - light.signal > 10.0 * s["noise"]
        sky = ~light.star_mask & (night.dark_rate * light.exptime < 20.0)
        assert not (high & sky & ~light.cr_mask).any(), f"{light.name}: cosmic rays off the map"
        assert (high & light.cr_mask).any(), f"{light.name}: no cosmic ray in the map"


def test_seeds_cover_the_messy_cases(tmp_path):
    nights = [make_night(tmp_path / str(seed), seed) for seed in SEEDS]
    exact = [light.exact_dark for n in nights for light in n.lights]
    assert {n.anomaly for n in nights} == {"none", "warm", "offset"}
    assert any(exact) and not all(exact)
    assert any(len(n.dark_times) == 2 and any(lt.exact_dark for lt in n.lights) for n in nights)
    assert any(max(n.dark_times) < max(lt.exptime for lt in n.lights) for n in nights)
    assert {len(n.flats) for n in nights} == {1, 2}
    assert min(n.n_frames["bias"] for n in nights) == 3
    assert min(min(v for k, v in n.n_frames.items() if k.startswith("dark")) for n in nights) == 3
