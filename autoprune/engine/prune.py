"""The pruning engine: one run from a trained model to a measured, fine-tuned, pruned model.

The stages, each a function below: :func:`prepare` (a working copy on the device, the pruning space traced
once, the target checked, validation and calibration data held in memory, the base score), the method's
plan, :func:`search` (strategy + evaluator, every candidate reported to the callbacks), :func:`select`
(the chosen structure; never one at chance while a uniform one does better), surgery, :func:`finetune`
and :func:`measure`. The engine writes no files and prints nothing: history, resume, reports and
progress belong to callbacks and to :mod:`autoprune.runs`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import autoprune
from autoprune.engine.batches import (
    TRAINING_FIX,
    Batch,
    Inputs,
    as_inputs,
    check_class_targets,
    check_reiterable,
    count_batches,
    describe_shape,
    first_sample,
    forward,
    forward_failure,
    gradients,
    take,
    to_device,
)
from autoprune.engine.callbacks import CallbackList
from autoprune.engine.config import PruneConfig
from autoprune.engine.distributed import on_main, world
from autoprune.engine.evaluate import Evaluator, ScoreFn, choose_physical, measure_score, recalibrate_bn
from autoprune.engine.executor import BatchEvaluation, create_executor, threads_per_worker
from autoprune.engine.latency import by_batch_json, device_description, measure_latency, speedups
from autoprune.engine.latency_table import LatencyTable
from autoprune.engine.latency_target import check as check_latency
from autoprune.engine.latency_target import latency_table, search_cost
from autoprune.engine.measure import cost_of, serialized_size
from autoprune.engine.result import Evaluation, FinetuneStats, LayerWidth, ModelStats, PruneResult, SearchStats
from autoprune.engine.scoring import (
    SELECT_ETA,
    SELECT_MAX_BYTES,
    AdaptiveBN,
    CandidateScore,
    Selection,
    resolve_score,
    selection_score,
    selection_size,
    selection_steps,
    successive_halving,
)
from autoprune.engine.space import PruningSpace, TraceFailed, returns_no_tensors
from autoprune.engine.train import EmptyData, TrainingInterrupted, evaluate, fit, subnormals_flushed
from autoprune.errors import AutopruneError, Interrupted, first_line, short
from autoprune.methods import Method, MethodContext, Plan
from autoprune.search import Fitness, Problem, create_strategy, run_search
from autoprune.search.uniform import Uniform

log = logging.getLogger(__name__)

#: Pass keys of the seeded loader iterations (see :func:`autoprune.engine.batches.iterate`).
VAL_KEY, CALIBRATION_KEY, TEST_KEY, SCORE_TRAIN_KEY = 3_000_001, 3_000_002, 3_000_003, 3_000_004

FinetuneFn = Callable[[nn.Module], Any]


class SearchInterrupted(Interrupted):
    """The run was stopped on request at a safe point; its output directory can be resumed."""


@dataclass
class Data:
    """The caller's loaders and score function."""

    train: Iterable[Any] | None
    val: Iterable[Any] | None
    test: Iterable[Any] | None = None
    score_fn: ScoreFn | None = None


@dataclass
class Setup:
    """What every stage after :func:`prepare` works from."""

    base: nn.Module
    example: Inputs
    space: PruningSpace
    device: torch.device
    val: list[Batch]
    calibration: list[Inputs]
    base_score: float
    chance: float | None
    score: CandidateScore
    train: list[Batch] = field(default_factory=list)
    latency: LatencyTable | None = None


def resolve_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """The run's device: as given, else where the model's parameters are, else the CPU."""
    check_model_tensors(model)
    if device is None:
        return next((p.device for p in model.parameters()), torch.device("cpu"))
    return parse_device(device)


