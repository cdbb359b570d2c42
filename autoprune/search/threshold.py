"""One-parameter threshold families over channel scores: GDP's adaptive threshold, global ranking."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from autoprune.errors import AutopruneError, unknown_name
from autoprune.search.base import Strategy, check_int, register_strategy
from autoprune.search.problem import Fitness, Problem


def _raw(scores: np.ndarray) -> np.ndarray:
    return scores


def _standardised(scores: np.ndarray) -> np.ndarray:
    sigma = float(np.std(scores))
    if sigma == 0.0:
        return np.zeros_like(scores)
    return (scores - float(np.mean(scores))) / sigma


#: How each rule turns a layer's scores into the values compared with the one global parameter ``p``:
#: a channel is kept when its value is above ``p``.
RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # Global magnitude ranking: raw scores compared across layers against one threshold t.
    "global": _raw,
    # GDP: per-layer threshold mu_i + a * sigma_i, i.e. the standardised score compared with a.
    "adaptive": _standardised,
}


@register_strategy("threshold")
class Threshold(Strategy):
    """A one-parameter family of keep vectors from per-channel scores, searched by bisection.

    ``rule="adaptive"`` is GDP (paper 5: Wang, Xu, Song, Zhang & Cai, "Gradient-based deep network
    pruning algorithm", Journal of Computer Applications 2020). The abstract: gradient magnitudes judge
    weight importance; an adaptive method finds the threshold that screens the weights; the network is
    retrained; compared with PFEC. Our reading of "adaptive": each layer's threshold comes from its own
    score distribution, ``mu_i + a * sigma_i``, with one global multiplier ``a``, and the layer keeps
    the fraction of its scores strictly above it (a layer whose scores are all equal keeps everything
    for ``a < 0`` and nothing for ``a >= 0``).

    ``rule="global"`` is the global magnitude ranking of Torch-Pruning's global pruning (and of
    network slimming): one threshold ``t`` on the raw scores, compared across layers.

    Our choices where the papers are silent: keep ratios are clipped to ``[lower, upper]`` and snapped;
    the family is enumerated exactly (every score is a breakpoint) and reduced to its distinct snapped
    candidates, ordered from least to most pruning (cost is monotone along it).

    * macs mode: bisection on the cost model (no evaluations) finds the least pruning that meets
      ``max_cost``; it and the next ``probes`` distinct candidates beyond it (more pruning) are
      evaluated in one ask; ``best`` is the most accurate of them. Then done.
    * drop mode: bisection along the family using evaluations (``steps`` at most); the least-pruned
      candidate (the parameter below every score) is assumed feasible and evaluated only if no probed
      one was. The answer is the most pruned candidate found within ``max_drop``.

    Deterministic: the seed is unused.

    Attributes:
        path: The family's distinct candidates, least pruned first.
    """

    stochastic = False

    def __init__(
        self,
        problem: Problem,
        *,
        seed: int = 0,
        scores: Sequence[np.ndarray] | None = None,
        rule: str = "adaptive",
        probes: int = 4,
        steps: int = 8,
    ) -> None:
        """Enumerate the family.

        Args:
            problem: The problem searched.
            seed: Unused (deterministic); kept for the common interface.
            scores: Required: one 1-D array of channel importance scores per dimension.
            rule: ``"adaptive"`` (GDP) or ``"global"`` (global ranking).
            probes: macs mode: extra candidates evaluated beyond the bisection answer (>= 0).
            steps: drop mode: most evaluations of the bisection (>= 1).
        """
        super().__init__(problem, seed=seed)
        if rule not in RULES:
            raise unknown_name("threshold rule", str(rule), list(RULES))
        self.rule = rule
        self.probes = check_int("probes", probes, minimum=0)
        self.steps = check_int("steps", steps, minimum=1)
        self.path = self._family(self._check_scores(scores))
        self._seen: dict[int, bool] = {}
        self._low, self._high = 0, len(self.path)
        self._answer_asked = False
        self._mid = 0

    def _check_scores(self, scores: Sequence[np.ndarray] | None) -> list[np.ndarray]:
        if scores is None:
            raise AutopruneError("the threshold strategy needs scores=: one array of channel scores per layer")
        if len(scores) != self.problem.dim:
            raise AutopruneError(f"scores needs one array per dimension ({self.problem.dim}), got {len(scores)}")
        checked = []
        for i, layer in enumerate(scores):
            array = np.asarray(layer, dtype=float).ravel()
            if array.size == 0 or not np.all(np.isfinite(array)):
                raise AutopruneError(f"scores[{i}] must be a non-empty array of finite numbers")
            checked.append(np.sort(RULES[self.rule](array)))
        return checked

    def _family(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """The distinct snapped candidates, from the parameter below every value to the one above all."""
        breakpoints = np.concatenate([[-np.inf], np.unique(np.concatenate(values))])
        keep = np.stack([(v.size - np.searchsorted(v, breakpoints, side="right")) / v.size for v in values], axis=1)
        keep = np.clip(keep, self.problem.lower, self.problem.upper)
        distinct = np.concatenate([[True], np.any(keep[1:] != keep[:-1], axis=1)])
        path: list[np.ndarray] = []
        for row in keep[distinct]:
            x = self.problem.clip(row)
            if not path or not np.array_equal(x, path[-1]):
                path.append(x)
        return path

    def _ask(self) -> list[np.ndarray]:
        problem = self.problem
        if problem.max_cost is not None:
            low, high = 0, len(self.path) - 1
            while low < high:
                mid = (low + high) // 2
                if problem.cost_ok(self.path[mid]):
                    high = mid
                else:
                    low = mid + 1
            return self.path[low : low + 1 + self.probes]
        if len(self._seen) < self.steps and self._high - self._low > 1:
            self._mid = (self._low + self._high) // 2
            return [self.path[self._mid]]
        if not self._answer_asked and not any(self._seen.values()):
            self._answer_asked = True
            self._mid = 0
            return [self.path[0]]
        return []

    def _tell(self, xs: list[np.ndarray], results: list[Fitness], scores: list[float]) -> None:
        if self.problem.max_cost is not None:
            self._finished = True
            return
        feasible = self.problem.feasible(xs[0], results[0])
        self._seen[self._mid] = feasible
        if feasible:
            self._low = self._mid
        else:
            self._high = self._mid
