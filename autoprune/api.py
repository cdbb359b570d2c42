"""The Python API: prune any ``nn.Module`` with any loaders in one call.

>>> result = autoprune.prune(model, torch.randn(1, 3, 32, 32), method="pso", macs_reduction=0.5,
...                          train_loader=train_dl, val_loader=val_dl)
>>> result.model            # the pruned module; ``model`` itself is left untouched
>>> result.save("pruned.pt"); autoprune.load("pruned.pt", model=MyNet())

Everything the command line does is this call: with ``out=`` the run writes its history, report, figures
and model into a directory it locks, and ``resume=True`` continues an interrupted run there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.engine.callbacks import Callback, CallbackList
from autoprune.engine.config import PruneConfig, Target
from autoprune.engine.distributed import PARALLEL_WRAPPERS, join
from autoprune.engine.prune import Data, check_example_tensors, resolve_device, run
from autoprune.engine.result import PruneResult
from autoprune.engine.train import TrainConfig
from autoprune.errors import AutopruneError, ConfigError
from autoprune.io.files import check_path
from autoprune.methods import Method, create_method

log = logging.getLogger(__name__)

#: The default fine-tuning of :func:`prune`: two epochs at learning rate 0.01.
DEFAULT_FINETUNE = TrainConfig(epochs=2, lr=0.01)


def prune(model: nn.Module, example_inputs: Any, *, method: str | Method = "pso",
          method_options: Mapping[str, Any] | None = None, macs_reduction: float | None = None,
          latency_reduction: float | None = None, max_drop: float | None = None,
          train_loader: Iterable[Any] | None = None, val_loader: Iterable[Any] | None = None,
          test_loader: Iterable[Any] | None = None, score_fn: Callable[[nn.Module], float] | None = None,
          finetune: TrainConfig | Callable[[nn.Module], Any] | None = DEFAULT_FINETUNE, budget: int | None = None,
          ignored_layers: Sequence[str | nn.Module] | str | nn.Module | None = None, round_to: int | None = None,
          min_ratio: float = 0.05, device: str | torch.device | None = None, seed: int = 0,
          callbacks: Sequence[Callback] = (), out: str | os.PathLike[str] | None = None, resume: bool = False,
          force: bool = False, progress: bool = False, **settings: Any) -> PruneResult:
    """Prune ``model`` to a target and return the pruned module with its measurements.

    Args:
        model: any ``nn.Module`` (copied; the caller's model keeps its weights, device and mode). A model
            under ``nn.DataParallel`` or ``DistributedDataParallel`` is pruned through its ``.module``, and the
            result is that module, pruned and unwrapped (wrap it again to train it on several devices; a
            string in ``ignored_layers`` may keep the wrapper's ``module.`` prefix).
        example_inputs: what its forward takes: a tensor, or a tuple of tensors, batch first.
        method: a method name (``autoprune.method_names()``) or a built method, e.g. ``methods.PSO(particles=20)``.
        method_options: options of a method given by name.
        macs_reduction: remove at least this fraction of the MACs.
        latency_reduction: cut the measured latency by at least this fraction (combinable with the above).
        max_drop: instead, remove as many MACs as possible losing at most this many points of validation score.
        train_loader: ``(inputs, targets)`` batches for BatchNorm re-estimation, data-driven criteria and
            fine-tuning (any re-iterable, e.g. a DataLoader or a list; not a generator: it is read several times).
            Targets of a single class are refused after one epoch of the built-in fine-tuning (not checked with
            ``finetune=None`` or your own loop).
        val_loader: batches scoring the candidates (held out from training; never the test data); read once, into
            memory. Its targets must hold at least two classes (unless ``score_fn`` is given).
        test_loader: batches for the final before/after measurement (default: the validation batches); re-iterable.
        score_fn: ``score_fn(model) -> float``, higher is better: replaces top-1 accuracy (detection, ...).
        finetune: a :class:`TrainConfig`, your own ``finetune(model)`` loop, or None for the pruned structure
            with the method's weights, not fine-tuned.
        budget: candidate evaluations (default: the method's).
        ignored_layers: layers (names or modules of ``model``; one alone is fine) whose output channels are never
            pruned.
        round_to: kept channel counts are multiples of this.
        min_ratio: each group keeps at least this fraction of its channels.
        device: where to compute (default: where ``model`` is).
        seed: seed of everything random.
        callbacks: :class:`autoprune.Callback` objects following the run.
        out: a directory for the run's history, report, figures and model (locked while the run lasts).
        resume: continue the interrupted run in ``out`` (same settings).
        force: replace an earlier run in ``out``.
        progress: show progress bars.
        **settings: further :class:`PruneConfig` fields (``val_samples``, ``calibration_samples``, ``score`` and
            ``score_options`` (see :mod:`autoprune.engine.scoring`), ``select_top``, ``select_steps``,
            ``select_samples``, ``latency_batch``, ``latency_repeats``, ``threads``, ``workers``, ``executor``,
            ``ray_address``...).

    Raises:
        AutopruneError: a bad argument (one line naming it and the fix), an unreachable target, a method
            that cannot handle the model.
    """
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model must be an nn.Module, got {type(model).__name__}")
    wrapped = isinstance(model, PARALLEL_WRAPPERS)
    if wrapped:
        log.info("pruning the module inside %s; the result is that module, unwrapped", type(model).__name__)
        model = model.module
    if method_options is not None and not isinstance(method_options, Mapping):
        raise ConfigError("method_options", method_options, "must be a dict of option names to values")
    if score_fn is not None and not callable(score_fn):
        raise ConfigError("score_fn", score_fn, "must be a callable(model) -> float")
    if isinstance(callbacks, Callback) or not isinstance(callbacks, Sequence | set | frozenset):
        raise ConfigError("callbacks", callbacks, "must be a list of autoprune.Callback instances")
    for name, flag in (("resume", resume), ("force", force), ("progress", progress)):
        if not isinstance(flag, bool | np.bool_):  # "no" would count as on
            raise ConfigError(name, flag, "must be True or False")
    resume, force, progress = bool(resume), bool(force), bool(progress)
    if not isinstance(method, str | Method) and not (isinstance(method, type) and issubclass(method, Method)):
        raise ConfigError("method", method, "must be a method name (see autoprune.method_names()) or a Method "
                                            "instance such as autoprune.methods.PSO(particles=20)")
    if out is not None:
        check_path(out, "out", "a directory path")
    check_example_tensors(example_inputs)
    method_obj = create_method(method, dict(method_options or {}))
    finetune_fn = None if isinstance(finetune, TrainConfig) or finetune is None else finetune
    if finetune_fn is not None and not callable(finetune_fn):
        raise ConfigError("finetune", finetune, "must be a TrainConfig, a callable(model) or None")
    config = PruneConfig(
        method=method_obj.name, method_options=method_obj.options,
        target=Target(macs_reduction=macs_reduction, latency_reduction=latency_reduction, max_drop=max_drop),
        budget=budget, finetune=finetune if isinstance(finetune, TrainConfig) else None,
        ignored_layers=_layer_names(model, ignored_layers, wrapped=wrapped),
        round_to=1 if round_to is None else round_to, min_ratio=min_ratio, seed=seed, **_settings(settings))
    data = Data(train=train_loader, val=val_loader, test=test_loader, score_fn=score_fn)
    info = {"architecture": {"kind": "module", "class": type(model).__name__}}
    return execute(model, example_inputs, config, method_obj, data, device=join(resolve_device(model, device)),
                   finetune_fn=finetune_fn, callbacks=callbacks, out=out, resume=resume, force=force,
                   progress=progress, info=info)


def execute(model: nn.Module, example_inputs: Any, config: PruneConfig, method: Method, data: Data, *,
            device: torch.device, finetune_fn: Callable[[nn.Module], Any] | None = None,
            callbacks: Sequence[Callback] = (), out: str | os.PathLike[str] | None = None, resume: bool = False,
            force: bool = False, progress: bool = False, info: dict[str, Any] | None = None,
            invocation: dict[str, Any] | None = None) -> PruneResult:
    """Run the engine, in a run directory when ``out`` is given (the CLI calls this with its own ``info``)."""
    if out is None:
        if resume or force:
            raise ConfigError("resume" if resume else "force", True, "needs out= (the run directory)")
        with _own_random_state(device):
            return run(model, example_inputs, config, method, data, device=device, finetune_fn=finetune_fn,
                       callbacks=CallbackList(list(callbacks)), progress=progress, info=info)
    from autoprune.engine.distributed import world
    from autoprune.runs.job import WORK_DIR, RunDirectory

    if not world().main:  # under torchrun only rank 0 writes; the others read its fine-tuning checkpoint
        with _own_random_state(device):
            return run(model, example_inputs, config, method, data, device=device, finetune_fn=finetune_fn,
                       callbacks=CallbackList(list(callbacks)), checkpoint=Path(out) / WORK_DIR / "finetune.ckpt",
                       progress=False, info=info)
    if force and not resume and os.path.isdir(out) and any(os.scandir(out)):
        _check_reachable_first(model, example_inputs, config, device)  # --force is about to delete the old run
    with RunDirectory(out, config, resume=resume, force=force, invocation=invocation, info=info) as run_dir, \
            _own_random_state(device):
        result = run(model, example_inputs, config, method, data, device=device, finetune_fn=finetune_fn,
                     callbacks=CallbackList([run_dir, *callbacks]), recorded=run_dir.recorded,
                     checkpoint=run_dir.finetune_checkpoint, progress=progress, info=info)
        run_dir.finish(result)
    return result


def _check_reachable_first(model: nn.Module, example_inputs: Any, config: PruneConfig, device: torch.device) -> None:
    """An impossible target must fail before ``force`` clears the run directory, so that it deletes nothing."""
    import copy

    from autoprune.engine.batches import as_inputs, first_sample, to_device
    from autoprune.engine.prune import check_forward, check_reachable
    from autoprune.engine.space import PruningSpace

    try:
        base = copy.deepcopy(model).to(device).eval()
    except Exception:
        return  # the run itself reports an uncopyable model
    example = to_device(first_sample(as_inputs(example_inputs)), device)
    check_forward(base, example)
    check_reachable(PruningSpace(base, example, round_to=config.round_to, min_ratio=config.min_ratio,
                                 ignored=config.ignored_layers), config)


def _own_random_state(device: torch.device) -> Any:
    """The run seeds torch's generators itself; the caller's random state is restored afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"val_samples", "calibration_samples", "score", "score_options", "select_top", "select_steps",
               "select_samples", "latency_batch", "latency_repeats", "threads", "workers", "executor", "ray_address",
               "threads_per_worker"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise AutopruneError(f"unknown argument {', '.join(map(repr, unknown))} for autoprune.prune; further settings "
                             f"are: {', '.join(sorted(allowed))}")
    return dict(settings)


def _layer_names(model: nn.Module, layers: Sequence[str | nn.Module] | str | nn.Module | None, *,
                 wrapped: bool = False) -> tuple[str, ...]:
    """Module names for ``ignored_layers`` given as names or as modules of ``model``; one name alone is one layer
    (not a sequence of characters), and so is one module (an ``nn.Sequential`` alone stands for its layers).
    ``wrapped``: ``model`` came out of a DataParallel wrapper, whose ``module.`` prefix a name may carry."""
    if isinstance(layers, str) or (isinstance(layers, nn.Module) and not isinstance(layers, Iterable)):
        layers = [layers]
    if not layers:
        return ()
    if not isinstance(layers, Iterable):
        raise ConfigError("ignored_layers", layers, "must be a list of module names or modules of the model")
    by_id = {id(m): n for n, m in model.named_modules()}
    names = []
    for layer in layers:
        if isinstance(layer, nn.Module):
            if id(layer) not in by_id:
                raise ConfigError("ignored_layers", type(layer).__name__, "is not a module of the model")
            names.append(by_id[id(layer)])
        elif isinstance(layer, str):
            names.append(layer.removeprefix("module.") if wrapped else layer)
        else:
            raise ConfigError("ignored_layers", layer, "entries must be module names or modules of the model")
    return tuple(names)
