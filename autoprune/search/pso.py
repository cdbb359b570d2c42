"""Particle swarm search: PSOPruner (paper 2)."""

from __future__ import annotations

import numpy as np

from autoprune.search.base import Strategy, check_float, check_int, register_strategy
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
    clamp; initial positions uniform in the box. Positions are clipped and snapped after every update;
    in macs mode they are repaired when above the cost ceiling and pushed out to it when below
    (:meth:`Problem.fill`: accuracy grows with width, so a position inside the budget wastes it; without
    this, small budgets ended well short of the target). The velocity is kept as computed. Each ask is
    the whole swarm for one iteration; the search is done after ``iterations`` of them
    (``particles * iterations`` evaluations).
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
        """
        super().__init__(problem, seed=seed)
        self.particles = check_int("particles", particles, minimum=1)
        self.iterations = check_int("iterations", iterations, minimum=1)
        self.inertia_start = check_float("inertia_start", inertia_start, low=0.0, high=2.0)
        self.inertia_end = check_float("inertia_end", inertia_end, low=0.0, high=2.0)
        self.c1 = check_float("c1", c1, low=0.0, high=4.0)
        self.c2 = check_float("c2", c2, low=0.0, high=4.0)
        self.max_velocity = check_float("max_velocity", max_velocity, low=0.0, high=1.0, low_open=True)
        span = problem.upper - problem.lower
        self._vmax = self.max_velocity * span
        start = problem.lower + self.rng.random((self.particles, problem.dim)) * span
        self._positions = np.array([problem.place(x, fill=True) for x in start])
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
        moved = self._positions + self._velocities
        self._positions = np.array([self.problem.place(x, fill=True) for x in moved])
