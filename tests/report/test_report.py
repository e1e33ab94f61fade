"""The HTML report parses, every image in it decodes, every master and light is in it."""

from __future__ import annotations

import base64
import io
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ccdcal.errors import InputError
from ccdcal.io.writer import write_fits
from ccdcal.qa.stats import frame_metrics
from ccdcal.report.page import build_report, histogram_svg, light_facts

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Page(HTMLParser):
    """Collects images, links and ids, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.images: list[dict[str, str]] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.svgs = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            if attrs["id"] in self.ids:
                self.errors.append(f"duplicate id {attrs['id']}")
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs)
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag == "svg":
            self.svgs += 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):  # <rect .../> inside SVG
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.errors == []
    assert page.stack == []
    return page


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,"), uri[:40]
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    image.load()
    return image


def _frame(rng, level, noise, shape=(96, 128)):
    return rng.normal(level, noise, shape).astype(np.float32)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A small reduction output: 5 biases (one flagged and excluded), 3 flats, 2 lights, 1 missing."""
    rng = np.random.default_rng(11)
    out = tmp_path / "out"
    raw = tmp_path / "raw"
    inputs = []
    for i in range(5):
        data = _frame(rng, 1000 + (60 if i == 4 else 0), 7)
        inputs.append({"path": str(raw / f"bias_{i}.fits"), "hdu": 0, "kind": "bias", "filter": None,
                       "exptime": 0.0, "shape": [96, 128], "warnings": [], "metrics": frame_metrics(data),
                       "flags": ["level 1060 ADU vs group 1000 (+60.0 ADU, robust z=+171)"] if i == 4 else []})
    for i, level in enumerate((20000, 24000, 28000)):
        inputs.append({"path": str(raw / f"flat_V_{i}.fits"), "hdu": 0, "kind": "flat", "filter": "V",
                       "exptime": 3.0, "shape": [96, 128], "flags": [], "warnings": [],
                       "metrics": frame_metrics(_frame(rng, level, 200))})
    inputs.append({"path": str(raw / "dark_60.fits"), "hdu": 0, "kind": "dark", "filter": None,
                   "exptime": 60.0, "shape": [96, 128], "flags": [], "warnings": [], "metrics": None})
    for name in ("m51_1", "m51_2", "m51_gone"):
        inputs.append({"path": str(raw / f"{name}.fits"), "hdu": 0, "kind": "light", "filter": "V",
                       "exptime": 120.0, "shape": [96, 128], "flags": [], "metrics": None,
                       "warnings": ["no DATE-OBS; <order> unknown"] if name == "m51_1" else []})
    inputs.append({"path": str(raw / "focus.fits"), "hdu": 0, "kind": "unknown", "filter": None,
                   "exptime": None, "shape": [96, 128], "flags": [], "warnings": ["IMAGETYP 'focus'"],
                   "metrics": None})

    write_fits(out / "masters" / "master_bias.fits", _frame(rng, 1000, 1.5))
    flat = (1 - 0.1 * np.linspace(-1, 1, 128)[None, :] ** 2) * np.ones((96, 1))
    write_fits(out / "masters" / "master_flat_V.fits", flat.astype(np.float32),
               uncertainty=np.full((96, 128), 0.01, np.float32), mask=np.zeros((96, 128), np.uint8))
    y, x = np.mgrid[0:96, 0:128]
    galaxy = 500 * np.exp(-(((x - 64) / 12) ** 2 + ((y - 48) / 6) ** 2))
    for name in ("m51_1", "m51_2"):
        write_fits(out / "calibrated" / f"{name}.fits", (_frame(rng, 100, 5) + galaxy).astype(np.float32))

    manifest = {
        "ccdcal_version": "0.1.0", "created": "2024-05-13T04:00:00+0000",
        "parameters": {"combine_method": "median", "sigma_clip": [3.0, 3.0], "report": True},
        "inputs": inputs,
        "masters": [
            {"kind": "bias", "label": "1x1 96x128", "output": "masters/master_bias.fits",
             "members": [i["path"] for i in inputs[:4]], "excluded": [inputs[4]["path"]],
             "description": "median of 4 frames"},
            {"kind": "flat", "label": "V", "output": "masters/master_flat_V.fits",
             "members": [i["path"] for i in inputs[5:8]], "excluded": [], "description": "scaled by median"},
            {"kind": "dark", "label": "60 s", "output": "masters/master_dark_60s.fits",
             "members": [inputs[8]["path"]], "excluded": [], "description": "bias-subtracted"},
        ],
        "lights": [
            {"input": str(raw / f"{name}.fits"), "output": f"calibrated/{name}.fits",
             "bias": "masters/master_bias.fits", "dark": None, "dark_scale": None,
             "flat": "masters/master_flat_V.fits", "notes": ["no dark for 120 s"]}
            for name in ("m51_1", "m51_2", "m51_gone")
        ],
        "skipped": [{"path": str(raw / "broken.fits"), "reason": "not a readable FITS file"}],
        "warnings": ["1 of 5 bias frames flagged and excluded"],
        "plan_text": "master bias   1×1  128×96   4 frames   median\nlight m51_1.fits  ← bias, flat V",
    }
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def test_report_parses_and_every_image_decodes(out_dir):
    report = build_report(out_dir)
    assert report == out_dir / "report.html"
    page = _parse(report)
    assert len(page.images) == 2 + 2 * 2  # 2 master previews, 2 thumbnails + 2 large views
    for attrs in page.images:
        image = _decode(attrs["src"])
        assert image.size == (int(attrs["width"]), int(attrs["height"]))
        assert attrs.get("alt")
    assert page.svgs == 2  # one histogram per readable master


