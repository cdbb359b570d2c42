"""Threshold families over channel scores: OTP's optimal threshold, GDP's adaptive threshold, global ranking."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from autoprune.errors import AutopruneError, unknown_name
from autoprune.search.base import Strategy, check_bool, check_float, check_int, register_strategy
from autoprune.search.problem import Fitness, Problem


def _raw(scores: np.ndarray, exponent: float) -> np.ndarray:
    return scores


def _standardised(scores: np.ndarray, exponent: float) -> np.ndarray:
    sigma = float(np.std(scores))
    if sigma == 0.0:
        return np.zeros_like(scores)
    return (scores - float(np.mean(scores))) / sigma


def _relative(scores: np.ndarray, exponent: float) -> np.ndarray:
    mean = float(np.mean(np.abs(scores)))
    if mean == 0.0:
        return np.zeros_like(scores)
    return scores / mean**exponent


#: How each rule turns a layer's scores into the values compared with the one global parameter ``p`` (a
#: channel is kept when its value is above ``p``), given the family's exponent (used by ``relative`` only).
RULES: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    # One threshold t on the raw scores, compared across layers.
    "global": _raw,
    # Per-layer threshold mu_i + a * sigma_i: the standardised score compared with a.
    "adaptive": _standardised,
    # Per-layer threshold t * m_i ** beta (m_i the layer's mean |score|): s / m_i ** beta compared with t.
    "relative": _relative,
}


@register_strategy("threshold")
class Threshold(Strategy):
    """Threshold families of keep vectors from per-channel scores, searched on the cost model or by bisection.

    ``rule="relative"`` is GDP (paper 5: Wang, Xu, Song, Zhang & Cai, "Gradient-based deep network
    pruning algorithm", Journal of Computer Applications 2020). The abstract: gradient magnitudes judge
    weight importance; "an adaptive method was used to find the threshold to screen the weights"; the
    network is retrained; compared with PFEC. Our reading of "adaptive": layer ``i`` keeps the channels
    whose score is above ``t * m_i ** beta``, ``m_i`` the mean score of the layer: ``t`` is one global
    threshold and ``beta`` how far each layer's threshold adapts to its own gradient level (``beta = 0``:
    one threshold for the whole network, so a layer with small gradients loses more channels; ``beta =
    1``: each layer relative to its own mean, so only the shape of its distribution matters). There is
    one family per value in ``exponents``; the search tries each (below) and keeps the most accurate.

    ``rule="global"`` is one threshold ``t`` on the raw scores, compared across layers: Torch-Pruning's
    global ranking, network slimming's global threshold, and OTP's optimal threshold on its importance
    (paper 1). ``rule="adaptive"`` is a per-layer threshold ``mu_i + a * sigma_i`` with one global
    ``a``: every layer standardised, which prunes layers alike when their distributions are alike.

    With ``per_cost``, each layer's values are divided by the cost of one of its channels (the change
    of ``problem.cost`` for one channel more or less, at the uniform structure): a threshold on value
    per unit of cost, the order in which a greedy knapsack removes channels (a channel that saves much
    cost goes before an equally valued one that saves little).

    Our choices where the papers are silent: keep ratios are clipped to ``[lower, upper]`` and snapped;
    each family is enumerated exactly (every score is a breakpoint) and reduced to its distinct snapped
    candidates, ordered from least to most pruning (cost is monotone along it). Every candidate is thus
    threshold-defined: within its family, every kept channel's value is at least that of every removed
    channel, across all layers, except channels a layer keeps to reach its minimum width (its highest
    valued ones).

    * macs mode: per family, bisection on the cost model (no evaluations) finds the least pruning that
      meets ``max_cost``; it and the next ``probes`` distinct candidates beyond it (more pruning) are
      evaluated, all families in one ask; ``best`` is the most accurate. Then done. (Raising the
      threshold step by step from zero would reach the same first feasible point, spending evaluations
      on infeasible ones.)
    * drop mode: per family in turn, bisection along the family using evaluations (``steps`` at most
      per family); the least-pruned candidate is assumed feasible and evaluated only if no probed one
      was. ``best`` is the cheapest candidate found within ``max_drop``: where accuracy falls as the
      threshold rises, the threshold at which a greedy raise would stop, in fewer evaluations.

    Deterministic: the seed is unused.

    Attributes:
        paths: Per family, its distinct candidates, least pruned first.
        path: The first family's candidates (the only family unless ``rule="relative"`` has several
            exponents).
    """

    stochastic = False

    def __init__(
        self,
        problem: Problem,
        *,
        seed: int = 0,
        scores: Sequence[np.ndarray] | None = None,
        rule: str = "adaptive",
        exponents: Sequence[float] = (1.0,),
        per_cost: bool = False,
        probes: int = 4,
        steps: int = 8,
    ) -> None:
        """Enumerate the families.

        Args:
            problem: The problem searched.
            seed: Unused (deterministic); kept for the common interface.
            scores: Required: one 1-D array of channel importance scores per dimension.
            rule: ``"global"``, ``"adaptive"`` or ``"relative"`` (GDP).
            exponents: ``rule="relative"`` only: the values of ``beta`` tried, each in [0, 1], one family
                each.
            per_cost: Divide each layer's values by the cost of one of its channels (below).
            probes: macs mode: extra candidates evaluated beyond the bisection answer, per family (>= 0).
            steps: drop mode: most evaluations of the bisection, per family (>= 1).
        """
        super().__init__(problem, seed=seed)
        if rule not in RULES:
            raise unknown_name("threshold rule", str(rule), list(RULES))
        self.rule = rule
        self.exponents = _check_exponents(exponents)
        self.per_cost = check_bool("per_cost", per_cost)
        self.probes = check_int("probes", probes, minimum=0)
        self.steps = check_int("steps", steps, minimum=1)
        layers = self._check_scores(scores)
        used = self.exponents if rule == "relative" else (0.0,)
        unit = self.channel_costs([layer.size for layer in layers]) if self.per_cost else np.ones(len(layers))
        self.paths = [self._family([np.sort(RULES[rule](layer, beta) / c)
                                    for layer, c in zip(layers, unit, strict=True)]) for beta in used]
        self.path = self.paths[0]
        self._family_index = 0
        self._seen: dict[int, bool] = {}
        self._low, self._high = 0, len(self.path)
        self._answer_asked = False
        self._mid = 0

    def channel_costs(self, channels: Sequence[int]) -> np.ndarray:
        """Per dimension, the cost one channel adds at the uniform structure (``problem.uniform()``): the cost
        change of one channel more or less there (the larger where the two differ), floored at a tiny
        positive value."""
        problem = self.problem
        point = problem.uniform()
        base = float(problem.cost(point))
        out = np.empty(problem.dim)
        for i, n in enumerate(channels):
            changes = []
            for step in (-1.0 / n, 1.0 / n):
                moved = point.copy()
                moved[i] = np.clip(moved[i] + step, problem.lower[i], problem.upper[i])
                if moved[i] != point[i]:
                    changes.append(abs(float(problem.cost(moved)) - base) / abs(moved[i] - point[i]) / n)
            out[i] = max(max(changes, default=0.0), 1e-12)
        return out

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
            checked.append(array)
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
            batch: list[np.ndarray] = []
            for path in self.paths:
                low, high = 0, len(path) - 1
                while low < high:
                    mid = (low + high) // 2
                    if problem.cost_ok(path[mid]):
                        high = mid
                    else:
                        low = mid + 1
                for x in path[low : low + 1 + self.probes]:
                    if not any(np.array_equal(x, y) for y in batch):
                        batch.append(x)
            return batch
        while self._family_index < len(self.paths):
            path = self.paths[self._family_index]
            if len(self._seen) < self.steps and self._high - self._low > 1:
                self._mid = (self._low + self._high) // 2
                return [path[self._mid]]
            if not self._answer_asked and not any(self._seen.values()):
                self._answer_asked = True
                self._mid = 0
                return [path[0]]
            self._family_index += 1
            self._seen, self._answer_asked = {}, False
            if self._family_index < len(self.paths):
                self._low, self._high = 0, len(self.paths[self._family_index])
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


def _check_exponents(exponents: Sequence[float]) -> tuple[float, ...]:
    """``exponents`` as a non-empty tuple of numbers in [0, 1]."""
    if isinstance(exponents, str | bytes) or not isinstance(exponents, Sequence | np.ndarray) or len(exponents) == 0:
        raise AutopruneError(f"option exponents must be a non-empty list of numbers in [0, 1], got {exponents!r}")
    return tuple(check_float("exponents", e, low=0.0, high=1.0) for e in exponents)
