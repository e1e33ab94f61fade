"""The FITS writer and reader: astropy's bytes and checksums, 16-bit rows decoded as numpy does,
the page cache and O_DIRECT (from the whole-night suite of issue 12)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import xxhash


def _astropy_written(path, data, header, uncertainty, mask):
    from astropy.io import fits

    primary = fits.PrimaryHDU(data, header=header.copy())
    primary.header["BUNIT"] = ("adu", "physical unit of the data")
    uh = fits.Header()
    uh["UTYPE"] = ("StdDevUncertainty", "uncertainty type (astropy.nddata)")
    uh["BUNIT"] = "adu"
    fits.HDUList([primary, fits.ImageHDU(uncertainty, header=uh, name="UNCERT"),
                  fits.ImageHDU(mask, name="MASK")]).writeto(path, checksum=True)


def test_fits_writer_matches_astropy_and_its_checksums_verify(tmp_path):
    """The streamed writer against astropy's own writer: the same bytes wherever the
    checksum timestamps do not enter, CHECKSUM/DATASUM that astropy verifies, and the
    hash it remembers equal to hashing the file afterwards."""
    import warnings

    from astropy.io import fits

    from ccdcal.io.hashing import _HASHES, _hash_key
    from ccdcal.io.writer import write_fits

    rng = np.random.default_rng(5)
    for shape in [(1, 1), (7, 13), (5, 3), (333, 517)]:      # odd sizes: partial words and blocks
        data = rng.normal(100, 30, shape).astype(np.float32)
        data.flat[0] = np.nan
        data.flat[-1] = -np.inf
        unc = np.abs(rng.normal(5, 1, shape)).astype(np.float32)
        mask = rng.integers(0, 256, shape).astype(np.uint8)
        header = fits.Header([("OBJECT", "M51"), ("LONGCOMM", "a" * 60, "b" * 40), ("EXPTIME", 300.0)])
        ours, theirs = tmp_path / f"ours{shape}.fits", tmp_path / f"theirs{shape}.fits"
        write_fits(ours, data, header, uncertainty=unc, mask=mask, unit="adu")
        _astropy_written(theirs, data, header, unc, mask)
        with warnings.catch_warnings():
            warnings.simplefilter("error")        # astropy warns when a checksum does not verify
            with fits.open(ours, checksum=True) as a, fits.open(theirs) as b:
                assert len(a) == len(b) == 3
                for ha, hb in zip(a, b, strict=True):
                    assert np.array_equal(ha.data, hb.data, equal_nan=True)
                    assert ha.header["DATASUM"] == hb.header["DATASUM"]
                    keys_a = [(c.keyword, c.value) for c in ha.header.cards if c.keyword != "CHECKSUM"]
                    keys_b = [(c.keyword, c.value) for c in hb.header.cards if c.keyword != "CHECKSUM"]
                    assert keys_a == keys_b
        raw_a, raw_b = ours.read_bytes(), theirs.read_bytes()
        assert len(raw_a) == len(raw_b) and len(raw_a) % 2880 == 0
        # the data units are byte for byte astropy's (headers differ only in the checksum cards)
        with fits.open(theirs) as b:
            for hdu in b:
                start, size = hdu.fileinfo()["datLoc"], hdu.fileinfo()["datSpan"]
                assert raw_a[start:start + size] == raw_b[start:start + size]
        assert _HASHES.get(_hash_key(ours)) == xxhash.xxh3_128(raw_a).hexdigest()


def test_16_bit_rows_decode_as_numpys_float32_steps(tmp_path):
    """FrameSource's decoding of 16-bit rows (whole frames and row bands into given buffers)
    against numpy's float32 steps on the stored integers and astropy's own reading, bit for
    bit, with BZERO, BSCALE and BLANK. (A numba decoding kernel was tried: no faster than
    numpy's conversion, 12-15 ms for a 4096² frame.)"""
    from astropy.io import fits

    from ccdcal.io.frames import FrameSource

    rng = np.random.default_rng(21)
    stored = rng.integers(-32768, 32768, (37, 53), dtype=np.int16)
    stored[0, :3] = [-32768, 32767, 0]
    for bscale, bzero, blank in ((1.0, 32768.0, None), (1.0, 0.0, None), (0.37, 12.5, -32768), (2.0, -3.0, 17)):
        path = tmp_path / f"frame_{bscale}_{bzero}.fits"
        hdu = fits.PrimaryHDU(stored)
        hdu.header["BSCALE"], hdu.header["BZERO"] = bscale, bzero
        if blank is not None:
            hdu.header["BLANK"] = blank
        hdu.writeto(path, output_verify="silentfix")
        want = stored.astype(np.float32)
        if bscale != 1.0:
            want *= np.float32(bscale)
        if bzero != 0.0:
            want += np.float32(bzero)
        if blank is not None:
            want[stored == blank] = np.nan
        with FrameSource(path) as src:
            assert src.raw16
            whole = src.read()
            band = np.empty((10, 53), np.float32)
            src.fill_rows(20, 30, band)
            # through a scratch of 3 rows and a bit (bands of 3, the last of 1), or less than a row
            banded, tiny = np.empty((37, 53), np.float32), np.empty((10, 53), np.float32)
            scratch = np.full(3 * src.raw_bytes_per_row + 5, 0xAB, np.uint8)
            src.fill_rows(0, 37, banded, scratch)
            src.fill_rows(20, 30, tiny, np.empty(7, np.uint8))
        assert np.array_equal(whole, want, equal_nan=True), (bscale, bzero, blank)
        assert np.array_equal(band, want[20:30], equal_nan=True)
        assert np.array_equal(banded, want, equal_nan=True)
        assert np.array_equal(tiny, want[20:30], equal_nan=True)
        if blank is None:
            with fits.open(path, do_not_scale_image_data=False) as hdul:
                reference = hdul[0].data.astype(np.float32)
            if bscale == 1.0:
                assert np.array_equal(whole, reference)


def _resident_fraction(path) -> float:
    """The fraction of a file's pages in the page cache: the file mapped and asked with
    Linux's mincore (through ctypes; mapping it reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as fh:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fh.fileno(), 0)
    if address in (None, ctypes.c_void_p(-1).value):
        pytest.skip("cannot map the file")
    try:
        status = ctypes.create_string_buffer(pages)
        if libc.mincore(address, size, status) != 0:
            pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        return sum(b & 1 for b in status.raw[:pages]) / pages
    finally:
        libc.munmap(address, size)


def _page_cache_drops_here(folder) -> bool:
    """Whether the filesystem of ``folder`` drops a durable file's pages when advised to (tmpfs
    cannot: its pages are the file)."""
    kept, probe = folder / "kept-probe.bin", folder / "probe.bin"
    for path in (kept, probe):
        with open(path, "wb") as fh:
            fh.write(os.urandom(1 << 20))
            fh.flush()
            os.fsync(fh.fileno())
            if path == probe:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    # a filesystem whose cache is not the page cache (ZFS, some FUSE) keeps neither resident
    answer = _resident_fraction(kept) > 0.9 and _resident_fraction(probe) < 0.5
    kept.unlink()
    probe.unlink()
    return answer


@pytest.mark.skipif(not hasattr(os, "posix_fadvise") or not os.sys.platform.startswith("linux"),
                    reason="page-cache advice and mincore are Linux's")
def test_an_output_written_uncached_leaves_its_pages_out_of_the_page_cache(tmp_path):
    """write_fits(cached=False) drops the file's pages once it is durable (the next output then
    reuses that memory); the default keeps them; both files are whole and verify."""
    from astropy.io import fits

    from ccdcal.io.writer import write_fits

    if not _page_cache_drops_here(tmp_path):
        pytest.skip("this filesystem keeps a file's pages in memory (tmpfs)")
    data = np.random.default_rng(3).normal(100, 5, (1024, 1024)).astype(np.float32)
    kept = write_fits(tmp_path / "kept.fits", data, uncertainty=data / 10, mask=np.zeros(data.shape, np.uint8))
    dropped = write_fits(tmp_path / "dropped.fits", data, uncertainty=data / 10,
                         mask=np.zeros(data.shape, np.uint8), cached=False)
    assert _resident_fraction(kept) > 0.9
    assert _resident_fraction(dropped) < 0.1
    for path in (kept, dropped):
        with fits.open(path, checksum=True) as hdul:     # read back (from the disk for "dropped")
            np.testing.assert_array_equal(hdul[0].data, data)
            assert len(hdul) == 3


def _direct_io_here(folder) -> bool:
    """Whether the filesystem of ``folder`` takes an aligned O_DIRECT write."""
    import mmap

    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    probe = folder / "direct-probe.bin"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | flag, 0o644)
    except OSError:
        return False
    try:
        with mmap.mmap(-1, 4096) as block:
            return os.write(fd, block) == 4096
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def _hdul_for_writing(shape=(301, 517)):
    from ccdcal.io.writer import add_checksums, fits_hdus

    data = np.random.default_rng(5).normal(100, 5, shape).astype(np.float32)
    hdul = fits_hdus(data, uncertainty=data / 10, mask=(data > 105).astype(np.uint8), unit="adu")
    add_checksums(hdul)
    return data, hdul


def test_a_file_written_directly_is_the_file_written_through_the_page_cache(tmp_path, monkeypatch):
    """write_hdus(direct=True): the same bytes as the buffered writer (sizes that are not
    multiples of the alignment, several staging flushes, the padded last block cut off), the
    checksums verify, and no page of it is left in the page cache where the filesystem takes
    O_DIRECT; where the OS or the filesystem refuses it (no O_DIRECT, EINVAL at the open or at
    the first write) the file is written through the page cache, whole."""
    from astropy.io import fits

    from ccdcal.io import writer

    data, hdul = _hdul_for_writing()
    plain = writer.write_hdus(tmp_path / "plain.fits", hdul)
    monkeypatch.setattr(writer._DirectFile, "_STAGE", 3 * 4096)        # many flushes
    direct = writer.write_hdus(tmp_path / "direct.fits", hdul, direct=True)
    assert direct.read_bytes() == plain.read_bytes()
    assert direct.stat().st_size % 4096 != 0
    with fits.open(direct, checksum=True) as read:
        np.testing.assert_array_equal(read[0].data, data)
    if hasattr(os, "O_DIRECT") and os.sys.platform.startswith("linux") and _page_cache_drops_here(tmp_path):
        writer.write_hdus(tmp_path / "again.fits", hdul, direct=True)
        assert _resident_fraction(tmp_path / "again.fits") < 0.1

    import errno

    real_open, real_write = os.open, os.write
    calls = {"n": 0}

    def refuse_direct_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    def refuse_first_write(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    def short_writes(fd, data):                 # half of each write (whole blocks) at a time
        half = len(data) // 2 // 4096 * 4096
        return real_write(fd, data[:half] if half else data)

    def refuse_the_tail(fd, data):              # a device wanting larger blocks than the padding
        if len(data) % (3 * 4096):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    for name in ("no_flag", "open", "write", "short", "tail"):
        with monkeypatch.context() as m:
            if name == "no_flag":
                m.delattr(os, "O_DIRECT", raising=False)
            elif name == "open":
                m.setattr(os, "open", refuse_direct_open)
            elif name == "write":
                m.setattr(os, "write", refuse_first_write)
            elif name == "short":
                m.setattr(os, "write", short_writes)
            else:
                m.setattr(os, "write", refuse_the_tail)
            out = writer.write_hdus(tmp_path / f"{name}.fits", hdul, direct=True)
        assert out.read_bytes() == plain.read_bytes(), name
    # a full disk in the middle of a direct write: the one-line error, no partial, the old file kept
    from ccdcal.errors import OutputError

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    if not _direct_io_here(tmp_path):
        return                                     # the writes above went through the page cache
    calls["n"] = 0
    old = (tmp_path / "direct.fits").read_bytes()
    with monkeypatch.context() as m:
        m.setattr(os, "write", full_disk)
        with pytest.raises(OutputError, match="disk filled up"):
            writer.write_hdus(tmp_path / "direct.fits", hdul, direct=True)
    assert (tmp_path / "direct.fits").read_bytes() == old
    assert not list(tmp_path.glob(".*.partial"))


def _headers_to_try():
    """Cleaned headers as lights carry them: a real raw's, one ending in HISTORY and COMMENT
    cards, one with blank cards at its end, one of commentary cards only, long strings."""
    from pathlib import Path

    from astropy.io import fits

    from ccdcal.io.frames import clean_header

    raws = sorted(Path(__file__).resolve().parents[2].joinpath("..", "shared", "data").glob("*/raw/*.fit*"))
    headers = [clean_header(fits.getheader(raws[0]))] if raws else []
    h = fits.Header()
    h["OBJECT"] = ("M51", "target")
    h["EXPTIME"] = (90.0, "[s] exposure")
    h["LONGSTR"] = "x" * 150
    h["HISTORY"] = "calibrated"
    h["COMMENT"] = "MASK bit 1: saturated"
    headers.append(clean_header(h))
    blank = clean_header(h)
    blank.append(fits.Card("", "", ""), bottom=True)
    blank.append(fits.Card("", "", ""), bottom=True)
    headers.append(blank)
    only = fits.Header()
    only["COMMENT"] = "nothing else"
    headers.append(only)
    return headers


@pytest.mark.parametrize("with_planes", [True, False])
def test_a_cleaned_header_is_written_byte_for_byte_as_through_astropy_hdus(tmp_path, monkeypatch, with_planes):
    """Issue 31: lights' headers are made as text (no astropy HDUs); the file is the one the
    astropy HDUs of fits_hdus + add_checksums give, byte for byte (CHECKSUM included)."""
    import time as _time

    from astropy.io import fits

    from ccdcal.io import writer

    monkeypatch.setattr(_time, "strftime", lambda fmt, t=None: "2026-01-02T03:04:05")
    rng = np.random.default_rng(3)
    for k, header in enumerate(_headers_to_try()):
        for shape in [(1, 1), (7, 13), (64, 33)]:
            data = rng.normal(100, 30, shape).astype(np.float32)
            unc = np.abs(rng.normal(5, 1, shape)).astype(np.float32) if with_planes else None
            mask = rng.integers(0, 3, shape).astype(np.uint8) if with_planes else None
            fast = writer.write_fits(tmp_path / f"fast{k}.fits", data, header.copy(), uncertainty=unc, mask=mask,
                                     unit="adu", cleaned=True)
            hdul = writer.fits_hdus(data, header.copy(), uncertainty=unc, mask=mask, unit="adu", cleaned=True)
            writer.add_checksums(hdul)
            slow = writer.write_hdus(tmp_path / f"slow{k}.fits", hdul)
            assert fast.read_bytes() == slow.read_bytes(), (k, shape)
            with warnings.catch_warnings():
                warnings.simplefilter("error")          # a bad checksum is only a warning in astropy
                with fits.open(fast, checksum=True) as check:     # astropy verifies the checksums
                    assert np.array_equal(check[0].data, data, equal_nan=True)
                    check.verify("exception")


def test_a_commentary_card_that_quotes_a_checksum_card_is_left_alone(tmp_path):
    """The checksum goes into the CHECKSUM card, not into a HISTORY card whose text looks like one
    (the search is card by card); astropy verifies the file, the caller's header keeps no
    checksum cards."""
    from astropy.io import fits

    from ccdcal.io.writer import write_fits

    header = fits.Header([("HISTORY", "CHECKSUM= '0000000000000000' was reset"), ("OBJECT", "M31")])
    path = write_fits(tmp_path / "h.fits", np.ones((4, 5), np.float32), header, cleaned=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # a bad checksum is only a warning in astropy
        with fits.open(path, checksum=True) as hdul:
            assert hdul[0].header["HISTORY"][0] == "CHECKSUM= '0000000000000000' was reset"
            assert hdul[0].header["CHECKSUM"] != "0" * 16
    assert "CHECKSUM" not in header and "DATASUM" not in header
