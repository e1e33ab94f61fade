"""One owner of process state (issue 26): caches with declared lifetimes and bounds, emptied when
their stage or run ends; background pools shut down with the run; a reduce leaves nothing behind."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from ccdcal._shared import state


def _cache(name: str, **kw) -> state.Cache:
    cache = state.Cache(name, **kw)
    return cache


def test_a_cache_keeps_the_most_recent_within_its_count_and_bytes():
    cache = _cache("test: bounds", max_items=3, min_items=1, max_bytes=250,
                   nbytes=lambda values: sum(v.nbytes for v in values))
    for i in range(3):
        cache.put(i, np.zeros(10, np.float64))        # 80 bytes each
    cache.get(0)                                      # 0 is now the most recent
    cache.put(3, np.zeros(10, np.float64))            # 4 entries > 3: the oldest (1) goes
    assert sorted(k for k in range(4) if k in cache) == [0, 2, 3]
    cache.put(4, np.zeros(20, np.float64))            # 400 bytes > 250: 2 then 0 go (240 left)
    assert [k for k in range(5) if k in cache] == [3, 4]
    cache.put(5, np.zeros(100, np.float64))           # 1600 bytes alone: kept (min_items)
    assert 5 in cache and len(cache) == 1


def test_a_thing_asked_for_by_many_threads_is_made_once_and_a_failure_keeps_nothing():
    cache = _cache("test: making")
    made = []

    def make():
        made.append(1)
        time.sleep(0.1)
        return len(made)

    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_or_make("k", make))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == [1] and got == [1] * 6

    def fail():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        cache.get_or_make("bad", fail)
    assert "bad" not in cache
    assert cache.get_or_make("bad", lambda: 7) == 7


def test_stages_and_runs_empty_what_lives_until_them_and_the_outermost_run_closes_pools():
    lights = _cache("test: lights stage", until="lights")
    run = _cache("test: run")
    with state.run_scope():
        lights.put(1, "a")
        run.put(1, "b")
        pool = state.thread_pool("test")
        assert pool.submit(lambda: 3).result() == 3
        state.end_stage("lights")
        assert 1 not in lights and 1 in run
        with state.run_scope():         # a run inside a run (a stack of a reduce) closes nothing
            pass
        assert 1 in run and state.snapshot()["pools"][0] >= 1
    assert len(run) == 0 and state.snapshot()["pools"] == (0, 0)
    with pytest.raises(RuntimeError):   # the pool is shut down
        pool.submit(lambda: 1)
    with pytest.raises(ValueError):
        state.Cache("test: run")        # names are unique
    with pytest.raises(ValueError):
        state.Cache("test: forever", until="forever")


def test_a_run_that_fails_closes_its_state_too():
    cache = _cache("test: failing run")
    with pytest.raises(KeyError), state.run_scope():
        cache.put(1, 1)
        raise KeyError("x")
    assert len(cache) == 0


def test_a_reduce_leaves_no_cache_filled_and_no_pool_running(tmp_path):
    """A notebook keeps nothing of a finished run: every cache the package owns is empty (the
    masters read back, their products, the file hashes, the bad-pixel maps) and the hashing
    thread is gone; while the stacks run, the lights' shared products are already dropped."""
    import ccdcal
    from ccdcal.demo import write_night
    from ccdcal.pipeline import tasks

    raw = write_night(tmp_path / "raw", size=96, seed=11, n_bias=3, n_dark=3, n_flat=3, n_light=3)
    seen = {}
    original = tasks.stack_files

    def spy(*args, **kwargs):
        seen.update(state.snapshot())
        return original(*args, **kwargs)

    tasks.stack_files = spy
    try:
        result = ccdcal.reduce(raw, tmp_path / "out", options=ccdcal.ReduceOptions(report=False, stack=True))
    finally:
        tasks.stack_files = original
    assert result.lights and seen                           # the stacks ran (and found no stars)
    assert seen["products of masters"][0] == 0           # the lights' stage was over
    assert seen["file hashes"][0] > 0                    # the run's state was still there
    left = {name: value for name, value in state.snapshot().items()
            if not name.startswith("test: ") and value != (0, 0)}
    assert left == {}


def test_a_run_settles_astropy_fits_configuration_and_gives_it_back():
    """During a run, astropy's FITS cards read their configuration once (it costs ~20 µs a read
    otherwise): the values in force when the run starts are honoured, and the live
    configuration is back afterwards, an error included, and for nested runs only at the end."""
    from astropy.io import fits
    from astropy.io.fits import card

    live = card.conf
    padded = fits.Card.fromstring("OBSERVER= 'Ann   '           / who")
    with fits.conf.set_temp("strip_header_whitespace", False):
        with state.run_scope():
            assert card.conf is not live
            assert card.conf.strip_header_whitespace is False
            assert fits.Card.fromstring(padded.image).value == "Ann   "      # the setting honoured
            with state.run_scope():
                pass
            assert card.conf is not live                                 # the inner run ends nothing
        assert card.conf is live
    with state.run_scope():
        assert fits.Card.fromstring(padded.image).value == "Ann"            # the default: stripped
    with pytest.raises(KeyError), state.run_scope():
        raise KeyError("x")
    assert card.conf is live
