"""FITS in: finding files, reading image HDUs as float32 (whole or by rows), headers made fit to copy.

Raw files are opened read-only and never written. Uncompressed images are read
with positioned reads of the data block, so a row range costs only the bytes of
those rows and no page stays resident; compressed (``.fz`` tiles, ``.gz``) images are decompressed
once per source. Writing is :mod:`ccdcal.io.writer`'s.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._shared.names import printable
from ..errors import CcdcalWarning, InputError, OutputError
from .xisf import XISF_SUFFIXES, is_xisf_name, read_xisf, xisf_header

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
BLOCK = 2880  # bytes of a FITS block: headers and data come in whole blocks


def is_fits_name(path: Path) -> bool:
    """True when the file name ends like a FITS file, or an XISF file read as one (case-insensitive)."""
    name = path.name.lower()
    return any(name.endswith(s) for s in FITS_SUFFIXES + XISF_SUFFIXES)


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


def printable_ascii(text: str) -> bool:
    """Whether ``text`` is printable ASCII (space to tilde), as FITS header text must be."""
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
    if printable_ascii("".join(images)):
        return []
    notes = []
    for i in reversed(range(len(images))):
        if printable_ascii(images[i]):
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
    if is_xisf_name(path):
        return _xisf_hdus(path)
    fast = _plain_image_hdus(path)
    if fast is not None:
        return fast
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


_MAX_HEADER_BLOCKS = 1000     # a header longer than this (36,000 cards) is read by astropy


def _header_text(fh: Any, start: int) -> str | None:
    """The header that starts at byte ``start`` of ``fh`` (its whole blocks, END included), when
    it is printable ASCII and ends within :data:`_MAX_HEADER_BLOCKS` blocks; else None."""
    fh.seek(start)
    text = bytearray()
    while len(text) < _MAX_HEADER_BLOCKS * BLOCK:
        block = fh.read(BLOCK)
        if len(block) < BLOCK:
            return None
        text += block
        for i in range(len(text) - BLOCK, len(text), 80):
            if text[i:i + 8] == _END_CARD[:8]:    # the keyword END (not ENDTIME, ENDDATE ...)
                if text[i:i + 80] != _END_CARD:   # END with more on its card: astropy mends it
                    return None
                decoded = text.decode("ascii", "replace")
                return decoded if printable_ascii(decoded) else None
    return None


_END_CARD = b"END" + b" " * 77


def _plain_image_hdus(path: Path) -> tuple[list[ImageHDU], list[str]] | None:
    """:func:`image_hdus` of a plain FITS file (not gzipped, every HDU a primary array or an
    IMAGE extension, headers of printable ASCII) read from its header blocks, each parsed by
    ``astropy.io.fits.Header.fromstring`` (what ``fits.open`` parses them with): a tenth of the
    time of opening the file in astropy, which matters on nights of thousands of small frames.
    None for any other file (compressed, tables, unusual bytes, a truncated header): the
    caller opens it in astropy, which reads what it can and says why."""
    from astropy.io import fits

    if path.name.lower().endswith((".gz", ".fz")):      # compressed: astropy's way
        return None
    hdus: list[ImageHDU] = []
    problems: list[str] = []
    try:
        size = path.stat().st_size
        if size < BLOCK:
            return None
        with open(path, "rb") as fh:
            position = index = 0
            while position < size:
                text = _header_text(fh, position)
                if text is None:
                    return None
                first = text[:30]
                if (index == 0 and first != "SIMPLE  =                    T") or (
                        index > 0 and not text.startswith("XTENSION= 'IMAGE   '")):
                    return None
                header = fits.Header.fromstring(text)
                data = position + len(text)
                naxis, bitpix = header.get("NAXIS"), header.get("BITPIX")
                if not (_whole(naxis) and 0 <= naxis <= 999 and _whole(bitpix) and bitpix in _BITPIX_DTYPE):
                    return None
                dims = [header.get(f"NAXIS{i}", 0) for i in range(1, naxis + 1)]
                if not all(_whole(d) and d >= 0 for d in dims) or "GROUPS" in header or (
                        header.get("PCOUNT", 0) != 0 or header.get("GCOUNT", 1) != 1):
                    return None     # random groups, heaps, odd values: as astropy reads them
                span = abs(bitpix) // 8 * int(np.prod(dims, dtype=np.int64)) if naxis else 0
                found = _plain_image_hdu(index, header, dims, data, span, size, problems)
                if found is not None:
                    hdus.append(found)
                position = data + -(-span // BLOCK) * BLOCK
                index += 1
    except Exception:  # noqa: BLE001 - any surprise (astropy's VerifyError included): astropy's way
        return None
    return hdus, problems


def _whole(value: Any) -> bool:
    """An integer card value (not a bool, a float or a string), as FITS structure keywords hold."""
    return isinstance(value, int) and not isinstance(value, bool)


def _shape_problem(index: int, dims: list[int]) -> str | None:
    """Why HDU ``index`` with axes ``dims`` (NAXIS1, NAXIS2, ...) is no usable 2-D image: zero
    size, more than 2 axes (beyond degenerate ones), more pixels than memory holds; else None."""
    naxis = len(dims)
    if naxis == 2 and 0 in dims:
        return f"HDU {index} is a zero-size image ({dims[0]}x{dims[1]})"
    if naxis != 2 and not (naxis > 2 and all(d == 1 for d in dims[2:])):  # degenerate axes: 2-D
        return (f"HDU {index} is a {naxis}-D array {tuple(dims)}; ccdcal calibrates 2-D images"
                " (split the cube into frames first)")
    why = _too_large(dims)
    return f"HDU {index}: {why}" if why else None


def _plain_image_hdu(index: int, header: Any, dims: list[int], data: int, span: int, size: int,
                     problems: list[str]) -> ImageHDU | None:
    """As :func:`_image_hdu`, for an HDU of :func:`_plain_image_hdus`."""
    if not dims:
        return None
    why = _shape_problem(index, dims)
    if why:
        problems.append(why)
        return None
    if data + span > size:
        problems.append(f"HDU {index} is truncated (the file holds {size - data} of {span} data bytes);"
                        " copy the file again")
        return None
    return ImageHDU(index, header, (dims[1], dims[0]), data, None)


def _xisf_hdus(path: Path) -> tuple[list[ImageHDU], list[str]]:
    """The first image of an XISF file as one image HDU (decoded whole when read)."""
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    header, shape, why = xisf_header(path)
    if why:
        return [], [why]
    too_large = _too_large(shape)
    if too_large:
        return [], [too_large]
    return [ImageHDU(0, header, shape)], []


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
    why = _shape_problem(index, dims)
    if why:
        problems.append(why)
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


def file_stem(path: str | os.PathLike) -> str:
    """A file's name without its FITS or XISF suffixes (``d1047.fits.fz`` -> ``d1047``; other
    dots kept: ``L_-10.00_300s.fits`` -> ``L_-10.00_300s``)."""
    name = Path(path).name
    for suffix in (".fz", ".gz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    base, ext = os.path.splitext(name)
    return base if ext.lower() in (".fits", ".fit", ".fts", ".xisf") else name


def uncertainty_kind(header: Any) -> str:
    """How an UNCERT extension stores the uncertainty: "std", "var" or "ivar" (astropy UTYPE)."""
    utype = str(header.get("UTYPE", "StdDevUncertainty")) if header is not None else ""
    return {"VarianceUncertainty": "var", "InverseVariance": "ivar"}.get(utype, "std")


def as_sigma(values: np.ndarray, kind: str) -> np.ndarray:
    """Uncertainties stored as ``kind`` (:func:`uncertainty_kind`) as standard deviations, in place."""
    if kind == "var":
        np.sqrt(values, out=values)
    elif kind == "ivar":
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(1.0, np.sqrt(values, out=values), out=values)
    return values


def ccddata_planes(source: FrameSource) -> tuple[ImageHDU | None, ImageHDU | None]:
    """The ``MASK`` and ``UNCERT`` image HDUs of ``source``'s file that go with its image (same
    shape, another HDU), as ccdcal and astropy's CCDData write them; None where there is none."""
    planes: dict[str, ImageHDU] = {}
    for hdu in image_hdus(source.path)[0]:
        extname = str(hdu.header.get("EXTNAME", "")).strip().upper()
        if extname in ("MASK", "UNCERT") and hdu.index != source.hdu and hdu.shape == source.shape:
            planes.setdefault(extname, hdu)
    return planes.get("MASK"), planes.get("UNCERT")


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
        if is_xisf_name(self.path):
            data = read_xisf(self.path)
            if data.shape != self.shape:
                raise InputError(f"{self.path}: the XISF image is {data.shape}, its header said {self.shape}")
            return data
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


