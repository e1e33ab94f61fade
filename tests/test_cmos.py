"""Cooled-CMOS nights as capture programs write them (issue 27), from tests/cmosnight.py."""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from ccdcal.planning.inventory import scan
from cmosnight import DIALECTS, write_night


def _kinds(folder: Path) -> Counter:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inventory = scan(folder, flag=False)
    assert not inventory.skipped, inventory.skipped
    return Counter((f.kind.value, f.exptime, f.filter) for f in inventory.frames)


@pytest.fixture(scope="module")
def dialect_nights(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cmos-dialects")
    nights = {}
    for dialect in DIALECTS:
        write_night(root / dialect, dialect=dialect, shape=(24, 32), n_dark=3, n_flat=3, n_light=2)
        nights[dialect] = root / dialect
    return nights


def test_the_generator_writes_left_shifted_14_bit_data(dialect_nights):
    data = fits.getdata(next((dialect_nights["nina3"]).rglob("*.fits")))
    assert data.dtype.kind in "ui" and np.all(data % 4 == 0) and data.max() <= 65532


def test_every_dialect_gives_one_inventory(dialect_nights):
    """N.I.N.A. 2 and 3, Ekos, SGP, APT, ASIAIR, SharpCap and QHY spellings of one night (dark
    flats typed DARK or DARKFLAT, 'Flat Field', FRAMETYP, EXPOSURE only, no type keyword at all)
    classify alike: darks of 120 s and 2 s, flats and lights."""
    expected = Counter({("dark", 120.0, None): 3, ("dark", 2.0, "Ha"): 3, ("flat", 2.0, "Ha"): 3,
                        ("light", 120.0, "Ha"): 2})
    for dialect, folder in dialect_nights.items():
        kinds = _kinds(folder)
        # a dark flat may or may not carry the flats' filter: the count per kind and exposure is what matters
        assert Counter({(k, t): n for (k, t, _), n in kinds.items()}) == \
            Counter({(k, t): n for (k, t, _), n in expected.items()}), dialect


@pytest.mark.parametrize("dialect", ["nina3", "nina2", "ekos", "sgp", "apt", "qhy"])
def test_type_keywords_classify_without_telling_file_names(dialect_nights, tmp_path, dialect):
    """The dialects that write a type keyword classify from it alone (anonymous names, one folder)."""
    for i, path in enumerate(sorted(dialect_nights[dialect].rglob("*.fits"))):
        shutil.copy(path, tmp_path / f"frame_{i:04d}.fits")
    kinds = _kinds(tmp_path)
    assert {(k, t) for k, t, _ in kinds} == {("dark", 120.0), ("dark", 2.0), ("flat", 2.0), ("light", 120.0)}
