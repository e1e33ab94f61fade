"""FITS out, and every other output: written atomically.

Every output is written to a temporary name in the destination folder, flushed, fsynced and
renamed, so a crash never leaves a half file (:func:`write_atomic`); FITS files with their
checksums (:func:`write_fits`, :func:`write_hdus`), through O_DIRECT where asked and the
filesystem takes it.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from ._kernels import to_big_endian, word_sum
from .frames import BLOCK, clean_header
from .hashing import new_digest, remember_digest


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path, cached: bool = True) -> None:
    """A written temporary file made durable (fsync), then put in place (atomic rename);
    ``cached=False``: its pages are then dropped from the page cache (:func:`_uncache`)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
        if not cached:
            _uncache(fh.fileno())
    os.replace(tmp, path)


def _uncache(fd: int) -> None:
    """Drop a durable file's pages from the page cache (where the OS has ``posix_fadvise``).

    For an output this process does not read again: the next file written reuses those pages
    instead of taking fresh memory, and the cache keeps what is still to be read (the inputs).
    On a VM whose free pages go back to the host, fresh memory costs a host fault per page:
    writing 150 MB took 0.42 s into fresh pages and 0.04 s into pages just dropped (measured).
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass                        # only advice: the file is durable either way


def _commit_while(tmp: Path, path: Path, meanwhile: Callable[[], Any], cached: bool = True) -> None:
    """:func:`_commit` in a thread while ``meanwhile()`` runs in this one (the fsync mostly
    waits for the disk); returns when both are done. A failed commit is raised (before an
    error of ``meanwhile``, which it then carries as its context)."""
    failed: list[BaseException] = []

    def commit() -> None:
        try:
            _commit(tmp, path, cached)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            failed.append(exc)

    thread = threading.Thread(target=commit, name="ccdcal-commit", daemon=True)
    thread.start()
    try:
        meanwhile()
    finally:
        thread.join()
        if failed:
            raise failed[0]


def write_atomic(path: Path, write, meanwhile: Callable[[], Any] | None = None, *, durable: bool = True,
                  cached: bool = True, sync_folder: bool = True) -> None:
    """``write(tmp)`` under a temporary name, then fsync and rename into place: ``path`` is
    the old file or the whole new one, never a part. ``meanwhile()``, when given, runs while
    the new file is made durable (:func:`_commit_while`); the call returns once both are done.
    ``durable=False``: renamed without fsync, for a cache whose reader checks what it reads
    (after a power cut the file may be empty or old). ``cached=False``: the durable file's
    pages are dropped from the page cache (:func:`_uncache`). ``sync_folder=False``: the folder
    (the new name in it) is not made durable here; the caller does it once for many files with
    :func:`sync_folders` before it records them (a pipeline's lights, 800 folder fsyncs fewer on
    a night of 800)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{path.parent}: cannot create the output folder ({exc.strerror}); choose another with -o") from exc
    tmp = _tmp_name(path)
    try:
        write(tmp)
        if not durable:
            os.replace(tmp, path)
        elif meanwhile is None:
            _commit(tmp, path, cached)
        else:
            _commit_while(tmp, path, meanwhile, cached)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError):
            if exc.errno == errno.ENOSPC:
                raise OutputError(
                    f"{path}: the disk filled up while writing; the partial file was removed and"
                    " earlier outputs are intact: free space and rerun"
                ) from exc
            if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise OutputError(f"{path.parent}: cannot write there ({exc.strerror}); choose another folder with -o") from exc
            raise OutputError(f"{path}: writing failed ({exc.strerror or exc}); rerun when fixed") from exc
        raise
    if durable and sync_folder:
        _fsync_dir(path.parent)


def sync_folders(paths: Any) -> None:
    """Make the names of files written with ``sync_folder=False`` durable: one fsync per folder."""
    for folder in dict.fromkeys(Path(p).parent for p in paths):
        _fsync_dir(folder)


def write_fits(
    path: str | os.PathLike,
    data: np.ndarray,
    header: Any = None,
    *,
    uncertainty: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    unit: str | None = None,
    meanwhile: Callable[[str], Any] | None = None,
    cached: bool = True,
    cleaned: bool = False,
    sync_folder: bool = True,
) -> Path:
    """Write a float32 image (+ optional ``UNCERT`` and ``MASK`` extensions) atomically.

    The result reads back with ``astropy.nddata.CCDData.read(path)``: primary HDU =
    data with ``BUNIT``, ``UNCERT`` = standard deviation, ``MASK`` = uint8 bitmask
    (non-zero = bad). CHECKSUM/DATASUM are written on every HDU.

    astropy makes the headers (:func:`fits_hdus`); :func:`add_checksums` sums the data in
    numba kernels; :func:`write_hdus` streams the data out big-endian in blocks and takes the
    file's hash from the bytes as they are written (remembered for the manifest, so the
    output is not read back to hash it).

    ``meanwhile(datasum)`` (the primary HDU's DATASUM), when given, runs once the bytes are
    written, while the file is made durable and put in place (the fsync waits for the disk):
    a caller's next work need not wait for it. The call returns once both are done.

    ``cached=False``: once durable, the file's pages are dropped from the page cache, for an
    output the caller will not read again soon (a pipeline's lights): the next file written
    then reuses that memory, and the cache keeps the inputs still to be read.

    ``sync_folder=False``: as for :func:`write_atomic` (the caller calls :func:`sync_folders`).

    ``cleaned``: ``header`` was made by :func:`ccdcal.io.frames.clean_header` (and cards set on
    it since, which astropy checks as they are set): it is used as it is, not cleaned and
    verified again (two thirds of a small light's header time).
    """
    hdul = _plain_hdus(data, header, uncertainty, mask, unit) if cleaned and header is not None else None
    if hdul is None:
        hdul = fits_hdus(data, header, uncertainty=uncertainty, mask=mask, unit=unit, cleaned=cleaned)
        add_checksums(hdul)
    datasum = str(hdul[0].header["DATASUM"])
    return write_hdus(path, hdul, meanwhile=None if meanwhile is None else partial(meanwhile, datasum),
                      cached=cached, sync_folder=sync_folder)


class _PlainHeader:
    """A finished header as text (what :func:`_write_hdus_to` writes), its DATASUM kept."""

    def __init__(self, text: str, datasum: str):
        self.text, self._datasum = text, datasum

    def tostring(self) -> str:
        return self.text

    def __getitem__(self, key: str) -> str:
        if key != "DATASUM":
            raise KeyError(key)
        return self._datasum


@dataclass(frozen=True)
class _PlainHDU:
    header: _PlainHeader
    data: np.ndarray


#: keywords the structure of an HDU sets: a cleaned header holding one goes through astropy
_SET_BY_STRUCTURE = re.compile(r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|XTENSION|GROUPS|BSCALE|BZERO|BLANK"
                               r"|EXTNAME|EXTVER|CHECKSUM|DATASUM)$")


@lru_cache(maxsize=32)
def _structure(specs: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[str, ...]:
    """The cards astropy puts first in each HDU of an HDUList of these (dtype, shape) arrays
    (SIMPLE or XTENSION, BITPIX, NAXIS*, EXTEND or PCOUNT/GCOUNT), as text: made once by astropy
    per layout, so the plain path writes what astropy writes."""
    from astropy.io import fits

    arrays = [np.empty(shape, dtype) for dtype, shape in specs]
    mark = "ZZOWNCRD"    # a card of the HDU's own header, as fits_hdus gives every HDU one

    def own() -> Any:
        return fits.Header([(mark, 0)])

    hdul = fits.HDUList([fits.PrimaryHDU(arrays[0], header=own())]
                        + [fits.ImageHDU(a, header=own()) for a in arrays[1:]])
    hdul.update_extend()
    texts = []
    for hdu in hdul:
        text = hdu.header.tostring(endcard=False, padding=False)
        texts.append(text[: text.index(mark)])
    return tuple(texts)


def _plain_hdus(data: np.ndarray, header: Any, uncertainty: np.ndarray | None, mask: np.ndarray | None,
                unit: str | None) -> list[_PlainHDU] | None:
    """The HDUs of :func:`write_fits` for a cleaned ``header`` with their checksums, the headers
    made as text: astropy's cards for the structure (:func:`_structure`) and for each header's
    own cards (CHECKSUM and DATASUM placed by astropy's rules), the checksum set in the text.
    The bytes are those :func:`fits_hdus` and :func:`add_checksums` give, without building
    astropy HDUs (which copy each header and verify every card through astropy's configuration:
    most of the time of writing a small light). None when the header holds a structural card."""
    from astropy.io import fits

    if any(_SET_BY_STRUCTURE.match(key) for key in header.keys()):
        return None
    planes = [np.ascontiguousarray(data, dtype=np.float32)]
    own = [header]
    if unit is not None:
        header["BUNIT"] = (unit, "physical unit of the data")
    if uncertainty is not None:
        uh = fits.Header()
        uh["UTYPE"] = ("StdDevUncertainty", "uncertainty type (astropy.nddata)")
        if unit is not None:
            uh["BUNIT"] = unit
        uh["EXTNAME"] = ("UNCERT", "extension name")
        planes.append(np.ascontiguousarray(uncertainty, dtype=np.float32))
        own.append(uh)
    if mask is not None:
        mh = fits.Header()
        mh["EXTNAME"] = ("MASK", "extension name")
        planes.append(np.ascontiguousarray(mask, dtype=np.uint8))
        own.append(mh)
    if len(header) == 0 or all(card.keyword in ("COMMENT", "HISTORY", "") for card in header.cards):
        return None   # astropy would place the checksum cards among the structure's
    structure = _structure(tuple((plane.dtype.str, plane.shape) for plane in planes))
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    hdus = []
    for first, cards, plane in zip(structure, own, planes, strict=True):
        datasum = _datasum(plane)
        cards["CHECKSUM"] = ("0" * 16, f"HDU checksum updated {when}")
        cards["DATASUM"] = (str(datasum), f"data unit checksum updated {when}")
        text = first + cards.tostring(endcard=False, padding=False) + "END".ljust(80)
        text += " " * (-len(text) % BLOCK)
        at = _card_at(text, "CHECKSUM= '" + "0" * 16 + "'") + 11
        hsum = _ones_complement(_header_words(text.encode("ascii")) + datasum)
        text = text[:at] + _checksum_text(~hsum & 0xFFFFFFFF) + text[at + 16:]
        hdus.append(_PlainHDU(_PlainHeader(text, str(datasum)), plane))
    for key in ("CHECKSUM", "DATASUM"):          # the caller's header as it came (BUNIT aside)
        header.remove(key, ignore_missing=True)
    return hdus


def _card_at(text: str, start: str) -> int:
    """The offset of the first card of a header's ``text`` that starts with ``start``."""
    for at in range(0, len(text), 80):
        if text.startswith(start, at):
            return at
    raise ValueError(f"no card starts with {start!r}")


def fits_hdus(data: np.ndarray, header: Any = None, *, uncertainty: np.ndarray | None = None,
              mask: np.ndarray | None = None, unit: str | None = None, cleaned: bool = False) -> Any:
    """The HDUList :func:`write_fits` writes (headers complete but for the checksums);
    ``cleaned`` as for :func:`write_fits`."""
    from astropy.io import fits

    hdr = header if (cleaned and header is not None) else clean_header(header)
    if unit is not None:
        hdr["BUNIT"] = (unit, "physical unit of the data")
    hdus = [fits.PrimaryHDU(np.ascontiguousarray(data, dtype=np.float32), header=hdr)]
    if uncertainty is not None:
        uh = fits.Header()
        uh["UTYPE"] = ("StdDevUncertainty", "uncertainty type (astropy.nddata)")
        if unit is not None:
            uh["BUNIT"] = unit
        hdus.append(fits.ImageHDU(np.ascontiguousarray(uncertainty, dtype=np.float32), header=uh, name="UNCERT"))
    if mask is not None:
        hdus.append(fits.ImageHDU(np.ascontiguousarray(mask, dtype=np.uint8), name="MASK"))
    hdul = fits.HDUList(hdus)
    if not cleaned:
        hdul.verify("silentfix")
    hdul.update_extend()
    return hdul


def write_hdus(path: str | os.PathLike, hdul: Any, *, meanwhile: Callable[[], Any] | None = None,
               cached: bool = True, direct: bool = False, sync_folder: bool = True) -> Path:
    """Write ``hdul`` (from :func:`fits_hdus`, with :func:`add_checksums` applied) atomically;
    ``meanwhile``, ``cached`` and ``sync_folder`` as for :func:`write_fits`. ``direct``: bypass the page cache
    (``O_DIRECT``, :class:`_DirectFile`) where the filesystem allows it, for a file the caller
    holds in memory and writes in the background: each write then waits for the disk."""
    path = Path(path)
    digest: list[str] = []
    write_atomic(path, lambda tmp: digest.append(_write_hdus(tmp, hdul, direct)), meanwhile,
                  cached=cached and not direct, sync_folder=sync_folder)

    remember_digest(path, digest[0])
    return path


_WRITE_WORDS = 1 << 20  # 4 MiB of data converted and written at a time


def _ones_complement(total: int) -> int:
    """Fold a sum of 32-bit words into a 32-bit ones' complement sum (end-around carries)."""
    while total >> 32:
        total = (total & 0xFFFFFFFF) + (total >> 32)
    return total


def _checksum_text(value: int) -> str:
    """The 16 characters of a FITS CHECKSUM card for the ones' complement ``value`` (the
    complement of the HDU's sum), as the FITS checksum convention encodes it: each byte is
    spread over four printable characters, nudged off the punctuation between the digits and
    the letters, then the string is rotated one place to the right."""
    punctuation = set(range(0x3A, 0x41)) | set(range(0x5B, 0x61))
    chars = [0] * 16
    for i in range(4):
        byte = (value >> (24 - 8 * i)) & 0xFF
        base = byte // 4 + 0x30
        quad = [base + byte % 4, base, base, base]
        moved = True
        while moved:
            moved = False
            for j in (0, 2):
                while quad[j] in punctuation or quad[j + 1] in punctuation:
                    quad[j] += 1
                    quad[j + 1] -= 1
                    moved = True
        for j in range(4):
            chars[4 * j + i] = quad[j]
    return bytes(chars[-1:] + chars[:-1]).decode("ascii")


def _header_words(text: bytes) -> int:
    return int(np.frombuffer(text, dtype=">u4").sum(dtype=np.uint64))


def _datasum(data: np.ndarray) -> int:
    """The FITS data checksum (ones' complement sum of the big-endian 32-bit words) of an
    array as the file stores it: 8-bit or 32-bit values."""
    words = data.reshape(-1)
    if words.dtype.itemsize == 1:  # bytes: words are read big-endian from the byte stream
        whole = words[: words.size - words.size % 4].view(np.uint32)
        total = int(word_sum(whole, True))
        tail = words[whole.size * 4:].tobytes() + b"\0" * (-words.nbytes % 4)
        total += int.from_bytes(tail, "big") if tail else 0
    else:   # 32-bit numbers: the stored big-endian word has the native word's value
        total = int(word_sum(words.view(np.uint32), False))
    return _ones_complement(total)


def add_checksums(hdul: Any) -> None:
    """Set DATASUM and CHECKSUM on every HDU of ``hdul`` (the FITS checksum convention), the data
    summed as the file will store them, in numba kernels."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    for hdu in hdul:
        datasum = _datasum(hdu.data)
        header = hdu.header
        header["CHECKSUM"] = ("0" * 16, f"HDU checksum updated {when}")
        header["DATASUM"] = (str(datasum), f"data unit checksum updated {when}")
        hsum = _ones_complement(_header_words(header.tostring().encode("ascii")) + datasum)
        header["CHECKSUM"] = _checksum_text(~hsum & 0xFFFFFFFF)


def _write_hdus(tmp: Path, hdul: Any, direct: bool = False) -> str:
    """Write the HDUs of ``hdul`` to ``tmp`` as they are; returns the file's hash (the manifest's).

    ``direct``: through ``O_DIRECT`` where the OS and the filesystem take it (:class:`_DirectFile`),
    else through the page cache."""
    if direct:
        try:
            with _DirectFile(tmp) as fh:
                return _write_hdus_to(fh, hdul)
        except _NoDirect:
            pass
    with open(tmp, "wb") as fh:
        return _write_hdus_to(fh, hdul)


class _NoDirect(Exception):
    """O_DIRECT is not available here (the caller writes through the page cache instead)."""


class _DirectFile:
    """A new file written with ``O_DIRECT``: the bytes go from an aligned staging buffer to the
    disk without passing through the page cache. For a file this process holds in memory and
    will not read (a master written by the writer thread): no page-cache pages are taken, which
    on the VM measured cost 3-4 ms of kernel time per MB when the host had to back them afresh
    (the same bytes written directly: 0.05 s of CPU per GB). Writes go out in whole aligned
    blocks; the last is padded and the file cut to its size. :class:`_NoDirect` when the OS or
    the filesystem (tmpfs) refuses it, before or at the first write."""

    _ALIGN = 4096
    _STAGE = 8 << 20
    _REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)

    def __init__(self, path: Path):
        import mmap

        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            raise _NoDirect
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        except OSError as exc:
            if exc.errno in self._REFUSED:
                raise _NoDirect from exc
            raise
        try:
            self._stage = mmap.mmap(-1, self._STAGE)      # page-aligned
        except BaseException:
            os.close(self._fd)
            raise
        self._path = path
        self._view = memoryview(self._stage)
        self._used = 0
        self._size = 0
        self._offset = 0

    def __enter__(self) -> _DirectFile:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            if kind is None:
                self._finish()
        finally:
            self._view.release()
            self._stage.close()
            os.close(self._fd)

    def write(self, data: Any) -> int:
        data = memoryview(data).cast("B")
        done = 0
        while done < len(data):
            n = min(len(data) - done, self._STAGE - self._used)
            self._view[self._used:self._used + n] = data[done:done + n]
            self._used += n
            done += n
            if self._used == self._STAGE:
                self._flush(self._STAGE)
        self._size += done
        return done

    def _flush(self, nbytes: int) -> None:
        """The first ``nbytes`` (aligned) of the staging buffer to the file. A short write goes
        on with the rest, so that a full disk is reported by its own error."""
        done = 0
        while done < nbytes:
            try:
                with self._view[done:nbytes] as chunk:
                    written = os.write(self._fd, chunk)
            except OSError as exc:
                if exc.errno in self._REFUSED and self._offset == 0:   # the filesystem refuses it
                    raise _NoDirect from exc
                raise
            if written <= 0 or written % self._ALIGN:
                raise OSError(errno.EIO, f"{self._path}: direct write stopped after {self._offset + done + written}"
                                         " bytes")
            done += written
        self._offset += nbytes
        self._used = 0

    def _finish(self) -> None:
        """The last, partial block: padded to the alignment and the file cut to its size; where
        the device wants larger blocks than that, written through the page cache instead."""
        if self._used:
            padded = -(-self._used // self._ALIGN) * self._ALIGN
            self._view[self._used:padded] = bytes(padded - self._used)
            try:
                self._flush(padded)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                fd = os.open(self._path, os.O_WRONLY)
                try:
                    with self._view[:self._used] as tail:
                        if os.pwrite(fd, tail, self._offset) != len(tail):
                            raise OSError(errno.EIO, f"{self._path}: short write") from exc
                finally:
                    os.close(fd)
        os.ftruncate(self._fd, self._size)


def _write_hdus_to(fh: Any, hdul: Any) -> str:
    """The bytes of ``hdul``'s HDUs to the open file ``fh``; returns their hash."""

    digest = new_digest()

    def put(chunk: Any) -> None:
        digest.update(chunk)  # releases the GIL for large blocks
        fh.write(chunk)

    for hdu in hdul:
        words = hdu.data.reshape(-1)
        put(hdu.header.tostring().encode("ascii"))
        if words.dtype.itemsize == 1:
            put(memoryview(words))
        else:
            native = words.view(np.uint32)
            buffer = np.empty(min(_WRITE_WORDS, native.size), np.uint32)
            for start in range(0, native.size, _WRITE_WORDS):
                part = native[start:start + _WRITE_WORDS]
                out = buffer[: part.size]
                to_big_endian(part, out)
                put(memoryview(out).cast("B"))
        put(b"\0" * (-words.nbytes % BLOCK))
    return digest.hexdigest()


def write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write a text file atomically (temporary name, fsync, rename); ``durable`` as for
    :func:`write_bytes`."""
    path = Path(path)

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    write_atomic(path, write, durable=durable)
    return path


def write_bytes(path: str | os.PathLike, payload: bytes, *, durable: bool = True) -> Path:
    """Write a binary file atomically (temporary name, fsync, rename). ``durable=False``: no
    fsync, for a cache whose reader checks it (the report's previews, checked by their hashes)."""
    path = Path(path)
    write_atomic(path, lambda tmp: tmp.write_bytes(payload), durable=durable)
    return path
