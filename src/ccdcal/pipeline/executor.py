"""Where the tasks of a reduction run: threads in this process, or a dask.distributed cluster.

An executor offers :meth:`map` (results in input order, so nothing depends on how many
workers ran them or where), :meth:`bands` (how the rows of one master are split into tasks)
and :meth:`check_access` (whether every worker sees the run's paths). The pipeline only
talks to this interface; :func:`make_executor` picks the executor from ``--scheduler``:

- ``None``: :class:`LocalExecutor`, threads in this process;
- ``"local:N"``: a dask ``LocalCluster`` of N worker processes on this machine;
- ``"tcp://HOST:PORT"`` (or any address dask understands): a running dask scheduler.

Only tasks (module-level functions), paths, row bounds and small frozen values travel to a
worker; the workers read their inputs and write their outputs themselves, so they need the
same paths as the client (a shared filesystem).
"""

from __future__ import annotations

import contextlib
import gc
import math
import multiprocessing
import os
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba.np.ufunc import parallel as _numba_parallel

from .._shared import _kernels
from .._shared.memory import keep_freed_memory, keeps_freed_memory
from .._shared.pool import LocalExecutor
from .._shared.state import settle_fits_conf
from ..errors import CcdcalWarning, ConfigError, InputError, OutputError

#: bytes per output pixel a master band holds on a worker (data, uncertainty, rejection
#: counts, mask) plus its share of the tiles: used to size the bands under ``--memory``
MASTER_BAND_BYTES_PER_PIXEL = 16


