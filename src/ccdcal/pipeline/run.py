"""``reduce``: scan -> plan -> masters in dependency order -> lights -> manifest and report.

The work itself is done by the tasks of :mod:`ccdcal.pipeline.tasks` (module-level functions of paths
and small frozen values), run through an executor; this module only orders them, collects
their records into the manifest (OUT/manifest.json) and reports. A rerun keeps the outputs
whose fingerprint is unchanged and redoes the rest, so an interrupted run is finished by
running the same command again.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._repr import result_html
from .._shared import memory as _memory
from .._shared import pool, state
from .._shared.machine import cpus
from .._shared.pool import LocalExecutor
from .._shared.progress import ProgressOption, resolve_progress, steps
from ..combining.options import parse_memory
from ..errors import CcdcalWarning, InputError
from ..io.frames import find_fits, primary_pixels
from ..io.guard import output_lock, reduce_inputs
from ..io.hashing import prefetch_hashes, remember_hashes
from ..io.manifest import Manifest, OutputRecord, VerifyResult, verify
from ..io.writer import sync_folders
from ..planning.inventory import Inventory, Skipped, flag_groups, scan
from ..planning.library import library_print, read_library
from ..planning.plan import MasterJob, Plan, build_plan
from ..report.page import build_report, made_master_previews
from .executor import DaskExecutor, ProcessExecutor, default_start_method, make_executor
from .options import ReduceOptions
from .tasks import (
    MasterPreviewJob,
    MasterWork,
    RunContext,
    forget_built,
    light_task,
    master_band_or_reason,
    prepare_lights,
    prepare_master,
    skipped_master,
    stack_task,
    write_master,
)

__all__ = ["ReduceOptions", "ReduceResult", "VerifyResult", "reduce", "verify"]


@dataclass
class ReduceResult:
    """What a reduction did."""

    out_dir: Path
    plan: Plan
    masters: list[str] = field(default_factory=list)       # outputs written or kept, relative to out_dir
    lights: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)        # stacked/<target>_<filter>.fits (--stack)
    skipped: list[Skipped] = field(default_factory=list)
    reused: int = 0
    report: Path | None = None
    warnings: list[str] = field(default_factory=list)      # every warning the library raised in the run
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    executor: str = ""                                     # where the tasks ran
    dashboard: str | None = None                           # the dask dashboard, when on dask

    def _repr_html_(self) -> str:
        return result_html(self)


def reduce(paths: Any, out_dir: str | os.PathLike, *, options: ReduceOptions | None = None,
           dry_run: bool = False, force: bool = False, progress: ProgressOption = None,
           scheduler: Any = None) -> ReduceResult:
    """Reduce a night: build every master and calibrate every light found under ``paths``.

    Parameters
    ----------
    paths : path-like or sequence of path-like
        Raw files, folders or glob patterns.
    out_dir : path-like
        Output folder: ``masters/``, ``calibrated/``, ``previews/``, ``report.html``, ``manifest.json``.
    options : ReduceOptions, optional
        Every choice; the defaults reduce a typical night correctly.
    dry_run : bool
        Build the plan only (``result.plan``).
    force : bool
        Redo every output even when the manifest says it is up to date.
    progress : bool or callable, optional
        True: a progress bar per stage (a widget in Jupyter, else on stderr); False or None:
        silent; or a function ``f(items, description, total=None)`` wrapping each stage's
        work (see :func:`ccdcal._shared.progress.resolve_progress`; the CLI passes its terminal
        progress bars). The library prints nothing: problems are
        :class:`~ccdcal.errors.CcdcalWarning` warnings (also kept in ``result.warnings``, the
        manifest and the report).
    scheduler : str or executor, optional
        Where the tasks run (overrides ``options.scheduler``): None, threads here;
        ``"local:N"``, a dask LocalCluster of N processes; ``"tcp://host:port"``, a running
        dask scheduler whose workers see the same paths; or an executor object
        (:mod:`ccdcal.pipeline.executor`). The results are identical wherever they run.

    Returns
    -------
    ReduceResult

    Raises
    ------
    TypeError
        If ``progress`` is none of the above (before anything is read or written).
    """
    progress = resolve_progress(progress)   # outside the run's warnings: tqdm's are not the night's
    caught: list[str] = []
    with _recording_warnings(caught):
        return _reduce(paths, Path(out_dir), options=options or ReduceOptions(), dry_run=dry_run, force=force,
                       progress=progress, caught=caught, scheduler=scheduler)


@contextlib.contextmanager
def _recording_warnings(caught: list[str]):
    """Every warning shown during the run is also kept in ``caught`` (for the manifest and report)."""
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if str(message) not in caught:
                caught.append(str(message))
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _warn(message: str) -> None:
    warnings.warn(message, CcdcalWarning, stacklevel=5)


def _reduce(paths: Any, out_dir: Path, *, options: ReduceOptions, dry_run: bool, force: bool, progress: Any,
            caught: list[str], scheduler: Any = None) -> ReduceResult:
    options.validate()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    started = time.perf_counter()
    broken: list[tuple[str, str]] = []
    files = reduce_inputs(find_fits(paths, broken), out_dir, input_folders=[p for p in paths if Path(p).is_dir()],
                          named=[p for p in paths if Path(p).is_file()], library=options.masters or ())
    if not files:
        raise InputError("no FITS files found (.fits, .fit, .fts, .fz, .gz, .xisf); check the path")
    if dry_run:
        return _dry_run(files, broken, out_dir, options, progress, caught, started)
    _check_out_dir(out_dir)
    with output_lock(out_dir), state.run_scope():   # the run's caches and pools closed when it ends
        _remove_partials(out_dir)    # what a killed run left; never another run's (the lock)
        return _run(files, broken, out_dir, options, force, progress, caught, scheduler, started)


def _scan(files: list[Path], broken: list[tuple[str, str]], progress: Any,
          processes: ProcessExecutor | None = None) -> Inventory:
    """The headers of ``files``, with the broken links met while finding them: read here, or by
    light workers forked from this process (ready at once, idle until the lights: 829 headers
    took 1.2 s here)."""
    readers = processes if processes is not None and processes.start_method == "fork" else None
    inventory = scan(files, progress=progress, flag=False, header_executor=readers)
    return replace(inventory, skipped=(*(Skipped(w, why) for w, why in broken), *inventory.skipped))


def _dry_run(files: list[Path], broken: list[tuple[str, str]], out_dir: Path, options: ReduceOptions,
             progress: Any, caught: list[str], started: float) -> ReduceResult:

    inventory = flag_groups(_scan(files, broken, progress), progress=progress)
    plan = build_plan(inventory, options.plan_options(), read_library(options.masters))
    result = ReduceResult(out_dir=out_dir, plan=plan, skipped=list(plan.skipped), warnings=caught)
    result.timings["scan and plan"] = time.perf_counter() - started
    return result


def _run(files: list[Path], broken: list[tuple[str, str]], out_dir: Path, options: ReduceOptions, force: bool,
         progress: Any, caught: list[str], scheduler: Any, started: float) -> ReduceResult:
    """A reduction that writes (the caller holds the output folder's lock)."""

    local = scheduler is None and not options.scheduler
    # started before the scan (whose Python holds one core: a server's imports take the other),
    # and before any thread of the run (workers forked from this process copy none)
    processes = _start_light_processes(files, options) if local else None
    try:
        warming = _start_warming(files, options) if local else None
        return _run_with(files, broken, out_dir, options, force, progress, caught, scheduler, started, warming,
                         processes)
    finally:
        if processes is not None:
            processes.close()


def _run_with(files: list[Path], broken: list[tuple[str, str]], out_dir: Path, options: ReduceOptions, force: bool,
              progress: Any, caught: list[str], scheduler: Any, started: float, warming: Any,
              processes: ProcessExecutor | None) -> ReduceResult:
    inventory = _scan(files, broken, progress, processes)
    with _executor(scheduler if scheduler is not None else options.scheduler, options) as executor:
        executor.check_access(_sample_inputs(f.path for f in inventory.frames), str(out_dir))
        manifest = Manifest(out_dir, force=force)
        _remember_input_hashes(manifest)
        # the pixel checks of the calibration frames are tasks too; they hash the files they read
        inventory = flag_groups(inventory, progress=progress, executor=executor, hash_files=True)
        plan = build_plan(inventory, options.plan_options(), read_library(options.masters))
        result = ReduceResult(out_dir=out_dir, plan=plan, skipped=list(plan.skipped), warnings=caught,
                              executor=_describe_executor(executor), dashboard=executor.dashboard)
        result.timings["scan and plan"] = time.perf_counter() - started
        _announce(inventory, plan, options)
        _start_input_hashes(plan)
        if processes is not None and not _many_small_lights(plan, options, processes):
            processes.close()
            processes = None
        if processes is not None:
            result.executor += f"; lights in {processes.workers} worker processes ({processes.start_method})"
        # the parts fixed once planned are made once; the rest is rebuilt at each write
        fixed = _manifest_fixed(options, inventory, plan)
        manifest.fix(fixed)
        body = lambda: _manifest_body(fixed, result)  # noqa: E731
        with executor.report(out_dir) if options.dask_report else contextlib.nullcontext():
            if warming is not None:      # done (or stopped): its block never meets the masters'
                warming()
            ctx = _run_masters(plan, out_dir, options, manifest, result, body, progress, executor)
            _run_lights(plan, ctx, manifest, result, progress, processes or executor)
            if processes is not None:
                processes.close()
            _run_stacks(plan, ctx, manifest, result, progress, executor)
    manifest.write(body())
    if options.report:
        started = time.perf_counter()

        result.report = build_report(out_dir, {**body(), "outputs": manifest.outputs}, lock=False,
                                     written=manifest.datasums)
        result.timings["report"] = time.perf_counter() - started
        manifest.write(body())
    return result


def _announce(inventory: Inventory, plan: Plan, options: ReduceOptions) -> None:
    """The plan's warnings and every flagged frame's fate, as CcdcalWarnings; --strict stops here."""
    for w in plan.warnings:
        _warn(w)
    left_out = {str(f.path) for job in plan.masters for f in job.excluded}
    for f in inventory.frames:
        for flag in f.flags:
            fate = ("left out of its master" if str(f.path) in left_out
                    else "kept" if options.exclude_flagged or options.keep_flagged else "kept; --exclude-flagged drops it")
            _warn(f"{f.name}: {flag} ({fate})")
    if options.strict and plan.skipped:
        s = plan.skipped[0]
        raise InputError(f"{s.path}: {s.reason} (--strict: {len(plan.skipped)} input(s) would be skipped)")


@contextlib.contextmanager
def _executor(scheduler: Any, options: ReduceOptions):
    """The executor of the run: one given as an object is the caller's to close."""

    if scheduler is not None and not isinstance(scheduler, str):
        yield scheduler
        return
    executor = make_executor(options.workers, scheduler=scheduler, memory=parse_memory(options.memory))
    try:
        yield executor
    finally:
        executor.close()


def _describe_executor(executor: LocalExecutor | DaskExecutor) -> str:
    address = getattr(executor, "address", None)
    if address:
        return f"dask scheduler {address} ({executor.workers} workers)"
    return f"this process ({executor.workers} threads)"


def _sample_inputs(paths: Any) -> list[str]:
    """One input per folder: what every worker must be able to read."""
    by_folder: dict[str, str] = {}
    for path in map(str, paths):
        by_folder.setdefault(os.path.dirname(path), path)
    return list(by_folder.values())


def _remember_input_hashes(manifest: Manifest) -> None:
    """Inputs' hashes from the previous manifest, where size and modification time are unchanged."""

    remember_hashes(record for entry in manifest.previous.values() for record in entry.get("inputs", ()))


def _start_input_hashes(plan: Plan) -> None:
    """Every input's hash (part of the fingerprints): those not known yet (from the previous
    manifest or the scan's pixel checks) hashed in the background while the masters are built."""

    paths = [f.path for job in plan.masters for f in job.members] + [job.frame.path for job in plan.lights]
    prefetch_hashes(paths)


def dependency_levels(masters: tuple[MasterJob, ...]) -> list[list[MasterJob]]:
    """The masters in levels: each level needs only masters of earlier levels (bias, dark, flat)."""
    done: set[str] = set()
    left = list(masters)
    levels = []
    while left:
        level = [j for j in left if j.depends_on <= done] or left[:1]
        levels.append(level)
        done |= {j.name for j in level}
        left = [j for j in left if j not in level]
    return levels


def _run_masters(plan: Plan, out_dir: Path, options: ReduceOptions, manifest: Manifest, result: ReduceResult,
                 body: Any, progress: Any, executor: LocalExecutor | DaskExecutor) -> RunContext:
    """Build the masters level by level (bias, dark, flat); returns the RunContext that knows them.

    Per level: every master's first pass (:func:`~ccdcal.pipeline.tasks.prepare_master`), then the
    bands of rows of all of them (:func:`~ccdcal.pipeline.tasks.master_band`, as the executor splits
    them), each master finished here as soon as its bands are in (the client holds one
    master's planes at a time). When the tasks run in this process, each master's file is
    written by a background thread while the next level is built (which takes the master
    from memory); a master enters the manifest once its file is written.
    """

    started = time.perf_counter()
    ctx = RunContext(out_dir=out_dir, options=options)
    for name in plan.library:   # masters of earlier runs: known by their content, like those built here
        ctx = ctx.with_master(name, Path(name), library_print(Path(name)))
    budget = parse_memory(options.memory)
    bar = iter(steps(range(len(plan.masters)), "building masters", progress))
    # a progress function counts an item once the next one is asked for: the first is asked
    # for now, so that each next() below counts the master just built
    next(bar, None)
    writing: list[tuple[OutputRecord, Any]] = []   # masters made, with their file's write (or None)
    built = False                                  # whether a master was built (not kept) here

    def record_written(wait: bool) -> None:
        while writing and (wait or writing[0][1] is None or writing[0][1].done()):
            record, future = writing.pop(0)
            if future is not None:
                future.result()                              # a failed write is raised here
            _keep(record, manifest, result, result.masters, strict=False)
            manifest.write(body())

    # the writer thread runs a kernel (the rejection map's binning) beside the next combine's:
    # not on numba's workqueue layer, which aborts when two threads run kernels at once
    writer = _Writer() if getattr(executor, "shares_memory", False) and pool.kernels_threadsafe() else None
    try:
        for level in dependency_levels(plan.masters):
            last = time.perf_counter()
            # locally one master at a time: each combine already uses every core and the budget
            prepared = list(executor.map(partial(prepare_master, ctx=ctx),
                                         [(job, manifest.previous.get(job.output)) for job in level], workers=1))
            bands = {id(w): executor.bands(w.shape, budget) for w in prepared if isinstance(w, MasterWork)}
            tiles = executor.map(partial(master_band_or_reason, ctx=ctx),
                                 [(w, y0, y1) for w in prepared if id(w) in bands for y0, y1 in bands[id(w)]],
                                 workers=1)
            for job, work in zip(level, prepared, strict=True):
                pending: list[Any] = []
                record = work if not isinstance(work, MasterWork) else \
                    _finish(work, ctx, tiles, len(bands[id(work)]), writer, pending)
                next(bar, None)
                now = time.perf_counter()
                result.timings[f"  {job.name}"] = now - last   # indented: a part of "masters"
                ctx = _accept_master(job, record, ctx, result, options)
                if record.skipped is None:   # recorded in plan order, each once its file is written
                    writing.append((record, pending[0] if pending else None))
                    built = built or isinstance(work, MasterWork)
                record_written(wait=False)
                last = time.perf_counter()
        if writer is not None and plan.lights and built:
            # while the last masters are written (lights wait for their files): what the first
            # lights share of their masters, which one of them would otherwise make while the
            # others wait for it. Only when masters were built in this run (else the lights are
            # most likely up to date), and only an optimisation: on any error the lights make
            # (and report) it themselves, and the masters written are still recorded
            try:
                prepare_lights(plan.lights[:lights_in_flight(plan, options)], ctx)
            except Exception:  # noqa: BLE001 - see above
                state.end_stage("lights")
        record_written(wait=True)
    except BaseException:
        state.end_stage("lights")   # what prepare_lights made for lights that will not run
        raise
    finally:
        if writer is not None:
            writer.shutdown(wait=True)      # never leave a file half written behind an error
            forget_built(out_dir / job.output for job in plan.masters)
        for _ in bar:
            pass
    result.timings["masters"] = time.perf_counter() - started
    return ctx


class _Writer:
    """One background thread that writes files in order and, once a write has failed (a full
    disk), writes nothing more: every later write fails with the same error."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ccdcal-write")
        self._failed: BaseException | None = None

    def submit(self, fn: Any) -> Any:
        def run() -> Any:
            if self._failed is not None:
                raise self._failed
            try:
                return fn()
            except BaseException as exc:
                self._failed = exc
                raise
        return self._pool.submit(run)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait)


def _finish(work: MasterWork, ctx: RunContext, tiles: Any, count: int, writer: Any, pending: list[Any]) -> OutputRecord:
    """Take the next ``count`` bands from ``tiles`` (this master's) and write the master."""

    mine = [next(tiles) for _ in range(count)]
    reasons = [reason for _, reason in mine if reason]
    if reasons:
        return skipped_master(work.job, reasons[0])
    return write_master(work, ctx, [tile for tile, _ in mine], writer=writer, pending=pending)


def _accept_master(job: MasterJob, record: OutputRecord, ctx: RunContext, result: ReduceResult,
                   options: ReduceOptions) -> Any:
    """The context with this master (or its failure) known to what is built on it."""
    if _skipped(record, result, strict=options.strict):
        return ctx.with_failure(job.name, record.skipped)
    return ctx.with_master(job.name, Path(ctx.out_dir) / record.output, record.datasum)


def _skipped(record: OutputRecord, result: ReduceResult, *, strict: bool) -> bool:
    """Whether a task skipped its output; the skip goes into ``result.skipped`` (fatal with ``strict``)."""
    if record.skipped is None:
        return False
    if strict:
        raise InputError(f"{record.output}: {record.skipped}")
    result.skipped.append(Skipped(record.output, record.skipped))
    return True


def _keep(record: OutputRecord, manifest: Manifest, result: ReduceResult, made: list[str], *,
          strict: bool) -> None:
    """What a task did with one output: a skip into ``result.skipped`` (fatal with ``strict``), or
    an output made or kept (and on disk) into the manifest and ``made``."""
    if _skipped(record, result, strict=strict):
        return
    manifest.record(record)
    made.append(record.output)
    result.reused += record.reused


def _run_lights(plan: Plan, ctx: RunContext, manifest: Manifest, result: ReduceResult, progress: Any,
                executor: LocalExecutor | DaskExecutor) -> None:
    """Calibrate every light (as many at once as ``--memory`` holds) and record each."""

    started = time.perf_counter()
    options = ctx.options
    items: list[tuple[Any, Any]] = [(job, manifest.previous.get(job.output)) for job in plan.lights]
    if options.report and plan.lights:
        items += [(job, None) for job in _master_previews(plan, ctx, result)]
    records = executor.map(partial(light_task, ctx=ctx), items, workers=lights_in_flight(plan, options))
    try:
        lights = (record for record in records if record is not None)
        for record in steps(lights, "calibrating lights", progress, total=len(plan.lights)):
            _keep(record, manifest, result, result.lights, strict=options.strict)
    finally:
        close = getattr(records, "close", None)
        if close is not None:   # after an error: the queued lights are cancelled, the running ones joined
            close()
        # the lights were written without a folder fsync each: their names made durable here,
        # once per folder, before any manifest lists them
        sync_folders(ctx.out_dir / rel for rel in result.lights)
        ctx.buffers.clear()         # the frames the light tasks reused
        state.end_stage("lights")   # and what they shared of the masters
    result.timings["lights"] = time.perf_counter() - started


#: a night of at least this many lights, each of at most PROCESS_MAX_PIXELS pixels, has its
#: lights calibrated in worker processes (:class:`~ccdcal.pipeline.executor.ProcessExecutor`):
#: the work of a small light is mostly Python (headers, small arrays, previews), which threads
#: of one process do one at a time. Larger lights are pixels, which numpy and numba do in
#: threads without the GIL, and their masters would be held once per process.
PROCESS_MIN_LIGHTS = 200
#: the same where the workers fork from this process (at once: no server importing the pipeline
#: first). Measured, nights of 256² lights: 40 lights take as long either way, 100 lights
#: 5.7-6.4 s with workers against 6.3-7.6 s without
FORKED_MIN_LIGHTS = 64
PROCESS_MAX_PIXELS = 1 << 21
#: what a light worker process holds of its own (measured: 110-115 MB of proportional set size
#: each, its imports, numba's kernels and the objects its refcounts copied from the server); the
#: workers take at most half of ``--memory``, the other half holds the frames (small here)
WORKER_BYTES = 128 << 20


def _light_workers(options: ReduceOptions) -> int:
    return min(options.workers or min(4, cpus()), cpus())


def _start_light_processes(files: list[Path], options: ReduceOptions) -> ProcessExecutor | None:
    """Worker processes for the lights, started before the headers are read, when the inputs
    may be a night of many small lights (enough files, none larger than such a light); the
    plan confirms it (:func:`_many_small_lights`) or they are closed unused. None when they
    cannot help (one core or one worker), when ``--memory`` is too small for them
    (:data:`WORKER_BYTES` each within half of it), or with ``CCDCAL_LIGHT_PROCESSES=0``."""
    method = default_start_method()
    if _light_workers(options) < 2 or len(files) < _min_lights(method):
        return None
    if _light_workers(options) * WORKER_BYTES > _budget(options) // 2:
        return None
    if os.environ.get("CCDCAL_LIGHT_PROCESSES") == "0":
        return None
    try:
        if max(os.stat(f).st_size for f in files) > 8 * PROCESS_MAX_PIXELS + (1 << 20):
            return None
    except OSError:
        return None                 # the scan says what is wrong with the file
    processes = ProcessExecutor(_light_workers(options), start_method=method)
    processes.start()
    return processes


def _min_lights(start_method: str) -> int:
    """The fewest lights worth the worker processes (:data:`FORKED_MIN_LIGHTS` where they fork
    from this process, else :data:`PROCESS_MIN_LIGHTS`)."""
    return FORKED_MIN_LIGHTS if start_method == "fork" else PROCESS_MIN_LIGHTS


def _many_small_lights(plan: Plan, options: ReduceOptions, processes: ProcessExecutor) -> bool:
    """Whether the plan's lights are many (for ``processes``) and small, and as many of them fit
    ``--memory`` at once as there are workers."""
    return (len(plan.lights) >= _min_lights(processes.start_method)
            and max(int(np.prod(job.frame.shape)) for job in plan.lights) <= PROCESS_MAX_PIXELS
            and lights_in_flight(plan, options) >= _light_workers(options))


def _master_previews(plan: Plan, ctx: RunContext, result: ReduceResult) -> list[Any]:
    """The report's previews of the masters this run has, where they are not made yet."""

    have = set(result.masters)
    return [MasterPreviewJob(job.name, job.output, job.kind.value) for job in plan.masters
            if job.output in have and job.name in ctx.masters
            and made_master_previews(ctx.out_dir, job.output) is None]


def _run_stacks(plan: Plan, ctx: RunContext, manifest: Manifest, result: ReduceResult, progress: Any,
                executor: LocalExecutor | DaskExecutor) -> None:
    """Stack the calibrated lights of each target and filter (``--stack``), one task each."""

    if not plan.stacks:
        return
    started = time.perf_counter()
    done = set(result.lights)
    # each light with its fingerprint (what made it): the stack's identity, wherever the folder is
    items = [(job, tuple((j.output, manifest.outputs[j.output]["fingerprint"]) for j in job.lights
                         if j.output in done), manifest.previous.get(job.output)) for job in plan.stacks]
    # one at a time here: a stack uses the whole memory budget
    records = executor.map(partial(stack_task, ctx=ctx), items, workers=1)
    for record in steps(records, "stacking", progress, total=len(items)):
        _keep(record, manifest, result, result.stacks, strict=False)   # a stack is never an input
    result.timings["stacks"] = time.perf_counter() - started


#: bytes one light holds while it is calibrated, per pixel: the raw frame (4, calibrated in
#: place), the uncertainty (4) and the mask (1), arrays the light tasks reuse
#: (tasks.BufferPool; the raw bytes pass through 4 MiB); calibrate_frame's own arrays are 9 (measured with
#: tracemalloc; tests/pipeline/test_night_memory.py checks ≤ 20); the rest is for previews and writing
LIGHT_BYTES_PER_PIXEL = 24


def _start_warming(paths: list[Any], options: ReduceOptions) -> Any:
    """Fault in the memory the run's masters and lights will hold (:func:`warm_bytes`) in a
    thread, while this one scans the headers and loads numba: a core otherwise idle
    (:func:`ccdcal._shared.memory.warm_heap`; only in the ``ccdcal`` command's process). Returns what
    to call before the masters are built (it stops the thread and waits for it), or None."""

    if not _memory.keeps_freed_memory():
        return None
    stop = threading.Event()

    def warm() -> None:
        try:
            _memory.warm_heap(warm_bytes(paths, options), stop)
        except Exception:  # noqa: BLE001 - only a head start: the run faults the pages itself
            pass

    thread = threading.Thread(target=warm, name="ccdcal-warm", daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join()

    return finish


#: bytes per pixel of the largest frame that a local run surely holds at its peak: per light in
#: flight its planes (LIGHT_BYTES_PER_PIXEL's 9: data, uncertainty, mask) and two masters'
#: planes (9 each: the fewest a light is calibrated with, bias and flat)
_HELD_PER_LIGHT, _HELD_MASTERS = 9, 18


def warm_bytes(paths: list[Any], options: ReduceOptions, *, exclude: Any = None) -> int:
    """The memory worth faulting in ahead for a local run of ``paths``: for the largest FITS
    file of the inputs (its primary image's size, read from its first header blocks; files
    under ``exclude``, the output folder, left out), what the lights in flight and two masters
    of that size hold, at most ``--memory``; 0 when the inputs cannot tell (no 2-D primary
    image, e.g. compressed files)."""

    try:
        files = find_fits(paths)
        if exclude is not None:
            skip = Path(exclude).resolve()
            files = [f for f in files if not f.resolve().is_relative_to(skip)]
        largest = max(files, key=lambda p: p.stat().st_size, default=None)
        npix = primary_pixels(largest) if largest is not None else 0
    except (OSError, InputError):
        return 0
    if npix <= 0:
        return 0
    lanes = min(options.workers or min(4, os.cpu_count() or 1), _lanes(npix, options))
    return min(_budget(options), (lanes * _HELD_PER_LIGHT + _HELD_MASTERS) * npix)


def lights_in_flight(plan: Plan, options: ReduceOptions) -> int:
    """How many lights are calibrated at once here: as many as ``--memory`` holds (at least
    one), at most the workers."""
    if not plan.lights:
        return 1
    return _lanes(max(int(np.prod(job.frame.shape)) for job in plan.lights), options)


def _lanes(npix: int, options: ReduceOptions) -> int:
    """Lights of ``npix`` pixels that ``--memory`` holds at once (at least one)."""
    return max(1, _budget(options) // max(1, LIGHT_BYTES_PER_PIXEL * npix))


def _budget(options: ReduceOptions) -> int:
    return parse_memory(options.memory)


def _manifest_fixed(options: ReduceOptions, inventory: Inventory, plan: Plan) -> dict[str, Any]:
    """The manifest's parts that do not change once the night is planned (the inputs' JSON
    took 2 s of a 4k night when it was rebuilt at every manifest write)."""
    return {
        "parameters": options.to_json(),
        "inputs": [f.to_json() for f in inventory.frames],
        "plan_text": plan.describe(),
        **plan.to_json(),
    }


def _manifest_body(fixed: dict[str, Any], result: ReduceResult) -> dict[str, Any]:
    return {
        "ccdcal_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **fixed,
        "skipped": [s.to_json() for s in result.skipped],
        "run_warnings": list(result.warnings),
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "executor": result.executor,
    }


def _check_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot create the output folder ({exc.strerror}); choose another with -o") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"{out_dir}: the output folder is not writable; choose another with -o")


def _remove_partials(out_dir: Path) -> None:
    for stale in list(out_dir.glob(".*.partial")) + list(out_dir.glob("*/.*.partial")):
        try:
            stale.unlink()
        except OSError:
            pass
