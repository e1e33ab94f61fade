"""Benchmark ccdcal combine against ccdproc.combine, a naive numpy stack and Siril on the same files.

Every tool runs as its own process (whole-process wall time and peak RSS, imports and JIT
included) on the same uint16 FITS files, after one warm-up read so every run sees the page
cache; the read floor is a Python process that reads every frame once with astropy and
makes one pass over it. Prints a markdown table and writes it to benchmarks/RESULTS.md.

    python benchmarks/run.py                 # all cases (needs ~2.2 GB in benchmarks/_data)
    python benchmarks/run.py --quick         # small smoke run, writes nothing
    python benchmarks/run.py --cases bias --tools ccdcal,floor
"""

from __future__ import annotations

import argparse
import os
import platform
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


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    size: int
    kind: str  # bias or flat
    title: str


CASES = {
    "bias": Case("bias", 20, 4096, "bias", "20 biases 4096², median + minmax 1/1 + sigma 4/3"),
    "flat": Case("flat", 20, 4096, "flat", "20 flats 4096², scaled by median, median + sigma 3/3"),
    "many": Case("many", 100, 2048, "bias", "100 frames 2048², median + minmax 1/1 + sigma 4/3"),
}
QUICK = {
    "bias": Case("bias", 10, 512, "bias", "10 biases 512² (quick)"),
    "flat": Case("flat", 10, 512, "flat", "10 flats 512² (quick)"),
}
TOOLS = ("floor", "ccdcal", "ccdproc", "numpy", "siril")


def make_frames(case: Case, folder: Path) -> list[Path]:
    """uint16 frames (BZERO 32768) with read noise, a few hot pixels and cosmic rays."""
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{case.kind}_{i:03d}.fits" for i in range(case.n)]
    if all(p.exists() for p in paths):
        return paths
    rng = np.random.default_rng(42)
    shape = (case.size, case.size)
    yy, xx = np.mgrid[0:case.size, 0:case.size] / case.size
    pattern = 1.0 - 0.2 * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2)  # vignetting
    for i, path in enumerate(paths):
        if case.kind == "flat":
            level = 20000 * (1 + 0.3 * np.sin(i))
            data = level * pattern + rng.normal(0, 1, shape) * np.sqrt(level)
        else:
            data = 1000 + rng.normal(0, 8, shape)
        hits = rng.random(shape) < 1e-4
        data[hits] += rng.uniform(500, 20000, hits.sum())
        header = fits.Header({"IMAGETYP": case.kind.upper(), "EXPTIME": 0.0 if case.kind == "bias" else 3.0,
                              "MJD-OBS": 60000 + i / 1440})
        fits.PrimaryHDU(np.clip(data, 0, 65535).astype(np.uint16), header=header).writeto(path, overwrite=True)
    return paths


def scripts(case: Case, paths: list[Path], out: Path) -> dict[str, list[str]]:
    files = [str(p) for p in paths]
    listing = repr(files)
    flat = case.kind == "flat"
    ccdcal = [sys.executable, "-m", "ccdcal.cli", "combine", *files, "-o", str(out / "ccdcal.fits"),
              "--method", "median"]
    ccdcal += (["--scale", "median", "--sigma-clip", "3,3"] if flat
               else ["--clip-extrema", "1,1", "--sigma-clip", "4,3"])
    ccdproc_kw = ("scale=lambda a: 1 / np.median(a), sigma_clip=True, sigma_clip_low_thresh=3,"
                  " sigma_clip_high_thresh=3" if flat else
                  "clip_extrema=True, nlow=1, nhigh=1, sigma_clip=True, sigma_clip_low_thresh=4,"
                  " sigma_clip_high_thresh=3")
    ccdproc = textwrap.dedent(f"""
        import numpy as np, ccdproc
        ccdproc.combine({listing}, method="median", {ccdproc_kw},
                        sigma_clip_func=np.ma.median, output_file={str(out / 'ccdproc.fits')!r},
                        overwrite_output=True, unit="adu")
    """)
    naive = textwrap.dedent(f"""
        import numpy as np
        from astropy.io import fits
        stack = np.stack([fits.getdata(p).astype(np.float32) for p in {listing}])
        {"stack /= np.median(stack, axis=(1, 2), keepdims=True)" if flat else ""}
        fits.writeto({str(out / 'numpy.fits')!r}, np.median(stack, axis=0), overwrite=True)
    """)
    floor = textwrap.dedent(f"""
        import numpy as np
        from astropy.io import fits
        total = None
        for p in {listing}:
            data = fits.getdata(p).astype(np.float32)
            total = data if total is None else total + data
    """)
    return {"floor": [sys.executable, "-c", floor], "ccdcal": ccdcal,
            "ccdproc": [sys.executable, "-c", ccdproc], "numpy": [sys.executable, "-c", naive]}


