"""Nights of many small frames: cost per light against the durable I/O floor, memory against the
number of lights, the report's size.

Each case is a demo-style raw night (``ccdcal.demo.write_night``: 256² data with a 32-column
overscan, 9 biases, 5 darks per exposure, 5 flats and N/2 lights in each of V and R) written
once to benchmarks/_data/many-N. Measured as whole processes, same run, warm page cache:

- the durable I/O floor: a Python process that reads every raw once (astropy) and writes as
  many files and bytes as ccdcal's reduce wrote, with an fsync per file;
- ``ccdcal reduce RAW -o OUT`` (the report included) and with ``--no-report``;
- with ``--dask``: ``ccdcal reduce --scheduler local:2 --no-report``.

Reported: wall time, the ratio to the floor, cost per light (time less the same night's
fixed cost, from the smallest case), peak RSS (one process), the peak summed PSS of all its processes
(worker processes included) and report.html's size.

    python benchmarks/many_frames.py [--lights 100,800] [--rounds 2] [--dask]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from night import LAST_TREE_PEAK, floor_command, measure, tree_size, warm  # noqa: E402


def make(lights: int, data: Path) -> Path:
    """The raw night of ``lights`` lights (written once, by another process: a child's peak RSS
    counts the parent's memory at the fork, so this process stays small)."""
    raw = data / f"many-{lights}" / "raw"
    if not (raw.parent / "done").exists():
        shutil.rmtree(raw.parent, ignore_errors=True)
        subprocess.run([sys.executable, "-c", "import sys; from ccdcal.demo import write_night; "
                        "write_night(sys.argv[1], seed=11, size=256, n_light=int(sys.argv[2]))",
                        str(raw), str(lights // 2)], check=True)
        (raw.parent / "done").write_text("ok\n")
    return raw


def reduce_command(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ccdcal.cli", "reduce", str(raw), "-o", str(out), *extra]


def run_case(lights: int, data: Path, rounds: int, dask: bool) -> dict:
    raw = make(lights, data)
    work = data / f"many-{lights}" / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raws = sorted(raw.glob("*.fits"))
    warm(raws)
    # an untimed warm-up run: what the floor must write
    out = work / "warm"
    wall, rss, code, tail = measure(reduce_command(raw, out, "--no-report"))
    if code:
        raise SystemExit(f"ccdcal failed on {raw}:\n{tail}")
    _, sizes = tree_size(out)
    result: dict = {"lights": lights, "files": len(raws), "written_files": len(sizes)}
    tools = {
        "floor": lambda o: floor_command(raw, sizes, o, drop=True),
        "ccdcal": lambda o: reduce_command(raw, o),
        "ccdcal --no-report": lambda o: reduce_command(raw, o, "--no-report"),
    }
    if dask:
        tools["ccdcal local:2 --no-report"] = lambda o: reduce_command(raw, o, "--no-report", "--scheduler", "local:2")
    for round_ in range(rounds):
        for name, command in tools.items():
            o = work / f"{name.replace(' ', '_').replace(':', '')}_{round_}"
            wall, rss, code, tail = measure(command(o))
            if code:
                raise SystemExit(f"{name} failed:\n{tail}")
            best = result.setdefault(name, {"s": wall, "rss": rss, "tree": LAST_TREE_PEAK[0]})
            best["s"], best["rss"] = min(best["s"], wall), max(best["rss"], rss)
            best["tree"] = max(best["tree"], LAST_TREE_PEAK[0])
            if name == "ccdcal":
                report = o / "report.html"
                best["report_mb"] = report.stat().st_size / 1e6 if report.exists() else float("nan")
            shutil.rmtree(o, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lights", default="100,800", help="light counts, comma-separated (even)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dask", action="store_true", help="also --scheduler local:2")
    parser.add_argument("--data-dir", type=Path, default=HERE / "_data")
    args = parser.parse_args(argv)
    results = [run_case(int(n), args.data_dir, args.rounds, args.dask) for n in args.lights.split(",")]
    for r in results:
        print(r, flush=True)
    names = [k for k in results[0] if isinstance(results[0][k], dict)]
    print("\n| lights | tool | wall s | × floor | peak RSS MB | all processes, PSS MB | report MB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        floor = r["floor"]["s"]
        for name in names:
            m = r[name]
            print(f"| {r['lights']} | {name} | {m['s']:.1f} | {m['s'] / floor:.2f} | {m['rss'] / 2**20:.0f} | "
                  f"{m['tree'] / 2**20:.0f} | {m.get('report_mb', float('nan')):.1f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        for name in names:
            per = (b[name]["s"] - a[name]["s"]) / (b["lights"] - a["lights"]) * 1000
            tree = b[name]["tree"] / a[name]["tree"] if a[name]["tree"] else float("nan")
            print(f"{name}: {per:.1f} ms per added light; peak RSS x{b[name]['rss'] / a[name]['rss']:.2f}, "
                  f"all processes x{tree:.2f} from {a['lights']} to {b['lights']} lights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
