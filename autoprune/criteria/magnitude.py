"""Filter magnitude: the L1 (PFEC) and L2 norms of a group's output filters.

Li et al., *Pruning Filters for Efficient ConvNets* (ICLR 2017, "PFEC") rank the filters of a
convolution by the L1 norm of their kernel weights, ``sum |W[c]|``, and prune the smallest; ``l2`` is the
same with the Euclidean norm. Our choices: only the weights count (biases and normalisation layers are
left out, as in PFEC); a group whose channels are written by several layers (a residual stream, or a
linear layer's output units) sums the norms of all its writers' filters, since removing the channel
removes every one of them. No data is needed.

``l1_group`` sees the whole coupled group, as Torch-Pruning's group-level magnitude importance does:
removing a channel removes its filters in every writer *and* its input slices in every reader (the next
convolutions' input channels, the classifier's input features), so its score is the L1 norm of all of
them. A channel whose outgoing weights are small contributes little downstream even if its filter is
large.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from autoprune.engine.space import PruningSpace

from ._common import COMPUTE_TYPES, channel_rows, finish, out_members
from .base import Batches, Criterion, register_criterion


class _FilterNorm(Criterion):
    """Sum over a group's convolution / linear writers of a norm of each output filter."""

    p: ClassVar[int] = 1

    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """Filter norms; ``batches`` and ``device`` are not used (the weights are read in place)."""
        out = []
        with torch.no_grad():
            for group, members in zip(space.groups, out_members(model, space), strict=True):
                total = torch.zeros(group.channels, dtype=torch.float64)
                for w in members:
                    if isinstance(w.module, COMPUTE_TYPES):
                        rows = w.rows(w.module.weight.detach(), group.channels, f"weight of {w.name}", weight=True)
                        total += rows.double().norm(p=self.p, dim=1).cpu()
                out.append(total)
        return finish(out, space, self.name)


@register_criterion("l1")
class L1Criterion(_FilterNorm):
    """L1 norm of each output filter (PFEC, Li et al. 2017), summed over the group's writers."""

    p: ClassVar[int] = 1


@register_criterion("l2")
class L2Criterion(_FilterNorm):
    """L2 norm of each output filter, summed over the group's writers."""

    p: ClassVar[int] = 2


@register_criterion("l1_group")
class GroupL1Criterion(Criterion):
    """L1 norm of everything a channel's removal removes: its writers' filters and its readers' input slices."""

    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """Group L1 norms; ``batches`` and ``device`` are not used (the weights are read in place)."""
        modules = dict(model.named_modules())
        out = []
        with torch.no_grad():
            for group in space.groups:
                total = torch.zeros(group.channels, dtype=torch.float64)
                for member in group.members:
                    module = modules.get(member.module)
                    if not isinstance(module, COMPUTE_TYPES):
                        continue
                    weight = module.weight.detach().double().cpu()
                    # output channels first (a transposed convolution's weight is input channels first)
                    by_output = weight.transpose(0, 1) if getattr(module, "transposed", False) else weight
                    if member.dim == "out":
                        total += channel_rows(by_output, group.channels, f"weight of {member.module}").abs().sum(1)
                    elif getattr(module, "groups", 1) == 1 and member.start >= 0:
                        width = group.channels * member.ratio  # a concatenation's reader: its slice of inputs
                        columns = by_output.transpose(0, 1)[member.start:member.start + width]  # input channels first
                        rows = channel_rows(columns, width, f"input of {member.module}")
                        total += rows.abs().sum(1).view(group.channels, member.ratio).sum(1)
                out.append(total)
        return finish(out, space, self.name)
