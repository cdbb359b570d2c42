"""First-order Taylor importance (Molchanov et al. 2019).

Molchanov et al., *Importance Estimation for Neural Network Pruning* (CVPR 2019) estimate the loss
change of removing a parameter by its first-order Taylor term, ``(g * w)^2``, and the importance of a
filter by summing that over the filter's parameters, averaged over mini-batches. We follow that
per-parameter form: a channel's score is ``sum (w * dL/dw)^2`` over every parameter belonging to it in
the group's output writers (convolution / linear filter and bias, BatchNorm ``gamma`` and ``beta``),
on the cross-entropy loss of each calibration batch, averaged over at most ``max_batches`` batches,
with the model in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoprune.engine.space import PruningSpace

from ._common import parameter_gradient_scores
from .base import Batches, DataCriterion, register_criterion


@register_criterion("taylor")
class TaylorCriterion(DataCriterion):
    """First-order Taylor importance ``sum (w * dL/dw)^2`` per channel.

    Args:
        max_batches: calibration batches read (default 16).
    """

    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """Per-channel Taylor importance averaged over the calibration batches."""
        batches = self._require_data(batches)
        return parameter_gradient_scores(model, space, batches, contribution=lambda w, g: (w * g).pow(2),
                                         max_batches=self.max_batches, device=device, criterion=self.name)
