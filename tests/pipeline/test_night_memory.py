"""What a night holds and runs at once: bytes per light, lights in flight, reused buffers, what the
lights share, one kernel at a time where numba needs it, the page cache, the heap warmed (from
the whole-night suite of issue 12)."""

from __future__ import annotations

import numpy as np
import pytest


def test_a_light_holds_no_more_than_the_bytes_per_pixel_the_pipeline_budgets():
    """``lights_in_flight`` divides --memory by LIGHT_BYTES_PER_PIXEL × pixels: a light's own
    arrays (tracemalloc sees numpy's) must stay within it, less the raw frame read before."""
    import tracemalloc

    from ccdcal.calibration.arithmetic import Master, calibrate_frame
    from ccdcal.pipeline.run import LIGHT_BYTES_PER_PIXEL

    n = 512
    rng = np.random.default_rng(0)

    def master(level):
        return Master(data=np.full((n, n), level, np.float32), uncertainty=np.full((n, n), 1.0, np.float32),
                      mask=np.zeros((n, n), np.uint8), name="m", datasum="", exptime=300.0, level=1.0, facts={})

    bias, dark, flat = master(1000.0), master(20.0), master(1.0)
    raw = (1000 + rng.normal(500, 30, (n, n))).astype(np.float32)
    calibrate_frame(raw, bias=bias, dark=dark, dark_scale=1.0, flat=flat, gain=1.5, read_noise=5.0,
                    saturation=60000.0, uncertainty=True)      # numba's kernels loaded before tracing
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        result = calibrate_frame(raw, bias=bias, dark=dark, dark_scale=1.0, flat=flat, gain=1.5, read_noise=5.0,
                                 saturation=60000.0, uncertainty=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert result.uncertainty is not None
    assert peak / n**2 <= LIGHT_BYTES_PER_PIXEL - 4


def test_lights_in_flight_follow_the_memory_budget(tmp_path):
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions
    from ccdcal.pipeline.run import LIGHT_BYTES_PER_PIXEL, lights_in_flight
    from ccdcal.planning.inventory import scan
    from ccdcal.planning.plan import build_plan

    write_night(tmp_path / "raw", size=64, seed=1, n_light=3)
    plan = build_plan(scan([tmp_path / "raw"]), ReduceOptions().plan_options())
    ny, nx = plan.lights[0].frame.shape                  # raw size, overscan included
    one = LIGHT_BYTES_PER_PIXEL * ny * nx
    assert lights_in_flight(plan, ReduceOptions(memory=str(one))) == 1
    assert lights_in_flight(plan, ReduceOptions(memory=str(3 * one + 1))) == 3
    assert lights_in_flight(plan, ReduceOptions(memory=str(one // 2))) == 1


def test_lights_calibrated_in_reused_memory_keep_nothing_of_the_light_before(tmp_path, monkeypatch):
    """The light tasks reuse their frame-sized arrays from light to light. The first light is
    saturated over a block the others are not; every plane of every light equals the run's
    whose arrays are all fresh (nothing given back for reuse), and reuse did happen."""
    from astropy.io import fits

    from ccdcal import reduce
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions
    from ccdcal.pipeline.tasks import BufferPool

    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=4, n_light=4)
    lights = sorted(p for p in raw.glob("*.fits") if "light" in fits.getval(p, "IMAGETYP").lower())
    with fits.open(lights[0], mode="update") as hdul:
        hdul[0].data[5:20, 5:20] = 65535
    reused = []
    take = BufferPool.take

    def spy(self, shape, dtype):
        free = self._free.get((tuple(shape), np.dtype(dtype).str))
        reused.append(bool(free))
        return take(self, shape, dtype)

    monkeypatch.setattr(BufferPool, "take", spy)
    first = reduce(raw, tmp_path / "reused", options=ReduceOptions(report=False))
    assert any(reused)
    monkeypatch.setattr(BufferPool, "give", lambda self, *arrays: None)
    reused.clear()
    second = reduce(raw, tmp_path / "fresh", options=ReduceOptions(report=False))
    assert not any(reused)
    assert sorted(first.lights) == sorted(second.lights) and len(first.lights) == 8   # two filters
    saturated = 0
    for rel in first.lights:
        with fits.open(tmp_path / "reused" / rel) as a, fits.open(tmp_path / "fresh" / rel) as b:
            for name in ("PRIMARY", "UNCERT", "MASK"):
                assert np.array_equal(a[name].data, b[name].data, equal_nan=True), (rel, name)
            saturated += int(np.count_nonzero(a["MASK"].data & 1) > 200)
    assert saturated == 1


def test_what_the_first_lights_share_is_made_while_the_last_master_is_written(tmp_path, monkeypatch):
    """The masters' mask union is made once per set of masters (the flat is floored pixel by
    pixel in the kernel: never copied); those of the first lights before any light starts (while
    the last master's file is written), not in a light task; the planes are those of a run where
    the lights make them. A rerun whose masters
    are all kept prepares nothing, and a failure while preparing only leaves it to the lights."""
    import importlib
    import json

    from astropy.io import fits

    from ccdcal import reduce
    from ccdcal._shared.pool import kernels_threadsafe
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions

    if not kernels_threadsafe():
        pytest.skip("masters are written in a thread only on a threadsafe numba layer")
    calibrate = importlib.import_module("ccdcal.calibration.arithmetic")
    pipeline = importlib.import_module("ccdcal.pipeline.run")
    tasks = importlib.import_module("ccdcal.pipeline.tasks")
    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=6, n_light=3)             # two filters: two sets of masters
    made, in_light = [], []
    for name in ("safe_flat", "_add_master_masks"):         # the flat is floored in the kernel: no copy
        original = getattr(calibrate, name)

        def spy(*a, _name=name, _original=original, **k):
            made.append((_name, bool(in_light)))
            return _original(*a, **k)

        monkeypatch.setattr(calibrate, name, spy)
    calibrate_light = tasks.calibrate_light

    def light(*a, **k):                                     # whether a light task is running
        in_light.append(1)
        try:
            return calibrate_light(*a, **k)
        finally:
            in_light.pop()

    monkeypatch.setattr(tasks, "calibrate_light", light)
    options = ReduceOptions(report=False)
    first = reduce(raw, tmp_path / "prepared", options=options)
    assert len(first.lights) == 6
    in_flight = pipeline.lights_in_flight(first.plan, options)
    sets = {job.recipe.flat for job in first.plan.lights}
    first_sets = {job.recipe.flat for job in first.plan.lights[:in_flight]}
    # each thing once per set of masters; those of the first lights before any light task
    assert sorted(name for name, _ in made) == sorted(["_add_master_masks"] * len(sets))
    assert len(sets) == 2 and sum(not by_light for _, by_light in made) == len(first_sets) >= 1

    made.clear()
    reduce(raw, tmp_path / "prepared", options=options)     # all kept: nothing made, nothing read
    assert not made

    made.clear()
    monkeypatch.setattr(pipeline, "prepare_lights", lambda jobs, ctx: None)   # where reduce looks it up
    second = reduce(raw, tmp_path / "by-lights", options=options)
    assert made and all(by_light for _, by_light in made)
    for rel in first.lights:
        with fits.open(tmp_path / "prepared" / rel) as a, fits.open(tmp_path / "by-lights" / rel) as b:
            for name in ("PRIMARY", "UNCERT", "MASK"):
                assert np.array_equal(a[name].data, b[name].data, equal_nan=True), (rel, name)
    assert sorted(first.lights) == sorted(second.lights)

    def broken(jobs, ctx):
        raise MemoryError("no room to prepare")

    monkeypatch.setattr(pipeline, "prepare_lights", broken)
    third = reduce(raw, tmp_path / "failed-prepare", options=options)
    manifest = json.loads((tmp_path / "failed-prepare" / "manifest.json").read_text())
    assert sorted(third.lights) == sorted(first.lights) and not third.skipped
    assert sorted(rel for rel, e in manifest["outputs"].items() if e["kind"] != "light") == sorted(third.masters)


def test_on_a_layer_that_is_not_threadsafe_the_night_runs_one_kernel_at_a_time(tmp_path, monkeypatch):
    """Where numba's threading layer is workqueue (it aborts when two threads run kernels at
    once), the night runs its tasks one at a time, writes masters in order and reads tiles
    on the caller's thread: the same planes as the threaded run."""
    import importlib
    import threading

    from astropy.io import fits

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=4)
    threaded = reduce([raw], tmp_path / "threaded", options=ReduceOptions(report=False))
    monkeypatch.setattr(importlib.import_module("ccdcal._shared.pool"), "kernels_threadsafe", lambda: False)
    names = []
    real_start = threading.Thread.start

    def start(thread):
        names.append(thread.name)
        return real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    alone = reduce([raw], tmp_path / "alone", options=ReduceOptions(report=False))
    monkeypatch.undo()
    assert not [n for n in names if "ccdcal-write" in n or "ccdcal-tiles" in n or "ThreadPoolExecutor" in n]
    assert sorted(alone.masters) == sorted(threaded.masters) and sorted(alone.lights) == sorted(threaded.lights)
    for rel in [*threaded.masters, *threaded.lights]:
        with fits.open(tmp_path / "threaded" / rel) as a, fits.open(tmp_path / "alone" / rel) as b:
            for ha, hb in zip(a, b, strict=True):
                assert np.array_equal(ha.data, hb.data, equal_nan=True), rel


def test_the_night_drops_from_the_page_cache_only_what_it_will_not_read_again(tmp_path, monkeypatch):
    """Lights leave the page cache once durable unless they are stacked next (read again);
    masters written beside the next combine (held in memory) bypass it (O_DIRECT where the
    filesystem takes it); the manifest, the report and a master written where no writer thread
    runs (read back from its file) stay cached."""
    import importlib

    from ccdcal import reduce
    from ccdcal._shared.pool import kernels_threadsafe
    from ccdcal.demo import write_night
    from ccdcal.pipeline.options import ReduceOptions

    writer = importlib.import_module("ccdcal.io.writer")
    real = writer._commit
    commits: dict[str, bool] = {}

    def commit(tmp, path, cached=True):
        commits[path.name] = cached
        return real(tmp, path, cached)

    real_write = writer._write_hdus
    direct: dict[str, bool] = {}

    def write_hdus(tmp, hdul, is_direct=False):
        direct[tmp.name.split(".")[1]] = is_direct
        return real_write(tmp, hdul, is_direct)

    monkeypatch.setattr(writer, "_commit", commit)
    monkeypatch.setattr(writer, "_write_hdus", write_hdus)
    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=8, n_light=2)
    reduce(raw, tmp_path / "out")
    # the masters the writer thread writes bypass the page cache; the lights do not
    assert {k: v for k, v in direct.items() if k.startswith("master_")} and \
        all(v == kernels_threadsafe() for k, v in direct.items() if k.startswith("master_"))
    assert not any(v for k, v in direct.items() if k.startswith("m51_"))
    lights = [n for n in commits if n.startswith("m51_")]
    masters_ = [n for n in commits if n.startswith("master_")]
    assert lights and masters_
    assert not any(commits[n] for n in lights)
    assert all(not commits[n] for n in masters_) == kernels_threadsafe()
    assert commits["manifest.json"] and commits["report.html"]
    commits.clear()
    reduce(raw, tmp_path / "stacked", options=ReduceOptions(stack=True))
    stacked = [n for n in commits if n.startswith("m51_")]
    assert stacked and all(commits[n] for n in stacked)


