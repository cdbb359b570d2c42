"""What the engine assumes about a model's inputs and a loader's batches, and nothing more.

A model takes ``inputs``: one tensor, or a tuple/list of tensors passed as positional arguments
(``model(*inputs)``). A loader is any iterable of ``(inputs, targets)`` batches, e.g. a PyTorch
``DataLoader``; the first dimension of every tensor is the batch. No assumption is made on ranges or
normalisation: the loaders give what the model eats.

Loaders are iterated in "passes" identified by a key (a fine-tuning epoch, the calibration pass...):
before each pass the global torch RNG is seeded from ``(seed, key)`` and, when the loader (or its
sampler) has ``set_epoch``, as ``DistributedSampler`` and autoprune's own loaders do, that is called
with the key. A shuffled ``DataLoader`` then yields the same batches for the same key in every run,
so an interrupted run that resumes at epoch 3 sees what an uninterrupted one saw.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.errors import AutopruneError, first_line

log = logging.getLogger(__name__)

Inputs = Any  # a tensor, or a tuple/list of tensors
Batch = tuple[Inputs, Any]


def as_inputs(example_inputs: Any, what: str = "example_inputs") -> Inputs:
    """Check that ``example_inputs`` is a tensor or a non-empty tuple/list of tensors (tuples kept)."""
    if isinstance(example_inputs, torch.Tensor):
        if example_inputs.dim() == 0:
            raise AutopruneError(f"{what} is a 0-d tensor; give a batch, e.g. torch.randn(1, 3, 32, 32)")
        if example_inputs.shape[0] == 0:
            raise AutopruneError(f"{what} has batch size 0 (shape {tuple(example_inputs.shape)}); give at least "
                                 "one sample, e.g. torch.randn(1, 3, 32, 32)")
        return example_inputs
    if isinstance(example_inputs, list | tuple) and example_inputs and all(
            isinstance(t, torch.Tensor) and t.dim() > 0 for t in example_inputs):
        if any(t.shape[0] == 0 for t in example_inputs):
            raise AutopruneError(f"{what} has a tensor with batch size 0; give at least one sample in each")
        return tuple(example_inputs)
    raise AutopruneError(f"{what} must be a tensor or a tuple of tensors with a batch dimension, got "
                         f"{type(example_inputs).__name__}")


def forward(model: nn.Module, inputs: Inputs) -> Any:
    """Call ``model`` on ``inputs`` (positional arguments for a tuple/list).

    What the call raises (other than an :class:`AutopruneError`) is marked as the model's failure
    (:func:`forward_failure` names the model's class), so that a stage can tell the caller's forward failing
    apart from a fault of its own.
    """
    try:
        if isinstance(inputs, tuple | list):
            return model(*inputs)
        return model(inputs)
    except AutopruneError:
        raise
    except Exception as exc:
        if getattr(exc, _FORWARD_MARK, None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(exc, _FORWARD_MARK, type(model).__name__)
        raise


_FORWARD_MARK = "_autoprune_forward_of"


def forward_failure(exc: BaseException) -> str | None:
    """The class name of the model whose forward raised ``exc`` (None: ``exc`` did not come from a forward)."""
    if isinstance(exc, AutopruneError):
        return None
    return getattr(exc, _FORWARD_MARK, None)


def gradients(loss: torch.Tensor, params: Sequence[torch.Tensor] | None, where: str) -> Any:
    """``torch.autograd.grad(loss, params)`` (``loss.backward()`` for None params); a backward pass that fails,
    typically on a forward that changes a tensor in place which autograd still needs, is one line naming the
    stage and the fix."""
    try:
        if params is None:
            loss.backward()
            return None
        return torch.autograd.grad(loss, params, allow_unused=True)
    except RuntimeError as exc:
        cause = first_line(exc, "").split(" Hint:")[0]
        raise AutopruneError(f"the model's backward pass failed during {where} ({cause}); its forward "
                             "probably changes in place a tensor that autograd needs (y[:, :4].mul_(2), "
                             "x += ...): use out-of-place ops there (y = y * 2, torch.cat)") from exc


def check_reiterable(loader: Any, name: str) -> None:
    """Refuse an iterator (a generator, ``iter(...)``, a ``map``) given as a loader that is read more than once.

    Checked without calling ``iter`` (a DataLoader with workers would start them)."""
    if isinstance(loader, Iterator):
        kind = "a generator" if isinstance(loader, Generator) else f"an iterator ({type(loader).__name__})"
        raise AutopruneError(f"{name} is {kind}, which can be read only once; pass a re-iterable loader such as a "
                             "DataLoader or a list of batches")


def _check_ends(iterator: Iterator[Any], what: str) -> None:
    """Refuse an iterator that never ends (``itertools.cycle`` of a loader): every pass over a loader must."""
    if isinstance(iterator, itertools.cycle | itertools.repeat | itertools.count):
        raise AutopruneError(f"{what} never ends (iter() gives an itertools.{type(iterator).__name__}), but each pass "
                             "over it must: pass the DataLoader itself, not a cycle of it")


def to_device(obj: Any, device: torch.device | str) -> Any:
    """Move the tensors in ``obj`` (nested tuples, lists, dicts) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def first_sample(inputs: Inputs) -> Inputs:
    """The first sample of a batch of inputs, keeping the batch dimension."""
    if isinstance(inputs, tuple | list):
        return tuple(t[:1] for t in inputs)
    return inputs[:1]


def batch_size_of(inputs: Inputs) -> int:
    """Samples in a batch (the first dimension of its first tensor)."""
    tensor = inputs[0] if isinstance(inputs, tuple | list) else inputs
    return int(tensor.shape[0])


def describe_shape(inputs: Inputs) -> str:
    """The input shapes, for messages: ``(1, 3, 32, 32)`` or ``(1, 3, 32, 32), (1, 10)``."""
    if isinstance(inputs, tuple | list):
        return ", ".join(str(tuple(t.shape)) for t in inputs)
    return str(tuple(inputs.shape))


def random_batch(example_inputs: Inputs, batch_size: int, device: torch.device | str,
                 generator: torch.Generator | None = None) -> Inputs:
    """A batch of ``batch_size`` made like ``example_inputs``: floats uniform in [0, 1), other dtypes repeated."""

    def one(t: torch.Tensor) -> torch.Tensor:
        shape = (batch_size, *t.shape[1:])
        if t.is_floating_point():
            return torch.rand(shape, generator=generator, dtype=t.dtype).to(device)
        reps = (batch_size + t.shape[0] - 1) // t.shape[0]
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].to(device)

    if isinstance(example_inputs, tuple | list):
        return tuple(one(t) for t in example_inputs)
    return one(example_inputs)


