"""Candidate scores: how a pruned structure is ranked before it is fine-tuned, and multi-fidelity selection.

A search proposes keep vectors; each becomes a candidate network (the trained weights with the channels
that the criterion ranks lowest removed) and is *scored*. The score is only useful if it ranks candidates
the way their accuracy after the real fine-tuning does, so every score here is one *adaptation* of the
candidate followed by one *metric* on the held-out validation split:

========== ============================================================ ====================================
name       adaptation                                                   metric (higher is better)
========== ============================================================ ====================================
``none``   none: the pruned weights as they are                         top-1 accuracy
``bn``     adaptive BatchNorm: running statistics re-estimated          top-1 accuracy
``loss``   adaptive BatchNorm                                           ``exp(-cross-entropy)``
``kl``     adaptive BatchNorm                                           ``exp(-KL(unpruned || candidate))``
``finetune`` adaptive BatchNorm, a short distilled fine-tune (``steps``   ``metric``: ``kl`` (default),
           SGD steps on held training batches), BatchNorm again         ``loss`` or ``accuracy``
========== ============================================================ ====================================

What the literature says, and what we chose:

* **Adaptive BatchNorm** (Li et al., *EagleEye*, ECCV 2020): a pruned network's BatchNorm statistics are
  those of the unpruned one, which is why its "vanilla" accuracy hardly predicts its fine-tuned accuracy;
  re-estimating them on a few training batches makes the two correlate. It cannot help a network without
  BatchNorm (LeNet-5): there ``bn`` equals ``none``. Re-estimation here is exact (a cumulative average,
  :func:`~autoprune.engine.evaluate.recalibrate_bn`) on ``calibration_samples`` training images.
* **Loss / KL instead of 0/1 accuracy**: top-1 accuracy on a validation split of a thousand images moves in
  steps of 0.1 point and is flat near chance, where badly pruned candidates all sit; the mean
  cross-entropy, or the KL divergence from the unpruned model's predictions (the distillation objective of
  Hinton et al., 2015, "Distilling the knowledge in a neural network"), is continuous and keeps ranking
  there. They are reported as ``exp(-loss)`` and ``exp(-KL)``, in ``(0, 1]``, so the search can rank them
  like an accuracy (the unpruned network has KL 0, i.e. 1.0); the accuracy is always measured too: it is
  what drop-mode targets, history rows and the chance check read.
* **A short distilled fine-tune** (``finetune``) is the only adaptation a network without BatchNorm has,
  and the one that predicts best on any network: tens of SGD steps (cosine learning rate, Nesterov
  momentum, the loss mixing cross-entropy and Hinton's distillation loss against the unpruned model's
  logits, computed once) on training batches held in memory, then the metric. It costs
  ``steps`` training steps per candidate, so it suits short searches or, better, the selection below.
* **Multi-fidelity selection** (:func:`successive_halving`; Jamieson & Talwalkar, AISTATS 2016;
  Hyperband, Li et al., JMLR 2018): the cheap score ranks everything the search proposed; the ``top``
  best distinct structures, plus the uniform structure, are fine-tuned briefly; the best ``1/eta`` go on
  with ``eta`` times the steps, until one is left: it is chosen by validation. We restart each rung from
  the pruned weights (so a rung's measurement *is* the ``finetune`` score at that many steps, a pure
  function of the structure), which costs ``top * steps`` steps per rung. The rungs fine-tune on their own
  held training samples (``select_samples``, 32,768 by default, at most :data:`SELECT_MAX_BYTES` of inputs),
  so that each of their steps takes a new batch: on the cheap score's 2,048 samples a 270-step rung at batch
  128 makes 17 passes, which rewards the capacity to memorise (wide linear layers), not to generalise.

Every score is a pure function of the structure: the candidate is built from the unpruned weights, the
training batches are fixed, and the random state is seeded from the channel counts, so evaluation order,
caching and worker processes do not change a score. Nothing here sees the test data.

Measured (``benchmarks/score_fidelity.py``; Kendall tau / Spearman rho between a score and the accuracy
after the benchmark fine-tuning, over sampled structures at the target, seconds per candidate on a shared
2-core CPU):

* ResNet-20 / CIFAR-10 (JPEG q75, quick schedule), 60% of the MACs removed, 24 structures, 3 fine-tuning
  epochs each (``benchmarks/results/score_fidelity/resnet20_seed0``): ``bn`` tau 0.78 (1.7 CPU s),
  ``loss`` 0.74 (1.5 s), ``kl`` 0.76 (1.6 s), ``finetune`` 30 steps 0.82 (16 s). Without the six
  deliberately squeezed structures (the harder, realistic case): ``bn`` 0.68, ``loss`` 0.73, ``kl`` 0.75,
  ``finetune`` 0.76. Every score picks a structure 0.31 points below the best.
* LeNet-5 / MNIST, 90% removed, 24 structures, 16 distilled fine-tuning epochs each
  (``benchmarks/results/score_fidelity/lenet5_seed0``): ``bn`` (here the plain accuracy of the pruned
  network: no BatchNorm) tau 0.75, ``loss`` and ``kl`` 0.70, ``finetune`` 10 / 30 steps 0.67 / 0.58 (the
  30-step fine-tune measured on accuracy: 0.55); without the squeezed structures ``bn`` 0.81, ``kl`` 0.83,
  ``finetune`` 30 steps 0.63; 0.1-0.4 s per candidate. But the structure each score would pick among the
  24 is 0.09 points below the best for ``bn`` and the fine-tune, 0.21 for ``kl``; and what a search ends
  with (``benchmarks/results/search_quality/lenet5`` against ``lenet5_score_kl``: the five paper methods,
  3 seeds, one shared fine-tuning) is better with the 30-step fine-tune than with ``kl`` (see the README's
  Benchmarks section for the numbers). Tau over random structures measures the ranking of the bulk; a search
  needs the top of the ranking, which a short fine-tune gets right more often than ``kl`` on a network
  without BatchNorm (not always: the selection below catches what it gets wrong).

Hence the default ``auto``: ``kl`` with BatchNorm (as good as ``bn`` over all structures, better among the
realistic ones, at the same cost; ten times cheaper than a fine-tune for 0.06 less tau), the 30-step
fine-tune without it (its searches end best, though its tau over random structures is lower).

Selection (``select_top``) follows the score by default (``select_top=None``, :func:`selection_size`): on,
with the search's 4 best distinct structures and the uniform one, after a fine-tune score (``auto`` on a
network without BatchNorm; the rungs continue that fine-tune at 3 and 9 times its steps, on fresh batches);
off after the cheap scores. Measured (search benchmark, ``benchmarks/results/search_quality/``):

* After a cheap score (ResNet-20, ``kl``; ``resnet20_select8``, ``select_top=8``, 3 seeds) it lifts the random
  search from -5.29 to -4.68 points and leaves the five paper methods where they were (average -4.81 with it,
  -4.79 without), at 1.5-3.5 CPU minutes more per run: off.
* After the 30-step fine-tune (LeNet-5 at 90%): at the top of a search the short score ranks poorly (Kendall
  tau 0.17-0.39 among a search's 13 best, ``benchmarks/results/top_of_search``), and without the selection
  ``ssa`` chose a structure that 16 epochs left 4.9 points down (1 seed in 10, ``lenet5_tpmacs``). With rungs
  that cycled the cheap score's 2,048 images (``lenet5_sel4``, 10 seeds) the selection rescued that seed and
  caused two collapses of the same kind (``ssa`` -2.69, ``gdp`` -1.79): 17 passes over 2,048 images reward
  wide linear layers. With rungs on fresh batches (``lenet5_selfresh``, every method, 10 seeds: today's
  default) no run of any method is below -1.49 points (a structure whose four fine-tuning orders average
  -0.77), the paper methods average -0.64 points and ``pso`` is 0.14 ahead of ``random`` (9 of 10 seeds);
  about 6 s more per run.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.checks import check_choice, check_float, check_int
from autoprune.engine.batches import (
    Batch,
    Inputs,
    batch_size_of,
    check_class_targets,
    first_of_batch,
    forward,
    gradients,
    seed_for,
)
from autoprune.engine.train import distillation_loss, lr_at, subnormals_flushed
from autoprune.errors import AutopruneError, first_line
from autoprune.registry import Registry

log = logging.getLogger(__name__)

ScoreFn = Callable[[nn.Module], float]

#: The metrics a score can rank by.
METRICS = ("accuracy", "loss", "kl")

#: The default candidate score and selection (chosen by ``benchmarks/score_fidelity.py``: see above).
DEFAULT_SCORE = "auto"
#: ``select_top=None`` (the default) means :func:`selection_size`: AUTO_SELECT_TOP after a fine-tune score, else 0.
DEFAULT_SELECT_TOP: int | None = None
AUTO_SELECT_TOP = 4
DEFAULT_SELECT_STEPS = 20
#: Training samples held for the selection's rungs, so that their steps see new batches rather than cycling the
#: cheap score's few thousand (bounded by :data:`SELECT_MAX_BYTES` of inputs).
DEFAULT_SELECT_SAMPLES = 32768
SELECT_MAX_BYTES = 1 << 30
#: Successive halving keeps the best ``1/SELECT_ETA`` of each rung and gives them ``SELECT_ETA`` times the steps.
SELECT_ETA = 3

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---- what a score sees ---------------------------------------------------------------------------------


@dataclass
class ScoreData:
    """Everything a score needs, held in memory and picklable (an evaluator in a worker process carries it).

    The unpruned network's logits, which the KL metric and distillation compare with, are computed once (on
    first use), after adaptive BatchNorm on the same calibration data as every candidate's: the unpruned
    network scored by ``kl`` thus has divergence 0 exactly, and what a candidate's KL measures is what its
    pruning changed, not the difference between training-time and re-estimated statistics.

    Attributes:
        teacher: the unpruned network (never modified; the reference is an adapted copy of it).
        val: validation batches ``(inputs, targets)``.
        calibration: training input batches for BatchNorm re-estimation.
        train: training batches ``(inputs, targets)`` for the short fine-tunes (empty when no score needs them).
        score_fn: the caller's ``score_fn(model) -> float``, replacing top-1 accuracy (then only accuracy
            metrics apply).
        seed: the run's seed; each candidate's random state is derived from it and its channel counts.
    """

    teacher: nn.Module
    val: list[Batch]
    calibration: list[Inputs]
    train: list[Batch] = field(default_factory=list)
    score_fn: ScoreFn | None = None
    seed: int = 0
    _val_logits: list[torch.Tensor] | None = field(default=None, repr=False)
    _train_logits: list[torch.Tensor] | None = field(default=None, repr=False)

    def val_logits(self) -> list[torch.Tensor]:
        """The (adapted) unpruned network's logits on each validation batch (computed once)."""
        if self._val_logits is None:
            self._val_logits = _logits(self.reference(), [x for x, _ in self.val])
        return self._val_logits

    def train_logits(self) -> list[torch.Tensor]:
        """The (adapted) unpruned network's logits on each held training batch (computed once)."""
        if self._train_logits is None:
            self._train_logits = _logits(self.reference(), [x for x, _ in self.train])
        return self._train_logits

    def reference(self) -> nn.Module:
        """A copy of the unpruned network with adaptive BatchNorm applied, as every candidate gets it."""
        reference = copy.deepcopy(self.teacher)
        adapt_batchnorm(reference, self.calibration)
        return reference.eval()


