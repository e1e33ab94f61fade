"""The local executor: results in order, and the warnings state survives tasks in threads."""

from __future__ import annotations

import time
import warnings

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
