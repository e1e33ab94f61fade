"""ccdcal: calibrate astronomical CCD/CMOS frames — overscan, bias, dark, flat, stacking, QA.

The array core (:mod:`ccdcal.combine`, :mod:`ccdcal.calibrate`, :mod:`ccdcal.stats`,
:mod:`ccdcal.stretch`) takes and returns numpy arrays; :func:`ccdcal.reduce` runs a
whole night from a folder of raw FITS files.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "combine", "reduce", "scan", "CcdcalError"]


def __getattr__(name: str):
    # Heavy modules (numba, astropy) load on first use so `ccdcal --help` stays instant.
    if name == "combine":
        from .combine import combine

        return combine
    if name == "reduce":
        from .pipeline import reduce

        return reduce
    if name == "scan":
        from .inventory import scan

        return scan
    if name == "CcdcalError":
        from .errors import CcdcalError

        return CcdcalError
    raise AttributeError(f"module 'ccdcal' has no attribute {name!r}")
