"""Gradient magnitude (GDP, Wang et al. 2020), aggregated per filter.

*Gradient-based deep network pruning* (paper 5) judges each weight by its gradient: the gradient
magnitude accumulated over training batches, weights whose gradient falls under an adaptively found
threshold being removed. GDP scores individual weights; structured pruning removes whole channels, so
we aggregate: a channel's score is ``sum |dL/dw|`` over every parameter belonging to it in the group's
output writers (each convolution / linear filter and its bias, and the BatchNorm ``gamma`` and
``beta`` after it), on the cross-entropy loss of each calibration batch, averaged over at most
``max_batches`` batches. The model is scored in eval mode (BatchNorm running statistics are used and
left unchanged). The adaptive threshold belongs to the ``gdp`` method, not to this score.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoprune.engine.space import PruningSpace

from ._common import parameter_gradient_scores, parameters_per_channel
from .base import Batches, DataCriterion, check_choice, register_criterion


@register_criterion("gradient")
class GradientCriterion(DataCriterion):
    """Accumulated per-filter gradient magnitude ``sum |dL/dw|`` (or its mean per weight).

    Args:
        max_batches: calibration batches read (default 16).
        reduction: ``"sum"`` (default): the sum over the channel's parameters; ``"mean"``: that sum divided
            by how many parameters the channel has, so that channels of layers with different fan-in
            are compared per weight, as the paper compares weights.
    """

    def __init__(self, *, max_batches: int = 16, reduction: str = "sum") -> None:
        super().__init__(max_batches=max_batches)
        self.reduction = check_choice("reduction", reduction, ("sum", "mean"))

    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """Per-channel gradient magnitude averaged over the calibration batches."""
        batches = self._require_data(batches)
        totals = parameter_gradient_scores(model, space, batches, contribution=lambda w, g: g.abs(),
                                           max_batches=self.max_batches, device=device, criterion=self.name)
        if self.reduction == "sum":
            return totals
        return [t / n for t, n in zip(totals, parameters_per_channel(model, space), strict=True)]
