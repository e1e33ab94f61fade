"""The notebook-facing functions: :func:`calibrate` (frames with given masters, the task
``reduce`` runs), :func:`imexamine` (region statistics of many frames as a table) and
:func:`show` (a quick look). Frames may be paths, arrays or ``CCDData`` throughout.
"""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._repr import Preview
from ._shared.names import NameBook
from ._shared.progress import ProgressOption, resolve_progress, steps
from .calibration.arithmetic import Master, calibrate_frame
from .calibration.masters import normalise_flat
from .calibration.overscan import overscan_geometry
from .calibration.recipe import Recipe
from .errors import CcdcalError, CcdcalWarning, InputError
from .io.frames import find_fits, read_colour, read_image
from .io.guard import output_lock, refuse_overwrite
from .io.headers import (
    TEMP_KEYS,
    adc_shift,
    exposure_of,
    light_header,
    read_temperature,
    resolve_detector,
)
from .pipeline.options import ReduceOptions
from .pipeline.tasks import RunContext, calibrate_light, load_master
from .planning.inventory import scan_file
from .planning.plan import (
    BiasMaster,
    DarkMaster,
    LightJob,
    MasterIndex,
    geometry,
    light_output,
    pedestal_left,
    steps_done,
)
from .qa.stats import region_stats

_PathLike = (str, os.PathLike)


def _as_list(frames: Any) -> tuple[list[Any], bool]:
    """``frames`` as a list, and whether a single frame was given."""
    if isinstance(frames, _PathLike):
        text = str(frames)
        if any(ch in text for ch in "*?[") and not Path(text).exists():
            found = sorted(glob.glob(text))
            if not found:
                raise InputError(f"{text}: no file matches; check the pattern")
            return found, False
        if Path(text).is_dir():
            return [str(p) for p in find_fits([text])], False
        return [frames], True
    if isinstance(frames, np.ndarray) or hasattr(frames, "unit") or hasattr(frames, "data") and not isinstance(frames, Sequence):
        return [frames], True
    return list(frames), False


