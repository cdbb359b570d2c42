"""Sparrow search over a constraint set of channel counts (paper 4)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoprune.search.base import Strategy, check_bool, check_float, check_int, check_starts, register_strategy
from autoprune.search.problem import Fitness, Problem

#: Keeps the vigilant sparrows' step finite when a sparrow's score equals the worst.
_EPS = 1e-12


@register_strategy("ssa")
class SparrowSearch(Strategy):
    """The sparrow search algorithm (Xue & Shen 2020) over per-layer keep ratios.

    Paper: Xie & Feng, "An efficient channel pruning algorithm for automatic compression and
    acceleration of neural network models", ISCEIC 2022 (Proc. SPIE). The abstract: a super-parameter
    constraint set reduces the number of pruned-structure combinations; the number of channels per
    layer is found by the sparrow search algorithm.

    The update equations are those of Xue & Shen, "A novel swarm intelligence optimization approach:
    sparrow search algorithm" (2020), with the personal-best memory of their reference code: positions
    are drawn from each sparrow's best position so far, ranked by its best score.

    * Producers (the best ``producers`` fraction): with ``R2 ~ U(0,1)`` drawn once per iteration,
      ``x * exp(-i / (a * iterations))`` (``a ~ U(0,1]``, ``i`` the rank) if ``R2 < safety``, else
      ``x + Q * L``.
    * Scroungers (the rest), after the producers are evaluated: rank ``i > n/2`` (starving):
      ``Q * exp((x_worst - x) / i^2)``; otherwise ``x_p + (|x - x_p| . A+) * L`` with ``A`` a random
      row of +-1, ``A+ = A^T (A A^T)^-1``, ``L`` a row of ones, and ``x_p`` the best position the
      producers just reached.
    * Vigilant sparrows (a random ``vigilant`` fraction, drawn each iteration, evaluated with the
      producers): ``x_best + beta * |x - x_best|`` (``beta ~ N(0,1)`` per dimension) if worse than the
      best, else ``x + K * |x - x_worst| / (|f - f_worst| + eps)`` (``K ~ U(-1,1)``).

    Adaptations (our choices, each measured on the toy problems of the tests):

    * *maximisation*: ranks are by descending score; "worst" is the lowest score.
    * *the box*: the equations act on pruned-fraction coordinates ``z = (upper - x) / (upper - lower)``
      in ``[0, 1]``, and every new position is clipped to the box. The origin, toward which the
      producers contract, is thus the unpruned network: a contraction prunes every layer less in the
      same proportions, which the projection onto the budget (below) undoes, so in the safe phase a
      producer re-proposes its structure and the nudge to a new structure (:meth:`Strategy.fresh`) makes
      that a small random step around it: a local search around the best sparrows. (Kept-fraction
      coordinates, where contraction and projection do not cancel, were measured on the toy problems of
      the tests: better on two, worse on two, 0.874 against 0.895 on the smooth 6-layer one.)
    * *the random steps*: ``Q ~ N(0,1)`` is drawn per dimension in ``x + Q * L`` and in the starving
      scroungers' step; the scalar ``Q`` of the original moves every layer by the same amount, which in
      a unit box lands on the diagonal (all layers equal) or a corner.
    * *the constraint set and the budget*: each position goes to the nearest value of
      ``problem.choices`` per dimension (when given) and is snapped by ``problem.snap``; in macs mode a
      position within ``band`` of the cost ceiling is kept as it is, one above it or further inside has
      its pruned fraction scaled onto the ceiling, and the result is rounded down onto the constraint
      set (:meth:`Problem.project`).
    * *the initial flock*: with ``start_uniform`` (default) the first sparrow is the uniform structure
      (one keep ratio everywhere at the ceiling, rounded down onto the constraint set: the hand-set
      baseline), the next ones the ``starts`` the method gives, the others uniform in the box.
    * *repeats*: a candidate that repeats a structure already proposed is nudged to a nearby new one
      (:meth:`Strategy.fresh`).

    A sparrow keeps the best of its evaluated positions. The initial population is uniform in the box
    (one ask); each iteration is two asks (producers + vigilant, then scroungers):
    ``population + iterations * (population + vigilant sparrows)`` evaluations in all.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        seed: int = 0,
        population: int = 20,
        producers: float = 0.2,
        vigilant: float = 0.1,
        safety: float = 0.8,
        iterations: int = 50,
        band: float = 0.05,
        start_uniform: bool = True,
        starts: Sequence[Sequence[float]] = (),
    ) -> None:
        """Set up the flock.

        Args:
            problem: The problem searched.
            seed: Seed of the strategy's random generator.
            population: Number of sparrows (>= 2).
            producers: Fraction of producers, in (0, 1]; at least one.
            vigilant: Fraction of vigilant sparrows per iteration, in [0, 1].
            safety: Safety threshold ST, in [0.5, 1].
            iterations: Number of update rounds after the initial population (>= 1).
            band: Relative width of the band below the cost ceiling within which positions are
                evaluated as they are, in [0, 1) (0: every position is moved onto the ceiling).
            start_uniform: Whether the first sparrow starts at the uniform structure.
            starts: Hand-set keep vectors the next sparrows start from (projected like every position).
        """
        super().__init__(problem, seed=seed)
        self.population = check_int("population", population, minimum=2, maximum=10_000)
        self.producers = check_float("producers", producers, low=0.0, high=1.0, low_open=True)
        self.vigilant = check_float("vigilant", vigilant, low=0.0, high=1.0)
        self.safety = check_float("safety", safety, low=0.5, high=1.0)
        self.iterations = check_int("iterations", iterations, minimum=1)
        self.band = check_float("band", band, low=0.0, high=1.0, high_open=True)
        self.start_uniform = check_bool("start_uniform", start_uniform)
        self.starts = check_starts(starts, problem.dim)
        self._n_producers = max(1, round(self.producers * self.population))
        self._n_vigilant = round(self.vigilant * self.population)
        self._span = problem.upper - problem.lower
        self._memory = np.zeros((self.population, problem.dim))
        self._memory_scores = np.full(self.population, -np.inf)
        start = self.rng.random((self.population, problem.dim))
        hand_set = ([problem.uniform()] if self.start_uniform else []) + self.starts
        for i, x in enumerate(hand_set[: self.population]):
            start[i] = self._normalised(problem.clip(x))
        self._batch = self._candidates(start)
        self._owners = list(range(self.population))
        self._phase = "initial"
        self._order = np.arange(self.population)
        self._iteration = 0

    def _project(self, x: np.ndarray) -> np.ndarray:
        return self.problem.project(x, band=self.band, grid=self.problem.choices)

    def _candidates(self, positions: list[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """The candidates for a batch of positions, nudged where they repeat a structure already proposed."""
        taken: set[bytes] = set()
        out = []
        for z in positions:
            candidate = self.fresh(self._place(z), self._project, taken)
            taken.add(candidate.tobytes())
            out.append(candidate)
        return out

    def _place(self, z: np.ndarray) -> np.ndarray:
        """The candidate for a position in pruned-fraction coordinates."""
        x = self.problem.upper - np.clip(z, 0.0, 1.0) * self._span
        return self.problem.project(x, band=self.band, grid=self.problem.choices)

    def _normalised(self, x: np.ndarray) -> np.ndarray:
        """Pruned-fraction coordinates of a keep vector: 0 at ``upper``, 1 at ``lower``."""
        safe = np.where(self._span > 0, self._span, 1.0)
        return (self.problem.upper - x) / safe

    def _ask(self) -> list[np.ndarray]:
        return list(self._batch)

    def _remember(self, xs: list[np.ndarray], scores: list[float]) -> None:
        for owner, x, score in zip(self._owners, xs, scores, strict=True):
            if self._phase == "initial" or score > self._memory_scores[owner]:
                self._memory[owner] = self._normalised(x)
                self._memory_scores[owner] = score

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        self._remember(xs, scores)
        if self._phase == "producers" and self._n_producers < self.population:
            leader = int(np.argmax(scores[: self._n_producers]))
            self._scroungers(self._normalised(xs[leader]))
            return
        if self._phase != "initial":
            self._iteration += 1
        if self._iteration >= self.iterations:
            self._finished = True
            return
        self._producers_and_vigilant()

    def _producers_and_vigilant(self) -> None:
        rng, z, f = self.rng, self._memory, self._memory_scores
        self._order = np.argsort(-f, kind="stable")
        best, worst = self._order[0], self._order[-1]
        batch, owners = [], []
        alarm = rng.random()
        for rank, k in enumerate(self._order[: self._n_producers], start=1):
            if alarm < self.safety:
                a = 1.0 - rng.random()
                moved = z[k] * np.exp(-rank / (a * self.iterations))
            else:
                moved = z[k] + rng.standard_normal(self.problem.dim)
            batch.append(moved)
            owners.append(int(k))
        for k in rng.choice(self.population, size=self._n_vigilant, replace=False):
            if f[k] < f[best]:
                moved = z[best] + rng.standard_normal(self.problem.dim) * np.abs(z[k] - z[best])
            else:
                step = np.abs(z[k] - z[worst]) / (abs(f[k] - f[worst]) + _EPS)
                moved = z[k] + rng.uniform(-1.0, 1.0) * step
            batch.append(moved)
            owners.append(int(k))
        self._batch = self._candidates(batch)
        self._owners = owners
        self._phase = "producers"

    def _scroungers(self, leader: np.ndarray) -> None:
        rng, z, dim = self.rng, self._memory, self.problem.dim
        worst = z[self._order[-1]]
        batch, owners = [], []
        for rank, k in enumerate(self._order[self._n_producers :], start=self._n_producers + 1):
            if rank > self.population / 2:
                moved = rng.standard_normal(dim) * np.exp((worst - z[k]) / rank**2)
            else:
                signs = rng.integers(0, 2, dim) * 2.0 - 1.0
                moved = leader + np.sum(np.abs(z[k] - leader) * signs) / dim
            batch.append(moved)
            owners.append(int(k))
        self._batch = self._candidates(batch)
        self._owners = owners
        self._phase = "scroungers"
