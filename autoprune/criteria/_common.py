"""Helpers shared by the criteria: group members, per-channel views, a guarded scoring session,
calibration batches and the parameter-gradient loop of the gradient-based criteria."""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autoprune.engine.batches import (
    METHOD_TRAINING_FIX,
    Inputs,
    batch_size_of,
    check_class_targets,
    describe_shape,
    forward,
    gradients,
    split_batch,
    to_device,
)
from autoprune.engine.space import COMPUTE_TYPES, NORM_TYPES, PruningSpace, channel_dim
from autoprune.errors import AutopruneError

from .base import Batches

__all__ = ["COMPUTE_TYPES", "NORM_TYPES", "Members", "Writer", "out_members"]


class Writer(NamedTuple):
    """A module whose output channels a group prunes (a convolution, linear or normalisation layer)."""

    name: str
    module: nn.Module
    index: Tensor | None  # the module channel of each group channel; None: channel i is the module's channel i

    def rows(self, tensor: Tensor, channels: int, where: str, *, weight: bool = False) -> Tensor:
        """``tensor`` (a parameter of the module, or its gradient; ``weight``: its weight) as ``(channels, -1)``
        rows, one per group channel: a transposed convolution's weight is read output channels first, and
        only the group's channels of a module that has others are kept."""
        if weight and getattr(self.module, "transposed", False) and tensor.dim() > 1:
            tensor = tensor.transpose(0, 1)
        if self.index is not None:
            if tensor.dim() == 0 or tensor.shape[0] <= int(self.index.max()):
                raise AutopruneError(f"{where} has shape {tuple(tensor.shape)}, too few channels for its "
                                     "pruning group; the model does not match the PruningSpace")
            tensor = tensor.index_select(0, self.index.to(tensor.device))
        return channel_rows(tensor, channels, where)

    def per_sample(self, output: Tensor) -> Tensor:
        """The module's output averaged over every dimension but the batch and the group's channels: ``(N, C)``."""
        dim = channel_dim(self.module, output)
        moved = output.movedim(dim, 1) if dim != 1 else output
        means = moved.reshape(moved.shape[0], moved.shape[1], -1).mean(dim=2)
        return means if self.index is None else means[:, self.index.to(means.device)]

    def gate(self, output: Tensor, weights: Tensor) -> Tensor:
        """``output`` with group channel ``c`` multiplied by ``weights[c]``, or, for 2-D ``weights`` ``(N, C)``,
        channel ``c`` of sample ``n`` multiplied by ``weights[n, c]``; the module's other channels unchanged."""
        dim = channel_dim(self.module, output)
        if self.index is not None:
            full = torch.ones(*weights.shape[:-1], output.shape[dim], dtype=weights.dtype, device=weights.device)
            full[..., self.index.to(weights.device)] = weights
            weights = full
        shape = [1] * output.dim()
        shape[dim] = -1
        if weights.dim() == 2:
            shape[0] = weights.shape[0]
        return output * weights.to(dtype=output.dtype).view(shape)


Members = list[Writer]


def out_members(model: nn.Module, space: PruningSpace) -> list[Members]:
    """Per group, every :class:`Writer` of its channels: the members whose output channels it prunes."""
    modules = dict(model.named_modules())
    found: list[Members] = []
    for group in space.groups:
        members: Members = []
        for member in group.members:
            if member.dim != "out":
                continue
            module = modules.get(member.module)
            if module is None:
                raise AutopruneError(f"the model has no module {member.module!r} (pruning group "
                                     f"{group.name!r}); build the PruningSpace from this model")
            index = None if member.index is None else torch.tensor(member.index, dtype=torch.long)
            members.append(Writer(member.module, module, index))
        found.append(members)
    return found


def channel_rows(tensor: Tensor, channels: int, where: str) -> Tensor:
    """``tensor`` (channel dimension first, as for conv/linear/norm parameters) as ``(channels, -1)``."""
    if tensor.dim() == 0 or tensor.shape[0] != channels:
        raise AutopruneError(f"{where} has shape {tuple(tensor.shape)}, expected {channels} channels in its "
                             "first dimension; the model does not match the PruningSpace")
    return tensor.reshape(channels, -1)


def _on_device(model: nn.Module, device: torch.device) -> bool:
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != device.type:
            return False
        if None not in (device.index, tensor.device.index) and tensor.device.index != device.index:
            return False
    return True


