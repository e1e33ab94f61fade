"""ccdcal: calibrate astronomical CCD/CMOS frames — overscan, bias, dark, flat, stacking, QA.

The public API, each name one thing::

    ccdcal.scan(paths)                       # Inventory: what is in a folder of raw frames
    ccdcal.reduce(paths, out)                # the whole night: masters, calibrated lights, report
    ccdcal.combine(frames, ...)              # CombineResult: one master from files, arrays or CCDData
    ccdcal.calibrate(frames, bias=, dark=, flat=)   # CCDData (or files): the task reduce runs
    ccdcal.imexamine(frames, region)         # astropy Table of region statistics per frame
    ccdcal.stretch                           # the display stretches (mtf, rnc_scurve, asinh, ...)
    ccdcal.show(image)                       # a quick look in a notebook
    ccdcal.stack(lights, "m51_V.fits")       # StackRun: judge, register and stack calibrated lights

Heavy modules (numba, astropy) load on first use, so ``ccdcal --help`` stays instant. The
functions ``combine``, ``calibrate`` and ``stack`` share their names with the modules that implement
them; the package keeps the function under the name whatever is imported, so
``ccdcal.combine(...)`` works every time (``from ccdcal.combine import CombineResult`` still
reaches the module).
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself
_API: dict[str, tuple[str, str | None]] = {
    "scan": ("inventory", "scan"),
    "reduce": ("pipeline", "reduce"),
    "combine": ("combine", "combine"),
    "calibrate": ("api", "calibrate"),
    "imexamine": ("api", "imexamine"),
    "show": ("api", "show"),
    "stack": ("stacking", "stack_files"),
    "StackRun": ("stacking", "StackRun"),
    "stretch": ("stretch", None),
    "ReduceOptions": ("options", "ReduceOptions"),
    "CombineResult": ("combine", "CombineResult"),
    "Inventory": ("inventory", "Inventory"),
    "Plan": ("plan", "Plan"),
    "ReduceResult": ("pipeline", "ReduceResult"),
    "CcdcalError": ("errors", "CcdcalError"),
    "CcdcalWarning": ("errors", "CcdcalWarning"),
}

__all__ = ["__version__", *_API]


class _Package(types.ModuleType):
    """The ``ccdcal`` module: public names load lazily, and importing a submodule of the same
    name (``ccdcal.combine``) never replaces the public function bound to it."""

    def __getattr__(self, name: str):
        if name not in _API:
            raise AttributeError(f"module 'ccdcal' has no attribute {name!r}")
        module_name, attribute = _API[name]
        module = importlib.import_module(f"{__name__}.{module_name}")
        value = module if attribute is None else getattr(module, attribute)
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # The import system binds each loaded submodule on its package; for the public
        # names that are functions, keep the function.
        if name in _API and _API[name][1] is not None and isinstance(value, types.ModuleType):
            self.__dict__.pop(name, None)   # loaded again on next access, as the function
            return
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