def split_batch(batch: Any, where: str = "a batch") -> Batch:
    """``(inputs, targets)`` of one loader item, checked."""
    if not isinstance(batch, Sequence) or isinstance(batch, str | bytes) or len(batch) != 2:
        kind = f"{type(batch).__name__} of length {len(batch)}" if isinstance(batch, Sequence) else \
            type(batch).__name__
        raise AutopruneError(f"{where} must be an (inputs, targets) pair, got a {kind}; make the loader yield "
                             "(inputs, targets)")
    inputs, targets = batch
    if not isinstance(inputs, torch.Tensor) and not (
            isinstance(inputs, tuple | list) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)):
        raise AutopruneError(f"the inputs of {where} must be a tensor or a tuple of tensors, got "
                             f"{type(inputs).__name__}")
    tensors = [*(inputs if isinstance(inputs, tuple | list) else [inputs]), targets]
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        raise AutopruneError(f"{where} is on the meta device (no data); make the loader yield real tensors")
    return inputs, targets


def seed_for(seed: int, key: int) -> int:
    """A well-mixed 63-bit seed for pass ``key`` of a run seeded with ``seed``."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(key) % 2**64]).generate_state(1, np.uint64)[0]
    return int(state) % (2**63 - 1)


def _parts(loader: Any) -> list[Any]:
    """The loader, its sampler, its batch sampler and the batch sampler's sampler (those it has)."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    parts = (loader, getattr(loader, "sampler", None), batch_sampler, getattr(batch_sampler, "sampler", None))
    return [p for p in parts if p is not None]


