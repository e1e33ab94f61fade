"""The report reads no light or master the tasks previewed, and its previews are a verified cache
(from the whole-night suite of issue 12)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest


def test_the_report_reads_no_light_or_master_the_tasks_previewed(tmp_path, monkeypatch):
    """The light tasks leave each light's previews, and the masters' previews are made beside
    them from the masters in memory: the report reads no output back. Removed, the report makes
    them itself from the files, the same (JSON and PNG) and the same page."""
    import json
    import re

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module
    from ccdcal.report.page import light_facts

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2)
    out = tmp_path / "out"
    loaded = []
    original = report_module._load
    monkeypatch.setattr(report_module, "_load", lambda d, rel: (loaded.append(str(rel)), original(d, rel))[1])
    result = reduce([raw], out, options=ReduceOptions())
    assert not loaded
    made = sorted((out / "previews").glob("light-*.png"))
    assert len(made) == len(result.lights) > 0
    made_masters = sorted((out / "previews").glob("master-*.json"))
    assert len(made_masters) == len(result.masters) > 0
    by_task = {p.name: p.read_bytes() for p in [*made, *made_masters]}
    facts = {p.name: light_facts(p) for p in made}
    pngs = {p.name: p.read_bytes() for p in (out / "previews").glob("*.png")}

    def page():   # the report without its folder and time line
        return re.sub(r'<div class="meta">[^<]*</div>', "", (out / "report.html").read_text())

    first = page()
    reduce([raw], out, options=ReduceOptions())          # everything up to date: only the report is rebuilt
    assert not loaded and page() == first

    for p in [*made, *made_masters]:                     # gone: the report makes them itself, the same
        p.unlink()
    report_module.build_report(out)
    assert len([rel for rel in loaded if "calibrated" in rel]) == len(made)
    assert len([rel for rel in loaded if "masters" in rel]) == len(made_masters)
    for p in made_masters:
        assert json.loads(p.read_bytes()) == json.loads(by_task[p.name]), p.name
    for p in made:
        assert light_facts(p) == facts[p.name], p.name
    assert {p.name: p.read_bytes() for p in (out / "previews").glob("*.png")} == pngs
    assert page() == first


def test_a_master_preview_that_fails_in_its_task_stops_nothing(tmp_path, monkeypatch):
    """A preview task that raises (here: any not on the main thread) leaves the run whole: every
    light in the manifest, and the report makes the masters' previews itself."""
    import json
    import threading

    from ccdcal.demo import write_night
    from ccdcal.pipeline import tasks as tasks_module
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    original = report_module.write_master_previews
    failed = []

    def only_on_the_main_thread(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            failed.append(args[1])
            raise MemoryError("no room for a preview")
        return original(*args, **kwargs)

    monkeypatch.setattr(report_module, "write_master_previews", only_on_the_main_thread)
    monkeypatch.setattr(tasks_module, "write_master_previews", only_on_the_main_thread)   # the tasks' name
    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2)
    out = tmp_path / "out"
    result = reduce([raw], out, options=ReduceOptions())
    assert sorted(failed) == sorted(result.masters)
    manifest = json.loads((out / "manifest.json").read_text())
    lights = [rel for rel, entry in manifest["outputs"].items() if entry["kind"] == "light"]
    assert sorted(lights) == sorted(result.lights) and len(lights) > 0
    assert len(list((out / "previews").glob("master-*.json"))) == len(result.masters) > 0


def test_previews_left_damaged_by_a_power_cut_are_made_again(tmp_path, monkeypatch):
    """The previews are a cache written without fsync; after a power cut a PNG may be empty or
    older than its JSON. The report checks each PNG against the hash its JSON recorded: the
    damaged ones (emptied, or another preview's bytes) are made again from the outputs, the same
    bytes as before; the intact ones are taken as they are."""
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2, n_light=2)
    out = tmp_path / "out"
    reduce([raw], out, options=ReduceOptions())
    previews = out / "previews"
    pngs = {p.name: p.read_bytes() for p in previews.glob("*.png")}
    lights = sorted(previews.glob("light-*.png"))
    masters = sorted(previews.glob("master-*.png"))
    assert len(lights) >= 2 and masters
    lights[0].write_bytes(b"")                                   # emptied
    masters[0].write_bytes(pngs[lights[1].name])                 # another PNG in its place
    loaded = []
    original = report_module._load
    monkeypatch.setattr(report_module, "_load", lambda d, rel: (loaded.append(str(rel)), original(d, rel))[1])
    report_module.build_report(out)
    assert len(loaded) == 2                                     # those two outputs, nothing else
    assert {p.name: p.read_bytes() for p in previews.glob("*.png")} == pngs


def test_light_statistics_of_the_report_are_within_the_precision_of_their_subsample(tmp_path):
    """The report's light statistics come from a 2^18-pixel regular subsample; against
    numpy's statistics of every pixel they are as close as report.STATS_PIXELS states
    (median to ~0.0025 σ, std to ~0.14 %: bounds at about 4x those)."""

    from astropy.stats import sigma_clipped_stats

    from ccdcal.report.page import STATS_PIXELS, light_facts, write_light_previews

    rng = np.random.default_rng(12)
    shape = (2048, 2048)
    sky, sigma = 800.0, 30.0
    data = rng.normal(sky, sigma, shape).astype(np.float32)
    y, x = rng.integers(10, 2038, (2, 300))
    for yy, xx in zip(y, x, strict=True):                 # stars: a tail the clipping must remove
        data[yy - 2:yy + 3, xx - 2:xx + 3] += rng.uniform(200, 20000)
    write_light_previews(tmp_path, "calibrated/light.fits", data, datasum="0")
    stats = light_facts(tmp_path / "previews" / "light-light.png")["stats"]
    assert STATS_PIXELS <= stats["npix"] < 1.1 * STATS_PIXELS
    _, median, std = sigma_clipped_stats(data, sigma=3.0, maxiters=5)
    assert abs(stats["clipped_median"] - median) < 0.01 * sigma
    assert abs(stats["median"] - np.median(data)) < 0.01 * sigma
    assert abs(stats["clipped_std"] / std - 1) < 0.006


