"""Issue 13: the same reduction on a dask cluster (real processes on loopback), identical results.

A ``dask scheduler`` and ``dask worker`` processes are started on 127.0.0.1 by the tests and
stopped by them; ``ccdcal reduce --scheduler tcp://...`` runs as its own process, like a user's.
Every output plane and every manifest fingerprint must equal those of a local run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

distributed = pytest.importorskip("distributed")

from ccdcal.demo import write_night  # noqa: E402
from ccdcal.pipeline.run import ReduceOptions, reduce  # noqa: E402

pytestmark = pytest.mark.slow
STARTUP = 90  # s: the most a scheduler or worker may take to come up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A scheduler and named workers, each a process of its own; stopped by :meth:`stop`."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self._start("scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--dashboard-address", ":0"], cwd=tmp)

    def _start(self, name: str, cmd: list[str], cwd: Path) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def add_worker(self, name: str, cwd: Path) -> None:
        self._start(name, [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--name", name,
                           "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1", "--no-dashboard",
                           "--memory-limit", "0", "--death-timeout", "60"], cwd=cwd)

    def client(self):
        return distributed.Client(self.address, timeout=STARTUP, set_as_default=False)

    def wait_for_workers(self, n: int) -> None:
        """Wait for ``n`` workers; a scheduler still starting may close the first connection (seen
        on a loaded machine: CommClosedError in the handshake), so connecting is tried again."""
        deadline = time.monotonic() + STARTUP
        while True:
            try:
                with self.client() as client:
                    client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
                return
            except (OSError, distributed.comm.core.CommClosedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A night the reduction has not been tuned on, and its local reduction (the reference)."""
    root = tmp_path_factory.mktemp("dask-night")
    write_night(root / "raw", seed=77, size=160, n_light=8)
    # the same relative paths as the cluster runs (input paths are part of every fingerprint)
    proc = _cli(["reduce", "raw", "-o", "local", "--stack"], cwd=root)
    assert proc.wait(300) == 0, proc.stderr.read()
    return root