def set_epoch(loader: Any, key: int) -> None:
    """Call ``set_epoch(key)`` on the loader or its sampler / batch sampler where they have one."""
    for obj in _parts(loader):
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(key)
            return


@contextlib.contextmanager
def _seeded(loader: Any, seed: int, key: int) -> Iterator[None]:
    """Within the block, a pass over ``loader`` is drawn from ``seed`` and ``key``: the global generator is
    seeded, and so are the loader's and its samplers' own generators (``DataLoader(generator=g)``), whose
    states, like a sampler's epoch, are put back afterwards: the caller's next pass is the one it would
    have been without autoprune."""
    parts = _parts(loader)
    generators = list({id(g): g for p in parts for g in [getattr(p, "generator", None)]
                       if isinstance(g, torch.Generator)}.values())
    states = [g.get_state() for g in generators]
    epochs = [(p, p.epoch) for p in parts if isinstance(getattr(p, "epoch", None), int)]
    set_epoch(loader, key)
    torch.manual_seed(seed_for(seed, key))
    for g in generators:
        g.manual_seed(seed_for(seed, key))
    try:
        yield
    finally:
        for g, state in zip(generators, states, strict=True):
            g.set_state(state)
        for p, epoch in epochs:
            p.epoch = epoch


def iterate(loader: Iterable[Any], *, seed: int, key: int, device: torch.device | str | None = None,
            what: str = "the loader") -> Iterator[Batch]:
    """One seeded pass over ``loader``: ``(inputs, targets)`` batches, moved to ``device`` when given."""
    with _seeded(loader, seed, key):
        yield from _batches(loader, device, what)


def _batches(loader: Iterable[Any], device: torch.device | str | None, what: str) -> Iterator[Batch]:
    try:
        iterator = iter(loader)
    except AutopruneError:
        raise
    except Exception as exc:
        if isinstance(exc, TypeError) and not hasattr(type(loader), "__iter__") and \
                not hasattr(type(loader), "__getitem__"):
            raise AutopruneError(f"{what} is not iterable ({type(loader).__name__}); pass a DataLoader or any "
                                 "iterable of (inputs, targets) batches") from exc
        raise AutopruneError(f"{what} raised {type(exc).__name__} starting a pass (iter(loader), before batch 0): "
                             f"{first_line(exc, '(no message)')}; fix the loader or its data") from exc
    _check_ends(iterator, what)
    for i in itertools.count():
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except AutopruneError:
            raise
        except Exception as exc:
            raise AutopruneError(f"{what} raised {type(exc).__name__} reading batch {i}: "
                                 f"{first_line(exc, '(no message)')}; fix the loader or its data") from exc
        inputs, targets = split_batch(batch, f"batch {i} of {what}")
        if device is not None:
            inputs, targets = to_device(inputs, device), to_device(targets, device)
        yield inputs, targets


def first_of_batch(inputs: Inputs, targets: Any, n: int) -> tuple[Inputs, Any]:
    """The first ``n`` samples of a batch (targets that are not a tensor are kept as they are)."""
    inputs = tuple(t[:n] for t in inputs) if isinstance(inputs, tuple | list) else inputs[:n]
    return inputs, targets[:n] if isinstance(targets, torch.Tensor) else targets


def take(loader: Iterable[Any], samples: int | None, *, seed: int, key: int, device: torch.device | str,
         what: str = "the loader", max_bytes: int | None = None, min_samples: int = 0) -> list[Batch]:
    """The first ``samples`` samples of one seeded pass (all of it for None), as a list of batches on ``device``.

    Used to hold the validation and calibration data in memory once, rather than re-reading the loader
    for every candidate. With ``max_bytes``, it stops earlier, once the inputs held reach that many bytes and
    at least ``min_samples`` samples are held.
    """
    out: list[Batch] = []
    seen = held = 0
    for inputs, targets in iterate(loader, seed=seed, key=key, device=device, what=what):
        n = batch_size_of(inputs)
        if samples is not None and seen + n > samples:
            n = samples - seen
            inputs, targets = first_of_batch(inputs, targets, n)
        if n > 0:
            out.append((inputs, targets))
        seen += n
        held += _bytes(inputs)
        if samples is not None and seen >= samples:
            break
        if max_bytes is not None and held >= max_bytes and seen >= min_samples:
            log.info("%s: holding %d samples (%d MiB of inputs), not %s", what, seen, held >> 20, samples)
            break
    return out


