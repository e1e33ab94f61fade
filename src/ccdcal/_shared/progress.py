"""Progress without printing: long library calls take ``progress=`` from their caller and
never reach the terminal themselves. :func:`resolve_progress` turns what a caller may give
(None, False, True or a function) into a progress function once, at the start of each public
call; :func:`steps` wraps each stage's work with it."""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

#: ``progress(items, description, total=None)`` returns an iterable over ``items``.
Progress = Callable[..., Iterable[Any]]

#: What ``progress=`` of a public call accepts.
ProgressOption = Progress | bool | None

ACCEPTED = ("True (a progress bar), False or None (silent), or a function "
            "f(items, description, total=None) that returns an iterable over items")


def resolve_progress(progress: ProgressOption) -> Progress | None:
    """The progress function a public call's ``progress=`` stands for.

    Parameters
    ----------
    progress : bool, callable or None
        None or False: silent (None is returned). True: a ``tqdm.auto`` bar, a widget in a
        Jupyter notebook (where ipywidgets is installed) and a text bar on stderr elsewhere.
        A callable ``f(items, description, total=None)`` returning an iterable over
        ``items`` (``tqdm.auto.tqdm`` itself is one; the ``ccdcal`` command passes rich bars):
        returned as it is.

    Returns
    -------
    callable or None

    Raises
    ------
    TypeError
        For any other value, before any work is done (one line that says what is accepted).
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        # imported here, before the call's work: tqdm's own warning where a notebook lacks
        # ipywidgets comes once, outside the warnings a reduction records as its own
        from tqdm.auto import tqdm

        def bar(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
            return tqdm(items, desc=description, total=total)

        return bar
    if callable(progress):
        return progress
    raise TypeError(f"progress={reprlib.repr(progress)} ({type(progress).__name__}): expected {ACCEPTED}")


def steps(items: Iterable[T], description: str, progress: ProgressOption,
          total: int | None = None) -> Iterable[T]:
    """``items`` as they are, or wrapped by the caller's progress (see :func:`resolve_progress`)."""
    progress = resolve_progress(progress)
    return items if progress is None else progress(items, description, total=total)