def parse_device(device: str | torch.device) -> torch.device:
    """A device the caller named, checked: known, available and holding values (not 'meta')."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise AutopruneError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AutopruneError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    if resolved.type == "meta":
        raise AutopruneError("device 'meta' holds no values to evaluate on; use 'cpu' or 'cuda'")
    return resolved


#: Floating-point types autoprune refuses in a model: half precision half-works (CPU kernels, BatchNorm
#: re-estimation, SGD fine-tuning and latency tables all assume float32), so it is refused rather than tried.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def check_model_tensors(model: nn.Module) -> None:
    """Refuse a model whose weights are on the meta device (none there) or in half precision."""
    if not isinstance(model, nn.Module):
        return
    if isinstance(model, torch.jit.ScriptModule):
        raise AutopruneError("the model is TorchScript (torch.jit.script / trace), which cannot be pruned; pass the "
                             "nn.Module it was made from")
    compiled = next((n for n, m in model.named_modules()
                     if type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")), None)  # torch.compile
    if compiled is not None:
        where = "the model is" if compiled == "" else f"layer {compiled!r} is"
        raise AutopruneError(f"{where} compiled with torch.compile, whose graph hides its layers from pruning; pass "
                             "the module it was made from (its ._orig_mod) and compile the pruned model afterwards")
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        raise AutopruneError(f"the model {type(model).__name__} is on the meta device (no weights); load its weights "
                             "first (e.g. model.to_empty(device='cpu') and then model.load_state_dict(...))")
    half = next((p.dtype for p in model.parameters() if p.dtype in HALF_DTYPES), None)
    if half is not None:
        kind = str(half).removeprefix("torch.")
        raise AutopruneError(f"the model's parameters are {kind}; autoprune prunes float32 models: pass model.float() "
                             f"(and float32 example_inputs and batches), and convert the pruned model back to {kind} "
                             "afterwards")
    parametrized = next((n for n, m in model.named_modules() if parametrize.is_parametrized(m)), None)
    if parametrized is not None:
        raise AutopruneError(f"layer {parametrized!r} has a parametrization (weight_norm, spectral_norm, ...), which "
                             "Torch-Pruning cannot cut; remove it before pruning (torch.nn.utils.parametrize."
                             "remove_parametrizations(layer, 'weight')) and add it again to the pruned model")


def check_example_tensors(example_inputs: Any) -> None:
    """Refuse example inputs on the meta device (they hold no values to run the model on)."""
    tensors = example_inputs if isinstance(example_inputs, tuple | list) else [example_inputs]
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        raise AutopruneError("example_inputs are on the meta device (no data); pass real tensors, e.g. "
                             "torch.randn(1, 3, 32, 32)")


def check_loaders(data: Data) -> None:
    """Refuse a one-shot iterator where a loader is read more than once (training, test); the validation loader
    is read once, into memory, so an iterator is fine there."""
    check_reiterable(data.train, "train_loader")
    check_reiterable(data.test, "test_loader")


def check_forward(model: nn.Module, example: Inputs) -> Any:
    """Run the model once on its example inputs; a failure is one line naming the model and the shapes."""
    try:
        with torch.no_grad():
            out = forward(model, example)
    except Exception as exc:
        first = first_line(exc, "")
        raise AutopruneError(f"model {type(model).__name__} fails on example inputs of shape "
                             f"{describe_shape(example)} ({type(exc).__name__}: {first}); pass example_inputs its "
                             "forward accepts") from exc
    outputs = _output_tensors(out)
    if not outputs:
        raise AutopruneError(returns_no_tensors(out))
    if not any(t.is_floating_point() for t in outputs):
        raise AutopruneError(f"model {type(model).__name__} returns {outputs[0].dtype} values (an argmax or "
                             "labels?), which no gradient or channel reaches; return the logits (or scores) instead")
    return out


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a forward's output (nested tuples, lists and dicts); anything else holds none."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for item in out for t in _output_tensors(item)]
    return []


def _sample_shapes(inputs: Inputs) -> list[tuple[int, ...]]:
    """The shape of each input tensor without its batch dimension."""
    return [tuple(t.shape[1:]) for t in (inputs if isinstance(inputs, tuple | list) else (inputs,))]


def _class_counts(val: Sequence[Batch]) -> torch.Tensor | None:
    """Samples per class of the validation targets (None unless every batch has class indices ``(B,)``); the
    majority-class rate is what a constant classifier scores (the chance level)."""
    targets = [t for _, t in val if isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point()]
    if not targets or len(targets) != len(val):
        return None
    counts = torch.bincount(torch.cat(targets).cpu().clamp_min(0))
    return counts if int(counts.sum()) > 0 else None


def prepare(model: nn.Module, example_inputs: Any, config: PruneConfig, data: Data,
            device: torch.device, *, builtin_finetune: bool = False) -> Setup:
    """Copy the model to the device, trace its pruning space, check the target, hold the data, score the base;
    with ``builtin_finetune`` (no caller's loop), check that ``config.finetune`` can train it
    (:func:`check_finetune`)."""
    check_model_tensors(model)
    check_example_tensors(example_inputs)
    check_loaders(data)
    try:
        base = copy.deepcopy(model).to(device).eval()
    except Exception as exc:
        stored = next((f"{name}.{attr}".lstrip(".") for name, module in model.named_modules()
                       for attr, value in vars(module).items()
                       if isinstance(value, torch.Tensor) and not value.is_leaf), None)
        if stored is not None:
            raise AutopruneError(f"cannot copy model {type(model).__name__}: its attribute {stored!r} holds a tensor "
                                 "a forward computed with gradients; store it detached (.detach()) or set it to None "
                                 "before pruning (autoprune works on a copy: the caller's model is never changed)"
                                 ) from exc
        raise AutopruneError(f"cannot copy model {type(model).__name__} ({type(exc).__name__}: {first_line(exc, '')}); "
                             "autoprune never changes the caller's model, so it must support copy.deepcopy") from exc
    example = to_device(first_sample(as_inputs(example_inputs)), device)
    check_forward(base, example)
    space = PruningSpace(base, example, round_to=config.round_to, min_ratio=config.min_ratio,
                         ignored=config.ignored_layers)
    for root, why in space.kept_whole.items():
        log.info("the channels of %s are kept whole: %s", root, why)
    if space.uncounted:
        log.warning("Torch-Pruning's counter does not count %d layer(s) of subclassed types (%s): MACs and MACs "
                    "targets leave them out", len(space.uncounted), ", ".join(space.uncounted[:3]))
    check_reachable(space, config)
    if data.val is None and data.score_fn is None:
        raise AutopruneError("autoprune scores the base model, every candidate and the pruned model on validation "
                             "data: pass val_loader= (or score_fn=)")
    val = take(data.val, config.val_samples, seed=config.seed, key=VAL_KEY, device=device,
               what="the validation loader") if data.val is not None else []
    if data.val is not None and not val:
        raise AutopruneError("the validation loader yielded no samples; pass a non-empty val_loader")
    if data.test is not None and count_batches(data.test) == 0:  # its length only: the search never reads it
        raise AutopruneError(EMPTY_TEST)
    pairs = [] if data.train is None else take(data.train, config.calibration_samples, seed=config.seed,
                                               key=CALIBRATION_KEY, device=device, what="the training loader")
    calibration = [x for x, _ in pairs]
    with torch.no_grad():
        first_outputs = forward_batch(base, pairs[0][0], "training batch 0", example) if pairs else None
        seen = [_sample_shapes(pairs[0][0])] if pairs else []
        for i, (inputs, _) in enumerate(pairs[1:], 1):  # each other shape of batch must run too (calibration)
            if (shapes := _sample_shapes(inputs)) not in seen:
                seen.append(shapes)
                forward_batch(base, inputs, f"training batch {i}", example)
    if builtin_finetune:
        check_finetune(base, config, data, device, pairs[:1], example=example, outputs=first_outputs)
    score = resolve_score(config.score, config.score_options, base, data.score_fn, trainable=data.train is not None)
    _check_calibration(score, base, calibration, chosen=config.score != "auto")
    train = _score_training_batches(config, score, data, device)
    _check_finite_outputs(base, val, example)
    base_score = measure_score(base, val, data.score_fn)
    chance = None
    if data.score_fn is None:  # the targets were read (and checked) by the base model's validation pass above
        counts = _class_counts(val)
        _check_two_classes(counts, config)
        chance = None if counts is None else float(counts.max()) / float(counts.sum())
    return Setup(base, example, space, device, val, calibration, base_score, chance, score, train)


def _check_calibration(score: CandidateScore, base: nn.Module, calibration: Sequence[Inputs], *,
                       chosen: bool) -> None:
    """A score that re-estimates BatchNorm statistics needs training batches to do it on: refused when the
    caller chose it, a warning when ``auto`` did (the candidates are then scored with the unpruned statistics)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in base.modules())
    if not (isinstance(score, AdaptiveBN) and has_bn and not calibration):
        return
    problem = (f"the candidate score {score.name!r} re-estimates BatchNorm statistics on training batches, but there "
               "are none (no train_loader, an empty one, or calibration_samples=0)")
    if chosen:
        raise AutopruneError(f"{problem}; pass a non-empty train_loader, or score='none'")
    log.warning("%s: candidates are scored with the unpruned model's statistics; pass a train_loader", problem)


