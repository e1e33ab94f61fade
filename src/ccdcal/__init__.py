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

Heavy modules (numba, astropy) load on first use (PEP 562 ``__getattr__``), so ``ccdcal --help``
stays instant. No submodule shares its name with a public function: ``ccdcal.combine`` is
always the function, and ``import ccdcal.<module>`` always gives a module.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself
_API: dict[str, tuple[str, str | None]] = {
    "scan": ("planning.inventory", "scan"),
    "reduce": ("pipeline.run", "reduce"),
    "combine": ("combining.engine", "combine"),
    "calibrate": ("notebook", "calibrate"),
    "imexamine": ("notebook", "imexamine"),
    "show": ("notebook", "show"),
    "stack": ("stacking.workflow", "stack_files"),
    "debayer": ("colour.demosaic", "debayer_image"),
    "StackRun": ("stacking.workflow", "StackRun"),
    "stretch": ("stretch", None),
    "ReduceOptions": ("pipeline.options", "ReduceOptions"),
    "CombineResult": ("combining.results", "CombineResult"),
    "Inventory": ("planning.inventory", "Inventory"),
    "Plan": ("planning.plan", "Plan"),
    "ReduceResult": ("pipeline.run", "ReduceResult"),
    "CcdcalError": ("errors", "CcdcalError"),
    "CcdcalWarning": ("errors", "CcdcalWarning"),
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """A public name, loaded on first use and then bound on the package."""
    if name not in _API:
        raise AttributeError(f"module 'ccdcal' has no attribute {name!r}")
    module_name, attribute = _API[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