@contextlib.contextmanager
def scoring_session(model: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """Within the block, a model to score in eval mode with gradients enabled; restored afterwards.

    Eval mode: BatchNorm uses (and does not update) its running statistics and dropout is off, so the
    model's buffers are untouched and the scores are deterministic. The model itself is yielded when it
    already lives on ``device``; otherwise a copy moved there (the original is never moved). The
    train/eval flag of every module and the ``requires_grad`` flag of every parameter are restored on
    exit, whatever happens inside.
    """
    target = torch.device(device)
    work = model if _on_device(model, target) else copy.deepcopy(model).to(target)
    modes = [(m, m.training) for m in work.modules()]
    flags = [(p, p.requires_grad) for p in work.parameters()]
    try:
        work.eval()
        with torch.enable_grad():
            yield work
    finally:
        for module, training in modes:
            module.training = training
        for param, requires_grad in flags:
            param.requires_grad_(requires_grad)


def calibration(batches: Batches, max_batches: int, device: str | torch.device,
                criterion: str) -> Iterator[tuple[Inputs, Tensor]]:
    """The first ``max_batches`` ``(inputs, labels)`` batches, checked and moved to ``device``."""
    count = 0
    for item in itertools.islice(batches, max_batches):
        inputs, labels = split_batch(item, f"a calibration batch of criterion {criterion}")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != batch_size_of(inputs):
            raise AutopruneError(f"criterion {criterion}: a batch has inputs {describe_shape(inputs)} and labels "
                                 f"{tuple(getattr(labels, 'shape', ()))}; expected class labels (B,) for B inputs")
        inputs = to_device(inputs, device)
        labels = labels.to(device=device, dtype=torch.long)
        if isinstance(inputs, tuple | list):  # made under torch.inference_mode(): not usable with autograd
            inputs = tuple(t.clone() if t.is_inference() else t for t in inputs)
        elif inputs.is_inference():
            inputs = inputs.clone()
        if labels.is_inference():
            labels = labels.clone()
        count += 1
        yield inputs, labels
    if count == 0:
        raise AutopruneError(f"criterion {criterion} got no calibration batches (the data is empty)")


def repeat_batch(inputs: Inputs, copies: int) -> Inputs:
    """``copies`` copies of a batch of inputs, one after the other along the batch dimension."""
    if isinstance(inputs, tuple | list):
        return tuple(t.repeat(copies, *([1] * (t.dim() - 1))) for t in inputs)
    return inputs.repeat(copies, *([1] * (inputs.dim() - 1)))


def loss(model: nn.Module, inputs: Inputs, labels: Tensor, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy of the model's logits against the labels."""
    outputs = forward(model, inputs)
    check_class_targets(outputs, labels, what="a gradient-based channel criterion", fix=METHOD_TRAINING_FIX)
    return F.cross_entropy(outputs, labels, reduction=reduction)


def finish(scores: Sequence[Tensor], space: PruningSpace, criterion: str) -> list[Tensor]:
    """Check the scores' shapes and finiteness and return them as float32 CPU tensors."""
    out = []
    for group, score in zip(space.groups, scores, strict=True):
        score = score.detach().to(device="cpu", dtype=torch.float32)
        if score.shape != (group.channels,):
            raise AutopruneError(f"criterion {criterion} produced {tuple(score.shape)} scores for group "
                                 f"{group.name!r} of {group.channels} channels")
        if not torch.isfinite(score).all():
            raise AutopruneError(f"criterion {criterion} produced non-finite scores for group {group.name!r}; "
                                 "is the model's loss finite on the calibration data?")
        out.append(score)
    return out


def parameter_gradient_scores(model: nn.Module, space: PruningSpace, batches: Batches, *,
                              contribution: Callable[[Tensor, Tensor], Tensor], max_batches: int,
                              device: str | torch.device, criterion: str) -> list[Tensor]:
    """Per channel, ``contribution(w, dL/dw)`` summed over the group's out-member parameters of that
    channel (every weight and bias of its convolution, linear and normalisation layers), per batch,
    averaged over at most ``max_batches`` batches."""
    with scoring_session(model, device) as work:
        members = out_members(work, space)
        params: list[nn.Parameter] = []
        index: dict[int, int] = {}
        owners: list[list[tuple[int, str]]] = []
        for group_members in members:
            entries = []
            for writer in group_members:
                for pname, param in writer.module.named_parameters(recurse=False):
                    if id(param) not in index:
                        index[id(param)] = len(params)
                        params.append(param)
                    entries.append((index[id(param)], writer, pname))
            owners.append(entries)
        for param in params:
            param.requires_grad_(True)
        totals = [torch.zeros(g.channels, device=device) for g in space.groups]
        count = 0
        for inputs, labels in calibration(batches, max_batches, device, criterion):
            grads = gradients(loss(work, inputs, labels), params, f"the {criterion} criterion's gradients")
            with torch.no_grad():
                for group, entries, total in zip(space.groups, owners, totals, strict=True):
                    for i, writer, pname in entries:
                        if grads[i] is not None:
                            total += writer.rows(contribution(params[i], grads[i]), group.channels,
                                                 f"parameter {writer.name}.{pname}",
                                                 weight=pname == "weight").sum(dim=1)
            count += 1
    return finish([t / count for t in totals], space, criterion)


def parameters_per_channel(model: nn.Module, space: PruningSpace) -> list[float]:
    """Per group, how many parameters one channel owns in the group's output writers (weights and biases of
    its convolution / linear layers and normalisation layers): what :func:`parameter_gradient_scores` sums."""
    out = []
    for members in out_members(model, space):
        seen: set[int] = set()
        total = 0.0
        for writer in members:
            for pname, param in writer.module.named_parameters(recurse=False):
                if id(param) not in seen and param.dim() > 0:
                    seen.add(id(param))
                    rows = param.shape[1] if pname == "weight" and getattr(writer.module, "transposed", False) \
                        else param.shape[0]
                    total += param.numel() / rows
        out.append(max(total, 1.0))
    return out
