"""Training a base model from scratch on a registered dataset: the ``autoprune train`` job.

The model file it writes names the architecture (a registered one, or the ``package.module:factory`` the
caller trusted), the input normalisation, and the dataset's identity, so that ``eval`` and ``prune`` can
refuse data the model was not trained for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from autoprune.data import BatchLoader, DatasetInfo, Splits
from autoprune.engine.distributed import world
from autoprune.engine.prune import check_forward
from autoprune.engine.train import TrainConfig, evaluate, fit
from autoprune.errors import AutopruneError, first_line
from autoprune.io.modelfile import save_model
from autoprune.models import MODELS, NormalizedModel, create_model
from autoprune.runs.lock import lock_output


def dataset_identity(info: DatasetInfo) -> dict[str, Any]:
    """What a model file records of the data it was trained on."""
    return {"name": info.name, "num_classes": info.num_classes, "classes": list(info.classes),
            "input_shape": [info.in_channels, *info.image_size]}


def architecture_of(name: str, args: dict[str, Any]) -> dict[str, Any]:
    """The file's architecture entry for a registered name or a trusted ``module:factory`` path."""
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    if name in MODELS:
        return {"kind": "registry", "name": name, "args": plain}
    return {"kind": "factory", "path": name, "args": plain}


def build_model(name: str, info: DatasetInfo, **kwargs: Any) -> tuple[NormalizedModel, dict[str, Any]]:
    """A fresh model for the dataset, with normalisation inside, and its architecture entry."""
    args: dict[str, Any] = {"num_classes": info.num_classes, "in_channels": info.in_channels,
                            "image_size": tuple(info.image_size), **kwargs}
    model = NormalizedModel(create_model(name, **args), info.mean, info.std)
    try:  # one image through the fresh model: an architecture that cannot take the data fails here, not mid-training
        logits = check_forward(model.eval(), torch.rand(1, info.in_channels, *info.image_size))
    except AutopruneError as exc:
        cause = exc.__cause__ or exc
        first = first_line(cause, "")
        raise AutopruneError(f"model {name!r} cannot take {info.in_channels}x{info.image_size[0]}x"
                             f"{info.image_size[1]} images of dataset {info.name!r} ({type(cause).__name__}: "
                             f"{first}); choose a model for this image size") from exc
    model.train()
    shape = tuple(getattr(logits, "shape", ()))
    if shape != (1, info.num_classes):
        raise AutopruneError(f"model {name!r} outputs shape {shape} for one image, but dataset {info.name!r} has "
                             f"{info.num_classes} classes; its factory must honour num_classes")
    return model, architecture_of(name, args)


def check_trainable(splits: Splits) -> None:
    """Refuse data nothing can be learnt from: no training samples, or a single class."""
    labels = splits.train.labels
    if len(labels) == 0:
        raise AutopruneError(f"dataset {splits.info.name!r} has no training samples; check the data files")
    if int(labels.unique().numel()) < 2:
        raise AutopruneError(f"every training label of dataset {splits.info.name!r} is {int(labels[0])}: a single "
                             "class cannot be learnt; check the label file")


def train_base(model_name: str, splits: Splits, config: TrainConfig, out: Path, *, device: torch.device,
               progress: bool = True, model_kwargs: dict[str, Any] | None = None,
               stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train a model from scratch and save it to ``out``; returns a summary.

    ``out`` is locked while training runs; every epoch is checkpointed to ``out`` + ``.ckpt`` and a run
    started again with the same settings resumes from it.
    """
    check_trainable(splits)
    here = world()
    with lock_output(out, kind="file") if here.main else contextlib.nullcontext():
        torch.manual_seed(config.seed)  # the initial weights follow the seed, not what ran before in the process
        model, architecture = build_model(model_name, splits.info, **(model_kwargs or {}))
        model.to(device)
        loader = BatchLoader(splits.train, config.batch_size, shuffle=True, augment=splits.info.augment,
                             seed=config.seed, device=device, drop_last=len(splits.train) > config.batch_size)
        checkpoint = out.with_name(out.name + ".ckpt")
        started = time.perf_counter()
        fit(model, loader, config, checkpoint=checkpoint, progress=progress, stop_requested=stop_requested)
        seconds = time.perf_counter() - started
        val = evaluate(model, BatchLoader(splits.val, 500, device=device)) if len(splits.val) else None
        test = evaluate(model, BatchLoader(splits.test, 500, device=device))
        if here.main:  # under torchrun every rank trains its slice; rank 0 writes
            save_model(out, model.cpu(), architecture=architecture, dataset=dataset_identity(splits.info),
                       info={"trained": {"epochs": config.epochs, "lr": config.lr, "seed": config.seed,
                                         "test_accuracy": test.accuracy}})
            checkpoint.unlink(missing_ok=True)
    return {"model": model_name, "dataset": splits.info.name, "epochs": config.epochs, "seconds": seconds,
            "val_accuracy": val.accuracy if val else None, "test_accuracy": test.accuracy,
            "params": sum(p.numel() for p in model.parameters()), "out": str(out)}