def _bytes(inputs: Inputs) -> int:
    tensors = inputs if isinstance(inputs, tuple | list) else (inputs,)
    return sum(t.element_size() * t.nelement() for t in tensors if isinstance(t, torch.Tensor))


def count_batches(loader: Iterable[Any]) -> int | None:
    """``len(loader)`` when it has one."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def limited(batches: Iterable[Batch], max_batches: int | None) -> Iterable[Batch]:
    """At most ``max_batches`` batches of ``batches``."""
    return batches if max_batches is None else itertools.islice(batches, max_batches)


Metric = Callable[[Any, Any], tuple[float, int]]


#: What :func:`check_class_targets` suggests where the built-in fine-tuning (cross-entropy) meets other outputs.
TRAINING_FIX = ("the built-in fine-tuning trains with cross-entropy on them: for other tasks pass "
                "finetune=your_function(model) (your own loop) or finetune=None")
#: ... and where a method's own training or a gradient criterion does.
METHOD_TRAINING_FIX = ("this method trains with cross-entropy: for other tasks use one whose channel criterion reads "
                       "only the weights (l1, global, random, pso, ssa)")


def check_class_targets(outputs: Any, targets: Any, *, what: str = "accuracy",
                        fix: str = "for other tasks pass score_fn=callable(model) -> float") -> None:
    """Raise one line unless ``outputs`` are logits ``(B, K)`` and ``targets`` integer class indices ``(B,)`` in
    ``[0, K)`` (what accuracy and cross-entropy read); ``what`` needs them, ``fix`` says what to do otherwise."""
    if isinstance(outputs, torch.Tensor) and outputs.dim() >= 2 and not isinstance(targets, torch.Tensor):
        raise AutopruneError(f"{what} needs integer class targets as a tensor (B,), the loader gave a "
                             f"{type(targets).__name__}; make it yield torch.tensor(targets) (a DataLoader's default "
                             "collate does)")
    if not isinstance(outputs, torch.Tensor) or outputs.dim() < 2 or not isinstance(targets, torch.Tensor):
        got = type(outputs).__name__ if not isinstance(outputs, torch.Tensor) else f"shape {tuple(outputs.shape)}"
        raise AutopruneError(f"{what} needs logits (B, classes) and integer class targets (B,), the model gave "
                             f"{got}; {fix}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise AutopruneError(f"the targets are {str(targets.dtype).removeprefix('torch.')}; a classifier's targets "
                             f"are integer class indices (B,): if they are class labels, convert them with .long(); "
                             f"if not, {fix.removeprefix('for other tasks ')}")
    if targets.shape != outputs.shape[:1] + outputs.shape[2:]:  # (B,), or (B, H, W) for (B, K, H, W) outputs
        raise AutopruneError(f"the targets have shape {tuple(targets.shape)} for outputs {tuple(outputs.shape)}; "
                             "expected one class index per sample (B,)")
    if not targets.numel():
        return
    low, high = torch.stack(torch.aminmax(targets)).tolist()  # one device sync per batch, not two
    if low < 0 or high >= outputs.shape[1]:
        raise AutopruneError(f"a target class lies outside 0..{outputs.shape[1] - 1} (got {low}..{high}) for a "
                             f"model with {outputs.shape[1]} outputs; check the labels (or the model's number of "
                             "classes)")


def correct_predictions(outputs: Any, targets: Any) -> tuple[float, int]:
    """Top-1 hits and samples of a classification batch (outputs: logits ``(B, K)``, targets: ``(B,)``)."""
    check_class_targets(outputs, targets)
    return float((outputs.argmax(1) == targets).sum()), int(targets.shape[0])
