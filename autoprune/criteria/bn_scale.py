"""BatchNorm scale: ``|gamma|`` of the normalisation layer after each channel (network slimming).

Liu et al., *Learning Efficient Convolutional Networks through Network Slimming* (ICCV 2017) train
with an L1 penalty on the BatchNorm scale factors and prune the channels whose ``|gamma|`` falls under
one global threshold. This criterion is the score; the sparsity training and the threshold belong to
the method. Our choices: a group with several normalisation layers (a residual stream has one per
writer) scores a channel by the mean of its ``|gamma|`` over them; a group without an affine
normalisation layer cannot be scored and raises an error naming it. No data is needed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError

from ._common import NORM_TYPES, finish, out_members
from .base import Batches, Criterion, register_criterion


@register_criterion("bn_scale")
class BNScaleCriterion(Criterion):
    """Mean ``|gamma|`` over the group's BatchNorm (or other affine normalisation) layers."""

    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """Scale factors; ``batches`` and ``device`` are not used.

        Raises:
            AutopruneError: if some group has no affine normalisation layer.
        """
        out = []
        with torch.no_grad():
            for group, members in zip(space.groups, out_members(model, space), strict=True):
                gammas = [w.rows(w.module.weight.detach(), group.channels, f"weight of {w.name}")
                          .double().abs().mean(dim=1).cpu()
                          for w in members
                          if isinstance(w.module, NORM_TYPES) and getattr(w.module, "weight", None) is not None]
                if not gammas:
                    raise AutopruneError(
                        f"criterion bn_scale needs a BatchNorm after every prunable layer, but group "
                        f"{group.name!r} has none; use a criterion such as l1 for this model")
                out.append(torch.stack(gammas).mean(dim=0))
        return finish(out, space, self.name)
