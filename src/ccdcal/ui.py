"""Terminal output: progress bars, the inventory and plan tables, the end-of-run summary (rich)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from functools import lru_cache
from typing import Any, TypeVar

T = TypeVar("T")


@lru_cache(maxsize=1)
def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, soft_wrap=False)


@lru_cache(maxsize=1)
def err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def warn(message: str) -> None:
    """Print one warning line on stderr."""
    err_console().print(f"[yellow]warning:[/] {message}", markup=True, highlight=False)


def track(items: Iterable[T], description: str, *, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar on an interactive terminal; plain iteration otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console(), transient=True) as bar:
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "—"
    return format(value, spec) if spec else str(value)


def print_inventory(inventory) -> None:
    from rich.table import Table

    table = Table(title=f"{len(inventory.frames)} frames", title_justify="left")
    for col in ("file", "kind", "filter", "exptime s", "bin", "shape", "temp °C", "notes"):
        table.add_column(col, no_wrap=col != "notes")
    for f in sorted(inventory.frames, key=lambda f: (f.kind.value, f.filter or "", f.exptime or 0, str(f.path))):
        notes = "; ".join(list(f.flags) + list(f.warnings))
        style = "red" if f.flags else None
        table.add_row(f.name, f.kind.value, _fmt(f.filter), _fmt(f.exptime, "g"),
                      f"{f.binning[0]}×{f.binning[1]}", f"{f.shape[1]}×{f.shape[0]}",
                      _fmt(f.ccd_temp, ".1f"), notes, style=style)
    console().print(table)
    for s in inventory.skipped:
        warn(f"skipped {s.path}: {s.reason}")


def print_plan(plan) -> None:
    console().print(plan.describe(), soft_wrap=True, markup=False, highlight=False)


def print_summary(result) -> None:
    from rich.table import Table

    table = Table(title="summary", title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("where / why")
    table.add_row("masters built", str(len(result.masters)), str(result.out_dir / "masters"))
    table.add_row("lights calibrated", str(len(result.lights)), str(result.out_dir / "calibrated")
                  if result.lights else "no lights in the inputs: masters only")
    if result.reused:
        table.add_row("up to date (kept)", str(result.reused), "rerun with --force to redo")
    table.add_row("skipped", str(len(result.skipped)), "listed below" if result.skipped else "")
    console().print(table)
    for s in result.skipped:  # one unwrapped line each, so scripts and people can grep them
        console().print(f"skipped {s.path}: {s.reason}", soft_wrap=True, markup=False)
    if result.report:
        console().print(f"report: {result.report}")
