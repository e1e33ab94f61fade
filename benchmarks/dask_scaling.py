"""Benchmark ``reduce`` on dask: the local executor, LocalCluster(1) and LocalCluster(2) on the
same night, and a model of N machines built from the measured task times and the task graph.

Each configuration runs as its own process (``ccdcal reduce --force [--scheduler local:N]``,
whole-process wall time, cluster start-up included), in interleaved rounds on warm page cache.
Then one traced run on LocalCluster(1) records every task's duration (dask's task stream) and
the client's own work (scan and plan, stitching and writing each master, the report); the
model for N machines like this one is

    T(N) = client + sum(pixel checks) / (N·w) + sum over dependency levels [max(first passes)]
           + sum(bands) / (N·w) + ceil(lights / (N·w)) * mean(light)

with w the task slots of one machine (its worker threads in the traced run) and "client" the
client's own serial work (headers, plan, stitching and writing each master, the report). Its
limit as N grows is the critical path: the client's work plus the longest task of each level.

    python benchmarks/dask_scaling.py            # the 4096² night of benchmarks/night.py, 2 rounds
    python benchmarks/dask_scaling.py --quick    # 2048², a smoke run; RESULTS.md untouched
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import night as nightbench  # noqa: E402

HEADING = "## Dask: local executor vs LocalCluster"
CONFIGS = {"local executor (threads)": None, "LocalCluster(1)": "local:1", "LocalCluster(2)": "local:2"}


def measure_configs(raw: Path, rounds: int) -> dict[str, list[tuple[float, int]]]:
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp:
        for r in range(rounds):
            for name, scheduler in CONFIGS.items():
                out = Path(tmp) / f"out-{r}-{len(results[name])}"
                command = [sys.executable, "-m", "ccdcal.cli", "reduce", str(raw), "-o", str(out), "--force"]
                if scheduler:
                    command += ["--scheduler", scheduler]
                wall, rss, code, err = nightbench.measure(command)
                if code not in (0, 3):
                    raise SystemExit(f"{name}: exit {code}: {err.strip().splitlines()[-1:]}")
                results[name].append((wall, rss))
                nightbench._progress(f"round {r + 1}: {name} {wall:.1f} s")
    return results


def trace(raw: Path) -> dict:
    """One run on LocalCluster(1): task durations by kind, and the client's own seconds."""
    from distributed import get_task_stream

    import ccdcal
    from ccdcal.pipeline import tasks
    from ccdcal.pipeline.executor import DaskExecutor

    client_seconds = {"write masters": 0.0}
    original = tasks.write_master

    def timed(*args, **kw):
        started = time.perf_counter()
        try:
            return original(*args, **kw)
        finally:
            client_seconds["write masters"] += time.perf_counter() - started

    executor = DaskExecutor("local:1")
    executor_slots = sum(w["nthreads"] for w in executor.client.scheduler_info()["workers"].values())
    tasks.write_master = timed
    try:
        with tempfile.TemporaryDirectory(dir=HERE / "_data") as tmp, get_task_stream(executor.client) as stream:
            result = ccdcal.reduce(raw, Path(tmp) / "out", scheduler=executor, force=True)
    finally:
        tasks.write_master = original
        executor.close()
    durations: dict[str, list[float]] = {}
    for item in stream.data:
        start = min(s["start"] for s in item["startstops"] if s["action"] == "compute")
        stop = max(s["stop"] for s in item["startstops"] if s["action"] == "compute")
        durations.setdefault(item["key"].split("-")[0], []).append(stop - start)
    client_seconds["scan and plan"] = result.timings.get("scan and plan", 0.0)
    client_seconds["report"] = result.timings.get("report", 0.0)
    levels = [len(level) for level in _levels(result.plan)]
    return {"durations": durations, "client": client_seconds, "levels": levels,
            "lights": len(result.lights), "slots": executor_slots}


def _levels(plan):
    from ccdcal.pipeline.run import dependency_levels

    return dependency_levels(plan.masters)


