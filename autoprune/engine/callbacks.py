"""Callbacks: how a caller (the CLI, a run directory, a notebook) follows and steers a pruning run.

The engine calls every callback at each stage; a callback that wants the run to stop at the next safe
point (after the current evaluation, or the current fine-tuning epoch) returns True from
:meth:`Callback.should_stop`. History files, progress display and Ctrl-C handling are callbacks: the
engine itself writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from autoprune.engine.result import Evaluation, PruneResult


class Callback:
    """Base class: every hook does nothing. Override what you need."""

    def on_start(self, info: dict[str, Any]) -> None:
        """The run is set up: ``info`` has ``groups``, ``base_score``, ``budget``, ``strategy``."""

    def on_evaluation(self, evaluation: Evaluation) -> None:
        """A candidate was evaluated (also called for evaluations replayed from a resumed run's history)."""

    def on_search_end(self, best: Evaluation | None) -> None:
        """The search is over; ``best`` is the chosen candidate."""

    def on_finetune_epoch(self, epoch: int, epochs: int) -> None:
        """A fine-tuning epoch finished (1-based ``epoch``)."""

    def on_end(self, result: PruneResult) -> None:
        """The run finished."""

    def should_stop(self) -> bool:
        """Return True to stop the run at the next safe point."""
        return False


class CallbackList(Callback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        bad = [c for c in callbacks if not isinstance(c, Callback)]
        if bad:
            from autoprune.errors import AutopruneError

            raise AutopruneError(f"callbacks must be autoprune.Callback instances, got {type(bad[0]).__name__}")
        self.callbacks = list(callbacks)

    def _each(self, hook: str, *args: Any) -> None:
        for c in self.callbacks:
            _call(c, hook, *args)

    def on_start(self, info: dict[str, Any]) -> None:
        self._each("on_start", info)

    def on_evaluation(self, evaluation: Evaluation) -> None:
        self._each("on_evaluation", evaluation)

    def on_search_end(self, best: Evaluation | None) -> None:
        self._each("on_search_end", best)

    def on_finetune_epoch(self, epoch: int, epochs: int) -> None:
        self._each("on_finetune_epoch", epoch, epochs)

    def on_end(self, result: PruneResult) -> None:
        self._each("on_end", result)

    def should_stop(self) -> bool:
        return any(_stop_requested(c) for c in self.callbacks)


def _stop_requested(callback: Callback) -> bool:
    """``callback.should_stop()``, which must be a bool (numpy's included; ``None`` counts as False): a string
    such as ``"no"`` would otherwise stop the run."""
    from autoprune.errors import AutopruneError, short

    answer = _call(callback, "should_stop")
    if answer is None or isinstance(answer, bool | np.bool_):
        return bool(answer)
    raise AutopruneError(f"callback {type(callback).__name__}.should_stop returned {short(answer)}; it must return "
                         "True (stop) or False")


def _call(callback: Callback, hook: str, *args: Any) -> Any:
    """``callback.hook(*args)``; what a caller's callback raises is one line naming it and the hook (autoprune's
    own callbacks, e.g. a run directory, raise as they are)."""
    from autoprune.errors import AutopruneError, first_line

    try:
        return getattr(callback, hook)(*args)
    except AutopruneError:
        raise
    except Exception as exc:
        if type(callback).__module__.split(".")[0] == "autoprune":
            raise
        raise AutopruneError(f"callback {type(callback).__name__}.{hook} raised {type(exc).__name__}: "
                             f"{first_line(exc, '(no message)')}; fix the callback") from exc
