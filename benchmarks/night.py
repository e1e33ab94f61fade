"""Benchmark a whole night: ``ccdcal reduce`` against the I/O floor, Siril and (opt-in) ccdproc.

A seed-sized raw night of 4096² uint16 FITS frames (BZERO 32768, no overscan, so every tool
does the same work): 20 biases, 10 darks of 300 s, 20 V twilight flats at 10k–40k ADU and
10 V lights of 300 s with sky and stars; read noise, dark current with hot pixels and cosmic
rays in every frame. It is written once to benchmarks/_data/night-4096 (night-2048 with
``--quick``) and reused.

Every tool runs as its own process (whole-process wall time and peak RSS, imports and JIT
included), in interleaved rounds (every tool once per round, on warm page cache, dirty pages
synced between runs); the best and the median of the rounds are reported. The I/O floor is
a Python process that reads every raw frame once with astropy and writes (with fsync, then
dropping the file's pages from the page cache as ccdcal does) as many files and bytes as
ccdcal's default reduce wrote in its untimed warm-up run.

    python benchmarks/night.py                  # 4096² night (~2 GB in benchmarks/_data), 2 rounds
    python benchmarks/night.py --quick          # 2048², fewer frames: a ~1 minute smoke run, writes nothing
    python benchmarks/night.py --rounds 3 --ccdproc   # also ccdproc (slow; runs in the first round only)
    python benchmarks/night.py --tools floor,ccdcal   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HEADING = "## Whole night"


@dataclass(frozen=True)
class Night:
    size: int
    n_bias: int
    n_dark: int
    n_flat: int
    n_light: int

    @property
    def title(self) -> str:
        return (f"{self.size}² night: {self.n_bias} biases, {self.n_dark} darks 300 s, "
                f"{self.n_flat} V flats, {self.n_light} V lights 300 s")


FULL = Night(4096, 20, 10, 20, 10)
QUICK = Night(2048, 8, 5, 8, 4)

GAIN = 1.5            # e-/ADU
READ_NOISE = 7.0      # ADU
BIAS_LEVEL = 1000.0   # ADU
DARK_TIME = 300.0     # s, darks and lights
FLAT_TIME = 5.0       # s, twilight flats (levels fall from 40k to 10k ADU)
SKY = 800.0           # ADU in a 300 s light
CR_RATE = 2e-7        # cosmic-ray hits per pixel per second (readout counts as 20 s)
TOOLS = ("floor", "floor-cached", "ccdcal", "ccdcal-lean", "siril", "ccdproc")
LABELS = {
    "floor": "I/O floor (read all raw, write ccdcal's bytes, fsync)",
    "floor-cached": "I/O floor keeping its pages in the page cache (issue 12's definition)",
    "ccdcal": "`ccdcal reduce` (default: report, UNCERT)",
    "ccdcal-lean": "`ccdcal reduce --no-report --no-uncertainty`",
    "siril": "Siril standard preprocessing script",
    "ccdproc": "ccdproc (combine per master, ccd_process per light)",
}


# ---------------------------------------------------------------------------------- the night

def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _header(kind: str, index: int, exptime: float, rng: np.random.Generator, filt: str | None = None,
            obj: str | None = None):
    from astropy.io import fits

    h = fits.Header()
    h["IMAGETYP"] = {"bias": "Bias Frame", "dark": "Dark Frame", "flat": "Flat Field", "light": "Light Frame"}[kind]
    h["EXPTIME"] = (exptime, "[s] exposure duration")
    minutes = {"bias": 0, "dark": 60, "flat": 120, "light": 180}[kind] * 2 + {"light": 6}.get(kind, 1) * index
    h["DATE-OBS"] = (f"2024-03-14T{17 + minutes // 60:02d}:{minutes % 60:02d}:00.000", "UT start of exposure")
    h["CCD-TEMP"] = (round(-10.0 + float(rng.normal(0.0, 0.1)), 2), "[C] sensor temperature")
    if filt:
        h["FILTER"] = filt
    if obj:
        h["OBJECT"] = obj
    return h


def _stars(rng: np.random.Generator, size: int) -> np.ndarray:
    """A star field (ADU in 300 s, before the flat): Gaussian PSFs, FWHM ~3.5 px."""
    field = np.zeros((size, size), dtype=np.float32)
    n = size * size // 6000
    sigma = 1.5
    half = 7
    ys, xs = rng.uniform(half, size - half - 1, (2, n))
    fluxes = 10 ** rng.uniform(2.5, 5.7, n)
    grid = np.arange(-half, half + 1, dtype=np.float32)
    for y, x, flux in zip(ys, xs, fluxes, strict=True):
        iy, ix = int(y), int(x)
        gy = np.exp(-((grid - (y - iy)) ** 2) / (2 * sigma**2))
        gx = np.exp(-((grid - (x - ix)) ** 2) / (2 * sigma**2))
        field[iy - half:iy + half + 1, ix - half:ix + half + 1] += (flux / (2 * np.pi * sigma**2)) * np.outer(gy, gx)
    return field


def _cosmic_rays(rng: np.random.Generator, data: np.ndarray, exptime: float) -> None:
    """Add cosmic-ray hits in place: single pixels and short two- or three-pixel tracks."""
    size = data.shape[0]
    n = rng.poisson(CR_RATE * size * size * (exptime + 20.0))
    y = rng.integers(1, size - 3, n)
    x = rng.integers(1, size - 3, n)
    adu = rng.uniform(300.0, 20000.0, n).astype(np.float32)
    data[y, x] += adu
    track = rng.random(n) < 0.5
    dy, dx = rng.integers(0, 2, (2, n))
    data[y[track] + dy[track], x[track] + 1 - dy[track] * dx[track]] += 0.6 * adu[track]
    longer = track & (rng.random(n) < 0.4)
    data[y[longer] + 2 * dy[longer], x[longer] + 2 - 2 * dy[longer] * dx[longer]] += 0.3 * adu[longer]


def _write(path: Path, data: np.ndarray, header) -> None:
    from astropy.io import fits

    raw = np.clip(np.rint(data), 0, 65535).astype(np.uint16)
    tmp = path.with_name(f".{path.name}.tmp")
    fits.PrimaryHDU(raw, header=header).writeto(tmp, overwrite=True)  # uint16 -> int16 + BZERO 32768
    os.replace(tmp, path)


def make_night(night: Night, folder: Path) -> Path:
    """Write the raw night to ``folder/raw`` (once: a stamp records what was written)."""
    raw = folder / "raw"
    stamp = folder / "night.json"
    spec = {"night": night.__dict__, "gain": GAIN, "read_noise": READ_NOISE, "version": 1}
    if stamp.exists() and json.loads(stamp.read_text()) == spec:
        return raw
    if raw.exists():
        shutil.rmtree(raw)
    raw.mkdir(parents=True)
    rng = np.random.default_rng(4096)
    size = night.size
    shape = (size, size)
    started = time.perf_counter()
    _progress(f"writing the {night.title} to {raw} (once) ...")

    y, x = np.ogrid[0:size, 0:size]
    yf = (y / size).astype(np.float32)
    xf = (x / size).astype(np.float32)
    bias = (BIAS_LEVEL + rng.normal(0.0, 2.0, size).astype(np.float32)[None, :] + 4.0 * xf + 2.0 * yf)
    bias = bias.astype(np.float32)
    dark_rate = np.full(shape, 0.01, dtype=np.float32)                   # ADU/s: 3 ADU in 300 s
    n_hot = size * size // 4000
    hy, hx = rng.integers(0, size, (2, n_hot))
    dark_rate[hy, hx] = np.exp(rng.uniform(np.log(0.2), np.log(50.0), n_hot))  # 60 to 15000 ADU in 300 s
    r2 = (xf - 0.5) ** 2 + (yf - 0.5) ** 2
    flat = (1.0 - 0.6 * r2) * rng.normal(1.0, 0.01, shape).astype(np.float32)  # vignetting, pixel response
    for _ in range(max(3, size // 512)):                                 # dust donuts
        cy, cx = rng.uniform(0.1, 0.9, 2)
        rad = rng.uniform(0.01, 0.03)
        d = np.sqrt((yf - cy) ** 2 + (xf - cx) ** 2)
        flat *= 1.0 - 0.05 * np.exp(-(((d - rad) / (0.25 * rad)) ** 2))
    flat = (flat / np.median(flat[size // 4:-size // 4:8, size // 4:-size // 4:8])).astype(np.float32)
    del r2
    rn2 = np.float32(READ_NOISE**2)
    count = 0
    total = night.n_bias + night.n_dark + night.n_flat + night.n_light

    def emit(name: str, expected: np.ndarray, header, exptime: float) -> None:
        nonlocal count
        offset = np.float32(rng.normal(0.0, 0.7))                        # the pedestal wanders a little
        var = np.maximum(expected, 0.0)
        var *= np.float32(1.0 / GAIN)
        var += rn2
        np.sqrt(var, out=var)
        var *= rng.standard_normal(shape, dtype=np.float32)
        var += bias
        var += expected
        var += offset
        _cosmic_rays(rng, var, exptime)
        _write(raw / name, var, header)
        count += 1
        _progress(f"  {count}/{total} {name} ({time.perf_counter() - started:.0f} s)")

    zero = np.zeros(shape, dtype=np.float32)
    for i in range(night.n_bias):
        emit(f"bias_{i + 1:03d}.fits", zero, _header("bias", i, 0.0, rng), 0.0)
    dark = dark_rate * np.float32(DARK_TIME)
    for i in range(night.n_dark):
        emit(f"dark_300s_{i + 1:03d}.fits", dark, _header("dark", i, DARK_TIME, rng), DARK_TIME)
    flat_dark = dark_rate * np.float32(FLAT_TIME)
    for i, level in enumerate(np.linspace(40000.0, 10000.0, night.n_flat)):  # falling twilight
        expected = flat * np.float32(level)
        expected += flat_dark
        emit(f"flat_V_{i + 1:03d}.fits", expected, _header("flat", i, FLAT_TIME, rng, "V", "twilight flat"),
             FLAT_TIME)
    stars = _stars(rng, size)
    for i in range(night.n_light):
        dy, dx = rng.integers(-12, 13, 2)                                # dithered pointing
        expected = np.roll(stars, (int(dy), int(dx)), axis=(0, 1))
        expected += np.float32(SKY * (1.0 + 0.05 * i))
        expected *= flat
        expected += dark
        emit(f"field_V_{i + 1:03d}.fits", expected, _header("light", i, DARK_TIME, rng, "V", "NGC 2682"),
             DARK_TIME)
    stamp.write_text(json.dumps(spec))
    _progress(f"night written in {time.perf_counter() - started:.0f} s")
    return raw


def frames_of(raw: Path) -> dict[str, list[Path]]:
    files = sorted(raw.glob("*.fits"))
    return {kind: [p for p in files if p.name.startswith(prefix)]
            for kind, prefix in (("bias", "bias_"), ("dark", "dark_"), ("flat", "flat_"), ("light", "field_"))}


# ---------------------------------------------------------------------------------- the tools

def ccdcal_command(raw: Path, out: Path, lean: bool) -> list[str]:
    exe = ROOT / ".venv" / "bin" / "ccdcal"
    head = [str(exe)] if Path(sys.executable).parent == exe.parent and exe.exists() else \
        [sys.executable, "-m", "ccdcal.cli"]
    return [*head, "reduce", str(raw), "-o", str(out)] + (["--no-report", "--no-uncertainty"] if lean else [])


def floor_command(raw: Path, sizes: list[int], out: Path, drop: bool = True) -> list[str]:
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        import numpy as np
        from astropy.io import fits
        data = None
        for p in sorted(Path({str(raw)!r}).glob("*.fits")):
            data = fits.getdata(p).astype(np.float32)        # read once, one pass over it
        buf = memoryview(data).cast("B")
        out = Path({str(out)!r})
        out.mkdir(parents=True, exist_ok=True)
        for i, size in enumerate({sizes!r}):
            with open(out / f"out_{{i:04d}}.bin", "wb") as fh:
                left = size
                while left:
                    left -= fh.write(buf[:min(left, len(buf))])
                fh.flush()
                os.fsync(fh.fileno())
                # as ccdcal does with outputs it will not read again: the next file reuses the pages
                if {drop!r} and hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    """)
    return [sys.executable, "-c", script]


