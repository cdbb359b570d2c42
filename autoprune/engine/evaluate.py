"""Candidate evaluation: keep vector -> :class:`Fitness` on the validation split.

A candidate is scored on a working copy of the model with its removed channels masked (no surgery,
no re-tracing): BatchNorm statistics are recalibrated on training images first (reset, then a
cumulative average over a few hundred images in train mode, without gradients), then accuracy is
measured on the validation split carved from the training data. The test split is never seen here.
MACs and parameters come from the space's analytic cost model.

Masking gives the same accuracy as physical pruning when every activation maps 0 to 0; the evaluator
checks this once on the model and otherwise prunes each candidate physically. Results are cached by
channel counts, so a strategy that proposes the same structure twice pays once.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from autoprune.data import BatchLoader, ImageTensors
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import evaluate, model_device
from autoprune.search import Fitness

log = logging.getLogger(__name__)

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers with running statistics."""
    return any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> None:
    """Re-estimate BatchNorm running statistics of ``model`` on ``images`` (uint8 or float in [0, 1]).

    Statistics are reset and re-accumulated as an exact average over the images (momentum None);
    only BatchNorm layers run in train mode, so dropout and the like stay deterministic. The model's
    modes and the BatchNorm momenta are restored.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not bns or len(images) == 0:
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
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device)
            model(x.float().div_(255) if x.dtype == torch.uint8 else x)
    finally:
        for m, mode in modes.items():
            m.train(mode)
        for m, momentum in momenta.items():
            m.momentum = momentum


def calibration_images(train: ImageTensors, samples: int, seed: int) -> torch.Tensor:
    """A fixed random subset of training images for BatchNorm recalibration."""
    n = min(samples, len(train))
    g = torch.Generator().manual_seed(seed)
    return train.images[torch.randperm(len(train), generator=g)[:n]]


class Evaluator:
    """Scores keep vectors: validation accuracy after BN recalibration, analytic MACs and params.

    Args:
        model: the trained network (not modified; a working copy is made).
        space: its pruning space.
        scores: per-group channel scores deciding which channels a keep ratio removes.
        val: the validation split.
        calibration: training images for BatchNorm recalibration (uint8).
        batch_size: evaluation batch size.
        physical: force physical pruning per candidate (default: only if masking is not exact).
    """

    def __init__(self, model: nn.Module, space: PruningSpace, scores: Sequence[torch.Tensor], val: ImageTensors,
                 calibration: torch.Tensor, *, batch_size: int = 500, physical: bool | None = None):
        self.space = space
        self.scores = [torch.as_tensor(s).detach().cpu() for s in scores]
        self.val = val
        self.calibration = calibration
        self.batch_size = batch_size
        self.recalibrate = has_batchnorm(model)
        self._model = copy.deepcopy(model).eval()
        for p in self._model.parameters():
            p.requires_grad_(False)
        if physical is None:
            probe = space.snap(np.clip(np.full(len(space), 0.5), space.lower, space.upper))
            if not space.masking_is_exact(self._model, probe, self.scores):
                log.warning("masking does not match physical pruning on this model (an activation with f(0) != 0?); "
                            "evaluating candidates by physical pruning")
                physical = True
            else:
                physical = self._surgery_is_faster(probe)
        self.physical = physical
        self._cache: dict[tuple[int, ...], Fitness] = {}
        self.evaluations = 0

    def _surgery_is_faster(self, probe: np.ndarray) -> bool:
        """Whether pruning a candidate physically beats masking it, timed once on a half-width probe.

        Both give the same accuracy; masking skips the copy and re-tracing, surgery runs a smaller network.
        On small models on a CPU surgery usually wins, on large models on a GPU masking does.
        """
        seconds = {}
        for physical in (False, True):
            self.physical = physical
            started = time.perf_counter()
            self.accuracy(probe)
            seconds[physical] = time.perf_counter() - started
        log.info("candidate evaluation: masking %.3f s, surgery %.3f s", seconds[False], seconds[True])
        return seconds[True] < seconds[False]

    def __call__(self, keep: Sequence[float] | np.ndarray) -> Fitness:
        counts = tuple(int(c) for c in self.space.counts(keep))
        cached = self._cache.get(counts)
        if cached is not None:
            return cached
        keep = np.asarray(counts) / self.space.channels
        accuracy = self.accuracy(keep)
        cost = self.space.cost(keep)
        fitness = Fitness(accuracy=accuracy, macs=float(cost.macs), params=float(cost.params))
        self._cache[counts] = fitness
        self.evaluations += 1
        return fitness

    def accuracy(self, keep: np.ndarray) -> float:
        """Validation accuracy of the candidate after BatchNorm recalibration."""
        if self.physical:
            pruned = self.space.apply(self._model, keep, self.scores)
            if self.recalibrate:
                recalibrate_bn(pruned, self.calibration)
            return evaluate(pruned, self.val, batch_size=self.batch_size).accuracy
        with self.space.masked(self._model, keep, self.scores) as masked:
            if self.recalibrate:
                recalibrate_bn(masked, self.calibration)
            return evaluate(masked, self.val, batch_size=self.batch_size).accuracy

    def prefill(self, counts: Sequence[int], fitness: Fitness) -> None:
        """Record a known result (from a resumed run's history) so it is not evaluated again."""
        self._cache[tuple(int(c) for c in counts)] = fitness


def batches_for_criterion(train: ImageTensors, *, batch_size: int, seed: int, device: torch.device | str,
                          augment: str = "none") -> BatchLoader:
    """Shuffled training batches for data-driven criteria (the criterion bounds how many it uses)."""
    return BatchLoader(train, batch_size, shuffle=True, augment=augment, seed=seed, device=device)
