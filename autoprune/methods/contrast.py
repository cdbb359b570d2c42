"""SA: contrast loss + simulated annealing (Wang, Wang & Chen, CSAMCS 2022, SPIE 12597).

The paper: several networks are trained on different training data of the same dataset (for
generalisation); scale factors are polarised; in each layer the stationary points close to zero of the
scale-factor distribution are the candidate pruning thresholds; each network prunes at the same
layer with its own threshold; the structures obtained are compared and the threshold choice whose
structures differ least is kept; simulated annealing searches the choices.

Our reading, where the abstract is silent:

* ``networks`` (default 3) copies of the trained model are trained for ``epochs`` epochs on disjoint
  shards of the training data (every ``networks``-th batch of each pass) with the polarisation
  regulariser of Zhuang et al. (NeurIPS 2020), ``lambda * sum_layers (t * sum|s| - sum|s - mean(s)|)``,
  ``t`` = 1.2, ``lambda`` = ``polarization`` = 1e-4. The scale factors ``s`` are BatchNorm's gammas;
  in a layer without BatchNorm, the L2 norms of its filters.
* Per layer, the candidate thresholds are the stationary points (density extrema) of a Gaussian kernel
  density estimate of the pooled, max-normalised scale factors that lie below the 90th percentile
  ("close to zero"), plus 0; if fewer than 8 exist, evenly spaced thresholds fill in.
* Under threshold ``t`` network ``k`` keeps the fraction ``r_k(t)`` of the layer's channels; the
  candidate structure is their mean and the *contrast loss* is the mean absolute difference between
  the networks' fractions, averaged over layers. Simulated annealing picks one threshold per layer to
  maximise validation accuracy minus ``contrast_weight`` (default 1) times the contrast loss, at the
  MACs budget.
* The first shard's network is pruned (by its own scale factors) and fine-tuned.
"""

from __future__ import annotations

import copy
import itertools

import numpy as np
import torch
from torch import nn

from autoprune.checks import check_float, check_int
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import fit
from autoprune.methods.base import Method, MethodContext, Plan, ShardLoader, register_method

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def scale_factors(model: nn.Module, space: PruningSpace) -> list[torch.Tensor]:
    """Per group, differentiable per-channel scale factors: BN gamma, or the root's filter L2 norms."""
    modules = dict(model.named_modules())
    out = []
    for g in space.groups:
        bn = next((modules[m.module] for m in g.members if m.dim == "out" and isinstance(modules[m.module], _NORMS)),
                  None)
        if bn is not None and bn.weight is not None:
            out.append(bn.weight)
        else:
            w = modules[g.root].weight
            out.append(w.flatten(1).norm(dim=1))
    return out


def polarization_penalty(space: PruningSpace, weight: float, t: float):
    """Zhuang et al.'s polarisation regulariser on the scale factors of every group."""

    def penalty(model: nn.Module) -> torch.Tensor:
        total = 0.0
        for s in scale_factors(model, space):
            a = s.abs()
            total = total + t * a.sum() - (a - a.mean()).abs().sum()
        return weight * total

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


def candidate_thresholds(pooled: np.ndarray, *, minimum: int = 8) -> np.ndarray:
    """Stationary points close to zero (below the 90th percentile), 0, and an even fill-in if too few."""
    ceiling = float(np.percentile(pooled, 90))
    points = [0.0] + [p for p in stationary_points(pooled) if p < ceiling]
    if len(points) < minimum:
        points += list(np.linspace(0.0, ceiling, minimum, endpoint=False)[1:])
    return np.unique(np.round(points, 6))


def structure_table(space: PruningSpace, scales: list[list[np.ndarray]]) -> tuple[tuple[np.ndarray, ...],
                                                                                tuple[np.ndarray, ...]]:
    """Per group: the allowed consensus keep ratios and the contrast loss of each.

    Args:
        space: the pruning space (for snapping to channel counts).
        scales: ``scales[k][i]``: network k's max-normalised scale factors of group i.
    """
    choices, contrasts = [], []
    for i in range(len(space)):
        pooled = np.concatenate([net[i] for net in scales])
        table: dict[float, float] = {}
        for t in candidate_thresholds(pooled):
            fractions = [float((net[i] > t).mean()) for net in scales]
            x = float(space.snap_one(i, np.array([np.mean(fractions)]))[0])
            diff = float(np.mean([abs(a - b) for a, b in itertools.combinations(fractions, 2)])) \
                if len(fractions) > 1 else 0.0
            table[x] = min(diff, table.get(x, np.inf))
        xs = np.array(sorted(table))
        choices.append(xs)
        contrasts.append(np.array([table[x] for x in xs]))
    return tuple(choices), tuple(contrasts)


def contrast_penalty(choices: tuple[np.ndarray, ...], contrasts: tuple[np.ndarray, ...], weight: float):
    """``weight`` x the mean contrast loss of a keep vector (each ratio read at its nearest choice)."""

    def penalty(x: np.ndarray) -> float:
        total = 0.0
        for xi, c, d in zip(x, choices, contrasts, strict=True):
            total += float(d[int(np.argmin(np.abs(c - xi)))])
        return weight * total / len(choices)

    return penalty


@register_method
class SA(Method):
    """SA: polarised networks on data shards, contrast loss, simulated annealing over thresholds."""

    name = "sa"
    summary = "paper 3: shard-trained polarised networks, contrast loss, simulated annealing over thresholds"
    source = "Wang, Wang & Chen 2023 (contrast loss + SA)"
    default_budget = 200

    def __init__(self, *, networks: int = 3, epochs: int = 1, polarization: float = 1e-4, t: float = 1.2,
                 contrast_weight: float = 1.0) -> None:
        """Args:
        networks: networks trained on disjoint shards of the training data (>= 2: a contrast needs two).
        epochs: training epochs of each shard network.
        polarization: weight of the polarisation regulariser (lambda of Zhuang et al.).
        t: the regulariser's t.
        contrast_weight: weight of the contrast loss against the validation score.
        """
        self.networks = check_int("networks", networks, minimum=2, maximum=64)
        self.epochs = check_int("epochs", epochs, minimum=0)
        self.polarization = check_float("polarization", polarization, low=0.0)
        self.t = check_float("t", t, low=0.0)
        self.contrast_weight = check_float("contrast_weight", contrast_weight, low=0.0)

    def plan(self, ctx: MethodContext) -> Plan:
        loader = ctx.loader(self.name, "training its shard networks")
        nets, scales = [], []
        for k in range(self.networks):
            net = copy.deepcopy(ctx.model)
            fit(net, ShardLoader(loader, k, self.networks), ctx.training(self.epochs, seed=ctx.seed + k),
                regularizer=polarization_penalty(ctx.space, self.polarization, self.t), progress=ctx.progress,
                desc=f"polarise net {k + 1}/{self.networks}")
            with torch.no_grad():
                factors = [s.detach().abs().cpu().double() for s in scale_factors(net, ctx.space)]
            scales.append([(f / f.max().clamp_min(1e-12)).numpy() for f in factors])
            nets.append((net, factors))
        choices, contrasts = structure_table(ctx.space, scales)
        model, own = nets[0]
        return Plan(model, [f.float() for f in own], "sa", {},
                    choices=choices, penalty=contrast_penalty(choices, contrasts, self.contrast_weight),
                    notes={"networks": self.networks, "polarization": self.polarization, "polarization_t": self.t,
                           "thresholds_per_layer": [int(len(c)) for c in choices]},
                    extra_training_epochs=self.epochs)