def siril_command(case: Case, paths: list[Path], work: Path) -> list[str] | None:
    """A siril-cli command that stacks the frames (average, sigma rejection), or None."""
    exe = shutil.which("siril-cli")
    if exe is None:
        return None
    seq = work / "siril"
    if seq.exists():
        shutil.rmtree(seq)
    seq.mkdir(parents=True)
    for i, p in enumerate(paths):
        os.symlink(p, seq / f"f_{i + 1:05d}.fits")
    low, high = (3, 3) if case.kind == "flat" else (4, 3)
    norm = "-norm=mul" if case.kind == "flat" else "-nonorm"
    script = seq / "stack.ssf"
    # link makes the sequence of symlinks Siril needs (timed: it is part of using Siril);
    # Siril stacks average + sigma rejection (its median stack has no rejection)
    script.write_text(f"requires 1.0.0\nsetext fits\nlink s -out=seq\ncd seq\n"
                      f"stack s_ rej s {low} {high} {norm} -out=master\n")
    return [exe, "-d", str(seq), "-s", str(script)]


def measure(command: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS bytes, exit code) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        print(f"  failed ({proc.returncode}): {err.strip()[-400:]}", file=sys.stderr)
    return wall, usage.ru_maxrss * 1024, proc.returncode


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def run(cases: list[Case], tools: list[str], data_dir: Path, repeat: int) -> list[dict]:
    rows = []
    for case in cases:
        paths = make_frames(case, data_dir / f"{case.name}_{case.n}x{case.size}")
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            out = Path(tmp)
            commands = scripts(case, paths, out)
            siril = siril_command(case, paths, out) if "siril" in tools else None
            if siril is not None:
                commands["siril"] = siril
            # a first ccdcal run compiles (or loads) the cached kernels; not timed
            subprocess.run(commands["ccdcal"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            for tool in tools:
                if tool not in commands and tool == "siril":
                    rows.append({"case": case, "tool": tool, "wall": None, "rss": None, "times": [],
                                 "note": "siril-cli not installed"})
            # Rounds: every tool once per round, so that a slow spell of a shared machine
            # hits all tools alike; the best and the median of the rounds are reported.
            runs: dict[str, list[tuple[float, int]]] = {t: [] for t in tools if t in commands}
            failed: set[str] = set()
            for round_ in range(repeat):
                for tool in runs:
                    if tool in failed or (tool == "ccdproc" and round_ > 0):
                        continue
                    warm(paths)
                    wall, rss, code = measure(commands[tool])
                    if code != 0:
                        failed.add(tool)
                        continue
                    runs[tool].append((wall, rss))
                    print(f"{case.name:5s} {tool:8s} {wall:.2f} s, {rss / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            for tool, got in runs.items():
                if tool in failed or not got:
                    rows.append({"case": case, "tool": tool, "wall": None, "rss": None, "times": [], "note": ""})
                    continue
                walls = sorted(w for w, _ in got)
                rows.append({"case": case, "tool": tool, "wall": walls[0], "median": float(np.median(walls)),
                             "rss": max(r for _, r in got), "times": walls, "note": ""})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | tool | best [s] | median [s] | peak RSS [GiB] | time vs ccdproc | time vs read floor |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        ref = next((r["wall"] for r in mine if r["tool"] == "ccdproc" and r["wall"]), None)
        floor = next((r for r in mine if r["tool"] == "floor" and r["wall"]), None)
        for r in mine:
            if r["wall"] is None:
                lines.append(f"| {case.title} | {r['tool']} | {r['note'] or 'failed'} | | | | |")
                continue
            speed = f"{ref / r['wall']:.1f}× faster" if ref else ""
            # best vs best and median vs median: both tools saw the same rounds
            ratio = (f"{r['wall'] / floor['wall']:.2f} (median {r['median'] / floor['median']:.2f})"
                     if floor else "")
            lines.append(f"| {case.title} | {r['tool']} | {r['wall']:.2f} | {r['median']:.2f} |"
                         f" {r['rss'] / 2**30:.2f} | {speed} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small frames, a smoke run; RESULTS.md untouched")
    parser.add_argument("--cases", default=None, help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated, from {', '.join(TOOLS)}")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (every tool once per round; ccdproc runs once)")
    parser.add_argument("--data-dir", type=Path, default=HERE / "_data")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    pool = QUICK if args.quick else CASES
    names = args.cases.split(",") if args.cases else list(pool)
    unknown = [n for n in names if n not in pool]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(pool)}")
    tools = [t for t in args.tools.split(",") if t]
    rows = run([pool[n] for n in names], tools, args.data_dir, args.repeat)
    text = table(rows)
    print(text)
    if not args.quick:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        header = (f"# Benchmark results\n\nMeasured with `python benchmarks/run.py {' '.join(argv or sys.argv[1:])}`"
                  f" on {os.cpu_count()} cores ({cpu}), Python {platform.python_version()},"
                  f" {time.strftime('%Y-%m-%d')}. Whole process (imports, JIT cache load, reading,"
                  " writing the output); the best and the median of the rounds (each round runs every tool"
                  " once, on warm page cache); the largest peak RSS of the process. The read floor"
                  " reads every frame once with astropy and adds it up.\n\n")
        args.output.write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