def test_previews_of_an_output_rebuilt_within_the_timestamp_resolution_are_made_again(tmp_path, monkeypatch):
    """A master rewritten with other data but the same modification time (a FAT disk keeps
    2 s) is not taken for the old one: its DATASUM differs from the one its previews recorded,
    so the report makes them again from the new file."""
    import json

    from astropy.io import fits

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    raw = tmp_path / "raw"
    write_night(raw, size=96, seed=2)
    out = tmp_path / "out"
    result = reduce([raw], out, options=ReduceOptions())
    rel = next(m for m in result.masters if "bias" in m)
    path = out / rel
    facts_path = out / "previews" / f"master-{report_module._safe_stem(rel)}.json"
    before = json.loads(facts_path.read_text())
    stamp = path.stat().st_mtime_ns
    with fits.open(path) as hdul:
        hdul[0].data = hdul[0].data + np.float32(7.0)      # other data, same shape and size
        hdul.writeto(path, overwrite=True, checksum=True)
    os.utime(path, ns=(stamp, stamp))                      # and the old time
    assert facts_path.stat().st_mtime_ns >= path.stat().st_mtime_ns
    loaded = []
    original = report_module._load
    monkeypatch.setattr(report_module, "_load", lambda d, r: (loaded.append(str(r)), original(d, r))[1])
    report_module.build_report(out)
    assert loaded == [rel]
    after = json.loads(facts_path.read_text())
    assert after["datasum"] == str(fits.getheader(path)["DATASUM"]) != before["datasum"]
    assert after["stats"]["median"] == pytest.approx(before["stats"]["median"] + 7.0, abs=1e-3)


def test_a_tampered_light_thumbnail_never_reaches_the_page(tmp_path):
    """A light preview whose recorded thumbnail is not a base64 JPEG is made again from the
    output, not put into the page."""
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report.page import FACTS_KEY, build_report, light_facts
    from ccdcal.stretch import png_with_text

    write_night(tmp_path / "raw", size=96, seed=3, n_light=31)    # a large night: the table's thumbnails
    out = tmp_path / "out"
    reduce([tmp_path / "raw"], out, options=ReduceOptions())
    preview = sorted((out / "previews").glob("light-*.png"))[0]
    facts = light_facts(preview)
    honest = facts["table_thumb"][0]
    facts["stats"]["median"] = "<b>not a number</b>"             # a report still, the text escaped
    preview_bytes = preview.read_bytes()
    cut = preview_bytes.index(b"tEXt") - 4
    end = cut + 12 + int.from_bytes(preview_bytes[cut:cut + 4], "big")
    preview.write_bytes(png_with_text(preview_bytes[:cut] + preview_bytes[end:], FACTS_KEY, json.dumps(facts)))
    assert "<b>not a number</b>" not in build_report(out).read_text()
    facts = light_facts(preview)
    for bad in ('javascript:alert(1)', 'data:image/jpeg;base64,AAAA"><script>alert(1)</script>'):
        facts["table_thumb"][0] = bad
        png = preview.read_bytes()
        cut = png.index(b"tEXt") - 4                               # the old text chunk dropped
        end = cut + 12 + int.from_bytes(png[cut:cut + 4], "big")
        preview.write_bytes(png_with_text(png[:cut] + png[end:], FACTS_KEY, json.dumps(facts)))
        text = build_report(out).read_text()
        assert "alert(1)" not in text and honest in text
        assert light_facts(preview)["table_thumb"][0] == honest   # made again from the output


def test_the_runs_report_checks_its_lights_previews_by_the_datasums_it_wrote(tmp_path, monkeypatch):
    """reduce's own report reads no light's DATASUM back (it knows what it wrote); a report made
    later reads each file's, and a preview whose recorded DATASUM is not the file's is made again."""
    from astropy.io import fits

    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce
    from ccdcal.report import page as report_module

    write_night(tmp_path / "raw", size=96, seed=2, n_light=2)
    out = tmp_path / "out"
    read = []
    original = report_module._datasum
    monkeypatch.setattr(report_module, "_datasum", lambda d, rel: (read.append(str(rel)), original(d, rel))[1])
    result = reduce([tmp_path / "raw"], out, options=ReduceOptions())
    assert result.lights and not [rel for rel in read if rel.startswith("calibrated/")]
    for rel in result.lights:       # what the run recorded is the file's DATASUM
        facts = report_module.light_facts(out / "previews" / f"light-{report_module._safe_stem(rel)}.png")
        assert facts["datasum"] == str(fits.getheader(out / rel)["DATASUM"])
    read.clear()
    report_module.build_report(out)
    assert sorted(rel for rel in read if rel.startswith("calibrated/")) == sorted(result.lights)
