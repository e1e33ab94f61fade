"""Terminal output: progress bars, the inventory and plan tables, the end-of-run summary (rich)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

from ._shared.names import printable

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
    """Print one warning line on stderr (control characters shown as escapes, brackets as
    themselves: a file name cannot restyle or retitle the terminal)."""
    from rich.markup import escape

    err_console().print(f"[yellow]warning:[/] {escape(printable(message))}", markup=True, highlight=False,
                        soft_wrap=True)


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


def _cut(text: str, head: int, tail: int) -> str:
    from rich.cells import cell_len

    start, end = text[:head], text[len(text) - tail:] if tail else ""
    while cell_len(start) + cell_len(end) > head + tail and (start or end):  # wide characters
        if cell_len(start) >= cell_len(end):
            start = start[:-1]
        else:
            end = end[1:]
    return f"{start}…{end}"


def shorten_middle(text: str, width: int, head: int | None = None) -> str:
    """``text`` cut to ``width`` cells by replacing its middle with "…" (start and end kept).

    Parameters
    ----------
    text : str
        What to shorten; returned unchanged when it fits.
    width : int
        Cells available, the "…" included.
    head : int, optional
        Characters kept at the start; by default half of what fits, the end keeping one
        more (the frame number, the suffix and an HDU index ``[2]`` are there).
    """
    from rich.cells import cell_len

    if cell_len(text) <= width:
        return text
    if width <= 1:
        return "…"[:max(width, 0)]
    keep = width - 1
    head = keep // 2 if head is None else min(max(head, 0), keep)
    return _cut(text, head, keep - head)


def shorten_names(names: Sequence[str], width: int) -> list[str]:
    """File names cut in the middle to ``width`` cells, at the place that keeps them apart.

    Names from one instrument often share a long start and end and differ in the middle
    or just before the suffix; the cut point (how much of the start is kept) is the one
    that leaves the most names distinct, the balanced cut when several do as well.
    """
    from rich.cells import cell_len

    long = [n for n in names if cell_len(n) > width]
    if not long or width <= 1:
        return [shorten_middle(n, width) for n in names]
    keep = width - 1
    best_head, best_distinct = keep // 2, -1
    for head in sorted(range(keep + 1), key=lambda h: (abs(h - keep // 2), h)):
        distinct = len({shorten_middle(n, width, head) for n in names})
        if distinct > best_distinct:
            best_head, best_distinct = head, distinct
            if distinct == len(set(names)):
                break
    return [shorten_middle(n, width, best_head) for n in names]


_NOTES_MIN = 30  # cells: narrower than this, the notes go under the table
_FILE_MIN = 12  # cells a shortened file name keeps, whatever the width


def print_inventory(inventory, *, out=None) -> None:
    """Print the frames of a scan as a table that fits the terminal, then the skipped inputs.

    Long file names (robotic observatories write 80-character names) are shortened in
    the middle so that every other column keeps its width; when the notes (flags and
    warnings) do not fit beside the columns, they are printed under the table, one line
    per note, with the full file name.

    Parameters
    ----------
    inventory : Inventory
        The result of :func:`ccdcal.planning.inventory.scan`.
    out : rich.console.Console, optional
        Where to print; the standard-output console by default.
    """
    from rich import box
    from rich.cells import cell_len
    from rich.table import Table
    from rich.text import Text

    target = out if out is not None else console()
    frames = sorted(inventory.frames, key=lambda f: (f.kind.value, f.filter or "", f.exptime or 0, str(f.path)))
    columns = ("kind", "filter", "exptime s", "bin", "shape", "temp °C")
    rows = [(f.kind.value, shorten_middle(printable(_fmt(f.filter)), 16), _fmt(f.exptime, "g"),
             f"{f.binning[0]}×{f.binning[1]}", f"{f.shape[1]}×{f.shape[0]}", _fmt(f.ccd_temp, ".1f"))
            for f in frames]
    notes = [printable("; ".join(list(f.flags) + list(f.warnings))) for f in frames]
    widths = [max([cell_len(c)] + [cell_len(r[i]) for r in rows]) for i, c in enumerate(columns)]
    names = [printable(f.name) for f in frames]
    full = max([cell_len("file")] + [cell_len(n) for n in names])

    def chrome(n_columns: int) -> int:  # separators and padding of box.SIMPLE_HEAD, no outer edge
        return (n_columns - 1) + 2 * n_columns - 2

    has_notes = any(notes)
    room = target.width - sum(widths)
    notes_inside = has_notes and room - chrome(len(columns) + 2) - full >= _NOTES_MIN
    file_width = room - chrome(len(columns) + (2 if notes_inside else 1))
    file_width = max(min(full, file_width), _FILE_MIN)

    table = Table(title=f"{len(frames)} frames", title_justify="left", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False)
    table.add_column("file", no_wrap=True, min_width=min(full, file_width), overflow="ellipsis")
    for col, width in zip(columns, widths, strict=True):
        table.add_column(col, no_wrap=True, min_width=width,
                         justify="right" if col in ("exptime s", "temp °C") else "left")
    if notes_inside:
        table.add_column("notes", ratio=1)
    for f, short, row, note in zip(frames, shorten_names(names, file_width), rows, notes, strict=True):
        cells = [short, *row] + ([note] if notes_inside else [])
        table.add_row(*map(Text, cells), style="red" if f.flags else None)   # names are not markup
    target.print(table)
    if has_notes and not notes_inside:
        for f, name in zip(frames, names, strict=True):
            for text, style in [(t, "red") for t in f.flags] + [(t, "yellow") for t in f.warnings]:
                target.print(f"{name}: {printable(text)}", style=style, markup=False, highlight=False,
                             soft_wrap=True)
    for s in inventory.skipped:
        if out is None:
            warn(f"skipped {s.path}: {s.reason}")
        else:
            target.print(printable(f"skipped {s.path}: {s.reason}"), style="yellow", markup=False, soft_wrap=True)


def print_plan(plan) -> None:
    text = "\n".join(printable(line) for line in plan.describe().splitlines())
    console().print(text, soft_wrap=True, markup=False, highlight=False)


def print_summary(result) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title="summary", title_justify="left")
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("where / why")
    table.add_row("masters built", str(len(result.masters)), Text(printable(result.out_dir / "masters")))
    if result.lights:
        where = printable(result.out_dir / "calibrated")
    elif result.plan.lights or result.plan.skipped:
        where = "none: see the skipped inputs below"
    else:
        where = "no lights in the inputs: masters only"
    table.add_row("lights calibrated", str(len(result.lights)), Text(where))
    if getattr(result, "stacks", None) or result.plan.stacks:
        table.add_row("stacks", str(len(result.stacks)), Text(printable(result.out_dir / "stacked")))
    if result.reused:
        table.add_row("up to date (kept)", str(result.reused), "rerun with --force to redo")
    left_out = [(job, f, why) for job in result.plan.masters
                for f, why in zip(job.excluded, job.excluded_reasons or ("flagged",) * len(job.excluded),
                                  strict=True)]
    if left_out:
        table.add_row("left out of masters", str(len(left_out)), "listed below (--keep-flagged keeps them)")
    uncorrected = [j for j in result.plan.lights if j.uncorrected]
    if uncorrected:
        table.add_row("UNCORRECTED lights", str(len(uncorrected)), "pedestal kept (--allow-uncorrected)")
    table.add_row("skipped", str(len(result.skipped)), "listed below" if result.skipped else "")
    console().print(table)
    for job, f, why in left_out:
        console().print(printable(f"left out of {job.name}: {f.name} ({why})"), soft_wrap=True, markup=False)
    for j in uncorrected:
        console().print(printable(f"uncorrected {j.output}: {j.uncorrected}"), soft_wrap=True, markup=False)
    for s in result.skipped:  # one unwrapped line each, so scripts and people can grep them
        console().print(printable(f"skipped {s.path}: {s.reason}"), soft_wrap=True, markup=False)
    if result.timings:
        parts, pieces = [], []
        for key, seconds in result.timings.items():
            if key.startswith("  "):        # a piece of the stage that follows (each master)
                pieces.append(f"{key.strip()} {seconds:.1f} s")
                continue
            parts.append(f"{key} {seconds:.1f} s" + (f" ({', '.join(pieces)})" if pieces else ""))
            pieces = []
        where = f" on {result.executor}" if getattr(result, "executor", "") else ""
        console().print("time: " + ", ".join(parts) + where, soft_wrap=True, markup=False)
    if getattr(result, "dashboard", None):
        console().print(f"dask dashboard: {result.dashboard}", soft_wrap=True, markup=False)
    if result.report:
        console().print(printable(f"report: {result.report}"), markup=False)


def print_stack(run) -> None:
    """The frames table of a stack (fits 80 columns), then why each left-out frame was, one line
    each, and where the stack went."""
    from pathlib import Path

    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(title="frames", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    for col in ("frame", "stars", "FWHM", "ecc", "bkg", "noise", "match", "rms", "scale", "wt", ""):
        table.add_column(col, justify="left" if col in ("frame", "") else "right", no_wrap=True)

    def fmt(v, spec):
        return "" if v is None else format(v, spec)

    # the other columns take about 68 cells: names are cut in the middle to what is left
    names = shorten_names([printable(Path(f.path).name) for f in run.frames], max(12, console().width - 68))
    for f, name in zip(run.frames, names, strict=True):
        row = f.to_json()
        used = f.used
        table.add_row(Text(name), fmt(row["stars"], "d"), fmt(row["fwhm"], ".2f"),
                      fmt(row["eccentricity"], ".2f"), fmt(row["background"], ".4g"), fmt(row["noise"], ".3g"),
                      str(row["matched"]) if used else "", fmt(row["rms"], ".3f") if used else "",
                      fmt(row["flux_ratio"], ".3f") if used else "", fmt(row["weight"], ".2f") if used else "",
                      "ref" if f.reference else ("" if used else "out"))
    console().print(table)
    for f in run.frames:
        if not f.used:
            console().print(printable(f"left out {Path(f.path).name}: {f.reason}"), soft_wrap=True, markup=False)
    for note in run.notes:
        console().print(printable(f"note: {note}"), soft_wrap=True, markup=False)
    used = sum(1 for f in run.frames if f.used)
    console().print(printable(f"stack of {used} frames: {run.output}" + (f" (preview {run.preview})" if run.preview else "")),
                    soft_wrap=True, markup=False)
