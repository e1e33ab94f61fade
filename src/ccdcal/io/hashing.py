"""File identity: the XXH3-128 hash of a file's bytes (:data:`HASH`), cached per (path, size,
mtime) within the process, computed ahead in a background thread, taken from the bytes as they
are written or read, or trusted from an earlier run's manifest. :mod:`ccdcal.io.manifest` and the
FITS writer (:mod:`ccdcal.io.writer`) both use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .._shared import state

#: The manifest's key for the hash of a file's bytes, and the algorithm's name.
HASH = "xxh3_128"

# by (resolved path, size, mtime_ns): the hashes known (about 150 bytes each), and those being made
_HASHES = state.Cache("file hashes", max_items=200_000)
_PENDING = state.Cache("file hashes being made")


# folders by their absolute spelling: their resolved path (symlinks followed), for this run
_FOLDERS = state.Cache("resolved folders", max_items=10_000)


def resolved(path: str | os.PathLike) -> str:
    """``str(Path(path).resolve())``, the folder's part remembered for the run: a file's path
    then costs one ``lstat`` (is it a link?), not one per component of its folder. A night's
    lights, their masters and outputs share a few folders."""
    path = Path(path)
    if path.name in ("", ".", ".."):
        return str(path.resolve())
    parent = path.parent
    folder = _FOLDERS.get_or_make(str(parent.absolute()), lambda: str(parent.resolve()))
    target = os.path.join(folder, path.name)
    return str(Path(target).resolve()) if os.path.islink(target) else target


def _hash_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (resolved(path), st.st_size, st.st_mtime_ns)


def new_digest() -> Any:
    """A fresh hash object (``update``, ``hexdigest``) of the manifest's algorithm, :data:`HASH`."""
    import xxhash

    return xxhash.xxh3_128()


def file_hash(path: Path) -> str:
    """The :data:`HASH` of a file's bytes (hex), cached per (path, size, mtime) within the
    process (a hash :func:`prefetch_hashes` is computing is waited for, not computed twice)."""
    path = Path(path)
    key = _hash_key(path)
    known = _HASHES.get(key)
    if known is not None:
        return known
    pending = _PENDING.get(key)
    if pending is not None and not pending.cancelled():
        return pending.result()
    return _compute_hash(path, key)


def _compute_hash(path: Path, key: tuple[str, int, int]) -> str:
    digest = new_digest()
    with open(path, "rb") as fh:
        hash_rest(fh, digest)
    value = digest.hexdigest()
    _HASHES.put(key, value)
    _PENDING.pop(key)
    return value


def hash_rest(fh: Any, digest: Any) -> None:
    """Add the rest of the open file ``fh`` to ``digest``, 4 MiB at a time."""
    for block in iter(lambda: fh.read(1 << 22), b""):
        digest.update(block)  # releases the GIL: hashing overlaps other work


def prefetch_hashes(paths: Any) -> None:
    """Start hashing ``paths`` in one background thread (inputs of a run, while the masters are
    built); :func:`file_hash` then finds the hash made or waits for it."""
    pool = state.thread_pool("hash", workers=1)
    for path in dict.fromkeys(Path(p) for p in paths):
        try:
            key = _hash_key(path)
        except OSError:
            continue
        if key in _HASHES or key in _PENDING:
            continue
        _PENDING.put(key, pool.submit(_compute_hash, path, key))


def remember_hashes(inputs: Any) -> int:
    """Take the hashes of input records of an earlier run (``{"path", "size", "mtime",
    HASH}``) for files whose size and modification time are unchanged, as ``make`` and
    ``rsync`` trust them; returns how many were taken (records of another algorithm are not).
    Not used with ``--force``."""
    taken = 0
    for record in inputs:
        try:
            path = Path(record["path"])
            st = path.stat()
            same = st.st_size == record["size"] and st.st_mtime == record["mtime"] and record.get(HASH)
        except (OSError, KeyError, TypeError):
            continue
        if same:
            _HASHES.put((resolved(path), st.st_size, st.st_mtime_ns), str(record[HASH]))
            taken += 1
    return taken


def remember_digest(path: Path, value: str) -> None:
    """Record the hash of a file this process has just written (taken from the bytes as they
    were written), so :func:`file_hash` does not read it back."""
    remember_hash(_hash_key(Path(path)), value)


def hash_around(path: Path, offset: int, data: Any) -> tuple[tuple[str, int, int], str] | None:
    """The hash of a file whose bytes ``offset .. offset + len(data)`` are ``data``, already read
    (the pixels a scan task read): only the bytes around them are read again. Remembered for
    :func:`file_hash`; returns (key, hash) for another process to :func:`remember_hash`, or
    None when the file changed (size or modification time) meanwhile."""
    path = Path(path)
    key = _hash_key(path)
    known = _HASHES.get(key)
    if known is not None:           # known (from the previous manifest): not hashed again
        return key, known
    view = memoryview(data).cast("B")
    digest = new_digest()
    with open(path, "rb") as fh:
        digest.update(fh.read(offset))
        digest.update(view)             # releases the GIL
        fh.seek(offset + view.nbytes)
        hash_rest(fh, digest)
    if _hash_key(path) != key:
        return None
    value = digest.hexdigest()
    remember_hash(key, value)
    return key, value


def remember_hash(key: Any, value: str) -> None:
    """Record a hash made by :func:`hash_around` (perhaps in a worker process)."""
    _HASHES.put((str(key[0]), int(key[1]), int(key[2])), value)

