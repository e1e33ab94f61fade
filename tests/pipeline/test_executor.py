"""The local executor: results in order, and the warnings state survives tasks in threads."""

from __future__ import annotations

import time
import warnings

import pytest

from ccdcal.errors import CcdcalWarning
from ccdcal.pipeline.executor import LocalExecutor


def _noisy_task(i: int) -> int:
    # what numpy and astropy do inside: enter and leave catch_warnings, from several threads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        time.sleep(0.001 * (i % 3))
    return i * i


def test_results_in_input_order_and_warnings_still_shown_afterwards():
    executor = LocalExecutor(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert list(executor.map(_noisy_task, range(40))) == [i * i for i in range(40)]
        warnings.warn("after the pool", CcdcalWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["after the pool"]


def test_one_band_per_master_locally():
    assert LocalExecutor(2).bands((4096, 4096), 1 << 30) == [(0, 4096)]


def _warning_task(i: int) -> int:
    if i % 5 == 2:
        warnings.warn(f"item {i} says so", CcdcalWarning, stacklevel=1)
    if i == 17:
        raise ValueError("item 17 cannot be done")
    return i * i


def test_worker_processes_give_results_in_order_with_their_warnings_and_errors_at_their_items():
    from ccdcal.pipeline.executor import ProcessExecutor

    executor = ProcessExecutor(2)
    try:
        executor.start()
        got, said = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = executor.map(_warning_task, range(40))
            try:
                for value in results:
                    got.append(value)
                    said.append([str(w.message) for w in caught])
            except ValueError as exc:
                error = str(exc)
        assert got == [i * i for i in range(17)] and error == "item 17 cannot be done"
        # each item's warnings are raised before its result is yielded (batches of more than one)
        assert said[2] == ["item 2 says so"] and said[12][-1] == "item 12 says so" and len(said[16]) == 3
        with pytest.warns(CcdcalWarning, match="item 2 says so"):      # the pool still serves
            assert list(executor.map(_warning_task, range(3))) == [0, 1, 4]
    finally:
        executor.close()


def _worker_settings(_: int) -> tuple[int, int, bool]:
    import os
    import time

    time.sleep(0.02)            # long enough that both workers take tasks

    import numba
    from astropy.io.fits import card

    from ccdcal._shared.state import _SettledFitsConf

    return os.getpid(), numba.get_num_threads(), isinstance(card.conf, _SettledFitsConf)


def test_every_worker_process_is_set_up_before_its_first_task():
    # the initializer runs in each worker: one numba thread (the workers are the parallelism)
    # and astropy's card configuration read once, whichever worker takes which task
    from ccdcal.pipeline.executor import ProcessExecutor

    executor = ProcessExecutor(2)
    try:
        executor.start()
        seen = list(executor.map(_worker_settings, range(64)))
    finally:
        executor.close()
    assert {threads for _, threads, _ in seen} == {1} and all(settled for *_, settled in seen)
    assert len({pid for pid, _, _ in seen}) == 2


def test_headers_read_by_worker_processes_give_the_same_inventory_and_warnings(tmp_path):
    """scan(header_executor=...) reads the headers in the light workers: the same frames, skips
    and CcdcalWarnings (raised again here) as reading them here."""
    import warnings

    import numpy as np
    from astropy.io import fits

    from ccdcal.errors import CcdcalWarning
    from ccdcal.pipeline.executor import ProcessExecutor
    from ccdcal.planning.inventory import scan

    for i in range(6):
        header = fits.Header({"IMAGETYP": "Light Frame" if i % 2 else "Bias Frame", "EXPTIME": 1.0 * (i % 2)})
        if i == 3:
            header["OBJECT"] = "M51"
        fits.writeto(tmp_path / f"f{i}.fits", np.zeros((8, 8), np.uint16), header)
    raw = bytearray((tmp_path / "f3.fits").read_bytes())
    at = raw.index(b"'M51")
    raw[at + 1:at + 4] = b"M\xe951"[:3]                        # a byte a card may not hold
    (tmp_path / "f3.fits").write_bytes(bytes(raw))
    (tmp_path / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)

    def scanned(executor):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inventory = scan([tmp_path], flag=False, header_executor=executor)
        return inventory, sorted(str(w.message) for w in caught if issubclass(w.category, CcdcalWarning))

    here, said_here = scanned(None)
    executor = ProcessExecutor(2)
    try:
        executor.start()
        there, said_there = scanned(executor)
    finally:
        executor.close()
    assert there.frames == here.frames and there.skipped == here.skipped
    assert said_there == said_here and any(s.startswith("f3.fits") for s in said_here)
    assert len(here.frames) == 6 and any("broken.fits" in s.path for s in here.skipped)


def test_workers_fork_only_from_the_command_s_own_thread_free_process():
    """A notebook's or a script's process (threads and libraries of its own) never forks its
    workers; the command's process does while it has no thread but its own, not once it runs one."""
    import subprocess
    import sys

    code = ("import threading, time\n"
            "from ccdcal.pipeline.executor import fork_is_safe\n"
            "from ccdcal._shared.memory import keep_freed_memory\n"
            "library = fork_is_safe()\n"
            "kept = keep_freed_memory()\n"
            "command = fork_is_safe()\n"
            "stop = threading.Event(); t = threading.Thread(target=stop.wait); t.start()\n"
            "with_thread = fork_is_safe(); stop.set(); t.join()\n"
            "print(library, kept, command, with_thread)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    library, kept, command, with_thread = done.stdout.split()
    assert library == "False" and with_thread == "False"
    if kept == "True" and sys.platform.startswith("linux"):       # glibc: the command's setting held
        assert command == "True"