# -- calibrate --------------------------------------------------------------------------------------
def calibrate(frames: Any, *, bias: Any = None, dark: Any = None, flat: Any = None,
              output: str | os.PathLike | None = None, biassec: str | None = None, trimsec: str | None = None,
              overscan: bool = True, overscan_model: str = "legendre", overscan_order: int = 3,
              overscan_axis: str | None = None, dark_scale: float | None = None,
              progress: ProgressOption = None, **options: Any) -> Any:
    """Calibrate frames with the given masters: (raw − overscan − bias − k·dark) / flat.

    The same task as :func:`ccdcal.reduce` and ``ccdcal calibrate``: the plan's rules choose
    the dark (among several) and its scale, the one calibration arithmetic applies it, and
    the result carries uncertainty, mask and a header that says what was done.

    Parameters
    ----------
    frames : path-like, ndarray, CCDData, or a sequence of them
        Raw frames; a folder or a glob pattern reads every FITS file in it.
    bias, flat : path-like, ndarray, CCDData or CombineResult, optional
        Master bias (ADU) and master flat (normalised here when its header has no FLATNORM).
    dark : path-like, ndarray, CCDData, CombineResult, or a sequence of paths, optional
        Bias-subtracted master dark(s); among several files the plan's rule picks one per frame.
    output : path-like, optional
        A folder: each raw file is written there as ``<stem>.fits`` and the paths are
        returned (frames must be files). Without it, ``CCDData`` are returned.
    biassec, trimsec : str, optional
        Overscan and data sections (IRAF ``[x1:x2,y1:y2]``); default: the frame's header.
    overscan, overscan_model, overscan_order, overscan_axis
        Whether and how the overscan is fitted (see ``ccdcal reduce --help``).
    dark_scale : float, optional
        For arrays without an exposure time: the factor of the dark (default: the
        exposure ratio from the headers, else 1).
    progress : bool or callable, optional
        True: a progress bar over the frames (a widget in Jupyter, else on stderr); False or
        None: silent; or a function ``f(items, description, total=None)`` (see
        :func:`ccdcal._shared.progress.resolve_progress`). The library itself never prints.
    **options
        Any :class:`~ccdcal.pipeline.options.ReduceOptions` calibration field: ``gain`` (e-/ADU),
        ``read_noise`` (e-), ``saturation``, ``to_electrons``, ``uncertainty``,
        ``dark_optimize``, ``cosmic_rays``, ``hot_sigma``, ``flat_floor``, ``flat_norm``,
        ``allow_uncorrected``, ``temp_tolerance``.

    Returns
    -------
    CCDData, list of CCDData, or list of Path
        One ``CCDData`` for one frame given alone; a list otherwise; the written paths with
        ``output``. A ``CCDData`` mask is True where any bit of :mod:`ccdcal.masks` is set (astropy
        keeps masks boolean); the files written with ``output`` keep the bits in ``MASK``.

    Raises
    ------
    TypeError
        If ``progress`` is none of the above (before any file is read or written).
    """

    progress = resolve_progress(progress)
    items, single = _as_list(frames)
    opts = ReduceOptions(**{k: v for k, v in options.items() if v is not None})
    opts.validate()
    geometry = dict(biassec=biassec, trimsec=trimsec, overscan=overscan, overscan_model=overscan_model,
                    overscan_order=overscan_order, overscan_axis=overscan_axis)
    darks = list(dark) if isinstance(dark, (list, tuple)) else ([dark] if dark is not None else [])
    on_disk = all(isinstance(x, _PathLike) for x in (*items, bias, flat, *darks) if x is not None)
    if output is not None:
        if not on_disk:
            raise InputError("calibrate(output=...) writes files from files; give paths, or drop output")
        return calibrate_files(items, output, bias=bias, darks=darks, flat=flat, options=opts,
                               progress=progress, **geometry)
    if on_disk:
        with tempfile.TemporaryDirectory(prefix="ccdcal-") as tmp:
            paths = calibrate_files(items, tmp, bias=bias, darks=darks, flat=flat, options=opts,
                                    progress=progress, **geometry)
            out = [_read_ccd(p) for p in paths]
    else:
        out = [_calibrate_in_memory(x, bias, darks, flat, opts, geometry, dark_scale)
               for x in steps(items, "calibrating", progress)]
    return out[0] if single and len(out) == 1 else out


def _read_ccd(path: Path) -> Any:
    from astropy.nddata import CCDData
    from astropy.utils.exceptions import AstropyWarning

    with warnings.catch_warnings():
        # the raw header's quirks (astropy's FITSFixedWarning) were reported by the scan already
        warnings.simplefilter("ignore", AstropyWarning)
        ccd = CCDData.read(path, hdu_uncertainty="UNCERT", hdu_mask="MASK")
    ccd.data = np.array(ccd.data)            # detach from the temporary file
    return ccd


def master_files(bias: Any, darks: Sequence[Any], flat: Any) -> tuple[dict[str, str], dict[str, str]]:
    """Name -> path and name -> DATASUM of master files given by hand (one name each)."""
    from astropy.io import fits

    paths, prints = {}, {}
    for path in [p for p in (bias, *darks, flat) if p]:
        name = Path(path).name
        if name in paths:
            raise InputError(f"{path}: two masters are named {name}; rename one")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with fits.open(path) as hdul:
                    if hdul[0].data is None or hdul[0].data.ndim != 2:
                        raise InputError(f"{path}: a master frame must be a 2-D image in the primary HDU")
                    prints[name] = str(hdul[0].header.get("DATASUM") or hdul[0]._calculate_datasum())
        except OSError as exc:
            raise InputError(f"{path}: not a readable FITS file ({exc})") from exc
        paths[name] = str(path)
    return paths, prints