def _check_two_classes(counts: torch.Tensor | None, config: PruneConfig) -> None:
    """Refuse validation targets of a single class: every candidate would be judged on one class only."""
    if counts is None or int((counts > 0).sum()) != 1:
        return
    only = int(counts.argmax())
    read = f" (the first val_samples={config.val_samples} samples)" if config.val_samples is not None else ""
    more = " (or raise val_samples)" if read else ""
    raise AutopruneError(f"the validation data hold only class {only}{read}; pruning is judged by how well the model "
                         f"still tells classes apart: pass validation data with at least two classes{more}")


@torch.no_grad()
def forward_batch(model: nn.Module, inputs: Inputs, where: str, example: Inputs) -> Any:
    """The model's outputs on a loader's batch; a failure is one line naming the batch and the example's shape."""
    try:
        return forward(model, inputs)
    except AutopruneError:
        raise
    except Exception as exc:
        raise AutopruneError(f"the model fails on {where}, inputs of shape {describe_shape(inputs)} "
                             f"({type(exc).__name__}: {first_line(exc, '(no message)')}); the loaders must yield what "
                             f"the model's forward takes (example_inputs has shape {describe_shape(example)})") from exc


@torch.no_grad()
def _check_finite_outputs(base: nn.Module, val: Sequence[Batch], example: Inputs) -> None:
    """The unpruned model runs on the validation batches and its outputs are finite (else no score means
    anything)."""
    for i, (inputs, _) in enumerate(val):
        if not _finite(forward_batch(base, inputs, f"validation batch {i}", example)):
            cause = ("the inputs are finite: check the model's weights (NaN?) and its numerics" if _finite(inputs)
                     else "the inputs hold NaN or inf: clean the data")
            raise AutopruneError(f"the unpruned model gives NaN or infinite outputs on validation batch {i}; {cause}")


def _finite(obj: Any) -> bool:
    """Whether every floating-point tensor in ``obj`` (a tensor, or tuples, lists and dicts of them) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        obj = list(obj.values())
    return all(_finite(item) for item in obj) if isinstance(obj, tuple | list) else True


def _score_training_batches(config: PruneConfig, score: CandidateScore, data: Data,
                            device: torch.device) -> list[Batch]:
    """The training batches the candidate score and the selection fine-tune on (none for the other scores)."""
    selecting = (selection_size(config.select_top, score) > 1 and config.target.mode == "cost"
                 and data.score_fn is None)
    samples = max(score.train_samples, config.select_samples if selecting else 0)
    if samples == 0:
        return []
    if data.train is None:
        if score.adapts:
            raise AutopruneError(f"score {config.score!r} fine-tunes every candidate on training data: pass "
                                 "train_loader= (or use score='bn')")
        return []
    return take(data.train, samples, seed=config.seed, key=SCORE_TRAIN_KEY, device=device,
                what="the training loader", max_bytes=SELECT_MAX_BYTES if selecting else None,
                min_samples=score.train_samples)


def check_reachable(space: PruningSpace, config: PruneConfig) -> None:
    """Fail before any work if the MACs target cannot be met at the minimum widths."""
    target = config.target.macs_reduction
    if target is None:
        return
    floor = space.relative_macs(space.lower)
    if floor > 1 - target + 1e-9:
        more = f" (kept whole as they are: {space.describe_kept_whole()})" if space.kept_whole else ""
        knobs = "min_ratio" + (f" or round_to={config.round_to}" if config.round_to > 1 else "") + (
            f" or the {len(config.ignored_layers)} ignored_layers" if config.ignored_layers else "")
        raise AutopruneError(f"macs_reduction={target} is unreachable: at the minimum widths the model keeps "
                             f"{floor:.1%} of its MACs (largest reduction {1 - floor:.3f}){more}; lower the "
                             f"target, {knobs}")


def make_plan(method: Method, setup: Setup, config: PruneConfig, train: Iterable[Any] | None,
              progress: bool) -> tuple[Plan, float]:
    """The method's plan and how long it took."""
    started = time.perf_counter()
    extra = config.finetune or autoprune.TrainConfig(epochs=1, lr=0.01)
    ctx = MethodContext(model=setup.base, space=setup.space, example_inputs=setup.example, train_loader=train,
                        device=setup.device, seed=config.seed,
                        train=replace(extra, lr=max(extra.lr, 0.01), seed=config.seed), progress=progress)
    plan = method.plan(ctx)
    return plan, time.perf_counter() - started


def make_problem(setup: Setup, plan: Plan, config: PruneConfig) -> Problem:
    """The search problem: the space's box and cost model (MACs, and predicted latency for a latency target),
    the target, the method's choices and penalty."""
    target, space = config.target, setup.space
    cost, ceiling = search_cost(space, target, setup.latency)
    return Problem(lower=space.lower, upper=space.upper, cost=cost, snap=space.snap,
                   base_accuracy=setup.base_score, max_cost=ceiling,
                   max_drop=None if target.max_drop is None else target.max_drop / 100,
                   choices=plan.choices, penalty=plan.penalty)


