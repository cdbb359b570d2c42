"""The strategy interface (ask / tell), the registry, and the reference search loop.

A strategy proposes batches of keep vectors (:meth:`Strategy.ask`) and is told their fitness
(:meth:`Strategy.tell`). It owns a ``np.random.Generator`` seeded from ``seed`` and nothing else is
random, so the same seed and the same told results give the same asks bit for bit: a search is
resumed by replaying its history into a fresh strategy (:func:`replay`), then running on.
"""

from __future__ import annotations

import inspect
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from autoprune.checks import check_float, check_int
from autoprune.errors import AutopruneError
from autoprune.registry import Registry
from autoprune.search.problem import Fitness, Problem

__all__ = ["STRATEGIES", "SearchResult", "Strategy", "check_bool", "check_float", "check_int", "check_starts",
           "create_strategy", "register_strategy", "replay", "run_search", "stream_key", "strategy_names"]

#: How far a told candidate may be from the asked one (a float32 or text round trip) before tell() refuses.
_MATCH_ATOL = 1e-6


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a bool (an option that is on or off)."""
    if not isinstance(value, bool | np.bool_):
        raise AutopruneError(f"option {name} must be true or false, got {value!r}")
    return bool(value)


def check_starts(starts: object, dim: int) -> list[np.ndarray]:
    """``starts`` as a list of keep vectors of length ``dim`` (hand-set starting structures of a search)."""
    if starts is None:
        return []
    try:
        vectors = [np.asarray(x, dtype=float) for x in starts]  # type: ignore[union-attr]
    except (TypeError, ValueError) as error:
        raise AutopruneError(f"option starts must be a list of keep vectors, got {starts!r}") from error
    for x in vectors:
        if x.shape != (dim,) or not np.all(np.isfinite(x)):
            raise AutopruneError(f"option starts must hold keep vectors of {dim} finite numbers, got {x.tolist()}")
    return vectors


def stream_key(name: str) -> int:
    """A stable integer per strategy name (CRC-32), the second word of every strategy's seed."""
    return zlib.crc32(name.encode("utf-8"))