def _master_index(info: Any, bias: Any, darks: Sequence[Any], flat: Any, temp_tolerance: float,
                  scale_darks: str = "auto") -> Any:
    """Masters given by hand as the plan's MasterIndex for this frame's geometry."""
    from astropy.io import fits

    geom = geometry(info)
    biases, dark_masters, counts = (), (), {}
    if bias:
        header = fits.getheader(bias, 0)
        biases = (BiasMaster(read_temperature(header, TEMP_KEYS)[0], Path(bias).name),)
        counts[Path(bias).name] = int(header.get("NCOMBINE", 1))
    for path in darks:
        header = fits.getheader(path, 0)
        exptime = exposure_of(header, dark=True)
        if exptime is not None:
            dark_masters += (DarkMaster(exptime, read_temperature(header, TEMP_KEYS)[0], Path(path).name),)
            counts[Path(path).name] = int(header.get("NCOMBINE", 1))
    flats = {geom: {info.filter: Path(flat).name}} if flat else {}
    return MasterIndex(biases={geom: biases} if biases else {}, darks={geom: dark_masters} if dark_masters else {},
                       flats=flats, counts=counts, temp_tolerance=temp_tolerance, scale_darks=scale_darks)


def light_jobs(path: str | os.PathLike, *, bias: Any, darks: Sequence[Any], flat: Any, options: Any,
               biassec: str | None = None, trimsec: str | None = None, overscan: bool = True,
               overscan_model: str = "legendre", overscan_order: int = 3, overscan_axis: str | None = None,
               names: Any = None) -> list[Any]:
    """LightJobs for the image HDUs of one raw file and masters given by hand, by the plan's
    rules (dark choice and scale, the pedestal rule, frames already calibrated); ``names``,
    a :class:`~ccdcal._shared.names.NameBook` of the run, keeps their outputs apart from its others."""

    names = names if names is not None else NameBook()

    infos, skipped = scan_file(Path(path))
    if not infos:
        raise InputError(f"{path}: {skipped[0].reason if skipped else 'no image data'}")
    jobs = []
    for info in infos:
        if steps_done(info):
            raise InputError(f"{path}: its header says it is already calibrated "
                             f"({', '.join(info.calibrated)}): not calibrated again")
        index = _master_index(info, bias, darks, flat, options.temp_tolerance, options.scale_darks)
        axis = {"row": 1, "column": 0}.get(overscan_axis or "")
        spec, trim = overscan_geometry(info.shape, biassec or info.biassec, trimsec or info.trimsec,
                                       model=overscan_model, order=overscan_order, axis=axis)
        bias_name, notes = index.bias_for(info)
        dark_name, scale, dark_notes = index.dark_for(info, bias_name)
        flat_name, _ = index.flat_for(info)
        uncorrected = pedestal_left(bias_name, dark_name)
        if uncorrected and not options.allow_uncorrected:
            raise InputError(f"{path}: {uncorrected}, so its pedestal would stay in; give a bias (or a dark of"
                             " its exposure), or allow_uncorrected (--allow-uncorrected)")
        stem = info.stem if len(infos) == 1 else f"{info.stem}_hdu{info.hdu}"
        recipe = Recipe(spec if overscan else None, trim, bias=bias_name, dark=dark_name, dark_scale=scale,
                        flat=flat_name)
        jobs.append(LightJob(frame=info, output=light_output(info, names, stem, folder=""), recipe=recipe,
                             notes=tuple(n for n in (*notes, *dark_notes) if not n.startswith("no master bias")),
                             uncorrected=uncorrected))
    return jobs


def calibrate_files(paths: Sequence[Any], output: str | os.PathLike, *, bias: Any, darks: Sequence[Any], flat: Any,
                    options: Any, errors: list[str] | None = None, progress: ProgressOption = None,
                    **geometry: Any) -> list[Path]:
    """Calibrate raw files into ``output`` with masters given by hand (``ccdcal calibrate``).

    Problems with one file are raised, or, with an ``errors`` list, appended to it and the
    file is skipped; ``progress`` wraps the files (:mod:`ccdcal._shared.progress`). Returns the
    written paths.
    """

    out_dir = Path(output)
    given = [m for m in (bias, *darks, flat) if isinstance(m, _PathLike)]
    refuse_overwrite([*paths, *given], folders=[out_dir])
    masters, prints = master_files(bias, darks, flat)
    out_dir.mkdir(parents=True, exist_ok=True)
    with output_lock(out_dir):
        ctx = RunContext(out_dir=out_dir, options=options, masters=masters, prints=prints)
        return _calibrate_each(paths, ctx, NameBook(), errors, bias=bias, darks=darks, flat=flat,
                               options=options, progress=progress, **geometry)