def test_report_is_self_contained(out_dir):
    text = build_report(out_dir).read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert "<script" not in text and "@import" not in text and "url(" not in text


def test_every_master_and_light_is_in_the_report(out_dir):
    page = _parse(build_report(out_dir))
    text = " ".join(page.text)
    for name in ("master_bias.fits", "master_flat_V.fits", "master_dark_60s.fits"):
        assert name in text
    for name in ("m51_1.fits", "m51_2.fits", "m51_gone.fits"):
        assert name in text
    assert "calibrated/m51_gone.fits is missing" in text
    assert "masters/master_dark_60s.fits is missing" in text
    # thumbnails link to a larger view that exists in the page
    internal = [link[1:] for link in page.links if link.startswith("#light-")]
    assert len(internal) == 2 and all(i in page.ids for i in internal)


def test_previews_are_written_as_files(out_dir):
    build_report(out_dir)
    names = sorted(p.name for p in (out_dir / "previews").iterdir())
    # a light's preview is one file: its statistics and thumbnail ride in the PNG
    assert names == ["light-m51_1.png", "light-m51_2.png", "master-master_bias.json", "master-master_bias.png",
                     "master-master_flat_V.json", "master-master_flat_V.png"]
    for path in (out_dir / "previews").glob("*.png"):
        with Image.open(path) as image:
            assert max(image.size) <= 800
            if path.name.startswith("light-"):
                facts = light_facts(path)
                assert facts["output"] == f"calibrated/{path.stem.removeprefix('light-')}.fits"
                assert list(image.size) == facts["size"] and facts["stats"]["npix"] > 0
                assert image.text["ccdcal"]          # a PNG text chunk any reader sees
    assert not list(out_dir.rglob("*.partial"))


def test_flagged_frames_are_highlighted_and_warnings_listed(out_dir):
    text = build_report(out_dir).read_text(encoding="utf-8")
    flagged_rows = re.findall(r'<tr class="flagged">(.*?)</tr>', text, flags=re.S)
    assert len(flagged_rows) == 1 and "bias_4.fits" in flagged_rows[0]
    assert "robust z=+171" in flagged_rows[0] and "excluded" in flagged_rows[0]
    assert "1 of 5 bias frames flagged and excluded" in text
    assert "bias_4.fits flagged (excluded): level 1060 ADU" in text
    assert "not a readable FITS file" in text
    assert "&lt;order&gt; unknown" in text  # escaped, not markup
    assert "IMAGETYP &#39;focus&#39;" in text or "IMAGETYP &#x27;focus&#x27;" in text


def test_report_with_nothing_but_a_manifest(tmp_path):
    manifest = {"ccdcal_version": "0.1.0", "created": "now", "parameters": {}, "inputs": [],
                "masters": [], "lights": [], "skipped": [], "warnings": [], "plan_text": ""}
    page = _parse(build_report(tmp_path, manifest))
    text = " ".join(page.text)
    assert "No master frames were built." in text and "No lights were calibrated." in text
    assert "No bias, dark or flat frames" in text


def test_missing_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        build_report(tmp_path)


def test_histogram_svg_is_well_formed():
    data = np.random.default_rng(1).normal(1000, 7, (50, 50))
    data[0, 0] = 65535
    root = ET.fromstring(histogram_svg(data))
    assert root.tag.endswith("svg") and len(root.findall(".//{http://www.w3.org/2000/svg}rect")) > 10
    ET.fromstring(histogram_svg(np.full((4, 4), np.nan)))
    ET.fromstring(histogram_svg(np.full((4, 4), 3.0)))


def test_cli_report_rebuilds_the_page(out_dir, capsys):
    from ccdcal.cli import main

    assert main(["report", str(out_dir)]) == 0
    assert (out_dir / "report.html").is_file()
    assert "report:" in capsys.readouterr().out
    assert main(["report", str(out_dir / "nowhere")]) == 2


def test_a_large_night_is_one_table_with_small_thumbnails_and_plots(out_dir, monkeypatch):
    """Beyond LARGE_NIGHT lights (issue 31): one sortable, filterable table, flagged lights first,
    each thumbnail a small inlined JPEG, each preview a link to its file (not inlined), and plots of
    the lights' statistics; a light that is gone still says why."""
    from ccdcal.report import page

    monkeypatch.setattr(page, "LARGE_NIGHT", 2)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["inputs"] = [dict(i, flags=["cloudy: 3 stars vs 40 typical"]) if i["path"].endswith("m51_2.fits")
                          else i for i in manifest["inputs"]]
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    text = build_report(out_dir).read_text()
    assert 'id="lights-table"' in text and 'id="light-filter"' in text and text.count('class="series"') == 2
    rows = text[text.index('id="lights-table"'):text.index("</table>", text.index('id="lights-table"'))]
    assert rows.index("m51_2") < rows.index("m51_1")                   # the flagged light first
    assert rows.count("data:image/jpeg;base64,") == 2 and "data:image/png" not in rows
    assert rows.count('href="previews/light-') == 2 and "m51_gone" in rows   # the missing one listed too
    assert 'class="lightbox"' not in text                              # no inlined large previews