@dataclass
class SearchOutcome:
    """The search's chosen keep vector (None: nothing feasible), its statistics inputs and the evaluator."""

    keep: np.ndarray | None
    history: list[Evaluation]
    evaluator: Evaluator
    problem: Problem
    seconds: float
    budget: int
    selection: Selection | None = None


def search(setup: Setup, plan: Plan, config: PruneConfig, method: Method, data: Data, callbacks: CallbackList,
           recorded: Sequence[Evaluation] = (), progress: bool = False) -> SearchOutcome:
    """Run the plan's strategy on the evaluator; new evaluations go to the callbacks, ``recorded`` ones are replayed."""
    space = setup.space
    evaluator = Evaluator(plan.model, space, plan.scores, setup.val, setup.calibration, score_fn=data.score_fn,
                          score=setup.score, train=setup.train, seed=config.seed)
    with _forward_failures("while probing a half-width candidate before the search"):
        evaluator.physical = choose_physical(evaluator)
    for row in recorded:
        evaluator.prefill(row.counts, Fitness(row.accuracy, row.macs, row.params, row.value))
    problem = make_problem(setup, plan, config)
    strategy = create_strategy(plan.strategy, problem, seed=config.seed, **plan.strategy_options)
    budget = config.budget or method.default_budget
    history: list[Evaluation] = []
    started = time.perf_counter()
    bar = tqdm(total=budget, desc=f"search {method.name}", leave=False, disable=not progress or None)

    def record(x: np.ndarray, fitness: Fitness, score: float) -> None:
        row = Evaluation(len(history), tuple(float(v) for v in x), tuple(int(c) for c in space.counts(x)),
                         float(fitness.accuracy), int(fitness.macs), int(fitness.params), float(score),
                         time.perf_counter() - started, value=fitness.value,
                         latency_ms=None if setup.latency is None else setup.latency.predict(x))
        history.append(row)
        bar.update(1)
        callbacks.on_evaluation(row)
        if row.index >= len(recorded) and callbacks.should_stop():
            raise SearchInterrupted(f"interrupted after {row.index + 1} evaluations")

    try:
        # serial: one candidate at a time (progress and interruption per candidate); else a whole ask at once,
        # deduplicated against the evaluator's cache and told in ask order (see autoprune.engine.executor)
        with create_executor(config, evaluator) as executor, \
                _forward_failures(lambda: f"in evaluation {len(history) + 1} of the search"):
            if executor.parallel:
                result = run_search(strategy, budget=budget, on_result=record,
                                    evaluate_batch=BatchEvaluation(executor, plan.strategy))
            else:
                result = run_search(strategy, evaluator, budget=budget, on_result=record)
    finally:
        bar.close()
    keep = result.best_x
    return SearchOutcome(keep, history, evaluator, problem, time.perf_counter() - started, budget)


@contextlib.contextmanager
def _forward_failures(where: str | Callable[[], str], *, traced: bool = True) -> Iterator[None]:
    """The model's forward raising inside the block (:func:`~autoprune.engine.batches.forward_failure`) becomes one
    line naming ``where`` (a string, or a callable giving it when the failure happens); other errors pass.
    ``traced``: the model was traced already, so a trace failing (:class:`TraceFailed`) is its forward failing."""
    try:
        yield
    except Exception as exc:
        if traced and isinstance(exc, TraceFailed) and exc.__cause__ is not None:
            exc = exc.__cause__
        model = forward_failure(exc)
        if model is None:
            raise
        place = where() if callable(where) else where
        if "Expected more than 1 value per channel when training" in str(exc):
            raise AutopruneError(f"a batch of one sample reached a BatchNorm layer in training mode {place} "
                                 f"({model}): give the DataLoader drop_last=True (or a batch size that leaves no "
                                 "single-sample batch)") from exc
        raise AutopruneError(f"the model's forward ({model}) raised {type(exc).__name__} {place}: "
                             f"{first_line(exc, '(no message)')}; the forward must run on the unpruned model and on "
                             "every pruned one: fix it (or keep the layers it depends on whole with ignored_layers)"
                             ) from exc


def uniform_candidate(problem: Problem) -> np.ndarray | None:
    """The uniform-ratio candidate at the cost target (None in drop mode)."""
    if problem.max_cost is None:
        return None
    return Uniform(problem).ask()[0]


def refine(setup: Setup, outcome: SearchOutcome, config: PruneConfig) -> SearchOutcome:
    """Multi-fidelity selection: the ``select_top`` best distinct feasible structures of the search (by its score)
    and the uniform one, chosen among by successive halving of short fine-tunes (see
    :func:`autoprune.engine.scoring.successive_halving`). Runs only with a cost target, training data and
    a selection size of at least 2 (:func:`~autoprune.engine.scoring.selection_size`); otherwise, or with fewer
    than two structures, the outcome is returned as it is.
    """
    problem, evaluator = outcome.problem, outcome.evaluator
    top = selection_size(config.select_top, evaluator.candidate_score)
    if top < 2 or problem.max_cost is None or outcome.keep is None or not setup.train:
        return outcome
    space = setup.space
    candidates, seen = [], set()
    rows = sorted((row for row in outcome.history if problem.cost_ok(np.asarray(row.keep))), key=lambda r: -r.score)
    for keep in [outcome.keep, *(np.asarray(row.keep) for row in rows)]:
        key = evaluator.key(keep)
        if key not in seen and len(candidates) < top:
            seen.add(key)
            candidates.append(space.snap(keep))
    uniform = uniform_candidate(problem)
    if uniform is not None and evaluator.key(uniform) not in seen:
        candidates.append(space.snap(uniform))
    if len(candidates) < 2:
        return outcome
    cheap = evaluator.candidate_score
    selection = successive_halving(
        candidates, lambda keep, steps: evaluator.measure(keep, selection_score(cheap, steps, config.select_samples)),
        evaluator.key,
        steps=selection_steps(cheap, config.select_steps), eta=SELECT_ETA, metric=selection_score(cheap, 1).metric)
    log.info("selection: structure %d of %d chosen after %s fine-tuning steps (%.1f s)", selection.index + 1,
             len(candidates), "/".join(str(r.steps) for r in selection.rungs), selection.seconds)
    return replace(outcome, keep=selection.keep, selection=selection)


