"""The HTML QA report of a reduction: plan, per-group frame statistics, master and light previews.

:func:`build_report` reads ``OUT/manifest.json`` (or a manifest dict), writes stretched
PNG previews to ``OUT/previews/`` and one self-contained ``OUT/report.html`` (images
inline as data URIs, histograms as inline SVG, no script, no network).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from .._shared.names import NAME_LIMIT, unique_stem
from ..colour.demosaic import channel_map, superpixel
from ..errors import CcdcalError, InputError
from ..io.frames import datasum_of, read_image
from ..io.guard import output_lock, refuse_overwrite
from ..io.hashing import new_digest
from ..io.headers import bayer_pattern
from ..io.writer import write_bytes, write_text
from ..qa.stats import region_stats
from ..stretch import (
    display_pixels,
    downsample,
    png_bytes,
    png_of_pixels,
    png_text,
    png_with_text,
    stretch,
)

PREVIEW_SIZE = 800  # px, longest side of a master or light preview
THUMB_SIZE = 200  # px, longest side of a light thumbnail
#: Beyond this many lights the report lists them as one sortable table with small thumbnails
#: (JPEG, :data:`TABLE_THUMB` px) and plots of their statistics, the large previews linked, not
#: inlined: 800 lights make a few MB, not 75, and nobody scrolls 800 cards.
LARGE_NIGHT = 60
TABLE_THUMB = 64
# zlib level of the report's PNGs: on a smooth master flat 6x faster than level 6 for 17 % more
# bytes; on noise-like lights the same time and size
PNG_LEVEL = 1
# a light's previews (sky noise does not deflate): stored, 2.5 ms for a 256² preview of 66 KB
# against 4.5 ms for 61 KB at level 1 (a smooth flat would double: masters keep PNG_LEVEL)
LIGHT_PNG_LEVEL = 0
HIST_BINS = 120
KINDS = ("bias", "dark", "flat")


# -- small pieces ---------------------------------------------------------------------------------
@dataclass
class Image:
    """One preview: the PNG (inline) and where its file is, or why there is none."""

    data_uri: str | None = None
    file: str | None = None  # relative to the report
    width: int = 0
    height: int = 0
    error: str | None = None


@dataclass
class MasterCard:
    kind: str
    label: str
    output: str
    description: str
    members: list[str]
    excluded: list[str]
    method: str
    preview: Image
    histogram_svg: str | None = None
    stats: dict[str, Any] | None = None
    rejection: Image | None = None                  # map of rejected values per pixel
    rejected: list[tuple[str, int, int, str]] = field(default_factory=list)  # member, low, high, % of pixels
    excluded_reasons: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        if self.label.lower().startswith("master"):
            return self.label
        return f"master {self.kind} — {self.label}"


@dataclass
class LightCard:
    index: int
    name: str
    output: str
    masters: list[str]
    notes: list[str]
    flags: list[str]
    thumb: Image
    preview: Image
    stats: dict[str, Any] | None = None


@dataclass
class FrameRow:
    name: str
    path: str
    hdu: int | None
    exptime: Any
    filter: Any
    shape: str
    metrics: dict[str, Any] | None
    flags: list[str]
    warnings: list[str]
    excluded: bool


@dataclass
class Group:
    title: str
    kind: str
    rows: list[FrameRow] = field(default_factory=list)
    order: tuple = ()

    @property
    def n_flagged(self) -> int:
        return sum(1 for r in self.rows if r.flags)

    @property
    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in ("level", "noise"):
            values = [r.metrics[key] for r in self.rows
                      if r.metrics and _finite_number(r.metrics.get(key))]
            if values:
                out[key] = float(np.median(values))
        return out


def _number(value: Any) -> float:
    """``value`` as a float when it is a number (statistics read from a preview file), else NaN."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def _finite_number(value: Any) -> bool:
    return math.isfinite(_number(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _safe_stem(text: str) -> str:
    """The previews' stem for an output: no two outputs share one (``a b`` and ``a_b`` do not),
    and no name is longer than a file name may be."""
    stem = Path(text).name
    for suffix in (".gz", ".fz", ".fits", ".fit", ".fts"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    return unique_stem(stem, NAME_LIMIT * 2)


def _display_name(path: str) -> str:
    return Path(path).name if path else "?"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—" if math.isnan(value) else ("∞" if value > 0 else "−∞")
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 10 ** digits or magnitude < 1e-3:
            return f"{value:.{digits - 1}g}" if magnitude >= 1e6 or magnitude < 1e-3 else f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: Any) -> str:
    if not _finite_number(value):
        return "—"
    if value == 0:
        return "0"
    return f"{100 * value:.2g}%"


def _fmt_exptime(value: Any) -> str:
    return "—" if not _finite_number(value) else f"{value:g} s"


# -- histograms -----------------------------------------------------------------------------------
def histogram_facts(data: np.ndarray, *, bins: int = HIST_BINS) -> dict[str, Any] | None:
    """What a histogram shows of the finite pixels (None when there are none): log-count bars
    over the 0.5-99.5 percentile span widened by a quarter on each side (and kept inside
    min..max), so a bad column or a few hot pixels do not squash it into one bin; the shares of
    pixels outside (counted in the first/last bin) and the median. Plain numbers only: the
    report draws the SVG from them (:func:`render_histogram`), so nothing stored is markup."""
    values = np.asarray(data).ravel()
    finite = np.isfinite(values)
    if not finite.all():
        values = values[finite]
    if values.size == 0:
        return None
    if values.size > 2_000_000:
        values = values[:: values.size // 1_000_000]
    values = values.astype(np.float64)   # the subsample only: no float64 copy of the frame
    p_lo, p_hi = np.percentile(values, [0.5, 99.5])
    pad = 0.25 * (p_hi - p_lo)
    lo = max(float(p_lo - pad), float(values.min()))
    hi = min(float(p_hi + pad), float(values.max()))
    if not hi > lo:
        lo, hi = float(values.min()) - 0.5, float(values.max()) + 0.5
    counts, _ = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    return {"counts": [int(c) for c in counts], "lo": lo, "hi": hi, "median": float(np.median(values)),
            "below": float(np.mean(values < lo)), "above": float(np.mean(values > hi))}


def histogram_svg(data: np.ndarray, *, width: int = 380, height: int = 130, bins: int = HIST_BINS,
                  unit: str = "ADU") -> str:
    """An inline SVG histogram (log counts) of the finite pixels (:func:`histogram_facts`);
    the median is marked with a red line."""
    return render_histogram(histogram_facts(data, bins=bins), width=width, height=height, unit=unit)


def render_histogram(facts: Mapping[str, Any] | None, *, width: int = 380, height: int = 130,
                     unit: str = "ADU") -> str:
    """The SVG of :func:`histogram_facts`' numbers. Every value is converted to a number here
    (a ``ValueError``/``TypeError`` otherwise), so facts read back from a tampered
    ``previews/*.json`` cannot put markup into the report."""
    if facts is None:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" width="{width}" '
                f'height="{height}"><text x="10" y="20">no finite pixels</text></svg>')
    counts = [int(c) for c in facts["counts"]]
    lo, hi, median = float(facts["lo"]), float(facts["hi"]), float(facts["median"])
    below, above = float(facts["below"]), float(facts["above"])
    if not (counts and all(map(math.isfinite, (lo, hi, median, below, above))) and hi > lo):
        raise ValueError("histogram facts out of range")
    bins = len(counts)
    left, right, top, bottom = 8, 8, 8, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = math.log10(max(max(counts), 1) + 1)
    bar_w = plot_w / bins
    rects = []
    for i, count in enumerate(counts):
        if count <= 0:
            continue
        h = plot_h * math.log10(count + 1) / peak
        rects.append(
            f'<rect x="{left + i * bar_w:.2f}" y="{top + plot_h - h:.2f}" '
            f'width="{max(bar_w - 0.3, 0.5):.2f}" height="{h:.2f}"/>'
        )
    mx = left + plot_w * (median - lo) / (hi - lo)
    label_y = height - 16
    # the median's label goes to the emptier half of the plot, away from its line
    label_x, label_anchor = (left + 4, "start") if mx > left + plot_w / 2 else (left + plot_w - 4, "end")
    note = []
    if below > 0:
        note.append(f"{_pct(below)} below")
    if above > 0:
        note.append(f"{_pct(above)} above")
    note_text = html.escape(", ".join(note) + " range" if note else "log counts")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="histogram of pixel values">'
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fafafa"/>'
        f'<g fill="#4a6fa5">{"".join(rects)}</g>'
        f'<line x1="{mx:.2f}" y1="{top}" x2="{mx:.2f}" y2="{top + plot_h}" stroke="#c0392b" '
        'stroke-width="1.2"/>'
        f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
        'stroke="#555" stroke-width="1"/>'
        f'<text x="{left}" y="{label_y}" font-size="11">{html.escape(_fmt(float(lo)))}</text>'
        f'<text x="{left + plot_w}" y="{label_y}" font-size="11" text-anchor="end">'
        f'{html.escape(_fmt(float(hi)))} {html.escape(unit)}</text>'
        f'<text x="{label_x:.2f}" y="{top + 11}" font-size="11" '
        f'text-anchor="{label_anchor}" fill="#c0392b">median {html.escape(_fmt(median))}</text>'
        f'<text x="{left + plot_w / 2:.2f}" y="{height - 3}" font-size="10" text-anchor="middle" '
        f'fill="#777">{note_text}</text>'
        "</svg>"
    )


# -- previews -------------------------------------------------------------------------------------
def _preview(data: np.ndarray, size: int, method: str) -> tuple[bytes, int, int]:
    small = downsample(data, size)
    shown = stretch(small, method)
    return png_bytes(shown, compress_level=PNG_LEVEL), small.shape[1], small.shape[0]


def _load(out_dir: Path, rel: str | None) -> tuple[np.ndarray | None, Any, str | None]:
    """The primary image of an output and its header, or ``None`` and the reason it cannot be shown."""
    if not rel:
        return None, None, "no output file recorded"
    path = Path(rel) if os.path.isabs(rel) else out_dir / rel
    if not path.exists():
        return None, None, f"{rel} is missing"
    try:
        data, header = read_image(path)
    except CcdcalError as exc:
        return None, None, f"{rel} cannot be read ({exc})"
    except Exception as exc:  # noqa: BLE001 - a broken output must not stop the report
        return None, None, f"{rel} cannot be read ({type(exc).__name__}: {exc})"
    return data, header, None


def _master_method(kind: str) -> str:
    # Flats show vignetting and dust best on a linear zscale; bias/dark structure and
    # hot pixels on the auto-STF.
    return "linear" if kind == "flat" else "autostf"


def _method_text(method: str) -> str:
    return {"linear": "linear, zscale limits", "autostf": "auto-STF (shadows −2.8σ, background 0.25)",
            "mtf": "midtone transfer", "mtf-rnc": "midtone + RNC S-curve ×2",
            "asinh": "asinh"}.get(method, method)


# -- assembling the page --------------------------------------------------------------------------
def _groups(inputs: list[Mapping[str, Any]], excluded: set[str]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for item in inputs:
        kind = str(item.get("kind") or "unknown")
        if kind not in KINDS:
            continue
        exptime, flt = item.get("exptime"), item.get("filter")
        if kind == "dark":
            key, title = (kind, exptime if _finite_number(exptime) else None), f"dark {_fmt_exptime(exptime)}"
        elif kind == "flat":
            key, title = (kind, flt), f"flat {flt if flt else '(no filter)'}"
        else:
            key, title = (kind,), "bias"
        order = (exptime if _finite_number(exptime) else -1.0, str(flt or ""))
        group = groups.setdefault(key, Group(title, kind, order=order))
        shape = item.get("shape")
        path = str(item.get("path") or "")
        group.rows.append(FrameRow(
            name=_display_name(path) + (f" [{item['hdu']}]" if item.get("hdu") else ""),
            path=path,
            hdu=item.get("hdu"),
            exptime=exptime,
            filter=flt,
            shape="×".join(str(v) for v in reversed(shape)) if shape else "—",
            metrics=dict(item["metrics"]) if isinstance(item.get("metrics"), Mapping) else None,
            flags=[str(f) for f in item.get("flags") or []],
            warnings=[str(w) for w in item.get("warnings") or []],
            excluded=path in excluded,
        ))
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(groups.values(), key=lambda g: (order[g.kind], g.order, g.title))


#: The report's frame statistics use a regular subsample of at most this many pixels: the
#: relative standard error of a std from N pixels is about 1/sqrt(2N) (0.14 % here), of a
#: median about 1.25 σ/sqrt(N) (0.0025 σ). Min and max are of the subsample.
STATS_PIXELS = 1 << 18


def _stats_dict(data: np.ndarray, max_pixels: int = STATS_PIXELS) -> dict[str, Any]:
    """Region statistics of the whole frame, on a regular subsample above ``max_pixels``."""
    return region_stats(_subsample(data, max_pixels)).to_dict()


def _masters(out_dir: Path, masters: Iterable[Mapping[str, Any]]) -> list[MasterCard]:
    cards = []
    for item in masters:
        kind = str(item.get("kind") or "?")
        output = str(item.get("output") or "")
        method = _master_method(kind)
        card = MasterCard(
            kind=kind,
            label=str(item.get("label") or _display_name(output)),
            output=output,
            description=str(item.get("description") or ""),
            members=[str(m) for m in item.get("members") or []],
            excluded=[str(m) for m in item.get("excluded") or []],
            method=_method_text(method),
            preview=Image(),
        )
        reasons = [str(r) for r in item.get("excluded_reasons") or []]
        card.excluded_reasons = reasons + [""] * (len(card.excluded) - len(reasons))
        rejection = out_dir / "previews" / f"rejection-{_safe_stem(output)}.png"
        if rejection.exists():
            png = rejection.read_bytes()
            from PIL import Image as PILImage

            with PILImage.open(rejection) as im:
                w, h = im.size
            card.rejection = Image(_data_uri(png), f"previews/{rejection.name}", w, h)
        made = made_master_previews(out_dir, output)
        if made is None:
            data, _, error = _load(out_dir, output)
            if data is None:
                card.preview.error = error
                cards.append(card)
                continue
            write_master_previews(out_dir, output, data, kind)
            made = made_master_previews(out_dir, output)
        card.preview, card.histogram_svg, card.stats, npix = made
        card.rejected = _member_rejections(out_dir / output, card.members, npix)
        cards.append(card)
    return cards


def write_master_previews(out_dir: Path, output: str, data: np.ndarray, kind: str) -> None:
    """The report's view of one master: ``previews/master-<stem>.png`` (stretched as
    :func:`_master_method` says for ``kind``) and ``previews/master-<stem>.json`` (its
    histogram, statistics on a regular subsample, sizes).

    ``reduce`` has these made while the lights are calibrated, from the master in memory, so
    building the report reads no master again; the report makes them itself when they are
    missing, older than the master or made from other data (see :func:`_fresh_facts`).
    """
    stem = _safe_stem(output)
    png, w, h = _preview(data, PREVIEW_SIZE, _master_method(kind))
    write_bytes(Path(out_dir) / "previews" / f"master-{stem}.png", png, durable=False)
    facts = {"output": output, "datasum": _datasum(out_dir, output), "size": [w, h], "npix": int(data.size),
             "png": _png_hash(png), "stats": _stats_dict(data),
             "histogram": histogram_facts(data), "unit": "" if kind == "flat" else "ADU"}
    write_text(Path(out_dir) / "previews" / f"master-{stem}.json", json.dumps(facts, default=float), durable=False)


def made_master_previews(out_dir: Path, output: str) -> tuple[Image, str, dict[str, Any], int] | None:
    """(preview, histogram SVG, statistics, pixels) that :func:`write_master_previews` left for
    ``output``, when they are there and at least as new as the master; else None."""
    stem = _safe_stem(output)
    try:
        facts = _fresh_facts(out_dir, output, f"master-{stem}")
        if facts is None:
            return None
        preview = _stored_image(out_dir, f"previews/master-{stem}.png", facts["size"], facts["png"])
        svg = render_histogram(facts["histogram"], unit=str(facts["unit"]))
        return preview, svg, dict(facts["stats"]), int(facts["npix"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fresh_facts(out_dir: Path, output: str, name: str) -> dict[str, Any] | None:
    """``previews/<name>.json`` when it is there, at least as new as ``output`` and made from
    its data (:func:`_newer`, :func:`_made_from`)."""
    facts_path = Path(out_dir) / "previews" / f"{name}.json"
    if not _newer(out_dir, output, facts_path):
        return None
    facts = json.loads(facts_path.read_text())
    return facts if _made_from(out_dir, output, facts) else None


def _newer(out_dir: Path, output: str, preview: Path) -> bool:
    """Whether the preview file is at least as new as ``output`` (relative to ``out_dir``, or
    absolute)."""
    target = Path(output) if os.path.isabs(output) else Path(out_dir) / output
    return bool(output) and preview.stat().st_mtime_ns >= target.stat().st_mtime_ns


def _made_from(out_dir: Path, output: str, facts: Mapping[str, Any], datasum: str | None = None) -> bool:
    """Whether a preview's ``facts`` were made from ``output``'s data: its name and its DATASUM
    (``datasum`` when the caller knows it, else read from the file): a file rebuilt within the
    file system's time resolution, 2 s on FAT, is not taken for the old one."""
    current = datasum if datasum is not None else _datasum(out_dir, output)
    return facts.get("output") == output and facts.get("datasum") == current


def _datasum(out_dir: Path, output: str) -> str:
    """:func:`ccdcal.io.frames.datasum_of` an output (relative to ``out_dir``, or absolute)."""
    return datasum_of(Path(output) if os.path.isabs(output) else Path(out_dir) / output)


def _stored_image(out_dir: Path, rel: str, size: Any, digest: str, *, inline: bool = True) -> Image:
    """A PNG the previews left in the output folder, inlined (or only linked), with its (width,
    height); a ValueError when its bytes are not those its JSON recorded (the previews are
    written without fsync: after a power cut one may be empty, or older than its JSON)."""
    payload = _checked_png(out_dir, rel, digest)
    w, h = size
    return Image(_data_uri(payload) if inline else None, rel, int(w), int(h))


def _checked_png(out_dir: Path, rel: str, digest: str) -> bytes:
    """The bytes of a preview PNG, a ValueError when they are not those its JSON recorded."""
    payload = (Path(out_dir) / rel).read_bytes()
    if _png_hash(payload) != digest:
        raise ValueError(f"{rel} is not the preview its statistics were made with")
    return payload


def _png_hash(payload: bytes) -> str:
    digest = new_digest()
    digest.update(payload)
    return digest.hexdigest()


def _member_rejections(path: Path, members: list[str], npix: int) -> list[tuple[str, int, int, str]]:
    """(member, values rejected low, high, % of its pixels) from a master's REJL/REJH keywords."""
    try:
        header = fits.getheader(path, 0)
    except (OSError, ValueError):
        return []
    rows = []
    for i, member in enumerate(members, start=1):
        low, high = header.get(f"REJL{i:03d}"), header.get(f"REJH{i:03d}")
        if isinstance(low, int) and isinstance(high, int):
            rows.append((member, low, high, f"{(low + high) / max(npix, 1):.3%}"))
    return rows


def _lights(out_dir: Path, lights: Iterable[Mapping[str, Any]],
            flags_by_path: Mapping[str, list[str]], outputs: Mapping[str, Any] | None = None, *,
            small: bool = False, written: Mapping[str, str]) -> list[LightCard]:
    cards = []
    for index, item in enumerate(lights):
        source = str(item.get("input") or "")
        output = str(item.get("output") or "")
        masters = []
        for key in ("bias", "dark", "flat"):
            name = item.get(key)
            if not name:
                continue
            text = f"{key} {_display_name(str(name))}"
            if key == "dark" and _finite_number(item.get("dark_scale")) and item["dark_scale"] != 1:
                text += f" ×{item['dark_scale']:.3g}"
            masters.append(text)
        notes = [str(n) for n in item.get("notes") or []]
        residual = ((outputs or {}).get(output) or {}).get("glow_residual")
        if _finite_number(residual):
            notes.append(f"the scaled dark left {residual:+.3g} ADU in its glow region (GLOWRES): a CMOS"
                         " dark does not scale with exposure; take darks of this exposure")
        card = LightCard(index=index, name=_display_name(output or source), output=output,
                         masters=masters, notes=notes,
                         flags=list(flags_by_path.get(source, [])), thumb=Image(), preview=Image())
        made = _made_light_previews(out_dir, output, small=small, datasum=written.get(output))
        if made is not None:
            card.preview, card.thumb, card.stats = made
            cards.append(card)
            continue
        data, header, error = _load(out_dir, output)
        if data is None:
            card.thumb.error = card.preview.error = error
        else:
            pattern = bayer_pattern(header, data.shape)[0] if header is not None else None
            write_light_previews(out_dir, output, data, pattern=pattern)
            del data
            card.preview, card.thumb, card.stats = _made_light_previews(out_dir, output, small=small)
        cards.append(card)
    return cards


def series_svg(values: Sequence[float], flagged: Sequence[bool], *, label: str, width: int = 760,
               height: int = 120) -> str:
    """A line plot of one statistic over the lights, in their order (an SVG, inline): flagged
    lights as orange dots; NaN left out."""
    pad = 30
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if ok.sum() < 2:
        return ""
    lo, hi = float(np.min(v[ok])), float(np.max(v[ok]))
    hi = hi if hi > lo else lo + 1.0
    n = len(v)

    def xy(i: int) -> tuple[float, float]:
        return (pad + (width - 2 * pad) * i / max(n - 1, 1),
                height - pad / 2 - (height - pad) * (v[i] - lo) / (hi - lo))

    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i) for i in range(n) if ok[i]))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#f59e0b"/>'
                   for x, y in (xy(i) for i in range(n) if ok[i] and flagged[i]))
    return (f'<svg class="series" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(label)}"><text x="{pad}" y="12" font-size="11">{html.escape(label)}: '
            f'{_fmt(lo)} to {_fmt(hi)}</text><polyline fill="none" stroke="#2563eb" stroke-width="1" '
            f'points="{points}"/>{dots}</svg>')


