"""The units of work of a reduction, as module-level functions of small, picklable arguments.

A task gets a job of the plan (:class:`~ccdcal.planning.plan.MasterJob` or :class:`~ccdcal.planning.plan.LightJob`),
a :class:`RunContext` (the output folder, the options, where each master is and its DATASUM)
and the previous manifest entry of its output; it reads its inputs and masters from disk,
writes its output atomically and returns an :class:`~ccdcal.io.manifest.OutputRecord`. Nothing
travels but paths and small frozen values, so the same task runs in this process, in a thread
pool or on another machine that sees the same paths.

``reduce`` and ``ccdcal calibrate`` run the same :func:`calibrate_light`.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .._shared import state
from ..calibration.arithmetic import (
    CalibratedRows,
    Master,
    calibrate_frame,
    glow_region,
    prepare_shared,
)
from ..calibration.masters import (
    LEVEL_SAMPLE_PIXELS,
    NoiseModel,
    central_band,
    closest_pair,
    finish_master,
    gain_from_flat_pair,
    noise_model,
    normalise_flat,
    read_noise_from_pair,
    rejection_map,
)
from ..calibration.recipe import Recipe
from ..combining.engine import combine_result, combine_rows, measure_factors, warn_unable_to_reject
from ..combining.options import CombineOptions
from ..combining.results import FrameFactors
from ..errors import CcdcalError, OutputError
from ..io.frames import FrameSource, datasum_of
from ..io.hashing import file_hash, resolved
from ..io.headers import (
    adc_shift,
    exposure_of,
    header_read_noise,
    is_cmos,
    light_header,
    master_cards,
    master_header,
    resolve_detector,
    trimmed_pattern,
)
from ..io.manifest import OutputRecord, fingerprint, input_record, up_to_date
from ..io.writer import add_checksums, fits_hdus, write_bytes, write_fits, write_hdus
from ..planning.plan import LightJob, MasterJob, StackJob, member_steps
from ..report.page import write_light_previews, write_master_previews
from ..sections import to_slices
from ..stacking.engine import SIGMA
from ..stacking.workflow import stack_files, write_preview
from ..stretch import png_bytes
from .options import ReduceOptions


class BufferPool:
    """Frame-sized arrays the light tasks of a run reuse: the memory of a frame is touched once
    per run and thread, not once per light (fresh pages cost more than the arithmetic on them).
    Held by the run's :class:`RunContext`, so it ends with the run; a pickled copy (a dask
    worker's) starts empty. Free arrays of one size at a time are kept (per dtype): a light of
    another size drops them."""

    def __init__(self) -> None:
        self._free: dict[tuple[Any, ...], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A free array of ``shape`` and ``dtype`` (contents undefined), or a new one."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            if key not in self._free:   # another size: the free arrays of other sizes go
                for other in [k for k in self._free if k[1] == key[1]]:
                    del self._free[other]
        return np.empty(shape, dtype)

    def give(self, *arrays: np.ndarray) -> None:
        """Return arrays from :meth:`take` once nothing refers to their contents any more."""
        with self._lock:
            for array in arrays:
                self._free.setdefault((array.shape, array.dtype.str), []).append(array)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()

    def __reduce__(self) -> tuple[Any, ...]:
        return (BufferPool, ())


@dataclass(frozen=True)
class RunContext:
    """What every task of a run shares: small and picklable.

    Attributes
    ----------
    out_dir : Path
        The output folder (``masters/``, ``calibrated/``, ``previews/``).
    options : ReduceOptions
    masters : dict of str to str
        Master name -> path of its file, for every master built so far.
    prints : dict of str to str
        Master name -> its DATASUM (part of the fingerprints of what is built on it).
    failed : dict of str to str
        Master name -> why it could not be built.
    """

    out_dir: Path
    options: ReduceOptions
    masters: dict[str, str] = field(default_factory=dict)
    prints: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    buffers: BufferPool = field(default_factory=BufferPool, compare=False, repr=False)

    def with_master(self, name: str, path: Path, datasum: str) -> RunContext:
        return replace(self, masters={**self.masters, name: str(path)}, prints={**self.prints, name: datasum})

    def with_failure(self, name: str, why: str) -> RunContext:
        return replace(self, failed={**self.failed, name: why})

    def missing(self, names: Any) -> str | None:
        """Why one of the masters ``names`` cannot be used (None when all can)."""
        for name in names:
            if name and name in self.failed:
                return f"its master {name} could not be built ({self.failed[name]})"
            if name and name not in self.masters:
                return f"its master {name} was not built"
        return None


# -- masters read back, cached per process (the run) -----------------------------------------------


def _master_bytes(masters: list[Any]) -> int:
    # a flat cached as both flavours (read as a flat and not) holds one set of arrays
    arrays = {id(a): a for m in masters for a in (m.data, m.uncertainty, m.mask) if a is not None}
    return sum(a.nbytes for a in arrays.values())


# masters read from their files, by (resolved path, size, mtime_ns, read as a flat): at most 6, and
# beyond the three a light needs no more than 512 MB (4096² masters are 150 MB each)
_MASTERS = state.Cache("masters read back", max_items=6, min_items=3, max_bytes=512 << 20, nbytes=_master_bytes)
# masters built here whose files are still being written (key: resolved path, read as a flat)
_BUILT = state.Cache("masters being written")


def load_master(path: str | Path, name: str | None = None, *, flat: bool = False, flat_norm: str = "median") -> Any:
    """A master file as :class:`ccdcal.calibration.arithmetic.Master` (data, UNCERT, MASK, facts), cached.

    A ``flat`` whose header has no FLATNORM (not written by ccdcal) is normalised here with
    ``flat_norm``, so a flat from elsewhere is used as a normalised flat like ccdcal's own.
    A master this process built and is still writing (:func:`write_master`) is served from
    memory, as the file will hold it.
    """
    from astropy.io import fits

    path = Path(path)
    where = resolved(path)
    built = _BUILT.get((where, flat))
    if built is not None:
        return built
    st = path.stat()
    key = (where, st.st_size, st.st_mtime_ns, flat)
    cached = _MASTERS.get(key)
    if cached is not None:
        return cached
    with fits.open(path, memmap=False) as hdul:
        master = _master_of(hdul, name or path.name, flat=flat, flat_norm=flat_norm)
    _MASTERS.put(key, master)
    return master


def forget_built(paths: Any) -> None:
    """Drop the in-memory masters :func:`write_master` kept for ``paths`` (after a failed write)."""
    for path in paths:
        for flat in (False, True):
            _BUILT.pop((resolved(path), flat))


def _master_of(hdul: Any, name: str, *, flat: bool, flat_norm: str) -> Any:
    """:class:`ccdcal.calibration.arithmetic.Master` of a master's HDUs (as read from its file)."""

    header = hdul[0].header
    data = np.asarray(hdul[0].data, dtype=np.float32)
    unc = np.asarray(hdul["UNCERT"].data, dtype=np.float32) if "UNCERT" in hdul else None
    mask = np.asarray(hdul["MASK"].data, dtype=np.uint8) if "MASK" in hdul else None
    level = header.get("FLATNORM")
    if flat and level is None:
        data, level = normalise_flat(data, method=flat_norm)
        unc = None if unc is None else unc / np.float32(level)
    facts = {k: header.get(k) for k in ("RDNADU", "GAINMEAS", "NCOMBINE", "DARKNOIS")}
    return Master(data=data, uncertainty=unc, mask=mask, name=name, datasum=str(header.get("DATASUM", "")),
                  exptime=exposure_of(header, dark=True), level=level, facts=facts)