@torch.no_grad()
def _logits(model: nn.Module, inputs: Sequence[Inputs]) -> list[torch.Tensor]:
    was_training = model.training
    model.eval()
    try:
        out = []
        for x in inputs:
            logits = forward(model, x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise AutopruneError("the loss, kl and finetune scores need a classifier's logits (batch, classes); "
                                     "for other outputs use score='bn' with score_fn=")
            out.append(logits.detach().float())
        return out
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class Measurement:
    """A candidate's validation measurements.

    Attributes:
        accuracy: top-1 accuracy (or the caller's ``score_fn``) in ``[0, 1]``.
        loss: mean cross-entropy (NaN with a ``score_fn``).
        kl: mean KL divergence from the unpruned network's predictions (NaN when not measured).
    """

    accuracy: float
    loss: float = math.nan
    kl: float = math.nan

    def value(self, metric: str) -> float:
        """The metric as a higher-is-better number in ``[0, 1]``: accuracy, ``exp(-loss)`` or ``exp(-kl)``."""
        if metric == "accuracy":
            return self.accuracy
        raw = self.loss if metric == "loss" else self.kl
        return math.exp(-raw) if math.isfinite(raw) else 0.0


def _tensor_versions(model: nn.Module) -> list[tuple[str, int, int, float | None]]:
    """Name, identity, in-place version counter and sum of every parameter and buffer: any change to the network
    (the sum catches an edit through ``.data``, which the version counter does not see)."""
    return [(name, id(t), t._version, _sum(t)) for name, t in (*model.named_parameters(), *model.named_buffers())]


def _sum(tensor: torch.Tensor) -> float | None:
    """The sum of a tensor's entries in float64, accumulated without a copy of the tensor (None when it holds
    both infinities, so that two such sums still compare equal)."""
    values = tensor.detach()
    if values.is_complex():
        values = torch.view_as_real(values)
    total = float(torch.nansum(values, dtype=torch.float64))
    return None if math.isnan(total) else total


def call_score_fn(score_fn: ScoreFn, model: nn.Module) -> float:
    """``score_fn(model)`` as a float; what it raises, or a value that is not a number, is one line naming it."""
    before = _tensor_versions(model)
    try:
        value = score_fn(model)
    except AutopruneError:
        raise
    except Exception as exc:
        raise AutopruneError(f"score_fn raised {type(exc).__name__}: {first_line(exc, '(no message)')}; fix score_fn "
                             "(it is called with each candidate network in eval mode)") from exc
    if _tensor_versions(model) != before:  # the network is the search's working copy: later candidates would be off
        raise AutopruneError("score_fn changed the network it was given (its weights, buffers or layers); it must "
                             "only evaluate it: train or edit copy.deepcopy(model) instead")
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AutopruneError(f"score_fn must return a number (higher is better), it returned "
                             f"{type(value).__name__} {value!r:.60}")
    if not math.isfinite(value):
        raise AutopruneError(f"score_fn returned {float(value)}; it must return a finite number for every network "
                             "it is given (higher is better): give a network it cannot score a low finite value")
    return float(value)


#: What a failed adaptation (a diverged fine-tune) measures: the worst value of every metric.
FAILED = Measurement(accuracy=0.0, loss=math.inf, kl=math.inf)


@subnormals_flushed()
@torch.no_grad()
def measure(model: nn.Module, data: ScoreData, *, kl: bool = False) -> Measurement:
    """Accuracy and mean cross-entropy on ``data.val`` (and the KL from the unpruned model when ``kl``)."""
    model.eval()
    if data.score_fn is not None:
        return Measurement(accuracy=call_score_fn(data.score_fn, model))
    teacher = data.val_logits() if kl else None
    correct, loss_sum, kl_sum, n = 0.0, 0.0, 0.0, 0
    for i, (inputs, targets) in enumerate(data.val):
        logits = forward(model, inputs).float()
        correct += float((logits.argmax(1) == targets).sum())
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        if teacher is not None:
            kl_sum += float(F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher[i], 1), log_target=True,
                                     reduction="sum"))
        n += int(targets.shape[0])
    if n == 0:
        raise AutopruneError("cannot score candidates on empty validation data; pass a non-empty val_loader")
    return Measurement(accuracy=correct / n, loss=loss_sum / n, kl=kl_sum / n if kl else math.nan)


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, calibration: Sequence[Inputs]) -> None:
    """EagleEye's adaptive BatchNorm: re-estimate the running statistics (a no-op without BatchNorm)."""
    from autoprune.engine.evaluate import recalibrate_bn  # evaluate imports this module

    recalibrate_bn(model, calibration)


