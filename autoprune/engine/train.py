"""Training, fine-tuning (optionally distilled from the unpruned model) and evaluation, on any loader.

A loader is any iterable of ``(inputs, targets)`` batches (:mod:`autoprune.engine.batches`); every epoch
is one seeded pass over it, so a run resumed from an epoch checkpoint sees the same batches as an
uninterrupted one. One loop serves all three: SGD with Nesterov momentum, a cosine learning-rate schedule with linear
warm-up (:func:`lr_at`, a pure function of the step), cross-entropy, and, when a teacher is given,
Hinton's distillation loss mixed in with weight ``distill``. A ``regularizer`` callable adds a term to
the loss (network slimming's L1 on BatchNorm scales, SA's polarization). Every epoch can be
checkpointed atomically and a run resumed from its checkpoint with the same result.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from autoprune.checks import MAX_COUNT
from autoprune.engine.batches import (
    TRAINING_FIX,
    check_class_targets,
    correct_predictions,
    count_batches,
    forward,
    gradients,
    iterate,
    to_device,
)
from autoprune.engine.distributed import RankSlice, all_reduce_sum, unwrap, world, wrap_for_training
from autoprune.errors import AutopruneError, ConfigError, Interrupted
from autoprune.io.files import atomic_path

log = logging.getLogger(__name__)

Regularizer = Callable[[nn.Module], torch.Tensor]
LossFn = Callable[[Any, Any], torch.Tensor]

#: Pass keys of the seeded loader iterations (:func:`autoprune.engine.batches.iterate`): epochs use their
#: index; evaluation a key of its own, far from any epoch.
EVAL_KEY = 1_000_003


class TrainingInterrupted(Interrupted):
    """``stop_requested()`` became true: training stopped after an epoch, whose checkpoint resumes it."""


#: the largest learning rate, weight decay and distillation temperature (beyond, SGD's float32 steps overflow)
MAX_RATE = 1e4


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training or fine-tuning run.

    ``batch_size`` is used where autoprune builds the loader itself (the CLI's datasets); a loader you
    pass keeps its own batch size. The default learning rate suits fine-tuning a trained network (what
    ``autoprune.prune(finetune=TrainConfig(...))`` does); training from scratch wants more (``autoprune train``
    uses 0.05).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    distill: float = 0.0  # weight of the distillation loss, 0 = plain cross-entropy
    temperature: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "seed"):  # types first: a string would fail the comparisons below
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ConfigError(name, value, f"must be an integer (TrainConfig's {name}), not "
                                               f"{type(value).__name__}")
            object.__setattr__(self, name, int(value))
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "distill", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(name, value, f"must be a number (TrainConfig's {name}), not {type(value).__name__}")
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError as exc:
                raise ConfigError(name, value, f"must be a finite number (TrainConfig's {name})") from exc
        checks = {  # written so that NaN fails every test; the upper bounds keep SGD's float32 arithmetic finite
            "epochs": 0 <= self.epochs <= MAX_COUNT, "batch_size": self.batch_size >= 1,
            "lr": 0 < self.lr <= MAX_RATE, "momentum": 0 <= self.momentum < 1,
            "weight_decay": 0 <= self.weight_decay <= MAX_RATE, "warmup_epochs": 0 <= self.warmup_epochs <= MAX_COUNT,
            "distill": 0 <= self.distill <= 1, "temperature": 0 < self.temperature <= MAX_RATE, "seed": self.seed >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            k = bad[0]
            raise AutopruneError(f"invalid training setting {k}={getattr(self, k)!r}; epochs, seed, warmup and weight "
                                 f"decay must be >= 0, lr and temperature > 0, lr, weight decay and temperature at "
                                 f"most {MAX_RATE:g}, epochs at most {MAX_COUNT}, momentum in [0, 1), distill in "
                                 "[0, 1]")


@dataclass(frozen=True)
class EvalResult:
    """Accuracy (fraction) and mean cross-entropy over a dataset."""

    accuracy: float
    loss: float
    samples: int


@dataclass(frozen=True)
class TrainLog:
    """What a training run did."""

    epochs: int
    seconds: float
    final_loss: float
    resumed_from_epoch: int


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Learning rate at ``step``: linear warm-up to ``base_lr``, then cosine decay to zero."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _flushing_subnormals() -> bool:
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    return bool((tiny * 1.0).item() == 0.0)


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero within the block (restoring the previous mode).

    Subnormals made CPU kernels up to 10x slower in LeNet-5 training here and carry no signal in a
    network; the mode is process-wide, so it is scoped rather than set once.
    """
    before = _flushing_subnormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