def select(setup: Setup, outcome: SearchOutcome, method: str) -> tuple[np.ndarray, bool, list[str]]:
    """The structure to prune to: the search's best; repaired onto the target when a path strategy stopped
    short; replaced by the uniform structure when the search's best is at chance and uniform is not.

    Returns:
        ``(keep, repaired, warnings)``.
    """
    problem, warnings, repaired = outcome.problem, [], False
    keep = outcome.keep
    if keep is None and problem.max_cost is not None and outcome.history:
        best_row = max(outcome.history, key=lambda row: row.score)
        keep, repaired = problem.repair(np.asarray(best_row.keep)), True
        warnings.append(f"the budget ended before {method} reached the MACs target; its best candidate was shrunk "
                        "onto the target (raise the budget to let the search finish)")
    if keep is None:
        raise AutopruneError("no candidate met the target within the budget (every candidate exceeded max_drop); "
                             "raise max_drop or the budget")
    keep = setup.space.snap(keep)
    if outcome.selection is not None:  # the uniform structure was among those fine-tuned and compared
        warnings += _selection_at_chance(setup, outcome.selection)
        for w in warnings:
            log.warning("%s", w)
        return keep, repaired, warnings
    chosen = outcome.evaluator(keep).accuracy
    fallback = uniform_candidate(problem)
    if setup.chance is not None and chosen <= setup.chance + 0.02 and fallback is not None:
        uniform = outcome.evaluator(fallback).accuracy
        if uniform > chosen + 0.02:
            warnings.append(f"the search's best candidate scored {chosen:.2%}, at chance level ({setup.chance:.2%}); "
                            f"the uniform structure scored {uniform:.2%} and was used instead")
            keep = setup.space.snap(fallback)
        else:
            warnings.append(f"the search's best candidate scored {chosen:.2%}, at chance level ({setup.chance:.2%}), "
                            f"and the uniform structure no better ({uniform:.2%}): the score cannot tell candidates "
                            "apart; use score='finetune' or select_top=8, or a smaller reduction")
    for w in warnings:
        log.warning("%s", w)
    return keep, repaired, warnings


def _selection_at_chance(setup: Setup, selection: Selection) -> list[str]:
    if setup.chance is None or selection.accuracy > setup.chance + 0.02:
        return []
    return [f"the selected structure scores {selection.accuracy:.2%} after {selection.rungs[-1].steps} fine-tuning "
            f"steps, at chance level ({setup.chance:.2%}); it was the best of the {len(selection.order)} structures "
            "compared (the uniform one among them): lower the reduction, or fine-tune longer"]


def finetune(pruned: nn.Module, setup: Setup, config: PruneConfig, data: Data, finetune_fn: FinetuneFn | None,
             callbacks: CallbackList, checkpoint: Path | None, progress: bool, extra_epochs: int = 0) -> FinetuneStats:
    """Fine-tune the pruned model in place: the caller's loop, or autoprune's by ``config.finetune`` less the
    ``extra_epochs`` the method already trained the network (``Method.extra_training_epochs``)."""
    started = time.perf_counter()
    if finetune_fn is not None:
        name = getattr(finetune_fn, "__name__", type(finetune_fn).__name__)
        before = _layout(pruned)
        pruned.train()
        try:
            finetune_fn(pruned)
        except AutopruneError:
            raise
        except Exception as exc:
            raise AutopruneError(f"finetune raised {type(exc).__name__}: {first_line(exc, '(no message)')}; fix your "
                                 f"fine-tuning function ({name}, called as finetune(model) with the pruned model in "
                                 "train mode)") from exc
        _check_finetuned(name, before, _layout(pruned), pruned)
        pruned.eval()
        return FinetuneStats(epochs=0, seconds=time.perf_counter() - started, custom=True)
    settings = config.finetune
    if settings is None or settings.epochs == 0:
        return FinetuneStats(epochs=0, seconds=0.0)
    settings = replace(settings, seed=config.seed, epochs=max(0, settings.epochs - extra_epochs))
    if settings.epochs == 0:
        return FinetuneStats(epochs=0, seconds=0.0)
    try:
        fit(pruned, data.train, settings, teacher=setup.base if settings.distill > 0 else None,
            checkpoint=checkpoint, progress=progress, desc="fine-tune", stop_requested=callbacks.should_stop,
            on_epoch=callbacks.on_finetune_epoch)
    except TrainingInterrupted as exc:
        raise SearchInterrupted("interrupted during fine-tuning (finished epochs are checkpointed)") from exc
    return FinetuneStats(epochs=settings.epochs, seconds=time.perf_counter() - started, lr=settings.lr,
                         distill=settings.distill)


def _layout(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]:
    """Shape, dtype and device of every parameter and buffer, by name: what a fine-tuning may not change."""
    return {n: (tuple(t.shape), t.dtype, t.device) for n, t in (*model.named_parameters(), *model.named_buffers())}


