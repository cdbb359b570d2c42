"""Random search: the floor every search must beat."""

from __future__ import annotations

import numpy as np

from autoprune.search.base import Strategy, check_int, register_strategy
from autoprune.search.problem import Fitness, Problem


@register_strategy("random")
class RandomSearch(Strategy):
    """Uniform random keep vectors, at the same budget as the method it is compared with.

    Not from the five papers: the baseline of DESIGN.md ("every search method must beat it"). Each ask
    is ``batch`` points drawn uniformly in ``[lower, upper]``, snapped, and in macs mode moved onto the
    cost ceiling along the ray from ``lower`` (repaired when above it, filled when below:
    :meth:`Problem.place`), as the searches it is compared with use the whole budget too. Never done by
    itself: the evaluation budget ends it.
    """

    def __init__(self, problem: Problem, *, seed: int = 0, batch: int = 8) -> None:
        """Set up the sampler.

        Args:
            problem: The problem searched.
            seed: Seed of the strategy's random generator.
            batch: Candidates per ask (>= 1).
        """
        super().__init__(problem, seed=seed)
        self.batch = check_int("batch", batch, minimum=1)

    def _ask(self) -> list[np.ndarray]:
        problem = self.problem
        draws = self.rng.random((self.batch, problem.dim))
        return [problem.place(problem.lower + u * (problem.upper - problem.lower), fill=True) for u in draws]

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        """Random search learns nothing from results."""