def _calibrate_each(paths: Sequence[Any], ctx: Any, names: Any, errors: list[str] | None, *, bias: Any,
                    darks: Sequence[Any], flat: Any, options: Any, progress: Any, **geometry: Any) -> list[Path]:

    written = []
    for path in steps(paths, "calibrating", progress):
        try:
            for job in light_jobs(path, bias=bias, darks=darks, flat=flat, options=options, names=names,
                                  **geometry):
                for note in job.notes:
                    warnings.warn(f"{Path(path).name}: {note}", CcdcalWarning, stacklevel=3)
                record = calibrate_light(job, ctx)
                if record.skipped:
                    raise InputError(f"{path}: {record.skipped}")
                written.append(ctx.out_dir / job.output)
        except CcdcalError as exc:
            if errors is None:
                raise
            errors.append(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}")
    return written


def _as_master(obj: Any, *, flat: bool, flat_norm: str) -> Any:
    """A master given as a path, array, CCDData or CombineResult, as calibrate.Master."""

    if obj is None:
        return None
    if isinstance(obj, _PathLike):
        return load_master(obj, flat=flat, flat_norm=flat_norm)
    header = getattr(obj, "header", None)
    data, _ = read_image(obj.data if hasattr(obj, "nlow_rejected") else obj)
    unc = getattr(obj, "uncertainty", None)
    unc = None if unc is None else np.asarray(getattr(unc, "array", unc), dtype=np.float32)
    level = header.get("FLATNORM") if header is not None else None
    if flat and level is None:
        data, level = normalise_flat(data, method=flat_norm)
        unc = None if unc is None else unc / np.float32(level)
    return Master(data=data, uncertainty=unc, name="(array)", exptime=exposure_of(header, dark=True), level=level)


def _calibrate_in_memory(frame: Any, bias: Any, darks: Sequence[Any], flat: Any, options: Any,
                         geometry: dict[str, Any], dark_scale: float | None) -> Any:
    """One frame that is an array or CCDData (or masters that are): calibrate_frame directly."""
    from astropy.nddata import CCDData, StdDevUncertainty

    if len(darks) > 1:
        raise InputError("several darks are matched to frames on disk only; give one dark with arrays")
    data, header = read_image(frame)
    from astropy.io import fits

    header = header if header is not None else fits.Header()
    b = _as_master(bias, flat=False, flat_norm=options.flat_norm)
    d = _as_master(darks[0] if darks else None, flat=False, flat_norm=options.flat_norm)
    f = _as_master(flat, flat=True, flat_norm=options.flat_norm)
    spec, trim = overscan_geometry(data.shape, geometry["biassec"] or header.get("BIASSEC"),
                                   geometry["trimsec"] or header.get("TRIMSEC") or header.get("DATASEC"),
                                   model=geometry["overscan_model"], order=geometry["overscan_order"],
                                   axis={"row": 1, "column": 0}.get(geometry["overscan_axis"] or ""))
    scale = dark_scale
    if scale is None:
        t, t_dark = exposure_of(header), (d.exptime if d is not None else None)
        scale = t / t_dark if (t and t_dark and b is not None) else 1.0
    det = resolve_detector(header, gain=options.gain, read_noise=options.read_noise, saturation=options.saturation,
                           shift=adc_shift(data[::7, ::7]))
    result = calibrate_frame(
        data, overscan=spec if geometry["overscan"] else None, trim=trim, bias=b, dark=d, dark_scale=scale,
        dark_optimize=options.dark_optimize, flat=f, flat_floor=options.flat_floor, gain=det.gain,
        read_noise=det.read_noise, saturation=det.saturation, cosmic_rays=options.cosmic_rays,
        hot_sigma=options.hot_sigma, to_electrons=options.to_electrons, uncertainty=options.uncertainty)
    out = light_header(header, result, trim=trim, bias=b, dark=d, flat=f, flat_floor=options.flat_floor,
                       gain_source=det.gain_source)
    unc = StdDevUncertainty(result.uncertainty) if result.uncertainty is not None else None
    return CCDData(result.data, unit=result.unit, header=out, uncertainty=unc, mask=result.mask)


