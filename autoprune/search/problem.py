"""What a search optimises: the box of keep ratios, the cost model, the target and the score.

A pruned network is a *keep vector* ``x``: one keep ratio per prunable group, ``lower <= x <= upper``.
A :class:`Problem` bundles what the strategies need to know about it without any torch: the
analytic cost (relative MACs), the snapping to allowed widths, and the target, which is one of

* **macs mode** (``max_cost``): a candidate is feasible when ``cost(x) <= max_cost``; among feasible
  candidates the most accurate wins;
* **drop mode** (``max_drop``): a candidate is feasible when its accuracy is at most ``max_drop`` below
  the unpruned accuracy; among feasible candidates the cheapest wins.

Strategies *maximise* :meth:`Problem.score`, which ranks every feasible candidate above every
infeasible one (for accuracies in ``[0, 1]`` and penalties in ``[0, 1]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from autoprune.errors import AutopruneError

#: Slack allowed in the feasibility tests, so that ``max_cost = 1 - 0.8`` (0.19999999999999996) accepts a
#: candidate whose cost is exactly 0.2 and an accuracy drop of ``0.9 - 0.89`` passes ``max_drop = 0.01``.
TOLERANCE = 1e-9

_BISECTION_STEPS = 60


@dataclass(frozen=True)
class Fitness:
    """What the evaluator measured for one candidate.

    Attributes:
        accuracy: Validation accuracy in ``[0, 1]`` (in toy problems: any objective to maximise).
        macs: Cost of the candidate as measured (informational; feasibility uses ``Problem.cost``, the
            analytic model, which agrees with the measured count).
        params: Parameter count of the candidate (informational).
        value: What macs mode ranks candidates by when it is not the accuracy: a higher-is-better score in
            ``[0, 1]`` such as ``exp(-KL)`` from the unpruned network (see ``autoprune.engine.scoring``);
            None: the accuracy. Drop mode always reads the accuracy (its target is in accuracy points).
    """

    accuracy: float
    macs: float
    params: float
    value: float | None = None

    @property
    def ranking(self) -> float:
        """The number macs mode maximises: :attr:`value` when set, else :attr:`accuracy`."""
        return float(self.accuracy if self.value is None else self.value)


def _vector(name: str, value: object) -> np.ndarray:
    try:
        array = np.array(value, dtype=float)
    except (TypeError, ValueError) as error:
        raise AutopruneError(f"{name} must be a 1-D array of numbers, got {value!r}") from error
    if array.ndim != 1 or array.size == 0:
        raise AutopruneError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise AutopruneError(f"{name} must be finite, got {array.tolist()}")
    array.setflags(write=False)
    return array


def nearest_on_grid(x: np.ndarray, grid: Sequence[np.ndarray]) -> np.ndarray:
    """Replace every coordinate by the nearest allowed value of its dimension (ties: the smaller)."""
    out = np.empty(len(grid), dtype=float)
    for i, values in enumerate(grid):
        j = int(np.searchsorted(values, x[i]))
        if j == 0:
            out[i] = values[0]
        elif j == len(values):
            out[i] = values[-1]
        else:
            below, above = values[j - 1], values[j]
            out[i] = below if x[i] - below <= above - x[i] else above
    return out


def floor_on_grid(x: np.ndarray, grid: Sequence[np.ndarray]) -> np.ndarray:
    """Replace every coordinate by the largest allowed value not above it (the smallest if none is)."""
    out = np.empty(len(grid), dtype=float)
    for i, values in enumerate(grid):
        j = int(np.searchsorted(values, x[i], side="right"))
        out[i] = values[max(j - 1, 0)]
    return out


@dataclass(frozen=True, eq=False)
class Problem:
    """A search problem over keep vectors; exactly one of ``max_cost`` / ``max_drop`` is set.

    Attributes:
        lower: Smallest keep ratio per dimension (minimum width / channels), shape ``(d,)``.
        upper: Largest keep ratio per dimension (normally 1.0), shape ``(d,)``.
        cost: Relative MACs of a keep vector (1.0 = unpruned); pure numpy, monotone non-decreasing in
            every coordinate.
        snap: The nearest allowed keep vector (channel rounding, minimum width, constraint grid);
            idempotent, and its result stays within ``[lower, upper]``.
        base_accuracy: Validation accuracy of the unpruned network.
        max_cost: macs mode: feasible iff ``cost(x) <= max_cost`` (0.2 for a MACs reduction of 0.8).
        max_drop: drop mode: feasible iff ``base_accuracy - accuracy <= max_drop`` (a fraction).
        choices: Optional sorted allowed values per dimension (a constraint set, candidate thresholds);
            used by the strategies that search a discrete set (``sa``, ``ssa``).
        penalty: Optional term subtracted from every score (the contrast loss of ``sa``).
    """

    lower: np.ndarray
    upper: np.ndarray
    cost: Callable[[np.ndarray], float]
    snap: Callable[[np.ndarray], np.ndarray]
    base_accuracy: float
    max_cost: float | None = None
    max_drop: float | None = None
    choices: tuple[np.ndarray, ...] | None = None
    penalty: Callable[[np.ndarray], float] | None = None

    def __post_init__(self) -> None:
        lower = _vector("lower", self.lower)
        upper = _vector("upper", self.upper)
        if lower.shape != upper.shape:
            raise AutopruneError(f"lower and upper differ in length: {lower.size} vs {upper.size}")
        if np.any(lower > upper):
            bad = int(np.argmax(lower > upper))
            raise AutopruneError(
                f"lower exceeds upper in dimension {bad}: {lower[bad]} > {upper[bad]}; lower must be <= upper"
            )
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        if not callable(self.cost) or not callable(self.snap):
            raise AutopruneError("cost and snap must be callables taking a keep vector")
        if self.penalty is not None and not callable(self.penalty):
            raise AutopruneError("penalty must be None or a callable taking a keep vector")
        if not math.isfinite(self.base_accuracy):
            raise AutopruneError(f"base_accuracy must be finite, got {self.base_accuracy}")
        if (self.max_cost is None) == (self.max_drop is None):
            raise AutopruneError("set exactly one target: max_cost (macs-reduction mode) or max_drop (max-drop mode)")
        if self.max_cost is not None and not (math.isfinite(self.max_cost) and self.max_cost > 0):
            raise AutopruneError(f"max_cost must be a positive fraction of the base MACs, got {self.max_cost}")
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise AutopruneError(f"max_drop must be a non-negative fraction, got {self.max_drop}")
        if self.choices is not None:
            object.__setattr__(self, "choices", self._check_choices(self.choices))
        if self.max_cost is not None:
            floor_cost = float(self.cost(self.clip(self.lower)))
            if floor_cost > self.max_cost + TOLERANCE:
                raise self._unreachable(floor_cost)

    def _check_choices(self, choices: Sequence[object]) -> tuple[np.ndarray, ...]:
        if len(choices) != self.dim:
            raise AutopruneError(f"choices needs one array per dimension ({self.dim}), got {len(choices)}")
        checked = []
        for i, values in enumerate(choices):
            array = _vector(f"choices[{i}]", values)
            if np.any(np.diff(array) < 0):
                raise AutopruneError(f"choices[{i}] must be sorted ascending, got {array.tolist()}")
            checked.append(array)
        return tuple(checked)

    def _unreachable(self, floor_cost: float) -> AutopruneError:
        return AutopruneError(
            f"target unreachable: even the minimum widths keep {floor_cost:.4f} of the MACs, above the "
            f"allowed {self.max_cost:.4f}; ask for a smaller reduction or lower the minimum widths"
        )

    @property
    def dim(self) -> int:
        """Number of dimensions (prunable groups)."""
        return int(self.lower.size)

    @property
    def mode(self) -> str:
        """``"macs"`` (a cost ceiling) or ``"drop"`` (an accuracy-drop ceiling)."""
        return "macs" if self.max_cost is not None else "drop"

    def _as_vector(self, x: object) -> np.ndarray:
        array = np.asarray(x, dtype=float)
        if array.shape != self.lower.shape:
            raise AutopruneError(f"a keep vector must have shape {self.lower.shape}, got {array.shape}")
        return array

    def cost_ok(self, x: np.ndarray) -> bool:
        """Whether ``x`` meets the cost ceiling (always true in drop mode)."""
        return self.max_cost is None or float(self.cost(x)) <= self.max_cost + TOLERANCE

    def feasible(self, x: np.ndarray, fitness: Fitness) -> bool:
        """Whether a candidate and its measured fitness meet the target."""
        if self.max_cost is not None:
            return self.cost_ok(x)
        assert self.max_drop is not None
        return self.base_accuracy - float(fitness.accuracy) <= self.max_drop + TOLERANCE

    def score(self, x: np.ndarray, fitness: Fitness) -> float:
        """The value strategies maximise; every feasible score is above every infeasible one.

        macs mode: ``accuracy - penalty`` (or ``value - penalty``, see :attr:`Fitness.value`) when feasible,
        minus ``1 + (cost - max_cost)`` when not.
        drop mode: ``1 - cost - penalty`` when feasible, ``-1 - (drop - max_drop)`` when not.
        A NaN accuracy (or value) scores ``-inf``.
        """
        accuracy = float(fitness.accuracy)
        if math.isnan(accuracy) or (self.max_cost is not None and math.isnan(fitness.ranking)):
            return -math.inf
        penalty = 0.0 if self.penalty is None else float(self.penalty(x))
        if self.max_cost is not None:
            cost = float(self.cost(x))
            value = fitness.ranking - penalty
            if cost <= self.max_cost + TOLERANCE:
                return value
            return value - 1.0 - (cost - self.max_cost)
        assert self.max_drop is not None
        drop = self.base_accuracy - accuracy
        if drop <= self.max_drop + TOLERANCE:
            return 1.0 - float(self.cost(x)) - penalty
        return -1.0 - (drop - self.max_drop)

    def clip(self, x: np.ndarray) -> np.ndarray:
        """Clip into ``[lower, upper]``, then snap."""
        clipped = np.clip(self._as_vector(x), self.lower, self.upper)
        return np.array(self.snap(clipped), dtype=float)

    def _furthest(
        self, point_at: Callable[[float], np.ndarray], low: float, high: float, best: np.ndarray
    ) -> np.ndarray:
        """Bisection for the largest ``t`` in ``[low, high]`` whose point is feasible (``best`` is at ``low``)."""
        for _ in range(_BISECTION_STEPS):
            if high - low <= 1e-9 * max(1.0, high):
                break
            mid = 0.5 * (low + high)
            candidate = point_at(mid)
            if self.cost_ok(candidate):
                low, best = mid, candidate
            else:
                high = mid
        return best

    def repair(self, x: np.ndarray) -> np.ndarray:
        """The feasible allowed point nearest to ``x`` on the segment from ``lower`` to ``x``.

        drop mode: just :meth:`clip`. macs mode: ``lower + t * (x - lower)`` for the largest ``t`` in
        ``[0, 1]`` whose *snapped* point meets the cost ceiling (bisection; the snapped point is what is
        tested, so the result is always feasible, within bounds and snapped).

        Raises:
            AutopruneError: if even the minimum widths exceed the cost ceiling.
        """
        target = np.clip(self._as_vector(x), self.lower, self.upper)
        point = np.array(self.snap(target), dtype=float)
        if self.cost_ok(point):
            return point
        floor = self.clip(self.lower)
        if not self.cost_ok(floor):
            raise self._unreachable(float(self.cost(floor)))
        return self._furthest(lambda t: self.clip(self.lower + t * (target - self.lower)), 0.0, 1.0, floor)

    def fill(self, x: np.ndarray) -> np.ndarray:
        """The point on the ray from ``lower`` through ``x`` that uses the cost ceiling in full.

        macs mode: a feasible ``x`` is pushed outward, ``lower + t * (x - lower)`` for the largest
        ``t >= 1`` whose clipped, snapped point is feasible (coordinates saturate at ``upper``); an
        infeasible ``x`` is repaired. drop mode: just :meth:`clip`.
        """
        point = self.clip(x)
        if self.max_cost is None:
            return point
        if not self.cost_ok(point):
            return self.repair(point)
        direction = point - self.lower
        moving = direction > 0
        if not np.any(moving):
            return point
        top = float(np.max((self.upper - self.lower)[moving] / direction[moving]))
        candidate = self.clip(self.lower + top * direction)
        if self.cost_ok(candidate):
            return candidate
        return self._furthest(lambda t: self.clip(self.lower + t * direction), 1.0, top, point)

    def uniform(self) -> np.ndarray:
        """The one-ratio candidate: the same keep ratio ``r`` in every dimension (clipped, snapped).

        macs mode: the largest ``r`` whose candidate meets the cost ceiling (bisection on the cost model, no
        evaluation); drop mode: ``upper``. This is the PFEC / ``l1`` structure, the hand-set baseline that
        population strategies seed their first ask with.
        """
        top = float(np.max(self.upper))
        if self.max_cost is None:
            return self.clip(self.upper)
        if self.cost_ok(self.clip(np.full(self.dim, top))):
            return self.clip(np.full(self.dim, top))
        low, high = 0.0, top
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (low + high)
            if self.cost_ok(self.clip(np.full(self.dim, mid))):
                low = mid
            else:
                high = mid
        return self.clip(np.full(self.dim, low))

    def _pruning_scaled(self, x: np.ndarray, factor: float) -> np.ndarray:
        """``x`` with its pruned fraction ``upper - x`` multiplied by ``factor``, clipped and snapped."""
        return self.clip(self.upper - factor * (self.upper - x))

    def scale_pruning(self, x: np.ndarray) -> np.ndarray:
        """The point that meets the cost ceiling by scaling the pruned fraction ``upper - x`` of every dimension.

        macs mode: ``upper - s * (upper - x)`` for the ``s`` that brings the cost to the ceiling: ``s < 1``
        (less pruning everywhere, in the same proportions) when ``x`` is below it, ``s > 1`` when above.
        The layers ``x`` prunes most stay the most pruned, and a layer ``x`` leaves whole stays whole. If
        the dimensions ``x`` prunes cannot alone meet the ceiling (all at ``lower``), :meth:`repair` pulls
        every dimension toward ``lower``. drop mode: just :meth:`clip`.
        """
        point = self.clip(x)
        if self.max_cost is None:
            return point
        pruned = self.upper - point
        moving = pruned > 0
        if self.cost_ok(point):
            if not np.any(moving):
                return point
            return self._furthest(lambda t: self._pruning_scaled(point, 1.0 - t), 0.0, 1.0, point)
        if not np.any(moving):
            return self.repair(point)
        top = float(np.max((self.upper - self.lower)[moving] / pruned[moving]))
        floor = self._pruning_scaled(point, top)
        if not self.cost_ok(floor):
            return self.repair(point)
        return self._furthest(lambda t: self._pruning_scaled(point, top + t * (1.0 - top)), 0.0, 1.0, floor)

    def project(self, x: np.ndarray, *, band: float = 0.0, grid: Sequence[np.ndarray] | None = None) -> np.ndarray:
        """The candidate a population strategy proposes for position ``x``: the budget as a constraint.

        The nearest allowed value per dimension (when ``grid`` is given), then :meth:`clip`. drop mode:
        that point. macs mode, with ``low = (1 - band) * max_cost``:

        * a point with ``low <= cost <= max_cost`` is the candidate as it is, so the strategy chooses the
          structure, not only a direction (``band = 0`` moves every point onto the ceiling, ``band = 1``
          accepts every feasible point);
        * a point above the ceiling, or below ``low``, has its pruned fraction ``upper - x`` scaled until
          it meets the ceiling (:meth:`scale_pruning`): the layers it prunes most stay the most pruned.

        With a grid the result is then rounded down onto it, as :meth:`place` does. The result is always
        within bounds, snapped and (macs) feasible.
        """
        point = self._as_vector(x)
        if grid is not None:
            point = nearest_on_grid(np.clip(point, self.lower, self.upper), grid)
        point = self.clip(point)
        if self.max_cost is None:
            return point
        low = (1.0 - band) * self.max_cost
        if not self.cost_ok(point) or float(self.cost(point)) < low - TOLERANCE:
            point = self.scale_pruning(point)
        return self._on_grid(point, grid)

    def _on_grid(self, moved: np.ndarray, grid: Sequence[np.ndarray] | None) -> np.ndarray:
        """A feasible point rounded down onto ``grid`` (pulled toward its smallest values if still too costly)."""
        if grid is None:
            return moved
        floored = self.clip(floor_on_grid(moved, grid))
        if self.cost_ok(floored):
            return floored
        anchor = self.clip(np.array([values[0] for values in grid]))
        if not self.cost_ok(anchor):
            return moved
        return self._furthest(lambda t: self.clip(floor_on_grid(anchor + t * (moved - anchor), grid)), 0.0, 1.0, anchor)

    def place(self, x: np.ndarray, grid: Sequence[np.ndarray] | None = None, *, fill: bool = False) -> np.ndarray:
        """The candidate a population strategy proposes for position ``x``.

        The nearest allowed value per dimension (when ``grid`` is given), then :meth:`clip`. In macs mode
        an infeasible point is repaired (and, with ``fill``, a feasible one pushed out to the ceiling by
        :meth:`fill`); with a grid, the result is then rounded down onto it, and if that is still above
        the ceiling, pulled toward the grid's smallest values along a segment of rounded-down points
        (as :meth:`repair` does toward ``lower``). Candidates thus keep to the grid whenever its smallest
        values meet the ceiling. The result is always within bounds, snapped and (macs) feasible.
        """
        point = self._as_vector(x)
        if grid is not None:
            point = nearest_on_grid(np.clip(point, self.lower, self.upper), grid)
        point = self.clip(point)
        if self.max_cost is None:
            return point
        if self.cost_ok(point):
            if not fill:
                return point
            moved = self.fill(point)
        else:
            moved = self.repair(point)
        return self._on_grid(moved, grid)

    def grid(self, size: int = 17) -> tuple[np.ndarray, ...]:
        """The allowed values per dimension: ``choices`` if set, else ``size`` evenly spaced snapped ones."""
        if self.choices is not None:
            return self.choices
        steps = np.linspace(0.0, 1.0, size)
        points = np.array([self.clip(self.lower + t * (self.upper - self.lower)) for t in steps])
        return tuple(np.unique(points[:, i]) for i in range(self.dim))
