"""Other tools' hand-free recipes on the same base model: Torch-Pruning's progressive global pruning.

Torch-Pruning (the library users know, and our own pruning back end) has no width search; its benchmark
script (``benchmarks/main.py``, ``prune_to_target_macs``) reaches a MACs target without hand-set ratios by
building a pruner with ``pruning_ratio=1.0`` over many small ``iterative_steps`` (400) and calling
``pruner.step()`` until ``base MACs / pruned MACs`` reaches the speed-up, the output classifier ignored.
With ``global_pruning=True`` one importance ranking across all layers decides each layer's width: that is
its automatic width choice, and the recipe we compare against. The recipes here:

- ``tp-l1``: ``MagnitudeImportance(p=1)``, global (the script's ``--method l1 --global-pruning``);
- ``tp-group-norm``: ``GroupMagnitudeImportance(p=2)``, global (``--method group_norm``, DepGraph's group L2);
- ``tp-lamp``: ``LAMPImportance(p=2)``, global (layer-adaptive magnitude scores, made for global ranking);
- ``tp-taylor``: ``GroupTaylorImportance()``, global, with gradients of the cross-entropy on
  ``taylor_batches`` training batches recomputed before every step (the importance of the current network).

``tp_prune`` changes a copy of the model and stops at the first step that reaches the target, as measured by
Torch-Pruning's own counter (the counter our targets use).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

RECIPES = ("tp-l1", "tp-group-norm", "tp-lamp", "tp-taylor")
ITERATIVE_STEPS = 400


def _importance(recipe: str) -> Any:
    if recipe == "tp-l1":
        return tp.importance.MagnitudeImportance(p=1)
    if recipe == "tp-group-norm":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if recipe == "tp-lamp":
        return tp.importance.LAMPImportance(p=2)
    if recipe == "tp-taylor":
        return tp.importance.GroupTaylorImportance()
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


def _output_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def _taylor_gradients(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    model.zero_grad()
    for inputs, targets in batches:
        F.cross_entropy(model(inputs), targets).backward()


def tp_prune(model: nn.Module, example_inputs: torch.Tensor, recipe: str, macs_reduction: float, *,
             num_classes: int, train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
             taylor_batches: int = 2) -> tuple[nn.Module, dict[str, Any]]:
    """A pruned copy of ``model`` with at least ``macs_reduction`` of its MACs removed, and what it took."""
    pruned = copy.deepcopy(model).eval()
    base_macs, _ = tp.utils.count_ops_and_params(pruned, example_inputs)
    pruner = tp.pruner.MetaPruner(pruned, example_inputs, importance=_importance(recipe), global_pruning=True,
                                  pruning_ratio=1.0, iterative_steps=ITERATIVE_STEPS,
                                  ignored_layers=_output_layers(pruned, num_classes))
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    if recipe == "tp-taylor":
        for batch in train_batches:
            batches.append((batch[0], batch[1]))
            if len(batches) == taylor_batches:
                break
    macs, steps = base_macs, 0
    while 1 - macs / base_macs < macs_reduction and steps < ITERATIVE_STEPS:
        if batches:
            _taylor_gradients(pruned, batches)
        pruner.step()
        steps += 1
        macs, _ = tp.utils.count_ops_and_params(pruned, example_inputs)
    pruned.zero_grad(set_to_none=True)
    return pruned, {"recipe": recipe, "steps": steps, "iterative_steps": ITERATIVE_STEPS,
                    "macs_reduction": 1 - macs / base_macs, "global_pruning": True}


def widths(base: nn.Module, pruned: nn.Module) -> list[list[Any]]:
    """``[name, channels before, channels after]`` of every convolution and linear layer whose width changed."""
    before = dict(base.named_modules())
    rows = []
    for name, module in pruned.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name in before:
            out = "out_channels" if isinstance(module, nn.Conv2d) else "out_features"
            a, b = getattr(before[name], out), getattr(module, out)
            if a != b:
                rows.append([name, a, b])
    return rows
