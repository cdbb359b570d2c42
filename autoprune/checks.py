"""Validation of option values, shared by strategies, criteria and methods (no torch, no numpy needed).

Each check returns the value (converted to the plain Python type) or raises an
:class:`~autoprune.errors.AutopruneError` naming the option, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

#: the largest count any option takes (evaluations, particles, epochs, ...): beyond it a run never ends
MAX_COUNT = 1_000_000


def check_int(name: str, value: object, *, minimum: int, maximum: int = MAX_COUNT) -> int:
    """``value`` as an int if it is an integer in ``[minimum, maximum]``."""
    from autoprune.errors import AutopruneError, short

    ok = isinstance(value, Integral) and not isinstance(value, bool) and minimum <= value <= maximum
    if not ok:
        raise AutopruneError(f"option {name} must be an integer in [{minimum}, {maximum}], got {short(value)}")
    return int(value)  # type: ignore[arg-type]


def check_float(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
                high_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in the stated interval."""
    from autoprune.errors import AutopruneError, short

    number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise AutopruneError(f"option {name} must be a number in {interval}, got {short(value)}")
    return number


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    from autoprune.errors import AutopruneError, short

    if not isinstance(value, str) or value not in choices:
        raise AutopruneError(f"option {name} must be one of {', '.join(choices)}; got {short(value)}")
    return value