_DATASUM_VALUE = re.compile(r"DATASUM = '([^']*)'")


def datasum_of(path: str | os.PathLike) -> str:
    """The DATASUM card of a FITS file's primary HDU ("" when it has none or cannot be read).

    Read from the header's text when it is plain (printable, a quoted value: what ccdcal and
    astropy write), else by astropy: the report asks it of every light (1.8 ms through astropy's
    header parsing, 800 times on a night of 800)."""
    from astropy.io import fits

    try:
        with open(path, "rb") as fh:
            text = _header_text(fh, 0)
    except OSError:
        return ""
    if text is not None:
        for at in range(0, len(text), 80):
            if text.startswith("DATASUM ", at):
                card = text[at:at + 80]
                found = _DATASUM_VALUE.match(card)
                if found is not None and card[found.end():found.end() + 1] != "'":   # no '' inside
                    return found.group(1).rstrip()
                break                       # another form: astropy reads it
            if text.startswith("END ", at):
                return ""
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
        block = fh.read(BLOCK)
        if len(block) < BLOCK:
            return []
        for i in range(0, BLOCK, 80):
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
    if is_xisf_name(path):
        if index != 0:
            raise InputError(f"{path}: has no HDU {index}")
        return xisf_header(path)[0]
    hdul = _open(path, memmap=False)
    try:
        return hdul[index].header.copy()
    except IndexError as exc:
        raise InputError(f"{path}: has no HDU {index}") from exc
    finally:
        hdul.close()


