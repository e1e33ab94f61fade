"""Process state, in one place: every cache and background thread pool the package keeps between
calls, with the lifetime it declares, closed by one owner.

A module that keeps something between calls makes a :class:`Cache` (or asks :func:`thread_pool`
for a pool) here, at import; it never keeps a mutable dict or a pool of its own (a test walks the
package for that). :func:`run_scope` is a run's hold on this state: ``reduce`` enters it once, tells
it when a stage ends (:func:`end_stage`: what lives only for that stage is dropped, so the stacks
and the report do not hold the lights' shared arrays), and leaving the outermost scope closes
everything of the run: caches cleared, pools shut down. A notebook keeps nothing of a finished run.

Outside a run (``ccdcal.calibrate`` on one light in a notebook, a dask worker's process) the caches
are still bounded, by count and by bytes, and keep what the next call is likely to need.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: The lifetimes a cache may declare: a stage of a run (dropped when that stage ends, and in any
#: case when the run ends), or the run.
STAGES = ("lights", "run")


class Cache:
    """A bounded, thread-safe map kept between calls: least recently used entries go first.

    Parameters
    ----------
    name : str
        What it keeps (for :func:`snapshot` and error messages); unique.
    until : str
        Its lifetime, one of :data:`STAGES`: it is emptied when that stage of a run ends.
    max_items : int, optional
        At most this many entries.
    max_bytes : int, optional
        Beyond ``min_items`` entries, no more than this many bytes, as ``nbytes`` counts them.
    min_items : int
        Entries kept whatever their bytes (what one task needs at once).
    nbytes : callable, optional
        ``nbytes(values)``: the bytes the values hold together (arrays shared between values
        counted once).
    """

    def __init__(self, name: str, *, until: str = "run", max_items: int | None = None,
                 max_bytes: int | None = None, min_items: int = 0,
                 nbytes: Callable[[list[Any]], int] | None = None) -> None:
        if until not in STAGES:
            raise ValueError(f"cache {name!r}: lifetime {until!r} is none of {STAGES}")
        self.name, self.until = name, until
        self._max_items, self._max_bytes, self._min_items, self._nbytes = max_items, max_bytes, min_items, nbytes
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._making: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()
        _register(self)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of ``key`` (now the most recently used), or ``default``."""
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Keep ``value`` under ``key``; the oldest entries go while a bound is exceeded."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._trim()

    def update(self, items: dict[Hashable, Any]) -> None:
        """:meth:`put` of every item, at once."""
        with self._lock:
            self._items.update(items)
            self._trim()

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Remove ``key``; its value or ``default``."""
        with self._lock:
            return self._items.pop(key, default)

    def discard(self, drop: Callable[[Hashable], bool]) -> None:
        """Remove every key for which ``drop(key)`` is true."""
        with self._lock:
            for key in [k for k in self._items if drop(k)]:
                del self._items[key]

    def clear(self) -> None:
        """Remove everything (those making an entry still finish and keep it)."""
        with self._lock:
            self._items.clear()

    def nbytes(self) -> int:
        """The bytes the entries hold (0 without an ``nbytes`` function)."""
        with self._lock:
            return self._nbytes(list(self._items.values())) if self._nbytes else 0

    def get_or_make(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The value of ``key``, made by ``make()`` when missing. A thread that asks while another
        makes the same key waits for it (and makes it itself if that one failed); other keys do
        not wait. An error of ``make`` is raised and nothing is kept."""
        while True:
            with self._lock:
                if key in self._items:
                    self._items.move_to_end(key)
                    return self._items[key]
                making = self._making.get(key)
                if making is None:
                    making = self._making[key] = threading.Event()
                    break
            making.wait()
        try:
            value = make()
            self.put(key, value)
            return value
        finally:
            with self._lock:
                self._making.pop(key, None)
            making.set()

    def _trim(self) -> None:
        items = self._items
        while self._max_items is not None and len(items) > self._max_items:
            items.popitem(last=False)
        if self._max_bytes is None or self._nbytes is None:
            return
        while len(items) > self._min_items and self._nbytes(list(items.values())) > self._max_bytes:
            items.popitem(last=False)


