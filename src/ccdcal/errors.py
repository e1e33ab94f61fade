"""Errors users see: one line that says what is wrong and what to do.

The CLI prints a :class:`CcdcalError` without a traceback and exits with its
``exit_code`` (2 for bad usage or input, 1 for a failure while working).
"""

from __future__ import annotations


class CcdcalError(Exception):
    """A problem the user can fix; the message is one line: what, where, what to do."""

    exit_code = 2


class InputError(CcdcalError):
    """A raw file, section string or option value that cannot be used."""


class ConfigError(CcdcalError):
    """A configuration file or option combination that is invalid."""


class OutputError(CcdcalError):
    """Writing an output failed (folder not writable, disk full)."""

    exit_code = 1


class CcdcalWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it).

    Filter or capture it like any Python warning, e.g.
    ``warnings.simplefilter("error", ccdcal.errors.CcdcalWarning)``.
    """