# -- imexamine ----------------------------------------------------------------------------------------
def imexamine(frames: Any, region: Any = None, *, sigma: float = 3.0, maxiters: int = 5) -> Any:
    """Statistics of a region of each frame, as an ``astropy.table.Table`` (IRAF imexamine/imstat).

    Parameters
    ----------
    frames : path-like, glob pattern, folder, ndarray, CCDData, or a sequence of them
    region : str or (slice, slice), optional
        IRAF section ``"[x1:x2,y1:y2]"`` (1-based, inclusive) or numpy slices ``(rows, cols)``;
        the whole frame by default.
    sigma, maxiters : float, int
        Clipping of the ``clipped_*`` columns.

    Returns
    -------
    astropy.table.Table
        One row per frame: ``frame``, ``region``, ``npix``, ``mean``, ``median``, ``std``,
        ``min``, ``max``, ``clipped_mean``, ``clipped_median``, ``clipped_std``.
    """
    from astropy.table import Table

    items, _ = _as_list(frames)
    section = _section_text(region)
    rows = []
    for i, item in enumerate(items):
        data, _ = read_image(item)
        s = region_stats(data, section, sigma=sigma, maxiters=maxiters)
        name = Path(item).name if isinstance(item, _PathLike) else f"frame {i}"
        rows.append({"frame": name, "region": section or "[*,*]", "npix": s.npix, "mean": s.mean,
                     "median": s.median, "std": s.std, "min": s.min, "max": s.max, "clipped_mean": s.clipped_mean,
                     "clipped_median": s.clipped_median, "clipped_std": s.clipped_std})
    table = Table(rows=rows) if rows else Table(names=("frame", "region", "npix"))
    for name in table.colnames:
        if table[name].dtype.kind == "f":
            table[name].format = ".6g"
    return table


def _section_text(region: Any) -> str | None:
    """An IRAF section string from a string or numpy slices ``(rows, cols)``."""
    if region is None or isinstance(region, str):
        return region
    try:
        rows, cols = region
    except (TypeError, ValueError) as exc:
        raise InputError(f"region {region!r}: give '[x1:x2,y1:y2]' or numpy slices (rows, cols)") from exc

    def part(s: slice) -> str:
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise InputError(f"region {region!r}: numpy slices without a step, e.g. np.s_[100:200, 50:80]")
        if s.start is None and s.stop is None:
            return "*"
        if (s.start or 0) < 0 or (s.stop is not None and s.stop < 0):
            raise InputError(f"region {region!r}: negative slice bounds are not supported; count from 0")
        lo = (s.start or 0) + 1
        return f"{lo}:{s.stop}" if s.stop is not None else f"{lo}:*"

    return f"[{part(cols)},{part(rows)}]"


# -- show ------------------------------------------------------------------------------------------------
def show(image: Any, stretch: str = "autostf", *, title: str = "", size: int = 1024) -> Any:
    """A quick look at an image in a notebook: stretched (see :mod:`ccdcal.stretch`), as a PNG.

    ``image`` is a path, an array, a ``CCDData``, a ``CombineResult`` or a ``StackResult``; a
    colour image (an RGB cube, a colour stack) is shown in colour, each colour stretched on its
    own. The returned object displays itself in Jupyter (through matplotlib when it is
    installed, else as a plain PNG).
    """

    if hasattr(image, "data") and (hasattr(image, "nlow_rejected") or hasattr(image, "coverage")):
        data = image.data                         # a CombineResult or a StackResult (colour too)
    elif isinstance(image, np.ndarray) and image.ndim == 3:
        data = image                              # an RGB cube (3, ny, nx)
    else:
        data = read_colour(image)[0] if isinstance(image, _PathLike) else None
        if data is None:
            data, _ = read_image(image)
    name = title or (Path(image).name if isinstance(image, _PathLike) else "")
    return Preview(np.asarray(data), method=stretch, title=name, size=size)
