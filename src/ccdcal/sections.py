"""IRAF/FITS section strings ``[x1:x2,y1:y2]`` (1-based, inclusive) and numpy slices.

Users and headers speak FITS order (x = column first, 1-based, both ends
included); numpy speaks ``[row, column]``, 0-based, end excluded. This module is
the only place that converts between the two.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

_RANGE = r"\s*(\*|-?\d+\s*:\s*-?\d+|\d+)\s*"
_SECTION_RE = re.compile(rf"^\s*\[{_RANGE},{_RANGE}\]\s*$")


@dataclass(frozen=True)
class Section:
    """A rectangular region in FITS convention: columns x1..x2, rows y1..y2, 1-based, inclusive.

    ``None`` bounds (from ``*``) mean "the whole axis" and are resolved by :meth:`resolve`.
    """

    x1: int | None
    x2: int | None
    y1: int | None
    y2: int | None

    @property
    def is_resolved(self) -> bool:
        return None not in (self.x1, self.x2, self.y1, self.y2)

    def resolve(self, shape: tuple[int, int]) -> Section:
        """Fill ``*`` axes from ``shape`` (ny, nx) and check the section lies inside it."""
        ny, nx = shape
        x1 = 1 if self.x1 is None else self.x1
        x2 = nx if self.x2 is None else self.x2
        y1 = 1 if self.y1 is None else self.y1
        y2 = ny if self.y2 is None else self.y2
        if not (1 <= x1 <= x2 <= nx and 1 <= y1 <= y2 <= ny):
            raise InputError(
                f"section {self} lies outside the image of {nx}x{ny} pixels (x by y); "
                "sections are 1-based and inclusive: [x1:x2,y1:y2]"
            )
        return Section(x1, x2, y1, y2)

    def slices(self, shape: tuple[int, int] | None = None) -> tuple[slice, slice]:
        """Numpy ``(row_slice, column_slice)`` for this section."""
        sec = self.resolve(shape) if shape is not None else self
        if not sec.is_resolved:
            raise InputError(f"section {self} has '*' axes; the image shape is needed")
        return slice(sec.y1 - 1, sec.y2), slice(sec.x1 - 1, sec.x2)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of a resolved section."""
        if not self.is_resolved:
            raise InputError(f"section {self} has '*' axes; the image shape is needed")
        return self.y2 - self.y1 + 1, self.x2 - self.x1 + 1

    def __str__(self) -> str:
        def axis(a: int | None, b: int | None) -> str:
            return "*" if a is None else f"{a}:{b}"

        return f"[{axis(self.x1, self.x2)},{axis(self.y1, self.y2)}]"

    @classmethod
    def from_slices(cls, rows: slice, cols: slice) -> Section:
        """The FITS section of numpy slices with explicit, positive start/stop."""
        return cls(cols.start + 1, cols.stop, rows.start + 1, rows.stop)


def _parse_axis(text: str, original: str) -> tuple[int | None, int | None]:
    text = text.strip()
    if text == "*":
        return None, None
    if ":" in text:
        a, b = (int(v) for v in text.split(":"))
    else:
        a = b = int(text)
    if a < 1 or b < 1:
        raise InputError(f"section {original!r}: pixel indices start at 1")
    return min(a, b), max(a, b)


def parse_section(text: str) -> Section:
    """Parse an IRAF section string such as ``"[1025:1056,1:1024]"`` or ``"[*,10:20]"``.

    Reversed ranges (``[1056:1025,...]``, allowed by IRAF for flipped readout) are
    normalised to ascending order; the region is the same set of pixels.

    Raises
    ------
    InputError
        If the string is not of the form ``[x1:x2,y1:y2]``.
    """
    if not isinstance(text, str):
        raise InputError(f"section {text!r} is not a string like '[x1:x2,y1:y2]'")
    match = _SECTION_RE.match(text)
    if not match:
        raise InputError(
            f"cannot read section {text!r}; write it as '[x1:x2,y1:y2]' (1-based, inclusive)"
        )
    x1, x2 = _parse_axis(match.group(1), text)
    y1, y2 = _parse_axis(match.group(2), text)
    return Section(x1, x2, y1, y2)


def to_slices(text: str | Section, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Numpy slices of a section string for an image of ``shape`` (ny, nx)."""
    section = text if isinstance(text, Section) else parse_section(text)
    return section.slices(shape)
