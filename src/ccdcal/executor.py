"""Where per-frame work runs: a local thread pool.

An executor offers one method, :meth:`map`, returning results in input order, so
results do not depend on how many workers ran them. A dask.distributed executor
with the same interface is planned (workers would need the same paths).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class LocalExecutor:
    """Threads in this process (numpy and numba release the GIL in the heavy parts)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or min(4, os.cpu_count() or 1)

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
        items = list(items)
        if self.workers <= 1 or len(items) <= 1:
            yield from map(fn, items)
            return
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            yield from pool.map(fn, items)

    def close(self) -> None:
        pass


def make_executor(workers: int | None = None) -> LocalExecutor:
    """The executor for per-frame work (a dask.distributed one will plug in here)."""
    return LocalExecutor(workers)
