"""XISF files (PixInsight's format, which N.I.N.A. and INDI also write) read as FITS frames: the
first image's FITS keywords become a FITS header (with BITPIX/BZERO of its sample format, and
IMAGETYP from the image's ``imageType`` and BAYERPAT from its ``ColorFilterArray`` when the
keywords lack them), its pixels a float32 array. Compression (zlib, lz4, zstd, byte shuffling)
is decoded by the ``xisf`` package. Only one-channel images (mono or CFA) are frames; a colour
image is refused with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

XISF_SUFFIXES = (".xisf",)

# sample format -> (BITPIX, BZERO) of the FITS image that holds the same values
_FORMATS = {"UInt8": (8, 0), "UInt16": (16, 32768), "UInt32": (32, 2**31), "Float32": (-32, 0),
            "Float64": (-64, 0)}


def is_xisf_name(path: Path) -> bool:
    return path.name.lower().endswith(XISF_SUFFIXES)


def _metadata(path: Path) -> dict[str, Any]:
    from xisf import XISF

    try:
        images = XISF(str(path)).get_images_metadata()
    except Exception as exc:  # noqa: BLE001 - the package raises anything on a damaged file
        raise InputError(f"{path}: not a readable XISF file ({str(exc)[:120] or type(exc).__name__});"
                         " remove it from the inputs") from exc
    if not images:
        raise InputError(f"{path}: the XISF file holds no image")
    return images[0]


def _value(text: Any) -> Any:
    """A FITS keyword's value as XISF stores it (text) as the FITS value it stands for."""
    if not isinstance(text, str):
        return text
    raw = text.strip()
    if raw.startswith("'") and raw.endswith("'") and len(raw) >= 2:
        return raw[1:-1].replace("''", "'").rstrip()
    if raw in ("T", "F"):
        return raw == "T"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def xisf_header(path: Path) -> tuple[Any, tuple[int, int], str | None]:
    """The FITS header of the first image of an XISF file, its shape (ny, nx), and why it is not
    a frame (None when it is)."""
    from astropy.io import fits

    meta = _metadata(path)
    width, height, channels = (int(v) for v in meta["geometry"])
    bitpix, bzero = _FORMATS.get(meta.get("sampleFormat", ""), (None, 0))
    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = bitpix if bitpix is not None else -32
    header["NAXIS"] = 2
    header["NAXIS1"] = width
    header["NAXIS2"] = height
    if bzero:
        header["BZERO"] = bzero
    skip = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "BZERO", "BSCALE", "EXTEND"}
    for key, cards in (meta.get("FITSKeywords") or {}).items():
        if key in skip or len(key) > 8:
            continue
        for card in cards:
            try:
                if key in ("HISTORY", "COMMENT"):
                    header[key] = str(card.get("comment") or card.get("value") or "")
                else:
                    header[key] = (_value(card.get("value")), str(card.get("comment", ""))[:60])
            except (ValueError, TypeError):
                continue
    if "IMAGETYP" not in header and meta.get("imageType"):
        header["IMAGETYP"] = (str(meta["imageType"]), "XISF imageType")
    cfa = meta.get("ColorFilterArray")
    if "BAYERPAT" not in header and isinstance(cfa, dict) and cfa.get("pattern"):
        header["BAYERPAT"] = (str(cfa["pattern"]), "XISF ColorFilterArray")
    why = None
    if bitpix is None:
        why = f"XISF sample format {meta.get('sampleFormat')!r} is not read"
    elif channels != 1:
        why = (f"a {channels}-channel XISF image; ccdcal calibrates one-channel frames (mono or a"
               " colour camera's raw CFA)")
    return header, (height, width), why


def read_xisf(path: Path) -> np.ndarray:
    """The first image of an XISF file as float32 (ny, nx)."""
    from xisf import XISF

    try:
        data = XISF(str(path)).read_image(0)
    except Exception as exc:  # noqa: BLE001 - see _metadata
        raise InputError(f"{path}: cannot decode the XISF image ({str(exc)[:120] or type(exc).__name__});"
                         " copy the file again") from exc
    data = np.asarray(data)
    if data.ndim == 3:
        data = data[..., 0]
    return np.ascontiguousarray(data, dtype=np.float32)
