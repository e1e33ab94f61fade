"""The numba cache lock (ccdcal._shared.jit): two processes saving different signatures at once.

numba's cache picks a data file's number from the index it read; two processes that read
the index before either writes it take the same number, and the index can end pointing
one signature at the other's code (this failed CI: ``Invalid use of type(CPUDispatcher)``).
The children below are steered into exactly that interleaving with files as signals:

    A reads the index for its save, B looks its signature up, compiles and reads the index,
    A writes the index, B writes index and data, A writes its data.

With plain ``numba.njit`` that leaves {int64 -> 1} with file 1 holding the float64 code
(checked by hand when this test was written: one data file, and the third process's
``f(1)`` runs the float64 code and returns 2.0). With
ccdcal's ``njit`` the lock keeps B out (its look-up waits) until A has written both, the
steering times out after 4 s, and the cache ends consistent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("fcntl")

MODULE = """
from ccdcal._shared.jit import njit

@njit(cache=True)
def f(x):
    return x + 1
"""

CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import numba.core.caching as C

    role, signals, arg = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

    def wait(name, seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if (signals / name).exists():
                return True
            time.sleep(0.01)
        return False

    def touch(name):
        (signals / name).write_text("")

    load_index = C.IndexDataCacheFile._load_index
    save_index = C.IndexDataCacheFile._save_index
    save_data = C.IndexDataCacheFile._save_data
    calls = []
    b_in_between = []

    def steered_load_index(self):
        calls.append(1)
        if len(calls) != 2:  # the first read looks the signature up; the second is the save's
            return load_index(self)
        out = load_index(self)
        if role == "A":
            touch("A_read")
            # B, unless it is held off, looks up, compiles and reads the same index now
            b_in_between.append(wait("B_read", 4))
        else:
            touch("B_read")
            wait("A_wrote_index", 30)  # B's index, written after A's, is the one that stays
        return out

    def steered_save_index(self, overloads):
        save_index(self, overloads)
        if role == "A":
            touch("A_wrote_index")

    def steered_save_data(self, name, data):
        if role == "A":
            if b_in_between[0]:
                wait("B_done", 30)
            return save_data(self, name, data)
        save_data(self, name, data)
        touch("B_done")

    C.IndexDataCacheFile._load_index = steered_load_index
    C.IndexDataCacheFile._save_index = steered_save_index
    C.IndexDataCacheFile._save_data = steered_save_data
    sys.path.insert(0, str(signals.parent))
    import racy
    if role == "B":
        import numba
        numba.njit(lambda x: x)(1)  # the JIT warmed up: B's compile of f is quick
        wait("A_read", 60)  # A has compiled and read the index for its save
    value = racy.f(int(arg) if arg.isdigit() else float(arg))
    print(repr(value))
""")

CHECK = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import racy
    print(repr(racy.f(1)), repr(racy.f(1.5)), len(racy.f.signatures))
""")


def test_two_processes_saving_different_signatures_leave_a_consistent_cache(tmp_path: Path) -> None:
    (tmp_path / "racy.py").write_text(MODULE)
    signals = tmp_path / "signals"
    signals.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    a = subprocess.Popen([sys.executable, "-c", CHILD, "A", str(signals), "1.5"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen([sys.executable, "-c", CHILD, "B", str(signals), "1"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out_a, err_a = a.communicate(timeout=120)
    out_b, err_b = b.communicate(timeout=120)
    assert a.returncode == 0, err_a
    assert b.returncode == 0, err_b
    assert (out_a.strip(), out_b.strip()) == ("2.5", "2")
    data_files = sorted(p.name for p in (tmp_path / "cache").rglob("*.nbc"))
    assert len(data_files) == 2, data_files
    # a third process loads both signatures from the cache and gets each one's own code
    check = subprocess.run([sys.executable, "-c", CHECK, str(tmp_path)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split() == ["2", "2.5", "2"]


def test_every_kernel_module_takes_njit_from_the_locked_wrapper() -> None:
    # a module importing numba's own njit would bring the race back for its kernels
    src = Path(__file__).resolve().parents[2] / "src" / "ccdcal"
    numba_njit = re.compile(r"^from numba import .*\bnjit\b|\bnumba\.njit\b|\bnumba\.jit\b", re.M)
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if p.name != "jit.py" and numba_njit.search(p.read_text())]
    assert offenders == []
    from ccdcal._shared.jit import LockedCache
    from ccdcal.combining import _kernels

    assert isinstance(_kernels.combine_tile_sorted._cache, LockedCache)