def test_the_memory_warmed_for_a_night_is_what_its_lights_and_two_masters_hold(tmp_path, monkeypatch):
    """warm_bytes: for the largest input's primary image of N pixels, (lanes × 9 + 18) × N bytes
    with lanes as --memory and the workers allow, at most --memory; 0 where the inputs do not
    say (no 2-D primary image). The pipeline warms that much, locally only, never in a dry run."""
    import time

    from astropy.io import fits

    from ccdcal import reduce
    from ccdcal._shared import memory as _memory
    from ccdcal.demo import write_night
    from ccdcal.io.frames import primary_pixels
    from ccdcal.pipeline.options import ReduceOptions
    from ccdcal.pipeline.run import warm_bytes

    raw = tmp_path / "raw"
    write_night(raw, size=64, seed=9, n_light=2)
    big = fits.PrimaryHDU(np.zeros((300, 200), np.uint16))
    big.header["HISTORY"] = "x" * 60
    for _ in range(80):                                        # a header of several blocks
        big.header.add_history("padding " * 8)
    big.writeto(raw / "zz_large.fits")
    assert primary_pixels(raw / "zz_large.fits") == 300 * 200
    npix = 300 * 200
    assert warm_bytes([raw], ReduceOptions(workers=2)) == (2 * 9 + 18) * npix
    assert warm_bytes([raw], ReduceOptions(workers=3)) == (3 * 9 + 18) * npix
    assert warm_bytes([raw], ReduceOptions(workers=2, memory=24 * npix)) == min(24 * npix, (9 + 18) * npix)
    cube = tmp_path / "cube"
    cube.mkdir()
    fits.PrimaryHDU(np.zeros((3, 40, 50), np.float32)).writeto(cube / "c.fits")
    assert warm_bytes([cube], ReduceOptions()) == 0
    assert warm_bytes([tmp_path / "missing"], ReduceOptions()) == 0

    # the output folder inside the inputs is left out (its files may be larger than any raw)
    inside = raw / "out"
    inside.mkdir()
    fits.PrimaryHDU(np.zeros((500, 500), np.float32)).writeto(inside / "big.fits")
    assert warm_bytes([raw], ReduceOptions(workers=2), exclude=inside) == (2 * 9 + 18) * npix
    assert warm_bytes([raw], ReduceOptions(workers=2)) == (2 * 9 + 18) * 500 * 500
    warmed = []
    monkeypatch.setattr(_memory, "_KEPT", True)
    monkeypatch.setattr(_memory, "warm_heap", lambda nbytes, stop=None: warmed.append(nbytes) or True)
    # the paths as a generator: warming does not use them up before the scan
    result = reduce((p for p in [raw]), inside, options=ReduceOptions(workers=2))
    assert len(result.lights) == 4                          # two per filter
    for _ in range(100):                                       # the thread has long finished
        if warmed:
            break
        time.sleep(0.05)
    assert warmed == [(2 * 9 + 18) * npix]
    warmed.clear()
    reduce(raw, tmp_path / "dry", dry_run=True)
    monkeypatch.setattr(_memory, "_KEPT", False)
    reduce(raw, tmp_path / "plain", options=ReduceOptions(workers=2))
    assert warmed == []