#: the ``tEXt`` key of a light preview's facts (its statistics, size, the output and DATASUM it
#: was made from, the table's JPEG thumbnail)
FACTS_KEY = "ccdcal"


def write_light_previews(out_dir: Path, output: str, data: np.ndarray, datasum: str | None = None,
                         pattern: str | None = None) -> None:
    """The report's view of one calibrated light, in one file: ``previews/light-<stem>.png``
    (auto-STF, at most :data:`PREVIEW_SIZE` px) holding in a text chunk (:data:`FACTS_KEY`) its
    statistics (on a regular subsample), its size, the output and DATASUM it was made from, and
    the large night table's thumbnail (a :data:`TABLE_THUMB` px JPEG). One file, not three: on
    a night of 800 lights each file made costs 0.3-1.3 ms of the file system's time. A colour
    (CFA) light, whose Bayer ``pattern`` is given, is shown in colour (each 2x2 cell's colours,
    each colour stretched on its own), never as a grey checkerboard.

    The light task calls this while the calibrated pixels are still in memory, so building the
    report reads no light again; the report makes it itself when it is missing, older than
    the output or made from other data (see :func:`_made_light_previews`). ``datasum``: the
    output's DATASUM, when the caller has it (else read from the file).
    """
    stem = _safe_stem(output)
    small = downsample(superpixel(data, pattern) if pattern else data, PREVIEW_SIZE)
    shown = stretch(small, "autostf")
    pixels = display_pixels(shown)
    facts = {"output": output, "datasum": datasum if datasum is not None else _datasum(out_dir, output),
             "size": [pixels.shape[1], pixels.shape[0]], "stats": _stats_dict(data),
             "table_thumb": _jpeg_thumb(shown)}
    if pattern:      # a colour light: its statistics per colour too (the cells of each filter)
        facts["stats"]["colours"] = colour_stats(data, pattern)
    png = png_with_text(png_of_pixels(pixels, compress_level=LIGHT_PNG_LEVEL), FACTS_KEY,
                        json.dumps(facts, default=float))
    write_bytes(Path(out_dir) / "previews" / f"light-{stem}.png", png, durable=False)