def siril_version(exe: str) -> str:
    try:
        text = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    match = re.search(r"(\d+\.\d+\.\d+)", text)
    return match.group(1) if match else ""


def siril_command(raw: Path, work: Path) -> tuple[list[str], str] | None:
    """siril-cli running Siril's standard mono preprocessing script in ``work`` (fresh), or None.

    The script is Siril's Mono_Preprocessing.ssf without the registration and the final stack:
    convert and stack the biases (average, sigma rejection 3/3, no normalisation), the darks
    likewise (the master dark keeps the bias), calibrate the flats with the master bias and
    stack them normalised (multiplicative), calibrate the lights with the master dark and the
    master flat.
    """
    exe = shutil.which("siril-cli")
    if exe is None:
        return None
    version = siril_version(exe)
    parts = tuple(int(v) for v in version.split(".")) if version else (1, 0, 0)
    calibrate = "calibrate" if parts >= (1, 2, 0) else "preprocess"   # renamed in Siril 1.2
    if work.exists():
        shutil.rmtree(work)
    groups = frames_of(raw)
    for folder, kind in (("biases", "bias"), ("darks", "dark"), ("flats", "flat"), ("lights", "light")):
        (work / folder).mkdir(parents=True)
        for p in groups[kind]:
            os.symlink(p, work / folder / p.name)
    script = work / "preprocess.ssf"
    script.write_text(textwrap.dedent(f"""\
        requires 1.0.0
        setext fits
        cd biases
        convert bias -out=../process
        cd ../process
        stack bias rej 3 3 -nonorm
        cd ../darks
        convert dark -out=../process
        cd ../process
        stack dark rej 3 3 -nonorm
        cd ../flats
        convert flat -out=../process
        cd ../process
        {calibrate} flat -bias=bias_stacked
        stack pp_flat rej 3 3 -norm=mul
        cd ../lights
        convert light -out=../process
        cd ../process
        {calibrate} light -dark=dark_stacked -flat=pp_flat_stacked
        close
    """))
    return [exe, "-d", str(work), "-s", str(script)], version


