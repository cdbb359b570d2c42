"""Sensitivity x (1 - correlation): the node importance of the optimal-threshold pruner (OTP).

Wang, Liu & Pan, *Pruning algorithm of convolutional neural network based on optimal threshold*
(ICMAI 2020, paper 1) judge a node by two factors, its *sensitivity* and its *correlation*, and delete
the nodes whose importance falls under a greedily chosen threshold. The abstract does not give the
formulas; our reading:

* **Sensitivity** of a channel: how much the loss (cross-entropy on the calibration batches) rises
  when the channel is removed. ``mode="measured"`` measures it: one pass over the calibration batches
  per channel, with the channel zeroed where it is produced (the output of every writer of the group,
  exactly as :meth:`~autoprune.engine.space.PruningSpace.masked` removes it), minus the unmasked loss.
  The masked copies of a batch are forwarded together (several channels per pass), which is exact in
  eval mode. ``mode="first_order"`` estimates it with a first-order Taylor expansion:
  ``|sum a * dL/da|`` over the batch and positions of the channel's activation ``a`` (taken at the
  group's final writers, e.g. the BatchNorm after each convolution, not the convolution feeding it),
  per batch, averaged over batches. That is the magnitude of the estimated change, as in Molchanov et
  al.'s Taylor criterion: at a trained minimum the sign of a first-order term is not reliable, so a
  channel whose first-order removal would *lower* the loss is still counted as sensitive (the measured
  mode, which sees the true sign, clips such channels to 0). ``mode="auto"`` (default)
  measures when the model has at most ``measured_limit`` prunable channels in all, and estimates
  otherwise. Sensitivities are clipped at 0 (a channel whose removal lowers the loss is not
  important) and divided by a maximum: their group's (``normalize="group"``, the default: every
  group's most sensitive channel scores 1, so groups are ranked alike) or the largest over all groups
  (``normalize="global"``: the loss changes stay comparable across groups, as one threshold on the
  importance over the whole network needs).
* **Correlation** of a channel: the largest ``|Pearson r|`` between its activation and that of any
  other channel of the same group, over all calibration samples, where a channel's activation is the
  output of the group's last writer in forward order (the BatchNorm after the convolution when there
  is one), averaged over spatial positions per sample. Constant channels correlate with nothing
  (r = 0). A channel that duplicates another scores r = 1: it is redundant.
* **Importance** = ``sensitivity * (1 - correlation) + 1e-6 * sensitivity``; the small second term
  breaks ties between fully correlated channels in favour of the more sensitive one.

The model is scored in eval mode (BatchNorm running statistics used, not updated).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from autoprune.engine.batches import Inputs, forward, gradients
from autoprune.engine.space import PruningSpace

from ._common import (
    Members,
    Writer,
    calibration,
    finish,
    loss,
    out_members,
    repeat_batch,
    scoring_session,
)
from .base import Batches, DataCriterion, check_choice, check_int, register_criterion

logger = logging.getLogger(__name__)

MODES = ("auto", "measured", "first_order")
NORMALIZATIONS = ("group", "global")
TIE_BREAK = 1e-6
#: Measured mode forwards several masked copies of a batch at once, up to this many samples per pass
#: (exact: the model is in eval mode, where every sample is computed independently).
CHUNK_SAMPLES = 256

Data = list[tuple[Inputs, Tensor]]


@dataclass(frozen=True)
class OTPFactors:
    """The factors of OTP importance, one float64 CPU tensor per group.

    Attributes:
        mode: ``"measured"`` or ``"first_order"``: how sensitivity was obtained.
        sensitivity: loss increase on removal, clipped at 0 and divided by the group's maximum (or the
            maximum over all groups, with ``normalize="global"``).
        correlation: largest ``|Pearson r|`` with another channel of the group.
    """

    mode: str
    sensitivity: tuple[Tensor, ...]
    correlation: tuple[Tensor, ...]


@register_criterion("otp")
class OTPCriterion(DataCriterion):
    """Sensitivity x (1 - correlation) on calibration data.

    Args:
        mode: ``"measured"`` (one masked pass over the batches per channel), ``"first_order"`` (one
            forward and backward pass per batch) or ``"auto"``.
        max_batches: calibration batches read (default 8; measured mode re-reads them once per channel).
        measured_limit: in ``"auto"`` mode, the most prunable channels (all groups together) for which
            sensitivity is measured rather than estimated.
        normalize: sensitivities divided by their group's maximum (``"group"``) or by the maximum over
            all groups (``"global"``).
    """

    def __init__(self, *, mode: str = "auto", max_batches: int = 8, measured_limit: int = 1024,
                 normalize: str = "group") -> None:
        super().__init__(max_batches=max_batches)
        self.mode = check_choice("mode", mode, MODES)
        self.measured_limit = check_int("measured_limit", measured_limit, minimum=0)
        self.normalize = check_choice("normalize", normalize, NORMALIZATIONS)

    def resolved_mode(self, space: PruningSpace) -> str:
        """``"measured"`` or ``"first_order"``: the mode used on ``space``."""
        if self.mode != "auto":
            return self.mode
        return "measured" if int(space.channels.sum()) <= self.measured_limit else "first_order"

    def factors(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
                device: str | torch.device = "cpu") -> OTPFactors:
        """The two factors of the importance, per group (same contract and errors as :meth:`scores`)."""
        batches = self._require_data(batches)
        mode = self.resolved_mode(space)
        with scoring_session(model, device) as work:
            members = out_members(work, space)
            data = list(calibration(batches, self.max_batches, device, self.name))
            order, terminal = _probe(work, members, data[0][0])
            last = [max((w for w in group if w.name in order), key=lambda w: order[w.name], default=None)
                    for group in members]
            logger.info("otp: %s sensitivity of %d channels on %d calibration batches", mode,
                        int(space.channels.sum()), len(data))
            if mode == "measured":
                raw, activations = _measured(work, space, members, last, data, device)
            else:
                raw, activations = _first_order(work, space, terminal, last, data, device)
        sensitivity, correlation = [], []
        clipped = [sens.detach().double().cpu().clamp_min(0.0) for sens in raw]
        overall = max(float(sens.max()) for sens in clipped)
        for group, sens, acts in zip(space.groups, clipped, activations, strict=True):
            top = float(sens.max()) if self.normalize == "group" else overall
            sensitivity.append(sens / top if top > 0 else sens)
            correlation.append(max_abs_correlation(acts) if acts is not None
                               else torch.zeros(group.channels, dtype=torch.float64))
        return OTPFactors(mode, tuple(sensitivity), tuple(correlation))

    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """OTP importance per channel: ``sensitivity * (1 - correlation) + 1e-6 * sensitivity``."""
        f = self.factors(model, space, batches, device=device)
        out = [s * (1.0 - c) + TIE_BREAK * s for s, c in zip(f.sensitivity, f.correlation, strict=True)]
        return finish(out, space, self.name)


def max_abs_correlation(activations: Tensor) -> Tensor:
    """Per channel, the largest ``|Pearson r|`` with any other channel of ``activations`` ``(N, C)``.

    Channels that are constant over the samples (within float precision) get 0, and correlate 0 with
    the others; fewer than two samples or channels give all zeros.
    """
    a = activations.detach().double().cpu()
    n, c = a.shape
    if n < 2 or c < 2:
        return torch.zeros(c, dtype=torch.float64)
    centred = a - a.mean(dim=0)
    std = centred.pow(2).mean(dim=0).sqrt()
    constant = std <= 1e-6 * a.abs().mean(dim=0) + 1e-12
    z = centred / torch.where(constant, torch.ones_like(std), std)
    z[:, constant] = 0.0
    corr = (z.T @ z) / n
    corr.fill_diagonal_(0.0)
    return corr.abs().clamp(max=1.0).max(dim=1).values


def _probe(model: nn.Module, members: Sequence[Members], inputs: Inputs) -> tuple[dict[str, int], list[Members]]:
    """Forward order of the out members, and per group its final writers (whose output no other
    writer of the same group reads, e.g. the BatchNorm but not the convolution before it)."""
    groups_of: dict[str, set[int]] = {}
    for i, group in enumerate(members):
        for writer in group:
            groups_of.setdefault(writer.name, set()).add(i)
    modules = {writer.name: writer.module for group in members for writer in group}
    order: dict[str, int] = {}
    produced: dict[int, tuple[str, Tensor]] = {}
    fed: set[str] = set()

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
            order.setdefault(name, len(order))
            source = produced.get(id(inputs[0])) if inputs else None
            if source is not None and source[1] is inputs[0] and source[0] != name \
                    and groups_of[source[0]] & groups_of[name]:
                fed.add(source[0])
            if isinstance(output, Tensor):
                produced[id(output)] = (name, output)

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
    try:
        with torch.no_grad():
            forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    terminal = [[w for w in group if w.name in order and w.name not in fed] for group in members]
    return order, terminal


def _capture(writer: Writer, store: list[Tensor]):
    """Register a forward hook that appends the writer's per-sample group-channel means to ``store``."""
    def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
        store.append(writer.per_sample(output.detach()).double().cpu())

    return writer.module.register_forward_hook(hook)