def _master(ctx: RunContext, name: str | None, *, flat: bool = False) -> Any:
    return load_master(ctx.masters[name], name, flat=flat, flat_norm=ctx.options.flat_norm) if name else None


def _recipe_masters(ctx: RunContext, recipe: Any) -> tuple[Any, Any, Any]:
    """The (bias, dark, flat) masters a light's recipe names (None where it names none)."""
    return _master(ctx, recipe.bias), _master(ctx, recipe.dark), _master(ctx, recipe.flat, flat=True)


def _fact(ctx: RunContext, name: str | None, key: str) -> Any:
    return _master(ctx, name).facts.get(key) if name else None


# -- building a master ------------------------------------------------------------------------------
def master_fingerprint(job: MasterJob, ctx: RunContext, inputs: list[dict[str, Any]]) -> str:
    colour = [("cfa", job.cfa)] if job.cfa else []     # a mono master's print is as it was
    return fingerprint(__version__, inputs, list(job.recipes), job.settings, ctx.options.physics(),
                       sorted(ctx.prints.get(n, "") for n in job.depends_on), *colour)


@dataclass(frozen=True)
class MasterWork:
    """A master ready to be combined: what :func:`prepare_master` measured (small, picklable).

    The bands of its rows are combined by :func:`master_band` tasks (anywhere: each reads its
    rows of every member itself) and written by :func:`write_master`.
    """

    job: MasterJob
    fingerprint: str
    inputs: tuple[dict[str, Any], ...]
    combine: CombineOptions
    factors: FrameFactors
    noise: NoiseModel
    shape: tuple[int, int]
    overscans: tuple[Any, ...] | None = None   # each member's OverscanFit (fitted once, here)


