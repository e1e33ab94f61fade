"""A helper process for judging frames (:mod:`ccdcal.stacking.judge`): started with nothing but
the standard library, so the command line can start it before its own imports and both
processes import at once.

The helper is the same interpreter running :func:`ccdcal.stacking.judge.serve_helper` (``-P``:
the working folder is not put on its path; this package's folder is, first). It reads pickled
requests on its stdin and writes pickled replies on its stdout; its stderr goes nowhere.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

from .._shared.machine import cpus

#: a helper process pays its start (~0.45 s of imports on the other CPU: numpy, astropy's FITS and
#: sep, no numba) back from this many bytes of frames, mono or colour (colour frames are judged on
#: the means of their 2 × 2 cells, no debayering); measured on 12 frames of 1536×1024 (75 MB),
#: judging ended 0.2-0.4 s sooner
HELPER_MIN_BYTES = 48 * 2**20
HELPER_MIN_FRAMES = 6

#: what the helper process runs: this package first on its path (argv[1]), no cwd on it (-P)
HELPER_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); "
               "from ccdcal.stacking.judge import serve_helper; serve_helper()")


def worth_a_helper(paths: list[str]) -> bool:
    """Whether judging these frames is worth a helper process: enough frames and bytes, and a
    second CPU (``CCDCAL_JUDGE_HELPER=0`` says never; nor in a frozen application, whose
    executable is not a Python interpreter)."""
    if len(paths) < HELPER_MIN_FRAMES or cpus() < 2 or os.environ.get("CCDCAL_JUDGE_HELPER") == "0":
        return False
    if getattr(sys, "frozen", False):
        return False
    try:
        size = sum(os.stat(p).st_size for p in paths)
    except OSError:
        return False
    return size >= HELPER_MIN_BYTES


class HelperProcess:
    """The helper process: :meth:`send` a request, :meth:`receive` a reply (both pickled);
    :meth:`close` lets it end, :meth:`kill` ends it now.

    Raises OSError when the process cannot be started.
    """

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        self._proc = subprocess.Popen([sys.executable, "-P", "-c", HELPER_CODE, root], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)

    def send(self, request: Any) -> None:
        pickle.dump(request, self._proc.stdin)
        self._proc.stdin.flush()

    def receive(self) -> Any:
        return pickle.load(self._proc.stdout)

    def close(self) -> None:
        """Let the helper end (the end of its input); killed if it has not within 5 s."""
        try:
            self._proc.stdin.close()
        except OSError:
            pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
        self._proc.stdout.close()

    def kill(self) -> None:
        self._proc.kill()
        self._proc.wait()


def start_helper(paths: list[str]) -> HelperProcess | None:
    """A helper process for judging ``paths`` when it is worth one (:func:`worth_a_helper`) and
    it starts; else None."""
    if not worth_a_helper(paths):
        return None
    try:
        return HelperProcess()
    except OSError:
        return None