def _check_finetuned(name: str, before: dict[str, Any], after: dict[str, Any], model: nn.Module) -> None:
    """A caller's fine-tuning must train the pruned model in place: the same tensors (names and shapes, as the
    saved widths record them), dtype and device, and finite weights."""
    fix = f"make {name} train the model it is given in place, and change the result only after autoprune returns"
    changed = sorted(before.keys() ^ after.keys()) or [k for k in before if before[k][0] != after[k][0]]
    if changed:
        raise AutopruneError(f"finetune ({name}) changed the pruned model's layers ({short(changed)}); {fix}")
    moved = next((k for k in before if before[k][1:] != after[k][1:]), None)
    if moved is not None:
        (_, dtype, device), (_, dtype2, device2) = before[moved], after[moved]
        raise AutopruneError(f"finetune ({name}) turned {moved!r} from {dtype} on {device} into {dtype2} on "
                             f"{device2}; {fix}")
    broken = next((n for n, p in model.named_parameters()
                   if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if broken is not None:
        raise AutopruneError(f"finetune ({name}) left NaN or infinite values in {broken!r}; it diverged: lower its "
                             "learning rate")


def check_finetune(base: nn.Module, config: PruneConfig, data: Data, device: torch.device,
                   first: list[Batch], *, example: Inputs, outputs: Any = None) -> None:
    """Before any search: the built-in fine-tuning (``config.finetune``) has training data, and the model's outputs
    on it are what its cross-entropy reads (logits and integer class targets). ``first``: the training loader's
    first batch if already read (the calibration's; ``outputs`` the model's on it), else it is read here."""
    if config.finetune is None or config.finetune.epochs == 0:
        return
    if data.train is None:
        raise AutopruneError("fine-tuning needs training data: pass train_loader=, or finetune=None to get the "
                             "pruned model without fine-tuning (or finetune=your_function(model))")
    batch = first or take(data.train, 1, seed=config.seed, key=CALIBRATION_KEY, device=device,
                          what="the training loader")
    if not batch:
        raise AutopruneError("the training loader yielded no samples; pass a non-empty train_loader (or finetune=None)")
    inputs, targets = batch[0]
    if outputs is None or not first:
        outputs = forward_batch(base, inputs, "training batch 0", example)
    check_class_targets(outputs, targets, what="fine-tuning", fix=TRAINING_FIX)
    trained = [p for p in base.parameters() if p.requires_grad]
    if trained:  # a forward that autograd cannot run backward through fails here, not after the search
        with torch.enable_grad():
            loss = F.cross_entropy(forward(base, inputs), targets)
            gradients(loss, trained, "a check of the fine-tuning on training batch 0")


EMPTY_TEST = ("the test loader yielded no samples; pass a non-empty test_loader (or none: the validation batches "
              "are used)")


def _final_score(model: nn.Module, setup: Setup, data: Data, seed: int, *, shared: bool = True) -> float:
    if data.score_fn is not None:
        return measure_score(model, setup.val, data.score_fn)
    if data.test is not None:
        try:
            return evaluate(model, data.test, seed=seed, shared=shared, what="the test loader").accuracy
        except EmptyData as exc:
            raise AutopruneError(EMPTY_TEST) from exc
    return evaluate(model, setup.val).accuracy


def measure(setup: Setup, pruned: nn.Module, keep: np.ndarray, config: PruneConfig,
            scores: tuple[float, float]) -> tuple[ModelStats, ModelStats, dict[str, Any], str, bool, list[str]]:
    """Measure base and pruned: counted cost, size, latency (interleaved, on the run's device, with its spread);
    ``scores`` are their final accuracies (or scores), measured by every rank together (:func:`final_scores`).

    Returns:
        ``(base, pruned, speedup, latency device, analytic cost matches, warnings)``; a warning names every
        speed-up too noisy to trust.
    """
    base, example = setup.base, setup.example
    counted = [cost_of(m, example) for m in (base, pruned)]
    batches = sorted({1, config.latency_batch})
    timings = measure_latency([base, pruned], example, batch_sizes=batches, device=setup.device,
                              threads=config.threads, repeats=config.latency_repeats)
    stats = [ModelStats(accuracy=s, params=c.params, macs=c.macs, size_bytes=serialized_size(m),
                        latency=by_batch_json(t))
             for s, c, m, t in zip(scores, counted, (base, pruned), timings, strict=True)]
    ratios = speedups(timings[0], timings[1])
    warnings = [f"the speed-up at batch {b} ({r.ratio:.2f}x, interquartile range {r.q1:.2f}-{r.q3:.2f}) is too "
                "noisy to trust: the machine was busy; re-measure with `autoprune eval` on a quiet machine"
                for b, r in sorted(ratios.items()) if not r.reliable]
    reduction = config.target.latency_reduction
    final = ratios.get(config.latency_batch)
    if reduction is not None and final is not None and final.ratio < 1.0 / (1.0 - reduction):
        warnings.append(f"the final measurement shows a {final.ratio:.2f}x speed-up at batch {config.latency_batch} "
                        f"(95% interval {final.ci95[0]:.2f}-{final.ci95[1]:.2f}), short of the "
                        f"{1.0 / (1.0 - reduction):.2f}x that latency_reduction={reduction:g} asks: latency moves "
                        "with the machine's load; re-measure with `autoprune eval` on a quiet machine, or ask for a "
                        "larger reduction")
    analytic = setup.space.cost(keep)
    matches = (analytic.macs, analytic.params) == (counted[1].macs, counted[1].params)
    if not matches:
        log.warning("analytic cost %s differs from the counted %s", analytic, counted[1])
    device = device_description(setup.device, config.threads or torch.get_num_threads())
    return stats[0], stats[1], by_batch_json(ratios), device, matches, warnings


def final_scores(setup: Setup, pruned: nn.Module, data: Data, seed: int) -> tuple[float, float]:
    """Test accuracy (or score) of the base and the pruned model (under torchrun every rank takes part)."""
    return _final_score(setup.base, setup, data, seed), _final_score(pruned, setup, data, seed)


def _spread(history: Sequence[Evaluation]) -> tuple[int, float]:
    if not history:
        return 0, 0.0
    keeps = np.array([row.keep for row in history])
    return len({row.counts for row in history}), float(keeps.std(axis=0).mean())


@dataclass
class Decision:
    """What rank 0 decided: the pruned model (BatchNorm re-estimated, not fine-tuned) and how it was found."""

    pruned: nn.Module
    keep: np.ndarray
    before: float
    plan: Plan
    plan_seconds: float
    outcome: SearchOutcome
    best: Evaluation | None
    repaired: bool
    warnings: list[str]
    resumed: int


def digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 of tensors (names, shapes, dtypes and bytes): a resumed run checks with it that it continues with
    the model and the validation data it started with."""
    sha = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        sha.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        try:
            sha.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        except (RuntimeError, TypeError):  # a tensor type with no byte view (quantised, say): its values
            sha.update(repr(flat.tolist()).encode())
    return sha.hexdigest()


def _batch_tensors(batches: Sequence[Any]) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of a list of batches (tensors nested in tuples, lists and dicts), named by its position."""
    stack = [(f"{i}", batch) for i, batch in enumerate(batches)][::-1]
    while stack:
        name, item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield name, item
        elif isinstance(item, tuple | list):
            stack.extend((f"{name}.{j}", x) for j, x in reversed(list(enumerate(item))))
        elif isinstance(item, dict):
            stack.extend((f"{name}.{k}", item[k]) for k in reversed(list(item)))


def _samples(batches: Sequence[Any]) -> Iterable[tuple[str, torch.Tensor]]:
    """The tensors of a list of batches joined along the batch dimension, position by position, so that the
    same samples batched otherwise give the same tensors (batches of different structure: each on its own)."""
    parts = [[(name.partition(".")[2], t) for name, t in _batch_tensors([batch])] for batch in batches]
    positions = [name for name, _ in parts[0]] if parts else []
    if any([name for name, _ in p] != positions for p in parts) or \
            any(len({t.shape[1:] for t in ts}) > 1 or min(t.dim() for t in ts) == 0
                for ts in zip(*[[t for _, t in p] for p in parts], strict=True)):
        return list(_batch_tensors(batches))
    return [(name, torch.cat([p[i][1] for p in parts])) for i, name in enumerate(positions)]


def decide(setup: Setup, method: Method, config: PruneConfig, data: Data, callbacks: CallbackList,
           recorded: Sequence[Evaluation], progress: bool) -> Decision:
    """Plan, search and select a structure, then prune the model to it."""
    if config.target.latency_reduction is not None:
        setup.latency = _latency_table(setup, config, progress)
    plan, plan_seconds = make_plan(method, setup, config, data.train, progress)
    callbacks.on_start({"groups": [g.name for g in setup.space.groups], "base_score": setup.base_score,
                        "budget": config.budget or method.default_budget, "strategy": plan.strategy,
                        "model_digest": digest(setup.base.state_dict().items()),
                        "val_digest": digest(_samples(setup.val))})
    outcome = refine(setup, search(setup, plan, config, method, data, callbacks, recorded, progress), config)
    keep, repaired, warnings = select(setup, outcome, method.name)
    if setup.latency is not None:  # measured, not predicted: shrunk further while it misses the target
        checked = check_latency(setup.base, lambda k: setup.space.apply(plan.model, k, plan.scores), keep,
                                setup.space, setup.latency, config.target, setup.example, device=setup.device,
                                batch_size=config.latency_batch, threads=config.threads)
        keep, warnings = checked.keep, [*warnings, *checked.warnings]
        plan.notes.update(latency_check_speedup=checked.speedup.to_json(), latency_repairs=checked.rounds,
                          latency_predicted_relative=round(checked.predicted, 4))
    best = next((row for row in outcome.history if row.counts == tuple(setup.space.counts(keep))), None)
    callbacks.on_search_end(best)
    pruned = setup.space.apply(plan.model, keep, plan.scores)
    recalibrate_bn(pruned, setup.calibration)
    before = _final_score(pruned, setup, data, config.seed, shared=False)  # rank 0 alone under torchrun
    return Decision(pruned, keep, before, plan, plan_seconds, outcome, best, repaired, warnings, len(recorded))


def _latency_table(setup: Setup, config: PruneConfig, progress: bool) -> LatencyTable:
    """The latency table of the base model on the run's device; an unreachable latency target fails here."""
    table = latency_table(setup.base, setup.example, setup.space, device=setup.device,
                          batch_size=config.latency_batch, threads=config.threads, progress=progress)
    floor = table.predict_relative(setup.space.lower)
    reduction = config.target.latency_reduction
    if reduction is not None and floor > 1 - reduction:
        raise AutopruneError(f"latency_reduction={reduction} is unreachable: at the minimum widths the model is "
                             f"predicted at {floor:.0%} of its latency at batch {config.latency_batch} (largest "
                             f"reduction about {1 - floor:.2f}); lower the target or measure at a larger batch size")
    return table


@subnormals_flushed()
def run(model: nn.Module, example_inputs: Any, config: PruneConfig, method: Method, data: Data, *,
        device: torch.device, finetune_fn: FinetuneFn | None = None, callbacks: CallbackList | None = None,
        recorded: Sequence[Evaluation] = (), checkpoint: Path | None = None, progress: bool = False,
        info: dict[str, Any] | None = None) -> PruneResult:
    """Prune ``model`` by ``config`` and return the result; the caller's model is not modified.

    Under ``torchrun`` rank 0 decides the structure and broadcasts the pruned model, every rank fine-tunes it
    (:mod:`autoprune.engine.distributed`), and every rank returns rank 0's result. Gradients are on inside
    (also when called under ``torch.no_grad()`` or ``torch.inference_mode()``): methods and fine-tuning train.
    The pruned model comes back in eval mode (ready to measure, export or save, like :func:`autoprune.load`'s
    models), with the caller's frozen parameters (``requires_grad``) and memory format.

    Raises:
        SearchInterrupted: a callback asked to stop (the history so far was reported to the callbacks).
        AutopruneError: bad inputs, an unreachable target, or a method that cannot handle the model.
    """
    with torch.inference_mode(False), torch.enable_grad():
        result = _run(model, example_inputs, config, method, data, device=device, finetune_fn=finetune_fn,
                      callbacks=callbacks, recorded=recorded, checkpoint=checkpoint, progress=progress, info=info)
        _keep_memory_format(result.model, model)
    return result


def _keep_memory_format(pruned: nn.Module, model: nn.Module) -> None:
    """Give ``pruned`` the memory format of the caller's ``model`` (its frozen parameters it has from
    :meth:`PruningSpace.apply`)."""
    if any(p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)
           for p in model.parameters()):
        pruned.to(memory_format=torch.channels_last)


def _run(model: nn.Module, example_inputs: Any, config: PruneConfig, method: Method, data: Data, *,
         device: torch.device, finetune_fn: FinetuneFn | None, callbacks: CallbackList | None,
         recorded: Sequence[Evaluation], checkpoint: Path | None, progress: bool,
         info: dict[str, Any] | None) -> PruneResult:
    started = time.perf_counter()
    callbacks = callbacks or CallbackList()
    here = world()
    with _forward_failures("while the unpruned model was checked and scored", traced=False):
        setup = prepare(model, example_inputs, config, data, device, builtin_finetune=finetune_fn is None)
    decided: list[Decision] = []  # rank 0's decision; its pruned model (or its error) reaches every rank

    def decide_on_main() -> nn.Module:
        decided.append(decide(setup, method, config, data, callbacks, recorded, progress))
        return decided[0].pruned

    with _forward_failures("while the method planned, searched for and applied the structure"):
        pruned = on_main(decide_on_main).to(setup.device)
    decision = decided[0] if decided else None
    with _forward_failures("during fine-tuning"):
        ft = finetune(pruned, setup, config, data, finetune_fn, callbacks, checkpoint, progress,
                      method.extra_training_epochs)
    with _forward_failures("while the final models were measured"):
        scores = final_scores(setup, pruned.eval(), data, config.seed)
        result = on_main(lambda: _result(setup, decision, pruned, ft, scores, method, config, data, started, info))
    if here.main:
        callbacks.on_end(result)
    return result


def _result(setup: Setup, decision: Decision, pruned: nn.Module, ft: FinetuneStats, scores: tuple[float, float],
            method: Method, config: PruneConfig, data: Data, started: float,
            info: dict[str, Any] | None) -> PruneResult:
    keep = decision.keep
    base_stats, pruned_stats, speedup, latency_device, matches, noisy = measure(setup, pruned, keep, config, scores)
    warnings = decision.warnings + noisy + _check_alive(base_stats.accuracy, pruned_stats.accuracy, setup.chance,
                                                method.name, fine_tuned=ft.custom or ft.epochs > 0)
    search_stats = _search_stats(setup, decision.plan, config, decision.outcome, decision.plan_seconds, keep,
                                 decision.best, decision.resumed, decision.repaired)
    return PruneResult(
        model=pruned, method=method.name, source=method.source,
        metric="score" if data.score_fn is not None else "accuracy", target=config.target, seed=config.seed,
        base=base_stats, pruned=pruned_stats,
        widths=tuple(LayerWidth(**row) for row in setup.space.describe(keep)), keep=tuple(map(float, keep)),
        speedup=speedup, latency_device=latency_device, search=search_stats,
        finetune=replace(ft, accuracy_before=decision.before, world_size=world().size), config=config,
        history=decision.outcome.history, analytic_cost_matches=matches, seconds=time.perf_counter() - started,
        info={**(info or {}), "versions": _versions()}, warnings=tuple(warnings))


def _search_stats(setup: Setup, plan: Plan, config: PruneConfig, outcome: SearchOutcome, plan_seconds: float,
                  keep: np.ndarray, best: Evaluation | None, resumed: int, repaired: bool) -> SearchStats:
    if best is None:  # the uniform fallback, or a repaired candidate: not one of the history's rows
        fitness = outcome.evaluator(keep)
        best = Evaluation(-1, tuple(map(float, keep)), tuple(int(c) for c in setup.space.counts(keep)),
                          fitness.accuracy, int(fitness.macs), int(fitness.params),
                          outcome.problem.score(keep, fitness))
    distinct, spread = _spread(outcome.history)
    return SearchStats(
        strategy=plan.strategy, score=config.score, budget=outcome.budget, evaluations=len(outcome.history),
        unique_evaluations=outcome.evaluator.evaluations, distinct_structures=distinct, spread=spread,
        seconds=outcome.seconds, plan_seconds=plan_seconds, base_score=setup.base_score, best=best,
        resumed_evaluations=resumed, repaired_to_target=repaired, executor=config.executor_kind,
        workers=config.workers, threads_per_worker=threads_per_worker(config),
        selection=None if outcome.selection is None else outcome.selection.describe(),
        notes={**plan.notes, "extra_training_epochs": plan.extra_training_epochs,
               "score": outcome.evaluator.candidate_score.describe()})


def _check_alive(base: float | None, accuracy: float | None, chance: float | None, method: str, *,
                 fine_tuned: bool) -> list[str]:
    """Never return a fine-tuned model at chance level as a success (the majority-class rate of the validation
    data); a structure returned without fine-tuning (``finetune=None``) may score low, and gets a warning."""
    if accuracy is None or chance is None or accuracy > chance + 0.01:
        return []
    if not fine_tuned:
        return [f"the pruned structure scores {accuracy:.2%} before any fine-tuning (chance level {chance:.2%}); "
                "fine-tune it before use"]
    if base is not None and base <= chance + 0.01:
        raise AutopruneError(f"the unpruned model itself scores {base:.2%}, at chance level ({chance:.2%}) on this "
                             "data: train it first (or check that the data is what it was trained on)")
    raise AutopruneError(f"the pruned model ({method}) scores {accuracy:.2%} after fine-tuning, at chance level "
                         f"({chance:.2%}); nothing was saved: lower the target, raise the budget or fine-tune longer")


def _versions() -> dict[str, str]:
    return {"autoprune": autoprune.__version__, "torch": torch.__version__,
            "torch_pruning": getattr(tp, "__version__", "unknown")}
