"""Candidate evaluation: keep vector -> :class:`~autoprune.search.Fitness` on held-out validation data.

A candidate is scored on a working copy of the model with its removed channels masked (no surgery, no
re-tracing) or, where that is not exact or slower, physically pruned: BatchNorm statistics are
re-estimated on training samples first (reset, then a cumulative average in train mode, without
gradients), then the validation score is measured: top-1 accuracy on the validation batches, or the
caller's ``score_fn(model)``. The test data is never seen here. MACs and parameters come from the space's
analytic cost model.

Whether candidates are masked or pruned physically is decided once, by :func:`choose_physical`, and
passed in, so that every process evaluating candidates of one run makes the same choice. Results are
cached by channel counts, so a strategy that proposes the same structure twice pays once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from autoprune.engine.batches import Batch, Inputs, forward, to_device
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import evaluate, model_device
from autoprune.search import Fitness

log = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

ScoreFn = Callable[[nn.Module], float]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers with running statistics."""
    return any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, calibration: Sequence[Inputs]) -> None:
    """Re-estimate the BatchNorm running statistics of ``model`` on the ``calibration`` input batches.

    Statistics are reset and re-accumulated as an exact average over the samples (momentum None); only
    BatchNorm layers run in train mode, so dropout and the like stay deterministic. The model's modes and
    the BatchNorm momenta are restored.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not bns or len(calibration) == 0:
        return
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns}
    model.eval()
    device = model_device(model)
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for inputs in calibration:
            forward(model, to_device(inputs, device))
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum


def measure_score(model: nn.Module, val: Sequence[Batch], score_fn: ScoreFn | None) -> float:
    """The model's validation score: ``score_fn(model)`` if given, else top-1 accuracy on ``val``."""
    if score_fn is not None:
        model.eval()
        return float(score_fn(model))
    return evaluate(model, list(val)).accuracy


class Evaluator:
    """Scores keep vectors: validation score after BatchNorm re-estimation, analytic MACs and params.

    Args:
        model: the trained network (not modified; a working copy is made).
        space: its pruning space.
        scores: per-group channel scores deciding which channels a keep ratio removes.
        val: validation batches ``(inputs, targets)`` held in memory.
        calibration: training input batches for BatchNorm re-estimation.
        score_fn: replaces validation accuracy: ``score_fn(model) -> float``, higher is better.
        physical: prune each candidate physically (True) or mask it (False); see :func:`choose_physical`.
    """

    def __init__(self, model: nn.Module, space: PruningSpace, scores: Sequence[torch.Tensor], val: Sequence[Batch],
                 calibration: Sequence[Inputs], *, score_fn: ScoreFn | None = None, physical: bool = False):
        self.space = space
        self.scores = [torch.as_tensor(s).detach().cpu() for s in scores]
        self.val = list(val)
        self.calibration = list(calibration)
        self.score_fn = score_fn
        self.physical = physical
        self.recalibrate = has_batchnorm(model)
        self._model = copy.deepcopy(model).eval()
        for p in self._model.parameters():
            p.requires_grad_(False)
        self._cache: dict[tuple[int, ...], Fitness] = {}
        self.evaluations = 0

    def __call__(self, keep: Sequence[float] | np.ndarray) -> Fitness:
        counts = tuple(int(c) for c in self.space.counts(keep))
        cached = self._cache.get(counts)
        if cached is not None:
            return cached
        keep = np.asarray(counts) / self.space.channels
        cost = self.space.cost(keep)
        fitness = Fitness(accuracy=self.score(keep), macs=float(cost.macs), params=float(cost.params))
        self._cache[counts] = fitness
        self.evaluations += 1
        return fitness

    def score(self, keep: np.ndarray) -> float:
        """Validation score of the candidate after BatchNorm re-estimation."""
        if self.physical:
            pruned = self.space.apply(self._model, keep, self.scores)
            if self.recalibrate:
                recalibrate_bn(pruned, self.calibration)
            return measure_score(pruned, self.val, self.score_fn)
        with self.space.masked(self._model, keep, self.scores) as masked:
            if self.recalibrate:
                recalibrate_bn(masked, self.calibration)
            return measure_score(masked, self.val, self.score_fn)

    def prefill(self, counts: Sequence[int], fitness: Fitness) -> None:
        """Record a known result (from a resumed run's history) so it is not evaluated again."""
        self._cache[tuple(int(c) for c in counts)] = fitness


def choose_physical(evaluator: Evaluator) -> bool:
    """Decide once whether candidates are pruned physically: when masking is not exact, or measured slower.

    Masking zeroes removed channels where they are produced, which equals removing them only when every
    activation maps 0 to 0; :meth:`PruningSpace.masking_is_exact` checks it on a half-width probe. Both
    ways give the same score otherwise; masking skips the copy and re-tracing, surgery runs a smaller
    network (on small models on a CPU surgery usually wins, on large models on a GPU masking does), so
    the probe is timed both ways.
    """
    space = evaluator.space
    probe = space.snap(np.clip(np.full(len(space), 0.5), space.lower, space.upper))
    if not space.masking_is_exact(evaluator._model, probe, evaluator.scores):
        log.warning("masking does not match physical pruning on this model (an activation with f(0) != 0?); "
                    "evaluating candidates by physical pruning")
        return True
    seconds = {}
    for physical in (False, True):
        evaluator.physical = physical
        started = time.perf_counter()
        evaluator.score(probe)
        seconds[physical] = time.perf_counter() - started
    log.info("candidate evaluation: masking %.3f s, surgery %.3f s", seconds[False], seconds[True])
    return seconds[True] < seconds[False]