def candidate_seed(seed: int, counts: Sequence[int]) -> int:
    """The random seed of one candidate's adaptation: the run's seed and its channel counts, nothing else."""
    key = zlib.crc32(np.asarray(counts, dtype=np.int64).tobytes())
    return seed_for(seed, key)


@subnormals_flushed()
def distill_steps(model: nn.Module, data: ScoreData, *, steps: int, lr: float, distill: float,
                  temperature: float, seed: int, samples: int | None = None, momentum: float = 0.9,
                  weight_decay: float = 5e-4) -> bool:
    """Fine-tune ``model`` in place for ``steps`` SGD steps over the held training batches that cover the
    first ``samples`` samples (all of them for None), cycled when the steps need more.

    SGD with Nesterov momentum, weight decay on weights only, a cosine learning rate from ``lr`` to zero
    (:func:`~autoprune.engine.train.lr_at`), loss ``(1 - distill) * CE + distill * KD`` with Hinton's
    distillation loss at ``temperature`` against the unpruned network's (precomputed) logits.

    Returns:
        False when the loss became NaN or infinite (the candidate is then scored :data:`FAILED`).
    """
    if not data.train:
        raise AutopruneError("the finetune score and the selection need training batches; pass train_loader=")
    batches = first_samples(data.train, data.train_logits() if distill > 0 else None, samples)
    for p in model.parameters():
        p.requires_grad_(True)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=momentum, nesterov=momentum > 0)
    torch.manual_seed(seed)
    model.train()
    try:
        for step in range(steps):
            inputs, targets, teacher = batches[step % len(batches)]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr)
            outputs = forward(model, inputs)
            check_class_targets(outputs, targets)
            loss = F.cross_entropy(outputs, targets) if distill < 1 else outputs.new_zeros(())
            if teacher is not None:
                loss = (1 - distill) * loss + distill * distillation_loss(outputs, teacher, temperature)
            if not torch.isfinite(loss):
                return False
            optimizer.zero_grad(set_to_none=True)
            gradients(loss, None, "a candidate's short fine-tune (score 'finetune')")
            optimizer.step()
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def first_samples(train: Sequence[Batch], teacher: Sequence[torch.Tensor] | None,
                  samples: int | None) -> list[tuple[Inputs, Any, torch.Tensor | None]]:
    """The held batches ``(inputs, targets, teacher logits or None)`` of the first ``samples`` samples of
    ``train`` (all for None), the last one cut to size: a score sees the same data however many more samples
    are held for the selection."""
    out: list[tuple[Inputs, Any, torch.Tensor | None]] = []
    seen = 0
    for i, (inputs, targets) in enumerate(train):
        logits = None if teacher is None else teacher[i]
        n = batch_size_of(inputs)
        if samples is not None and seen + n > samples:
            n = samples - seen
            inputs, targets = first_of_batch(inputs, targets, n)
            logits = None if logits is None else logits[:n]
        out.append((inputs, targets, logits))
        seen += n
        if samples is not None and seen >= samples:
            break
    return out