class EmptyData(AutopruneError):
    """:func:`evaluate` got no samples (the caller can say which loader)."""


@subnormals_flushed()
@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], *, seed: int = 0, progress: bool = False,
             desc: str = "evaluate", shared: bool = True, what: str = "the loader") -> EvalResult:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data`` in eval mode (the model's mode is restored).

    ``data`` is a loader or a list of ``(inputs, targets)`` batches (held in memory by the caller). Under
    torchrun a loader's batches are shared out between the ranks and the counts summed (every rank must call);
    ``shared=False`` evaluates all of it in this process alone.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    correct, loss_sum, n = 0.0, 0.0, 0
    here = world()
    if shared and here.distributed and not isinstance(data, list):  # each rank its slice; counts summed below
        data = RankSlice(data, here, even=False)
    batches = data if isinstance(data, list) else iterate(data, seed=seed, key=EVAL_KEY, device=device, what=what)
    try:
        for inputs, targets in tqdm(batches, desc=desc, leave=False, disable=not progress or None):
            if isinstance(data, list):
                inputs, targets = to_device(inputs, device), to_device(targets, device)
            logits = forward(model, inputs)
            hits, samples = correct_predictions(logits, targets)
            loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            correct += hits
            n += samples
    finally:
        model.train(was_training)
    if here.distributed and isinstance(data, RankSlice):
        correct, loss_sum, n = all_reduce_sum([correct, loss_sum, float(n)], device)
        n = int(n)
    if n == 0:
        raise EmptyData("cannot evaluate on empty data (the loader yielded no samples)")
    return EvalResult(correct / n, loss_sum / n, n)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target loss, scaled by T^2 so its gradients match cross-entropy's."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1),
                    reduction="batchmean") * t * t


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; no weight decay on biases and normalisation parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)


def _steps_per_epoch(loader: Iterable[Any], seed: int) -> int:
    steps = count_batches(loader)
    if steps is None:  # an iterable without len(): count one pass
        steps = sum(1 for _ in iterate(loader, seed=seed, key=EVAL_KEY + 1))
    if steps == 0:
        if isinstance(loader, RankSlice):
            raise AutopruneError(f"the training loader has fewer batches than the {loader.here.size} torchrun "
                                 "processes; use a smaller batch size or fewer processes")
        raise AutopruneError("the training loader yielded no batches; check the data (or its drop_last with fewer "
                             "samples than one batch)")
    return steps


def _training_loss(trained: nn.Module, model: nn.Module, inputs: Any, targets: Any, config: TrainConfig,
                   teacher: nn.Module | None, regularizer: Regularizer | None, loss_fn: LossFn | None,
                   targets_fix: str = TRAINING_FIX) -> torch.Tensor:
    outputs = forward(trained, inputs)
    if loss_fn is None:
        check_class_targets(outputs, targets, what="training", fix=targets_fix)
    loss = loss_fn(outputs, targets) if loss_fn is not None else F.cross_entropy(outputs, targets)
    if teacher is not None:
        with torch.no_grad():
            teacher_outputs = forward(teacher, inputs)
        loss = (1 - config.distill) * loss + config.distill * distillation_loss(outputs, teacher_outputs,
                                                                               config.temperature)
    if regularizer is not None:
        loss = loss + regularizer(model)
    return loss


