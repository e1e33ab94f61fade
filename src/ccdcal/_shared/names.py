"""Names made from what users and headers say: file-name parts that are safe, bounded and
unique, and text that is safe to print on a terminal.

A header value (FILTER, OBJECT) or a raw file name can hold anything: control characters,
a NUL, slashes, 300 characters. Every output name derived from one goes through
:func:`safe_part` (readable, bounded, a short hash where it was cut), and every set of names
of one run through a :class:`NameBook`, which never hands one name to two groups.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

__all__ = ["NAME_LIMIT", "NameBook", "printable", "safe_part", "short_hash", "unique_stem"]

#: The most characters a name part derived from a header or a file name keeps (a file name
#: holds at most 255 bytes, and a master's or preview's name adds its own words).
NAME_LIMIT = 64

_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def short_hash(text: str, n: int = 6) -> str:
    """``n`` hex digits of the SHA-1 of ``text``: stable across runs, machines and Pythons."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def safe_part(text: str, limit: int = NAME_LIMIT) -> str:
    """``text`` as one readable part of a file name: letters, digits and ``.+-`` kept, every
    other run of characters one ``_``, at most ``limit`` characters (cut ones end with
    ``~`` and a hash of the whole text, so two long values that share a start stay apart).

    Different texts can give one part (``a/b`` and ``a b``): a :class:`NameBook` keeps the
    names of one run apart.
    """
    part = _UNSAFE.sub("_", unicodedata.normalize("NFKC", str(text))).strip("_.") or "none"
    if len(part) > limit:
        part = part[: limit - 7].rstrip("_.") + "~" + short_hash(str(text))
    return part


def unique_stem(text: str, limit: int = NAME_LIMIT) -> str:
    """A file-name stem for ``text`` that no other text gets: :func:`safe_part` when it kept
    ``text`` exactly, else that part with a hash of ``text`` (``a b`` -> ``a_b~5f1c2e``, while
    ``a_b`` stays ``a_b``)."""
    part = safe_part(text, limit)
    if part == text or (len(str(text)) > limit and "~" in part):
        return part
    return f"{part[: limit - 7]}~{short_hash(str(text))}"


def printable(text: object) -> str:
    """``text`` safe to print on a terminal: control and direction-changing characters (an
    escape sequence in a file name could retitle or clear the terminal) written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), str(text))


class NameBook:
    """The output names of one run, each claimed for one group (its key).

    :meth:`claim` returns the name asked for when it is free or already the key's; when
    another group holds it (two FILTERs that make one name, on any filesystem, so compared
    without case), the name gets a short hash of the key, and :attr:`notes` says so.
    """

    def __init__(self) -> None:
        self._owner: dict[str, str] = {}
        self.notes: list[str] = []

    def free(self, name: str, key: str) -> bool:
        """True when ``name`` is nobody's, or already ``key``'s."""
        return self._owner.get(name.casefold(), key) == key

    def claim(self, name: str, key: str, *, label: str = "") -> str:
        """``name`` (a relative path such as ``masters/master_flat_R.fits``) for the group
        ``key``; ``label`` names the group in the note when it cannot have it."""
        folded = name.casefold()
        owner = self._owner.get(folded)
        if owner is None or owner == key:
            self._owner[folded] = key
            return name
        stem, dot, suffix = name.rpartition(".") if "." in name.rsplit("/", 1)[-1] else (name, "", "")
        n = 6
        while True:
            candidate = f"{stem}~{short_hash(key, n)}{dot}{suffix}"
            if self._owner.get(candidate.casefold(), key) == key:
                break
            n += 2
        self._owner[candidate.casefold()] = key
        self.notes.append(f"{label or printable(key)} would have the name {name} of another group;"
                          f" it is written as {candidate}")
        return candidate