# ---- the scores ----------------------------------------------------------------------------------------


class CandidateScore(ABC):
    """How a candidate network is adapted and measured. Options are keyword-only constructor arguments.

    Attributes:
        name: the registry name.
        adapts: whether the score trains the candidate's weights (it then always gets a physically pruned
            copy of its own).
        metric: what it ranks by: ``accuracy``, ``loss`` or ``kl`` (see :meth:`Measurement.value`).
    """

    name: ClassVar[str] = ""
    adapts: ClassVar[bool] = False
    metric: str = "accuracy"

    @property
    def train_samples(self) -> int:
        """Training samples (with targets) the score needs held in memory (0: none)."""
        return 0

    @abstractmethod
    def adapt(self, model: nn.Module, data: ScoreData, seed: int) -> bool:
        """Adapt the candidate in place before it is measured; False when that failed (diverged)."""

    def prepare(self, data: ScoreData) -> None:
        """Compute what the score compares with (the unpruned network's logits) while the working copy of the
        model is still unpruned: call before masking it (the :class:`~autoprune.engine.evaluate.Evaluator` does)."""
        if self.metric == "kl":
            data.val_logits()

    def __call__(self, model: nn.Module, data: ScoreData, seed: int) -> Measurement:
        """Adapt and measure one candidate; ``seed`` is its own (:func:`candidate_seed`)."""
        self.prepare(data)
        if not self.adapt(model, data, seed):
            log.warning("the %s score's adaptation diverged on a candidate; it is scored as the worst", self.name)
            return FAILED
        return measure(model, data, kl=self.metric == "kl")

    def value(self, measurement: Measurement) -> float:
        """The number the search ranks by, higher is better, in ``[0, 1]``."""
        return measurement.value(self.metric)

    def check(self, score_fn: ScoreFn | None) -> None:
        """Refuse a caller's ``score_fn`` where the metric needs classification logits and targets."""
        if score_fn is not None and (self.metric != "accuracy" or self.adapts):
            raise AutopruneError(f"score {self.name!r} needs a classifier's logits and class targets; with score_fn= "
                                 "use score='bn' (or 'none')")

    def describe(self) -> dict[str, Any]:
        """The score's name and options, for reports."""
        return {"name": self.name, **{k: getattr(self, k) for k in self._options()}}

    def _options(self) -> tuple[str, ...]:
        return ()