class DaskExecutor:
    """Tasks on a dask.distributed cluster (``address``: a scheduler, or ``local:N``).

    Results come back in input order. A worker that dies mid-task is survived: the
    scheduler reruns its tasks elsewhere (outputs are written atomically, so a killed task
    leaves no half file). Exceptions of a task are re-raised here.
    """

    shares_memory = False   # workers are other processes: what they use must be on disk

    def __init__(self, address: str, *, memory: int | None = None):
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise ConfigError("--scheduler needs dask.distributed: pip install 'ccdcal[dask]'") from exc
        self._cluster = None
        if address.startswith("local:"):
            try:
                n = int(address.split(":", 1)[1])
            except ValueError as exc:
                raise ConfigError(f"--scheduler {address}: use local:N with N worker processes") from exc
            if n < 1:
                raise ConfigError(f"--scheduler {address}: needs at least one worker")
            self._cluster = LocalCluster(n_workers=n, threads_per_worker=max(1, (os.cpu_count() or 1) // n),
                                         processes=True, dashboard_address=":0",
                                         memory_limit=0, silence_logs=40)
            target: Any = self._cluster
        else:
            target = address
        try:
            self.client = Client(target, timeout="20s", set_as_default=False)
        except (OSError, TimeoutError) as exc:
            if self._cluster is not None:
                self._cluster.close()
            raise InputError(f"--scheduler {address}: cannot reach the dask scheduler ({exc})") from exc
        self.address = self.client.scheduler.address
        self.dashboard = self.client.dashboard_link
        self.memory = memory

    @property
    def workers(self) -> int:
        return max(1, len(self.client.scheduler_info().get("workers", {})))

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, workers: int | None = None) -> Iterator[Any]:
        """Submit every item at once; yield the results in input order (each task's fetched when
        asked, so the client holds one task's results at a time).

        Many items go in batches, one task each (:func:`batch_size`: at least
        :data:`TASKS_PER_WORKER` tasks per worker, so the work stays shared): a small light costs
        milliseconds, the scheduler's round trip and the task's arguments about as much."""
        items = list(items)
        name = getattr(getattr(fn, "func", fn), "__name__", "task")   # the task prefix the dashboard shows
        run = uuid.uuid4().hex[:8]
        size = batch_size(len(items), self.workers)
        batches = [items[i:i + size] for i in range(0, len(items), size)]
        futures = self.client.map(partial(_captured_batch, fn), batches,
                                  key=[f"{name}-{run}-{i}" for i in range(len(batches))])
        try:
            for future in futures:
                results = future.result()
                future.release()
                yield from _unpacked(results)
        finally:
            for future in futures:
                future.cancel()

    def bands(self, shape: tuple[int, int], memory: int) -> list[tuple[int, int]]:
        """Bands of output rows: at least two per worker (so that they share the work), and
        each within ``memory`` on its worker."""
        ny, nx = shape
        by_memory = math.ceil(ny * nx * MASTER_BAND_BYTES_PER_PIXEL / max(memory // 2, 1))
        count = max(1, min(ny, max(2 * self.workers, by_memory)))
        edges = [round(k * ny / count) for k in range(count + 1)]
        return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]

    def check_access(self, read: Iterable[str], write: str) -> None:
        """Fail with one line when a worker cannot read an input or write the output folder."""
        read = list(read)
        answers = self.client.run(_access_problem, read, write)
        for worker, problem in sorted(answers.items()):
            if problem:
                raise InputError(f"dask worker {worker}: {problem}; the workers need the same paths as this"
                                 " machine (a shared filesystem, and absolute paths if they start elsewhere)")

    def report(self, folder: Path) -> contextlib.AbstractContextManager:
        """Dask's performance report (HTML) of the run, saved in ``folder``."""
        from distributed import performance_report

        try:
            import bokeh  # noqa: F401 - dask draws the report with it
        except ImportError as exc:
            raise ConfigError("--dask-report needs bokeh: pip install 'ccdcal[dask]'") from exc
        stack = contextlib.ExitStack()
        stack.enter_context(self.client.as_current())
        stack.enter_context(performance_report(filename=str(Path(folder) / "dask-report.html")))
        return stack

    def close(self) -> None:
        self.client.close()
        if self._cluster is not None:
            self._cluster.close()


class ProcessExecutor:
    """Lights in worker processes of this machine: a night of many small frames is bound by
    Python (headers, small arrays, previews: the GIL), not by pixels, so threads of one process
    calibrate them one at a time in effect; processes use every core.

    On Linux, while this process has no thread but the caller's, the workers are forked from it
    (``fork``): they share its imported modules and started numba, page for page, until they
    write to them (its objects frozen first, so that their collector never touches them), and
    the run holds ~60 MB per worker less than with workers of their own imports. Elsewhere, or
    once a thread runs here (numba's pool, a notebook's), they fork from a server process that
    imported the pipeline and started numba once (``forkserver``, :mod:`ccdcal.pipeline._worker`;
    ``spawn`` where there is none): a fork copies no thread, and a lock held by one would stay
    locked in the child. :meth:`start` starts them (from a thread, while this process reads the
    headers, when it must wait for the server's imports). Items go in batches
    (:func:`batch_size`), results come back in input order with each item's CcdcalWarnings
    raised again here. The workers read the masters from their files (``shares_memory``
    False), as dask workers do.
    """

    shares_memory = False
    address: str | None = None
    dashboard: str | None = None

    def __init__(self, workers: int, *, start_method: str | None = None):
        start_method = start_method or default_start_method()
        context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            context.set_forkserver_preload(["ccdcal.pipeline._worker"])
        self.start_method = start_method
        self.workers = max(1, int(workers))
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context, initializer=_start_worker)
        self._starter: threading.Thread | None = None
        self._forked = False
        self._frozen = False

    def start(self) -> None:
        """Start the workers now (not at the first task): forked here at once, or from a thread
        that waits for the server's imports (1-2 s), which this process need not watch."""
        if self.start_method == "fork":
            if not self._forked:
                self._forked = True
                self._fork()
        elif self._starter is None:
            self._starter = threading.Thread(target=self._start, name="ccdcal-start-workers", daemon=True)
            self._starter.start()

    def _fork(self) -> None:
        # numba started by one serial kernel (no thread), as the server does, to be shared
        _kernels.finite_clamped(np.zeros(1, np.float32), np.zeros(1, np.float64))
        # objects made so far frozen until the workers are closed: no collector, the workers' or
        # this process's, writes to (copies) the pages they share (this process's collections
        # copied ~30 MB of them more on a night of 1600 lights than on one of 800)
        self._frozen = gc.get_freeze_count() == 0      # what this froze, this unfreezes
        gc.freeze()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of any second thread: numpy's BLAS pool, which stops itself
                # around a fork (fork_is_safe admits no other)
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                # the pool forks every worker at its first task (then starts its own threads)
                self._pool.submit(_started_worker)
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        try:
            # a task each, submitted at once, makes the pool start every worker (each runs
            # _start_worker first, the pool's initializer)
            for future in [self._pool.submit(_started_worker) for _ in range(self.workers)]:
                future.result()
        except Exception:  # noqa: BLE001 - only a head start: the first task meets the same problem
            pass

    def _started(self) -> None:
        if self._starter is not None:
            self._starter.join()

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, workers: int | None = None) -> Iterator[Any]:
        """``fn(item)`` of every item in the workers, in batches; results in input order."""
        items = list(items)
        self._started()
        size = batch_size(len(items), self.workers)
        futures = [self._pool.submit(_captured_batch, fn, items[i:i + size]) for i in range(0, len(items), size)]
        try:
            for future in futures:
                try:
                    results = future.result()
                except BrokenProcessPool as exc:
                    raise OutputError("a light worker process died (out of memory?);"
                                      " rerun: what was written is kept") from exc
                yield from _unpacked(results)
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        self._started()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._frozen:       # this process's objects collectable again
            self._frozen = False
            gc.unfreeze()


def _native_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1 << 30


