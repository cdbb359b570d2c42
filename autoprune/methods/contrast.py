"""SA: contrast loss + simulated annealing (Wang, Wang & Chen, CSAMCS 2022, SPIE 12597).

The paper (abstract): "different training data from the same dataset are used to train multiple networks
[...] each network chooses its own pruning threshold at the same layer. When selecting the threshold, the
stationary point close to zero among the candidate points is selected as the candidate set of pruning
threshold. Different threshold values are used in this range to obtain the corresponding pruning
structure. Next, these structures are compared and the pruned structure corresponding to the smallest
difference in neural network structures is kept." The scale factors are polarised; simulated annealing
selects the thresholds.

Our reading, where the abstract is silent:

* **Shard networks.** ``networks`` (default 3) copies of the trained model are trained for ``epochs``
  epochs on disjoint shards of the training data (every ``networks``-th batch of each pass; so all the
  shard networks together see each training sample ``epochs`` times), each with its own seed and the
  polarisation regulariser of Zhuang et al. (NeurIPS 2020), ``lambda * sum_layers (t * sum|s| - sum|s -
  mean(s)|)``, ``t`` = 1.2, ``lambda`` = ``polarization`` = 1e-4. A channel's scale factor ``s`` is the sum
  of the ``|gamma|`` of the BatchNorm layers writing it (a residual stream has several); in a group
  without BatchNorm, the sum of the L2 norms of its writers' filters (LeNet-5: the "scale factors" are
  filter norms).
* **Training budget.** The shard networks are probes: they decide the structure and the channel ranking,
  and are then discarded. The network pruned and fine-tuned is the trained model itself, so ``sa``'s
  pruned network gets exactly the training every other method's gets (``extra_training_epochs`` = 0); the
  shard training is part of the method's search cost (``plan_seconds``) and is reported as
  ``notes["probe_training_epochs"]``.
* **Candidate thresholds.** Per layer, the scale factors of every network are divided by that network's
  largest in the layer and pooled. The stationary points (density extrema) of a Gaussian kernel density
  estimate of the pooled values that lie below its 90th percentile ("close to zero"), and 0, are
  candidate thresholds. Stationary points alone are 2 or 3 per layer on LeNet-5 and ResNet-20, too few
  to meet a MACs target in every layer, so the pooled quantiles at multiples of ``grid`` are added
  ("different threshold values are used in this range").
* **Structures and their difference.** Under threshold ``t`` network ``k`` keeps the channels whose
  normalised factor is above ``t``. The candidate structure is the mean of the networks' kept fractions
  (snapped to a channel count); its *contrast loss* is the mean, over pairs of networks, of the fraction
  of the layer's channels that one network keeps and the other removes (a normalised Hamming distance
  between the kept sets: 0 only when the networks keep exactly the same channels). Two thresholds giving
  the same count keep the smaller contrast. The per-layer table (keep ratio, threshold, contrast) is
  logged and kept in the plan's notes.
* **Search.** Simulated annealing (strategy ``sa``) picks one candidate per layer to maximise validation
  accuracy minus ``contrast_weight`` times the mean contrast over layers, within the MACs budget.
* **Channels.** Within a layer, channels are ranked by the networks' mean normalised scale factor, and
  removed from the trained model's weights.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from autoprune.checks import check_float, check_int
from autoprune.criteria import out_members
from autoprune.engine.batches import METHOD_TRAINING_FIX, count_batches
from autoprune.engine.space import COMPUTE_TYPES, PruningSpace
from autoprune.engine.train import fit
from autoprune.errors import AutopruneError
from autoprune.methods.base import Method, MethodContext, Plan, ShardLoader, register_method, residual_start
from autoprune.search.base import check_bool

log = logging.getLogger(__name__)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def scale_factors(model: nn.Module, space: PruningSpace) -> list[torch.Tensor]:
    """Per group, differentiable per-channel scale factors: the sum of ``|gamma|`` over the group's BatchNorm
    writers, or, without BatchNorm, the sum of its convolution / linear writers' filter L2 norms."""
    out = []
    for g, writers in zip(space.groups, out_members(model, space), strict=True):
        norms = [w.rows(w.module.weight, g.channels, f"weight of {w.name}").abs().sum(1) for w in writers
                 if isinstance(w.module, _NORMS) and w.module.weight is not None]
        if norms:
            out.append(torch.stack(norms).sum(0))
        else:
            filters = [w.rows(w.module.weight, g.channels, f"weight of {w.name}", weight=True).norm(dim=1)
                       for w in writers if isinstance(w.module, COMPUTE_TYPES)]
            out.append(torch.stack(filters).sum(0))
    return out