def _cli(args: list[str], cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ccdcal.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _assert_identical(a: Path, b: Path) -> None:
    """Every FITS plane (data, UNCERT, MASK) bit for bit, and every manifest fingerprint."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.fits"))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*.fits"))
    for rel in files:
        with fits.open(a / rel) as ha, fits.open(b / rel) as hb:
            assert [h.name for h in ha] == [h.name for h in hb]
            for x, y in zip(ha, hb, strict=True):
                if x.data is not None:
                    assert np.array_equal(x.data, y.data, equal_nan=True), f"{rel}[{x.name}] differs"
    ma, mb = (json.loads((d / "manifest.json").read_text())["outputs"] for d in (a, b))
    assert {k: v["fingerprint"] for k, v in ma.items()} == {k: v["fingerprint"] for k, v in mb.items()}
    # headers too, but for the write time and the checksum that covers it
    volatile = {"DATE", "CHECKSUM"}
    for rel in files:
        with fits.open(a / rel) as ha, fits.open(b / rel) as hb:
            for x, y in zip(ha, hb, strict=True):
                cards = [[c for c in h.header.cards if c.keyword not in volatile
                          and not (c.keyword == "HISTORY" and "calibrated 20" in str(c.value))] for h in (x, y)]
                assert [(c.keyword, c.value) for c in cards[0]] == [(c.keyword, c.value) for c in cards[1]], rel


def _task_counts(cluster: Cluster) -> dict[str, int]:
    """Tasks the scheduler has seen, by prefix (the task function's name)."""
    def count(dask_scheduler=None):
        done: dict[str, set] = {}
        for entry in dask_scheduler.transition_log:   # (key, start, finish, ...)
            key, finish = entry[0], entry[2]
            if finish == "memory":
                done.setdefault(str(key).split("-")[0], set()).add(key)
        return {name: len(keys) for name, keys in done.items()}

    with cluster.client() as client:
        return client.run_on_scheduler(count)


def test_reduce_on_a_cluster_is_identical_to_a_local_run(cluster, night):
    for name in ("w1", "w2"):
        cluster.add_worker(name, cwd=night)
    cluster.wait_for_workers(2)
    proc = _cli(["reduce", "raw", "-o", "on-dask", "--scheduler", cluster.address, "--dask-report", "--stack"],
                cwd=night)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"dask scheduler {cluster.address}" in out and "dask dashboard: http" in out
    _assert_identical(night / "local", night / "on-dask")
    assert (night / "on-dask" / "dask-report.html").stat().st_size > 10_000
    counts = _task_counts(cluster)
    # the work went through the cluster: every master's first pass, its bands, every light
    plan = json.loads((night / "on-dask" / "manifest.json").read_text())
    n_masters = sum(1 for v in plan["outputs"].values() if v["kind"] not in ("light", "stack"))
    assert counts.get("prepare_master") == n_masters
    assert counts.get("master_band_or_reason", 0) >= 2 * 2 * n_masters   # two bands per worker at least
    # every light, and the report's previews of every master (queued with the lights)
    n_lights = sum(1 for v in plan["outputs"].values() if v["kind"] == "light")
    assert counts.get("light_task") == n_lights + n_masters and n_lights > 0
    assert len(list((night / "on-dask" / "previews").glob("master-*.json"))) == n_masters
    assert counts.get("stack_task") == sum(1 for v in plan["outputs"].values() if v["kind"] == "stack") == 2


def test_a_worker_killed_mid_run_is_survived_with_identical_outputs(cluster, night):
    for name in ("w1", "w2"):
        cluster.add_worker(name, cwd=night)
    cluster.wait_for_workers(2)
    proc = _cli(["reduce", "raw", "-o", "survived", "--scheduler", cluster.address, "--stack"], cwd=night)
    killed_while_busy = False
    with cluster.client() as client:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            info = client.scheduler_info()["workers"]
            busy = {w["name"] for addr, w in info.items() if client.processing().get(addr)}
            if "w1" in busy:
                cluster.kill("w1")                   # SIGKILL while it runs a task
                killed_while_busy = proc.poll() is None
                break
            time.sleep(0.02)
    out, err = proc.communicate(timeout=300)
    assert killed_while_busy, "w1 never ran a task while the run was going"
    assert proc.returncode == 0, err
    assert not list((night / "survived").rglob("*.partial"))
    _assert_identical(night / "local", night / "survived")


def test_a_worker_that_cannot_see_the_paths_fails_the_run_in_one_line(cluster, night, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cluster.add_worker("lost", cwd=elsewhere)   # relative input paths mean nothing there
    cluster.wait_for_workers(1)
    proc = _cli(["reduce", "raw", "-o", "blocked", "--scheduler", cluster.address], cwd=night)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "lost" in lines[0] or "cannot read raw/" in lines[0]
    assert "cannot read raw/" in lines[0] and "same paths" in lines[0]
    assert not list((night / "blocked").rglob("*.fits"))   # nothing was done


def test_scheduler_without_dask_installed_says_what_to_install(monkeypatch):
    import builtins

    from ccdcal.errors import ConfigError
    from ccdcal.pipeline.executor import make_executor

    real_import = builtins.__import__

    def no_distributed(name, *args, **kw):
        if name == "distributed" or name.startswith("distributed."):
            raise ImportError(name)
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_distributed)
    with pytest.raises(ConfigError, match=r"pip install 'ccdcal\[dask\]'"):
        make_executor(scheduler="tcp://127.0.0.1:1")


def test_local_cluster_from_python_is_identical(night, monkeypatch):
    """``ccdcal.reduce(..., scheduler="local:2")``: the Python face of the same thing."""
    monkeypatch.chdir(night)
    result = reduce(["raw"], "from-python", scheduler="local:2", options=ReduceOptions(stack=True))
    assert result.executor.startswith("dask scheduler") and "2 workers" in result.executor
    _assert_identical(night / "local", night / "from-python")


def test_the_slurm_example_builds_a_job_script_for_ccdcal_workers():
    """examples/slurm_cluster.py: the job script dask-jobqueue would submit (no SLURM needed)."""
    pytest.importorskip("dask_jobqueue")
    import importlib.util

    spec = importlib.util.spec_from_file_location("slurm_example", Path(__file__).parents[1] / "examples"
                                                  / "slurm_cluster.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    cluster = example.make_cluster(queue="short", account="astro", scheduler_options={"host": "127.0.0.1"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p short" in script and "#SBATCH -A astro" in script
    assert "--nthreads 8" in script and "--lifetime 110m" in script and "#SBATCH --cpus-per-task=8" in script
    assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")


def test_a_rerun_after_the_client_is_killed_resumes_from_the_manifest(cluster, night):
    for name in ("w1", "w2"):
        cluster.add_worker(name, cwd=night)
    cluster.wait_for_workers(2)
    args = ["reduce", "raw", "-o", "resumed", "--scheduler", cluster.address, "--stack"]
    proc = _cli(args, cwd=night)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and _recorded(night / "resumed") < 2:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()                                   # the client dies; the workers live on
    proc.communicate(timeout=30)
    rerun = _cli(args, cwd=night)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    manifest = json.loads((night / "resumed" / "manifest.json").read_text())
    assert sum(1 for v in manifest["outputs"].values() if v.get("reused")) >= 2
    assert not list((night / "resumed").rglob("*.partial"))
    _assert_identical(night / "local", night / "resumed")


def _recorded(out: Path) -> int:
    """Outputs the manifest of a running reduction lists so far."""
    try:
        return len(json.loads((out / "manifest.json").read_text())["outputs"])
    except (OSError, ValueError, KeyError):
        return 0


def test_many_small_items_go_in_batches_and_come_back_in_order():
    """Issue 31: a night of many small lights is not one dask task per light (the scheduler's
    round trip costs as much as a small light); results still come back one per item, in order."""
    from ccdcal.pipeline.executor import DaskExecutor, batch_size

    # by hand: at least 8 tasks per worker, else one item per task
    assert (batch_size(10, 2), batch_size(16, 2), batch_size(800, 2), batch_size(100, 1)) == (1, 1, 50, 12)
    executor = DaskExecutor("local:1")
    submitted = []
    client_map = executor.client.map

    def counting(fn, batches, **kw):
        submitted.append(len(batches))
        return client_map(fn, batches, **kw)

    executor.client.map = counting
    try:
        items = list(range(-57, 43))
        assert list(executor.map(abs, items)) == [abs(i) for i in items]
    finally:
        executor.close()
    assert submitted == [9]         # 100 items in tasks of 12: 9 tasks, not 100


def _fails_at_seven(i):
    if i == 7:
        raise ValueError("item 7")
    return i


def test_an_item_that_fails_in_a_batch_is_raised_at_its_place():
    """Issue 31: the items before a failing one in its batch are still yielded (each may have
    written an output the manifest must record), then its error is raised."""
    from ccdcal.pipeline.executor import DaskExecutor

    executor = DaskExecutor("local:1")
    got = []
    try:
        with pytest.raises(ValueError, match="item 7"):
            for value in executor.map(_fails_at_seven, range(40)):
                got.append(value)
    finally:
        executor.close()
    assert got == list(range(7))