def light_facts(path: str | os.PathLike) -> dict[str, Any]:
    """What :func:`write_light_previews` recorded in a light preview (``previews/light-*.png``):
    ``output``, ``datasum``, ``size``, ``stats`` and ``table_thumb``; a ValueError when the file
    is not such a preview, whole."""
    return _facts_of(Path(path).read_bytes())


def _facts_of(png: bytes) -> dict[str, Any]:
    facts = json.loads(png_text(png, FACTS_KEY))
    if not isinstance(facts, dict):
        raise ValueError("a light preview's facts are not a JSON object")
    return facts


def _jpeg_thumb(shown: np.ndarray) -> list[Any]:
    """[data URI, width, height] of a :data:`TABLE_THUMB` px JPEG (2-4 KB) of a stretched preview,
    binned to size (:func:`~ccdcal.stretch.downsample`) and quantised as the PNG is."""
    from PIL import Image as Pil

    pixels = display_pixels(downsample(shown, TABLE_THUMB))
    image = Pil.fromarray(pixels, mode="RGB" if pixels.ndim == 3 else "L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=70)
    return ["data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"), image.width,
            image.height]


def colour_stats(data: np.ndarray, pattern: str) -> dict[str, dict[str, float]]:
    """Median and clipped standard deviation of a CFA frame's pixels of each colour (R, G, B)."""
    chan = channel_map(pattern)
    out = {}
    for c, name in enumerate("RGB"):
        cells = [data[dy::2, dx::2] for dy in (0, 1) for dx in (0, 1) if chan[dy, dx] == c]
        values = np.concatenate([_subsample(cell).ravel() for cell in cells])
        stats = region_stats(values.reshape(1, -1)).to_dict()
        out[name] = {"median": stats["median"], "clipped_std": stats["clipped_std"]}
    return out