def read_colour(path: str | os.PathLike) -> tuple[np.ndarray | None, Any]:
    """A colour image (an RGB cube: 3 planes in the primary HDU, as ccdcal, Siril and PixInsight
    write them) as float32 (3, ny, nx) and its header; (None, None) when the file holds none."""
    path = Path(path)
    if is_xisf_name(path):
        return None, None
    hdul = _open(path, memmap=False)
    try:
        header = hdul[0].header
        if header.get("NAXIS") != 3 or header.get("NAXIS3") != 3:
            return None, None
        return np.asarray(hdul[0].data, dtype=np.float32), header.copy()
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


#: a card image astropy writes back as it is: a keyword of [A-Z0-9_-] padded to 8 columns, "= ", a
#: string, logical, integer or real value (capital exponent), spaces or a printable comment
_STANDARD_CARD = re.compile(
    r"(?=[A-Z0-9_-]{1,8} *= )[A-Z0-9_ -]{8}= "
    r" *(?:'(?:[ -&(-~]|'')*'|[TF]|[+-]?[0-9]+|[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[ED][+-]?[0-9]+)?)"
    r" *(?:/[ -~]*)?")


def _standard_as_read(card: Any) -> bool:
    """Whether ``card`` is a card read from a file and not changed since, whose image is of the
    standard's fixed format (:data:`_STANDARD_CARD`): written back as read, it fits, and astropy's
    verification (which parses its value and comment again when the header is written) has
    nothing to check. Such a card is marked verified."""
    image = getattr(card, "_image", None)
    if (image is None or getattr(card, "_modified", True) or len(image) != _CARD_LENGTH
            or _STANDARD_CARD.fullmatch(image) is None):
        return False
    card._verified = True
    return True


def _surely_fits(card: Any) -> bool:
    """A cheap test that ``card`` needs no refitting: a standard card as read
    (:func:`_standard_as_read`, not even parsed), commentary, no comment, or a short keyword
    whose value and comment are short enough to fit whatever the value's formatting (it takes 20
    columns at most after the 10 of ``KEYWORD= ``, a string its quotes more). A card that cannot
    be read is not sure: :func:`fit_card` deals with it."""
    from astropy.io.fits.verify import VerifyError

    if _standard_as_read(card):
        return True
    try:
        comment = card.comment
        if not comment or card.keyword in _COMMENTARY:
            return True
        return len(card.keyword) <= 8 and len(str(card.value)) + len(comment) < 44
    except (ValueError, KeyError, TypeError, AttributeError, VerifyError):
        return False


def refit_comments(header: Any, fitting: Any = ()) -> Any:
    """``header`` with every comment that would not fit its card shortened (:func:`fit_card`), in
    place; a cheap length test first, so a header of fitting cards costs no card formatting.
    ``fitting``: the ``id`` of cards known to fit (made from their 80 characters), not looked at."""
    for i, card in enumerate(header.cards):
        if (fitting and id(card) in fitting) or _surely_fits(card):
            continue
        fitted = fit_card(card)
        if fitted is not card:
            header[i] = (fitted.value, fitted.comment)
    return header


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
            out.append(card if _surely_fits(card) else fit_card(card), end=True)
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