def client_serial(traced: dict) -> float:
    """The client's own seconds: the scan and plan less the pixel-check tasks it waited for."""
    c = traced["client"]
    pixel = sum(traced["durations"].get("pixel_metrics", [])) / traced["slots"]
    return max(0.0, c["scan and plan"] - pixel) + c["write masters"] + c["report"]


def model(traced: dict, machines: int) -> float:
    """Predicted wall time on ``machines`` machines like this one (see the module docstring)."""
    d = traced["durations"]
    slots = machines * traced["slots"]
    prepares = sorted(d.get("prepare_master", []), reverse=True)
    lights = d.get("light_task", [])
    # first passes: the longest of each level (a level's masters run side by side)
    per_level = max(1, len(prepares) // max(1, len(traced["levels"])))
    first = sum(prepares[k] for k in range(0, len(prepares), per_level))
    light = statistics.mean(lights) if lights else 0.0
    return (client_serial(traced) + sum(d.get("pixel_metrics", [])) / slots + first
            + sum(d.get("master_band_or_reason", [])) / slots + math.ceil(len(lights) / slots) * light)


def section(results: dict, traced: dict, argv: list[str]) -> str:
    best = {name: min(w for w, _ in runs) for name, runs in results.items()}
    base = best["local executor (threads)"]
    lines = [HEADING, "", f"`python benchmarks/dask_scaling.py {' '.join(argv)}`".replace("  ", " ").strip(), "",
             "| executor | wall best / median | peak RSS (largest process) | vs local |", "|---|---:|---:|---:|"]
    for name, runs in results.items():
        walls = [w for w, _ in runs]
        lines.append(f"| {name} | {min(walls):.1f} / {statistics.median(walls):.1f} s | "
                     f"{max(r for _, r in runs) / 2**30:.2f} GiB | {min(walls) / base:.2f}× |")
    d = traced["durations"]
    lines += ["", "Traced run on LocalCluster(1), seconds:", ""]
    for key, values in sorted(d.items()):
        lines.append(f"- {key}: {len(values)} tasks, {sum(values):.1f} s in all, longest {max(values):.2f} s")
    for key, value in traced["client"].items():
        lines.append(f"- client {key}: {value:.1f} s")
    lines += ["", "| machines | modelled wall | speed-up vs 1 |", "|---:|---:|---:|"]
    one = model(traced, 1)
    for n in (1, 2, 4, 8, 16, 64):
        t = model(traced, n)
        lines.append(f"| {n} | {t:.1f} s | {one / t:.2f}× |")
    limit = client_serial(traced)
    lines += ["", f"Model check: it predicts {one:.1f} s for one machine, measured "
              f"{best['LocalCluster(1)']:.1f} s (best). The client's own work ({limit:.1f} s: reading the"
              " headers, the plan, stitching and writing each master, the report) does not shrink with"
              " more machines, nor does the longest first pass of each level: that is where the scaling"
              " stops."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trace-only", action="store_true",
                        help="reuse the wall times of the last run (benchmarks/_data) and trace again")
    parser.add_argument("--data-dir", type=Path, default=HERE / "_data")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    spec = nightbench.QUICK if args.quick else nightbench.FULL
    args.data_dir.mkdir(parents=True, exist_ok=True)
    raw = nightbench.make_night(spec, args.data_dir / f"night-{spec.size}")
    saved = args.data_dir / f"dask-scaling-{spec.size}.json"
    if args.trace_only and saved.exists():
        results = {k: [tuple(r) for r in v] for k, v in json.loads(saved.read_text()).items()}
    else:
        results = measure_configs(raw, args.rounds)
        saved.write_text(json.dumps(results))
    traced = trace(raw)
    text = section(results, traced, sys.argv[1:] if argv is None else argv)
    print(text)
    if not args.quick:
        old_heading = nightbench.HEADING
        nightbench.HEADING = HEADING
        try:
            nightbench.write_section(args.output, text)
        finally:
            nightbench.HEADING = old_heading
    return 0


if __name__ == "__main__":
    sys.exit(main())
