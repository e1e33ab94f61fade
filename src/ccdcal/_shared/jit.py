"""``njit`` whose on-disk cache is safe when several processes compile at once.

numba's cache (``cache=True``) keeps, per function, an index file mapping each signature to
a numbered data file. Saving a new signature reads the index, takes the first free number,
writes the index, then writes the data file, with no lock between processes. Two processes
that compile *different* signatures of one function at the same moment (two pytest-xdist
workers, two Dask worker processes on a fresh install, the CLI and a helper process) can
pick the same number: one signature's entry then points at the other's machine code, and
every later process that loads it fails with a typing error (``Invalid use of
type(CPUDispatcher(...))``, seen in CI) or worse. numba's own issues #4807 and #10128
describe this family of races; neither is fixed upstream.

:func:`njit` is numba's ``njit`` plus, for ``cache=True``, a lock around each load and
save of the cache: an advisory ``flock`` on a file in the cache folder (one per folder,
so per source module), re-entrant within a process. Compilation itself is not locked;
only the few milliseconds of reading or writing the index and data files are. Where
``fcntl`` is missing (Windows) or the lock file cannot be made, it is numba's cache as
is.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from numba import njit as _numba_njit

try:  # POSIX only
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".ccdcal-numba-cache.lock"

# The folders this process holds locked, with their descriptor and depth: empty whenever
# no load or save is running (guarded by _process_lock, which also serialises threads).
_held: dict[str, tuple[int, int]] = {}
_process_lock = threading.RLock()


def lock_path(cache_path: str) -> str:
    """The lock file guarding the numba cache folder ``cache_path``."""
    return os.path.join(cache_path, LOCK_NAME)


@contextmanager
def cache_lock(cache_path: str) -> Iterator[None]:
    """Hold the inter-process lock of one numba cache folder (re-entrant in a process)."""
    with _process_lock:
        if cache_path in _held:
            fd, depth = _held[cache_path]
            _held[cache_path] = (fd, depth + 1)
            try:
                yield
            finally:
                _held[cache_path] = (fd, depth)
            return
        fd = _open_locked(cache_path)
        _held[cache_path] = (fd, 1)
        try:
            yield
        finally:
            del _held[cache_path]
            if fd >= 0:
                os.close(fd)  # closing the descriptor releases the flock


def _open_locked(cache_path: str) -> int:
    """A descriptor holding an exclusive flock on the folder's lock file, or -1 when none can be had."""
    if fcntl is None:
        return -1
    try:
        os.makedirs(cache_path, exist_ok=True)
        fd = os.open(lock_path(cache_path), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return -1
    return fd


class LockedCache:
    """A numba function cache whose loads and saves hold :func:`cache_lock` (all else delegated)."""

    def __init__(self, cache: Any) -> None:
        self._inner = cache

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        with cache_lock(self._inner.cache_path):
            return self._inner.load_overload(sig, target_context)

    def save_overload(self, sig: Any, data: Any) -> None:
        with cache_lock(self._inner.cache_path):
            self._inner.save_overload(sig, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def njit(func: Callable | None = None, **options: Any) -> Any:
    """numba's ``njit`` (keyword options only); with ``cache=True`` the cache is locked across processes."""

    def decorate(f: Callable) -> Any:
        dispatcher = _numba_njit(**options)(f)
        if options.get("cache"):
            lock_cache(dispatcher)
        return dispatcher

    return decorate(func) if func is not None else decorate


def lock_cache(dispatcher: Any) -> Any:
    """Put :class:`LockedCache` in front of a numba dispatcher's on-disk cache (idempotent)."""
    cache = getattr(dispatcher, "_cache", None)
    if (cache is not None and not isinstance(cache, LockedCache)
            and hasattr(cache, "load_overload") and hasattr(cache, "save_overload")
            and isinstance(getattr(cache, "cache_path", None), str)):
        dispatcher._cache = LockedCache(cache)
    return dispatcher