# -- the owner ------------------------------------------------------------------------------------
_LOCK = threading.Lock()
_OWNED: dict[str, Any] = {"caches": [], "pools": {}, "depth": 0}


def _register(cache: Cache) -> None:
    with _LOCK:
        if any(c.name == cache.name for c in _OWNED["caches"]):
            raise ValueError(f"a cache named {cache.name!r} exists already")
        _OWNED["caches"].append(cache)


def thread_pool(name: str, workers: int = 1) -> ThreadPoolExecutor:
    """The background pool ``name`` (made at first use; shut down when the run ends)."""
    with _LOCK:
        pool = _OWNED["pools"].get(name)
        if pool is None:
            pool = _OWNED["pools"][name] = ThreadPoolExecutor(max_workers=workers,
                                                              thread_name_prefix=f"ccdcal-{name}")
        return pool


def end_stage(stage: str) -> None:
    """The stage ``stage`` of the run is over: the caches that live until then are emptied."""
    if stage not in STAGES:
        raise ValueError(f"no stage {stage!r}; stages: {STAGES}")
    upto = STAGES[: STAGES.index(stage) + 1]
    for cache in list(_OWNED["caches"]):
        if cache.until in upto:
            cache.clear()


def close() -> None:
    """Everything of a run let go: every cache emptied, every pool shut down (queued work dropped)."""
    end_stage("run")
    with _LOCK:
        pools, _OWNED["pools"] = _OWNED["pools"], {}
    for pool in pools.values():
        pool.shutdown(wait=True, cancel_futures=True)


class _SettledFitsConf:
    """What ``astropy.io.fits.card`` sees as its configuration during a run: the two values it
    reads at every card (its value and comment, its keyword), read once when the run starts,
    and everything else from the live configuration. Each read of the live one goes through
    configobj's validation (about 20 µs); a light's headers make thousands of them."""

    def __init__(self, live: Any) -> None:
        self._live = live
        self.strip_header_whitespace = live.strip_header_whitespace
        self.enable_record_valued_keyword_cards = live.enable_record_valued_keyword_cards

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)


def _settle_fits_conf(settle: bool) -> None:
    """Give ``astropy.io.fits.card`` the settled configuration (a run starts) or its own back
    (the run ended). A change to astropy's FITS configuration made during a run applies after it."""
    try:
        from astropy.io.fits import card
    except ImportError:       # pragma: no cover - astropy is a dependency
        return
    if settle and not isinstance(card.conf, _SettledFitsConf):
        card.conf = _SettledFitsConf(card.conf)
    elif not settle and isinstance(card.conf, _SettledFitsConf):
        card.conf = card.conf._live


def settle_fits_conf() -> None:
    """For a process that lives for one run (a light worker): astropy's FITS cards read their
    configuration once from now on, as in this process during a run (:func:`run_scope`)."""
    _settle_fits_conf(True)


@contextlib.contextmanager
def run_scope() -> Iterator[None]:
    """A run's hold on the process state; leaving the outermost scope (an error included) closes it.
    While a run holds it, astropy's FITS cards read their configuration once (:class:`_SettledFitsConf`)."""
    with _LOCK:
        _OWNED["depth"] += 1
        if _OWNED["depth"] == 1:
            _settle_fits_conf(True)
    try:
        yield
    finally:
        with _LOCK:
            _OWNED["depth"] -= 1
            last = _OWNED["depth"] == 0
            if last:
                _settle_fits_conf(False)
        if last:
            close()


def snapshot() -> dict[str, tuple[int, int]]:
    """Every cache: ``name -> (entries, bytes)``; and ``"pools"``: (pools running, 0)."""
    state = {c.name: (len(c), c.nbytes()) for c in _OWNED["caches"]}
    state["pools"] = (len(_OWNED["pools"]), 0)
    return state
