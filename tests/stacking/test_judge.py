"""Judging frames with a helper process (sep holds the GIL): the same verdicts and star lists as
judged in this process alone, whoever judged which frame; a helper that cannot start, dies or
talks nonsense costs nothing but its time; warnings raised while judging reach the caller."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import starfield as sf
from ccdcal.errors import CcdcalWarning
from ccdcal.stacking import helper, judge

SHAPE = (200, 240)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    stars = sf.catalogue(SHAPE, 60, seed=3)
    paths = []
    for k in range(9):
        matrix = sf.shift(*np.random.default_rng(k).uniform(-4, 4, 2))
        data, sigma = sf.observe(SHAPE, stars, matrix, seed=20 + k)
        paths.append(sf.write_light(root / f"l{k}.fits", data, sigma, mjd=60000.0 + k / 1440))
    broken = root / "broken.fits"
    broken.write_bytes(b"not a FITS file at all" * 200)
    paths.insert(4, broken)
    return [str(p) for p in paths]


def _judged_here(frames):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(helper, "HELPER_MIN_FRAMES", 10**9)
        return judge.judge_frames(frames)


def _same(a, b) -> None:
    (va, sa), (vb, sb) = a, b
    assert [(v.path, v.quality, v.reason) for v in va] == [(v.path, v.quality, v.reason) for v in vb]
    for x, y in zip(sa, sb, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            for name in ("x", "y", "flux", "fwhm", "a", "b", "theta"):
                np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
            assert (x.background, x.background_rms) == (y.background, y.background_rms)


def _helper_on(monkeypatch, wait: bool = True) -> list[int]:
    """Make every judge here use the helper; returns the indices the helper judged. With
    ``wait``, this process judges its first frame only once the helper is ready (or has
    failed, or 30 s have passed): small frames are judged here faster than a helper imports,
    and it takes frames only once ready."""
    import time

    monkeypatch.setattr(helper, "HELPER_MIN_BYTES", 0)
    monkeypatch.setattr(helper, "HELPER_MIN_FRAMES", 2)
    monkeypatch.setattr(helper, "cpus", lambda: 2)
    monkeypatch.delenv("CCDCAL_JUDGE_HELPER", raising=False)
    helped: list[int] = []
    feeders: list[judge._Feeder] = []
    start = judge._Feeder.__init__

    def counting(self, process, take, job, done):
        def tell(index, judged):
            helped.append(index)
            done(index, judged)
        start(self, process, take, job, tell)
        feeders.append(self)

    monkeypatch.setattr(judge._Feeder, "__init__", counting)
    if wait:
        one = judge.judge_one

        waited: list[bool] = []

        def after_the_helper(*args, **kwargs):
            until = time.monotonic() + 30
            while not waited and feeders and not feeders[-1].ready and feeders[-1]._thread.is_alive() \
                    and time.monotonic() < until:
                time.sleep(0.01)
            waited.append(True)
            return one(*args, **kwargs)

        monkeypatch.setattr(judge, "judge_one", after_the_helper)
    return helped


def test_the_helper_gives_the_verdicts_and_stars_judged_here(frames, monkeypatch):
    alone = _judged_here(frames)
    helped = _helper_on(monkeypatch)
    together = judge.judge_frames(frames)
    assert helped, "the helper judged no frame"
    assert len(helped) < len(frames)
    _same(together, alone)
    verdicts = together[0]
    assert "cannot be read" in verdicts[4].reason
    assert sum(v.reason is None for v in verdicts) == 9


@pytest.mark.parametrize("with_helper", [True, False])
def test_work_meanwhile_runs_while_the_frames_are_judged(frames, monkeypatch, with_helper):
    """``meanwhile`` (numba's start) runs once, before judge_frames returns, and the verdicts
    are those judged alone: with a helper in this thread before it judges a frame (the helper
    judges meanwhile), without one in a thread beside the judging."""
    import threading

    alone = _judged_here(frames)
    helped = _helper_on(monkeypatch) if with_helper else []
    if not with_helper:
        monkeypatch.setenv("CCDCAL_JUDGE_HELPER", "0")
    calls, here = [], []
    one = judge.judge_one

    def judging(*args, **kwargs):
        here.append((threading.get_ident(), len(calls)))
        return one(*args, **kwargs)

    monkeypatch.setattr(judge, "judge_one", judging)
    result = judge.judge_frames(frames, meanwhile=lambda: calls.append(threading.get_ident()))
    _same(result, alone)
    assert len(calls) == 1
    main = threading.get_ident()
    assert (calls[0] == main) == with_helper
    if with_helper:
        assert helped and all(count == 1 for ident, count in here if ident == main)


@pytest.mark.parametrize("code", [
    "import sys; sys.exit(3)",                                     # dies at once
    "import sys; sys.stdin.buffer.read(10); sys.stdout.write('x' * 99)",  # talks nonsense
    "import time; time.sleep(0.3)",                                # ends without replying
])
def test_a_failing_helper_costs_nothing_but_its_time(frames, monkeypatch, code):
    alone = _judged_here(frames)
    _helper_on(monkeypatch, wait=False)
    monkeypatch.setattr(helper, "HELPER_CODE", code)
    _same(judge.judge_frames(frames), alone)


def test_a_helper_that_cannot_start_is_not_needed(frames, monkeypatch):
    alone = _judged_here(frames)
    _helper_on(monkeypatch)
    monkeypatch.setattr(helper.sys, "executable", "/nonexistent/python")
    _same(judge.judge_frames(frames), alone)


def test_warnings_raised_while_judging_reach_the_caller(frames, monkeypatch):
    detect = judge.detect_stars

    def warning_detect(*args, **kwargs):
        warnings.warn("a frame said something", CcdcalWarning, stacklevel=2)
        return detect(*args, **kwargs)

    monkeypatch.setattr(judge, "detect_stars", warning_detect)
    kept = judge.judge_one(frames[0], None, 300, keep_warnings=True)
    assert kept[-1] == [(CcdcalWarning, "a frame said something")]
    # what a helper hands back is said here, once per frame
    said = judge.judge_one

    monkeypatch.setattr(judge, "judge_one", lambda path, pattern, stars, **_: said(path, pattern, stars,
                                                                                  keep_warnings=True))
    monkeypatch.setattr(helper, "HELPER_MIN_FRAMES", 10**9)
    with pytest.warns(CcdcalWarning, match="a frame said something") as record:
        judge.judge_frames(frames[:3])
    assert sum("a frame said something" in str(w.message) for w in record) == 3


def test_small_sets_are_judged_here_alone(frames, monkeypatch):
    monkeypatch.delenv("CCDCAL_JUDGE_HELPER", raising=False)
    assert not helper.worth_a_helper(frames)            # a few small frames: not worth a process
    monkeypatch.setattr(helper, "HELPER_MIN_BYTES", 0)
    assert helper.worth_a_helper(frames) == (helper.cpus() > 1)
    monkeypatch.setattr(helper, "cpus", lambda: 1)
    assert not helper.worth_a_helper(frames)            # one CPU: nothing to share
    monkeypatch.setattr(helper, "cpus", lambda: 2)
    monkeypatch.setattr(helper.sys, "frozen", True, raising=False)
    assert not helper.worth_a_helper(frames)            # a frozen application: no interpreter to start
    monkeypatch.delattr(helper.sys, "frozen")
    assert helper.worth_a_helper(frames)
    monkeypatch.setenv("CCDCAL_JUDGE_HELPER", "0")
    assert not helper.worth_a_helper(frames)            # the user said never


@pytest.mark.parametrize("ready", [False, True])
def test_a_helper_that_hangs_is_ended_and_its_frames_judged_here(frames, monkeypatch, ready):
    """A helper that never says it is ready holds no frame and is ended as soon as this process
    has judged them all (no wait); one that hangs holding frames is ended after the timeout, and
    its frames are judged here."""
    import time

    alone = _judged_here(frames)
    helped = _helper_on(monkeypatch, wait=ready)
    say = f"import pickle, sys; pickle.dump({judge.HELPER_READY!r}, sys.stdout.buffer); sys.stdout.flush(); "
    monkeypatch.setattr(helper, "HELPER_CODE", (say if ready else "") + "import time; time.sleep(600)")
    join = judge._Feeder.join
    monkeypatch.setattr(judge._Feeder, "join", lambda self, timeout: join(self, 1.0))
    start = time.monotonic()
    _same(judge.judge_frames(frames), alone)
    assert not helped
    if not ready:
        assert time.monotonic() - start < 10


def test_a_helper_started_before_is_used_and_ended(frames, monkeypatch):
    """The command line starts the helper before its imports and hands it over."""
    alone = _judged_here(frames)
    helped = _helper_on(monkeypatch)
    process = helper.start_helper(frames)
    assert process is not None
    _same(judge.judge_frames(frames, helper=process), alone)
    assert helped
    assert process._proc.poll() is not None          # ended


def test_a_helper_handed_to_a_stack_that_cannot_start_is_ended(frames, monkeypatch, tmp_path):
    from ccdcal.errors import InputError
    from ccdcal.stacking.workflow import stack_files

    _helper_on(monkeypatch)
    process = helper.start_helper(frames)
    with pytest.raises(InputError):
        stack_files(frames, frames[0], judge_helper=process)       # the output is an input
    assert process._proc.poll() is not None


def test_the_helper_loads_no_numba():
    """What the helper process imports (the judging module: FITS reading, cell means, detection)
    loads neither numba nor llvmlite nor the debayering kernels: its start is ~0.45 s of imports,
    paid back by mono and colour frames alike."""
    code = ("import sys; import ccdcal.stacking.judge; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite', 'scipy')"
            " or m in ('ccdcal.colour.demosaic', 'ccdcal.colour._kernels', 'ccdcal.stacking.register')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("pattern", ["RGGB", "GBRG"])
@pytest.mark.parametrize("shape", [(1024, 1024), (515, 601)])
def test_colour_frames_are_judged_on_their_cells_at_the_right_place(tmp_path, pattern, shape):
    """A CFA frame (stars of three colours through the Bayer filter, written here) is judged on
    the mean of its 2 × 2 cells, whose pixels lie half a pixel down and right of the frame's:
    the stars are found at their true places (median 0.03 px, the worst 0.1 px), with odd sides
    and with masked pixels, in a frame large enough for the sampled sky."""
    from astropy.io import fits

    stars = sf.catalogue(shape, 150, seed=4, margin=20)
    rng = np.random.default_rng(1)
    tint = rng.uniform(0.3, 1.5, (len(stars), 3))
    planes = [sf.render(shape, stars[:, :2], stars[:, 2] * tint[:, c]) for c in range(3)]
    colour = {"R": 0, "G": 1, "B": 2}
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    cfa = np.zeros(shape)
    for k, name in enumerate(pattern):
        cell = (yy % 2 == k // 2) & (xx % 2 == k % 2)
        cfa[cell] = planes[colour[name]][cell]
    cfa += 300.0 + rng.normal(0.0, 5.0, shape)
    mask = np.zeros(shape, np.uint8)
    mask[rng.integers(0, shape[0], 80), rng.integers(0, shape[1], 80)] = 1
    header = fits.Header({"BAYERPAT": pattern})
    path = sf.write_light(tmp_path / "osc.fits", cfa.astype(np.float32), mask=mask, header=header)
    quality, found, error, _, got, _ = judge.judge_one(str(path), None, 300)
    assert error is None and got == pattern and quality.n_stars >= 100
    near = np.hypot(stars[:, :1] - found.x[None], stars[:, 1:2] - found.y[None])
    miss = near.min(axis=0)
    assert np.median(miss) < 0.03 and np.percentile(miss, 95) < 0.1