def _subsample(data: np.ndarray, max_pixels: int = STATS_PIXELS // 4) -> np.ndarray:
    """Every k-th row and column of ``data``, k the smallest that keeps at most ``max_pixels``."""
    step = max(1, math.ceil(math.sqrt(data.size / max_pixels)))
    return data[::step, ::step] if step > 1 else data


def _made_light_previews(out_dir: Path, output: str, *, small: bool = False, datasum: str | None = None
                         ) -> tuple[Image, Image, dict[str, Any]] | None:
    """The preview, thumbnail and statistics :func:`write_light_previews` left for ``output``,
    when its file is there, whole, at least as new as the output and made from its data
    (the DATASUM recorded: a file rebuilt within the file system's time resolution, 2 s on
    FAT, is not taken for the old one); else None. ``small``: the thumbnail the small JPEG
    and the preview a link to its file (a large night's table); else both inline, the
    thumbnail (:data:`THUMB_SIZE` px) binned from the preview. ``datasum``: the output's, when
    the caller knows it (else read from the file)."""
    rel = f"previews/light-{_safe_stem(output)}.png"
    try:
        path = Path(out_dir) / rel
        if not _newer(out_dir, output, path):
            return None
        payload = path.read_bytes()
        facts = _facts_of(payload)
        if not _made_from(out_dir, output, facts, datasum):
            return None
        width, height = (int(v) for v in facts["size"])
        if small:
            uri, thumb_width, thumb_height = facts["table_thumb"]
            head, _, body = str(uri).partition(",")
            if head != "data:image/jpeg;base64":
                raise ValueError(f"{rel}: its thumbnail is not a JPEG")
            base64.b64decode(body, validate=True)      # nothing but base64 goes into the page
            preview = Image(None, rel, width, height)
            thumb = Image(str(uri), rel, int(thumb_width), int(thumb_height))
        else:
            preview = Image(_data_uri(payload), rel, width, height)
            thumb = _thumb(payload, rel)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return preview, thumb, dict(facts["stats"])


def _thumb(png: bytes, rel: str) -> Image:
    """A :data:`THUMB_SIZE` px thumbnail of a preview PNG (its pixels binned), inline; ``rel``
    the preview it links to."""
    from PIL import Image as Pil

    with Pil.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image)
    shown = pixels[::-1].astype(np.float32) / 255.0          # FITS row order again, [0, 1]
    if shown.ndim == 3:
        shown = np.moveaxis(shown, -1, 0)
    thumb = downsample(shown, THUMB_SIZE)
    return Image(_data_uri(png_bytes(thumb, compress_level=LIGHT_PNG_LEVEL)), rel, thumb.shape[-1], thumb.shape[-2])


