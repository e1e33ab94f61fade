"""How ccdcal's objects look in a Jupyter notebook: HTML tables for an inventory, a plan and a
reduction, a stretched thumbnail for a combined frame, and :class:`Preview`, the object
:func:`ccdcal.show` returns (a PNG, through matplotlib when it is installed)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from .stretch import downsample, png_bytes, stretch

_STYLE = ("<style>.ccdcal td,.ccdcal th{padding:2px 8px;text-align:left;font-size:90%}"
          ".ccdcal .flag{color:#b00}.ccdcal .warn{color:#a60}</style>")


def _table(header: list[str], rows: list[list[Any]], *, caption: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption style='text-align:left'>{html.escape(caption)}</caption>" if caption else ""
    return f"{_STYLE}<table class='ccdcal'>{cap}<tr>{head}</tr>{body}</table>"


def _num(value: Any, fmt: str = "g") -> str:
    return "" if value is None else format(value, fmt)


def inventory_html(inventory: Any) -> str:
    """One row per image HDU: kind, exposure, filter, temperature, size, flags and warnings."""
    rows = []
    for f in inventory.frames:
        notes = "".join(f"<div class='flag'>{html.escape(x)}</div>" for x in f.flags)
        notes += "".join(f"<div class='warn'>{html.escape(x)}</div>" for x in f.warnings)
        temp = f.set_temp if f.set_temp is not None else f.ccd_temp
        rows.append([html.escape(f.name), f.kind.value, _num(f.exptime), html.escape(f.filter or ""),
                     _num(temp, ".1f"), f"{f.shape[1]}×{f.shape[0]}", f"{f.binning[0]}×{f.binning[1]}", notes])
    for s in inventory.skipped:
        rows.append([html.escape(str(s.path)), "skipped", "", "", "", "", "", html.escape(s.reason)])
    return _table(["file", "kind", "exptime [s]", "filter", "temp [°C]", "size", "binning", "notes"], rows,
                  caption=f"{len(inventory.frames)} frames, {len(inventory.skipped)} skipped")


def plan_html(plan: Any) -> str:
    """The masters (members, how they are stacked) and each light's masters, with the notes."""
    rows = [[html.escape(job.label.split("   ")[0]), len(job.members), html.escape(job.settings.describe()),
             html.escape(job.output)] for job in plan.masters]
    masters = _table(["master", "frames", "stacked", "output"], rows)
    light_rows = []
    for job in plan.lights:
        r = job.recipe
        chosen = [x for x in (r.bias, f"{r.dark} ×{r.dark_scale:.3g}" if r.dark else None, r.flat) if x]
        light_rows.append([html.escape(job.frame.name), html.escape(", ".join(chosen) or "nothing"),
                           html.escape("; ".join(job.notes))])
    lights = _table(["light", "masters", "notes"], light_rows) if light_rows else "<p>no lights: masters only</p>"
    extra = "".join(f"<div class='warn'>warning: {html.escape(w)}</div>" for w in plan.warnings)
    extra += "".join(f"<div class='flag'>skipped {html.escape(s.path)}: {html.escape(s.reason)}</div>"
                     for s in plan.skipped)
    return masters + lights + f"<div class='ccdcal'>{extra}</div>"


def result_html(result: Any) -> str:
    """The summary of a reduction, with a link to its report."""
    rows = [["masters", len(result.masters), html.escape(str(result.out_dir / "masters"))],
            ["lights calibrated", len(result.lights), html.escape(str(result.out_dir / "calibrated"))],
            ["kept (up to date)", result.reused, ""],
            ["skipped", len(result.skipped), "<br>".join(html.escape(f"{s.path}: {s.reason}") for s in result.skipped)],
            ["warnings", len(result.warnings), "<br>".join(html.escape(w) for w in result.warnings[:20])]]
    link = ""
    if result.report:
        link = f"<p>report: <a href='{html.escape(str(result.report))}' target='_blank'>{html.escape(str(result.report))}</a></p>"
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    return _table(["", "count", "where / why"], rows) + link + (f"<p>{html.escape(times)}</p>" if times else "")


def thumbnail_uri(data: np.ndarray, *, size: int = 256, method: str = "autostf") -> str:
    """A stretched, downsampled PNG of ``data`` as a data: URI."""

    small = downsample(np.asarray(data, dtype=np.float32), size)
    return "data:image/png;base64," + base64.b64encode(png_bytes(stretch(small, method))).decode("ascii")


def combine_html(result: Any) -> str:
    """A thumbnail of a combined frame beside its key facts and rejection counts."""
    h = result.header
    facts = [["frames", h.get("NCOMBINE", "")], ["method", html.escape(str(h.get("COMBMETH", "")))],
             ["size", f"{result.data.shape[1]}×{result.data.shape[0]}"],
             ["median", f"{float(np.nanmedian(result.data)):.6g}"],
             ["rejected low / high", f"{int(result.nlow_rejected.sum())} / {int(result.nhigh_rejected.sum())}"],
             ["pixels without data", int(np.count_nonzero(result.mask))]]
    if result.member_rejected is not None:
        per = ", ".join(f"{lo}/{hi}" for lo, hi in result.member_rejected.tolist())
        facts.append(["per member (low/high)", per])
    img = f"<img src='{thumbnail_uri(result.data)}' style='image-rendering:pixelated'>"
    return f"<div style='display:flex;gap:16px'>{img}{_table(['', ''], facts)}</div>"


@dataclass
class Preview:
    """A stretched image for a notebook: displays as a PNG (matplotlib when installed)."""

    data: np.ndarray
    method: str = "autostf"
    title: str = ""
    size: int = 1024

    def __repr__(self) -> str:
        ny, nx = np.shape(self.data)[-2:]
        kind = "colour image" if np.ndim(self.data) == 3 else "image"
        return f"Preview({nx}x{ny} {kind}, stretch {self.method!r}{', ' + repr(self.title) if self.title else ''})"

    def _repr_png_(self) -> bytes:
        shown = stretch(downsample(np.asarray(self.data, dtype=np.float32), self.size), self.method)
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return png_bytes(shown)
        import io

        ny, nx = shown.shape[-2:]
        fig = Figure(figsize=(7, 7 * ny / max(nx, 1) + 0.4))
        ax = fig.add_subplot()
        if shown.ndim == 3:       # R, G, B planes: an RGB image, FITS row 1 at the bottom
            ax.imshow(np.clip(np.nan_to_num(np.moveaxis(shown, 0, -1)), 0, 1), origin="lower")
        else:
            ax.imshow(shown, origin="lower", cmap="gray", vmin=0, vmax=1)
        ax.set_title(self.title or f"stretch: {self.method}")
        ax.set_xticks([])
        ax.set_yticks([])
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