def polarization_penalty(space: PruningSpace, weight: float, t: float) -> Callable[[nn.Module], torch.Tensor]:
    """Zhuang et al.'s polarisation regulariser on the scale factors of every group."""

    def penalty(model: nn.Module) -> torch.Tensor:
        total: torch.Tensor | float = 0.0
        for s in scale_factors(model, space):
            a = s.abs()
            total = total + t * a.sum() - (a - a.mean()).abs().sum()
        return weight * total  # type: ignore[return-value]

    return penalty


def stationary_points(values: np.ndarray, *, grid: int = 256) -> np.ndarray:
    """Locations in [0, 1] where a Gaussian KDE of ``values`` (Silverman bandwidth) has zero slope."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or np.ptp(values) == 0:
        return np.empty(0)
    iqr = np.subtract(*np.percentile(values, [75, 25]))
    spread = min(values.std(), iqr / 1.34) if iqr > 0 else values.std()
    h = max(0.9 * spread * values.size ** -0.2, 1e-3)
    xs = np.linspace(0.0, 1.0, grid)
    density = np.exp(-0.5 * ((xs[:, None] - values[None, :]) / h) ** 2).sum(1)
    slope = np.sign(np.diff(density))
    turns = np.nonzero(slope[1:] != slope[:-1])[0] + 1
    return xs[turns]


def candidate_thresholds(pooled: np.ndarray, *, step: float = 1 / 16) -> tuple[np.ndarray, int]:
    """Stationary points close to zero (below the 90th percentile), 0, and the pooled quantiles at multiples of
    ``step``; and how many stationary points there were."""
    ceiling = float(np.percentile(pooled, 90))
    stationary = [p for p in stationary_points(pooled) if p < ceiling]
    quantiles = np.quantile(pooled, np.arange(step, 1.0 - 1e-9, step))
    return np.unique(np.round([0.0, *stationary, *quantiles], 9)), len(stationary)


@dataclass(frozen=True)
class LayerTable:
    """One group's candidate structures.

    Attributes:
        choices: allowed keep ratios (snapped consensus structures), ascending.
        contrasts: the contrast loss of each.
        thresholds: the normalised threshold that gave each.
        stationary: how many stationary points close to zero the layer's density had.
    """

    choices: np.ndarray
    contrasts: np.ndarray
    thresholds: np.ndarray
    stationary: int


def kept_sets_contrast(masks: list[np.ndarray]) -> float:
    """Mean over pairs of networks of the fraction of channels one keeps and the other removes."""
    if len(masks) < 2:
        return 0.0
    return float(np.mean([np.mean(a != b) for a, b in itertools.combinations(masks, 2)]))


def structure_table(space: PruningSpace, scales: list[list[np.ndarray]], *, step: float = 1 / 16) -> list[LayerTable]:
    """Per group: the candidate structures, their contrast losses and thresholds.

    Args:
        space: the pruning space (for snapping to channel counts).
        scales: ``scales[k][i]``: network k's max-normalised scale factors of group i.
        step: quantile step of the candidate thresholds added to the stationary points.
    """
    tables = []
    for i in range(len(space)):
        pooled = np.concatenate([net[i] for net in scales])
        thresholds, stationary = candidate_thresholds(pooled, step=step)
        table: dict[float, tuple[float, float]] = {}
        for t in thresholds:
            masks = [net[i] > t for net in scales]
            x = float(space.snap_one(i, np.array([np.mean([m.mean() for m in masks])]))[0])
            contrast = kept_sets_contrast(masks)
            if x not in table or contrast < table[x][0]:
                table[x] = (contrast, float(t))
        xs = np.array(sorted(table))
        tables.append(LayerTable(xs, np.array([table[x][0] for x in xs]), np.array([table[x][1] for x in xs]),
                                 stationary))
    return tables


def contrast_penalty(choices: tuple[np.ndarray, ...], contrasts: tuple[np.ndarray, ...],
                     weight: float) -> Callable[[np.ndarray], float]:
    """``weight`` x the mean contrast loss of a keep vector (each ratio read at its nearest choice)."""

    def penalty(x: np.ndarray) -> float:
        total = 0.0
        for xi, c, d in zip(x, choices, contrasts, strict=True):
            total += float(d[int(np.argmin(np.abs(c - xi)))])
        return weight * total / len(choices)

    return penalty


@register_method
class SA(Method):
    """SA: shard-trained polarised probe networks, a contrast loss between their structures, simulated annealing.

    See the module docstring for the paper's words and our reading.
    """

    name = "sa"
    trains_in_plan = True
    summary = "paper 3: shard-trained polarised networks, contrast loss, simulated annealing over thresholds"
    source = "Wang, Wang & Chen 2023 (contrast loss + SA)"
    default_budget = 200

    def __init__(self, *, networks: int = 3, epochs: int = 1, polarization: float = 1e-4, t: float = 1.2,
                 contrast_weight: float = 1.0, grid: float = 1 / 16, start_streams: bool = True) -> None:
        """Args:
        networks: probe networks trained on disjoint shards of the training data (>= 2: a contrast needs two).
        epochs: training epochs of each probe network on its shard.
        polarization: weight of the polarisation regulariser (lambda of Zhuang et al.).
        t: the regulariser's t.
        contrast_weight: weight of the contrast loss against the validation score.
        grid: quantile step of the candidate thresholds added to the stationary points, in (0, 0.5].
        start_streams: in a network with residual streams, the annealing also tries, before its walk, the
            streams pruned a quarter as much as the other layers.
        """
        self.networks = check_int("networks", networks, minimum=2, maximum=64)
        self.epochs = check_int("epochs", epochs, minimum=0)
        self.polarization = check_float("polarization", polarization, low=0.0)
        self.t = check_float("t", t, low=0.0)
        self.contrast_weight = check_float("contrast_weight", contrast_weight, low=0.0)
        self.grid = check_float("grid", grid, low=0.0, high=0.5, low_open=True)
        self.start_streams = check_bool("start_streams", start_streams)

    def probe_scales(self, ctx: MethodContext) -> list[list[np.ndarray]]:
        """Train the shard networks; per network, per group, its scale factors divided by the group's largest."""
        loader = ctx.loader(self.name, "training its shard networks")
        batches = count_batches(loader)
        if batches is not None and batches < self.networks:
            raise AutopruneError(f"method 'sa' trains each of its {self.networks} shard networks on one training "
                                 f"batch in {self.networks}, but the training loader has only {batches}; use a "
                                 "smaller batch size (--batch-size, TrainConfig(batch_size=)), more training data, "
                                 "or fewer networks (networks=2)")
        scales = []
        for k in range(self.networks):
            net = copy.deepcopy(ctx.model)
            fit(net, ShardLoader(loader, k, self.networks), ctx.training(self.epochs, seed=ctx.seed + k),
                targets_fix=METHOD_TRAINING_FIX, regularizer=polarization_penalty(ctx.space, self.polarization, self.t),
                progress=ctx.progress,
                desc=f"polarise net {k + 1}/{self.networks}")
            with torch.no_grad():
                factors = [s.detach().abs().cpu().double() for s in scale_factors(net, ctx.space)]
            scales.append([(f / f.max().clamp_min(1e-12)).numpy() for f in factors])
        return scales

    def plan(self, ctx: MethodContext) -> Plan:
        scales = self.probe_scales(ctx)
        tables = structure_table(ctx.space, scales, step=self.grid)
        for group, table in zip(ctx.space.groups, tables, strict=True):
            log.info("sa contrast %s: %d stationary points; keep ratio:contrast %s", group.name, table.stationary,
                     " ".join(f"{x:.3f}:{c:.3f}" for x, c in zip(table.choices, table.contrasts, strict=True)))
        choices = tuple(t.choices for t in tables)
        contrasts = tuple(t.contrasts for t in tables)
        consensus = [torch.tensor(np.mean([net[i] for net in scales], axis=0), dtype=torch.float32)
                     for i in range(len(ctx.space))]
        notes = {
            "networks": self.networks, "polarization": self.polarization, "polarization_t": self.t,
            "probe_training_epochs": self.epochs,
            "thresholds_per_layer": [int(len(t.choices)) for t in tables],
            "stationary_points_per_layer": [t.stationary for t in tables],
            "contrast_per_layer": {g.name: [[round(float(x), 4), round(float(c), 4)]
                                            for x, c in zip(t.choices, t.contrasts, strict=True)]
                                   for g, t in zip(ctx.space.groups, tables, strict=True)},
        }
        starts = residual_start(ctx.model, ctx.space) if self.start_streams else []
        return Plan(ctx.model, consensus, "sa", {"starts": starts}, choices=choices,
                    penalty=contrast_penalty(choices, contrasts, self.contrast_weight), notes=notes,
                    extra_training_epochs=0)