SCORES: Registry[type[CandidateScore]] = Registry("score")


@SCORES.register("none")
class NoAdaptation(CandidateScore):
    """Top-1 validation accuracy of the pruned weights as they are (the baseline: no adaptation at all)."""

    def adapt(self, model: nn.Module, data: ScoreData, seed: int) -> bool:
        return True


@SCORES.register("bn")
class AdaptiveBN(CandidateScore):
    """Top-1 validation accuracy after adaptive BatchNorm (EagleEye): statistics re-estimated first."""

    def adapt(self, model: nn.Module, data: ScoreData, seed: int) -> bool:
        adapt_batchnorm(model, data.calibration)
        return True


@SCORES.register("loss")
class ValidationLoss(AdaptiveBN):
    """``exp(-mean cross-entropy)`` on the validation split after adaptive BatchNorm: graded where accuracy is
    flat (the geometric mean of the probability given to the true class)."""

    metric = "loss"


@SCORES.register("kl")
class Divergence(AdaptiveBN):
    """``exp(-KL)`` of the candidate's predictions from the unpruned network's on the validation inputs,
    after adaptive BatchNorm: 1.0 for the unpruned network, lower the further a candidate strays.

    Args:
        temperature: softmax temperature of both distributions (1: the predictions themselves).
    """

    metric = "kl"

    def __init__(self, *, temperature: float = 1.0) -> None:
        self.temperature = check_float("temperature", temperature, low=0.0, high=100.0, low_open=True)

    def __call__(self, model: nn.Module, data: ScoreData, seed: int) -> Measurement:
        if self.temperature == 1.0:
            return super().__call__(model, data, seed)
        adapt_batchnorm(model, data.calibration)
        plain = measure(model, data, kl=False)
        return Measurement(plain.accuracy, plain.loss, _tempered_kl(model, data, self.temperature))

    def _options(self) -> tuple[str, ...]:
        return ("temperature",)


