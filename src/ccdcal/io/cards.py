"""A header's new cards made at once: each card's 80 characters written as astropy writes them
(:func:`card_image`), and a plan of cards to set and remove applied in one go
(:class:`CardPlan`), the header astropy would give by setting them one by one."""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .frames import printable_ascii

_PLAIN_KEYWORD = re.compile(r"[A-Z0-9_-]{1,8}")


def card_image(key: str, value: Any, comment: str | None) -> str | None:
    """The 80 characters astropy writes for a new card ``key = value / comment``, or None where
    this does not know astropy's answer (and the caller makes an astropy ``Card``): values other
    than str, bool, int and finite float, text that is not printable ASCII, keywords that are
    not standard, cards that do not fit in 80 characters. Mirrors ``astropy.io.fits.card``
    (``Card._format_image``, ``_format_value``, ``_format_float``); a test checks it against
    astropy's own cards."""
    if not _PLAIN_KEYWORD.fullmatch(key):
        return None
    if key in ("HISTORY", "COMMENT"):
        if not isinstance(value, str) or len(value) > 72 or not printable_ascii(value):
            return None
        return f"{key:8}{value}".ljust(80)
    if isinstance(value, str):
        if not printable_ascii(value):
            return None
        # quoted, a quote inside doubled, at least 8 characters between the quotes
        text = "''" if value == "" else ("'" + value.replace("'", "''").ljust(8) + "'").ljust(20)
    elif type(value) is bool:
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        text = f"{value:>20d}"
    elif type(value) in (float, np.float64):
        if not math.isfinite(value):
            return None
        number = str(float(value)).replace("e", "E")
        if len(number) > 20:
            return None
        text = f"{number:>20}"
    else:
        return None
    if comment:
        if not isinstance(comment, str) or not printable_ascii(comment):
            return None
        text += f" / {comment}"
    image = f"{key:8}= {text}"
    return image.ljust(80) if len(image) <= 80 else None


class CardPlan:
    """Cards set on and removed from a cleaned header (a light's ~45), applied at once.

    Setting cards one by one on an astropy ``Header`` renumbers every card's index at each
    append and formats each new card twice (once made, once written): about half of a small
    light's header time. Here the cards are collected and the header is made once from its
    final list of cards (``Header._fromcards``), each new card from its 80 characters
    (:func:`card_image`; astropy's ``Card`` where that does not know the answer). The result
    is the header that setting them in turn gives, card for card, as astropy places them: a
    new keyword before the header's trailing commentary cards, a value set on an existing
    keyword updated in place by astropy itself (its comment kept when none is given, its text
    when the value is equal), a HISTORY or COMMENT card
    after the last card of its keyword (else last). Where astropy's rules would need more than
    that (blank cards at the end, commentary that is not text, no ``_fromcards``), the cards
    are set on the header one by one as before.
    """

    def __init__(self, header: Any) -> None:
        self.header = header
        self._ops: list[tuple[str, Any, Any]] = []

    def __setitem__(self, key: str, value: Any) -> None:
        self._ops.append(("set", key, value))

    def remove(self, key: str, ignore_missing: bool = False) -> None:
        self._ops.append(("remove", key, ignore_missing))

    def apply(self) -> tuple[Any, set[int]]:
        """The header with every card set and removed, and the ``id`` of the cards made from
        their 80 characters (they fit: :func:`ccdcal.io.frames.refit_comments` may skip them)."""
        from astropy.io import fits

        header = self.header
        cards = list(header.cards)
        make = getattr(fits.Header, "_fromcards", None)
        if (make is None or (cards and cards[-1].is_blank)
                or any(op == "set" and key in ("HISTORY", "COMMENT") and not isinstance(value, str)
                       for op, key, value in self._ops)):
            return self._one_by_one(), set()
        keys = [card.keyword for card in cards]
        # every card made here (held, so that no id is reused): (card, value, comment, from text)
        made: dict[int, tuple[Any, Any, str | None, bool]] = {}

        def new_card(key: str, value: Any, comment: str | None) -> Any:
            card, from_text = _new_card(key, value, comment)
            made[id(card)] = (card, value, comment, from_text)
            return card

        for op, key, value in self._ops:
            if op == "remove":                      # the first card of the keyword
                if key in keys:
                    at = keys.index(key)
                    del cards[at], keys[at]
                elif not value:
                    raise KeyError(f"Keyword {key!r} not found.")
                continue
            given, comment = value if isinstance(value, tuple) else (value, None)
            if key in ("HISTORY", "COMMENT"):       # after the last card of its keyword, else last
                at = len(keys) - keys[::-1].index(key) if key in keys else len(keys)
                # a long text on consecutive cards of 72 characters, as astropy splits it
                chunks = [given[i:i + 72] for i in range(0, len(given), 72)] or [given]
                cards[at:at] = [new_card(key, chunk, None) for chunk in chunks]
                keys[at:at] = [key] * len(chunks)
            elif key in keys:                       # in place, as astropy updates a card (an equal
                at = keys.index(key)                # value keeps its text; no comment keeps the old)
                card = cards[at]
                if id(card) in made:                # one set here: as astropy made it, from its value
                    _, first, said, _ = made[id(card)]
                    card = cards[at] = _astropy_card(key, first, said)
                card.value = given
                if comment is not None:
                    card.comment = comment
            else:                                   # before the trailing commentary cards
                at = len(keys)
                while at > 0 and keys[at - 1] in ("", "COMMENT", "HISTORY"):
                    at -= 1
                cards.insert(at, new_card(key, given, comment))
                keys.insert(at, key)
        fitting = {id(card) for card in cards if id(card) in made and made[id(card)][3]}
        return make(cards), fitting

    def _one_by_one(self) -> Any:
        header = self.header
        for op, key, value in self._ops:
            if op == "remove":
                header.remove(key, ignore_missing=value)
            else:
                header[key] = value
        return header


def _astropy_card(key: str, value: Any, comment: str | None) -> Any:
    from astropy.io.fits import Card

    return Card(key, value, comment) if comment is not None else Card(key, value)


def _new_card(key: str, value: Any, comment: str | None) -> tuple[Any, bool]:
    """A new card, and whether it was made from its 80 characters (:func:`card_image`)."""
    from astropy.io.fits import Card

    image = card_image(key, value, comment)
    if image is not None:
        card = Card.fromstring(image)
        # astropy verifies a card read from text when its image is first asked for; this one
        # is astropy's own formatting of a valid value (a no-op check, a third of writing it)
        card._verified = True
        return card, True
    return _astropy_card(key, value, comment), False