def build_master(job: MasterJob, ctx: RunContext, previous: dict[str, Any] | None = None) -> OutputRecord:
    """Build (or keep, when up to date) one master in this process; returns what was done.

    :func:`prepare_master`, :func:`master_band` over all rows, :func:`write_master`: the
    pipeline runs the same three steps through its executor, with the rows in bands.
    """
    work = prepare_master((job, previous), ctx)
    if isinstance(work, OutputRecord):
        return work
    try:
        tiles = [master_band((work, 0, work.shape[0]), ctx)]
    except OutputError:
        raise
    except CcdcalError as exc:
        return skipped_master(work.job, str(exc))
    return write_master(work, ctx, tiles)


def skipped_master(job: MasterJob, why: str) -> OutputRecord:
    return OutputRecord(output=job.label.split("   ")[0].strip(), kind=job.kind.value, skipped=why)


def prepare_master(item: tuple[MasterJob, dict[str, Any] | None], ctx: RunContext) -> MasterWork | OutputRecord:
    """A master's first, small pass: its rejection noise model and per-member factors; or the
    record of a master that is up to date or cannot be built. ``item``: (job, previous
    manifest entry of its output).

    A :class:`~ccdcal.errors.CcdcalError` (an unusable member, a failed master it needs)
    becomes a skipped record with the reason; an :class:`~ccdcal.errors.OutputError` is raised.
    """
    job, previous = item
    why = ctx.missing(job.depends_on)
    if why:
        return skipped_master(job, why)
    inputs = tuple(input_record(f.path, f.hdu) for f in job.members)
    fp = master_fingerprint(job, ctx, list(inputs))
    if up_to_date(ctx.out_dir, job.output, fp, previous):
        return OutputRecord(output=job.output, kind=job.kind.value, fingerprint=fp, inputs=inputs,
                            reused=True, datasum=datasum_of(ctx.out_dir / job.output))
    try:
        with _members(job, ctx) as sources:
            return _first_pass(job, ctx, sources, fp, inputs)
    except OutputError:
        raise
    except CcdcalError as exc:
        return skipped_master(job, str(exc))


def _first_pass(job: MasterJob, ctx: RunContext, sources: list[Any], fp: str,
                inputs: tuple[dict[str, Any], ...]) -> MasterWork:

    settings = job.settings
    noise = measure_noise_model(job, ctx, sources)
    options = CombineOptions.create(
        len(sources), header=sources[0].header, method=settings.method, scale=settings.scale,
        scale_region=settings.scale_region, clip_extrema=settings.clip_extrema,
        sigma_clip=settings.sigma_clip, **noise.combine_keywords())
    warn_unable_to_reject(len(sources), options)
    # flat levels from a row sample of the calibrated members (a whole pass spared; precision
    # in combine.region_level_rows)
    factors = measure_factors(sources, options, memory=ctx.options.memory, sample_pixels=LEVEL_SAMPLE_PIXELS)
    overscans = tuple(getattr(src, "fit_overscan", lambda: None)() for src in sources)
    return MasterWork(job=job, fingerprint=fp, inputs=inputs, combine=options, factors=factors, noise=noise,
                      shape=tuple(int(v) for v in sources[0].shape),
                      overscans=overscans if any(o is not None for o in overscans) else None)


@contextlib.contextmanager
def _members(job: MasterJob, ctx: RunContext, overscans: tuple[Any, ...] | None = None):
    """The members of a master as row sources (:func:`_member_sources`), closed afterwards."""
    sources = _member_sources(job, ctx, overscans)
    try:
        yield sources
    finally:
        for src in sources:
            getattr(src, "source", src).close()


def master_band(item: tuple[MasterWork, int, int], ctx: RunContext) -> Any:
    """Rows ``y0:y1`` of a master's combine (:func:`ccdcal.combining.engine.combine_rows`), reading
    those rows of every member; ``item``: (work, y0, y1)."""

    work, y0, y1 = item
    with _members(work.job, ctx, work.overscans) as sources:
        return combine_rows(sources, work.factors, work.combine, y0, y1, memory=ctx.options.memory)


