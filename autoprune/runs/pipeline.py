"""The end-to-end jobs: train a base model, and prune one (plan, search, surgery, fine-tune, measure, save).

The pruning job is the same for every method. Everything it writes goes into one output directory:

* ``history.jsonl``: every candidate evaluation of the search (keep vector, channel counts, fitness,
  score, seconds), appended and flushed as it happens;
* ``run.json``: the resolved configuration, written before any long work, so ``--resume`` can
  continue an interrupted run;
* ``work/``: the fine-tuning checkpoint (removed when the run completes);
* ``model.pt``, ``report.json``, ``report.md``: the results, written atomically at the end.

Resuming replays the recorded evaluations into a fresh strategy with the same seed (strategies are
deterministic given their seed and the values told), so a resumed search reaches the same result as
an uninterrupted one; fine-tuning resumes from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from tqdm.auto import tqdm

import autoprune
from autoprune.io.artifact import make_spec, save_model, write_json, write_text
from autoprune.data import Splits
from autoprune.errors import AutopruneError, Interrupted
from autoprune.engine.evaluate import Evaluator, calibration_images, recalibrate_bn
from autoprune.engine.measure import compare_latency, cost_of, serialized_size
from autoprune.methods import MethodContext, create_method
from autoprune.models import NormalizedModel, create_model
from autoprune.search import Fitness, Problem, create_strategy, run_search
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import TrainConfig, TrainingInterrupted, evaluate, fit, subnormals_flushed

log = logging.getLogger(__name__)


class SearchInterrupted(Interrupted):
    """The search was stopped on request; the output directory can be resumed."""


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a pruning run (saved as ``run.json``).

    Attributes:
        method: registered method name.
        macs_reduction: target: remove at least this fraction of the MACs (exclusive with max_drop).
        max_drop: target: remove as many MACs as possible with at most this many points of validation
            accuracy lost.
        budget: candidate evaluations allowed (default: the method's).
        finetune: fine-tuning settings (epochs 0 = none; ``distill`` > 0 distils from the unpruned model).
        extra_epochs: epochs of a method's own extra training (slim, sa).
        method_options: method-specific options.
        val_samples: validation images used to score candidates (default: the whole validation split).
        calibration_samples: training images for BatchNorm recalibration of each candidate.
        round_to: channel counts are multiples of this.
        min_ratio: each group keeps at least this fraction of its channels.
        seed: seed for everything random.
        latency_batch: the large batch size of the latency measurement (batch 1 is always measured).
        latency_repeats: timed runs per model and batch size.
        threads: CPU threads for the latency measurement (default: torch's current setting).
    """

    method: str
    macs_reduction: float | None = None
    max_drop: float | None = None
    budget: int | None = None
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.01, batch_size=128))
    extra_epochs: int = 1
    method_options: dict[str, Any] = field(default_factory=dict)
    val_samples: int | None = None
    calibration_samples: int = 512
    round_to: int = 1
    min_ratio: float = 0.05
    seed: int = 0
    latency_batch: int = 256
    latency_repeats: int = 30
    threads: int | None = None

    def __post_init__(self) -> None:
        create_method(self.method)  # an unknown name fails here, listing the valid ones
        if (self.macs_reduction is None) == (self.max_drop is None):
            raise AutopruneError("give exactly one target: --macs-reduction R (0 < R < 1) or --max-drop PP")
        if self.macs_reduction is not None and not 0 < self.macs_reduction < 1:
            raise AutopruneError(f"--macs-reduction must lie strictly between 0 and 1, got {self.macs_reduction} "
                                 "(0.5 removes half of the MACs)")
        if self.max_drop is not None and not 0 <= self.max_drop <= 100:
            raise AutopruneError(f"--max-drop is in accuracy points, between 0 and 100; got {self.max_drop}")
        for name in ("budget", "val_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise AutopruneError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("extra_epochs", "calibration_samples", "seed"):
            if getattr(self, name) < 0:
                raise AutopruneError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("latency_batch", "latency_repeats"):  # the median of no timed runs does not exist
            if getattr(self, name) < 1:
                raise AutopruneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise AutopruneError(f"--threads must be >= 1, got {self.threads}")
        if self.round_to < 1:
            raise AutopruneError(f"--round-to must be >= 1, got {self.round_to}")
        if not 0 <= self.min_ratio < 1:
            raise AutopruneError(f"--min-ratio must lie in [0, 1), got {self.min_ratio}")

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible form (``from_json`` inverts it)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneConfig:
        """Rebuild a config saved by :meth:`to_json`."""
        try:
            data = dict(data)
            data["finetune"] = TrainConfig(**data["finetune"])
            return cls(**data)
        except AutopruneError:  # a bad value: its own message says which
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise AutopruneError(f"saved run configuration is damaged or from another version "
                                 f"({type(exc).__name__}: {exc}); start a new run") from exc


# ---- training a base model ---------------------------------------------------------------------

def build_model(name: str, splits: Splits, **kwargs: Any) -> tuple[NormalizedModel, dict[str, Any]]:
    """A fresh model for ``splits``' dataset, with normalisation inside, and its spec."""
    info = splits.info
    args: dict[str, Any] = {"num_classes": info.num_classes, "in_channels": info.in_channels,
                            "image_size": tuple(info.image_size), **kwargs}
    net = create_model(name, **args)
    model = NormalizedModel(net, info.mean, info.std)
    try:  # one image through the fresh model: an architecture that cannot take the data fails here, not mid-training
        with torch.no_grad():
            logits = model.eval()(torch.rand(1, info.in_channels, *info.image_size))
    except Exception as exc:
        raise AutopruneError(f"model {name!r} cannot take {info.in_channels}x{info.image_size[0]}x"
                             f"{info.image_size[1]} images of dataset {info.name!r} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); choose a model for this image size"
                             ) from exc
    finally:
        model.train()
    shape = tuple(getattr(logits, "shape", ()))
    if shape != (1, info.num_classes):
        raise AutopruneError(f"model {name!r} outputs shape {shape} for one image, but dataset {info.name!r} has "
                             f"{info.num_classes} classes; its factory must honour num_classes")
    spec = make_spec(model, name=name, args=args, dataset=info.name, classes=list(info.classes))
    return model, spec


def check_compatible(spec: dict[str, Any], splits: Splits, path: str) -> None:
    """The saved model must accept the dataset's images and predict its classes."""
    info = splits.info
    args = spec.get("args", {})
    want = {"in_channels": info.in_channels, "num_classes": info.num_classes}
    for key, value in want.items():
        if key in args and int(args[key]) != value:
            raise AutopruneError(f"model {path!r} has {key}={args[key]} but dataset {info.name!r} has {value}; "
                                 "use the dataset the model was trained on")
    if "image_size" in args and tuple(args["image_size"]) != tuple(info.image_size):
        raise AutopruneError(f"model {path!r} expects {tuple(args['image_size'])} images, dataset {info.name!r} "
                             f"has {tuple(info.image_size)}")


def train_base(model_name: str, splits: Splits, config: TrainConfig, out: Path, *, device: torch.device,
               progress: bool = True, model_kwargs: dict[str, Any] | None = None,
               stop_requested: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train a model from scratch and save it to ``out``; returns a summary.

    Every epoch is checkpointed to ``out`` + ``.ckpt``; a run started again with the same settings resumes
    from it. ``stop_requested`` is polled after each epoch (raising :class:`TrainingInterrupted`).
    """
    torch.manual_seed(config.seed)  # the initial weights too follow the seed, not what ran before in the process
    model, spec = build_model(model_name, splits, **(model_kwargs or {}))
    model.to(device)
    checkpoint = out.with_name(out.name + ".ckpt")
    started = time.perf_counter()
    fit(model, splits.train, config, augment=splits.info.augment, checkpoint=checkpoint, progress=progress,
        stop_requested=stop_requested)
    seconds = time.perf_counter() - started
    val = evaluate(model, splits.val) if len(splits.val) else None
    test = evaluate(model, splits.test)
    save_model(out, model.cpu(), {**spec, "trained": {"epochs": config.epochs, "lr": config.lr,
                                                      "seed": config.seed, "test_accuracy": test.accuracy}})
    checkpoint.unlink(missing_ok=True)
    return {"model": model_name, "dataset": splits.info.name, "epochs": config.epochs, "seconds": seconds,
            "val_accuracy": val.accuracy if val else None, "test_accuracy": test.accuracy,
            "params": sum(p.numel() for p in model.parameters()), "out": str(out)}


# ---- pruning -----------------------------------------------------------------------------------

def prepare_output(out: Path, *, force: bool, resume: bool) -> None:
    """Refuse to overwrite an existing run unless asked to."""
    if resume:
        if not (out / "run.json").exists():
            raise AutopruneError(f"nothing to resume in {str(out)!r}: it has no run.json (was it made by "
                                 "`autoprune prune --out`?)")
        return
    if out.exists() and not out.is_dir():
        raise AutopruneError(f"--out {str(out)!r} is a file; give a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise AutopruneError(f"output directory {str(out)!r} already exists and is not empty; pass --force "
                                 "to overwrite it, --resume to continue it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _load_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a hard kill: everything before it is intact
            if not isinstance(row, dict) or not {"counts", "accuracy", "macs", "params"} <= row.keys():
                break  # not a row this code wrote
            rows.append(row)
    return rows


def pruning_space(model: NormalizedModel, splits: Splits, config: PruneConfig) -> PruningSpace:
    """The pruning space of ``model`` for ``splits``' image shape and ``config``'s width rules."""
    info = splits.info
    example = torch.rand(1, info.in_channels, *info.image_size, device=next(model.parameters()).device)
    return PruningSpace(model, example, round_to=config.round_to, min_ratio=config.min_ratio)


def check_reachable(space: PruningSpace, config: PruneConfig) -> None:
    """Fail before any work if the MACs target cannot be met at the minimum widths."""
    if config.macs_reduction is None:
        return
    floor = space.relative_macs(space.lower)
    if floor > 1 - config.macs_reduction:
        raise AutopruneError(f"--macs-reduction {config.macs_reduction} is unreachable: at the minimum widths "
                             f"the model keeps {floor:.1%} of its MACs (max reduction {1 - floor:.3f}); "
                             "lower the target or --min-ratio")


@subnormals_flushed()
def prune_model(model: NormalizedModel, spec: dict[str, Any], splits: Splits, config: PruneConfig, out: Path, *,
                device: torch.device, progress: bool = True, resume: bool = False,
                stop_requested: Callable[[], bool] | None = None,
                invocation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prune ``model`` by ``config`` into ``out`` and return the report (also saved there).

    Raises:
        SearchInterrupted: ``stop_requested()`` became true during the search (``out`` can be resumed).
        AutopruneError: an impossible target or a method that cannot handle the model.
    """
    started = time.perf_counter()
    method = create_method(config.method)
    budget = config.budget or method.default_budget
    info = splits.info
    if len(splits.val) == 0:
        raise AutopruneError("the validation split is empty (--val-fraction 0 or a tiny --limit), but the search "
                             "scores candidates on it; use --val-fraction 0.1 or a larger --limit")
    model = model.to(device).eval()
    space = pruning_space(model, splits, config)
    check_reachable(space, config)
    write_json(out / "run.json", {"config": config.to_json(), "invocation": invocation or {}, "spec": spec})

    ctx = MethodContext(model=model, space=space, splits=splits, device=device, seed=config.seed,
                        train=replace(config.finetune, lr=max(config.finetune.lr, 0.01), seed=config.seed),
                        extra_epochs=config.extra_epochs, options=config.method_options, progress=progress)
    plan_started = time.perf_counter()
    plan = method.plan(ctx)
    plan_seconds = time.perf_counter() - plan_started

    val = splits.val
    if config.val_samples is not None and config.val_samples < len(val):
        val = val.subset(torch.randperm(len(val), generator=torch.Generator().manual_seed(config.seed))
                         [: config.val_samples])
    calibration = calibration_images(splits.train, config.calibration_samples, config.seed)
    evaluator = Evaluator(plan.model, space, plan.scores, val, calibration)
    history_path = out / "history.jsonl"
    recorded = _load_history(history_path) if resume else []
    if resume:  # keep only the intact rows, so that nothing is appended to a line torn by a hard kill
        write_text(history_path, "".join(json.dumps(row) + "\n" for row in recorded))
    for row in recorded:
        evaluator.prefill(row["counts"], Fitness(row["accuracy"], row["macs"], row["params"]))
    base_val = evaluator(space.upper)
    problem = Problem(lower=space.lower, upper=space.upper, cost=space.relative_macs, snap=space.snap,
                      base_accuracy=base_val.accuracy,
                      max_cost=None if config.macs_reduction is None else 1 - config.macs_reduction,
                      max_drop=None if config.max_drop is None else config.max_drop / 100,
                      choices=plan.choices, penalty=plan.penalty)
    strategy = create_strategy(plan.strategy, problem, seed=config.seed, **plan.strategy_options)

    search_started = time.perf_counter()
    bar = tqdm(total=budget, desc=f"search {config.method}", leave=False, disable=not progress or None)
    counter = {"n": 0}
    with open(history_path, "a" if resume else "w", encoding="utf-8") as history:
        def record(x: np.ndarray, fitness: Fitness, score: float) -> None:
            i = counter["n"]
            counter["n"] += 1
            bar.update(1)
            best = strategy.best
            if best is not None:
                bar.set_postfix(best=f"{best[1]:.4f}")
            if i >= len(recorded):
                row = {"i": i, "keep": [round(float(v), 6) for v in x],
                       "counts": [int(c) for c in space.counts(x)], "accuracy": fitness.accuracy,
                       "macs": fitness.macs, "params": fitness.params, "score": score,
                       "seconds": round(time.perf_counter() - search_started, 3)}
                history.write(json.dumps(row) + "\n")
                history.flush()
            if stop_requested is not None and stop_requested():
                raise SearchInterrupted(f"interrupted after {i + 1} evaluations; continue with "
                                        f"`autoprune prune --resume {out}`")

        try:
            result = run_search(strategy, evaluator, budget=budget, on_result=record)
        finally:
            bar.close()
    search_seconds = time.perf_counter() - search_started
    best_x, repaired = result.best_x, False
    if best_x is None and problem.max_cost is not None and result.history:
        # A path strategy (greedy) stopped by the budget before reaching the MACs target: take its best
        # candidate and shrink it uniformly onto the budget (never an over-budget model).
        best_x = problem.repair(max(result.history, key=lambda row: row[2])[0])
        repaired = True
        log.warning("the budget ended before %s reached the MACs target; its best candidate was shrunk onto the "
                    "target (raise --budget to let the search finish)", config.method)
    if best_x is None:
        raise AutopruneError("no candidate met the target within the budget (every candidate exceeded "
                             "--max-drop); raise --max-drop or --budget")
    keep = space.snap(best_x)
    best_fitness = evaluator(keep)

    # ---- surgery, fine-tuning, measurement -----------------------------------------------------
    pruned = space.apply(plan.model, keep, plan.scores)
    recalibrate_bn(pruned, calibration)
    before_ft = evaluate(pruned, splits.test).accuracy
    finetune = replace(config.finetune, seed=config.seed)
    ft_started = time.perf_counter()
    (out / "work").mkdir(exist_ok=True)
    try:
        fit(pruned, splits.train, finetune, augment=info.augment, teacher=model if finetune.distill > 0 else None,
            checkpoint=out / "work" / "finetune.ckpt", progress=progress, desc="fine-tune",
            stop_requested=stop_requested)
    except TrainingInterrupted as exc:
        raise SearchInterrupted("interrupted during fine-tuning (finished epochs are checkpointed); continue "
                                f"with `autoprune prune --resume {out}`") from exc
    ft_seconds = time.perf_counter() - ft_started
    pruned.eval()

    report = _measure(model, pruned, splits, config, space, keep)
    report["pruned"]["accuracy_before_finetune"] = before_ft
    report["pruned"]["val_accuracy_search"] = best_fitness.accuracy
    report.update({
        "method": config.method, "source": method.source, "seed": config.seed,
        "model": spec.get("model"), "dataset": info.name,
        "target": ({"macs_reduction": config.macs_reduction} if config.macs_reduction is not None
                   else {"max_drop_points": config.max_drop}),
        "search": {"strategy": plan.strategy, "budget": budget, "evaluations": result.evaluations,
                   "unique_evaluations": evaluator.evaluations, "seconds": round(search_seconds, 3),
                   "plan_seconds": round(plan_seconds, 3), "base_val_accuracy": base_val.accuracy,
                   "best_fitness": {"accuracy": best_fitness.accuracy, "macs": best_fitness.macs,
                                    "params": best_fitness.params, "score": result.best_score},
                   "resumed_evaluations": len(recorded), "repaired_to_target": repaired},
        "finetune": {"epochs": finetune.epochs, "seconds": round(ft_seconds, 3), "lr": finetune.lr,
                     "distill": finetune.distill},
        "plan": plan.notes,
        "config": config.to_json(),
        "seconds": round(time.perf_counter() - started, 3),
        "versions": {"autoprune": autoprune.__version__, "torch": torch.__version__,
                     "torch_pruning": getattr(tp, "__version__", "unknown")},
    })
    pruned_spec = {**spec, "pruned": {"method": config.method, "keep": [float(v) for v in keep],
                                      "base_macs": space.base_macs, "base_params": space.base_params}}
    save_model(out / "model.pt", pruned.cpu(), pruned_spec)
    report["pruned"]["size_bytes"] = (out / "model.pt").stat().st_size
    report["reduction"]["size"] = 1 - report["pruned"]["size_bytes"] / report["base"]["size_bytes"]
    from autoprune.report import write_reports  # the report layer sits above the pipeline

    write_reports(out, report)
    shutil.rmtree(out / "work", ignore_errors=True)
    return report


def _measure(base: NormalizedModel, pruned: NormalizedModel, splits: Splits, config: PruneConfig,
             space: PruningSpace, keep: np.ndarray) -> dict[str, Any]:
    info = splits.info
    shape = (info.in_channels, *info.image_size)
    base_cost, pruned_cost = cost_of(base, shape), cost_of(pruned, shape)
    analytic = space.cost(keep)
    if (analytic.macs, analytic.params) != (pruned_cost.macs, pruned_cost.params):
        log.warning("analytic cost %s differs from the counted %s", analytic, pruned_cost)
    base_acc, pruned_acc = evaluate(base, splits.test).accuracy, evaluate(pruned, splits.test).accuracy
    cpu_base, cpu_pruned = base.cpu(), pruned.cpu()
    batches = (1, config.latency_batch)
    lat_base, lat_pruned = compare_latency([cpu_base, cpu_pruned], shape, batch_sizes=batches,
                                           repeats=config.latency_repeats, threads=config.threads)

    def side(acc: float, cost: Any, lat: Any, size: int) -> dict[str, Any]:
        return {"accuracy": acc, "params": cost.params, "macs": cost.macs,
                "latency_ms": {str(b): round(lat.ms[b], 4) for b in batches}, "size_bytes": size}

    base_size = serialized_size(cpu_base)
    return {
        "base": side(base_acc, base_cost, lat_base, base_size),
        "pruned": side(pruned_acc, pruned_cost, lat_pruned, serialized_size(cpu_pruned)),
        "reduction": {"macs": 1 - pruned_cost.macs / base_cost.macs,
                      "params": 1 - pruned_cost.params / base_cost.params},
        "speedup": {str(b): round(lat_base.ms[b] / lat_pruned.ms[b], 3) for b in batches},
        "accuracy_change_points": round(100 * (pruned_acc - base_acc), 3),
        "analytic_cost_matches": (analytic.macs, analytic.params) == (pruned_cost.macs, pruned_cost.params),
        "layers": space.describe(keep),
        "latency": {"device": lat_base.device, "threads": lat_base.threads, "repeats": config.latency_repeats,
                    "warmup": 10, "statistic": "median", "batch_sizes": list(batches), "interleaved": True},
    }
