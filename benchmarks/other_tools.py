"""Other tools' hand-free recipes on the same base model: Torch-Pruning's progressive global pruning and
NVIDIA ModelOpt's FastNAS width search.

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

``mo-fastnas`` is another toolkit's automatic width search: ModelOpt's ``mtp.prune(mode="fastnas")`` (its
recommended mode for vision models) with ``constraints={"flops": f"{1 - reduction:.0%}"}``, the same validation
sample our searches score on as ``score_func``, and 50 batches of 16 training images for its BatchNorm
calibration (FastNAS re-estimates BatchNorm from a queue of 50 batches and skips it with fewer; our searches
use 512 images). FastNAS measures every layer's sensitivity at each width choice, then searches the
per-layer widths that meet the constraint. Its default width step is a multiple of 32 channels, which leaves
ResNet-20's 16-channel stage and LeNet-5 unprunable; we set ``channel_divisor`` / ``feature_divisor`` to 1, the
granularity of our own space. ModelOpt is not a dependency of autoprune: install it beside the benchmark
(``pip install nvidia-modelopt torchprofile==0.0.4``; ModelOpt 0.47 needs torchprofile's 0.0.x API).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

TP_RECIPES = ("tp-l1", "tp-group-norm", "tp-lamp", "tp-taylor")
RECIPES = (*TP_RECIPES, "mo-fastnas")
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
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(TP_RECIPES)}")


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


def fastnas_prune(model: nn.Module, example_inputs: torch.Tensor, macs_reduction: float, *,
                  score_func: Any, calibration: list[torch.Tensor],
                  checkpoint: str) -> tuple[nn.Module, dict[str, Any]]:
    """ModelOpt FastNAS on a copy of ``model``: the subnet with at most ``1 - macs_reduction`` of its FLOPs."""
    try:
        import modelopt
        import modelopt.torch.prune as mtp
    except ImportError as exc:
        raise SystemExit(f"mo-fastnas needs NVIDIA ModelOpt ({exc}); pip install nvidia-modelopt "
                         "torchprofile==0.0.4") from exc
    pruned = copy.deepcopy(model).eval()
    base_macs, _ = tp.utils.count_ops_and_params(pruned, example_inputs)
    config = mtp.fastnas.FastNASConfig()
    for kind, key in (("nn.Conv2d", "channel_divisor"), ("nn.BatchNorm2d", "feature_divisor"),
                      ("nn.Linear", "feature_divisor"), ("nn.BatchNorm1d", "feature_divisor")):
        config[kind]["*"][key] = 1
    limit = f"{100 * (1 - macs_reduction):g}%"
    pruned, _ = mtp.prune(pruned, mode=[("fastnas", config)], constraints={"flops": limit},
                          dummy_input=example_inputs,
                          config={"data_loader": calibration, "collect_func": lambda batch: batch,
                                  "score_func": score_func, "checkpoint": checkpoint, "verbose": False})
    macs, _ = tp.utils.count_ops_and_params(pruned, example_inputs)
    return pruned, {"recipe": "mo-fastnas", "tool": f"nvidia-modelopt {modelopt.__version__}", "flops_limit": limit,
                    "divisor": 1, "macs_reduction": 1 - macs / base_macs}


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
