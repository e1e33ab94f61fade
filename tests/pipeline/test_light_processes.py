"""Lights calibrated in worker processes (a night of many small lights) are the lights calibrated
in this process's threads: the same pixels, headers, fingerprints, previews, skips and warnings."""

from __future__ import annotations

import json
import warnings

import numpy as np
from astropy.io import fits

from ccdcal import ReduceOptions, reduce
from ccdcal.errors import CcdcalWarning
from ccdcal.pipeline import run as run_module
from ccdcal.report.page import light_facts
from nightgen import make_night

VOLATILE = {"DATE", "CHECKSUM"}


def _reduce(raw, out, monkeypatch, processes: bool):
    monkeypatch.setattr(run_module, "PROCESS_MIN_LIGHTS", 1)
    monkeypatch.setattr(run_module, "FORKED_MIN_LIGHTS", 1)
    monkeypatch.setenv("CCDCAL_LIGHT_PROCESSES", "1" if processes else "0")
    monkeypatch.setattr(run_module, "cpus", lambda: 2)      # two workers, whatever this machine has
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = reduce([raw], out, options=ReduceOptions(workers=2))
    return result, sorted(str(w.message) for w in caught if issubclass(w.category, CcdcalWarning))


def _cards(header):
    return [(c.keyword, c.value) for c in header.cards if c.keyword not in VOLATILE
            and not (c.keyword == "HISTORY" and "calibrated 20" in str(c.value))]


def _night_with_a_bad_light(tmp_path):
    night = make_night(tmp_path / "raw", seed=2)      # 3 lights, two filters
    lights = [tmp_path / "raw" / f"{light.name}.fits" for light in night.lights]
    assert len(lights) >= 3
    with fits.open(lights[0], mode="update") as hdul:     # a light that cannot be calibrated
        hdul[0].data = np.full(hdul[0].data.shape, np.nan, np.float32)
    return lights


def _assert_same_outputs(tmp_path, threads, procs, said_threads, said_procs, n_lights):
    assert procs.lights == threads.lights and len(procs.lights) == n_lights - 1
    assert [(s.path, s.reason) for s in procs.skipped] == [(s.path, s.reason) for s in threads.skipped]
    assert any("NaN" in s.reason for s in procs.skipped)
    assert said_procs == said_threads and said_procs   # the workers' warnings raised again here
    for rel in procs.lights:
        with fits.open(tmp_path / "threads" / rel) as a, fits.open(tmp_path / "procs" / rel) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for x, y in zip(a, b, strict=True):
                assert np.array_equal(x.data, y.data, equal_nan=True), f"{rel}[{x.name}]"
                assert _cards(x.header) == _cards(y.header), rel
    fingerprints = [{k: v["fingerprint"] for k, v in json.loads((tmp_path / d / "manifest.json").read_text())
                     ["outputs"].items()} for d in ("threads", "procs")]
    assert fingerprints[0] == fingerprints[1]
    made = sorted((tmp_path / "procs" / "previews").glob("light-*.png"))
    assert len(made) == len(procs.lights)
    for path in made:          # the previews (made in the workers) and their statistics
        assert path.read_bytes() == (tmp_path / "threads" / "previews" / path.name).read_bytes()
        assert light_facts(path)["stats"]["npix"] > 0
    assert (tmp_path / "procs" / "report.html").exists()


def test_lights_in_worker_processes_equal_lights_in_threads(tmp_path, monkeypatch):
    lights = _night_with_a_bad_light(tmp_path)
    threads, said_threads = _reduce(tmp_path / "raw", tmp_path / "threads", monkeypatch, processes=False)
    procs, said_procs = _reduce(tmp_path / "raw", tmp_path / "procs", monkeypatch, processes=True)
    assert "worker processes" in procs.executor and "worker processes" not in threads.executor
    _assert_same_outputs(tmp_path, threads, procs, said_threads, said_procs, len(lights))


_FORKED_RUN = """
import gc, json, sys, warnings
from ccdcal._shared.memory import keep_freed_memory
keep_freed_memory()          # what the ccdcal command does first: its own process
from ccdcal import ReduceOptions, reduce
from ccdcal.errors import CcdcalWarning
from ccdcal.pipeline import run
run.PROCESS_MIN_LIGHTS = run.FORKED_MIN_LIGHTS = 1
run.cpus = lambda: 2
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = reduce([sys.argv[1]], sys.argv[2], options=ReduceOptions(workers=2))
print(json.dumps({"executor": result.executor, "lights": result.lights, "frozen": gc.get_freeze_count(),
                  "skipped": [[s.path, s.reason] for s in result.skipped],
                  "said": sorted(str(w.message) for w in caught if issubclass(w.category, CcdcalWarning))}))
"""


def test_lights_in_workers_forked_from_a_fresh_command_equal_lights_in_threads(tmp_path, monkeypatch):
    # a command's process has no thread yet when the run starts: the workers fork from it
    # (a test process has numba's pool running, and its workers fork from a server instead)
    import subprocess
    import sys
    from types import SimpleNamespace

    lights = _night_with_a_bad_light(tmp_path)
    threads, said_threads = _reduce(tmp_path / "raw", tmp_path / "threads", monkeypatch, processes=False)
    env = {k: v for k, v in __import__("os").environ.items() if k != "CCDCAL_LIGHT_PROCESSES"}
    done = subprocess.run([sys.executable, "-c", _FORKED_RUN, str(tmp_path / "raw"), str(tmp_path / "procs")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert "2 worker processes (fork)" in got["executor"]
    assert got["frozen"] == 0          # the objects frozen for the fork are collectable again
    procs = SimpleNamespace(lights=got["lights"], skipped=[SimpleNamespace(path=p, reason=r) for p, r in got["skipped"]])
    _assert_same_outputs(tmp_path, threads, procs, said_threads, got["said"], len(lights))


def test_worker_processes_only_where_the_memory_budget_has_room_for_them(tmp_path, monkeypatch):
    make_night(tmp_path / "raw", seed=2)
    monkeypatch.setattr(run_module, "PROCESS_MIN_LIGHTS", 1)
    monkeypatch.setattr(run_module, "FORKED_MIN_LIGHTS", 1)
    monkeypatch.setattr(run_module, "cpus", lambda: 2)
    monkeypatch.delenv("CCDCAL_LIGHT_PROCESSES", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = reduce([tmp_path / "raw"], tmp_path / "small", options=ReduceOptions(workers=2, memory="256MiB",
                                                                                      report=False))
        roomy = reduce([tmp_path / "raw"], tmp_path / "roomy", options=ReduceOptions(workers=2, memory="1GiB",
                                                                                      report=False))
    # two workers of WORKER_BYTES (128 MiB) each may take half of the budget, not more
    assert "worker processes" not in small.executor and "2 worker processes" in roomy.executor
