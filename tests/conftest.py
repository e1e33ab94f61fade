"""Shared fixtures: a reduced synthetic night (known truth) and the real datasets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    return (REPO / os.environ.get("CCDCAL_TEST_DATA", "../shared/data")).resolve()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data (or $CCDCAL_TEST_DATA): skipped when absent, but a failure in CI."""
    root = real_data_root()
    if not (root / "nickel-lick" / "raw").is_dir() or not (root / "sbu-stl1001e" / "raw").is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real test data not found at {root}; CI must have ../shared/data")
        pytest.skip(f"real test data not found at {root} (set CCDCAL_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def demo_night(tmp_path_factory) -> Path:
    """A synthetic night (256 px) written and reduced once per session: ROOT/raw, ROOT/truth, ROOT/out."""
    from ccdcal.demo import write_night
    from ccdcal.pipeline.run import ReduceOptions, reduce

    root = tmp_path_factory.mktemp("night")
    write_night(root / "raw", size=256, seed=7)
    reduce([root / "raw"], root / "out", options=ReduceOptions(report=False))
    return root


def copy_frames(source: Path, target: Path, *patterns: str) -> Path:
    """Copy the files of ``source`` matching any glob pattern into a new folder ``target``."""
    target.mkdir(parents=True)
    for pattern in patterns:
        for f in sorted(source.glob(pattern)):
            shutil.copy(f, target / f.name)
    return target
