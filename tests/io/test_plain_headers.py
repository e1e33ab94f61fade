"""Issue 31: plain FITS files have their image HDUs read from their header blocks without opening
them in astropy; whatever that way cannot read exactly as astropy does goes through astropy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.io import frames
from ccdcal.planning.inventory import scan_file


def _astropy_way(path):
    """image_hdus as astropy's open reads the file (the code the fast way stands in for)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdul = frames._open(path)
    problems, hdus = [], []
    try:
        for index in range(len(hdul)):
            found = frames._image_hdu(hdul, index, path.stat().st_size, False, problems)
            if found is not None:
                hdus.append(found)
    finally:
        hdul.close()
    return hdus, problems


def _write_cards(path, cards, data=b""):
    """A file of these 80-column cards (END added), padded to whole blocks, then ``data``."""
    text = "".join(card.ljust(80) for card in cards) + "END".ljust(80)
    text += " " * (-len(text) % 2880)
    path.write_bytes(text.encode("ascii") + data + b"\0" * (-len(data) % 2880))
    return path


def _same(path):
    fast = frames._plain_image_hdus(path)
    slow = _astropy_way(path)
    if fast is None:
        return None
    assert fast[1] == slow[1]
    assert [(h.index, h.shape, h.data_offset, h.header.tostring()) for h in fast[0]] == \
        [(h.index, h.shape, h.data_offset, h.header.tostring()) for h in slow[0]]
    return True


def test_plain_files_read_as_astropy_reads_them(tmp_path):
    data = np.arange(12, dtype=">i2").reshape(3, 4)
    primary = fits.PrimaryHDU(data)
    primary.header["OBJECT"] = ("M51", "target")
    primary.header["HISTORY"] = "made here"
    hdul = fits.HDUList([primary, fits.ImageHDU(data.astype(">f4"), name="UNCERT"),
                         fits.ImageHDU(np.zeros((3, 4), np.uint8), name="MASK")])
    hdul.writeto(tmp_path / "mef.fits")
    fits.PrimaryHDU(np.zeros((2, 2, 3), ">f4")).writeto(tmp_path / "cube.fits")
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]).writeto(tmp_path / "ext.fits")
    for name in ("mef.fits", "cube.fits", "ext.fits"):
        assert _same(tmp_path / name), name


@pytest.mark.parametrize("cards", [
    ["SIMPLE  =                    T", "BITPIX  =                   16", "NAXIS   =                    2",
     "NAXIS1  =                  4 4", "NAXIS2  =                    3"],                    # unreadable NAXIS1
    ["SIMPLE  =                    T", "BITPIX  =                   16", "NAXIS   =                  '2'",
     "NAXIS1  =                    4", "NAXIS2  =                    3"],                    # a string NAXIS
    ["SIMPLE  =                    T", "BITPIX  =                 16.0", "NAXIS   =                    2",
     "NAXIS1  =                    4", "NAXIS2  =                    3"],                    # a float BITPIX
    ["SIMPLE  =                    T", "BITPIX  =                   16", "NAXIS   =                    2",
     "NAXIS1  =                    0", "NAXIS2  =                    3", "GROUPS  =                    T",
     "PCOUNT  =                    0", "GCOUNT  =                    1"],                    # random groups
])
def test_odd_structure_cards_go_through_astropy(tmp_path, cards):
    path = _write_cards(tmp_path / "odd.fits", cards, b"\0" * 24)
    assert frames._plain_image_hdus(path) is None
    infos, skipped = scan_file(path)        # a line for the file, never a crash of the scan
    assert infos or (skipped and all(s.reason for s in skipped))