@torch.no_grad()
def _tempered_kl(model: nn.Module, data: ScoreData, temperature: float) -> float:
    teacher, total, n = data.val_logits(), 0.0, 0
    for (inputs, _), t in zip(data.val, teacher, strict=True):
        logits = forward(model, inputs).float()
        total += float(F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(t / temperature, 1),
                                log_target=True, reduction="sum"))
        n += int(t.shape[0])
    return total / max(n, 1)


@SCORES.register("finetune")
class ShortFinetune(CandidateScore):
    """A short distilled fine-tune of each candidate, then ``metric`` on the validation split.

    Adaptive BatchNorm, ``steps`` SGD steps (:func:`distill_steps`) over ``samples`` training samples held in
    memory (cycled), adaptive BatchNorm again (the training steps' momentum statistics are noisy), then the
    metric. The only adaptation a network without BatchNorm has.

    Args:
        steps: SGD steps per candidate (tens to hundreds; each is one training batch of the loader).
        lr: peak learning rate (cosine decay to zero over the steps).
        distill: weight of the distillation loss against the unpruned network, 0..1 (1: no labels used).
        temperature: distillation temperature.
        metric: what is measured after the fine-tune: ``kl``, ``loss`` or ``accuracy``.
        samples: training samples held in memory for the steps (cycled when ``steps`` needs more batches).
    """

    adapts = True

    def __init__(self, *, steps: int = 50, lr: float = 0.01, distill: float = 0.5, temperature: float = 4.0,
                 metric: str = "kl", samples: int = 2048) -> None:
        self.steps = check_int("steps", steps, minimum=1, maximum=1_000_000)
        self.lr = check_float("lr", lr, low=0.0, high=10.0, low_open=True)
        self.distill = check_float("distill", distill, low=0.0, high=1.0)
        self.temperature = check_float("temperature", temperature, low=0.0, high=100.0, low_open=True)
        self.metric = check_choice("metric", metric, METRICS)
        self.samples = check_int("samples", samples, minimum=1, maximum=10_000_000)

    @property
    def train_samples(self) -> int:
        return self.samples

    def prepare(self, data: ScoreData) -> None:
        super().prepare(data)
        if self.distill > 0:
            data.train_logits()

    def adapt(self, model: nn.Module, data: ScoreData, seed: int) -> bool:
        adapt_batchnorm(model, data.calibration)
        ok = distill_steps(model, data, steps=self.steps, lr=self.lr, distill=self.distill,
                           temperature=self.temperature, seed=seed, samples=self.samples)
        adapt_batchnorm(model, data.calibration)
        return ok

    def _options(self) -> tuple[str, ...]:
        return ("steps", "lr", "distill", "temperature", "metric", "samples")


