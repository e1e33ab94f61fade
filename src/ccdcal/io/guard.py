"""The rules every command keeps with its inputs and outputs: an output never resolves to an
input (links followed), an output folder is never a folder of inputs, and one run at a time
writes an output folder (an advisory lock the OS releases when the process ends, however).

Each check costs a ``stat`` per file (O(files), never O(pixels)).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from .._shared.names import printable
from ..errors import InputError

__all__ = ["LOCK_NAME", "OUTPUT_FOLDERS", "output_lock", "reduce_inputs", "refuse_overwrite"]

#: The folders ``reduce`` writes inside its output folder (never scanned as inputs).
OUTPUT_FOLDERS = ("masters", "calibrated", "previews", "stacked")

#: The lock file of an output folder: its content is the pid of the run that last took it.
LOCK_NAME = ".ccdcal.lock"


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)          # links followed: a link to an input is that input
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _RealPaths:
    """``os.path.realpath`` of many files, each folder resolved once (a night's thousands of
    frames share a few folders: one ``lstat`` per file, not one per path component)."""

    def __init__(self) -> None:
        self._folders: dict[str, str] = {}
        self._files: dict[str, str] = {}

    def folder(self, path: str | os.PathLike) -> str:
        path = os.path.abspath(path)
        real = self._folders.get(path)
        if real is None:
            real = self._folders[path] = os.path.realpath(path)
        return real

    def __call__(self, path: str | os.PathLike) -> str:
        key = os.fspath(path)
        real = self._files.get(key)
        if real is None:
            folder, name = os.path.split(os.path.abspath(key))
            full = os.path.join(self.folder(folder), name)
            real = self._files[key] = os.path.realpath(full) if os.path.islink(full) else full
        return real


def _under(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overwrite(inputs: Iterable[str | os.PathLike], *, files: Iterable[str | os.PathLike] = (),
                     folders: Iterable[str | os.PathLike] = (),
                     input_folders: Iterable[str | os.PathLike] = (), _real: _RealPaths | None = None) -> None:
    """Stop before any work when an output would write over an input.

    Parameters
    ----------
    inputs : iterable of path-like
        Every input file of the command.
    files : iterable of path-like
        Output files (``combine -o``, ``stack -o``): refused when one is an input (the same file,
        whatever link or hard link leads to it).
    folders : iterable of path-like
        Output folders whose files the command writes (``reduce``'s folder and its
        :data:`OUTPUT_FOLDERS`, ``calibrate -o``): refused when one resolves to a folder holding
        an input, or to a folder given as input.
    input_folders : iterable of path-like
        Folders given as inputs (searched for frames).

    Raises
    ------
    InputError
        One line naming the output and the input it would overwrite (exit code 2).
    """
    inputs = list(inputs)
    files = [Path(p) for p in files]
    real = _real or _RealPaths()
    if files:
        by_identity = {ident: p for p in inputs if (ident := _identity(p)) is not None}
        for out in files:
            hit = by_identity.get(_identity(out)) if out.exists() else None
            if hit is not None:
                same = "is" if os.path.abspath(out) == os.path.abspath(hit) else "leads to"
                raise InputError(f"{printable(out)}: the output {same} the input {printable(hit)}, which"
                                 " ccdcal never overwrites; choose another output name")
    held: dict[str, str | os.PathLike] = {}
    for p in inputs:
        held.setdefault(os.path.dirname(real(p)), p)
    given = {real.folder(f): Path(f) for f in input_folders}
    for folder in map(Path, folders):
        where = real.folder(folder)
        if where in given:
            raise InputError(f"{printable(folder)}: the output folder {_as(folder, where)}is the input folder"
                             f" {printable(given[where])}; choose an output folder that holds no inputs")
        if where in held:
            raise InputError(f"{printable(folder)}: the output folder {_as(folder, where)}holds the input"
                             f" {printable(held[where])}; outputs would mix with or overwrite the raws:"
                             " choose an output folder that holds no inputs")


def reduce_inputs(files: Iterable[str | os.PathLike], out_dir: str | os.PathLike,
                  input_folders: Iterable[str | os.PathLike] = (),
                  named: Iterable[str | os.PathLike] = (),
                  library: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """The inputs of ``reduce`` into ``out_dir``: ``files`` less what an earlier run wrote in
    the output folders (OUT/masters, OUT/calibrated, ...); refused, before any work, when an
    output folder is an input folder or holds inputs of its own (OUT itself, or a subfolder
    that is a link to elsewhere, say to RAW). Files under OUT are read only where an input
    folder lies inside it, or where they are ``named`` (given one by one). ``library``: the
    ``--masters`` folders and files, read and never written: refused the same way.

    Raises
    ------
    InputError
        One line naming the folder and an input in it (exit code 2).
    """
    real = _RealPaths()
    input_folders = [Path(f) for f in input_folders]
    out_dir = Path(out_dir)
    out_real = real.folder(out_dir)
    # OUT's own subfolders hold earlier outputs (one that is a link leads somewhere else); the
    # rest of OUT is read only where an input folder lies inside it (night/raw -o night)
    ours = [os.path.join(out_real, name) for name in OUTPUT_FOLDERS if not (out_dir / name).is_symlink()]
    inside = [g for f in input_folders if _under(g := real.folder(f), out_real)]
    named = {real(p) for p in named}

    def kept(path: Path) -> bool:
        where = real(path)
        if any(_under(where, folder) for folder in ours):
            return False
        return not _under(where, out_real) or where in named or any(_under(where, g) for g in inside)

    found = [Path(p) for p in files if kept(p)]
    folders = [out_dir, *(out_dir / name for name in OUTPUT_FOLDERS)]
    library = [Path(p) for p in library]
    refuse_overwrite([*found, *(p for p in library if p.is_file())], folders=folders,
                     input_folders=[*input_folders, *(p for p in library if p.is_dir())], _real=real)
    return found


def _as(folder: Path, where: str) -> str:
    plain = os.path.join(os.path.realpath(folder.parent), folder.name)
    return "" if plain == where else f"(a link to {printable(where)}) "


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "another ccdcal run"
    return f"pid {text}" if text.isdigit() else "another ccdcal run"


@contextlib.contextmanager
def output_lock(out_dir: str | os.PathLike, *, shared: bool = False) -> Iterator[None]:
    """Hold ``OUT/.ccdcal.lock`` for the duration: exclusive for a run that writes the folder
    (``reduce``, ``calibrate``, ``report``), shared for one that only reads it (``verify``).

    The lock is ``flock``: the OS drops it when the process ends, SIGKILL included, so no stale
    lock survives a crash; the file keeps the pid of the run that last took it. Where the OS
    has no ``flock`` (Windows), or a shared reader cannot create the file (a read-only folder),
    the run goes on unlocked.

    Raises
    ------
    InputError
        When another run holds the folder: "OUT: in use by pid N ..." (exit code 2).
    """
    try:
        import fcntl
    except ImportError:                 # pragma: no cover - Windows
        yield
        return
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        if shared:                      # a read-only folder: nobody can be writing it through us
            yield
            return
        raise InputError(f"{printable(out_dir)}: cannot make its lock file {LOCK_NAME} ({exc.strerror});"
                         " choose a writable output folder") from exc
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{printable(out_dir)}: in use by {_holder(fd)}; wait for that run to finish,"
                             " or choose another output folder") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