def test_an_end_card_with_more_on_it_goes_through_astropy(tmp_path):
    """An END card with text after END: astropy mends it (the fast way would keep it as a card)."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                   16", "NAXIS   =                    2",
             "NAXIS1  =                    4", "NAXIS2  =                    3", "END     garbage"]
    text = "".join(card.ljust(80) for card in cards)
    path = tmp_path / "end.fits"
    path.write_bytes((text + " " * (-len(text) % 2880)).encode("ascii") + b"\0" * 2880)
    assert frames._plain_image_hdus(path) is None
    hdus, _ = frames.image_hdus(path)
    assert hdus[0].shape == (3, 4) and "END" not in hdus[0].header


def test_a_card_whose_keyword_begins_with_end_is_read_the_fast_way(tmp_path):
    """ENDTIME, ENDDATE (NINA and others write them) are cards like any other, not the END card."""
    data = np.arange(12, dtype=">i2").tobytes()
    path = _write_cards(tmp_path / "endtime.fits", [
        "SIMPLE  =                    T", "BITPIX  =                   16", "NAXIS   =                    2",
        "NAXIS1  =                    4", "NAXIS2  =                    3",
        "ENDTIME = '2026-12-07T01:02:03' / end of the exposure"], data)
    assert _same(path) is True
    assert frames._plain_image_hdus(path)[0][0].header["ENDTIME"] == "2026-12-07T01:02:03"


def test_datasum_read_from_the_header_text_is_astropys(tmp_path):
    import gzip

    from ccdcal.io.frames import datasum_of

    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    cases = {}
    hdu = fits.PrimaryHDU(data)
    hdu.add_checksum()
    hdu.writeto(tmp_path / "summed.fits")                               # as ccdcal and astropy write it
    cases["summed.fits"] = str(hdu.header["DATASUM"])
    fits.PrimaryHDU(data).writeto(tmp_path / "none.fits")                 # no DATASUM
    cases["none.fits"] = ""
    odd = fits.PrimaryHDU(data)
    odd.header["DATASUM"] = 12345                                         # a number, not a string
    odd.writeto(tmp_path / "odd.fits")
    cases["odd.fits"] = "12345"
    quoted = fits.PrimaryHDU(data)
    quoted.header["DATASUM"] = "it''s"[:3] + "'x"                          # a quote inside the value
    quoted.writeto(tmp_path / "quoted.fits")
    cases["quoted.fits"] = str(quoted.header["DATASUM"])
    (tmp_path / "summed.fits.gz").write_bytes(gzip.compress((tmp_path / "summed.fits").read_bytes()))
    cases["summed.fits.gz"] = cases["summed.fits"]
    (tmp_path / "broken.fits").write_bytes(b"not FITS")
    cases["broken.fits"] = ""
    for name, expected in cases.items():
        astropy = "" if name == "broken.fits" else str(fits.getheader(tmp_path / name).get("DATASUM", ""))
        assert datasum_of(tmp_path / name) == expected == astropy, name


def test_standard_cards_as_read_are_written_back_as_read_and_others_as_astropy_fixes_them():
    """A raw header's standard cards go into a cleaned header unparsed and are written as read;
    a card astropy would fix (an '=' out of place, a lower-case exponent or keyword) still is."""
    import warnings

    from astropy.io import fits

    from ccdcal.io.frames import clean_header

    images = ["EXPTIME =                 60.0 / exposure time [s]", "OBJECT  = 'M51 it''s'         / target",
              "FLAG    =                    T", "COUNT   =                 -12 / n", "SMALL   =              -.5D-03",
              "LOWER   =                1.0e5 / lower-case exponent", "EQ     =                      7 / '=' at 7",
              "COMMENT a comment card"]
    raw = fits.Header([fits.Card.fromstring(image) for image in images])
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        expected = [str(card) for card in fits.Header([fits.Card.fromstring(image) for image in images]).cards]
        cleaned = clean_header(raw)
        written = [cleaned.tostring()[i:i + 80] for i in range(0, 80 * len(images), 80)]
    assert written == expected                     # what astropy itself writes, card for card
    assert written[:5] == [image.ljust(80) for image in images[:5]]       # the standard ones verbatim
    assert [cleaned[k] for k in ("EXPTIME", "OBJECT", "FLAG", "COUNT")] == [60.0, "M51 it's", True, -12]
    assert cleaned["SMALL"] == -0.0005 and cleaned["LOWER"] == 1.0e5 and cleaned["EQ"] == 7