class Strategy(ABC):
    """A search strategy: asks for batches of keep vectors, is told their fitness, keeps the best.

    Subclasses implement :meth:`_ask` (the next batch, ``[]`` when finished) and :meth:`_tell` (called
    once the whole batch has been told), set ``self._finished`` when their schedule ends, and take their
    options as keyword-only arguments with documented defaults, validated with :func:`check_int` /
    :func:`check_float`. The base class keeps its own state in ``_asked``, ``_told``, ``_told_scores``,
    ``_best_seen`` and ``_evaluations``; subclasses must not reuse those names.

    Attributes:
        name: The registry name.
        stochastic: Whether the asks depend on the seed (the contract tests check that seeds differ).
        feasible_asks: Whether every asked candidate meets the cost ceiling in macs mode (false for a
            path strategy such as ``greedy`` that walks in from the unpruned network).
        problem: The problem searched.
        seed: The seed of ``rng``.
        rng: The strategy's own random generator, seeded with ``(seed, stream_key(name))``: one stream
            per strategy, so that two strategies run with the same seed (a search and the random
            baseline it is compared with) draw independent numbers.
    """

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = True
    feasible_asks: ClassVar[bool] = True

    def __init__(self, problem: Problem, *, seed: int = 0) -> None:
        """Bind the problem and seed the strategy's own generator.

        Args:
            problem: The problem searched.
            seed: Seed of ``rng`` (a non-negative integer).
        """
        if not isinstance(problem, Problem):
            raise AutopruneError(f"a strategy needs a search Problem, got {type(problem).__name__}")
        self.problem = problem
        self.seed = check_int("seed", seed, minimum=0, maximum=2**63 - 1)
        self.rng = np.random.default_rng([self.seed, stream_key(self.name or type(self).__name__)])
        self._finished = False
        self._asked: list[np.ndarray] = []
        self._told: list[Fitness] = []
        self._told_scores: list[float] = []
        self._best_seen: tuple[np.ndarray, float] | None = None
        self._evaluations = 0
        self._proposed: set[bytes] = set()

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The strategy's options and their default values (``seed`` excluded)."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "seed"}

    @abstractmethod
    def _ask(self) -> list[np.ndarray]:
        """The next batch of candidates; ``[]`` when the search is over."""

    @abstractmethod
    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        """Update the search state with the results of the whole batch last returned by :meth:`_ask`."""

    def ask(self) -> list[np.ndarray]:
        """The next batch of candidates (copies); ``[]`` when finished.

        Until the batch has been told in full, ``ask()`` returns its untold remainder again without
        advancing the search; after a prefix was told, it is the rest of the batch.
        """
        if not self._asked:
            if self._finished:
                return []
            batch = self._ask()
            if not batch:
                self._finished = True
                return []
            self._asked = [np.array(x, dtype=float) for x in batch]
            for x in self._asked:
                x.setflags(write=False)
                self._proposed.add(x.tobytes())
        return [x.copy() for x in self._asked[len(self._told) :]]

    def tell(self, xs: Sequence[np.ndarray], results: Sequence[Fitness]) -> None:
        """Report the results for the asked batch, in order.

        ``results`` may cover only a prefix of what was asked (the budget ran out): the search then waits
        for the rest, which the next :meth:`ask` returns, and continues as if told at once. ``xs`` are
        the candidates the results belong to (``xs[: len(results)]`` is used).

        Raises:
            AutopruneError: if nothing is pending, there are more results than asked candidates, or a
                told candidate is not the one asked at its position.
        """
        results = list(results)
        if not results:
            return
        if not self._asked:
            raise AutopruneError("tell() without a pending ask(): call ask() first")
        start = len(self._told)
        if len(results) > len(self._asked) - start or len(xs) < len(results):
            raise AutopruneError(
                f"tell() got {len(results)} results for {len(xs)} candidates, but "
                f"{len(self._asked) - start} asked candidates are waiting"
            )
        for offset, (x, fitness) in enumerate(zip(xs, results, strict=False)):
            asked = self._asked[start + offset]
            told = np.asarray(x, dtype=float)
            if told.shape != asked.shape or not np.allclose(told, asked, rtol=0.0, atol=_MATCH_ATOL):
                raise AutopruneError(
                    f"tell() got candidate {told.tolist()} where {asked.tolist()} was asked; results must be "
                    "told in the order asked (when replaying history: same strategy, options and seed)"
                )
            if not isinstance(fitness, Fitness):
                raise AutopruneError(f"tell() needs Fitness results, got {type(fitness).__name__}")
            score = self.problem.score(asked, fitness)
            self._told.append(fitness)
            self._told_scores.append(score)
            self._evaluations += 1
            if self.problem.feasible(asked, fitness) and (self._best_seen is None or score > self._best_seen[1]):
                self._best_seen = (asked, score)
        if len(self._told) == len(self._asked):
            batch, told_results, scores = self._asked, self._told, self._told_scores
            self._asked, self._told, self._told_scores = [], [], []
            self._tell(batch, told_results, scores)

    def proposed(self, x: np.ndarray) -> bool:
        """Whether candidate ``x`` was in an earlier ask."""
        return np.asarray(x, dtype=float).tobytes() in self._proposed

    def fresh(self, candidate: np.ndarray, place: Callable[[np.ndarray], np.ndarray], taken: set[bytes] | None = None,
              *, tries: int = 8, scale: float = 0.05) -> np.ndarray:
        """``candidate``, or a nearby candidate not proposed before when it was (a structure evaluated twice
        spends the evaluation budget for nothing).

        A candidate that was in an earlier ask, or whose bytes are in ``taken`` (the batch being built), is
        replaced by ``place(candidate + noise)`` for the first draw that is new, the noise normal with a
        standard deviation of ``scale * (upper - lower)``, doubled after every failed draw; after ``tries``
        draws the candidate is kept as it is. The draws come from :attr:`rng`, so the search stays
        reproducible. ``place`` must return an allowed candidate (the strategy's own projection).
        """
        key = np.asarray(candidate, dtype=float).tobytes()
        taken = taken if taken is not None else set()
        if key not in self._proposed and key not in taken:
            return candidate
        span = self.problem.upper - self.problem.lower
        for attempt in range(tries):
            noise = self.rng.normal(0.0, scale * 2.0**attempt, self.problem.dim) * span
            moved = np.asarray(place(candidate + noise), dtype=float)
            if moved.tobytes() not in self._proposed and moved.tobytes() not in taken:
                return moved
        return candidate

    @property
    def done(self) -> bool:
        """Whether the search has finished (nothing pending and the schedule over)."""
        return self._finished and not self._asked

    @property
    def best(self) -> tuple[np.ndarray, float] | None:
        """The best feasible candidate told so far and its score; ``None`` if none was feasible."""
        if self._best_seen is None:
            return None
        return self._best_seen[0].copy(), self._best_seen[1]

    @property
    def evaluations(self) -> int:
        """How many results have been told."""
        return self._evaluations


