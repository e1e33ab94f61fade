"""File hashes: taken from the previous run only when a file is unchanged, and from the bytes the
scan read as xxhash hashes them (from the whole-night suite of issue 12)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from ccdcal.io.hashing import HASH, file_hash, remember_hashes


def test_input_hashes_are_taken_from_the_previous_run_only_when_unchanged(tmp_path):
    path = tmp_path / "a.fits"
    path.write_bytes(b"x" * 5000)
    st = path.stat()
    fake = "0" * 32
    # a record of another algorithm (a manifest from before XXH3) is not taken
    assert remember_hashes([{"path": str(path), "size": st.st_size, "mtime": st.st_mtime, "sha256": fake}]) == 0
    assert remember_hashes([{"path": str(path), "size": st.st_size, "mtime": st.st_mtime, HASH: fake}]) == 1
    assert file_hash(path) == fake
    path.write_bytes(b"y" * 5000)                        # same size, new content and mtime
    os.utime(path, ns=(st.st_mtime_ns + 10**9, st.st_mtime_ns + 10**9))
    assert file_hash(path) == xxhash.xxh3_128(b"y" * 5000).hexdigest()
    st2 = path.stat()
    assert remember_hashes([{"path": str(path), "size": st2.st_size, "mtime": st.st_mtime, HASH: fake}]) == 0


def test_the_scan_hashes_the_files_it_reads_as_xxhash_hashes_them(tmp_path):
    """reduce's pixel checks take each raw 16-bit file's hash from the pixels they read (the
    bytes around them read again): equal to xxhash over the whole file, for a primary image
    and for an image in an extension followed by another HDU; a dry scan hashes nothing."""
    from astropy.io import fits

    from ccdcal.io import hashing
    from ccdcal.planning.inventory import flag_groups, scan

    rng = np.random.default_rng(8)
    paths = []
    for i in range(4):
        data = (rng.normal(1000, 7, (37, 53)) + 32768).astype(np.uint16)
        header = fits.Header([("IMAGETYP", "BIAS"), ("EXPTIME", 0.0)])
        path = tmp_path / f"bias_{i}.fits"
        if i % 2:   # the image in HDU 1, a table after it
            table = fits.BinTableHDU.from_columns([fits.Column("x", "E", array=np.arange(5.0))])
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data, header), table]).writeto(path)
        else:
            fits.PrimaryHDU(data, header).writeto(path)
        paths.append(path)
    inventory = scan([tmp_path], flag=False)
    keys = {p: hashing._hash_key(p) for p in paths}
    for key in keys.values():
        hashing._HASHES.pop(key)
    flag_groups(inventory)
    assert not any(key in hashing._HASHES for key in keys.values())
    flagged = flag_groups(inventory, hash_files=True)
    for path, key in keys.items():
        assert hashing._HASHES.get(key) == xxhash.xxh3_128(path.read_bytes()).hexdigest()
    assert all("_hash" not in (f.metrics or {}) for f in flagged.frames)


def test_resolved_paths_follow_links_as_path_resolve_does(tmp_path, monkeypatch):
    from ccdcal._shared import state
    from ccdcal.io.hashing import resolved

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "a.fits").write_bytes(b"a")
    (real / "b.fits").write_bytes(b"b")
    (tmp_path / "linkdir").symlink_to(real)                      # a linked folder
    (real / "sub" / "link.fits").symlink_to(real / "b.fits")     # a linked file
    monkeypatch.chdir(tmp_path)
    with state.run_scope():
        for spelling in ["linkdir/sub/a.fits", "linkdir/sub/link.fits", "linkdir/sub/../b.fits",
                         "linkdir/sub/.", "linkdir/sub/..", str(real / "sub" / "a.fits"), "linkdir/sub/none.fits",
                         "linkdir/sub/a.fits"]:
            assert resolved(spelling) == str(Path(spelling).resolve()), spelling