class _Gate:
    """Multiplies the group channels of its writers' outputs by ``weights`` (settable)."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights

    def register(self, writer: Writer):
        """Gate ``writer``'s output; returns the hook's handle."""
        return writer.module.register_forward_hook(lambda module, inputs, output: writer.gate(output, self.weights))


def _mean_loss(model: nn.Module, data: Data) -> float:
    total = torch.zeros((), dtype=torch.float64, device=data[0][1].device)
    count = 0
    for inputs, labels in data:
        total += loss(model, inputs, labels, reduction="sum").double()
        count += labels.shape[0]
    return float(total) / count


def _measured(model: nn.Module, space: PruningSpace, members: Sequence[Members],
              last: Sequence[Writer | None], data: Data,
              device: str | torch.device) -> tuple[list[Tensor], list[Tensor | None]]:
    stores: list[list[Tensor]] = [[] for _ in members]
    handles = [_capture(writer, store) for writer, store in zip(last, stores, strict=True) if writer is not None]
    try:
        with torch.no_grad():
            base = _mean_loss(model, data)
    finally:
        for handle in handles:
            handle.remove()
    activations = [torch.cat(store) if store else None for store in stores]
    samples = sum(labels.shape[0] for _, labels in data)
    sensitivity = []
    total = int(space.channels.sum())
    with torch.no_grad(), tqdm(total=total, desc="otp sensitivity", unit="ch", leave=False, disable=None) as bar:
        for group, group_members in zip(space.groups, members, strict=True):
            losses = torch.zeros(group.channels, dtype=torch.float64, device=device)
            hook = _Gate(torch.ones(group.channels, device=device))
            handles = [hook.register(writer) for writer in group_members]
            try:
                for inputs, labels in data:
                    per_pass = max(1, CHUNK_SAMPLES // labels.shape[0])
                    for start in range(0, group.channels, per_pass):
                        channels = torch.arange(start, min(start + per_pass, group.channels), device=device)
                        copies = channels.numel()
                        masks = torch.ones(copies, group.channels, device=device)
                        masks[torch.arange(copies, device=device), channels] = 0.0
                        hook.weights = masks.repeat_interleave(labels.shape[0], dim=0)
                        per_sample = loss(model, repeat_batch(inputs, copies), labels.repeat(copies),
                                          reduction="none")
                        losses[channels] += per_sample.view(copies, -1).double().sum(dim=1)
                bar.update(group.channels)
            finally:
                for handle in handles:
                    handle.remove()
            sensitivity.append(losses.cpu() / samples - base)
    return sensitivity, activations


def _first_order(model: nn.Module, space: PruningSpace, terminal: Sequence[Members],
                 last: Sequence[Writer | None], data: Data,
                 device: str | torch.device) -> tuple[list[Tensor], list[Tensor | None]]:
    stores: list[list[Tensor]] = [[] for _ in terminal]
    gates = [torch.ones(g.channels, device=device, requires_grad=True) for g in space.groups]
    handles = [_capture(writer, store) for writer, store in zip(last, stores, strict=True) if writer is not None]
    handles += [_Gate(weights).register(writer)
                for group, weights in zip(terminal, gates, strict=True) for writer in group]
    sums = [torch.zeros(g.channels, device=device) for g in space.groups]
    try:
        for inputs, labels in data:
            grads = gradients(loss(model, inputs, labels), gates, "otp's sensitivity gradients")
            for total, grad in zip(sums, grads, strict=True):
                if grad is not None:
                    total += grad.abs()
    finally:
        for handle in handles:
            handle.remove()
    activations = [torch.cat(store) if store else None for store in stores]
    return [total / len(data) for total in sums], activations
