"""Threads in this process: :class:`LocalExecutor` (tasks in threads, restoring the warning
filters after) and :func:`kernels_threadsafe` (whether numba's kernels may run in two threads at
once). Leaves below the pipeline, so that a combine can use them too.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import _kernels


def kernels_threadsafe() -> bool:
    """Whether numba's threading layer runs parallel kernels from two Python threads at once
    (tbb and omp do; workqueue aborts the process). Every place that runs kernels in threads
    of its own asks here: the local executor's tasks, the master writer, a combine's reader."""
    import numba
    import numpy as np

    try:
        layer = numba.threading_layer()
    except ValueError:   # no parallel kernel has run in this process yet: run the smallest one
        probe = np.zeros((1, 1), np.float32)
        _kernels.subtract_scaled(probe, probe, np.float32(0.0))
        layer = numba.threading_layer()
    return layer != "workqueue"


class LocalExecutor:
    """Threads in this process (numpy and numba release the GIL in the heavy parts)."""

    address: str | None = None
    dashboard: str | None = None
    shares_memory = True   # the tasks run in this process: they can use what it holds

    def __init__(self, workers: int | None = None):
        self.workers = workers or min(4, os.cpu_count() or 1)

    def map(self, fn: Callable[..., Any], items: Iterable[Any], *, workers: int | None = None) -> Iterator[Any]:
        """``fn(item)`` for every item, in order; ``workers`` caps the threads of this call."""
        items = list(items)
        count = min(self.workers, workers or self.workers)
        if count > 1 and len(items) > 1:
            if not kernels_threadsafe():   # numba's workqueue layer: one task at a time
                count = 1
        if count <= 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        # warnings.catch_warnings (numpy, astropy use it) is not thread-safe: contexts entered
        # and left by tasks in several threads can leave another thread's filters in place
        # (e.g. "ignore" everything). The state is restored when the pool is done.
        state = (list(warnings.filters), warnings.showwarning, getattr(warnings, "_showwarnmsg_impl", None))
        try:
            with ThreadPoolExecutor(max_workers=count) as pool:
                yield from pool.map(fn, items)
        finally:
            warnings.filters[:] = state[0]
            warnings.showwarning = state[1]
            if state[2] is not None:
                warnings._showwarnmsg_impl = state[2]
            warnings._filters_mutated()

    def bands(self, shape: tuple[int, int], memory: int) -> list[tuple[int, int]]:
        """One band: a master is combined in one call, which streams its rows under ``memory``
        and uses every core."""
        return [(0, shape[0])]

    def check_access(self, read: Iterable[str], write: str) -> None:
        """Nothing to check: the tasks run here."""

    def report(self, folder: Path) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass
