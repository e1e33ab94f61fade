"""FITS in and out: finding files, reading image HDUs as float32 (whole or by rows), writing atomically.

Raw files are opened read-only and never written. Uncompressed images are read
with positioned reads of the data block, so a row range costs only the bytes of
those rows and no page stays resident; compressed (``.fz`` tiles, ``.gz``) images are decompressed
once per source. Every output is written to a temporary name in the destination
folder, flushed, fsynced and renamed, so a crash never leaves a half file.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .._shared.names import printable
from ..errors import CcdcalWarning, InputError, OutputError
from ._kernels import to_big_endian, word_sum
from .hashing import new_digest, remember_digest

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".fits.fz", ".fits.gz", ".fit.gz", ".fts.gz")

# Keywords that describe the storage of the raw data, not the image: never copied to outputs.
_STRUCTURAL = {
    "SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE",
    "BLANK", "CHECKSUM", "DATASUM", "PCOUNT", "GCOUNT", "XTENSION", "ZIMAGE", "ZBITPIX",
    "ZNAXIS", "ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2", "ZCMPTYPE", "ZQUANTIZ", "ZDITHER0",
    "ZTENSION", "ZPCOUNT", "ZGCOUNT", "ZSIMPLE", "ZEXTEND", "ZBLOCKED", "THEAP", "TFIELDS",
    "EXTNAME", "EXTVER", "INHERIT",
}

_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


def is_fits_name(path: Path) -> bool:
    """True when the file name ends like a FITS file (case-insensitive)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in FITS_SUFFIXES)


def find_fits(paths: Iterable[str | os.PathLike], broken: list[tuple[str, str]] | None = None) -> list[Path]:
    """Expand files, folders (recursively, following links to folders) and glob patterns into a
    sorted list of FITS files.

    Parameters
    ----------
    paths : iterable of path-like
        Files, folders and glob patterns.
    broken : list, optional
        Receives ``(path, why)`` for each link met in a folder that leads nowhere (a missing
        target, an unmounted disk, a loop): a frame there would vanish from the night without a
        word. When not given, each is a :class:`~ccdcal.errors.CcdcalWarning`.

    Raises
    ------
    InputError
        If a path does not exist or matches nothing.
    """
    found: dict[Path, None] = {}
    problems: list[tuple[str, str]] = []
    for item in paths:
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            for sub in _walk_fits(path, problems):
                found[sub] = None
        elif path.is_file():
            found[path] = None
        elif glob.has_magic(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True))]
            files = [m for m in matches if m.is_file()]
            if not files:
                raise InputError(f"{printable(text)}: the pattern matches no file; check the path")
            for m in files:
                found[m] = None
        elif path.is_symlink():
            raise InputError(f"{printable(text)}: {_broken_link(path)}; check the path")
        else:
            raise InputError(f"{printable(text)}: no such file or folder; check the path")
    if broken is not None:
        broken.extend(problems)
    else:
        for where, why in problems:
            warnings.warn(f"{printable(where)}: {why}", CcdcalWarning, stacklevel=2)
    return list(found)


def _broken_link(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a link that loops back on itself; not read"
    return f"a link to {printable(os.readlink(path))}, which does not exist (a disk not mounted?); not read"


def _walk_fits(folder: Path, problems: list[tuple[str, str]]) -> list[Path]:
    """The FITS files under ``folder``, sorted; links to folders are followed once each (a link
    back into a folder already searched is named in ``problems``, as is a broken link)."""
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []

    def visit(root: Path) -> None:
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:
            problems.append((str(root), "a link to a folder already searched (a loop); not followed"))
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as exc:
            problems.append((str(root), f"cannot be listed ({exc.strerror}); not read"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            sub = root / entry.name
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                visit(sub)
            elif is_file:
                if is_fits_name(sub):
                    files.append(sub)
            elif entry.is_symlink():
                problems.append((str(sub), _broken_link(sub)))

    visit(folder)
    return sorted(files)


@dataclass(frozen=True)
class ImageHDU:
    """One 2-D image HDU of a file: its index, header (a copy) and shape (ny, nx)."""

    index: int
    header: Any  # astropy.io.fits.Header
    shape: tuple[int, int]
    data_offset: int | None = None  # byte offset of the data of an uncompressed HDU
    tile_rows: int | None = None  # rows per tile of a tile-compressed HDU


def _open(path: Path, memmap: bool = True):
    from astropy.io import fits

    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty (0 bytes); remove it or copy it again")
    if path.name.lower().endswith(".gz"):   # astropy would walk the whole stream to open it
        _check_gzip_header(path)
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            hdul = fits.open(path, mode="readonly", memmap=memmap, lazy_load_hdus=False)
    except PermissionError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror}); check its permissions") from exc
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise InputError(f"{path}: not a readable FITS file ({_short(exc)}); remove it from the inputs") from exc
    notes = (["its header held non-ASCII characters; they are read as '?'"]   # astropy replaced them
             if any("non-ASCII" in str(w.message) for w in said) else [])
    for hdu in hdul:
        notes += clean_cards(hdu.header)
    for note in notes:
        warnings.warn(f"{path.name}: {note}", CcdcalWarning, stacklevel=3)
    return hdul


_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")


def _printable_ascii(text: str) -> bool:
    return text.isascii() and text.isprintable()   # C loops: 3x a regular expression


def clean_cards(header: Any) -> list[str]:
    """Make every card of ``header`` readable, in place; return what was changed.

    FITS cards hold printable ASCII only, but real headers hold a NUL, an escape sequence or
    a UTF-8 byte where a capture program put them: astropy then fails on the first read of
    that value, which would lose the frame (or the night). Such characters become ``?``; a
    card still unreadable after that, or whose keyword held them, is dropped. Costs one regular
    expression over the header's card images (tens of microseconds) when all is well.
    """
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyError

    cards = getattr(header, "_cards", None)
    if cards is None:
        return []
    images = [card._image or "" for card in cards]
    if _printable_ascii("".join(images)):
        return []
    notes = []
    for i in reversed(range(len(images))):
        if _printable_ascii(images[i]):
            continue
        clean = _NOT_PRINTABLE.sub("?", images[i])
        keyword = clean[:8].strip()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                card = fits.Card.fromstring(clean)
                value, comment = card.value, card.comment
            if "?" in keyword:
                raise ValueError(keyword)
            header[i] = (value, comment)
            notes.append(f"{keyword} held characters a FITS card may not (control, NUL or non-ASCII);"
                         f" read as {printable(value)!r}")
        except (ValueError, KeyError, TypeError, VerifyError):
            del header[i]
            notes.append(f"the card {printable(images[i][:8].strip())!r} held characters a FITS card may"
                         " not and could not be read; ignored")
    return notes[::-1]


def _check_gzip_header(path: Path) -> None:
    """Refuse a .gz file whose primary header claims more pixels than memory holds, before
    astropy decompresses (and we copy) its whole stream."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as fh:
            dims = _header_dims(fh)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot decompress ({_short(exc)}); copy the file again") from exc
    why = _too_large(dims)
    if why:
        raise InputError(f"{path}: {why}")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:120]


def _is_compressed(hdu) -> bool:
    from astropy.io import fits

    return isinstance(hdu, fits.CompImageHDU)


def image_hdus(path: str | os.PathLike) -> tuple[list[ImageHDU], list[str]]:
    """List the 2-D image HDUs of a FITS file.

    Returns
    -------
    hdus : list of ImageHDU
        Every HDU with a 2-D image of non-zero size.
    problems : list of str
        Why other HDUs that hold data were not usable (3-D cube, zero size, truncated).

    Raises
    ------
    InputError
        If the file is missing, empty or not FITS.
    """
    from astropy.io.fits.verify import VerifyError

    path = Path(path)
    hdul = _open(path)
    hdus: list[ImageHDU] = []
    problems: list[str] = []
    try:
        size = path.stat().st_size
        gz = path.name.lower().endswith(".gz")
        for index in range(len(hdul)):
            try:
                found = _image_hdu(hdul, index, size, gz, problems)
            except (ValueError, TypeError, KeyError, IndexError, OverflowError, VerifyError) as exc:
                problems.append(f"HDU {index} cannot be read ({_short(exc)})")
                continue
            if found is not None:
                hdus.append(found)
    finally:
        hdul.close()
    return hdus, problems


def _image_hdu(hdul: Any, index: int, size: int, gz: bool, problems: list[str]) -> ImageHDU | None:
    """HDU ``index`` of ``hdul`` as an :class:`ImageHDU` when it is a usable 2-D image; else
    None (with the reason appended to ``problems`` when it holds data)."""
    hdu = hdul[index]
    header = hdu.header
    if not (hdu.is_image or _is_compressed(hdu)):
        return None
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return None
    bitpix = header.get("BITPIX")
    if bitpix not in _BITPIX_DTYPE:
        problems.append(f"HDU {index} has BITPIX = {printable(bitpix)}, which FITS does not define"
                        " (8, 16, 32, 64, -32 or -64)")
        return None
    dims = [int(header.get(f"NAXIS{i}", 0)) for i in range(1, naxis + 1)]
    if naxis == 2 and 0 in dims:
        problems.append(f"HDU {index} is a zero-size image ({dims[0]}x{dims[1]})")
        return None
    if naxis != 2 and not (naxis > 2 and all(d == 1 for d in dims[2:])):  # degenerate axes: 2-D
        problems.append(f"HDU {index} is a {naxis}-D array {tuple(dims)}; ccdcal calibrates 2-D images"
                        " (split the cube into frames first)")
        return None
    why = _too_large(dims)
    if why:
        problems.append(f"HDU {index}: {why}")
        return None
    offset = tile_rows = None
    if _is_compressed(hdu):
        tile_rows = int(hdu._header.get("ZTILE2", dims[1])) if hasattr(hdu, "_header") else dims[1]
    elif gz:
        offset = int(hdul.fileinfo(index)["datLoc"])  # in the decompressed stream
    else:
        info = hdul.fileinfo(index)
        span = abs(int(bitpix)) // 8 * int(np.prod(dims))
        if info["datLoc"] + span > size:
            problems.append(f"HDU {index} is truncated (the file holds {size - info['datLoc']} of"
                            f" {span} data bytes); copy the file again")
            return None
        offset = int(info["datLoc"])
    return ImageHDU(index, header.copy(), (dims[1], dims[0]), offset, tile_rows)


class FrameSource:
    """One 2-D image HDU of a FITS file, read as float32 on demand, whole or by rows.

    The file is opened read-only; nothing is loaded until rows are read. Uncompressed
    data are read with positioned reads (no memmap, so pages read do not stay in this
    process's memory); gzipped files are decompressed once into an anonymous temporary
    file and read the same way; tile-compressed images whose tiles are rows are read by
    section; other tile-compressed images (large tiles) are decoded once and held. Use as a
    context manager, or call :meth:`close`.

    Parameters
    ----------
    path : path-like
        The FITS file.
    hdu : int, optional
        Index of the image HDU; by default the first HDU that holds a 2-D image.
    """

    def __init__(self, path: str | os.PathLike, hdu: int | None = None):
        self.path = Path(path)
        self.name = self.path.name
        hdus, problems = image_hdus(self.path)
        if hdu is None:
            if not hdus:
                why = "; ".join(problems) if problems else "no HDU holds image data"
                raise InputError(f"{self.path}: no 2-D image to read ({why})")
            chosen = hdus[0]
        else:
            matches = [h for h in hdus if h.index == hdu]
            if not matches:
                raise InputError(f"{self.path}: HDU {hdu} holds no usable 2-D image")
            chosen = matches[0]
        self.hdu = chosen.index
        self.header = chosen.header
        self.shape: tuple[int, int] = chosen.shape
        self._offset = chosen.data_offset
        self._tile_rows = chosen.tile_rows
        self.bitpix = int(self.header.get("BITPIX", -32))
        self.bscale = float(self.header.get("BSCALE", 1.0))
        self.bzero = float(self.header.get("BZERO", 0.0))
        self.blank = self.header.get("BLANK") if self.bitpix > 0 else None
        self._file = None          # raw file object for positioned reads (uncompressed data)
        self._hdul = None          # open file of a row-tiled compressed image
        self._decoded: np.ndarray | None = None

    # -- layout ---------------------------------------------------------------------------
    @property
    def data_offset(self) -> int | None:
        """Byte offset of the uncompressed data in the file (None when compressed)."""
        return self._offset

    @property
    def raw_bytes_per_row(self) -> int:
        """Bytes of one stored row (0 when the data are compressed)."""
        return self.shape[1] * abs(self.bitpix) // 8 if self._offset is not None else 0

    @property
    def raw16(self) -> bool:
        """True for an uncompressed 16-bit integer image, whose rows :meth:`read_raw` serves."""
        return self._offset is not None and self.bitpix == 16

    @property
    def integral(self) -> bool:
        """True for a raw 16-bit image whose decoded values are whole numbers."""
        return self.raw16 and self.bscale == 1.0 and float(self.bzero).is_integer() and abs(self.bzero) <= 2**24

    @property
    def adc_maximum(self) -> float | None:
        """The largest value the stored integers can hold, decoded (65535 for unsigned 16-bit
        written as BITPIX 16 + BZERO 32768); None for float data or a BSCALE other than 1."""
        if self.bitpix not in (8, 16, 32) or self.bscale != 1.0:
            return None
        if self.bitpix == 8:
            return 255.0 + self.bzero
        return float(2 ** (self.bitpix - 1) - 1) + self.bzero

    # -- reading --------------------------------------------------------------------------
    def _prepare(self) -> None:
        if self._file is not None or self._decoded is not None or self._hdul is not None:
            return
        if self._offset is not None and self.path.name.lower().endswith(".gz"):
            self._file = self._gunzip()
            return
        if self._offset is not None:
            self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
            return
        rows = self._tile_rows
        if rows is not None and rows <= max(16, self.shape[0] // 16):
            self._hdul = _open(self.path, memmap=False)  # row tiles: read by section
            return
        self._decoded = self._decompress()  # decompress once; scaled (BZERO) tiles cannot be memory-mapped

    def _gunzip(self):
        """Decompress a .gz file once into an anonymous temporary file (bounded memory; the
        file has no name, so it vanishes with the process whatever happens)."""
        import gzip
        import tempfile
        import zlib

        needed = self._offset + self.shape[0] * self.raw_bytes_per_row
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        size = 0
        try:
            with gzip.open(self.path, "rb") as src:
                # buffered: a short write to a full disk is retried and ends in ENOSPC, never lost
                while size < needed and (chunk := src.read(min(1 << 20, needed - size))):
                    tmp.write(chunk)
                    size += len(chunk)
            tmp.flush()
            kept = os.fstat(tmp.fileno()).st_size
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            tmp.close()
            raise InputError(f"{self.path}: cannot decompress ({_short(exc)}); copy the file again") from exc
        except OSError as exc:
            tmp.close()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputError(f"{self.path}: no space in the temporary folder"
                                  f" ({tempfile.gettempdir()}) to decompress it; free space or set"
                                  " TMPDIR") from exc
            raise InputError(f"{self.path}: cannot decompress ({_short(exc)}); copy the file again") from exc
        if kept != size:    # the temporary folder took less than it was given: not the raw's fault
            tmp.close()
            raise OutputError(f"{self.path}: the temporary folder ({tempfile.gettempdir()}) kept {kept}"
                              f" of {size} decompressed bytes (full?); free space or set TMPDIR")
        if size < needed:
            tmp.close()
            raise InputError(f"{self.path}: the file ended early ({size - self._offset} of"
                             f" {needed - self._offset} data bytes); copy it again")
        return tmp

    def _decompress(self) -> np.ndarray:
        hdul = _open(self.path, memmap=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = np.asarray(hdul[self.hdu].data, dtype=np.float32)
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(f"{self.path}: cannot decompress HDU {self.hdu} ({_short(exc)}); copy the file again") from exc
        finally:
            hdul.close()
        return data.reshape(self.shape)

    def _pread(self, y0: int, y1: int, buf) -> None:
        nbytes = memoryview(buf).nbytes
        got = os.preadv(self._file.fileno(), [buf], self._offset + y0 * self.raw_bytes_per_row)
        if got != nbytes:
            raise InputError(f"{self.path}: the file ended early (rows {y0 + 1}-{y1}); copy it again")

    def read_raw(self, y0: int, y1: int, out: np.ndarray) -> None:
        """Read the undecoded bytes of rows ``y0:y1`` of a 16-bit image (:attr:`raw16`) into
        ``out`` (uint16, (rows, nx), C-contiguous); BSCALE/BZERO/BLANK are left to the caller."""
        self._prepare()
        self._pread(y0, y1, memoryview(out).cast("B"))

    def fill_rows(self, y0: int, y1: int, out: np.ndarray, scratch: np.ndarray | None = None) -> None:
        """Decode rows ``y0:y1`` into the float32 array ``out`` (rows, nx).

        ``scratch`` (uint8) is reused for the raw bytes of uncompressed data instead of a new
        buffer: the rows are read and decoded in bands of as many rows as it holds (at least
        one row, ``raw_bytes_per_row`` bytes), the same values as in one piece.
        """
        self._prepare()
        if self._decoded is not None:
            out[...] = self._decoded[y0:y1]
            return
        if self._hdul is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[...] = self._hdul[self.hdu].section[y0:y1]
            return
        per_row = self.raw_bytes_per_row
        if scratch is not None and scratch.size >= per_row:
            band = min(y1 - y0, scratch.size // per_row)
        else:
            band, scratch = y1 - y0, np.empty((y1 - y0) * per_row, np.uint8)
        stored = np.dtype(_BITPIX_DTYPE[self.bitpix])
        for a in range(y0, y1, max(band, 1)):
            b = min(y1, a + band)
            buf = scratch[: (b - a) * per_row]
            self._pread(a, b, buf)
            self.decode_stored(buf.view(stored).reshape(b - a, self.shape[1]), out[a - y0:b - y0])

    def decode_stored(self, stored: np.ndarray, out: np.ndarray) -> None:
        """Decode stored values (as BITPIX gives them, any byte order, e.g. rows of the bytes
        :meth:`read_raw` read viewed as ``">i2"``) into the float32 ``out`` of the same shape:
        BSCALE, then BZERO, each step in float32; BLANK becomes NaN."""
        np.copyto(out, stored, casting="unsafe")
        if self.bscale != 1.0:
            out *= np.float32(self.bscale)
        if self.bzero != 0.0:
            out += np.float32(self.bzero)
        if self.blank is not None:
            out[stored == self.blank] = np.nan

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        """Rows ``y0:y1`` (numpy order, 0-based, end excluded) as a new float32 array."""
        out = np.empty((y1 - y0, self.shape[1]), np.float32)
        self.fill_rows(y0, y1, out)
        return out

    def read(self) -> np.ndarray:
        """The whole image as a new float32 array of shape (ny, nx)."""
        return self.read_rows(0, self.shape[0])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
        self._decoded = None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FrameSource({str(self.path)!r}, hdu={self.hdu}, shape={self.shape})"

    def __getstate__(self):
        # Sources travel to worker processes as path + hdu; each side opens its own file.
        state = self.__dict__.copy()
        state["_file"] = None
        state["_hdul"] = None
        state["_decoded"] = None
        return state


def datasum_of(path: str | os.PathLike) -> str:
    """The DATASUM card of a FITS file's primary HDU ("" when it has none or cannot be read)."""
    from astropy.io import fits

    try:
        return str(fits.getheader(path, 0).get("DATASUM", ""))
    except (OSError, ValueError):
        return ""


def primary_pixels(path: str | os.PathLike) -> int:
    """NAXIS1 × NAXIS2 of a FITS file's primary image, read from its header cards without
    astropy (cheap beside a scan that holds the GIL); 0 unless it is 2-D."""
    with open(path, "rb") as fh:
        dims = _header_dims(fh)
    return dims[0] * dims[1] if len(dims) == 2 else 0


def _header_dims(fh: Any) -> list[int]:
    """NAXIS1, NAXIS2, ... of the header at the start of ``fh`` (read from its cards, without
    astropy); [] when there are none or they cannot be read."""
    cards: dict[str, str] = {}
    for _ in range(36):                                   # at most 36 blocks of 36 cards
        block = fh.read(_BLOCK)
        if len(block) < _BLOCK:
            return []
        for i in range(0, _BLOCK, 80):
            card = block[i:i + 80].decode("ascii", "replace")
            key = card[:8].strip()
            if key == "END":
                try:
                    naxis = int(cards.get("NAXIS", "0"))
                    return [int(cards[f"NAXIS{k}"]) for k in range(1, min(naxis, 9) + 1)]
                except (KeyError, ValueError):
                    return []
            if card[8:10] == "= " and key.startswith("NAXIS"):
                cards[key] = card[10:].split("/")[0].strip()
    return []


def physical_memory() -> int:
    """Bytes of memory this machine has (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _too_large(dims: Sequence[int]) -> str | None:
    """Why an image of ``dims`` cannot be read here (more pixels than this machine's memory
    holds as 32-bit floats), or None: checked before anything is decompressed or allocated,
    so a header that lies (a compressed "bomb") costs a line, not the night."""
    pixels = int(np.prod([max(int(d), 0) for d in dims], dtype=np.float64)) if dims else 0
    memory = physical_memory()
    if memory and pixels * 4 > memory:
        shape = "x".join(str(int(d)) for d in dims)
        return (f"the header claims {shape} pixels ({pixels * 4 / 2**30:.0f} GiB as 32-bit floats),"
                f" more than this machine's {memory / 2**30:.0f} GiB of memory")
    return None


def read_header(path: str | os.PathLike, index: int = 0) -> Any:
    """A copy of the header of HDU ``index`` of a FITS file, its unreadable cards made
    readable (:func:`clean_cards`)."""
    path = Path(path)
    hdul = _open(path, memmap=False)
    try:
        return hdul[index].header.copy()
    except IndexError as exc:
        raise InputError(f"{path}: has no HDU {index}") from exc
    finally:
        hdul.close()


def read_image(obj: Any, hdu: int | None = None) -> tuple[np.ndarray, Any]:
    """Any supported input as ``(float32 array, header or None)``.

    Accepts a path, a :class:`FrameSource`, an ``astropy.nddata.CCDData`` or an array-like.
    """
    from astropy.io import fits

    if hasattr(obj, "read_rows") and hasattr(obj, "shape"):  # FrameSource or any row source
        return obj.read_rows(0, obj.shape[0]), getattr(obj, "header", None)
    if isinstance(obj, (str, os.PathLike)):
        with FrameSource(obj, hdu) as src:
            return src.read(), src.header
    if hasattr(obj, "data") and hasattr(obj, "header") and hasattr(obj, "unit"):
        return np.asarray(obj.data, dtype=np.float32), fits.Header(obj.header)
    arr = np.asarray(obj, dtype=np.float32)
    if arr.ndim != 2:
        raise InputError(f"expected a 2-D image, got an array of shape {arr.shape}")
    return arr, None


# -- headers ------------------------------------------------------------------------------
_CARD_LENGTH = 80
_COMMENTARY = {"COMMENT", "HISTORY", ""}


def _truncates(card: Any) -> bool:
    """True when formatting ``card`` makes astropy cut its comment (a VerifyWarning).

    Cards read from a file keep their 80-character image, so this costs nothing for them;
    a new card is formatted once, as writing it would (astropy keeps the image).
    """
    from astropy.io.fits.verify import VerifyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        card.image  # noqa: B018 - formatting the card is what may warn
    return any(issubclass(w.category, VerifyWarning) and "too long" in str(w.message) for w in caught)


def fit_card(card: Any) -> Any:
    """``card``, or a new card with its comment shortened to what fits in 80 characters.

    astropy cuts such comments itself when the header is written, with a "Card is too
    long, comment will be truncated" VerifyWarning for every card; a long *string value*
    is continued on CONTINUE cards instead and needs nothing. The value and the card
    given are never changed (formatting it is all that happens to it).
    """
    from astropy.io import fits
    from astropy.io.fits.verify import VerifyError

    try:
        if card.keyword in _COMMENTARY or not card.comment or not _truncates(card):
            return card
        keyword = card.keyword
        if len(keyword) > 8 or " " in keyword:
            keyword = f"HIERARCH {keyword}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            used = len(fits.Card(keyword, card.value).image.rstrip())
        # Values end at column 30 at least (fixed format); then " / " and the comment.
        room = _CARD_LENGTH - max(used, 30) - len(" / ")
        while room > 0:
            fitted = fits.Card(keyword, card.value, card.comment[:room].rstrip())
            if not _truncates(fitted):
                return fitted
            room -= 1
        return fits.Card(keyword, card.value)
    except (ValueError, KeyError, TypeError, AttributeError, VerifyError):  # cannot rebuild: as read
        return card


def clean_header(header: Any) -> Any:
    """A copy of ``header`` without the keywords that describe the raw storage (BZERO, NAXIS...).

    Comments too long for their card are shortened here (:func:`fit_card`), so that writing
    the header never makes astropy truncate them with a warning.
    """
    from astropy.io import fits

    out = fits.Header()
    if header is None:
        return out
    for card in header.cards:
        if card.keyword in _STRUCTURAL or card.keyword.startswith(("ZNAXIS", "ZTILE", "ZNAME", "ZVAL", "TTYPE", "TFORM")):
            continue
        try:
            out.append(fit_card(card), end=True)
        except (ValueError, KeyError):  # a malformed card in a raw header is left behind
            continue
    return out


def header_value(header: Any, keys: Sequence[str], default: Any = None) -> Any:
    """The first of ``keys`` present in ``header`` with a non-blank value."""
    if header is None:
        return default
    for key in keys:
        if key in header:
            value = header[key]
            if isinstance(value, str):
                value = value.strip()
                if value == "":
                    continue
            if value is None or value.__class__.__name__ == "Undefined":
                continue
            return value
    return default


# -- writing ------------------------------------------------------------------------------
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
                  cached: bool = True) -> None:
    """``write(tmp)`` under a temporary name, then fsync and rename into place: ``path`` is
    the old file or the whole new one, never a part. ``meanwhile()``, when given, runs while
    the new file is made durable (:func:`_commit_while`); the call returns once both are done.
    ``durable=False``: renamed without fsync, for a cache whose reader checks what it reads
    (after a power cut the file may be empty or old). ``cached=False``: the durable file's
    pages are dropped from the page cache (:func:`_uncache`)."""
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
    if durable:
        _fsync_dir(path.parent)


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
    """
    hdul = fits_hdus(data, header, uncertainty=uncertainty, mask=mask, unit=unit)
    add_checksums(hdul)
    datasum = str(hdul[0].header["DATASUM"])
    return write_hdus(path, hdul, meanwhile=None if meanwhile is None else partial(meanwhile, datasum),
                      cached=cached)


def fits_hdus(data: np.ndarray, header: Any = None, *, uncertainty: np.ndarray | None = None,
              mask: np.ndarray | None = None, unit: str | None = None) -> Any:
    """The HDUList :func:`write_fits` writes (headers complete but for the checksums)."""
    from astropy.io import fits

    hdr = clean_header(header)
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
    hdul.verify("silentfix")
    hdul.update_extend()
    return hdul


def write_hdus(path: str | os.PathLike, hdul: Any, *, meanwhile: Callable[[], Any] | None = None,
               cached: bool = True, direct: bool = False) -> Path:
    """Write ``hdul`` (from :func:`fits_hdus`, with :func:`add_checksums` applied) atomically;
    ``meanwhile`` and ``cached`` as for :func:`write_fits`. ``direct``: bypass the page cache
    (``O_DIRECT``, :class:`_DirectFile`) where the filesystem allows it, for a file the caller
    holds in memory and writes in the background: each write then waits for the disk."""
    path = Path(path)
    digest: list[str] = []
    write_atomic(path, lambda tmp: digest.append(_write_hdus(tmp, hdul, direct)), meanwhile,
                  cached=cached and not direct)

    remember_digest(path, digest[0])
    return path


_BLOCK = 2880
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


def add_checksums(hdul: Any) -> None:
    """Set DATASUM and CHECKSUM on every HDU of ``hdul`` (the FITS checksum convention), the data
    summed as the file will store them, in numba kernels."""
    import time

    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
    for hdu in hdul:
        words = hdu.data.reshape(-1)
        if words.dtype.itemsize == 1:  # bytes: words are read big-endian from the byte stream
            whole = words[: words.size - words.size % 4].view(np.uint32)
            total = int(word_sum(whole, True))
            tail = words[whole.size * 4:].tobytes() + b"\0" * (-words.nbytes % 4)
            total += int.from_bytes(tail, "big") if tail else 0
        else:   # 32-bit numbers: the stored big-endian word has the native word's value
            total = int(word_sum(words.view(np.uint32), False))
        datasum = _ones_complement(total)
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
        put(b"\0" * (-words.nbytes % _BLOCK))
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
