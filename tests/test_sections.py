import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ccdcal.errors import InputError
from ccdcal.sections import Section, parse_section, to_slices


def test_fits_section_is_one_based_and_inclusive():
    image = np.arange(20 * 30).reshape(20, 30)  # ny=20, nx=30
    rows, cols = to_slices("[1:3,2:4]", image.shape)
    sub = image[rows, cols]
    assert sub.shape == (3, 3)                 # y 2..4 inclusive, x 1..3 inclusive
    assert sub[0, 0] == image[1, 0]            # FITS (x=1, y=2) is numpy [1, 0]
    assert sub[-1, -1] == image[3, 2]


def test_whole_axis_star_and_reversed_range():
    rows, cols = to_slices("[*,5:1]", (10, 8))
    assert (rows, cols) == (slice(0, 5), slice(0, 8))


@pytest.mark.parametrize("text", ["1:2,3:4", "[1:2]", "[0:5,1:2]", "[a:b,1:2]", "", "[1:2,3:4", "[1:2;3:4]"])
def test_malformed_sections_raise_one_line_input_error(text):
    with pytest.raises(InputError) as info:
        parse_section(text)
    assert "\n" not in str(info.value)


def test_section_outside_image_is_an_input_error():
    with pytest.raises(InputError, match="outside"):
        to_slices("[1:40,1:10]", (10, 30))


@given(st.integers(1, 50), st.integers(0, 49), st.integers(1, 50), st.integers(0, 49))
def test_round_trip_slices_and_section(x1, dx, y1, dy):
    sec = Section(x1, x1 + dx, y1, y1 + dy)
    rows, cols = sec.slices((200, 200))
    assert Section.from_slices(rows, cols) == sec
    assert parse_section(str(sec)) == sec
    assert sec.shape == (rows.stop - rows.start, cols.stop - cols.start)
