"""The allocator: the command keeps freed frames, and memory warmed ahead is what the next arrays
take (from the whole-night suite of issue 12)."""

from __future__ import annotations

import pytest


def test_the_command_keeps_freed_frames_for_the_next_ones():
    """With keep_freed_memory (what the ccdcal command calls first), a frame-sized array freed
    by a worker thread is reused by the next one: page faults counted by the kernel, a few
    against one per page of every frame in a process without it. Fresh processes, as the
    command's; the library itself leaves the allocator alone."""
    import subprocess
    import sys

    from ccdcal._shared import memory as _memory

    if _memory._glibc() is None:
        pytest.skip("glibc's allocator only")
    script = """
import resource, sys, threading
import numpy as np
from ccdcal._shared import memory as _memory

taken = _memory.keep_freed_memory() if sys.argv[1] == "keep" else None

def faults_making_frames():
    counts = []
    def work():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            frame = np.empty(16 << 20, np.float32)    # 64 MiB, in a worker thread
            frame.fill(1.0)
            del frame
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return counts[0]

faults_making_frames()                  # the heap grows once
print(taken, faults_making_frames())
"""
    counts = {}
    for mode in ("keep", "default"):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        taken, faults = proc.stdout.split()
        counts[mode] = int(faults)
        if mode == "keep":
            assert taken == "True"
    assert counts["keep"] * 4 < counts["default"], counts


def test_memory_warmed_ahead_is_the_memory_the_next_arrays_take():
    """warm_heap (in the command's process, with keep_freed_memory) faults pages in ahead: the
    frames a worker thread makes afterwards take a few page faults, against one per page
    without it; where keep_freed_memory does not hold it does nothing (freed memory would
    leave the process). Page faults counted by the kernel, in fresh processes."""
    import subprocess
    import sys

    from ccdcal._shared import memory as _memory

    if _memory._glibc() is None:
        pytest.skip("glibc's allocator only")
    script = """
import resource, sys, threading
import numpy as np
from ccdcal._shared import memory as _memory

# glibc's thresholds and warm_heap's blocks made small: 1 GiB asked, 112 MiB warmed (a free top of
# the heap above the trim threshold would go back to the system), in blocks below the threshold
_memory._KEEP, _memory._BLOCK = 128 << 20, 16 << 20
if sys.argv[1] != "plain" and not _memory.keep_freed_memory():
    print("untaken 0")
    sys.exit(0)
warmed = _memory.warm_heap(1 << 30) if sys.argv[1] == "warm" else None
counts = []
def work():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    frames = [np.ones(4 << 20, np.float32) for _ in range(6)]      # 6 x 16 MiB (below the threshold), kept
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(warmed, counts[0])
"""
    results = {}
    for mode in ("warm", "keep", "plain"):
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        warmed, faults = proc.stdout.split()
        if warmed == "untaken":
            pytest.skip("this glibc refuses keep_freed_memory's settings")
        results[mode] = (warmed, int(faults))
    assert results["warm"][0] == "True"
    assert results["keep"][0] == "None"
    assert results["warm"][1] * 4 < results["keep"][1], results
    # without keep_freed_memory, warm_heap declines; stopped, it ends at once
    proc = subprocess.run([sys.executable, "-c", "from ccdcal._shared import memory as _memory; print(_memory.warm_heap(1 << 20))"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr
    stopped = ("import resource, threading\nimport numpy\nfrom ccdcal._shared import memory as _memory\n_memory.keep_freed_memory()\n"
               "stop = threading.Event(); stop.set()\n"
               "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
               "print(_memory.warm_heap(1 << 30, stop), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    proc = subprocess.run([sys.executable, "-c", stopped], capture_output=True, text=True, timeout=60)
    ran, faults = proc.stdout.split()
    assert ran == "True" and int(faults) < 100, proc.stdout + proc.stderr     # 1 GiB would be 512+ faults
