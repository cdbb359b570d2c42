"""Methods: named recipes of (criterion, strategy, extra training) under one interface.

A method turns the trained model into a :class:`Plan`: the model to prune (the trained one, or one
that the method trained further, e.g. with a sparsity regulariser), the channel scores deciding
which channels a keep ratio removes, and the search strategy with its options. The pipeline does the
rest identically for every method (search, physical pruning, fine-tuning, measurement), so it never
checks which method it runs.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import nn

from autoprune.criteria import create_criterion
from autoprune.data import DatasetInfo, Splits
from autoprune.engine.evaluate import batches_for_criterion
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import TrainConfig
from autoprune.errors import AutopruneError, unknown_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MethodContext:
    """What a method may use to make its plan.

    Attributes:
        model: the trained network (on ``device``); a method must not modify it.
        space: its pruning space.
        splits: the data (train without validation, validation, test: never touched here).
        device: where to compute.
        seed: the run's seed.
        train: settings for any extra training a method does (learning rate, batch size, seed).
        extra_epochs: epochs of a method's own extra training (slimming's sparsity training, SA's shard
            training).
        options: method-specific options (``--method-option key=value``).
        progress: show progress bars.
    """

    model: nn.Module
    space: PruningSpace
    splits: Splits
    device: torch.device
    seed: int
    train: TrainConfig
    extra_epochs: int = 1
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    @property
    def info(self) -> DatasetInfo:
        """The dataset's description."""
        return self.splits.info


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
    """

    model: nn.Module
    scores: list[torch.Tensor]
    strategy: str
    strategy_options: dict[str, Any] = field(default_factory=dict)
    choices: tuple[np.ndarray, ...] | None = None
    penalty: Callable[[np.ndarray], float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A pruning method. Subclasses set the class attributes and implement :meth:`plan`.

    Attributes:
        name: registry name (``--method``).
        summary: one line for ``autoprune methods``.
        source: the paper or baseline it follows.
        default_budget: candidate evaluations when ``--budget`` is not given (the paper's where it gives one).
        option_types: the ``--method-option`` keys the method reads, with their types.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    default_budget: ClassVar[int] = 200
    option_types: ClassVar[dict[str, type]] = {}

    @abstractmethod
    def plan(self, ctx: MethodContext) -> Plan:
        """Decide scores and search for ``ctx``."""

    def check_options(self, options: dict[str, Any]) -> None:
        """Raise unless every option is one this method reads and its value converts to the option's type."""
        for key, value in options.items():
            if key not in self.option_types:
                valid = ", ".join(sorted(self.option_types)) or "none"
                raise AutopruneError(f"unknown --method-option {key!r} for method {self.name!r}; valid options: "
                                     f"{valid}")
            kind = self.option_types[key]
            try:
                kind(value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise AutopruneError(f"method option {key}={value!r} for {self.name!r} is not a valid "
                                     f"{kind.__name__}") from exc

    def option(self, ctx: MethodContext, key: str, default: Any, kind: type = float) -> Any:
        """A method option from ``ctx.options`` converted to ``kind``, or ``default``."""
        if key not in ctx.options:
            return default
        try:
            return kind(ctx.options[key])
        except (TypeError, ValueError) as exc:
            raise AutopruneError(f"method option {key}={ctx.options[key]!r} for {self.name!r} is not a valid "
                                 f"{kind.__name__}") from exc


METHODS: dict[str, type[Method]] = {}
_M = TypeVar("_M", bound=type[Method])


def register_method(cls: _M) -> _M:
    """Register a :class:`Method` subclass under its ``name`` (class decorator)."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Names of the registered methods."""
    return sorted(METHODS)


def create_method(name: str) -> Method:
    """Instantiate a registered method by name."""
    if name not in METHODS:
        raise unknown_name("method", name, method_names())
    return METHODS[name]()


def criterion_scores(ctx: MethodContext, name: str, model: nn.Module | None = None,
                     **options: Any) -> list[torch.Tensor]:
    """Scores of criterion ``name`` on ``model`` (default: the context's), with training batches if needed."""
    criterion = create_criterion(name, **options)
    batches = None
    if criterion.needs_data:
        batches = batches_for_criterion(ctx.splits.train, batch_size=min(128, ctx.train.batch_size),
                                        seed=ctx.seed, device=ctx.device)
    return criterion.scores(model if model is not None else ctx.model, ctx.space, batches, device=ctx.device)


def normalized(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each group's scores divided by their mean (Torch-Pruning's 'mean' normaliser), for global ranking."""
    return [s / s.mean().clamp_min(1e-12) for s in scores]