def ccdproc_command(raw: Path, out: Path) -> list[str]:
    """The seed notebook's ccdproc calls: combine each master, ccd_process each flat and light."""
    script = textwrap.dedent(f"""
        from pathlib import Path
        import numpy as np
        import astropy.units as u
        from astropy.nddata import CCDData
        from astropy.stats import mad_std
        import ccdproc

        raw, out = Path({str(raw)!r}), Path({str(out)!r})
        out.mkdir(parents=True, exist_ok=True)
        ic = ccdproc.ImageFileCollection(raw, glob_include="*.fits")
        files = lambda kind: ic.files_filtered(imagetyp=kind, include_path=True)
        clip = dict(sigma_clip=True, sigma_clip_low_thresh=5, sigma_clip_high_thresh=5,
                    sigma_clip_func=np.ma.median, sigma_clip_dev_func=mad_std, mem_limit=350e6)
        bias = ccdproc.combine(files("Bias Frame"), method="average", unit="adu", **clip)
        bias.write(out / "master_bias.fits", overwrite=True)
        darks = [ccdproc.subtract_bias(CCDData.read(p, unit="adu"), bias) for p in files("Dark Frame")]
        dark = ccdproc.combine(darks, method="average", **clip)
        dark.write(out / "master_dark.fits", overwrite=True)
        del darks
        proc = dict(master_bias=bias, dark_frame=dark, exposure_key="EXPTIME", exposure_unit=u.s, dark_scale=True)
        flats = [ccdproc.ccd_process(CCDData.read(p, unit="adu"), **proc) for p in files("Flat Field")]
        flat = ccdproc.combine(flats, method="average", scale=lambda a: 1 / np.median(a), **clip)
        flat.write(out / "master_flat.fits", overwrite=True)
        del flats
        for p in files("Light Frame"):
            light = ccdproc.ccd_process(CCDData.read(p, unit="adu"), master_flat=flat, **proc)
            light.write(out / ("cal_" + Path(p).name), overwrite=True)
    """)
    return [sys.executable, "-c", script]


