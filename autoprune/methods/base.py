"""Methods: named recipes of (criterion, strategy, extra training) under one interface.

A method turns the trained model into a :class:`Plan`: the model to prune (the trained one, or one that
the method trained further, e.g. with a sparsity regulariser), the channel scores deciding which channels
a keep ratio removes, and the search strategy with its options. The engine does the rest identically for
every method (search, physical pruning, fine-tuning, measurement), so it never checks which method it runs.

A method's options are the keyword-only arguments of its constructor, with their defaults:
``autoprune.methods.PSO(particles=20)`` in Python, ``--method-option particles=20`` on the command line,
``method_options: {particles: 20}`` in a YAML file; all three go through :data:`METHODS`'s one check.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from autoprune.criteria import create_criterion
from autoprune.engine.batches import Batch, Inputs, iterate
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import TrainConfig
from autoprune.errors import AutopruneError
from autoprune.registry import Registry, coerce_options, option_defaults

log = logging.getLogger(__name__)

#: Pass key of the criterion's seeded iteration over the training loader.
CRITERION_KEY = 2_000_003


@dataclass(frozen=True)
class MethodContext:
    """What a method may use to make its plan.

    Attributes:
        model: the trained network (on ``device``); a method must not modify it.
        space: its pruning space.
        example_inputs: what the model's forward takes.
        train_loader: training batches ``(inputs, targets)`` (None when the caller gave none).
        device: where to compute.
        seed: the run's seed.
        train: settings for any extra training a method does (learning rate, seed...).
        progress: show progress bars.
    """

    model: nn.Module
    space: PruningSpace
    example_inputs: Inputs
    train_loader: Iterable[Any] | None
    device: torch.device
    seed: int
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, lr=0.01))
    progress: bool = True

    def loader(self, method: str, purpose: str) -> Iterable[Any]:
        """The training loader, or a clear error naming the method and why it needs data."""
        if self.train_loader is None:
            raise AutopruneError(f"method {method!r} needs training data for {purpose}; pass train_loader=")
        return self.train_loader

    def batches(self, method: str, purpose: str) -> Iterator[Batch]:
        """One seeded pass over the training loader, on the context's device."""
        return iterate(self.loader(method, purpose), seed=self.seed, key=CRITERION_KEY, device=self.device,
                       what="the training loader")

    def training(self, epochs: int, **changes: Any) -> TrainConfig:
        """The settings for ``epochs`` epochs of a method's own extra training (plain cross-entropy)."""
        return replace(self.train, epochs=epochs, distill=0.0, **changes)


