"""One keep ratio for every layer: the PFEC / ``l1`` baseline."""

from __future__ import annotations

import numpy as np

from autoprune.search.base import Strategy, check_int, register_strategy
from autoprune.search.problem import Fitness, Problem

_BISECTION_STEPS = 60


@register_strategy("uniform")
class Uniform(Strategy):
    """The same keep ratio ``r`` in every layer (PFEC-style uniform pruning).

    Not one of the five papers' searches: the baseline GDP compares against (PFEC, Li et al. 2017,
    prunes every layer by the same fraction) and the ``l1`` method's strategy. The candidate for a ratio
    ``r`` is ``r`` in every dimension, clipped to ``[lower, upper]`` and snapped.

    * macs mode: the largest ``r`` whose candidate meets ``max_cost``, found by bisection on the cost
      model without evaluations; that one candidate is evaluated, then done.
    * drop mode: bisection over ``r`` using evaluations (``steps`` of them at most; a ratio whose
      snapped candidate was already evaluated costs nothing): the answer is the smallest ``r`` whose
      accuracy drop stays within ``max_drop``. ``r = max(upper)`` (the unpruned network) is assumed
      feasible and evaluated only if no evaluated ratio was.

    Deterministic: the seed is unused.
    """

    stochastic = False

    def __init__(self, problem: Problem, *, seed: int = 0, steps: int = 8) -> None:
        """Set up the bisection.

        Args:
            problem: The problem searched.
            seed: Unused (deterministic); kept for the common interface.
            steps: Most evaluations of the drop-mode bisection (>= 1); unused in macs mode.
        """
        super().__init__(problem, seed=seed)
        self.steps = check_int("steps", steps, minimum=1)
        self._low, self._high = 0.0, float(np.max(problem.upper))
        self._seen: dict[bytes, bool] = {}
        self._answer_asked = False
        self._mid = 0.0
        if problem.max_cost is not None:
            low, high = self._low, self._high
            if problem.cost_ok(self.candidate(high)):
                low = high
            for _ in range(_BISECTION_STEPS):
                mid = 0.5 * (low + high)
                if problem.cost_ok(self.candidate(mid)):
                    low = mid
                else:
                    high = mid
            self._ratio = low

    def candidate(self, ratio: float) -> np.ndarray:
        """The snapped keep vector for one common ratio."""
        return self.problem.clip(np.full(self.problem.dim, ratio))

    def _ask(self) -> list[np.ndarray]:
        if self.problem.max_cost is not None:
            return [self.candidate(self._ratio)]
        while len(self._seen) < self.steps and self._high - self._low > 1e-9:
            mid = 0.5 * (self._low + self._high)
            x = self.candidate(mid)
            if x.tobytes() not in self._seen:
                self._mid = mid
                return [x]
            self._narrow(mid, self._seen[x.tobytes()])
        answer = self.candidate(self._high)
        if not self._answer_asked and not any(self._seen.values()) and answer.tobytes() not in self._seen:
            self._answer_asked = True
            self._mid = self._high
            return [answer]
        return []

    def _narrow(self, ratio: float, feasible: bool) -> None:
        if feasible:
            self._high = ratio
        else:
            self._low = ratio

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        if self.problem.max_cost is not None:
            self._finished = True
            return
        feasible = self.problem.feasible(xs[0], results[0])
        self._seen[xs[0].tobytes()] = feasible
        self._narrow(self._mid, feasible)