# ---------------------------------------------------------------------------------- measuring

def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, without idle and iowait)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


OTHER_WORK: list[float] = []  # cores busy with other processes during each measured run


#: the peak summed proportional set size (PSS) of the last measured process and its
#: descendants (worker processes included), in bytes; 0 where /proc is unavailable
LAST_TREE_PEAK = [0]


class _TreeMemory:
    """Samples (every 0.5 s, in a thread: reading smaps_rollup takes the process's memory map lock,
    and at 50 ms it slowed an 800-light run by 2-3 s) the summed PSS of a process and its descendants: a
    child's ru_maxrss is one process's peak, and a run with worker processes has several.
    PSS shares each shared page among the processes that map it, so the sum counts it once."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _children(pid: int) -> list[int]:
        found = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    found += [int(x) for x in fh.read().split()]
        except OSError:
            pass
        return found

    @staticmethod
    def _pss(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            tree = [self.pid]
            for pid in tree:
                tree += self._children(pid)
            self.peak = max(self.peak, sum(self._pss(pid) for pid in tree))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(command: list[str], cwd: Path | None = None) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes, exit code, output tail) of a child process.

    Also records in OTHER_WORK how many cores other processes kept busy meanwhile (the
    machine's busy CPU time less the child's own), since that skews every number."""
    busy = _busy_seconds()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # Siril logs to stdout
        proc = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, cwd=cwd)
        sampler = _TreeMemory(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        LAST_TREE_PEAK[0] = sampler.stop()
        err.seek(0)
        text = err.read().decode(errors="replace")
    other = _busy_seconds() - busy - usage.ru_utime - usage.ru_stime
    OTHER_WORK.append(max(0.0, other) / wall)
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status), text[-2000:]


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def tree_size(folder: Path) -> tuple[int, list[int]]:
    sizes = [p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()]
    return sum(sizes), sizes


