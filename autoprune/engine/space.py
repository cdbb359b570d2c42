"""The pruning space: which channels can go, what a keep vector costs, and how to apply it.

A :class:`PruningSpace` is built once from Torch-Pruning's dependency graph of a model. Each prunable
*group* is a set of coupled channels (a convolution's filters, the BatchNorm after it, the input
channels of the layers that read them, and across a residual addition every layer writing the same
stream); a group has one keep ratio. A keep vector (one ratio per group, in group order) is the one
currency every method speaks. Groups whose outputs nothing else reads (the classifier) are not
prunable.

The space offers, for any keep vector and without tracing:

* :meth:`counts` / :meth:`snap`: the channel counts it means, with ``round_to`` and the minimum
  width applied;
* :meth:`cost`: MACs and parameters from an analytic model recorded on one forward pass of the base
  model. MACs are Torch-Pruning's counter's total (``tp.utils.count_ops_and_params``, batch 1): the
  convolution (transposed ones included) and linear layers (multiply-accumulates plus bias additions),
  and the normalisation, activation, pooling and upsampling modules it counts element-wise, each call
  following the channels of the group that flows through it (a module called twice, an activation or a
  head shared across scales, counts twice, as in the counter); what the space does not model (recurrent
  and attention layers, whose channels are kept whole) is a constant measured on the base. Parameters
  are all parameters, including those of no layer that a group prunes (a layer-scale vector, a PReLU's
  slopes).

and, given per-channel scores (lowest go first):

* :meth:`masked`: forward hooks that zero the removed channels of a model in place, for fast
  candidate evaluation;
* :meth:`apply`: a physically smaller copy of the model (Torch-Pruning's surgery).

Masking zeroes a channel where it is produced (the output of its convolution or linear layer and of
the normalisation layer after it, along the dimension :func:`channel_dim` names). For networks whose
activations map 0 to 0 (ReLU and friends) this is exactly what removing the channel does;
:meth:`masking_is_exact` checks it on a model (a LayerNorm over the channels, say, breaks it).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from autoprune.engine.batches import (
    Inputs,
    as_inputs,
    first_sample,
    forward,
    forward_failure,
    random_batch,
    to_device,
)
from autoprune.errors import AutopruneError, first_line, short

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
              nn.InstanceNorm2d, nn.InstanceNorm3d)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
COMPUTE_TYPES = (*CONV_TYPES, nn.Linear)
#: layers with parameters that Torch-Pruning would cut along a group's channels in ways the space does not model
#: (attention heads, recurrent gates): a group reaching one is kept whole
UNMODELLED_TYPES = (nn.MultiheadAttention, nn.RNNBase)
#: autograd ops that fold channels into positions or back (Torch-Pruning treats them as element-wise)
_MIXES_CHANNELS = re.compile(r"PixelShuffle|PixelUnshuffle", re.IGNORECASE)
#: Torch-Pruning's nodes for torch.split / chunk, x[:, a:b] and unbind
_SPLITTING_OPS = (tp.ops._SplitOp, tp.ops._SliceOp, tp.ops._UnbindOp)


@dataclass(frozen=True)
class Member:
    """One module dimension that a group prunes.

    Attributes:
        module: the module's qualified name in the model.
        dim: ``"out"`` (the module's output channels) or ``"in"`` (its input channels).
        ratio: module channels per group channel along that dim (e.g. 16 for a linear layer that reads
            a flattened 4x4 feature map).
        start: the first of the module's channels along that dim that the group covers: 0 unless the
            module reads a concatenation (its second input starts after the first one's channels), or
            ``-1`` where the group's channels are not one contiguous run of the module's.
        index: for an ``"out"`` member that covers only some of its module's channels, or covers them in
            another order (a normalisation layer after a concatenation), the module channel of each group
            channel; ``None`` where group channel ``i`` is module channel ``i``.

    ``dim == "param"``: ``module`` names a parameter that belongs to no convolution, linear or
    normalisation layer (a layer-scale vector, say, or a PReLU's slopes), pruned along its channel dimension
    with the group (Torch-Pruning's unwrapped parameters); it counts in the parameters, nothing else reads it.

    ``dim == "flow"``: ``module`` names one call of an activation, pooling or upsampling module
    (``"name#k"``, its k-th call in the forward) that the group's channels pass through; it counts in the
    MACs as Torch-Pruning's counter counts it (the elements it touches), nothing else reads it.
    """

    module: str
    dim: str
    ratio: int
    start: int = 0
    index: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Group:
    """A set of coupled channels that share one keep ratio.

    ``chunks > 1`` where a member splits the channels into equal blocks that must stay equal (a
    ``GroupNorm``'s groups, a grouped, not depthwise, convolution's groups): as in Torch-Pruning, a channel
    position is kept or removed in every block at once (the blocks' scores averaged), so each block keeps
    the same channels and the layer keeps its number of groups. ``step``: kept counts are multiples of it
    (the least common multiple of ``round_to`` and ``chunks``) or the full width.
    """

    index: int  # position in the keep vector
    root: str
    channels: int
    min_keep: int
    members: tuple[Member, ...]
    chunks: int = 1
    step: int = 1

    @property
    def name(self) -> str:
        """A readable name: the root module's."""
        return self.root


@dataclass(frozen=True)
class Cost:
    """Analytic or counted cost of a network."""

    macs: int
    params: int


@dataclass(frozen=True)
class _LayerShape:
    kind: str  # "conv" | "linear" | "norm" | "param" | "other"
    in_channels: int
    out_channels: int
    kernel: int  # prod(kernel_size) for conv, 1 otherwise
    groups: int
    positions: int  # output positions per sample (H*W for conv, leading dims for linear)
    bias: bool
    depthwise: bool
    fixed_params: int  # parameters of modules the space never changes
    per_channel: int = 0  # parameters per output channel of a normalisation layer or a loose parameter
    macs_per_channel: int = 0  # counted operations per channel of a normalisation layer or an element-wise call
    counted: bool = True  # whether Torch-Pruning's counter counts the layer's MACs (it skips subclasses)


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, NORM_TYPES):
        return module.num_features
    return module.out_channels


def channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The channel dimension of a module's output: the last for linear layers and ``LayerNorm`` (which
    normalise the last dimension, channels-last), 1 for convolutions and the other normalisation layers."""
    return output.dim() - 1 if isinstance(module, nn.Linear | nn.LayerNorm) else 1


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, COMPUTE_TYPES):
        return module.in_channels
    return _out_channels(module)


class PruningSpace:
    """Prunable groups of a model and the keep-vector arithmetic over them.

    Args:
        model: the network (its structure is read, it is not modified).
        example_inputs: what the model's forward takes (a tensor or a tuple of tensors, batch first); only
            the first sample is used, for tracing and the cost model (MACs are per sample).
        round_to: kept channel counts are multiples of this (or the full width).
        min_ratio: every group keeps at least this fraction of its channels.
        min_channels: every group keeps at least this many channels.
        ignored: module names whose output channels must not be pruned (besides the classifier,
            which is always kept).
    """

    def __init__(self, model: nn.Module, example_inputs: Inputs, *, round_to: int = 1,
                 min_ratio: float = 0.05, min_channels: int = 1, ignored: Sequence[str] = ()):
        if round_to < 1:
            raise AutopruneError(f"round_to must be >= 1, got {round_to}")
        if not 0.0 <= min_ratio <= 1.0:
            raise AutopruneError(f"min_ratio must lie in [0, 1], got {min_ratio}")
        if min_channels < 1:
            raise AutopruneError(f"min_channels must be >= 1, got {min_channels}")
        self.round_to = round_to
        self.example_inputs = _detached(first_sample(as_inputs(example_inputs)))
        names = {m: n for n, m in model.named_modules()}
        unknown = [n for n in ignored if n not in {v for v in names.values()}]
        if unknown:
            raise AutopruneError(f"ignored layer(s) {unknown} are not modules of the model")
        graph = _build_graph(model, self.example_inputs, record_calls=True)
        loose = _loose_parameters(graph, model)
        order = {n: i for i, n in enumerate(names.values())}
        #: roots of channel groups the space keeps whole, and why (the classifier and ignored layers aside)
        self.kept_whole: dict[str, str] = {}
        found = sorted(_groups_from_graph(graph, names, loose, set(ignored), round_to, min_ratio, min_channels,
                                          self.kept_whole), key=lambda g: order[g.root])
        self.groups: tuple[Group, ...] = tuple(
            replace(g, index=i) for i, g in enumerate(found))
        if not self.groups and ignored and _groups_without_ignored(graph, names, loose, round_to, min_ratio,
                                                                    min_channels):
            raise AutopruneError(f"ignored_layers ({short(list(ignored))}) leave no layer to prune; keep fewer "
                                 "layers whole")
        if not self.groups:
            raise AutopruneError("the model has no prunable channels " + (
                f"(kept whole as they are: {self.describe_kept_whole()})" if self.kept_whole else
                "(no convolution or linear layer feeds another one)"))
        self._shapes = _record_shapes(model, self.example_inputs, names, loose, graph.autoprune_calls)
        self._member_index = [[(m.module, m.dim, m.ratio) for m in g.members] for g in self.groups]
        #: convolution and linear layers whose MACs Torch-Pruning's counter does not count (subclasses)
        self.uncounted = [n for n, s in self._shapes.items() if s.kind in ("conv", "linear") and not s.counted]
        # what Torch-Pruning's counter counts that the space does not model (recurrent and attention layers,
        # whose channels are kept whole): a constant, so that the unpruned model costs what the counter says
        self._fixed_macs = 0
        modelled = self.cost(np.ones(len(self.groups)))
        self.base_macs = counted_cost(model, self.example_inputs).macs
        self._fixed_macs, self.base_params = self.base_macs - modelled.macs, modelled.params

    def describe_kept_whole(self, limit: int = 3) -> str:
        """The groups kept whole and why, for messages: ``"c2.0: its channels reach mha ...; ..."``."""
        shown = "; ".join(f"{root}: {why}" for root, why in list(self.kept_whole.items())[:limit])
        return shown + ("; ..." if len(self.kept_whole) > limit else "")

    # ---- keep vectors -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.groups)

    @property
    def channels(self) -> np.ndarray:
        """Channels per group in the unpruned model."""
        return np.array([g.channels for g in self.groups], dtype=np.int64)

    @property
    def lower(self) -> np.ndarray:
        """Smallest keep ratio per group (the minimum width)."""
        return np.array([g.min_keep / g.channels for g in self.groups])

    @property
    def upper(self) -> np.ndarray:
        """Largest keep ratio per group (1.0: nothing pruned)."""
        return np.ones(len(self.groups))

    def counts(self, keep: Sequence[float] | np.ndarray) -> np.ndarray:
        """Channels kept per group for a keep vector (rounded to the group's ``step``, minimum width applied)."""
        keep = np.asarray(keep, dtype=np.float64)
        if keep.shape != (len(self.groups),):
            raise AutopruneError(f"keep vector has {keep.size} entries, the space has {len(self.groups)} groups")
        if not np.all(np.isfinite(keep)):
            raise AutopruneError("keep vector contains NaN or inf")
        out = np.empty(len(self.groups), dtype=np.int64)
        for i, (g, r) in enumerate(zip(self.groups, keep, strict=True)):
            k = int(round(float(r) * g.channels / g.step)) * g.step
            out[i] = min(g.channels, max(g.min_keep, k))
        return out

    def snap_one(self, index: int, ratios: Sequence[float] | np.ndarray) -> np.ndarray:
        """Snap candidate keep ratios of one group (a constraint set, say) to its allowed widths."""
        g = self.groups[index]
        k = np.round(np.asarray(ratios, dtype=np.float64) * g.channels / g.step) * g.step
        return np.clip(k, g.min_keep, g.channels) / g.channels

    def snap(self, keep: Sequence[float] | np.ndarray) -> np.ndarray:
        """The keep vector of the channel counts that ``keep`` means (idempotent)."""
        return self.counts(keep) / self.channels

    # ---- cost ---------------------------------------------------------------------------------

    def _removed_per_module(self, keep: Sequence[float] | np.ndarray) -> tuple[dict[str, int], dict[str, int]]:
        """Input and output channels removed from each module by ``keep``."""
        removed = self.channels - self.counts(keep)
        delta_in: dict[str, int] = {}
        delta_out: dict[str, int] = {}
        for members, r in zip(self._member_index, removed, strict=True):
            if r == 0:
                continue
            for module, dim, ratio in members:
                target = delta_in if dim == "in" else delta_out
                target[module] = target.get(module, 0) + int(r) * ratio
        # Torch-Pruning prunes a depthwise conv with one out-channel handler that removes its inputs too,
        # so the group records only its "out" side: its input channels are its output channels
        for module, removed_out in delta_out.items():
            shape = self._shapes.get(module)
            if shape is not None and shape.depthwise:
                delta_in[module] = removed_out
        return delta_in, delta_out

    def layer_channels(self, keep: Sequence[float] | np.ndarray) -> dict[str, tuple[int, int]]:
        """``(in_channels, out_channels)`` of every convolution, linear and normalisation layer under ``keep``."""
        delta_in, delta_out = self._removed_per_module(keep)
        return {name: (s.in_channels - delta_in.get(name, 0), s.out_channels - delta_out.get(name, 0))
                for name, s in self._shapes.items() if s.kind in ("conv", "linear", "norm")}

    def cost(self, keep: Sequence[float] | np.ndarray) -> Cost:
        """MACs and parameters of the network that ``keep`` describes, without building it."""
        delta_in, delta_out = self._removed_per_module(keep)
        macs = params = 0
        for name, s in self._shapes.items():
            cin = s.in_channels - delta_in.get(name, 0)
            cout = s.out_channels - delta_out.get(name, 0)
            params += s.fixed_params
            if s.kind == "conv":
                groups = cout if s.depthwise else s.groups
                weight = cout * (cin // groups) * s.kernel
                macs += (weight * s.positions + (cout * s.positions if s.bias else 0)) * s.counted
                params += weight + (cout if s.bias else 0)
            elif s.kind == "linear":
                macs += (cin * cout * s.positions + (cout if s.bias else 0)) * s.counted
                params += cin * cout + (cout if s.bias else 0)
            else:  # normalisation layers, loose parameters, element-wise calls
                params += s.per_channel * cout
                macs += s.macs_per_channel * cout
        return Cost(int(macs + self._fixed_macs), int(params))

    def relative_macs(self, keep: Sequence[float] | np.ndarray) -> float:
        """MACs of ``keep`` as a fraction of the unpruned model's (numpy only: for search strategies)."""
        return self.cost(keep).macs / self.base_macs

    # ---- channel choice ----------------------------------------------------------------------

    def removed_channels(self, keep: Sequence[float] | np.ndarray,
                         scores: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
        """Indices of the channels each group drops: its lowest-scored ones (ties broken by index); in a group of
        ``chunks`` blocks, the lowest-scored positions by their mean score over the blocks, in every block."""
        counts = self.counts(keep)
        if len(scores) != len(self.groups):
            raise AutopruneError(f"got scores for {len(scores)} groups, the space has {len(self.groups)}")
        out = []
        for g, k, s in zip(self.groups, counts, scores, strict=True):
            s = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
            if s.shape != (g.channels,):
                raise AutopruneError(f"scores for group {g.name!r} have shape {s.shape}, expected ({g.channels},)")
            s = np.nan_to_num(s, nan=-np.inf)
            size = g.channels // g.chunks
            if g.chunks > 1:
                with np.errstate(invalid="ignore"):
                    s = np.nan_to_num(s.reshape(g.chunks, size).mean(axis=0), nan=-np.inf)
            order = np.lexsort((np.arange(size), s))  # ascending score, then index
            positions = order[: (g.channels - int(k)) // g.chunks]
            out.append(np.sort((np.arange(g.chunks)[:, None] * size + positions[None, :]).ravel()))
        return out

    # ---- masking ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def masked(self, model: nn.Module, keep: Sequence[float] | np.ndarray,
               scores: Sequence[np.ndarray | torch.Tensor]) -> Iterator[nn.Module]:
        """Within the block, ``model`` (a model of this space's structure) computes as if pruned."""
        removed = self.removed_channels(keep, scores)
        masks: dict[str, torch.Tensor] = {}
        for g, idx in zip(self.groups, removed, strict=True):
            if idx.size == 0:
                continue
            for m in g.members:
                if m.dim != "out":
                    continue
                mask = masks.get(m.module)
                if mask is None:
                    mask = torch.ones(self._shapes[m.module].out_channels)
                    masks[m.module] = mask
                channels = idx if m.index is None else np.asarray(m.index)[idx]
                mask[torch.as_tensor(channels, dtype=torch.long)] = 0.0
        modules = dict(model.named_modules())
        handles = []
        try:
            for name, mask in masks.items():
                handles.append(modules[name].register_forward_hook(_mask_hook(mask)))
            yield model
        finally:
            for h in handles:
                h.remove()

    # ---- physical pruning --------------------------------------------------------------------

    def apply(self, model: nn.Module, keep: Sequence[float] | np.ndarray,
              scores: Sequence[np.ndarray | torch.Tensor]) -> nn.Module:
        """A physically pruned deep copy of ``model`` (the original is untouched)."""
        removed = self.removed_channels(keep, scores)
        pruned = copy.deepcopy(model)
        device = next((p.device for p in pruned.parameters()), torch.device("cpu"))
        graph = _build_graph(pruned, to_device(self.example_inputs, device))
        modules = dict(pruned.named_modules())
        for g, idx in zip(self.groups, removed, strict=True):
            if idx.size == 0:
                continue
            root = modules[g.root]
            fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
            group = graph.get_pruning_group(root, fn, idxs=[int(i) for i in idx])
            group.prune()
        # Torch-Pruning's surgery makes new parameters (requires_grad=True): frozen ones stay frozen
        frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
        for name, p in pruned.named_parameters():
            p.requires_grad_(name not in frozen)
        _check_runs(pruned, to_device(self.example_inputs, device))
        return pruned

    def masking_is_exact(self, model: nn.Module, keep: Sequence[float] | np.ndarray,
                         scores: Sequence[np.ndarray | torch.Tensor], *, atol: float = 1e-4) -> bool:
        """Whether masking ``keep`` gives the same outputs as physically pruning it (eval mode)."""
        was_training = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        x = random_batch(self.example_inputs, 4, device, torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                with self.masked(model, keep, scores):
                    a = forward(model, x)
                b = forward(self.apply(model, keep, scores).eval(), x)
        finally:
            model.train(was_training)
        return _all_close(a, b, atol)

    def describe(self, keep: Sequence[float] | np.ndarray) -> list[dict[str, object]]:
        """Per group: name, channels before, channels after."""
        return [{"name": g.name, "before": g.channels, "after": int(k)}
                for g, k in zip(self.groups, self.counts(keep), strict=True)]


def _mask_hook(mask: torch.Tensor):
    def hook(module: nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        shape = [1] * output.dim()
        shape[channel_dim(module, output)] = -1
        return output * mask.to(device=output.device, dtype=output.dtype).view(shape)

    return hook


def _check_runs(pruned: nn.Module, example_inputs: Inputs) -> None:
    """Raise a one-line error when a physically pruned model no longer runs on the example inputs."""
    was_training = pruned.training
    pruned.eval()
    try:
        with torch.no_grad():
            forward(pruned, example_inputs)
    except Exception as exc:
        raise AutopruneError(
            f"the pruned model fails on its example inputs ({type(exc).__name__}: {first_line(exc, '')}); its forward "
            "probably hard-codes a channel count (a view or reshape with a fixed number of channels, or a buffer "
            "with one value per channel): pass the layers that produce those channels in ignored_layers") from exc
    finally:
        pruned.train(was_training)


def _detached(inputs: Inputs) -> Inputs:
    if isinstance(inputs, tuple):
        return tuple(t.detach().clone() for t in inputs)
    return inputs.detach().clone()


def _all_close(a: object, b: object, atol: float) -> bool:
    """Whether two model outputs (tensors, or nested tuples/lists/dicts of them) agree."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, atol=atol, rtol=1e-4))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_all_close(x, y, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_all_close(a[k], b[k], atol) for k in a)
    return a == b


class TraceFailed(AutopruneError):
    """Tracing failed because the model's forward raised (its ``__cause__``): where the same model was traced
    before, the forward itself failed, and the run names where."""


def _build_graph(model: nn.Module, example_inputs: Inputs, *, record_calls: bool = False) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``; ``graph.autoprune_outputs`` holds the autograd nodes of
    the tensors the forward returned (Torch-Pruning marks only those that no other output passes through) and,
    with ``record_calls``, ``graph.autoprune_calls`` the element-wise calls Torch-Pruning's counter counts
    (:class:`_Call`)."""
    was_training = model.training
    returned: list[object] = []
    calls: list[_Call] = []
    handles = []
    buffered: dict[object, str] = {}
    if record_calls:
        for name, module in model.named_modules():
            counts = _ELEMENTWISE_COUNTS.get(type(module))
            if counts is not None:
                handles.append(module.register_forward_hook(_call_recorder(name, counts, calls)))
            if not isinstance(module, NORM_TYPES) and not any(module.children()) and _float_buffers(module):
                handles.append(module.register_forward_hook(_buffer_recorder(name, buffered)))

    def traced_forward(model: nn.Module, inputs: Inputs) -> object:
        returned.clear()
        calls.clear()
        buffered.clear()
        out = forward(model, inputs)
        returned.append(out)
        return out

    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    try:
        # Torch-Pruning traces through autograd, which needs gradients on (even for frozen copies)
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs,
                                                          forward_fn=traced_forward, verbose=False)
        graph.autoprune_outputs = {t.grad_fn for out in returned for t in tp.utils.flatten_as_list(out)
                                   if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        graph.autoprune_calls = _with_channels(graph, calls)
        graph.autoprune_buffered = dict(buffered)
        return graph
    except AutopruneError:
        raise
    except Exception as exc:
        first = first_line(exc, "")
        if returned and forward_failure(exc) is None and not _tensors_only(returned[0]):
            raise AutopruneError(returns_no_tensors(returned[0])) from exc
        error = AutopruneError if forward_failure(exc) is None else TraceFailed
        raise error(f"Torch-Pruning could not trace the model ({type(exc).__name__}: {first}); the model "
                    "must run on its example inputs") from exc
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
        model.train(was_training)


def returns_no_tensors(out: object) -> str:
    """The message for a forward whose output is not tensors."""
    return (f"the model returns a {type(out).__name__}; autoprune (and Torch-Pruning) need a tensor, or tuples, "
            "lists or dicts of tensors: wrap the model in a module whose forward returns those")


def _tensors_only(out: object) -> bool:
    """Whether ``out`` is a tensor or (nested) tuples, lists and dicts of tensors (and None)."""
    if out is None or isinstance(out, torch.Tensor):
        return True
    if isinstance(out, tuple | list):
        return all(_tensors_only(o) for o in out)
    if isinstance(out, dict):
        return all(_tensors_only(o) for o in out.values())
    return False


@dataclass(frozen=True)
class _Call:
    """One call of a module that Torch-Pruning's counter counts element-wise: ``key`` (``"name#k"``), the
    operations counted per sample, the shape of the counted tensor and its channels (along the channel
    dimension, :func:`_channel_dim`), and the autograd node of its output (which identifies the call among
    Torch-Pruning's graph nodes)."""

    key: str
    counted: int
    shape: tuple[int, ...]
    grad_fn: object
    channels: int = 1


def _elementwise_counts() -> dict[type, str]:
    """Module types Torch-Pruning's counter counts element-wise, and which tensor it counts (``"in"`` /
    ``"out"``): activations and upsampling count their output, pooling its input."""
    op_counter = tp.utils.op_counter
    which = {op_counter.relu_flops_counter_hook: "out", op_counter.upsample_flops_counter_hook: "out",
             op_counter.pool_flops_counter_hook: "in"}
    return {t: which[hook] for t, hook in op_counter.MODULES_MAPPING.items() if hook in which}


_ELEMENTWISE_COUNTS = _elementwise_counts()


def _call_recorder(name: str, counts: str, calls: list[_Call]):
    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if isinstance(output, tuple | list) and output:  # MaxPool2d(return_indices=True): (values, indices)
            output = output[0]
        tensor = output if counts == "out" else (inputs[0] if inputs else None)
        if not isinstance(tensor, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        k = sum(c.key.split("#")[0] == name for c in calls)
        calls.append(_Call(f"{name}#{k}", int(tensor.numel()), tuple(tensor.shape), output.grad_fn))
    return hook


def _float_buffers(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A module's own floating-point buffers of more than one value (a frozen BatchNorm's statistics)."""
    return [(n, b) for n, b in module.named_buffers(recurse=False)
            if b is not None and b.is_floating_point() and b.numel() > 1]


def _buffer_recorder(name: str, buffered: dict[object, str]):
    """A forward hook noting, by the autograd node of its output, a module whose buffers hold one value per
    channel of that output: Torch-Pruning cuts parameters, not buffers, so those channels must stay whole."""
    def hook(module: nn.Module, inputs: tuple[object, ...], output: object) -> None:
        if not isinstance(output, torch.Tensor) or output.grad_fn is None or output.ndim < 2:
            return
        widths = {int(output.shape[1]), int(output.shape[-1])} - {1}
        per_channel = [n for n, b in _float_buffers(module) if widths & set(b.shape)]
        if per_channel:
            buffered[output.grad_fn] = (f"{name} ({type(module).__name__}) holds buffers with one value per "
                                        f"channel ({', '.join(per_channel)}), which pruning cannot cut; make "
                                        "them parameters (e.g. nn.BatchNorm2d with frozen parameters)")
    return hook


def _counted_by_torch_pruning(module: nn.Module) -> bool:
    """Whether Torch-Pruning's counter counts the module: it looks its exact type up (a subclass of
    ``nn.Conv2d`` or ``nn.BatchNorm2d`` counts nothing)."""
    counter = tp.utils.op_counter
    return type(module) in counter.MODULES_MAPPING or type(module) in counter.CUSTOM_MODULES_MAPPING


def _with_channels(graph: tp.DependencyGraph, calls: list[_Call]) -> list[_Call]:
    """The calls with their channel counts, read along each call's channel dimension."""
    nodes = {n.grad_fn: n for n in graph.module2node.values() if n.grad_fn is not None}
    out = []
    for c in calls:
        ndim = len(c.shape)
        channels = c.shape[_channel_dim(nodes.get(c.grad_fn), ndim)] if ndim >= 2 else 1
        out.append(replace(c, channels=max(1, int(channels))))
    return out


def _channel_dim(node: object, ndim: int) -> int:
    """The channel dimension of the tensor a graph node computes: the last behind a linear layer or a
    ``LayerNorm`` (tokens, channels-last features), else 1 (``N, C, ...``). The nearest layer upstream decides
    (activations, pooling and element-wise ops pass its layout on)."""
    seen: set[int] = set()
    frontier = list(getattr(node, "inputs", ()))
    while frontier:
        current = frontier.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        module = getattr(current, "module", None)
        if isinstance(module, nn.Linear | nn.LayerNorm):
            return ndim - 1
        if isinstance(module, COMPUTE_TYPES + NORM_TYPES):
            return 1
        frontier.extend(getattr(current, "inputs", ()))
    return 1


def _groups_from_graph(graph: tp.DependencyGraph, names: dict[nn.Module, str], loose: dict[int, tuple[str, int]],
                       ignored: set[str], round_to: int, min_ratio: float, min_channels: int,
                       kept_whole: dict[str, str]) -> Iterator[Group]:
    """The prunable groups; ``kept_whole`` receives the roots of the groups kept whole and why."""
    ignored_modules = [m for m, n in names.items() if n in ignored]
    found = graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=COMPUTE_TYPES)
    tied = _tied_modules(names)
    calls = getattr(graph, "autoprune_calls", ())
    flows = {c.grad_fn: c.key for c in calls if c.grad_fn is not None}
    reused = {c.key.split("#")[0] for c in calls if not c.key.endswith("#0")}  # modules called more than once
    buffered = getattr(graph, "autoprune_buffered", {})
    seen_roots: set[str] = set()
    for tp_group in found:
        root_module = tp_group[0].dep.target.module
        root = names.get(root_module)
        channels = len(tp_group[0].idxs)
        members: list[Member] = []
        whole: list[str] = []  # why the group is kept whole, if it is
        for item in tp_group:
            module, idxs = item.dep.target.module, item.idxs
            name = names.get(module) if isinstance(module, nn.Module) else None
            if _returns_channels(graph, item):
                whole.append("the forward returns its channels")
            elif isinstance(module, _SPLITTING_OPS) and _splits_channels(graph.module2node.get(module)):
                whole.append("its channels are split or sliced apart (torch.split, chunk, x[:, a:b])")
            elif isinstance(module, UNMODELLED_TYPES):
                whole.append(f"its channels reach {name or type(module).__name__} (attention or recurrent)")
            elif name in tied:
                whole.append(f"{name} shares its weight with another layer")
            elif name in reused and isinstance(module, nn.PReLU):  # one graph node for every call
                whole.append(f"{name} is one PReLU applied to several layers")
            elif isinstance(module, nn.LayerNorm) and len(module.normalized_shape) > 1:
                whole.append(f"{name} normalises the channels and the positions together")
            elif isinstance(module, tp.ops._ElementWiseOp) and _MIXES_CHANNELS.search(str(module._grad_fn)):
                whole.append(f"an op mixes its channels with the positions ({module._grad_fn})")
            elif getattr(graph.module2node.get(module), "grad_fn", None) in buffered:
                whole.append(buffered[graph.module2node[module].grad_fn])
            if isinstance(module, tp.ops._OutputOp):
                continue
            node = graph.module2node.get(module)
            if node is not None and node.grad_fn in flows:  # an activation / pooling the channels pass through
                members.append(Member(flows[node.grad_fn], "flow", max(1, len(idxs) // channels)))
            if isinstance(module, nn.Parameter) and id(module) in loose:
                pname, dim = loose[id(module)]
                if int(module.shape[dim]) != len(idxs) or len(idxs) != channels:
                    whole.append(f"parameter {pname} is not one value per channel")
                members.append(Member(pname, "param", 1))
                continue
            if name is not None and isinstance(module, nn.PReLU) and module.num_parameters > 1:
                members.append(Member(name, "param", 1))  # one slope per channel, cut with them
                continue
            if name is None or not isinstance(module, COMPUTE_TYPES + NORM_TYPES):
                continue  # functional ops and activations carry no parameters
            if getattr(module, "transposed", False) and module.groups > 1:
                whole.append(f"{name} is a grouped transposed convolution")  # its weight is not out-channels first
            dim = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            if isinstance(module, NORM_TYPES):
                dim = "out"
            if len(idxs) % channels:
                whole.append(f"{name} reads part of its channels only")
                continue
            indices = sorted(int(i) for i in idxs)
            contiguous = indices == list(range(indices[0], indices[0] + len(indices))) if indices else False
            members.append(Member(name, dim, len(idxs) // channels, indices[0] if contiguous else -1,
                                  _channel_index(item, channels, _out_channels(module)) if dim == "out" else None))
        if root is None or root in seen_roots:
            continue
        if not any(m.dim == "in" and m.module != root for m in members):
            continue  # nothing reads these channels: model outputs (the classifier)
        if any(m.dim == "out" and m.ratio != 1 for m in members):
            whole.append("its outputs are written in pieces")
        if whole:
            kept_whole[root] = whole[0]
            continue
        chunks = _chunks(tp_group, graph, channels)
        if chunks is None:  # e.g. a GroupNorm over a concatenation
            kept_whole[root] = "its normalisation or convolution groups do not line up with its channels"
            continue
        seen_roots.add(root)
        step = math.lcm(round_to, chunks)
        floor = max(min_channels, math.ceil(min_ratio * channels))
        floor = min(channels, math.ceil(floor / step) * step)
        yield Group(-1, root, channels, floor, _dedupe(members), chunks, step)


def _groups_without_ignored(graph: tp.DependencyGraph, names: dict[nn.Module, str],
                            loose: dict[int, tuple[str, int]], round_to: int, min_ratio: float,
                            min_channels: int) -> bool:
    """Whether the model would have prunable groups if no layer were ignored."""
    return any(True for _ in _groups_from_graph(graph, names, loose, set(), round_to, min_ratio, min_channels, {}))


def _splits_channels(node: object) -> bool:
    """Whether a split / slice / unbind node cuts along the channels, not along a spatial or token dimension
    (a crop ``x[:, :, 1:-1]``, ``torch.split(x, 8, dim=2)`` or dropping a class token ``t[:, 1:]`` passes
    every channel through). Where the node does not say, it is taken to cut the channels."""
    grad_fn = getattr(node, "grad_fn", None)
    dim = getattr(grad_fn, "_saved_dim", None)
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
    if not isinstance(dim, int) or not sizes:
        return True
    ndim = len(sizes)
    return dim % ndim == _channel_dim(node, ndim)


def _tied_modules(names: dict[nn.Module, str]) -> set[str]:
    """Names of the modules holding a parameter that another module holds too (tied weights)."""
    holders: dict[int, set[str]] = {}
    for module, name in names.items():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(name)
    return {name for held in holders.values() if len(held) > 1 for name in held}


def _returns_channels(graph: tp.DependencyGraph, item: object) -> bool:
    """Whether a group member hands the group's channels to the forward's return value: an output Torch-Pruning
    marked, or a returned tensor that a norm, an element-wise op or a layer's out-channels produce (a layer's
    in-channels are consumed, not returned)."""
    dep = item.dep  # type: ignore[attr-defined]
    module = dep.target.module
    if isinstance(module, tp.ops._OutputOp):
        return True
    node = graph.module2node.get(module)
    if node is None or node.grad_fn not in getattr(graph, "autoprune_outputs", ()):
        return False
    return not isinstance(module, COMPUTE_TYPES) or graph.is_out_channel_pruning_fn(dep.handler)


def _loose_parameters(graph: tp.DependencyGraph, model: nn.Module) -> dict[int, tuple[str, int]]:
    """Torch-Pruning's unwrapped parameters (those of no module it knows, e.g. a layer-scale vector): by
    ``id``, their qualified name and the dimension it prunes."""
    named = {id(p): n for n, p in model.named_parameters()}
    return {id(u.parameters): (named[id(u.parameters)], int(u.pruning_dim))
            for u in graph.unwrapped_parameters if id(u.parameters) in named}


def _channel_index(item: object, channels: int, module_channels: int) -> tuple[int, ...] | None:
    """For an out-channel member, the module channel of each group channel (Torch-Pruning's ``root_idxs``
    pair each of the item's indices with its group channel), or ``None`` where they are the same."""
    idxs = [int(i) for i in item.idxs]  # type: ignore[attr-defined]
    roots = getattr(item, "root_idxs", None)
    order = idxs
    if roots is not None and len(roots) == len(idxs) and all(r is not None for r in roots):
        by_root = dict(zip((int(r) for r in roots), idxs, strict=True))
        if sorted(by_root) == list(range(channels)):
            order = [by_root[r] for r in range(channels)]
    return None if order == list(range(channels)) and module_channels == channels else tuple(order)


def _chunks(tp_group: tp.Group, graph: tp.DependencyGraph, channels: int) -> int | None:
    """The equal blocks a group's channels must keep (1: none), or ``None`` where a blocked layer covers other
    channels than exactly the group's (not supported: the group is kept whole)."""
    chunks = 1
    for dep, idxs in tp_group:
        module = dep.target.module
        if isinstance(module, nn.GroupNorm):
            blocks, width = module.num_groups, module.num_channels
        elif isinstance(module, CONV_TYPES) and module.groups > 1 and not (
                module.groups == module.in_channels == module.out_channels):
            blocks = module.groups
            width = module.out_channels if graph.is_out_channel_pruning_fn(dep.handler) else module.in_channels
        else:
            continue
        if width != channels or len(idxs) != channels or channels % blocks:
            return None
        chunks = math.lcm(chunks, blocks)
    return chunks if channels % chunks == 0 else None


def _dedupe(members: list[Member]) -> tuple[Member, ...]:
    out: dict[tuple[str, str], Member] = {}
    for m in members:
        out.setdefault((m.module, m.dim), m)
    return tuple(out.values())


def _shape_of_call(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> _LayerShape:
    """What one call of a convolution, linear, normalisation or PReLU layer costs, per sample."""
    if isinstance(module, COMPUTE_TYPES):
        linear = isinstance(module, nn.Linear)
        positions = int(np.prod(output.shape[1:-1])) if linear else int(np.prod(output.shape[2:]))
        return _LayerShape(
            kind="linear" if linear else "conv",
            in_channels=_in_channels(module), out_channels=_out_channels(module),
            kernel=1 if linear else int(np.prod(module.kernel_size)),
            groups=1 if linear else module.groups, positions=max(1, positions),
            bias=module.bias is not None,
            depthwise=not linear and module.groups > 1 and module.groups == module.in_channels
            == module.out_channels,
            fixed_params=0, counted=_counted_by_torch_pruning(module))
    if isinstance(module, nn.PReLU):
        return _LayerShape("param", 0, module.num_parameters, 1, 1, 1, False, False, 0, per_channel=1)
    channels = _out_channels(module)
    own = sum(p.numel() for p in module.parameters(recurse=False))
    affine = getattr(module, "affine", getattr(module, "elementwise_affine", False))
    # Torch-Pruning's counter: the input's elements, twice if affine (and a subclass not at all)
    counted = inputs[0].numel() * (2 if affine else 1) if _counted_by_torch_pruning(module) else 0
    return _LayerShape("norm", channels, channels, 1, 1, 1, False, False, 0,
                       per_channel=own // channels if channels else 0,
                       macs_per_channel=counted // channels if channels else 0)


def _record_shapes(model: nn.Module, example_inputs: Inputs, names: dict[nn.Module, str],
                   loose: dict[int, tuple[str, int]], calls: Sequence[_Call] = ()) -> dict[str, _LayerShape]:
    shapes: dict[str, _LayerShape] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        name = names[module]
        shape = _shape_of_call(module, inputs, output)
        if name in shapes:  # a module called again (a head shared across scales): the counter adds every call
            shape = replace(shape, positions=shapes[name].positions + shape.positions,
                            macs_per_channel=shapes[name].macs_per_channel + shape.macs_per_channel)
        shapes[name] = shape

    handles = []
    for module in names:
        if isinstance(module, COMPUTE_TYPES + NORM_TYPES) or (isinstance(module, nn.PReLU)
                                                               and module.num_parameters > 1):
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward(model, to_device(example_inputs, next((p.device for p in model.parameters()), torch.device("cpu"))))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    covered = {id(p) for n in shapes for p in dict(model.named_modules())[n].parameters(recurse=False)}
    for param in model.parameters():
        if id(param) in loose and id(param) not in covered:
            name, dim = loose[id(param)]
            channels = int(param.shape[dim])
            shapes[name] = _LayerShape("param", 0, channels, 1, 1, 1, False, False, 0,
                                       per_channel=param.numel() // channels)
            covered.add(id(param))
    for call in calls:
        shapes[call.key] = _LayerShape("flow", 0, call.channels, 1, 1, 1, False, False, 0,
                                       macs_per_channel=call.counted // call.channels)
    fixed = sum(p.numel() for p in model.parameters() if id(p) not in covered)
    shapes["<other parameters>"] = _LayerShape("other", 0, 0, 1, 1, 1, False, False, int(fixed))
    return shapes


def counted_cost(model: nn.Module, example_inputs: Inputs) -> Cost:
    """MACs (Torch-Pruning's counter's total, per sample) and parameters counted by Torch-Pruning on a real module."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = to_device(first_sample(as_inputs(example_inputs)), device)
    x = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        macs, params = tp.utils.count_ops_and_params(model, x)
    finally:
        model.train(was_training)
    return Cost(int(macs), int(params))