def _stacks(out_dir: Path, outputs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The stacks of a ``--stack`` run: title, preview, frames table (from the manifest)."""
    stacks = []
    for rel, entry in sorted(outputs.items()):
        if not isinstance(entry, Mapping) or entry.get("kind") != "stack":
            continue
        preview = Image()
        png = Path(out_dir) / str(entry.get("preview") or "")
        if entry.get("preview") and png.is_file():
            from PIL import Image as PILImage

            with PILImage.open(png) as im:
                width, height = im.size
            preview = Image(_data_uri(png.read_bytes()), str(entry["preview"]), width, height)
        frames = [f for f in entry.get("frames") or [] if isinstance(f, Mapping)]
        stacks.append({"title": f"{entry.get('target') or ''} {entry.get('filter') or ''}".strip() or rel,
                       "output": rel, "preview": preview, "frames": frames,
                       "n_used": sum(1 for f in frames if f.get("used"))})
    return stacks


def _collect_warnings(manifest: Mapping[str, Any], excluded: set[str]) -> list[str]:
    warnings = [str(w) for w in manifest.get("warnings") or []]
    warnings += [str(w) for w in manifest.get("run_warnings") or [] if str(w) not in warnings]
    inputs = [i for i in manifest.get("inputs") or [] if isinstance(i, Mapping)]
    for item in inputs:
        path = str(item.get("path") or "")
        if item.get("flags") and str(item.get("kind")) in KINDS:
            fate = "excluded" if path in excluded else "kept"
            warnings.append(f"{_display_name(path)} flagged ({fate}): {'; '.join(map(str, item['flags']))}")
    for item in inputs:
        for w in item.get("warnings") or []:
            warnings.append(f"{_display_name(str(item.get('path') or ''))}: {w}")
    return warnings


def _parameters(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    params = manifest.get("parameters") or {}
    if not isinstance(params, Mapping):
        return [("parameters", json.dumps(params, default=str))]
    return [(str(k), v if isinstance(v, str) else json.dumps(v, default=str))
            for k, v in params.items()]


def render_report(context: Mapping[str, Any]) -> str:
    """The report page from its context (see :func:`build_report`), via the Jinja2 template."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("ccdcal.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _fmt
    env.filters["pct"] = _pct
    env.filters["exptime"] = _fmt_exptime
    env.filters["name"] = _display_name
    return env.get_template("report.html.j2").render(**context)


def load_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``OUT/manifest.json`` as a dict.

    Raises
    ------
    InputError
        If the file is missing or not JSON.
    """
    path = Path(out_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{path}: no manifest; run 'ccdcal reduce ... -o {out_dir}' first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable manifest ({exc}); rerun 'ccdcal reduce'") from exc


def build_report(out_dir: str | os.PathLike, manifest: Mapping[str, Any] | None = None, *,
                 lock: bool = True, written: Mapping[str, str] | None = None) -> Path:
    """Write ``OUT/previews/*.png`` and the self-contained ``OUT/report.html``.

    Parameters
    ----------
    out_dir : path-like
        The reduction's output folder; relative paths in the manifest are relative to it.
    manifest : dict, optional
        The reduction manifest (schema in the pipeline); read from ``OUT/manifest.json``
        when omitted.
    lock : bool
        Hold the output folder's lock (:func:`ccdcal.io.guard.output_lock`) while writing; False
        only for a caller that holds it already (``reduce``).
    written : mapping, optional
        ``output -> DATASUM`` of outputs the caller wrote under the lock it holds (``reduce``'s
        lights): their previews are checked against these, not against their files read again
        (on a night of 800 lights, 800 files the writer had dropped from the page cache).

    Returns
    -------
    Path
        The report file.

    Notes
    -----
    Missing pieces (no lights, no flats, an output file that is gone or unreadable) are
    stated in the page instead of stopping the report. Masters are previewed with the
    auto-STF (bias, dark) or a zscale linear stretch (flats), lights with the auto-STF;
    previews are block-averaged to at most 800 px, thumbnails to 200 px.
    """
    out_dir = Path(out_dir)
    if lock:
        if not (out_dir / "manifest.json").exists() and manifest is None:
            load_manifest(out_dir)      # its one-line error, before a lock file is made
        with output_lock(out_dir):
            manifest = manifest if manifest is not None else load_manifest(out_dir)
            inputs = [str(i.get("path")) for i in manifest.get("inputs") or [] if isinstance(i, Mapping)]
            # OUT/previews a link into a folder of raws: the report would write beside them
            refuse_overwrite(inputs, folders=[out_dir, out_dir / "previews"])
            return build_report(out_dir, manifest, lock=False, written=written)
    if manifest is None:
        manifest = load_manifest(out_dir)
    inputs = [i for i in manifest.get("inputs") or [] if isinstance(i, Mapping)]
    masters_in = [m for m in manifest.get("masters") or [] if isinstance(m, Mapping)]
    lights_in = [x for x in manifest.get("lights") or [] if isinstance(x, Mapping)]
    excluded = {str(p) for m in masters_in for p in m.get("excluded") or []}
    flags_by_path = {str(i.get("path")): [str(f) for f in i.get("flags") or []] for i in inputs}

    groups = _groups(inputs, excluded)
    masters = _masters(out_dir, masters_in)
    large = len(lights_in) > LARGE_NIGHT
    lights = _lights(out_dir, lights_in, flags_by_path, manifest.get("outputs") or {}, small=large,
                     written=written or {})
    plots = []
    if large:   # the statistics over the night, then the table: flagged lights first
        flagged = [bool(c.flags) for c in lights]
        for key, label in (("median", "median level"), ("clipped_std", "noise (clipped std)")):
            plots.append(series_svg([_number((c.stats or {}).get(key)) for c in lights], flagged, label=label))
        lights = sorted(lights, key=lambda c: (not c.flags, c.index))
    counts: dict[str, int] = {}
    for item in inputs:
        kind = str(item.get("kind") or "unknown")
        counts[kind] = counts.get(kind, 0) + 1
    unknown = [i for i in inputs if str(i.get("kind") or "unknown") not in (*KINDS, "light")]
    context = {
        "title": f"ccdcal report — {out_dir.resolve().parent.name}/{out_dir.resolve().name}",
        "version": manifest.get("ccdcal_version", "?"),
        "created": manifest.get("created", "?"),
        "counts": counts,
        "n_inputs": len(inputs),
        "n_flagged": sum(g.n_flagged for g in groups),
        "n_excluded": len(excluded),
        "plan_text": str(manifest.get("plan_text") or ""),
        "groups": groups,
        "masters": masters,
        "lights": lights,
        "large": large,
        "plots": [p for p in plots if p],
        "stacks": _stacks(out_dir, manifest.get("outputs") or {}),
        "unknown": unknown,
        "skipped": [s for s in manifest.get("skipped") or [] if isinstance(s, Mapping)],
        "warnings": _collect_warnings(manifest, excluded),
        "parameters": _parameters(manifest),
        "preview_size": PREVIEW_SIZE,
    }
    page = render_report(context)
    return write_text(out_dir / "report.html", page)
