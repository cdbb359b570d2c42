"""The classic baselines the papers compare against: PFEC (l1), global ranking, network slimming, random."""

from __future__ import annotations

import copy

import torch
from torch import nn

from autoprune.checks import check_float, check_int
from autoprune.engine.batches import METHOD_TRAINING_FIX
from autoprune.engine.train import fit
from autoprune.errors import AutopruneError, short
from autoprune.methods.base import Method, MethodContext, Plan, criterion_scores, normalized, register_method
from autoprune.methods.papers import SEARCH_CRITERION


@register_method
class L1(Method):
    """PFEC (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017).

    Filters are ranked by the L1 norm of their weights and every layer keeps the same fraction: the
    largest common ratio that meets the MACs target (or, with ``--max-drop``, the smallest whose
    validation accuracy stays within the drop). PFEC chose per-layer ratios by hand from a
    sensitivity analysis; a uniform ratio is the automatic reading used as the baseline in GDP's paper.
    """

    name = "l1"
    summary = "PFEC: L1-norm filter ranking, the same keep ratio in every layer"
    source = "Li et al. 2017 (PFEC)"
    default_budget = 12

    def plan(self, ctx: MethodContext) -> Plan:
        return Plan(ctx.model, criterion_scores(ctx, "l1", method=self.name), "uniform")


@register_method
class Global(Method):
    """Torch-Pruning's global pruning: one ranking of all channels across layers.

    Channels are scored by the L2 norm of their group's weights, each group's scores divided by their
    mean (Torch-Pruning's default normaliser, without which layers of different fan-in are not
    comparable), and one global threshold removes the lowest, moved until the target is met.
    """

    name = "global"
    summary = "Torch-Pruning global magnitude ranking (L2, mean-normalised), one threshold for all layers"
    source = "Torch-Pruning (Fang et al., DepGraph, CVPR 2023)"
    default_budget = 60

    def plan(self, ctx: MethodContext) -> Plan:
        scores = normalized(criterion_scores(ctx, "l2", method=self.name))
        return Plan(ctx.model, scores, "threshold",
                    {"scores": [s.numpy() for s in scores], "rule": "global"})


@register_method
class Random(Method):
    """Random keep vectors within the budget: the floor every search method must beat.

    Channels inside a layer are chosen as the searches it is compared with choose them (criterion
    ``l1_group``: the L1 norm of a channel's filters and of the kernels reading it), so only the
    per-layer widths are random; they are drawn as the random part of the searches' initial populations
    (strategy ``random``), from the strategy's own random stream.
    """

    name = "random"
    summary = "random per-layer widths within the MACs budget (the floor every search must beat)"
    source = "baseline"
    default_budget = 200

    def plan(self, ctx: MethodContext) -> Plan:
        return Plan(ctx.model, criterion_scores(ctx, SEARCH_CRITERION, method=self.name), "random")


def bn_l1_penalty(weight: float):
    """Network slimming's sparsity term: ``weight * sum |gamma|`` over BatchNorm scales."""

    def penalty(model: nn.Module) -> torch.Tensor:
        terms = [m.weight.abs().sum() for m in model.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
        return weight * torch.stack(terms).sum()

    return penalty


@register_method
class Slim(Method):
    """Network slimming (Liu et al., ICCV 2017).

    The model is trained further with an L1 penalty on BatchNorm scale factors (``sparsity``, the paper's
    lambda, default 1e-4, for ``epochs`` epochs), channels are ranked by |gamma|, and one
    global threshold on the raw scale factors prunes the whole network. Needs a BatchNorm after every
    prunable layer. The sparsity epochs train the network that is pruned, so they are counted against
    the fine-tuning (:attr:`extra_training_epochs`): with ``finetune`` epochs E, the pruned network is
    fine-tuned for ``E - epochs``.
    """

    name = "slim"
    trains_in_plan = True
    summary = "network slimming: L1 sparsity training on BN scales, one global threshold"
    source = "Liu et al. 2017 (network slimming)"
    default_budget = 60

    def __init__(self, *, sparsity: float = 1e-4, epochs: int = 1) -> None:
        """Args:
        sparsity: weight of the L1 penalty on BatchNorm scales (the paper's lambda).
        epochs: epochs of sparsity training.
        """
        self.sparsity = check_float("sparsity", sparsity, low=0.0)
        self.epochs = check_int("epochs", epochs, minimum=0)

    @property
    def extra_training_epochs(self) -> int:
        """The sparsity-training epochs: counted against the fine-tuning."""
        return self.epochs

    def plan(self, ctx: MethodContext) -> Plan:
        missing = [g.name for g in ctx.space.groups
                   if not any(m.dim == "out" and isinstance(ctx.model.get_submodule(m.module),
                                                             nn.modules.batchnorm._BatchNorm) for m in g.members)]
        if missing:
            raise AutopruneError(f"method 'slim' needs a BatchNorm after every prunable layer; {short(missing)} "
                                 f"{'has' if len(missing) == 1 else 'have'} none: keep them whole with "
                                 f"ignored_layers={short(missing, 200)} (Python), or use l1, global or a search method")
        model = copy.deepcopy(ctx.model)
        fit(model, ctx.loader(self.name, "sparsity training"), ctx.training(self.epochs),
            targets_fix=METHOD_TRAINING_FIX, regularizer=bn_l1_penalty(self.sparsity), progress=ctx.progress,
            desc="sparsity training")
        scores = criterion_scores(ctx, "bn_scale", model, method=self.name)
        return Plan(model, scores, "threshold", {"scores": [s.numpy() for s in scores], "rule": "global"},
                    notes={"sparsity": self.sparsity, "sparsity_epochs": self.epochs},
                    extra_training_epochs=self.epochs)
