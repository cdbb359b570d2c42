"""The package's exception types.

Every error that a user can cause (a bad name, a bad file, an impossible target) is raised as an
:class:`AutopruneError` whose message says what was wrong and how to fix it, in one line. The CLI
prints that line and exits non-zero; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import reprlib
from typing import Any


class AutopruneError(ValueError):
    """A problem with the user's input, files or targets; the message names it and the fix."""


def short(value: Any, limit: int = 80) -> str:
    """A ``repr`` of ``value`` of at most ``limit`` characters, built without the whole of a huge value (a YAML
    alias bomb): error messages echo what they refuse, never a megabyte of it."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 3, 8, 8, 8, 8
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 80


class ConfigError(AutopruneError):
    """A bad setting: which one, its value, and what is allowed.

    The message names the setting as the Python API spells it (``macs_reduction=1.5: ...``); the CLI
    re-words it with its flag (``--macs-reduction 1.5: ...``) from :attr:`field`, :attr:`value` and
    :attr:`problem`, so both interfaces share one check.
    """

    def __init__(self, field: str, value: Any, problem: str):
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}={short(value)}: {problem}")


class Interrupted(AutopruneError):
    """A long job stopped on request at a safe point; the message says how to continue it (CLI exit 130)."""


def first_line(exc: BaseException, empty: str | None = None) -> str:
    """The first line of an exception's message; ``empty`` (default: the exception's type name) if it has none."""
    text = str(exc).strip()
    if text:
        return text.splitlines()[0]
    return type(exc).__name__ if empty is None else empty


def unknown_name(kind: str, name: object, valid: list[str] | tuple[str, ...]) -> AutopruneError:
    """Build the standard error for a name that is not in a registry."""
    return AutopruneError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