@subnormals_flushed()
def fit(model: nn.Module, loader: Iterable[Any], config: TrainConfig, *, teacher: nn.Module | None = None,
        regularizer: Regularizer | None = None, loss_fn: LossFn | None = None, targets_fix: str = TRAINING_FIX,
        checkpoint: str | os.PathLike[str] | None = None, progress: bool = True, desc: str = "train",
        stop_requested: Callable[[], bool] | None = None,
        on_epoch: Callable[[int, int], None] | None = None) -> TrainLog:
    """Train ``model`` in place on the ``(inputs, targets)`` batches of ``loader``, one seeded pass per epoch.

    Args:
        model: the network, already on its device (batches are moved there).
        loader: training batches; its own augmentation and batch size apply.
        config: hyper-parameters.
        teacher: when given and ``config.distill > 0``, the model distilled from (kept in eval mode).
        regularizer: an extra loss term computed from the model.
        loss_fn: ``loss_fn(outputs, targets)``; default cross-entropy on logits.
        targets_fix: what the error says to do when the default loss meets outputs that are not logits.
        checkpoint: a file updated atomically after every epoch; if it exists, training resumes from it.
        progress: show progress bars.
        desc: label of the progress bar.
        stop_requested: polled after every epoch (and its checkpoint); when true, training stops there.
        on_epoch: called with ``(epoch, epochs)`` (1-based) after every epoch and its checkpoint.

    Raises:
        AutopruneError: when the loss or the weights become NaN or infinite (naming the epoch, step and
            learning rate).
        TrainingInterrupted: ``stop_requested()`` became true before the last epoch.
    """
    if config.epochs == 0:
        return TrainLog(0, 0.0, float("nan"), 0)
    here = world()
    if here.distributed:  # torchrun: every rank its slice of each epoch's pass, gradients averaged by DDP
        loader = RankSlice(loader, here)
    steps_per_epoch = _steps_per_epoch(loader, config.seed)
    optimizer = _optimizer(model, config)
    start_epoch = _resume(checkpoint, model, optimizer, config) if checkpoint else 0
    teacher = teacher.eval() if teacher is not None and config.distill > 0 else None
    started = time.perf_counter()
    trained = wrap_for_training(model, here)
    try:
        last_loss = _epochs(model, trained, loader, config, optimizer, start_epoch, steps_per_epoch, teacher=teacher,
                            regularizer=regularizer, loss_fn=loss_fn, targets_fix=targets_fix,
                            checkpoint=checkpoint if here.main else None,
                            progress=progress and here.main, desc=desc, stop_requested=stop_requested,
                            on_epoch=on_epoch)
    finally:
        unwrap(trained, model)
    model.zero_grad(set_to_none=True)  # the last step's gradients are of no use to the caller
    model.eval()
    return TrainLog(config.epochs - start_epoch, time.perf_counter() - started, last_loss, start_epoch)


