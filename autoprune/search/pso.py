"""Particle swarm search: PSOPruner (paper 2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoprune.search.base import Strategy, check_bool, check_float, check_int, check_starts, register_strategy
from autoprune.search.problem import Fitness, Problem


@register_strategy("pso")
class ParticleSwarm(Strategy):
    """Global-best particle swarm optimisation over per-layer keep ratios (PSOPruner).

    Paper: Zhang, Hong, Wu, Liu & Ju, "Deep neural network pruning algorithm based on particle swarm",
    ICHCI 2020. The abstract: particles are randomly initialised as pruned structures; each gives a
    threshold per convolutional layer and kernels whose value is below it are deleted; the pruned
    structure is evaluated, particles and the global best are updated; the global best is retrained;
    100 iterations on VGG16 / CIFAR-10.

    Coordinates: a particle in the paper is a vector of per-layer magnitude thresholds; here it is a
    vector of keep ratios. The two are the same point in different coordinates: the method's recipe
    maps a threshold to the fraction of kernels whose magnitude is above it, a monotone map, so moving
    a threshold up is moving the keep ratio down. Keep ratios make every strategy share one currency
    and one box ``[lower, upper]``.

    Our choices where the abstract is silent: standard global-best PSO (Kennedy & Eberhart) with the
    inertia weight decreasing linearly from ``inertia_start`` to ``inertia_end`` over the iterations
    and ``c1 = c2 = 2.0`` (Shi & Eberhart 1998); random numbers drawn per particle and dimension;
    velocities clamped to ``max_velocity * (upper - lower)`` and initialised uniformly within that
    clamp. The velocity is kept as computed.

    The budget (macs mode) is a constraint, not a line every candidate is pushed onto
    (:meth:`Problem.project`): a position whose cost is within ``band`` of the ceiling (``(1 - band) *
    max_cost <= cost <= max_cost``) is evaluated as it is; one above the ceiling, or further inside the
    budget, has its pruned fraction ``upper - x`` scaled until it meets the ceiling, so the layers the
    particle prunes most stay the most pruned (accuracy grows with width: a position deep inside the
    budget wastes it). The swarm thus chooses structures on and just below the budget surface. (Cutting
    a move where it crosses the ceiling, along the particle's own direction, was measured worse on the
    toy problems of the tests: half the moves of a particle on the ceiling point outward and were cut to
    nothing, 88 distinct structures in 150 evaluations against 115 with the scaling.)

    A particle whose candidate repeats a structure already proposed (in this swarm or an earlier
    iteration) is nudged to a nearby new one (:meth:`Strategy.fresh`): the evaluator's cache makes a
    repeat free in time, but it spends an evaluation of the budget for nothing.

    Initial swarm: with ``start_uniform`` (default), the first particle is the uniform structure (the
    same keep ratio everywhere at the ceiling: the hand-set PFEC baseline, the usual starting point of a
    structure search), the next ones at the ``starts`` the method gives (a hand-set pattern of pruning,
    projected as above), the others uniform in the box, projected as above. Each ask is the whole
    swarm for one iteration; the search is done after ``iterations`` of them (``particles *
    iterations`` evaluations).
    """

    def __init__(
        self,
        problem: Problem,
        *,
        seed: int = 0,
        particles: int = 10,
        iterations: int = 100,
        inertia_start: float = 0.9,
        inertia_end: float = 0.4,
        c1: float = 2.0,
        c2: float = 2.0,
        max_velocity: float = 0.2,
        band: float = 0.05,
        start_uniform: bool = True,
        starts: Sequence[Sequence[float]] = (),
    ) -> None:
        """Initialise the swarm.

        Args:
            problem: The problem searched.
            seed: Seed of the strategy's random generator.
            particles: Swarm size (>= 1).
            iterations: Number of swarm evaluations (>= 1); the paper's 100.
            inertia_start: Inertia weight at the first update, in [0, 2].
            inertia_end: Inertia weight at the last update, in [0, 2].
            c1: Cognitive coefficient (pull to the particle's own best), in [0, 4].
            c2: Social coefficient (pull to the swarm's best), in [0, 4].
            max_velocity: Velocity clamp as a fraction of each dimension's range, in (0, 1].
            band: Relative width of the band below the cost ceiling within which positions are
                evaluated as they are, in [0, 1) (0: every position is moved onto the ceiling).
            start_uniform: Whether the first particle starts at the uniform structure.
            starts: Hand-set keep vectors the next particles start from (projected like every position,
                so a vector gives the pattern of pruning, the budget its amount).
        """
        super().__init__(problem, seed=seed)
        self.particles = check_int("particles", particles, minimum=1, maximum=10_000)
        self.iterations = check_int("iterations", iterations, minimum=1)
        self.inertia_start = check_float("inertia_start", inertia_start, low=0.0, high=2.0)
        self.inertia_end = check_float("inertia_end", inertia_end, low=0.0, high=2.0)
        self.c1 = check_float("c1", c1, low=0.0, high=4.0)
        self.c2 = check_float("c2", c2, low=0.0, high=4.0)
        self.max_velocity = check_float("max_velocity", max_velocity, low=0.0, high=1.0, low_open=True)
        self.band = check_float("band", band, low=0.0, high=1.0, high_open=True)
        self.start_uniform = check_bool("start_uniform", start_uniform)
        self.starts = check_starts(starts, problem.dim)
        span = problem.upper - problem.lower
        self._vmax = self.max_velocity * span
        start = problem.lower + self.rng.random((self.particles, problem.dim)) * span
        hand_set = ([problem.uniform()] if self.start_uniform else []) + self.starts
        for i, x in enumerate(hand_set[: self.particles]):
            start[i] = x
        self._positions = self._distinct(start)
        self._velocities = self.rng.uniform(-1.0, 1.0, (self.particles, problem.dim)) * self._vmax
        self._personal = self._positions.copy()
        self._personal_scores = np.full(self.particles, -np.inf)
        self._iteration = 0

    def inertia(self, iteration: int) -> float:
        """The inertia weight used for the update after (0-based) ``iteration``."""
        fraction = iteration / max(self.iterations - 1, 1)
        return self.inertia_start + (self.inertia_end - self.inertia_start) * fraction

    def _ask(self) -> list[np.ndarray]:
        return list(self._positions)

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        values = np.asarray(scores, dtype=float)
        improved = values > self._personal_scores
        self._personal[improved] = self._positions[improved]
        self._personal_scores[improved] = values[improved]
        leader = self._personal[int(np.argmax(self._personal_scores))]
        weight = self.inertia(self._iteration)
        self._iteration += 1
        if self._iteration >= self.iterations:
            self._finished = True
            return
        shape = self._positions.shape
        r1, r2 = self.rng.random(shape), self.rng.random(shape)
        velocities = (
            weight * self._velocities
            + self.c1 * r1 * (self._personal - self._positions)
            + self.c2 * r2 * (leader - self._positions)
        )
        self._velocities = np.clip(velocities, -self._vmax, self._vmax)
        self._positions = self._distinct(self._positions + self._velocities)

    def _place(self, x: np.ndarray) -> np.ndarray:
        return self.problem.project(x, band=self.band)

    def _distinct(self, moved: np.ndarray) -> np.ndarray:
        """The swarm's candidates for ``moved``: projected, and nudged where they repeat a structure already
        proposed (:meth:`Strategy.fresh`)."""
        taken: set[bytes] = set()
        positions = []
        for x in moved:
            candidate = self.fresh(self._place(x), self._place, taken)
            taken.add(candidate.tobytes())
            positions.append(candidate)
        return np.array(positions)