def stage_timings(out: Path) -> dict[str, float]:
    try:
        return dict(json.loads((out / "manifest.json").read_text()).get("timings", {}))
    except (OSError, ValueError):
        return {}


def _import_trouble(err: str) -> bool:
    return any(word in err for word in ("ImportError", "ModuleNotFoundError", "SyntaxError", "AttributeError",
                                        "NameError"))


def run_ccdcal(command: list[str], what: str, retries: int = 5) -> tuple[float, int, int, str]:
    """Run ccdcal; the code base is edited while benchmarks run, so wait out an import error."""
    for attempt in range(retries + 1):
        got = measure(command)
        if got[2] == 0 or attempt == retries or not _import_trouble(got[3]):
            return got
        _progress(f"  {what} failed with an import-time error; retrying in 60 s:\n    "
                  + got[3].strip().splitlines()[-1])
        time.sleep(60)
    return got


def run(night: Night, tools: list[str], data_dir: Path, rounds: int) -> dict:
    folder = data_dir / f"night-{night.size}"
    raw = make_night(night, folder)
    paths = sorted(raw.glob("*.fits"))
    raw_bytes = sum(p.stat().st_size for p in paths)
    results: dict = {"night": night, "raw_bytes": raw_bytes, "rows": {}, "stages": {}, "siril_version": "",
                     "notes": []}
    with tempfile.TemporaryDirectory(dir=folder, prefix="run-") as tmp:
        tmp = Path(tmp)
        # warm-up: compiles (or loads) the numba kernels, checks the night reduces, and gives
        # the files and bytes the floor has to write
        warm(paths)
        _progress("warm-up: ccdcal reduce (untimed) ...")
        wall, rss, code, err = run_ccdcal(ccdcal_command(raw, tmp / "warmup", lean=False), "warm-up")
        if code != 0:
            raise SystemExit(f"ccdcal reduce failed in the warm-up ({code}):\n{err}")
        out_bytes, sizes = tree_size(tmp / "warmup")
        results["out_bytes"] = out_bytes
        results["warmup"] = (wall, rss, stage_timings(tmp / "warmup"))
        manifest = json.loads((tmp / "warmup" / "manifest.json").read_text())
        results["run_warnings"] = manifest.get("run_warnings", [])
        _progress(f"  warm-up {wall:.1f} s, {rss / 2**30:.2f} GiB, wrote {len(sizes)} files,"
                  f" {out_bytes / 2**30:.2f} GiB; stages {fmt_stages(results['warmup'][2])}")
        for w in results["run_warnings"]:
            _progress(f"  ccdcal warning: {w}")
        shutil.rmtree(tmp / "warmup")

        have_siril = "siril" in tools and shutil.which("siril-cli") is not None
        if "siril" in tools and not have_siril:
            results["notes"].append("siril: siril-cli not installed")
        order = [t for t in tools if t != "siril" or have_siril]
        first_timed = len(OTHER_WORK)
        runs: dict[str, list[tuple[float, int, int]]] = {t: [] for t in order}
        failed: dict[str, str] = {}
        for round_ in range(rounds):
            for tool in order:
                if tool in failed or (tool == "ccdproc" and round_ > 0):
                    continue
                out = tmp / f"{tool}-{round_}"
                cwd = None
                if tool in ("floor", "floor-cached"):
                    command = floor_command(raw, sizes, out, drop=tool == "floor")
                elif tool in ("ccdcal", "ccdcal-lean"):
                    command = ccdcal_command(raw, out, lean=tool == "ccdcal-lean")
                elif tool == "siril":
                    command, results["siril_version"] = siril_command(raw, out)
                    cwd = out
                else:
                    command = ccdproc_command(raw, out)
                warm(paths)
                os.sync()
                if tool.startswith("ccdcal"):
                    wall, rss, code, err = run_ccdcal(command, tool)
                else:
                    wall, rss, code, err = measure(command, cwd=cwd)
                if tool == "siril" and code == 0 and "Script execution failed" in err:
                    code = 1
                if code != 0:
                    failed[tool] = " / ".join(err.strip()[-600:].splitlines()) or f"exit code {code}"
                    _progress(f"  {tool} failed ({code}): {failed[tool]}")
                    continue
                written, _ = tree_size(out)
                runs[tool].append((wall, rss, written))
                line = (f"round {round_ + 1} {tool:12s} {wall:7.2f} s, {rss / 2**30:5.2f} GiB,"
                        f" wrote {written / 2**30:.2f} GiB, other work {OTHER_WORK[-1]:.2f} cores")
                if tool.startswith("ccdcal"):
                    stages = stage_timings(out)
                    results["stages"].setdefault(tool, []).append((wall, stages))
                    line += f"; stages {fmt_stages(stages)}"
                _progress(line)
                os.sync()
                shutil.rmtree(out, ignore_errors=True)
        timed = OTHER_WORK[first_timed:]  # kernel writeback threads count as other work too: a rough figure
        if timed and max(timed) > 0.15:
            results["notes"].append(
                f"other processes kept {np.mean(timed):.2f} cores busy on average during the timed runs"
                f" (at most {max(timed):.2f} during one run; {os.cpu_count()} cores): the numbers are skewed by that")
        for tool, got in runs.items():
            if tool in failed or not got:
                results["rows"][tool] = None
                results["notes"].append(f"{tool}: failed: {failed.get(tool, 'no run')}")
                continue
            walls = sorted(w for w, _, _ in got)
            results["rows"][tool] = {"best": walls[0], "median": float(np.median(walls)), "n": len(walls),
                                     "rss": max(r for _, r, _ in got), "written": got[-1][2]}
    return results