@dataclass(frozen=True)
class Plan:
    """A method's decisions, ready for the search.

    Attributes:
        model: the network to prune (the trained one or a further-trained copy).
        scores: per group, one score per channel; the lowest-scored channels are removed first.
        strategy: search strategy name.
        strategy_options: its options.
        choices: optional allowed keep ratios per group (a constraint set, candidate thresholds).
        penalty: optional term subtracted from every candidate's score (SA's contrast loss).
        notes: facts about the plan worth reporting (JSON-compatible).
        extra_training_epochs: epochs of training the pruned network got from the method before pruning
            (reported; equal to :attr:`Method.extra_training_epochs`, which the engine subtracts from the
            fine-tuning epochs so every method trains as long). Training of networks that are not the
            one pruned (``sa``'s probes) is not counted here.
    """

    model: nn.Module
    scores: list[torch.Tensor]
    strategy: str
    strategy_options: dict[str, Any] = field(default_factory=dict)
    choices: tuple[np.ndarray, ...] | None = None
    penalty: Callable[[np.ndarray], float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    extra_training_epochs: int = 0


class Method(ABC):
    """A pruning method. Subclasses set the class attributes, take options as keyword-only constructor
    arguments (validated there) and implement :meth:`plan`.

    Attributes:
        name: registry name (``method=`` / ``--method``).
        summary: one line for ``autoprune methods``.
        source: the paper or baseline it follows.
        default_budget: candidate evaluations when no budget is given (the paper's where it gives one).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    default_budget: ClassVar[int] = 200
    #: Whether :meth:`plan` trains (with :meth:`MethodContext.training`, which inherits the fine-tuning's
    #: learning rate, batch size and optimiser settings): then those settings decide what the search evaluates.
    trains_in_plan: ClassVar[bool] = False

    @abstractmethod
    def plan(self, ctx: MethodContext) -> Plan:
        """Decide scores and search for ``ctx``."""

    @property
    def extra_training_epochs(self) -> int:
        """Epochs of training this method gives the network it prunes before pruning (``slim``'s sparsity
        training); the engine subtracts them from the fine-tuning epochs, so every method trains as long.
        Known before :meth:`plan` runs (under torchrun every rank needs it, only rank 0 plans)."""
        return 0

    @property
    def options(self) -> dict[str, Any]:
        """The options this method was built with (for reports and saved configurations)."""
        return {key: getattr(self, key) for key in option_defaults(type(self))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.options.items())})"


#: Every method by name.
METHODS: Registry[type[Method]] = Registry("method")
register_method = METHODS.register


def method_names() -> list[str]:
    """Names of the registered methods."""
    return METHODS.names()


def create_method(spec: str | Method, options: dict[str, Any] | None = None, *, from_text: bool = False) -> Method:
    """A method from its name (with options) or an already built :class:`Method` (passed through).

    Args:
        spec: a registered name, or a Method instance.
        options: the method's keyword options.
        from_text: the option values are text or YAML values to convert to the declared types (CLI).

    Raises:
        AutopruneError: an unknown name, an option the method does not take, or a bad value.
    """
    options = dict(options or {})
    if isinstance(spec, Method):
        if options:
            raise AutopruneError(f"method options {sorted(options)} cannot be applied to the built {spec!r}; "
                                 "give them to its constructor")
        return spec
    if from_text:
        options = coerce_options(METHODS.get(spec), options, f"method {spec!r}")
    return METHODS.create(spec, **options)


def criterion_scores(ctx: MethodContext, name: str, model: nn.Module | None = None, *, method: str,
                     **options: Any) -> list[torch.Tensor]:
    """Scores of criterion ``name`` on ``model`` (default: the context's), reading training batches if needed."""
    criterion = create_criterion(name, **options)
    batches = ctx.batches(method, f"its {name} criterion") if criterion.needs_data else None
    return criterion.scores(model if model is not None else ctx.model, ctx.space, batches, device=ctx.device)


#: In :func:`residual_start`, how much a residual stream is pruned relative to the other layers.
STREAM_SHARE = 0.25


def residual_streams(model: nn.Module, space: PruningSpace) -> list[int]:
    """The groups whose channels more than one convolution or linear layer writes: channels added together (a
    ResNet's residual streams)."""
    modules = dict(model.named_modules())
    compute = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [g.index for g in space.groups
            if sum(m.dim == "out" and isinstance(modules.get(m.module), compute) for m in g.members) > 1]


def residual_start(model: nn.Module, space: PruningSpace) -> list[list[float]]:
    """A hand-set starting structure for ResNet-like spaces: every residual stream pruned ``STREAM_SHARE`` as
    much as the other layers (a keep vector whose pruned fractions have that pattern; a search scales it
    onto the budget). ``[]`` for a space without residual streams.

    Measured on ResNet-20 / CIFAR-10 at 60% of the MACs removed (``benchmarks/structure_probe.py``): the
    structures that keep the streams wider score far above the uniform one after BatchNorm re-estimation,
    and fine-tune better (see the benchmark's results).
    """
    streams = set(residual_streams(model, space))
    if not streams:
        return []
    return [[1.0 - STREAM_SHARE if i in streams else 0.0 for i in range(len(space))]]


def normalized(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each group's scores divided by their mean (Torch-Pruning's 'mean' normaliser), for global ranking."""
    return [s / s.mean().clamp_min(1e-12) for s in scores]


class ShardLoader:
    """Every ``shards``-th batch of a loader, starting at ``index``: a disjoint part of the training data.

    Iterating it iterates the wrapped loader (so its shuffling and ``set_epoch`` apply) and keeps the batches
    whose position in the pass is ``index`` modulo ``shards``.
    """

    def __init__(self, loader: Iterable[Any], index: int, shards: int) -> None:
        self.loader, self.index, self.shards = loader, index, shards

    def set_epoch(self, epoch: int) -> None:
        """Forward ``set_epoch`` to the wrapped loader (see :func:`autoprune.engine.batches.set_epoch`)."""
        from autoprune.engine.batches import set_epoch

        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        total = len(self.loader)  # type: ignore[arg-type]
        return len(range(self.index, total, self.shards))

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i % self.shards == self.index:
                yield batch
