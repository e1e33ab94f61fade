"""The bad-pixel map is part of what makes a light: editing it in place redoes the lights, from
the command line or in a notebook (force=True), and MASK bit 16 follows the map as it is now."""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from ccdcal import ReduceOptions, reduce
from ccdcal.cli import main
from ccdcal.masks import MASK_USER
from nightgen import make_night


def _write_map(path, shape, pixels) -> None:
    bad = np.zeros(shape, np.uint8)
    for y, x in pixels:
        bad[y, x] = 1
    fits.writeto(path, bad, overwrite=True)   # same shape, same size: edited in place


def _user_pixels(out, lights) -> set[tuple[str, int, int]]:
    found = set()
    for rel in lights:
        with fits.open(out / rel) as hdul:
            found |= {(rel, int(y), int(x)) for y, x in np.argwhere(hdul["MASK"].data & MASK_USER)}
    return found


def test_an_edited_bad_pixel_map_redoes_the_lights(tmp_path):
    make_night(tmp_path / "raw", seed=5)
    out, bpm = tmp_path / "out", tmp_path / "bpm.fits"
    options = ReduceOptions(report=False, bad_pixel_map=str(bpm))
    shape = reduce([tmp_path / "raw"], out, options=options, dry_run=True).plan.lights[0].frame.shape

    _write_map(bpm, shape, [(40, 40), (50, 30)])
    first = reduce([tmp_path / "raw"], out, options=options)
    marked = _user_pixels(out, first.lights)
    assert len(marked) == 2 * len(first.lights)

    _write_map(bpm, shape, [(20, 60)])        # the command line, same process, no --force
    assert main(["reduce", str(tmp_path / "raw"), "-o", str(out), "--no-report",
                 "--bad-pixel-map", str(bpm)]) == 0
    now = _user_pixels(out, first.lights)
    assert len(now) == len(first.lights) and not now & marked

    _write_map(bpm, shape, [(60, 20), (30, 45)])   # a notebook's force=True reads the new map
    again = reduce([tmp_path / "raw"], out, options=options, force=True)
    assert again.reused == 0
    latest = _user_pixels(out, again.lights)
    assert len(latest) == 2 * len(again.lights) and not latest & (now | marked)

    kept = reduce([tmp_path / "raw"], out, options=options)   # unchanged map: lights kept
    assert kept.reused == len(kept.masters) + len(kept.lights)