def master_band_or_reason(item: tuple[MasterWork, int, int], ctx: RunContext) -> tuple[Any, str | None]:
    """:func:`master_band`, with a :class:`~ccdcal.errors.CcdcalError` returned as its reason
    (the master is then skipped) instead of raised."""
    try:
        return master_band(item, ctx), None
    except OutputError:
        raise
    except CcdcalError as exc:
        return None, str(exc)


def write_master(work: MasterWork, ctx: RunContext, tiles: list[Any], *, writer: Any = None,
                 pending: list[Any] | None = None) -> OutputRecord:
    """Stitch the bands of a master, finish it (normalisation, masks, keywords) and write it.

    With ``writer`` (a ``concurrent.futures`` executor of this process), the file and its
    rejection map are written there and the future is appended to ``pending``; until it is
    done, :func:`load_master` serves the master from memory exactly as the file will hold it,
    so the masters built on it (and the lights) need not wait for the disk. The caller waits
    for ``pending`` before it records the master as made.
    """
    from astropy.io import fits

    job = work.job
    try:
        with _members(job, ctx, work.overscans) as sources:
            result = combine_result(sources, work.combine, work.factors, tiles)
            del tiles[:]
            hdul = _master_hdus(job, ctx, result, work.noise, sources)
        add_checksums(hdul)
    except OutputError:
        raise
    except CcdcalError as exc:
        return skipped_master(job, str(exc))
    path = ctx.out_dir / job.output
    datasum = str(hdul[0].header["DATASUM"])
    record = OutputRecord(output=job.output, kind=job.kind.value, fingerprint=work.fingerprint, inputs=work.inputs,
                          datasum=datasum)
    if writer is None:
        write_hdus(path, hdul)
        _write_rejection_map(ctx.out_dir, job.name, result)
        return record
    # the master as load_master reads it back: header cards parsed from their text, as in the file
    header = fits.Header.fromstring(hdul[0].header.tostring())
    readback = fits.HDUList([fits.PrimaryHDU(hdul[0].data, header=header), *hdul[1:]])
    built = {(resolved(path), flat): _master_of(readback, path.name, flat=flat, flat_norm=ctx.options.flat_norm)
             for flat in ((False, True) if job.kind.value == "flat" else (False,))}
    _BUILT.update(built)

    def write() -> None:
        # a failed write leaves the master in memory for what is being built on it until the
        # caller, waiting for this future, raises the error (forget_built then drops it).
        # Not through the page cache: this process holds the master in memory (cached below),
        # and this thread may wait for the disk
        write_hdus(path, hdul, direct=True)
        st = path.stat()
        for (name, flat), master in built.items():   # now as the file: cached by its identity
            _MASTERS.put((name, st.st_size, st.st_mtime_ns, flat), master)
        for key in built:
            _BUILT.pop(key)
        _write_rejection_map(ctx.out_dir, job.name, result)

    pending.append(writer.submit(write))
    return record


def _member_sources(job: MasterJob, ctx: RunContext, overscans: tuple[Any, ...] | None = None) -> list[Any]:
    arrays = {n: _master(ctx, n).data for r in job.recipes for n in (r.bias, r.dark, r.flat) if n}
    sources = []
    for k, (f, r) in enumerate(zip(job.members, job.recipes, strict=True)):
        raw = FrameSource(f.path, f.hdu)
        if r == Recipe():
            # nothing to apply: the file itself, so combine can stream its 16-bit values raw
            sources.append(raw)
        else:
            sources.append(CalibratedRows(raw, r, arrays, flat_floor=ctx.options.flat_floor,
                                          overscan=overscans[k] if overscans else None))
    return sources


