"""Imported by the process that light worker processes fork from
(:class:`ccdcal.pipeline.executor.ProcessExecutor`: the run's own process, or a server): the pipeline's modules, and numba started
by one serial kernel (no threads yet, so forking stays safe), which every worker then inherits
instead of starting numba itself (about 0.45 s each)."""

from __future__ import annotations

import numpy as np

from .._shared._kernels import finite_clamped
from . import tasks  # noqa: F401 - what the workers run

finite_clamped(np.zeros(1, np.float32), np.zeros(1, np.float64))
