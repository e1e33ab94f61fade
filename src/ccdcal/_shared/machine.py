"""What this machine lets the process use (standard library only: the command line asks before
its heavy imports)."""

from __future__ import annotations

import os


def cpus() -> int:
    """The CPUs this process may use (its affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