def _master_hdus(job: MasterJob, ctx: RunContext, result: Any, noise: Any, sources: list[Any]) -> Any:
    """The HDUs of a finished master (:func:`ccdcal.io.writer.fits_hdus`)."""

    options, settings = ctx.options, job.settings
    region = None
    if settings.scale_region:
        region = to_slices(settings.scale_region, result.data.shape)
    nodata = np.asarray(result.mask, dtype=bool) | ~np.isfinite(result.data)
    done = finish_master(job.kind.value, result.data, result.uncertainty, nodata, flat_norm=options.flat_norm,
                         flat_floor=options.flat_floor, hot_sigma=options.hot_sigma, region=region,
                         region_text=settings.scale_region, in_place=True,   # the combine's planes are ours
                         cfa=job.cfa)
    det = None
    if job.kind.value == "bias" and noise.read_noise_measured is not None:   # the gain of its RDNOISE
        det = resolve_detector(sources[0].header, gain=options.gain, shift=raw_shift(job.members[0]))
    levels = [s.overscan_level for s in sources if getattr(s, "overscan_level", None) is not None]
    extra = master_cards(job.kind.value, member_rejected=result.member_rejected, npix=result.data.size,
                         flat_level=done.level, flat_norm=options.flat_norm, flat_floor=options.flat_floor,
                         n_hot=done.n_hot, hot_sigma=options.hot_sigma, n_nodata=done.n_nodata,
                         gain_measured=noise.gain_measured, read_noise_measured=noise.read_noise_measured,
                         dark_noise=noise.dark_noise, cfa_levels=done.cfa_levels,
                         detector_gain=det.gain if det is not None else None,
                         detector_gain_source=det.gain_source if det is not None else None,
                         overscan_levels=levels, history=list(noise.history) + list(done.history))
    header = master_header(result.header, kind=job.kind.value, title=job.label.split("   ")[0].strip(),
                           n_members=len(job.members), steps=member_steps(job.recipes),
                           settings=settings.describe(), exptime=job.exptime, filter_name=job.filter,
                           extra=extra)
    return fits_hdus(done.data, header, uncertainty=done.uncertainty, mask=done.mask,
                     unit="adu/adu" if job.kind.value == "flat" else "adu")


