"""The one exception for unusable input, so that callers can tell it from a bug.

:class:`InputError` is a :class:`~pyrovae.errors.InputError`: an option, a config value, data, a file or a
name that the library cannot use, with a message that says what to change. The command line
prints these as one line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """The caller's input (an option, a config value, data, a file) is unusable; the message says why."""
