"""Simulated annealing over per-layer threshold choices: contrast loss + SA (paper 3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from autoprune.search.base import Strategy, check_float, check_int, check_starts, register_strategy
from autoprune.search.problem import Fitness, Problem, nearest_on_grid

#: Neighbour draws tried per step before the walk is declared stuck (every one gave the current point).
_MAX_DRAWS = 100


@register_strategy("sa")
class SimulatedAnnealing(Strategy):
    """Simulated annealing over one discrete choice per layer (contrast loss + SA).

    Paper: Wang, Wang & Chen, "Improved neural network pruning algorithm based on contrast loss and
    simulated annealing", CSAMCS 2022 (Proc. SPIE 12597). The abstract: several networks trained on
    different data each choose a pruning threshold per layer; the candidate thresholds are the
    stationary points near zero of the (polarised) scale factors; simulated annealing selects the
    thresholds, keeping the pruned structure with the smallest difference between the networks.

    Our reading: the candidate thresholds of each layer arrive as ``problem.choices`` (sorted keep
    ratios, one per candidate threshold); without them, ``grid`` evenly spaced snapped values in
    ``[lower, upper]`` stand in. The contrast loss is ``problem.penalty``, which :meth:`Problem.score`
    subtracts, so annealing maximises accuracy minus contrast loss (macs mode) or cost saving minus
    contrast loss (drop mode).

    Our choices where the abstract is silent: the state is one choice index per dimension. The walk
    starts at the uniform structure (one keep ratio everywhere at the cost ceiling, rounded down onto
    the choices: the hand-set baseline; in drop mode the largest choice everywhere), which is the first
    ask. Each later ask is one
    neighbour: with probability ``swap``, one random dimension moves +1 index and another -1 (a swap,
    which trades width between layers at about the same cost), otherwise one random dimension moves
    +1 or -1; draws that fall off the grid or give the current point again are redrawn, and so, for the
    first half of the draws, are neighbours already evaluated (a revisit spends an evaluation for
    nothing). In macs mode a neighbour above the ceiling has its pruned fraction scaled onto it and is
    rounded down onto the grid (:meth:`Problem.project`), and that point is the candidate; a feasible
    one is taken as it is. ``starts`` (hand-set patterns of pruning from the method, each scaled onto the
    budget) are evaluated with the uniform structure in the first ask, and the walk starts from the best.
    (With single moves only, ``swap=0``, a walk on the cost ceiling can only trade width through the
    projection, and on the toy problems of the tests it stalls below random search; half swaps fix that.)
    Metropolis acceptance: a better or equal score is always accepted, a worse one with probability
    ``exp(delta / T)``; ``T`` starts at ``t0`` (in score units: ``t0 = 0.05`` accepts a loss of 0.05
    accuracy with probability 1/e at first) and is multiplied by ``alpha`` after every step; ``t0 = 0``
    is pure hill climbing. Done after ``iterations`` neighbours (``iterations + 1`` evaluations).
    """

    def __init__(
        self,
        problem: Problem,
        *,
        seed: int = 0,
        t0: float = 0.05,
        alpha: float = 0.95,
        iterations: int = 200,
        grid: int = 17,
        swap: float = 0.5,
        starts: Sequence[Sequence[float]] = (),
    ) -> None:
        """Set up the annealing.

        Args:
            problem: The problem searched.
            seed: Seed of the strategy's random generator.
            t0: Initial temperature in score units, >= 0.
            alpha: Geometric cooling factor per step, in (0, 1].
            iterations: Number of neighbour steps (>= 1).
            grid: Number of evenly spaced values per dimension when ``problem.choices`` is None (>= 2).
            swap: Probability that a neighbour is a swap (one dimension +1, another -1) rather than a
                single +-1 move, in [0, 1].
            starts: Hand-set keep vectors evaluated with the uniform structure in the first ask (each
                projected onto the budget and the grid); the walk starts from the best of them.
        """
        super().__init__(problem, seed=seed)
        self.t0 = check_float("t0", t0, low=0.0)
        self.alpha = check_float("alpha", alpha, low=0.0, high=1.0, low_open=True)
        self.iterations = check_int("iterations", iterations, minimum=1)
        self.grid = check_int("grid", grid, minimum=2)
        self.swap = check_float("swap", swap, low=0.0, high=1.0)
        self._values = problem.grid(self.grid)
        self.starts = check_starts(starts, problem.dim)
        self._x = problem.project(problem.uniform(), band=1.0, grid=self._values)
        self._first: list[np.ndarray] = [self._x]
        for x in self.starts:
            point = problem.project(problem.scale_pruning(x), band=1.0, grid=self._values)
            if not any(np.array_equal(point, y) for y in self._first):
                self._first.append(point)
        self._index = self._indices(self._x)
        self._score: float | None = None
        self._candidate: tuple[np.ndarray, np.ndarray] | None = None
        self._temperature = self.t0
        self._step = 0
        self.accepted_worse = 0

    def _indices(self, x: np.ndarray) -> np.ndarray:
        nearest = nearest_on_grid(x, self._values)
        return np.array([int(np.searchsorted(v, n)) for v, n in zip(self._values, nearest, strict=True)])

    @property
    def temperature(self) -> float:
        """The current temperature."""
        return self._temperature

    @property
    def current(self) -> tuple[np.ndarray, float | None]:
        """The current state of the walk and its score (None before the first tell)."""
        return self._x.copy(), self._score

    def _ask(self) -> list[np.ndarray]:
        if self._score is None:
            return list(self._first)
        fallback = None
        for draw in range(_MAX_DRAWS):
            index = self._neighbour()
            if index is None:
                continue
            point = np.array([values[j] for values, j in zip(self._values, index, strict=True)])
            candidate = self.problem.project(point, band=1.0, grid=self._values)
            if np.array_equal(candidate, self._x):
                continue
            if self.proposed(candidate) and draw < _MAX_DRAWS // 2:
                fallback = candidate if fallback is None else fallback
                continue
            self._candidate = (candidate, self._indices(candidate))
            return [candidate]
        if fallback is not None:
            self._candidate = (fallback, self._indices(fallback))
            return [fallback]
        return []

    def _neighbour(self) -> np.ndarray | None:
        """Indices of a random neighbour (before repair), or None if the draw fell off the grid."""
        dim, index = self.problem.dim, self._index.copy()
        sizes = np.array([len(values) for values in self._values])
        if dim > 1 and self.rng.random() < self.swap:
            up, down = self.rng.choice(dim, size=2, replace=False)
            index[up] += 1
            index[down] -= 1
        else:
            i = int(self.rng.integers(dim))
            index[i] += 1 if self.rng.random() < 0.5 else -1
        if np.any(index < 0) or np.any(index >= sizes):
            return None
        return index

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        if self._score is None:
            best = int(np.argmax(scores))
            self._x, self._score = xs[best].copy(), scores[best]
            self._index = self._indices(self._x)
            return
        assert self._candidate is not None
        delta = scores[0] - self._score
        draw = self.rng.random()
        accept = delta >= 0 or (self._temperature > 0 and draw < math.exp(delta / self._temperature))
        if accept:
            if delta < 0:
                self.accepted_worse += 1
            self._x, self._index = self._candidate
            self._score = scores[0]
        self._candidate = None
        self._temperature *= self.alpha
        self._step += 1
        if self._step >= self.iterations:
            self._finished = True