@SCORES.register("auto")
class Automatic(CandidateScore):
    """The score that suits the network: ``kl`` where it has BatchNorm (adaptive BatchNorm is the cheap
    adaptation that makes its candidates comparable), ``finetune`` with ``steps`` steps where it has none (a
    short distilled fine-tune is the only adaptation such a network has; ``bn``, i.e. plain accuracy, when
    the run has no training data to fine-tune on), ``bn`` with a caller's ``score_fn`` (the metrics that
    read logits do not apply). Resolved once per run, by :meth:`resolve`.

    Args:
        steps: fine-tuning steps per candidate for a network without BatchNorm.
    """

    def __init__(self, *, steps: int = 30) -> None:
        self.steps = check_int("steps", steps, minimum=1, maximum=1_000_000)

    def resolve(self, model: nn.Module, score_fn: ScoreFn | None = None, *, trainable: bool = True) -> CandidateScore:
        """The concrete score for ``model``; ``trainable``: whether the run holds training data to fine-tune on."""
        if score_fn is not None:
            return AdaptiveBN()
        if any(isinstance(m, _BN_TYPES) and m.track_running_stats for m in model.modules()):
            return Divergence()
        return ShortFinetune(steps=self.steps) if trainable else AdaptiveBN()

    def adapt(self, model: nn.Module, data: ScoreData, seed: int) -> bool:
        raise AutopruneError("the auto score is resolved for a model first (Automatic.resolve)")

    def check(self, score_fn: ScoreFn | None) -> None:
        return None

    @property
    def train_samples(self) -> int:
        return ShortFinetune().samples

    def _options(self) -> tuple[str, ...]:
        return ("steps",)


def resolve_score(spec: str | CandidateScore, options: dict[str, Any] | None, model: nn.Module,
                  score_fn: ScoreFn | None = None, *, trainable: bool = True) -> CandidateScore:
    """The score a run uses on ``model``: :func:`create_score`, with ``auto`` resolved for the model (and for
    whether the run has training data: without it, ``auto`` cannot fine-tune and falls back to ``bn``)."""
    score = create_score(spec, options)
    if isinstance(score, Automatic):
        score = score.resolve(model, score_fn, trainable=trainable)
        log.info("score auto: %s for this model", score.describe())
    score.check(score_fn)
    return score


def create_score(spec: str | CandidateScore, options: dict[str, Any] | None = None) -> CandidateScore:
    """A score from its registered name and options (an already built score passes through).

    Raises:
        AutopruneError: an unknown name (listing the valid ones) or option, or a bad option value.
    """
    return SCORES.create(spec, **(options or {}))


def score_names() -> list[str]:
    """The registered score names."""
    return SCORES.names()


def selection_size(select_top: int | None, score: CandidateScore) -> int:
    """How many of the search's best structures the selection compares: ``select_top`` when the caller set
    it; by default (``None``) :data:`AUTO_SELECT_TOP` when the candidate score is itself a short fine-tune
    (``finetune``, or ``auto`` on a network without BatchNorm: the selection's rungs then continue that
    fine-tune at ``eta`` and ``eta**2`` times its steps and catch a structure that only recovers fast), and 0
    (off) after the cheap scores (see the module's notes for the measurements behind both)."""
    if select_top is not None:
        return select_top
    return AUTO_SELECT_TOP if isinstance(score, ShortFinetune) else 0


def selection_steps(score: CandidateScore, steps: int) -> int:
    """Steps of the selection's first rung: ``steps``, or, when the cheap score is itself a fine-tune, ``eta``
    times its steps (the cheap score is then the rung below; a first rung shorter than it would add nothing)."""
    return max(steps, score.steps * SELECT_ETA) if isinstance(score, ShortFinetune) else steps


def selection_score(score: CandidateScore, steps: int, samples: int = DEFAULT_SELECT_SAMPLES) -> ShortFinetune:
    """The fine-tune that the selection's rungs measure with: ``score``'s own settings when it is a
    ``finetune`` score, else the defaults, at ``steps`` steps over ``samples`` held training samples (at least
    the cheap score's own: a rung's steps go on to new batches where the cheap score would cycle its few)."""
    if isinstance(score, ShortFinetune):
        return ShortFinetune(steps=steps, lr=score.lr, distill=score.distill, temperature=score.temperature,
                             metric=score.metric, samples=max(samples, score.samples))
    return ShortFinetune(steps=steps, samples=samples)


