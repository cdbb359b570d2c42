"""The criterion interface and its registry.

A criterion gives every channel of every prunable group of a :class:`~autoprune.engine.space.PruningSpace` a
score; higher means more important, and the lowest-scored channels of a group are the ones pruned.
Criteria are registered by name with :func:`register_criterion` and built with
:func:`create_criterion` (timm-style: a name or an object; errors list the valid names and options).

The contract every criterion keeps (the test suite checks it for each registered one):

* one 1-D float tensor per group, in group order, of length ``group.channels``, finite, on the CPU;
* the model's parameters and buffers are not modified, the train/eval flag of every module and the
  ``requires_grad`` flag of every parameter are restored, no hook is left behind and no ``.grad`` is
  created or changed (gradients are taken with :func:`torch.autograd.grad`, never ``backward()``);
* a criterion with ``needs_data`` raises an :class:`~autoprune.errors.AutopruneError` when called
  without calibration batches.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from autoprune.checks import check_choice, check_int
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.registry import Registry

__all__ = ["CRITERIA", "Batches", "Criterion", "DataCriterion", "check_choice", "check_int", "create_criterion",
           "criterion_names", "register_criterion"]

Batches = Iterable[tuple[Tensor, Tensor]]


class Criterion(ABC):
    """A per-channel importance score for every prunable group of a model.

    Subclasses take their options as keyword-only arguments with documented defaults, validate them
    (bad values raise :class:`AutopruneError`) and store each under its own name, so that
    :attr:`options` can report them.

    Attributes:
        name: The registry name (set by :func:`register_criterion`).
        needs_data: Whether :meth:`scores` needs calibration batches.
    """

    name: ClassVar[str] = ""
    needs_data: ClassVar[bool] = False

    def __init__(self) -> None:  # noqa: B027  (a criterion without options)
        pass

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The criterion's options and their default values."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def options(self) -> dict[str, Any]:
        """The options this criterion was built with (for reports and saved configs)."""
        return {key: getattr(self, key) for key in self.defaults()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"

    @abstractmethod
    def scores(self, model: nn.Module, space: PruningSpace, batches: Batches | None = None, *,
               device: str | torch.device = "cpu") -> list[Tensor]:
        """Score every channel of every group of ``space`` on ``model``.

        Args:
            model: the network ``space`` was built from (it is left as it was found).
            space: its pruning space.
            batches: calibration data, ``(images float in [0, 1] (B, C, H, W), labels int64 (B,))``
                pairs; only read by criteria that need data.
            device: where to compute; a model elsewhere is scored on a copy moved there.

        Returns:
            One 1-D float tensor per group (in ``space.groups`` order) of ``group.channels`` finite
            scores, on the CPU; higher is more important.

        Raises:
            AutopruneError: if the criterion needs data and ``batches`` is None, if the model does not
                match the space, or if the criterion does not apply to the model.
        """

    def _require_data(self, batches: Batches | None) -> Batches:
        if self.needs_data and batches is None:
            raise AutopruneError(f"criterion {self.name} needs calibration data: pass batches of "
                                 "(images, labels)")
        return batches  # type: ignore[return-value]


class DataCriterion(Criterion):
    """A criterion computed from the loss on calibration batches.

    Args:
        max_batches: at most this many batches are read from the calibration data (bounds the cost).
    """

    needs_data: ClassVar[bool] = True

    def __init__(self, *, max_batches: int = 16) -> None:
        self.max_batches = check_int("max_batches", max_batches, minimum=1)


#: Every criterion by name.
CRITERIA: Registry[type[Criterion]] = Registry("criterion")


def register_criterion(name: str) -> Callable[[type[Criterion]], type[Criterion]]:
    """Class decorator: register a :class:`Criterion` subclass under ``name``."""
    return CRITERIA.register(name)


def criterion_names() -> list[str]:
    """Names of the registered criteria, sorted."""
    return CRITERIA.names()


def create_criterion(name: str | Criterion, **options: Any) -> Criterion:
    """Build a criterion by registered name (an already built one passes through).

    Raises:
        AutopruneError: for an unknown name, an option the criterion does not take, or a bad value.
    """
    return CRITERIA.create(name, **options)
