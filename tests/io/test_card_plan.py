"""A light's cards made at once (ccdcal.io.cards.CardPlan, card_image) against astropy setting
them one by one: the same cards in the same order, each card's 80 characters astropy's own."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.io.cards import CardPlan, card_image

VALUES = [0, 1, -5, 2**40, np.int64(7), np.int32(-3), True, False, 0.0, -0.0, 1.5, 1e-300,
          1.2345678901234567e200, 3.141592653589793, -2.5e-7, 12345.678, np.float64(0.1), 1e16,
          123456789012345.67, "", "a", "adu", "O'Brien", "x" * 20, "x" * 60, "x" * 68, "x" * 69,
          "trailing  ", "  lead", np.float32(1.1), np.bool_(True), float("nan"), "é", None]
COMMENTS = [None, "", "a comment", "[adu] mean overscan level subtracted", "c" * 40, "c" * 70, "ü"]


def _astropy_image(key, value, comment):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return (fits.Card(key, value, comment) if comment is not None else fits.Card(key, value)).image


def test_card_images_are_astropys_or_left_to_astropy():
    made = 0
    for key in ["GAIN", "OVSCMEAN", "CALBIAS", "DATE-OBS", "X_Y", "HISTORY", "COMMENT", "lower", "TOOLONGKEY"]:
        for value in VALUES:
            for comment in COMMENTS:
                if key in ("HISTORY", "COMMENT") and comment:
                    continue
                image = card_image(key, value, comment)
                if image is None:
                    continue
                made += 1
                assert image == _astropy_image(key, value, comment), (key, value, comment)
    rng = random.Random(0)
    for _ in range(5000):
        value = rng.choice([rng.uniform(-1e6, 1e6), rng.uniform(-1, 1) * 10 ** rng.randint(-300, 300),
                            round(rng.uniform(0, 100), rng.randint(0, 8)), rng.randint(-10**12, 10**12)])
        image = card_image("OVSCMEAN", value, "[adu] mean")
        if image is not None:
            made += 1
            assert image == _astropy_image("OVSCMEAN", value, "[adu] mean"), value
    assert made > 3000
    # what it leaves to astropy: NaN, non-ASCII, long cards, numpy's float32 and bool, bad keywords
    assert card_image("A", float("nan"), None) is None and card_image("A", "é", None) is None
    assert card_image("A", "x" * 69, None) is None and card_image("A", 1.0, "c" * 70) is None
    assert card_image("A", np.float32(1.1), None) is None and card_image("A", np.bool_(True), None) is None
    assert card_image("lower", 1, None) is None and card_image("HISTORY", "h" * 73, None) is None


def _raw_header(rng: random.Random) -> fits.Header:
    if rng.random() < 0.3:      # cards as a file has them: values in their own text
        text = "".join(card.ljust(80) for card in [
            "GAIN    =                 2.50 / raw gain", "EXPTIME =                   60 / [s]",
            "BUNIT   = 'adu     '", "OBJECT  = 'M51     '           / target",
            "HISTORY raw history"])
        return fits.Header.fromstring(text)
    h = fits.Header()
    for key in rng.sample(["OBJECT", "EXPTIME", "GAIN", "BUNIT", "SATURATE", "DATAMAX", "FILTER", "TELESCOP",
                           "CCD-TEMP", "XBINNING"], rng.randint(0, 10)):
        h.append((key, rng.choice([1, 2.5, "text", True]), rng.choice(["", "raw comment"])), end=True)
    for _ in range(rng.randint(0, 3)):       # commentary in the middle, and perhaps at the end
        h.insert(rng.randint(0, len(h)), (rng.choice(["COMMENT", "HISTORY"]), f"raw {rng.random():.3f}"))
    for _ in range(rng.randint(0, 3)):
        h.append((rng.choice(["COMMENT", "HISTORY", ""]), f"tail {rng.random():.3f}"), end=True)
    if rng.random() < 0.2:
        h.append(("GAIN", 9.0, "a second GAIN card"), end=True)
    return h


def _ops(rng: random.Random) -> list[tuple[str, str, object]]:
    ops = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.random()
        if kind < 0.15:
            ops.append(("remove", rng.choice(["SATURATE", "DATAMAX", "GAIN", "NEWKEY1"]), True))
        elif kind < 0.45:
            text = rng.choice(["short history", "h" * rng.randint(60, 200), "", "MASK bit 1: saturated"])
            ops.append(("set", rng.choice(["HISTORY", "COMMENT"]), text))
        else:
            key = rng.choice(["BUNIT", "GAIN", "OVSCMEAN", "NEWKEY1", "NEWKEY2", "CALBIAS", "EXPTIME", "RDNOISE"])
            value = rng.choice([1, -3.25, "adu", True, 1e-9, float(rng.random()), 2.5, 60, 60.0, "adu  "])
            ops.append(("set", key, (value, rng.choice(["given comment", ""])) if rng.random() < 0.7 else value))
    return ops


@pytest.mark.parametrize("seed", range(400))
def test_a_plan_of_cards_gives_the_header_that_setting_them_in_turn_gives(seed):
    rng = random.Random(seed)
    raw = _raw_header(rng)
    ops = _ops(rng)
    expected = raw.copy()
    for op, key, value in ops:              # astropy, one card at a time
        if op == "remove":
            expected.remove(key, ignore_missing=value)
        else:
            expected[key] = value
    plan = CardPlan(raw.copy())
    for op, key, value in ops:
        if op == "remove":
            plan.remove(key, ignore_missing=value)
        else:
            plan[key] = value
    got, fitting = plan.apply()
    assert [card.image for card in got.cards] == [card.image for card in expected.cards]
    assert got.tostring() == expected.tostring()
    assert all(len(card.image) == 80 for card in got.cards if id(card) in fitting)
    # the header works as any other: look-ups, updates, appends
    for key in ("BUNIT", "NEWKEY2", "GAIN"):
        assert (key in got) == (key in expected)
        if key in expected:
            assert got[key] == expected[key]
    got["LATER"] = (1, "set afterwards")
    expected["LATER"] = (1, "set afterwards")
    assert got.tostring() == expected.tostring()


def test_a_header_ending_in_blank_cards_is_set_card_by_card():
    raw = fits.Header([("OBJECT", "M51")])
    raw.append(fits.Card(), end=True)       # a blank card at the end: astropy fills it
    expected = raw.copy()
    expected["NEWKEY"] = 1
    expected["HISTORY"] = "one"
    plan = CardPlan(raw.copy())
    plan["NEWKEY"] = 1
    plan["HISTORY"] = "one"
    got, fitting = plan.apply()
    assert got.tostring() == expected.tostring() and not fitting