# ---- multi-fidelity selection --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rung:
    """One rung of successive halving: the structures fine-tuned for ``steps`` steps and what they measured.

    Attributes:
        steps: fine-tuning steps of every structure on this rung.
        counts: channel counts per group of each structure.
        accuracy: validation accuracy of each after the steps.
        values: the ranking value of each (see :meth:`Measurement.value`).
        seconds: time the rung took.
    """

    steps: int
    counts: tuple[tuple[int, ...], ...]
    accuracy: tuple[float, ...]
    values: tuple[float, ...]
    seconds: float


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`successive_halving`.

    Attributes:
        index: position of the chosen structure among the candidates given.
        keep: the chosen keep vector.
        accuracy: its validation accuracy on the last rung.
        rungs: every rung, first (most structures, fewest steps) to last.
        order: every candidate's position, best first: by the last rung reached, then by its value there.
        seconds: total time.
    """

    index: int
    keep: np.ndarray
    accuracy: float
    rungs: tuple[Rung, ...]
    order: tuple[int, ...]
    seconds: float

    def describe(self) -> dict[str, Any]:
        """A JSON-compatible summary for reports."""
        return {"chosen": self.index, "accuracy": self.accuracy, "seconds": round(self.seconds, 3),
                "rungs": [{"steps": r.steps, "structures": len(r.counts), "best_value": max(r.values),
                           "best_accuracy": max(r.accuracy), "seconds": round(r.seconds, 3)} for r in self.rungs]}


def successive_halving(candidates: Sequence[np.ndarray], score_at: Callable[[np.ndarray, int], Measurement],
                       counts_of: Callable[[np.ndarray], Sequence[int]], *, steps: int, eta: int = 2,
                       metric: str = "kl") -> Selection:
    """Choose among ``candidates`` (best cheap score first) by short fine-tunes of growing length.

    Rung 0 fine-tunes every candidate for ``steps`` steps (``score_at(keep, steps)``, from the pruned weights);
    the best ``ceil(n / eta)`` by ``metric`` go on to ``eta`` times the steps, until one is left. Ties keep
    the earlier (better cheaply scored) candidate.

    Args:
        candidates: keep vectors, in the order of the cheap score (best first).
        score_at: measures a keep vector after that many fine-tuning steps.
        counts_of: channel counts of a keep vector (for the record).
        steps: steps of the first rung.
        eta: the halving factor (>= 2).
        metric: what the rungs rank by.
    """
    check_int("steps", steps, minimum=1)
    check_int("eta", eta, minimum=2)
    if not candidates:
        raise AutopruneError("successive halving needs at least one candidate")
    started = time.perf_counter()
    alive = list(range(len(candidates)))
    reached: dict[int, tuple[int, float]] = {}
    rungs: list[Rung] = []
    last: dict[int, Measurement] = {}
    rung_steps = steps
    for rung in range(64):
        begun = time.perf_counter()
        measured = {i: score_at(candidates[i], rung_steps) for i in alive}
        values = {i: measured[i].value(metric) for i in alive}
        for i in alive:
            reached[i] = (rung, values[i])
        rungs.append(Rung(rung_steps, tuple(tuple(int(c) for c in counts_of(candidates[i])) for i in alive),
                          tuple(measured[i].accuracy for i in alive), tuple(values[i] for i in alive),
                          time.perf_counter() - begun))
        log.info("selection rung %d: %d structures x %d steps, best %s %.4f", rung, len(alive), rung_steps, metric,
                 max(values.values()))
        last.update(measured)
        survivors = math.ceil(len(alive) / eta)
        if survivors <= 1:
            break
        alive = sorted(sorted(alive, key=lambda i: (-values[i], i))[:survivors])
        rung_steps *= eta
    order = tuple(sorted(reached, key=lambda i: (-reached[i][0], -reached[i][1], i)))
    winner = order[0]
    return Selection(winner, np.asarray(candidates[winner], dtype=float), last[winner].accuracy, tuple(rungs),
                     order, time.perf_counter() - started)