#: this process's threads once numpy is imported: its BLAS's pool (OpenBLAS stops it around a
#: fork, by its own atfork handlers) and the main thread
_THREADS_AT_IMPORT = _native_threads()


def default_start_method() -> str:
    """How light workers start here: ``fork`` where :func:`fork_is_safe`, else ``forkserver``
    (``spawn`` where there is none)."""
    if fork_is_safe():
        return "fork"
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def fork_is_safe() -> bool:
    """Whether this process may fork workers from itself: the ``ccdcal`` command's own process
    (:func:`ccdcal._shared.memory.keeps_freed_memory`: a notebook's or a script's may run threads
    and libraries this cannot see, OpenMP's among them), on Linux, with no Python thread but this
    one, numba's thread pool not started, and no native thread started since this module was
    imported (``/proc/self/task``): a fork copies only the calling thread, and a lock another one
    held would stay locked in the child."""
    if (not keeps_freed_memory() or not sys.platform.startswith("linux")
            or "fork" not in multiprocessing.get_all_start_methods()):
        return False
    return (threading.active_count() == 1 and not getattr(_numba_parallel, "_is_initialized", True)
            and _native_threads() <= _THREADS_AT_IMPORT)


def _started_worker() -> bool:
    """A task that only waits for a worker to be started."""
    return True


def _start_worker() -> None:
    """Run first in each worker (the pool's initializer): the allocator set as the command line sets it (freed frames
    reused, :func:`ccdcal._shared.memory.keep_freed_memory`), astropy's card configuration read
    once (:func:`ccdcal._shared.state.settle_fits_conf`, as this process does during a run), and
    one numba thread (the workers are the parallelism). numba itself started in the process they
    forked from (this one or the server, :mod:`ccdcal.pipeline._worker`), or here (spawned workers)."""
    keep_freed_memory()
    settle_fits_conf()
    numba.set_num_threads(1)
    _kernels.finite_clamped(np.zeros(1, np.float32), np.zeros(1, np.float64))


#: Tasks per worker at the least when items are batched (:meth:`DaskExecutor.map`).
TASKS_PER_WORKER = 8


def batch_size(items: int, workers: int) -> int:
    """Items per task: one, unless there are more than :data:`TASKS_PER_WORKER` per worker."""
    return max(1, items // (max(1, workers) * TASKS_PER_WORKER))


@dataclass(frozen=True)
class _Failed:
    """An item of a batch that raised: raised again by :meth:`DaskExecutor.map` at its place."""

    error: BaseException


def _unpacked(results: list[tuple[Any, list[str]]]) -> Iterator[Any]:
    """The values of a batch run on a worker (:func:`_captured_batch`), in order, each item's
    CcdcalWarnings raised again here (where they are seen) before its value, and an item that
    raised raised again at its place (the ones before it yielded)."""
    for value, messages in results:
        for message in messages:
            warnings.warn(message, CcdcalWarning, stacklevel=3)
        if isinstance(value, _Failed):
            raise value.error
        yield value


def _captured_batch(fn: Callable[..., Any], items: list[Any]) -> list[tuple[Any, list[str]]]:
    """Run on a worker: :func:`_captured` of each item, in order; an item that raises does not
    lose the others' results (each of them may have written an output the manifest must record)."""
    out: list[tuple[Any, list[str]]] = []
    for item in items:
        try:
            out.append(_captured(fn, item))
        except Exception as exc:  # noqa: BLE001 - raised again by map, at this item
            out.append((_Failed(exc), []))
    return out


def _captured(fn: Callable[..., Any], item: Any) -> tuple[Any, list[str]]:
    """Run on a worker: ``fn(item)`` and the messages of the CcdcalWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CcdcalWarning)
        value = fn(item)
    return value, [str(w.message) for w in caught if issubclass(w.category, CcdcalWarning)]


def _access_problem(read: list[str], write: str) -> str | None:
    """Run on every worker: why it cannot do the run's work (None when it can)."""
    import tempfile

    for path in read:
        try:
            with open(path, "rb") as fh:
                fh.read(2880)
        except OSError as exc:
            return f"cannot read {path} ({exc.strerror or exc})"
    try:
        os.makedirs(write, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=write, prefix=".access-", suffix=".partial"):
            pass
    except OSError as exc:
        return f"cannot write in {write} ({exc.strerror or exc})"
    return None


def make_executor(workers: int | None = None, *, scheduler: str | None = None,
                  memory: int | None = None) -> LocalExecutor | DaskExecutor:
    """The executor for a run: ``scheduler`` None runs tasks in threads here (``workers`` of
    them, default min(4, cores)); ``"local:N"`` or a scheduler address runs them on dask."""
    if scheduler:
        return DaskExecutor(scheduler, memory=memory)
    return LocalExecutor(workers)
