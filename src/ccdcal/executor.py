"""Where per-frame work runs: a local thread pool (default) or a dask.distributed cluster.

Both executors offer one method, :meth:`map`, returning results in input order, so
results are identical whichever runs them. Dask workers must see the same paths.
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


class DaskExecutor:
    """Tasks on a dask.distributed scheduler at ``address`` (``tcp://host:8786``)."""

    def __init__(self, address: str):
        from .errors import ConfigError

        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("--scheduler needs dask.distributed: pip install 'ccdcal[dask]'") from exc
        try:
            self.client = Client(address, timeout="10s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the dask scheduler at {address} ({exc}); check the address") from exc

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> Iterator[Any]:
        futures = self.client.map(fn, list(items), pure=False)
        for future in futures:
            yield future.result()

    def close(self) -> None:
        self.client.close()


def make_executor(scheduler: str | None = None, workers: int | None = None):
    """The executor for ``scheduler`` (a dask address) or a local one."""
    return DaskExecutor(scheduler) if scheduler else LocalExecutor(workers)
