"""Frame-sized arrays reused by the ``ccdcal`` command's process, not returned to the system
and faulted in again (glibc's allocator only; elsewhere nothing changes).

By default glibc hands every allocation above a threshold (128 KiB, growing to at most 32 MiB)
straight to ``mmap`` and returns it with ``munmap`` when it is freed, and it serves each
thread from a heap of its own, at most 64 MiB, so a 64 MiB frame made in a worker thread
always comes from ``mmap``. A reduction makes and frees thousands of frame-sized arrays: each
new one is faulted in page by page and zeroed by the kernel. On the virtual machine measured,
a 4096² night faulted in 2.5 GB of fresh huge pages (0.85 GB with :func:`keep_freed_memory`),
and zeroing them was 8 % of the run's CPU time (``perf``: ``clear_page_erms``; 5 % with it).

:func:`keep_freed_memory` makes large blocks come from the one main heap and keeps freed ones
there for the next array. It lasts for the whole process (glibc reads the number of heaps once,
when a second thread first allocates), so only the command line calls it, first thing: the
library leaves the allocator of a notebook's or a script's process as it is.

:func:`warm_heap` then faults in, ahead of need, memory the run will hold anyway: a ``reduce``
starts it in a thread while its header scan and numba's loading keep one core busy (both
hold the GIL; faulting pages does not), so the masters and lights find their pages made.
Measured on the 4096² night (3 runs each, 5 s apart): 11.9 s without, 11.1 s with 600 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_KEEP = 1 << 30               # bytes: blocks below come from the heap, never trimmed below this
_KEPT = False                 # whether keep_freed_memory holds in this process
_BLOCK = 256 << 20            # bytes of one block warm_heap holds (well below _KEEP)


def _glibc() -> Any:
    """The C library when it is glibc (it has ``mallopt``), else None."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") if sys.platform.startswith("linux") else None
    except (AttributeError, ValueError, OSError):
        version = None
    if not (version and version.startswith("glibc")):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """For the rest of this process, freed large arrays stay in it for the next ones (one heap
    for every thread, no trimming); True when glibc took every setting."""
    global _KEPT
    libc = _glibc()
    if libc is None:
        return False
    taken = [libc.mallopt(_M_ARENA_MAX, 1), libc.mallopt(_M_MMAP_THRESHOLD, _KEEP),
             libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)]
    _KEPT = all(v == 1 for v in taken)
    return _KEPT


def keeps_freed_memory() -> bool:
    """Whether :func:`keep_freed_memory` holds in this process (the ``ccdcal`` command's)."""
    return _KEPT


def warm_heap(nbytes: int, stop: Any = None) -> bool:
    """Fault in ``nbytes`` of the heap and free them again: the arrays made next take those pages
    instead of fresh ones. Only where :func:`keep_freed_memory` holds (elsewhere freed memory
    leaves the process, and this would only cost time); True when it ran. Meant for memory the
    process will hold later anyway: it moves the page faults to a moment chosen by the caller.
    At most ``_KEEP`` less a block (glibc returns a free top of the heap above its trim
    threshold, ``_KEEP``, to the system), in blocks below its mmap threshold (a block at or
    above it would be mapped and unmapped, leaving the heap as it was); ``stop`` (a
    ``threading.Event``), once set, ends it early, freeing what it holds."""
    if not _KEPT or nbytes <= 0:
        return False
    nbytes = min(int(nbytes), _KEEP - _BLOCK)
    import mmap

    import numpy as np

    blocks = []
    step = 16 << 20
    try:
        left = nbytes
        while left > 0 and not (stop is not None and stop.is_set()):
            block = np.empty(min(left, _BLOCK), np.uint8)
            blocks.append(block)
            left -= block.size
            for start in range(0, block.size, step):   # numpy's loop releases the GIL
                if stop is not None and stop.is_set():
                    break
                block[start:start + step:mmap.PAGESIZE] = 0
    finally:
        blocks.clear()
    return True

