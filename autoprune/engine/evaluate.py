"""Candidate evaluation: keep vector -> :class:`~autoprune.search.Fitness` on held-out validation data.

A candidate is scored on a working copy of the model with its removed channels masked (no surgery, no
re-tracing) or, where that is not exact or slower, physically pruned: BatchNorm statistics are
re-estimated on training samples first (reset, then a cumulative average in train mode, without
gradients), then the validation score is measured: top-1 accuracy on the validation batches, or the
caller's ``score_fn(model)``. That is the ``bn`` score; the configured score (:mod:`autoprune.engine.scoring`:
loss, KL divergence from the unpruned model, a short distilled fine-tune) decides the adaptation and
what the search ranks by. The test data is never seen here. MACs and parameters come from the space's
analytic cost model.

Whether candidates are masked or pruned physically is decided once, by :func:`choose_physical`, and
passed in, so that every process evaluating candidates of one run makes the same choice. Results are
cached by channel counts, so a strategy that proposes the same structure twice pays once. With several
workers (:mod:`autoprune.engine.executor`) each worker process builds its own :class:`Evaluator` from
one payload; the driver's instance keeps the cache (:meth:`Evaluator.key`, :meth:`Evaluator.cached`,
:meth:`Evaluator.record`) and sends only candidates it has not seen.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.engine.batches import Batch, Inputs, batch_size_of, forward, to_device
from autoprune.engine.scoring import (
    CandidateScore,
    Measurement,
    ScoreData,
    call_score_fn,
    candidate_seed,
    resolve_score,
)
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
    # a batch of one sample says little about the statistics (each batch counts once in the average) and a
    # BatchNorm1d cannot take it in training mode: left out where there are others
    several = [inputs for inputs in calibration if batch_size_of(inputs) != 1]
    calibration = several or calibration
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
        return call_score_fn(score_fn, model)
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
            A score that trains the candidate (``finetune``) always gets a physically pruned copy.
        score: the candidate score (a name in :data:`autoprune.engine.scoring.SCORES` or a built score; ``auto``
            is resolved for ``model``).
        train: training batches ``(inputs, targets)`` held for the scores that fine-tune candidates.
        seed: the run's seed (each candidate's adaptation is seeded from it and its channel counts).
    """

    def __init__(self, model: nn.Module, space: PruningSpace, scores: Sequence[torch.Tensor], val: Sequence[Batch],
                 calibration: Sequence[Inputs], *, score_fn: ScoreFn | None = None, physical: bool = False,
                 score: str | CandidateScore = "bn", train: Sequence[Batch] = (), seed: int = 0):
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
        self.candidate_score = resolve_score(score, None, model, score_fn, trainable=bool(train))
        self.seed = seed
        self.data = ScoreData(self._model, self.val, self.calibration, list(train), score_fn, seed)
        self._bn_state = {k: v.clone() for k, v in self._model.state_dict().items() if _is_bn_buffer(k, self._model)}
        self._cache: dict[tuple[int, ...], Fitness] = {}
        self.evaluations = 0

    def __call__(self, keep: Sequence[float] | np.ndarray) -> Fitness:
        counts = self.key(keep)
        cached = self._cache.get(counts)
        if cached is not None:
            return cached
        keep = np.asarray(counts) / self.space.channels
        cost = self.space.cost(keep)
        measured = self.measure(keep)
        value = None if self.candidate_score.metric == "accuracy" else self.candidate_score.value(measured)
        fitness = Fitness(accuracy=measured.accuracy, macs=float(cost.macs), params=float(cost.params), value=value)
        self.record(counts, fitness)
        return fitness

    def key(self, keep: Sequence[float] | np.ndarray) -> tuple[int, ...]:
        """The cache key of a candidate: its channel counts (equal counts are the same network)."""
        return tuple(int(c) for c in self.space.counts(keep))

    def cached(self, key: tuple[int, ...]) -> Fitness | None:
        """The known result for a cache key, if any (used by the executors to send only new candidates)."""
        return self._cache.get(key)

    def record(self, key: tuple[int, ...], fitness: Fitness) -> None:
        """Cache a result computed now, here or in a worker process (counted in :attr:`evaluations`)."""
        self._cache[key] = fitness
        self.evaluations += 1

    def score(self, keep: np.ndarray) -> float:
        """The value the search ranks the candidate by (its validation accuracy under the ``bn`` score)."""
        return self.candidate_score.value(self.measure(keep))

    def measure(self, keep: np.ndarray, score: CandidateScore | None = None) -> Measurement:
        """The candidate adapted and measured by ``score`` (default: the configured one); not cached."""
        score = score or self.candidate_score
        seed = candidate_seed(self.seed, self.key(keep))
        device = model_device(self._model)
        # a forward that draws random numbers (dropout called with training=True) draws the same ones for this
        # candidate, and for the unpruned network's logits, in any process and at any point of the search: the
        # same result on any executor
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(candidate_seed(self.seed, ()))
            score.prepare(self.data)  # the unpruned network's logits, before the working copy is masked
            torch.manual_seed(seed)
            if self.physical or score.adapts:
                return score(self.space.apply(self._model, keep, self.scores), self.data, seed)
            try:
                with self.space.masked(self._model, keep, self.scores) as masked:
                    return score(masked, self.data, seed)
            finally:  # adaptive BatchNorm ran on the working copy: it stays the unpruned network (the teacher)
                if self._bn_state:
                    self._model.load_state_dict(self._bn_state, strict=False)

    def state(self) -> dict[str, Any]:
        """What a worker process needs to build an equal evaluator (:meth:`from_state`), without the cache.

        The working copy of the model, the space, channel scores, validation, calibration and training
        batches, ``score_fn``, the candidate score, the seed and the ``physical`` decision: shipped once per
        worker, so that every process scores a candidate exactly as this one would.
        """
        return {"model": self._model, "space": self.space, "scores": self.scores, "val": self.val,
                "calibration": self.calibration, "score_fn": self.score_fn, "physical": self.physical,
                "score": self.candidate_score, "train": self.data.train, "seed": self.seed}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Evaluator:
        """An evaluator rebuilt from :meth:`state` in a worker process (``physical`` as decided by the driver)."""
        return cls(state["model"], state["space"], state["scores"], state["val"], state["calibration"],
                   score_fn=state["score_fn"], physical=bool(state["physical"]), score=state.get("score", "bn"),
                   train=state.get("train", ()), seed=int(state.get("seed", 0)))

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
    if evaluator.candidate_score.adapts:
        return True  # a score that trains the candidate needs a copy of its own anyway
    probe = space.snap(np.clip(np.full(len(space), 0.5), space.lower, space.upper))
    if not space.masking_is_exact(evaluator._model, probe, evaluator.scores):
        log.warning("masking does not match physical pruning on this model (an activation with f(0) != 0, a "
                    "normalisation over the channels such as LayerNorm, or a reshape that mixes channels); "
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


def _is_bn_buffer(name: str, model: nn.Module) -> bool:
    """Whether ``name`` in the state dict is a BatchNorm running statistic (restored after masked scoring)."""
    module_name, _, leaf = name.rpartition(".")
    if leaf not in ("running_mean", "running_var", "num_batches_tracked"):
        return False
    module = model.get_submodule(module_name) if module_name else model
    return isinstance(module, _BN_TYPES)
