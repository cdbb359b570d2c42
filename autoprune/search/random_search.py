"""Random search: the floor every search must beat."""

from __future__ import annotations

import numpy as np

from autoprune.search.base import Strategy, check_float, check_int, register_strategy
from autoprune.search.problem import Fitness, Problem


@register_strategy("random")
class RandomSearch(Strategy):
    """Uniform random keep vectors, at the same budget as the method it is compared with.

    Not from the five papers: the baseline of DESIGN.md ("every search method must beat it"). Each ask
    is ``batch`` points drawn uniformly in ``[lower, upper]``, snapped, and in macs mode placed as the
    population searches place theirs (:meth:`Problem.project` with the same ``band``: kept as drawn
    within the band below the cost ceiling, otherwise the pruned fraction scaled onto it). Random search
    is thus exactly the random part of the searches' initial populations, never updated: what a search
    adds over it is the search. A draw that repeats a structure already proposed is nudged to a nearby
    new one, as the searches do (:meth:`Strategy.fresh`). Its generator is its own stream (see
    :class:`Strategy`), so at the same seed its draws differ from those of ``pso`` and ``ssa``. Never
    done by itself: the evaluation budget ends it.
    """

    def __init__(self, problem: Problem, *, seed: int = 0, batch: int = 8, band: float = 0.05) -> None:
        """Set up the sampler.

        Args:
            problem: The problem searched.
            seed: Seed of the strategy's random generator.
            batch: Candidates per ask (>= 1).
            band: Relative width of the band below the cost ceiling within which draws are evaluated
                as they are, in [0, 1).
        """
        super().__init__(problem, seed=seed)
        self.batch = check_int("batch", batch, minimum=1)
        self.band = check_float("band", band, low=0.0, high=1.0, high_open=True)

    def _ask(self) -> list[np.ndarray]:
        problem = self.problem
        draws = self.rng.random((self.batch, problem.dim))
        taken: set[bytes] = set()
        batch = []
        for u in draws:
            candidate = self.fresh(self._place(problem.lower + u * (problem.upper - problem.lower)), self._place, taken)
            taken.add(candidate.tobytes())
            batch.append(candidate)
        return batch

    def _place(self, x: np.ndarray) -> np.ndarray:
        return self.problem.project(x, band=self.band)

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        """Random search learns nothing from results."""
