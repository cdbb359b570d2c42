"""From a model file and a registered dataset to the API's inputs: what ``prune``, ``compare`` and ``eval`` share.

The model file is read safely (:mod:`autoprune.io.modelfile`): only the caller's ``--model`` may name code
to run. The dataset must be the one the model was trained for (its recorded identity); the splits become
loaders: training batches shuffled and augmented per epoch, validation and test batches in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.data import BatchLoader, DatasetInfo, Splits, load_dataset
from autoprune.engine.prune import Data
from autoprune.errors import AutopruneError
from autoprune.io.modelfile import ModelFile, load_with_spec
from autoprune.runs.training import dataset_identity

log = logging.getLogger(__name__)

EVAL_BATCH = 500


@dataclass
class RunInputs:
    """A model loaded from its file and the data it is pruned or measured on."""

    model: nn.Module
    file: ModelFile
    splits: Splits
    data: Data
    example_inputs: torch.Tensor
    info: dict[str, Any]
    invocation: dict[str, Any]


def check_dataset(file: ModelFile, info: DatasetInfo, *, allow_other: bool = False) -> None:
    """Refuse data other than what the model was trained on (classes, input shape), unless allowed."""
    recorded = file.spec.get("dataset")
    where = str(file.path)
    if not recorded:
        return
    shape = [info.in_channels, *info.image_size]
    if recorded.get("input_shape") not in (None, shape):
        raise AutopruneError(f"model {where!r} takes inputs {tuple(recorded['input_shape'])} but dataset "
                             f"{info.name!r} has {tuple(shape)}; use the dataset the model was trained on")
    if recorded.get("num_classes") not in (None, info.num_classes):
        raise AutopruneError(f"model {where!r} predicts {recorded['num_classes']} classes but dataset {info.name!r} "
                             f"has {info.num_classes}; use the dataset the model was trained on")
    if recorded.get("name") == info.name:
        return
    same_classes = list(recorded.get("classes") or []) == list(info.classes)
    message = (f"model {where!r} was trained on {recorded.get('name')!r}, not {info.name!r}"
               + ("" if same_classes else " (other classes)"))
    if same_classes or allow_other:
        log.warning("%s; measuring anyway", message)
        return
    raise AutopruneError(f"{message}; pass --dataset {recorded.get('name')} (or --allow-other-dataset to measure it "
                         "on this data anyway)")


def loaders(splits: Splits, *, batch_size: int, seed: int, device: torch.device) -> Data:
    """Training batches (shuffled and augmented per epoch), validation and test batches (in order)."""
    train = BatchLoader(splits.train, batch_size, shuffle=True, augment=splits.info.augment, seed=seed,
                        device=device, drop_last=len(splits.train) > batch_size)
    return Data(train=train, val=BatchLoader(splits.val, EVAL_BATCH, device=device) if len(splits.val) else None,
                test=BatchLoader(splits.test, EVAL_BATCH, device=device))


def load_inputs(model_path: str, *, dataset: str, data_dir: str | None, val_fraction: float, limit: int | None,
                seed: int, batch_size: int, device: torch.device, factory: str | None = None,
                allow_other_dataset: bool = False) -> RunInputs:
    """The model file (trusting only ``factory``) and the dataset, checked against each other, as loaders."""
    model, file = load_with_spec(model_path, factory=factory)
    splits = load_dataset(dataset, data_dir, val_fraction=val_fraction, seed=seed, limit=limit)
    check_dataset(file, splits.info, allow_other=allow_other_dataset)
    info = splits.info
    invocation = {"model": str(Path(model_path).resolve()), "model_factory": factory, "dataset": dataset,
                  "data_dir": str(Path(data_dir).resolve()) if data_dir else None, "val_fraction": val_fraction,
                  "limit": limit}
    return RunInputs(model=model, file=file, splits=splits,
                     data=loaders(splits, batch_size=batch_size, seed=seed, device=device),
                     example_inputs=torch.rand(1, info.in_channels, *info.image_size),
                     info={"architecture": file.architecture, "dataset": dataset_identity(info)},
                     invocation=invocation)