def raw_shift(frame: Any) -> int:
    """:func:`ccdcal.io.headers.adc_shift` of a raw frame's central rows (64 at most)."""
    with FrameSource(frame.path, frame.hdu) as src:
        ny = int(src.shape[0])
        y0 = max(0, ny // 2 - 32)
        return adc_shift(src.read_rows(y0, min(ny, y0 + 64)))


def measure_noise_model(job: MasterJob, ctx: RunContext, sources: list[Any]) -> Any:
    """Measure what the rejection of one master needs (two members' central bands), then
    :func:`ccdcal.calibration.masters.noise_model`."""

    settings, options, kind = job.settings, ctx.options, job.kind.value
    if settings.reject != "auto":
        if settings.reject == "ccdclip":
            return NoiseModel("ccdclip", gain=options.gain, read_noise=options.read_noise)
        return NoiseModel(settings.reject)
    n = len(sources)
    shift = raw_shift(job.members[0])
    det = resolve_detector(sources[0].header, gain=options.gain, shift=shift)
    gain = det.gain
    rn_e = options.read_noise or header_read_noise(sources[0].header)
    bias_rn = _fact(ctx, job.recipes[0].bias, "RDNADU")
    pair = (0, 1) if kind != "flat" else closest_pair(
        [f.metrics.get("level", np.nan) if f.metrics else np.nan for f in job.members])
    floor = gain_measured = None
    typical = 0.0
    history: list[str] = []
    if n >= 2:
        a, b = (central_band(sources[k]) for k in pair)
        names = f"{job.members[pair[0]].name} - {job.members[pair[1]].name}"
        floor = read_noise_from_pair(a, b)
        floor = floor if np.isfinite(floor) and floor > 0 else None
        typical = float(np.nanmedian(a)) if kind == "dark" else 0.0
        if kind in ("bias", "dark") and floor is not None:
            history.append(f"{'read noise' if kind == 'bias' else 'noise floor'} from {names}: {floor:.3f} adu")
        if kind == "flat":
            rn_adu = rn_e / gain if (rn_e and gain) else bias_rn
            measured = gain_from_flat_pair(a, b, read_noise=float(rn_adu or 0.0))
            if np.isfinite(measured) and measured > 0:
                gain_measured = float(measured)
                history.append(f"gain measured from {names}: {measured:.3f} e-/adu")
    model = noise_model(kind, n=n, gain=gain, gain_source=det.gain_source, read_noise=rn_e,
                        bias_read_noise=bias_rn, floor=floor, typical=typical, gain_measured=gain_measured,
                        bias_subtracted=job.recipes[0].bias is not None,
                        keeps_black=job.recipes[0].bias is None and job.recipes[0].overscan is None,
                        thresholds=settings.sigma_clip or (3.0, 3.0))
    return replace(model, history=tuple(history) + model.history)


def _write_rejection_map(out_dir: Path, name: str, result: Any) -> None:
    """previews/rejection-<master>.png: values rejected per pixel (black: none)."""

    if result.member_rejected is None:
        return
    shown = rejection_map(result.nlow_rejected, result.nhigh_rejected)
    if shown is not None:
        # noise-like counts: zlib's fastest level is 3-4x faster here and the file ~10 % larger
        write_bytes(out_dir / "previews" / f"rejection-{Path(name).stem}.png", png_bytes(shown, compress_level=1))


# -- calibrating a light --------------------------------------------------------------------------
# key: (resolved path, size, mtime_ns, content hash), as masters and file hashes are keyed, so a
# map edited in place is read again
_BAD_PIXELS = state.Cache("bad-pixel maps", max_items=4)


def _bad_pixel_key(path: str) -> tuple[str, int, int, str] | None:
    """The map's cache key; None when it cannot be read (reading it then says why)."""
    try:
        resolved = Path(path).resolve()
        st = resolved.stat()
        return (str(resolved), st.st_size, st.st_mtime_ns, file_hash(resolved))
    except OSError:
        return None


def _bad_pixel_map(path: str | None) -> np.ndarray | None:
    if not path:
        return None
    key = _bad_pixel_key(path)

    def read() -> np.ndarray:
        with FrameSource(path) as src:   # a map that cannot be read: an InputError here
            return src.read() != 0

    if key is None:
        return read()
    _BAD_PIXELS.discard(lambda k: k[0] == key[0] and k != key)   # the map before an edit
    return _BAD_PIXELS.get_or_make(key, read)


def light_fingerprint(job: LightJob, ctx: RunContext, inputs: list[dict[str, Any]]) -> str:
    """What made a light: its input, recipe, the physics options, its masters and, when one is
    given, the bad-pixel map's content (a map edited in place redoes the lights)."""
    recipe = job.recipe
    parts = [__version__, inputs, recipe, ctx.options.physics(), job.uncorrected,
             [ctx.prints.get(n) for n in (recipe.bias, recipe.dark, recipe.flat)]]
    if ctx.options.bad_pixel_map:   # only then: the fingerprints of runs without a map are kept
        key = _bad_pixel_key(ctx.options.bad_pixel_map)
        parts.append({"bad_pixel_map": key and key[3]})
    if job.frame.bayer:             # a colour frame's pattern (written in its header)
        parts.append({"bayer": job.frame.bayer})
    return fingerprint(*parts)


@dataclass(frozen=True)
class MasterPreviewJob:
    """The report's previews of a master made in this run (:func:`ccdcal.report.page.write_master_previews`),
    queued with the lights: they take what the lights leave of the cores (from the master as
    the lights load it: in memory here while it is cached, read from its file on a dask
    worker), so the report at the end of the run reads no master again. A failure here stops
    nothing: the report then makes them itself."""

    name: str       # the master's name in RunContext.masters
    output: str     # its path relative to the output folder
    kind: str


def prepare_lights(jobs: Any, ctx: RunContext) -> None:
    """Make what the lights ``jobs`` share of their masters (:func:`~ccdcal.calibration.arithmetic.prepare_shared`)
    before they start, for each set of masters they use: in this process, and only for sets
    whose masters this run has."""

    done: set[tuple[str | None, ...]] = set()
    for job in jobs:
        names = (job.recipe.bias, job.recipe.dark, job.recipe.flat)
        if names in done or ctx.missing(list(names)):
            continue
        done.add(names)
        try:
            bias, dark, flat = _recipe_masters(ctx, job.recipe)
        except CcdcalError:
            continue   # a master that cannot be read: each light says so
        prepare_shared(bias, dark, flat, hot_sigma=ctx.options.hot_sigma, flat_floor=ctx.options.flat_floor)


def light_task(item: tuple[LightJob | MasterPreviewJob, dict[str, Any] | None],
               ctx: RunContext) -> OutputRecord | None:
    """:func:`calibrate_light` of ``item`` = (job, previous manifest entry of its output); for a
    :class:`MasterPreviewJob`, its previews (None: nothing for the manifest)."""
    job = item[0]
    if isinstance(job, MasterPreviewJob):
        try:
            write_master_previews(ctx.out_dir, job.output, _master(ctx, job.name).data, job.kind)
        except Exception:  # noqa: BLE001 - the report makes them itself (and says what failed)
            pass
        return None
    return calibrate_light(job, ctx, item[1])


_DATASUM = "_datasum"   # the written light's DATASUM in its facts, until its record takes it


def calibrate_light(job: LightJob, ctx: RunContext, previous: dict[str, Any] | None = None) -> OutputRecord:
    """Calibrate one light (or keep it when up to date); a problem with it becomes a skipped record."""
    recipe = job.recipe
    source = str(job.frame.path)
    why = ctx.missing([recipe.bias, recipe.dark, recipe.flat])
    if why:
        return OutputRecord(output=source, kind="light", skipped=why)
    inputs = [input_record(job.frame.path, job.frame.hdu)]
    fp = light_fingerprint(job, ctx, inputs)
    if up_to_date(ctx.out_dir, job.output, fp, previous):
        return OutputRecord(output=job.output, kind="light", fingerprint=fp, inputs=tuple(inputs), reused=True)
    facts: dict[str, Any] = {}
    try:
        skipped = _write_light(job, ctx, facts)
    except OutputError:
        raise
    except CcdcalError as exc:
        return OutputRecord(output=source, kind="light", skipped=str(exc))
    if skipped:
        return OutputRecord(output=source, kind="light", skipped=skipped)
    # the hash the writer took from the bytes as it wrote them (the file is not read back)
    datasum = str(facts.pop(_DATASUM, ""))
    return OutputRecord(output=job.output, kind="light", fingerprint=fp, inputs=tuple(inputs),
                        hash=file_hash(ctx.out_dir / job.output), datasum=datasum, extra=facts)


def glow_residual(data: np.ndarray, mask: np.ndarray, region: np.ndarray | None) -> float | None:
    """The median of a calibrated light inside a dark's glow region minus its median elsewhere
    (unmasked pixels; ADU): what a dark scaled by exposure left of its glow. None without a region."""
    if region is None:
        return None
    good = (mask == 0) & np.isfinite(data)
    inside, outside = data[region & good], data[~region & good]
    if inside.size < 16 or outside.size < 16:
        return None
    return float(np.median(inside) - np.median(outside))


_SCRATCH_BYTES = 4 << 20   # a light's raw bytes are read and decoded through this much


def _write_light(job: LightJob, ctx: RunContext, facts: dict[str, Any]) -> str | None:
    recipe = job.recipe
    with FrameSource(job.frame.path, job.frame.hdu) as src:
        shape = tuple(int(v) for v in src.shape)
        raw = ctx.buffers.take(shape, np.float32)
        # the raw bytes pass through a few MiB, decoded band by band (cache-sized, and a frame
        # of fresh memory less per lane)
        rows = max(1, min(shape[0], _SCRATCH_BYTES // max(1, src.raw_bytes_per_row)))
        scratch = ctx.buffers.take((rows * src.raw_bytes_per_row,), np.uint8)
        try:
            src.fill_rows(0, shape[0], raw, scratch)
        finally:
            ctx.buffers.give(scratch)
        raw_header = src.header
    trimmed = shape if recipe.trim is None else raw[recipe.trim.slices()].shape
    sigma, mask = ctx.buffers.take(trimmed, np.float32), ctx.buffers.take(trimmed, np.uint8)
    try:
        return _calibrate_and_write(job, ctx, raw, raw_header, sigma, mask, facts)
    finally:   # the planes are written (or failed): free for the next light
        ctx.buffers.give(raw, sigma, mask)


def _calibrate_and_write(job: LightJob, ctx: RunContext, raw: np.ndarray, raw_header: Any, sigma: np.ndarray,
                         mask: np.ndarray, facts: dict[str, Any]) -> str | None:

    options, recipe = ctx.options, job.recipe
    # a finite pixel in a sparse sample settles it; the whole frame is looked at only if none is
    if not (np.isfinite(raw[::61, ::61]).any() or np.isfinite(raw).any()):
        return "every pixel is NaN or infinite; remove the file from the inputs"
    bias, dark, flat = _recipe_masters(ctx, recipe)
    measured = flat.facts.get("GAINMEAS") if flat is not None else None
    # read noise measured on the biases; on a night without biases (nor an overscan), the noise
    # of the members of the light's dark (read noise and the dark current's mean shot noise)
    floor = bias.facts.get("RDNADU") if bias is not None else \
        dark.facts.get("DARKNOIS") if (dark is not None and recipe.overscan is None) else None
    det = resolve_detector(raw_header, gain=options.gain, read_noise=options.read_noise,
                           saturation=options.saturation, frame_saturation=job.frame.saturate,
                           measured_gain=float(measured) if measured else None,
                           measured_gain_source=f"photon transfer of {recipe.flat}",
                           bias_read_noise=floor, shift=adc_shift(raw[::7, ::7]))
    result = calibrate_frame(
        raw, overscan=recipe.overscan, trim=recipe.trim, bias=bias, dark=dark, dark_scale=recipe.dark_scale,
        dark_optimize=options.dark_optimize, flat=flat, flat_floor=options.flat_floor, gain=det.gain,
        read_noise=det.read_noise, saturation=det.saturation, cosmic_rays=options.cosmic_rays,
        bad_pixels=_bad_pixel_map(options.bad_pixel_map), hot_sigma=options.hot_sigma,
        to_electrons=options.to_electrons, uncertainty=options.uncertainty, overwrite_raw=True,
        uncertainty_out=sigma, mask_out=mask)
    header = light_header(raw_header, result, trim=recipe.trim, uncorrected=job.uncorrected, bias=bias,
                          dark=dark, flat=flat, flat_floor=options.flat_floor, gain_source=det.gain_source,
                          bayer=job.frame.bayer)
    if dark is not None and result.dark_scale not in (None, 1.0) and is_cmos(job.frame.camera):
        residual = glow_residual(result.data, result.mask, glow_region(dark))
        if residual is not None:   # a CMOS dark scaled by exposure (asked for): what its glow left
            facts["glow_residual"] = residual
            header["GLOWRES"] = (round(residual, 3), "[adu] light in the dark's glow minus elsewhere")
    pattern = trimmed_pattern(job.frame.bayer, recipe.trim)

    def meanwhile(datasum: str) -> None:
        facts[_DATASUM] = datasum          # the record's (run's report checks the previews by it)
        if options.report:
            # while the pixels are in memory (the report then reads no light again), and while the
            # light's file is made durable and put in place
            write_light_previews(ctx.out_dir, job.output, result.data, datasum, pattern=pattern)

    # not kept in the page cache unless the lights are stacked next (read again); the lights'
    # folder is made durable once, before the manifest lists them (run._run_lights)
    write_fits(ctx.out_dir / job.output, result.data, header, uncertainty=result.uncertainty, mask=result.mask,
               unit=result.unit, meanwhile=meanwhile, cached=options.stack, cleaned=True,   # light_header's
               sync_folder=False)
    return None


# -- stacking the calibrated lights of a target --------------------------------------------------
def stack_task(item: tuple[StackJob, tuple[tuple[str, str], ...], dict[str, Any] | None],
               ctx: RunContext) -> OutputRecord:
    """Judge, register and stack the calibrated lights ``item[1]`` ((path relative to the output
    folder, fingerprint) pairs) of one target and filter, or keep the stack when up to date;
    writes the stack, its PNG preview in previews/ and returns the frames table in the record."""

    job, pairs, previous = item
    lights = tuple(rel for rel, _ in pairs)
    title = f"stack {job.target} {job.filter or ''}".strip()
    if len(lights) < 2:
        return OutputRecord(output=title, kind="stack", skipped=f"{len(lights)} calibrated light(s); needs 2")
    inputs = tuple(input_record(ctx.out_dir / rel, 0) for rel in lights)
    # the clipping thresholds and the debayering are stated: stacks made by code whose defaults
    # were 3σ and a bilinear debayer are made again
    settings = {"keep_all": ctx.options.stack_keep_all, "reject": "auto", "sigma": list(SIGMA), "weights": "noise",
                "interpolation": "lanczos3", "debayer": ctx.options.debayer}
    # by what made each light (its fingerprint), not by the folder's path, the files' times or the
    # write times in their headers: the same lights give the same stack wherever it is made
    fp = fingerprint(__version__, list(pairs), settings)
    if up_to_date(ctx.out_dir, job.output, fp, previous):
        return OutputRecord(output=job.output, kind="stack", fingerprint=fp, inputs=inputs, reused=True,
                            extra={k: previous[k] for k in ("frames", "preview", "target", "filter")
                                   if k in previous})
    preview = f"previews/stack-{Path(job.output).stem}.png"
    try:
        run = stack_files([ctx.out_dir / rel for rel in lights], ctx.out_dir / job.output,
                          keep_all=ctx.options.stack_keep_all, memory=ctx.options.memory, preview=False,
                          debayer=ctx.options.debayer)
    except OutputError:
        raise
    except CcdcalError as exc:
        return OutputRecord(output=title, kind="stack", skipped=str(exc))
    if ctx.options.report:
        write_preview(run.result.data, ctx.out_dir / preview)
    frames = [{**f.to_json(), "path": str(Path(f.path).relative_to(ctx.out_dir))} for f in run.frames]
    return OutputRecord(output=job.output, kind="stack", fingerprint=fp, inputs=inputs,
                        hash=file_hash(ctx.out_dir / job.output),
                        extra={"frames": frames, "preview": preview if ctx.options.report else None,
                               "target": job.target, "filter": job.filter})
