"""Header dialects of real nights from other observatories: values are evidence, not truth.

Placeholders (DATAMAX = 0, CCDTEMP = -99), a DARKTIME that is a shutter-open time, sections
written in another convention, frames that say they were already calibrated, biases typed
DARK with a short exposure; the scan table at 80 columns; headers written without astropy's
"comment will be truncated" warning.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

from ccdcal.planning.inventory import FrameKind, scan
from ccdcal.qa.stats import frame_metrics, saturation_problem


def write(folder: Path, name: str, *, shape: tuple[int, int] = (64, 64), level: float = 1000.0,
          seed: int = 0, **cards) -> Path:
    """A uint16 frame (BITPIX 16 + BZERO 32768, as cameras write) with the given header cards."""
    rng = np.random.default_rng(seed)
    data = np.clip(rng.normal(level, 5.0, shape), 0, 65535).astype(np.uint16)
    header = fits.Header()
    for key, value in cards.items():
        header[key.replace("_", "-") if key in ("CCD_TEMP", "SET_TEMP") else key] = value
    path = folder / name
    fits.writeto(path, data, header)
    return path


def only(folder: Path, *, flag: bool = False):
    inv = scan([folder], flag=flag)
    assert len(inv.frames) == 1, inv.skipped
    return inv.frames[0]


def has(info, *words: str) -> bool:
    return any(all(w in text for w in words) for text in info.warnings)


# -- saturation placeholders ----------------------------------------------------------------------
def test_datamax_zero_is_a_placeholder_and_flags_no_saturation(tmp_path):
    for i in range(3):
        write(tmp_path, f"bias_{i:03d}.fits", seed=i, IMAGETYP="Bias Frame", EXPTIME=0.0, DATAMAX=0.0)
    inv = scan([tmp_path], flag=True)
    assert len(inv.frames) == 3
    for info in inv.frames:
        assert info.saturate is None
        assert "DATAMAX = 0 is a placeholder (not a positive number): ignored" in info.warnings
        assert not any("saturated" in f for f in info.flags), info.flags
        assert info.metrics["saturated_frac"] == 0.0
        assert info.metrics["saturation"] == pytest.approx(0.999 * 65535)


def test_saturate_below_the_frame_median_is_dropped_once_pixels_are_read(tmp_path):
    write(tmp_path, "flat_V_001.fits", level=20000.0, IMAGETYP="Flat Field", EXPTIME=3.0, FILTER="V",
          SATURATE=1000.0)
    assert only(tmp_path).saturate == 1000.0  # the header alone cannot tell
    info = only(tmp_path, flag=True)
    assert info.saturate is None
    assert has(info, "saturation level 1000 ADU", "below the frame's median level", "ignored")
    assert not any("saturated" in f for f in info.flags), info.flags


def test_a_later_saturation_keyword_is_used_when_the_first_is_a_placeholder(tmp_path):
    write(tmp_path, "light_001.fits", IMAGETYP="Light Frame", EXPTIME=30.0, SATURATE=-1, DATAMAX=60000)
    info = only(tmp_path)
    assert info.saturate == 60000.0
    assert has(info, "SATURATE = -1 is a placeholder")


def test_saturation_sanity_rule_and_metrics():
    assert saturation_problem(None) is None
    assert saturation_problem(65535.0, 1000.0) is None
    assert saturation_problem(0.0) and saturation_problem(-5.0) and saturation_problem(float("nan"))
    assert "median" in saturation_problem(500.0, 1000.0)
    data = np.full((32, 32), 1000.0, np.float32)
    m = frame_metrics(data, saturation=0.0, adc_maximum=65535.0)
    assert m["saturated_frac"] == 0.0 and m["saturation"] == pytest.approx(0.999 * 65535)
    assert frame_metrics(data, saturation=800.0)["saturated_frac"] == 0.0  # below the median
    assert frame_metrics(data, saturation=1000.0)["saturated_frac"] == 1.0  # a real, saturated frame


# -- temperatures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,text", [
    ("CCDTEMP", -99, "CCDTEMP = -99 is a placeholder (unknown): ignored"),
    ("CCD_TEMP", -999.0, "CCD-TEMP = -999 is a placeholder (unknown): ignored"),
    ("CCD_TEMP", -100.0, "CCD-TEMP = -100 is a placeholder (unknown): ignored"),
    ("CCD_TEMP", 120.0, "CCD-TEMP = 120 is outside -150..+80 °C"),
    ("CCD_TEMP", -273.15, "CCD-TEMP = -273.15 is outside"),
])
def test_placeholder_temperatures_are_ignored(tmp_path, key, value, text):
    write(tmp_path, "dark_001.fits", IMAGETYP="DARK", EXPTIME=60.0, **{key: value})
    info = only(tmp_path)
    assert info.ccd_temp is None
    assert has(info, text), info.warnings


def test_set_point_placeholder_and_a_real_ln2_temperature(tmp_path):
    write(tmp_path, "dark_001.fits", IMAGETYP="DARK", EXPTIME=60.0, CCD_TEMP=-108.8, SET_TEMP=-999)
    info = only(tmp_path)
    assert info.ccd_temp == pytest.approx(-108.8)  # a liquid-nitrogen camera (Lick Nickel)
    assert info.set_temp is None
    assert has(info, "SET-TEMP = -999 is a placeholder")


def test_next_temperature_keyword_is_used_after_a_placeholder(tmp_path):
    write(tmp_path, "dark_001.fits", IMAGETYP="DARK", EXPTIME=60.0, CCD_TEMP=-99, CCDTEMP=-20.5)
    info = only(tmp_path)
    assert info.ccd_temp == -20.5
    assert has(info, "CCD-TEMP = -99 is a placeholder")


# -- exposure and dark times ----------------------------------------------------------------------
def test_darktime_shorter_than_exptime_is_ignored(tmp_path):
    write(tmp_path, "light_001.fits", IMAGETYP="Light Frame", EXPTIME=90.0, DARKTIME=19.5)
    info = only(tmp_path)
    assert info.exptime == 90.0
    assert info.darktime is None
    assert has(info, "DARKTIME = 19.5 s is shorter than EXPTIME = 90 s", "ignored")


def test_darktime_longer_than_exptime_is_kept(tmp_path):
    write(tmp_path, "light_001.fits", IMAGETYP="Light Frame", EXPTIME=90.0, DARKTIME=92.3)
    info = only(tmp_path)
    assert info.darktime == 92.3
    assert not has(info, "DARKTIME")


@pytest.mark.parametrize("cards,exptime,darktime", [
    ({"EXPTIME": -1.0}, None, None),
    ({"EXPTIME": 30.0, "DARKTIME": -5.0}, 30.0, None),
    ({"EXPTIME": -1.0, "EXPOSURE": 30.0}, 30.0, None),
])
def test_negative_times_are_ignored(tmp_path, cards, exptime, darktime):
    write(tmp_path, "light_001.fits", IMAGETYP="Light Frame", **cards)
    info = only(tmp_path)
    assert info.exptime == exptime and info.darktime == darktime
    assert has(info, "-", "ignored")
    if exptime is None:
        assert has(info, "no exposure time")


# -- sections -------------------------------------------------------------------------------------
def test_foreign_section_syntax_is_ignored_with_one_clear_warning_each(tmp_path):
    write(tmp_path, "light_001.fits", shape=(1024, 1024), IMAGETYP="Light Frame", EXPTIME=60.0,
          BIASSEC="[0,513:0,1536]", DATASEC="[513,513:1536,1536]")
    info = only(tmp_path)
    assert info.biassec is None and info.trimsec is None
    assert ("BIASSEC '[0,513:0,1536]' is not a FITS section [x1:x2,y1:y2] of this 1024x1024 image"
            " (written in another convention?): ignored") in info.warnings
    assert has(info, "DATASEC '[513,513:1536,1536]' is not a FITS section", "1024x1024", "ignored")
    assert sum("SEC" in w for w in info.warnings) == 2


def test_sections_beyond_the_array_are_ignored_and_good_ones_kept(tmp_path):
    write(tmp_path, "light_001.fits", shape=(1024, 1024), IMAGETYP="Light Frame", EXPTIME=60.0,
          BIASSEC="[1025:1056,1:1024]", TRIMSEC="[1:1000,1:1024]", DATASEC="[513:1536,513:1536]")
    info = only(tmp_path)
    assert info.trimsec == "[1:1000,1:1024]"  # TRIMSEC wins; the bad DATASEC is only reported
    assert info.biassec is None
    assert has(info, "BIASSEC '[1025:1056,1:1024]' reaches beyond this 1024x1024 image", "ignored")
    assert has(info, "DATASEC '[513:1536,513:1536]' reaches beyond")


def test_zero_based_section_says_so(tmp_path):
    write(tmp_path, "light_001.fits", IMAGETYP="Light Frame", EXPTIME=60.0, DATASEC="[0:63,0:63]")
    info = only(tmp_path)
    assert info.trimsec is None
    assert has(info, "DATASEC '[0:63,0:63]'", "0-based", "ignored")


# -- already calibrated ---------------------------------------------------------------------------
def test_maxim_calstat_and_pedestal(tmp_path):
    write(tmp_path, "m51_L_001.fits", IMAGETYP="Light Frame", EXPTIME=300.0, CALSTAT="BDF", PEDESTAL=-100)
    info = only(tmp_path)
    assert info.kind == FrameKind.LIGHT
    assert info.calibrated == ("bias", "dark", "flat")
    assert has(info, "already calibrated (bias, dark, flat", "CALSTAT = 'BDF'", "PEDESTAL = -100")
    assert info.to_json()["calibrated"] == ["bias", "dark", "flat"]


def test_pedestal_alone_is_noted_but_says_no_steps(tmp_path):
    write(tmp_path, "m51_L_001.fits", IMAGETYP="Light Frame", EXPTIME=300.0, PEDESTAL=-100)
    info = only(tmp_path)
    assert info.calibrated == ()
    assert has(info, "PEDESTAL = -100", "no CALSTAT")


@pytest.mark.parametrize("cards,steps", [
    ({"CALSTAT": "D"}, ("dark",)),
    ({"CALSTAT": ""}, ()),
    ({"ZEROCOR": "Jun  2 11:03 Zero level correction image is Zero",
      "FLATCOR": "Jun  2 11:04 Flat field image is FlatV"}, ("bias", "flat")),
    ({"OVERSCAN": "Jun  2 11:03 Overscan section is [1025:1056,1:1024] with mean=1000",
      "TRIM": "Jun  2 11:03 Trim data section is [1:1024,1:1024]", "DARKCOR": "Jun  2 dark"},
     ("overscan", "trim", "dark")),
    ({"OVERSCAN": 32}, ()),  # a camera's count of overscan columns, not IRAF's record
    ({"CALBIAS": "master_bias.fits", "CALDARK": "master_dark.fits"}, ("bias", "dark")),
    ({"HIERARCH subtract_bias": "ccd=<CCDData>, master=<CCDData>"}, ("bias",)),
    ({}, ()),
])
def test_calibration_keywords_of_other_software(tmp_path, cards, steps):
    write(tmp_path, "m51_L_001.fits", IMAGETYP="Light Frame", EXPTIME=300.0, **cards)
    info = only(tmp_path)
    assert info.calibrated == steps
    assert has(info, "already calibrated") == bool(steps)


def test_ccdcal_master_flat_says_master(tmp_path):
    write(tmp_path, "master_flat_V.fits", IMAGETYP="MASTER FLAT", EXPTIME=3.0, FILTER="V", BUNIT="adu/adu")
    info = only(tmp_path)
    assert info.kind == FrameKind.FLAT
    assert info.calibrated == ("master",)
    assert has(info, "IMAGETYP = 'MASTER FLAT'", "BUNIT = 'adu/adu'")


def test_ccdcal_outputs_are_recognised(demo_night):
    masters = scan([demo_night / "out" / "masters"], flag=False)
    assert masters.frames and all("master" in f.calibrated for f in masters.frames)
    assert all(f.n_hdus == 1 for f in masters.frames)  # UNCERT and MASK are planes, not frames
    lights = scan([demo_night / "out" / "calibrated"], flag=False)
    assert lights.frames
    for f in lights.frames:
        assert {"bias", "dark", "flat"} <= set(f.calibrated), (f.name, f.calibrated)


def test_raw_frames_are_not_calibrated(demo_night):
    inv = scan([demo_night / "raw"], flag=False)
    assert all(f.calibrated == () for f in inv.frames)
    assert not any("calibrated" in w for f in inv.frames for w in f.warnings)


# -- classification -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cards,kind", [
    ("bias_001.fits", {"EXPTIME": 0.1}, FrameKind.BIAS),
    ("Bias-0003.fit", {"EXPTIME": 0.001}, FrameKind.BIAS),
    ("frame_0003.fits", {"EXPTIME": 0.05, "OBJECT": "Bias"}, FrameKind.BIAS),
    ("bias_001.fits", {"EXPTIME": 0.5}, FrameKind.DARK),
    ("dark_001.fits", {"EXPTIME": 0.1}, FrameKind.DARK),
    ("frame_0003.fits", {"EXPTIME": 0.0}, FrameKind.BIAS),  # the Lick rule, unchanged
])
def test_short_dark_named_bias_is_a_bias(tmp_path, name, cards, kind):
    write(tmp_path, name, IMAGETYP="DARK", **cards)
    info = only(tmp_path)
    assert info.kind == kind
    if kind == FrameKind.BIAS and cards["EXPTIME"] > 0:
        assert has(info, "IMAGETYP='DARK' with EXPTIME", "says bias: treated as a bias")


# -- the scan table at 80 columns -----------------------------------------------------------------
ROBOT = "ObservatoryRobot_SiteB_0.6m_AltAz_CCD47-10_{kind}_{filt}_2024-05-13T01-59-58_{n:04d}_raw.fits"


def _robotic_night(folder: Path) -> list[tuple[str, str, str]]:
    rows = []
    for n, (imagetyp, kind, exptime, filt) in enumerate([
            ("Bias Frame", "bias", 0.0, None), ("Dark Frame", "dark", 90.0, None),
            ("Flat Field", "flat", 3.5, "V"), ("Light Frame", "light", 90.0, "R"),
            ("Light Frame", "light", 120.0, "B")]):
        name = ROBOT.format(kind=kind, filt=filt or "none", n=n)
        assert len(name) >= 80
        cards = {"IMAGETYP": imagetyp, "EXPTIME": exptime, "CCD_TEMP": -20.0, "DARKTIME": 19.5}
        if filt:
            cards["FILTER"] = filt
        write(folder, name, **cards)
        rows.append((name, kind, f"{exptime:g}", filt or "—"))
    return rows


def test_scan_table_is_readable_at_80_columns(tmp_path):
    from rich.console import Console

    from ccdcal.ui import print_inventory

    rows = _robotic_night(tmp_path)
    out = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    print_inventory(scan([tmp_path], flag=False), out=out)
    text = out.export_text()
    lines = text.splitlines()
    table_lines = lines[: next(i for i, line in enumerate(lines) if ": " in line)]
    assert all(len(line) <= 80 for line in table_lines), text
    header = next(line for line in lines if line.startswith("file"))
    for column in ("file", "kind", "filter", "exptime s", "bin", "shape", "temp °C"):
        assert column in header, text
    assert "…" not in header
    table = [line for line in lines if "×" in line]
    assert len(table) == len(rows)
    shortened = [line.split()[0] for line in table]
    assert len(set(shortened)) == len(rows), "shortened names must stay apart"
    for name, kind, exptime, filt in rows:
        line = next(line for line in table if line.split()[1] == kind and line.split()[3] == exptime
                    and line.split()[2] == filt)
        assert "…" in line.split()[0] and line.split()[0][-5:] == name[-5:]
        assert "1×1" in line and "64×64" in line and "-20.0" in line
        # the notes are not lost: under the table, one line each, with the full name
        note = f"{name}: DARKTIME = 19.5 s is shorter than EXPTIME = {exptime} s"
        assert float(exptime) < 19.5 or any(line.startswith(note) for line in lines), text


def test_scan_command_at_80_columns(tmp_path):
    rows = _robotic_night(tmp_path)
    env = {**os.environ, "COLUMNS": "80", "LINES": "50", "TERM": "dumb"}
    proc = subprocess.run([sys.executable, "-m", "ccdcal.cli", "scan", str(tmp_path), "--no-flags"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines if "×" in line or line.startswith("file")), proc.stdout
    assert any(all(c in line for c in ("kind", "filter", "exptime s", "bin", "shape", "temp °C"))
               for line in lines), proc.stdout
    for _, kind, exptime, filt in rows:
        assert any(line.split()[1:4] == [kind, filt, exptime] for line in lines if "×" in line), proc.stdout


def test_short_names_and_wide_terminals_keep_the_notes_column(tmp_path):
    from rich.console import Console

    from ccdcal.ui import print_inventory, shorten_middle

    write(tmp_path, "light_001.fits", IMAGETYP="Light Frame", EXPTIME=90.0, DARKTIME=19.5)
    out = Console(width=160, record=True, file=io.StringIO(), color_system=None)
    print_inventory(scan([tmp_path], flag=False), out=out)
    text = out.export_text()
    assert "notes" in text.splitlines()[1] and "light_001.fits" in text
    assert shorten_middle("abcdefghij", 5) == "ab…ij"
    assert shorten_middle("abcdefghij", 6) == "ab…hij"
    assert shorten_middle("short", 10) == "short"


# -- headers written without truncation warnings ------------------------------------------------
def test_write_fits_shortens_long_comments_without_a_warning(tmp_path):
    from ccdcal.io.writer import write_fits

    header = fits.Header()
    long = "a comment far too long to fit on its card, as calibration software writes them sometimes"
    header["GAIN"] = (1.23456789, long)
    header["CALBIAS"] = ("masters/bias_binning1x1_1024x1024_hdu0_and_more_text.fits", long)
    header["LONGSTR"] = ("x" * 100, "continued on CONTINUE cards, not truncated")
    header["HIERARCH ESO DET CHIP NAME"] = ("CCD47-10", long)
    header["COMMENT"] = long + " " + long
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_fits(tmp_path / "out.fits", np.zeros((4, 4), np.float32), header, unit="adu")
    assert not [w for w in caught if issubclass(w.category, VerifyWarning)], [str(w.message) for w in caught]
    assert header.comments["GAIN"] == long  # the caller's header is untouched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = fits.getheader(tmp_path / "out.fits")
    assert back["GAIN"] == 1.23456789 and long.startswith(back.comments["GAIN"])
    assert back["CALBIAS"] == header["CALBIAS"] and long.startswith(back.comments["CALBIAS"])
    assert back["LONGSTR"] == "x" * 100
    assert back["ESO DET CHIP NAME"] == "CCD47-10"
    assert back["BUNIT"] == "adu"


def test_reduce_leaks_no_truncation_warning(tmp_path):
    """Long filter names make long master names: CALFLAT = 'master_flat_..._sq.fits' / master flat
    applied no longer fits its card (8 truncation warnings before the fix)."""
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce

    raw = write_night(tmp_path / "raw", size=64, seed=3)
    for path in sorted(raw.glob("*.fits")):
        with fits.open(path, mode="update") as hdul:
            if "FILTER" in hdul[0].header:
                hdul[0].header["FILTER"] += " Johnson-Cousins (Astrodon Gen2 50mm sq)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reduce([raw], tmp_path / "out", options=ReduceOptions(report=False))
    assert not [str(w.message) for w in caught if "too long" in str(w.message)]
    light = fits.getheader(next((tmp_path / "out" / "calibrated").glob("*.fits")))
    assert light["CALFLAT"].startswith("master_flat_") and "master flat".startswith(
        light.comments["CALFLAT"][:11])


@pytest.mark.parametrize("keyword,value", [
    ("GAIN", 1.5), ("NCOMBINE", 9), ("SIMPLEX", True), ("OBSERVER", "A. Robot"),
    ("CALFLAT", "master_flat_V_Johnson-Cousins.fits"), ("DATE-OBS", "2024-05-13T01:59:58.40"),
    ("BIGINT", 12345678901234567890123), ("HIERARCH ESO DET CHIP NAME", "CCD47-10"),
    ("QUOTED", "it's 'quoted' text here"),
])
def test_fit_card_never_lets_astropy_truncate(keyword, value):
    from ccdcal.io.frames import fit_card

    for n in range(0, 75):
        comment = ("a long comment, word after word " * 3)[:n]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            card = fits.Card(keyword, value, comment)
        before = card.comment
        fitted = fit_card(card)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            image = fitted.image
        assert fitted.value == value and comment.startswith(fitted.comment)
        whole = comment.rstrip()
        if fitted.comment != whole:  # shortened only when the whole comment would not fit
            assert len(image.rstrip()) + len(whole) - len(fitted.comment) > 80
        assert card.comment == before  # the card given is not changed