def fmt_stages(stages: dict[str, float]) -> str:
    return ", ".join(f"{_stage_label(k, stages)} {v:.2f} s" for k, v in stages.items()) or "(none in manifest.json)"


def _stage_label(key: str, stages: dict[str, float]) -> str:
    """An indented key is a part of the next stage that is not indented ("  master_bias.fits" of "masters")."""
    if not key.startswith(" "):
        return key
    keys = list(stages)
    parent = next((k for k in keys[keys.index(key) + 1:] if not k.startswith(" ")), "")
    return f"{parent}: {key.strip()}" if parent else key.strip()


# ---------------------------------------------------------------------------------- reporting

def table(results: dict) -> str:
    rows = results["rows"]
    floor = rows.get("floor")
    siril = rows.get("siril")
    lines = ["| tool | best [s] | median [s] | peak RSS [GiB] | written [GiB] | vs I/O floor | vs Siril |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for tool, r in rows.items():
        label = LABELS[tool]
        if tool == "siril" and results["siril_version"]:
            label = f"Siril {results['siril_version']} standard preprocessing script"
        if r is None:
            lines.append(f"| {label} | failed | | | | | |")
            continue
        # best vs best and median vs median: every tool saw the same rounds
        vs_floor = f"{r['best'] / floor['best']:.2f}× (median {r['median'] / floor['median']:.2f}×)" if floor else ""
        vs_siril = f"{r['best'] / siril['best']:.2f}× (median {r['median'] / siril['median']:.2f}×)" if siril else ""
        lines.append(f"| {label} | {r['best']:.2f} | {r['median']:.2f} | {r['rss'] / 2**30:.2f} |"
                     f" {r['written'] / 2**30:.2f} | {vs_floor} | {vs_siril} |")
    return "\n".join(lines)


def stage_table(results: dict) -> str:
    """ccdcal's own stage timings (OUT/manifest.json "timings") of each ccdcal run."""
    names: dict[str, str] = {}  # key -> column label
    for runs in results["stages"].values():
        for _, stages in runs:
            names.update({k: _stage_label(k, stages) for k in stages if k not in names})
    if not names:
        return ""
    lines = ["| run | wall [s] | " + " | ".join(f"{label} [s]" for label in names.values())
             + " | outside the stages [s] |",
             "|---|---:|" + "---:|" * len(names) + "---:|"]
    for tool, runs in results["stages"].items():
        for i, (wall, stages) in enumerate(runs):
            cells = " | ".join(f"{stages[n]:.2f}" if n in stages else "" for n in names)
            outside = wall - sum(v for k, v in stages.items() if not k.startswith(" "))  # parts are in their stage
            lines.append(f"| {tool} round {i + 1} | {wall:.2f} | {cells} | {outside:.2f} |")
    return "\n".join(lines)


def section(results: dict, argv: list[str]) -> str:
    night = results["night"]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    command = " ".join(["python benchmarks/night.py", *argv]).strip()
    parts = [
        HEADING, "",
        f"Measured with `{command}` on {os.cpu_count()} cores ({cpu}), Python {platform.python_version()},"
        f" {time.strftime('%Y-%m-%d')}. {night.title}: {night.n_bias + night.n_dark + night.n_flat + night.n_light} uint16 FITS files,"
        f" {results['raw_bytes'] / 2**30:.2f} GiB (BZERO 32768, no overscan; read noise, dark current with hot"
        " pixels, cosmic rays in every frame). Whole process per tool (imports, JIT cache load, reading,"
        " writing); the best and the median of the rounds (each round runs every tool once on warm page cache,"
        " dirty pages synced between runs; ccdproc only in the first round); the largest peak RSS."
        f" The I/O floor reads every raw frame once with astropy and writes, with fsync (then its pages"
        f" dropped from the page cache, as ccdcal drops its outputs'), the"
        f" {results['out_bytes'] / 2**30:.2f} GiB (same files and sizes) that ccdcal's default reduce wrote.",
        "",
        table(results), "",
        "ccdcal's stage timings (OUT/manifest.json `timings`; \"outside the stages\" is interpreter start,"
        " imports and the manifest writes):", "",
        stage_table(results), "",
    ]
    notes = [
        "ccdcal: `ccdcal reduce RAW -o OUT` (fresh OUT each run): masters of bias, dark (bias-subtracted) and"
        " flat (bias and scaled dark subtracted, scaled by median), mean with the default noise-model"
        " rejection, then every light calibrated with data, UNCERT and MASK, plus the HTML report and"
        " previews; the lean variant adds `--no-report --no-uncertainty`.",
        "Siril: its standard mono preprocessing script without registration and stacking of the lights:"
        " `convert` (FITS input: Siril links the files), `stack bias rej 3 3 -nonorm`, `stack dark rej 3 3"
        " -nonorm` (the master dark keeps the bias), `preprocess flat -bias=` (`calibrate` from Siril 1.2),"
        " `stack pp_flat rej 3 3 -norm=mul`, `preprocess light -dark= -flat=`; `rej` without a type is"
        " winsorized sigma clipping, average; 32-bit float outputs, no uncertainty, no mask; it also"
        " writes the calibrated flats.",
        "I/O floor: `fits.getdata(...).astype(np.float32)` of every raw frame, then as many files of the"
        " same sizes as ccdcal's default reduce wrote, each fsync'ed, then dropped from the page cache"
        " (`posix_fadvise(DONTNEED)`, as ccdcal drops the lights it will not read again: the next file"
        " written reuses those pages). The cached floor writes the same files keeping their pages, as"
        " issue 12 defined the floor; on this VM a write into pages the host must back afresh costs"
        " 3-4 ms of kernel time per MB.",
    ] + results["notes"]
    parts += ["Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def write_section(path: Path, text: str) -> None:
    """Put ``text`` under the "Whole night" heading of ``path``, keeping everything else."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = old.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if start is None:
        new = old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + text.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines)
                                                                          else [])) + "\n"
    path.write_text(new)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK.size}² and fewer frames, a ~1 minute smoke run; RESULTS.md untouched")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (every tool once per round; ccdproc once)")
    parser.add_argument("--tools", default="floor,floor-cached,ccdcal,ccdcal-lean,siril",
                        help=f"comma-separated, from {', '.join(TOOLS)}")
    parser.add_argument("--ccdproc", action="store_true", help="also run ccdproc (slow: minutes, GBs)")
    parser.add_argument("--data-dir", type=Path, default=HERE / "_data")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown tool {unknown[0]!r}; choose from {', '.join(TOOLS)}")
    if args.ccdproc and "ccdproc" not in tools:
        tools.append("ccdproc")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    results = run(QUICK if args.quick else FULL, tools, args.data_dir, args.rounds)
    print(table(results))
    stages = stage_table(results)
    if stages:
        print("\nccdcal stage timings (manifest.json):\n" + stages)
    for note in results["notes"]:
        print(f"- {note}")
    if not args.quick:
        write_section(args.output, section(results, sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
