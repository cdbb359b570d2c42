"""Greedy threshold search: OTP (paper 1)."""

from __future__ import annotations

import numpy as np

from autoprune.search.base import Strategy, check_float, register_strategy
from autoprune.search.problem import Fitness, Problem

#: The accuracy loss assumed for a move that loses none, so free moves rank first, by saving.
_TINY_LOSS = 1e-12


@register_strategy("greedy")
class Greedy(Strategy):
    """Greedy optimal-threshold search (OTP).

    Paper: Wang, Liu & Pan, "Pruning algorithm of convolutional neural network based on optimal
    threshold", ICMAI 2020. The abstract: a greedy algorithm selects an optimal pruning threshold that
    balances the maximum sparsity against the minimum error; nodes whose importance (sensitivity and
    correlation) is below the threshold are deleted; accuracy loss kept within 2%.

    Our reading (the abstract is silent on the details). Raising a layer's threshold on the ranked
    importances is lowering its keep ratio, so the search walks from the unpruned network (``upper``)
    one step at a time:

    * the first ask evaluates the starting point; every later ask is one step: for every dimension not
      at its lower bound, the move "lower that dimension by one step" (``step`` times its range, or
      more if snapping would not move it, down to ``lower``);
    * the move taken is the one that saves the most cost per unit of accuracy lost relative to the
      current point (a loss <= 0 counts as a tiny positive one, so free moves win, largest saving
      first; ties go to the lowest dimension);
    * macs mode: the walk stops as soon as the current point meets ``max_cost``: that point is the
      answer (the whole path before it is infeasible by design; candidates are not repaired, the path
      is the method);
    * drop mode: only moves that keep the accuracy drop within ``max_drop`` are eligible; the walk stops
      when none is: "the largest sparsity whose error stays within the tolerance".

    ``best`` is the best feasible candidate told (in macs mode a move of the last step may beat the
    move taken). Deterministic: the seed is unused.
    """

    stochastic = False
    feasible_asks = False

    def __init__(self, problem: Problem, *, seed: int = 0, step: float = 1 / 16) -> None:
        """Set up the walk.

        Args:
            problem: The problem searched.
            seed: Unused (the walk is deterministic); kept for the common interface.
            step: Size of one move as a fraction of each dimension's range, in (0, 1].
        """
        super().__init__(problem, seed=seed)
        self.step = check_float("step", step, low=0.0, high=1.0, low_open=True)
        self._deltas = self.step * (problem.upper - problem.lower)
        self._x = problem.clip(problem.upper)
        self._accuracy: float | None = None

    @property
    def current(self) -> np.ndarray:
        """The current point of the walk."""
        return self._x.copy()

    def _move(self, i: int) -> np.ndarray | None:
        """The point with dimension ``i`` lowered by one (effective) step, or None at the lower bound."""
        current, low = self._x[i], self.problem.lower[i]
        k = 1
        while current > low:
            target = max(low, current - k * self._deltas[i])
            moved = self._x.copy()
            moved[i] = target
            moved = self.problem.clip(moved)
            if moved[i] < current:
                return moved
            if target <= low:
                return None
            k += 1
        return None

    def _moves(self) -> list[np.ndarray]:
        moves = (self._move(i) for i in range(self.problem.dim))
        return [m for m in moves if m is not None]

    def _ask(self) -> list[np.ndarray]:
        if self._accuracy is None:
            return [self._x]
        return self._moves()

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        problem = self.problem
        if self._accuracy is None:
            self._accuracy = float(results[0].accuracy)
        else:
            base_cost = float(problem.cost(self._x))
            best_index, best_ratio = -1, -np.inf
            for index, (x, fitness) in enumerate(zip(xs, results, strict=True)):
                if problem.max_drop is not None and not problem.feasible(x, fitness):
                    continue
                loss = self._accuracy - float(fitness.accuracy)
                ratio = (base_cost - float(problem.cost(x))) / max(loss, _TINY_LOSS)
                if ratio > best_ratio:
                    best_index, best_ratio = index, ratio
            if best_index < 0:
                self._finished = True
                return
            self._x = xs[best_index].copy()
            self._accuracy = float(results[best_index].accuracy)
        if (problem.max_cost is not None and problem.cost_ok(self._x)) or not self._moves():
            self._finished = True