def _epochs(model: nn.Module, trained: nn.Module, loader: Iterable[Any], config: TrainConfig,
            optimizer: torch.optim.Optimizer, start_epoch: int, steps_per_epoch: int, *, teacher: nn.Module | None,
            regularizer: Regularizer | None, loss_fn: LossFn | None, targets_fix: str,
            checkpoint: str | os.PathLike[str] | None,
            progress: bool, desc: str, stop_requested: Callable[[], bool] | None,
            on_epoch: Callable[[int, int], None] | None) -> float:
    """The epoch loop of :func:`fit` (``trained`` is ``model``, or ``model`` under DistributedDataParallel)."""
    device = model_device(model)
    total, warmup = steps_per_epoch * config.epochs, int(config.warmup_epochs * steps_per_epoch)
    last_loss = float("nan")
    trained.train()
    for epoch in range(start_epoch, config.epochs):
        batches = iterate(loader, seed=config.seed, key=epoch, device=device, what="the training loader")
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False,
                   disable=not progress or None)
        running = 0.0
        classes = _ClassRange(loss_fn is None and epoch == start_epoch and not world().distributed)
        for i, (inputs, targets) in enumerate(bar):
            lr = lr_at(min(epoch * steps_per_epoch + i, total - 1), total, config.lr, warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _training_loss(trained, model, inputs, targets, config, teacher, regularizer, loss_fn, targets_fix)
            classes.add(targets)
            if not torch.isfinite(loss):
                raise AutopruneError(f"training diverged: loss is {float(loss.detach())} at epoch {epoch + 1}, "
                                     f"step {i + 1} (learning rate {lr:.4g}); lower the learning rate or check "
                                     "the data")
            optimizer.zero_grad(set_to_none=True)
            gradients(loss, None, f"{desc}, epoch {epoch + 1}")
            optimizer.step()
            running = 0.9 * running + 0.1 * float(loss.detach()) if i else float(loss.detach())
            if i % 20 == 0:
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr:.3g}")
        last_loss = running
        classes.check()
        log.info("%s epoch %d/%d: loss %.4f", desc, epoch + 1, config.epochs, running)
        _check_finite_weights(model, epoch, config)
        if checkpoint:
            _save_checkpoint(checkpoint, model, optimizer, config, epoch + 1)
        if on_epoch is not None:
            on_epoch(epoch + 1, config.epochs)
        if stop_requested is not None and _agreed(stop_requested(), device) and epoch + 1 < config.epochs:
            where = f"; its checkpoint {str(checkpoint)!r} resumes it when run again" if checkpoint else ""
            raise TrainingInterrupted(f"{desc} interrupted after epoch {epoch + 1} of {config.epochs}{where}")
    return last_loss


class _ClassRange:
    """The smallest and largest class index of an epoch's targets, kept on the device (no sync per batch): a
    whole epoch of one class is refused, since cross-entropy on it teaches the model to predict only that class.
    (Under torchrun a rank sees a slice only, so it is not checked there.)"""

    def __init__(self, active: bool) -> None:
        self.active, self.low, self.high = active, None, None

    def add(self, targets: Any) -> None:
        if not self.active or not isinstance(targets, torch.Tensor) or not targets.numel():
            return
        low, high = targets.min(), targets.max()
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def check(self) -> None:
        if self.low is not None and bool(self.low == self.high):
            raise AutopruneError(f"the training data hold only class {int(self.low)} (every target of an epoch); "
                                 "training with cross-entropy on one class teaches the model to predict only it: "
                                 "pass training data with at least two classes")


def _agreed(stop: bool, device: torch.device) -> bool:
    """Whether any rank asked to stop (under torchrun every rank must stop at the same epoch)."""
    if not world().distributed:
        return stop
    return all_reduce_sum([1.0 if stop else 0.0], device)[0] > 0


def _check_finite_weights(model: nn.Module, epoch: int, config: TrainConfig) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # the last step's update
        raise AutopruneError(f"training diverged: the weights became NaN or infinite in epoch {epoch + 1} "
                             f"(peak learning rate {config.lr:.4g}); lower the learning rate or check the data")


def _save_checkpoint(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer,
                     config: TrainConfig, epoch: int) -> None:
    payload = {"epoch": epoch, "config": asdict(config), "model": model.state_dict(),
               "optimizer": optimizer.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _resume(path: str | os.PathLike[str], model: nn.Module, optimizer: torch.optim.Optimizer,
            config: TrainConfig) -> int:
    p = Path(path)
    if not p.exists():
        return 0
    try:
        payload = torch.load(p, map_location=model_device(model), weights_only=True)
        if payload["config"] != asdict(config):
            log.warning("checkpoint %s was made with other settings; starting over", p)
            return 0
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if {k: tuple(v.shape) for k, v in payload["model"].items()} != shapes:  # load_state_dict would half-load
            log.warning("checkpoint %s belongs to another architecture; starting over", p)
            return 0
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    except Exception as exc:  # a damaged checkpoint only costs the time it saved
        log.warning("ignoring unreadable checkpoint %s (%s)", p, exc)
        return 0
    log.info("resuming %s from epoch %d", p, payload["epoch"])
    return int(payload["epoch"])
