"""The package's one exception type.

Every error that a user can cause (a bad name, a bad file, an impossible target) is raised as an
:class:`AutopruneError` whose message says what was wrong and how to fix it, in one line. The CLI
prints that line and exits non-zero; anything else is a bug and shows a traceback.
"""

from __future__ import annotations


class AutopruneError(ValueError):
    """A problem with the user's input, files or targets; the message names it and the fix."""


class Interrupted(AutopruneError):
    """A long job stopped on request at a safe point; the message says how to continue it (CLI exit 130)."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> AutopruneError:
    """Build the standard error for a name that is not in a registry."""
    return AutopruneError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