#: Every search strategy by name.
STRATEGIES: Registry[type[Strategy]] = Registry("strategy")


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: register a :class:`Strategy` subclass under ``name``."""
    return STRATEGIES.register(name)


def strategy_names() -> list[str]:
    """The registered strategy names, sorted."""
    return STRATEGIES.names()


def create_strategy(name: str | type[Strategy], problem: Problem, *, seed: int = 0, **options: Any) -> Strategy:
    """Build a strategy by registry name (or class) with keyword options.

    Raises:
        AutopruneError: for an unknown name, an unknown option, or a bad option value.
    """
    return STRATEGIES.create(name, problem, seed=seed, **options)


def replay(strategy: Strategy, history: Sequence[Sequence[Any]]) -> int:
    """Feed recorded evaluations back into a fresh strategy, to resume a search.

    ``history`` holds ``(x, fitness, ...)`` items in evaluation order (a :class:`SearchResult`'s history
    will do). The strategy must be built with the same name, problem, options and seed as the one that
    asked them; it then asks the same candidates, is told the recorded results without evaluating
    anything, and :func:`run_search` carries on from there exactly as the interrupted search would have.

    Returns:
        How many items were replayed (fewer than ``len(history)`` only if the search ended first).

    Raises:
        AutopruneError: if the strategy asks for a candidate other than the recorded one.
    """
    used = 0
    while used < len(history) and not strategy.done:
        xs = strategy.ask()
        if not xs:
            break
        chunk = history[used : used + len(xs)]
        strategy.tell([item[0] for item in chunk], [item[1] for item in chunk])
        used += len(chunk)
    return used


@dataclass(frozen=True)
class SearchResult:
    """The outcome of :func:`run_search`.

    Attributes:
        best_x: The best feasible keep vector, or ``None`` if no feasible candidate was found.
        best_score: Its score, or ``None``.
        evaluations: How many candidates were evaluated in this run.
        history: Every evaluation in order: ``(x, fitness, score)``.
    """

    best_x: np.ndarray | None
    best_score: float | None
    evaluations: int
    history: list[tuple[np.ndarray, Fitness, float]]


def run_search(
    strategy: Strategy,
    evaluate: Callable[[np.ndarray], Fitness] | None = None,
    *,
    budget: int,
    on_result: Callable[[np.ndarray, Fitness, float], None] | None = None,
    evaluate_batch: Callable[[list[np.ndarray]], list[Fitness]] | None = None,
) -> SearchResult:
    """The reference loop: ask, evaluate (at most ``budget`` candidates in all), tell, until done.

    Candidates are evaluated one at a time by ``evaluate(x)``, or a whole ask at once by
    ``evaluate_batch(xs)`` (results in the order asked: a parallel executor). ``on_result(x, fitness,
    score)`` is called after every evaluation, in ask order (progress bars, history). If evaluation or
    ``on_result`` raises, the results recorded so far are still told before the error propagates.
    """
    budget = check_int("budget", budget, minimum=0)
    if (evaluate is None) == (evaluate_batch is None):
        raise AutopruneError("run_search needs exactly one of evaluate= and evaluate_batch=")
    history: list[tuple[np.ndarray, Fitness, float]] = []
    while not strategy.done and len(history) < budget:
        xs = strategy.ask()
        if not xs:
            break
        xs = xs[: budget - len(history)]
        results: list[Fitness] = []
        try:
            pending = evaluate_batch([x.copy() for x in xs]) if evaluate_batch is not None else None
            for j, x in enumerate(xs):
                fitness = pending[j] if pending is not None else evaluate(x.copy())  # type: ignore[misc]
                if not isinstance(fitness, Fitness):
                    raise AutopruneError(f"evaluate must return a Fitness, got {type(fitness).__name__}")
                score = strategy.problem.score(x, fitness)
                results.append(fitness)
                history.append((x, fitness, score))
                if on_result is not None:
                    on_result(x, fitness, score)
        finally:
            strategy.tell(xs[: len(results)], results)
    best = strategy.best
    return SearchResult(
        best_x=None if best is None else best[0],
        best_score=None if best is None else best[1],
        evaluations=len(history),
        history=history,
    )
