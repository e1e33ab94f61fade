"""Classification from real-world header spellings, the filename fallback, and the real datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.planning.inventory import (
    FrameKind,
    binning,
    classify,
    filter_name,
    scan,
    temperature_groups,
)


def header(**cards):
    h = fits.Header()
    for k, v in cards.items():
        h[k.replace("_", "-") if k in ("CCD_TEMP", "SET_TEMP", "DATE_OBS") else k] = v
    return h


SPELLINGS = [
    ({"IMAGETYP": "BIAS"}, FrameKind.BIAS),
    ({"IMAGETYP": "zero"}, FrameKind.BIAS),
    ({"IMAGETYP": "Bias Frame          "}, FrameKind.BIAS),
    ({"IMAGETYP": "DARK", "EXPTIME": 60}, FrameKind.DARK),
    ({"IMAGETYP": "Dark Frame", "EXPTIME": 60.0}, FrameKind.DARK),
    ({"IMAGETYP": "FLAT", "EXPTIME": 3}, FrameKind.FLAT),
    ({"IMAGETYP": "FLATFIELD", "EXPTIME": 3}, FrameKind.FLAT),
    ({"IMAGETYP": "Flat Field", "EXPTIME": 3}, FrameKind.FLAT),
    ({"IMAGETYP": "SKYFLAT", "EXPTIME": 3}, FrameKind.FLAT),
    ({"IMAGETYP": "DOMEFLAT", "EXPTIME": 3}, FrameKind.FLAT),
    ({"IMAGETYP": "TWIFLAT", "EXPTIME": 3}, FrameKind.FLAT),
    ({"IMAGETYP": "LIGHT", "EXPTIME": 30}, FrameKind.LIGHT),
    ({"IMAGETYP": "OBJECT", "EXPTIME": 30}, FrameKind.LIGHT),
    ({"IMAGETYP": "SCIENCE", "EXPTIME": 30}, FrameKind.LIGHT),
    ({"IMAGETYP": "Light Frame", "EXPTIME": 30}, FrameKind.LIGHT),
    ({"OBSTYPE": "ZERO"}, FrameKind.BIAS),
    ({"OBSTYPE": "DARK", "EXPTIME": 0}, FrameKind.BIAS),          # Lick Nickel biases
    ({"OBSTYPE": "OBJECT", "OBJECT": "sky flat", "EXPTIME": 4}, FrameKind.FLAT),  # Lick sky flats
    ({"OBSTYPE": "OBJECT", "OBJECT": "NGC 4147", "EXPTIME": 60}, FrameKind.LIGHT),
    ({"IMAGETYP": "MASTER BIAS"}, FrameKind.BIAS),
]


@pytest.mark.parametrize("cards,kind", SPELLINGS)
def test_header_spellings(cards, kind):
    assert classify(header(**cards), Path("frame_0001.fits"))[0] == kind


def test_light_frame_named_flat_is_a_flat_with_a_warning():
    kind, warnings = classify(header(IMAGETYP="Light Frame", EXPTIME=23.0), Path("flat-expos23s-Neg5-Vis.00000000.FIT"))
    assert kind == FrameKind.FLAT
    assert any("file name" in w for w in warnings)


@pytest.mark.parametrize("name,kind", [
    ("bias_001.fits", FrameKind.BIAS), ("Zero.0003.fits", FrameKind.BIAS), ("darks-300s-2.fit", FrameKind.DARK),
    ("skyflat_V_03.fits", FrameKind.FLAT), ("FLAT-R.fts", FrameKind.FLAT), ("light_m51_004.fits", FrameKind.LIGHT),
    ("object12.fits", FrameKind.LIGHT),
])
def test_filename_fallback_classifies_and_warns(name, kind):
    got, warnings = classify(header(EXPTIME=10.0), Path(name))
    assert got == kind
    assert warnings and "file name" in warnings[0]


def test_unclassifiable_is_unknown_with_a_reason():
    kind, warnings = classify(header(EXPTIME=10.0), Path("img_0001.fits"))
    assert kind == FrameKind.UNKNOWN
    assert "no frame-type keyword" in warnings[-1]


def test_keyword_variants_for_filter_binning_exposure():
    assert filter_name(header(FILTNAM="V")) == "V"
    assert filter_name(header(INSFLNAM="r'")) == "r'"
    assert filter_name(header(FILTER1="B", FILTER2="CLEAR")) == "B"
    assert filter_name(header(FILTER="Open")) is None
    assert binning(header(CCDSUM="2 2")) == (2, 2)
    assert binning(header(XBINNING=3, YBINNING=1)) == (3, 1)
    assert binning(header()) == (1, 1)


def test_temperature_groups_split_beyond_tolerance():
    assert temperature_groups([-10.1, -9.9, -20.0, None, -19.5], 2.0) == [1, 1, 0, 0, 0]


def test_multi_extension_file_gives_one_frame_per_image_hdu(tmp_path):
    primary = fits.PrimaryHDU(header=header(IMAGETYP="FLAT", EXPTIME=2.0, FILTER="g"))
    amps = [fits.ImageHDU(np.ones((8, 10), dtype=np.float32), name=f"AMP{i}") for i in range(2)]
    fits.HDUList([primary, *amps]).writeto(tmp_path / "mef.fits")
    inv = scan([tmp_path], flag=False)
    assert [(f.hdu, f.kind, f.filter, f.shape) for f in inv.frames] == [
        (1, FrameKind.FLAT, "g", (8, 10)), (2, FrameKind.FLAT, "g", (8, 10))]
    assert inv.frames[0].stem == "mef_hdu1"


def test_real_headers_are_classified_as_the_source_notes_say(real_data):
    inv = scan([real_data / "nickel-lick" / "raw"], flag=False)
    kinds = {f.path.name: f.kind for f in inv.frames}
    assert all(kinds[f"d10{i:02d}.fits"] == FrameKind.BIAS for i in range(1, 11))
    assert [kinds[n] for n in ("d1035.fits", "d1036.fits", "d1037.fits")] == [FrameKind.FLAT] * 3
    assert sum(k == FrameKind.LIGHT for k in kinds.values()) == 6
    assert {f.filter for f in inv.frames if f.kind != FrameKind.BIAS} == {"V"}
    assert not inv.skipped

    inv = scan([real_data / "sbu-stl1001e" / "raw"], flag=False)
    counts = {k: len(inv.of_kind(k)) for k in FrameKind}
    assert counts[FrameKind.BIAS] == 10 and counts[FrameKind.DARK] == 16 and counts[FrameKind.FLAT] == 10
    assert counts[FrameKind.LIGHT] == 0
