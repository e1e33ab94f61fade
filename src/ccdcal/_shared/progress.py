"""Progress without printing: long library calls take a ``progress`` function from their caller
(the CLI passes :func:`ccdcal.ui.track`, a notebook may pass ``tqdm``-like wrappers) and never
reach the terminal themselves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")

#: ``progress(items, description, total=None)`` returns an iterable over ``items``.
Progress = Callable[..., Iterable[Any]]


def steps(items: Iterable[T], description: str, progress: Progress | None, total: int | None = None) -> Iterable[T]:
    """``items`` as they are, or wrapped by the caller's ``progress`` function."""
    return items if progress is None else progress(items, description, total=total)
