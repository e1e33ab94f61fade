"""Issue 30: ``progress=`` of every long public call is None or False (silent), True (a
``tqdm.auto`` bar: a widget in a notebook, text on stderr elsewhere) or a function
``f(items, description, total=None)``; anything else is a one-line TypeError raised before
any work."""

from __future__ import annotations

import numpy as np
import pytest

from ccdcal.progress import resolve_progress


# -- the one place the forms are resolved ---------------------------------------------------------
def test_none_and_false_are_silent_and_a_function_is_used_as_given():
    def mine(items, description, total=None):
        return items

    assert resolve_progress(None) is None
    assert resolve_progress(False) is None
    assert resolve_progress(mine) is mine


def test_true_is_a_bar_on_stderr_outside_a_notebook_that_hands_on_every_item(capsys):
    bar = resolve_progress(True)
    assert list(bar(iter(range(7)), "counting", total=7)) == list(range(7))
    out = capsys.readouterr()
    assert out.out == ""
    assert "counting" in out.err and "7/7" in out.err


@pytest.mark.parametrize("bad", ["yes", 1, 0, 1.5, [True], np.True_, object()])
def test_any_other_value_is_a_one_line_type_error_naming_the_accepted_forms(bad):
    with pytest.raises(TypeError) as info:
        resolve_progress(bad)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("progress=")
    for form in ("True", "False or None", "f(items, description, total=None)"):
        assert form in message
