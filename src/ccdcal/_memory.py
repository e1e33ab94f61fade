"""Frame-sized arrays reused within a reduction, not returned to the system and faulted in
again (glibc's allocator only; elsewhere nothing changes).

By default glibc hands every allocation above a threshold (128 KiB, growing to at most 32 MiB)
straight to ``mmap`` and returns it with ``munmap`` when it is freed, and it serves each
thread from a heap of its own, at most 64 MiB, so a 64 MiB frame made in a worker thread
always comes from ``mmap``. A reduction makes and frees thousands of frame-sized arrays: each
new one is faulted in page by page and zeroed by the kernel. On the virtual machine measured,
a 4096² night faulted in 2.5 GB of fresh huge pages (0.85 GB kept as here), and zeroing them
was 8 % of the run's CPU time (``perf``: ``clear_page_erms``; 5 % kept as here).

While :func:`reusing_freed_memory` is entered, large blocks come from the one main heap and
freed ones stay there for the next array; on leaving, the defaults' behaviour is set back
(fixed 128 KiB thresholds, per-thread heaps) and what is free is returned to the system
(``malloc_trim``), so a notebook's process does not keep the run's peak.

A thread that already has a heap, or takes over the heap of a thread gone before, keeps
glibc's choice: the effect is whole in a fresh process (the CLI, a script) and partial in a
long-lived one that ran threads before (a notebook's second run).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP = 1 << 30               # bytes: blocks below go to the heap, and it is never trimmed below
_DEFAULT_THRESHOLD = 128 * 1024

_LOCK = threading.Lock()
_DEPTH = 0
_LIBC: Any = None


def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        try:
            version = os.confstr("CS_GNU_LIBC_VERSION") if sys.platform.startswith("linux") else None
        except (AttributeError, ValueError, OSError):
            version = None
        if version and version.startswith("glibc"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _LIBC = libc
            except (OSError, AttributeError):
                _LIBC = False
    return _LIBC or None


@contextlib.contextmanager
def reusing_freed_memory() -> Iterator[None]:
    """Within the block, freed large arrays are kept by this process for the next ones
    (nested and concurrent entries share one setting, undone when the last one leaves)."""
    global _DEPTH
    libc = _glibc()
    if libc is None:
        yield
        return
    with _LOCK:
        _DEPTH += 1
        if _DEPTH == 1:
            libc.mallopt(_M_ARENA_MAX, 1)
            libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    try:
        yield
    finally:
        with _LOCK:
            _DEPTH -= 1
            if _DEPTH == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
                libc.mallopt(_M_ARENA_MAX, 8 * (os.cpu_count() or 1))   # glibc's limit when unset
                libc.malloc_trim(0)
