"""What decides a pruning run: the :class:`Target` and the :class:`PruneConfig`, each validated once.

Both are frozen values with a JSON form (``run.json`` and ``report.json`` hold them; ``--resume`` reads
them back). Errors are :class:`~autoprune.errors.ConfigError`\\ s naming the setting as Python spells it;
the CLI re-words them with its flag names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Integral, Real
from typing import Any

from autoprune.checks import MAX_COUNT
from autoprune.engine.scoring import (
    DEFAULT_SCORE,
    DEFAULT_SELECT_SAMPLES,
    DEFAULT_SELECT_STEPS,
    DEFAULT_SELECT_TOP,
    create_score,
    score_names,
)
from autoprune.engine.train import TrainConfig
from autoprune.errors import AutopruneError, ConfigError

#: Largest seed accepted anywhere (numpy and torch both take 64-bit seeds).
MAX_SEED = 2**63 - 1


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a real number (numpy scalars included, bools not), else None."""
    return None if isinstance(value, bool) or not isinstance(value, Real) else float(value)


def _fraction(name: str, value: Any) -> float:
    number = _number(value)
    if number is None:
        raise ConfigError(name, value, "must be a number strictly between 0 and 1 (0.5 removes half)")
    if not 0 < number < 1:
        raise ConfigError(name, value, "must lie strictly between 0 and 1 (0.5 removes half)")
    return number


@dataclass(frozen=True)
class Target:
    """What the pruned network must achieve.

    Attributes:
        macs_reduction: remove at least this fraction of the MACs (0 < R < 1).
        latency_reduction: the pruned model's measured latency at the latency batch size is at most
            ``1 - R`` times the base's (0 < R < 1); may be combined with ``macs_reduction``.
        max_drop: instead of a cost target: remove as many MACs as possible while the validation
            accuracy (or score) drops by at most this many points (0-100; a point is 0.01 of the score).
    """

    macs_reduction: float | None = None
    latency_reduction: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        if self.macs_reduction is None and self.latency_reduction is None and self.max_drop is None:
            raise ConfigError("target", None, "give a target: macs_reduction=R, latency_reduction=R (0 < R < 1) "
                                              "or max_drop=PP (accuracy points)")
        if self.max_drop is not None and (self.macs_reduction is not None or self.latency_reduction is not None):
            raise ConfigError("max_drop", self.max_drop, "cannot be combined with macs_reduction or "
                                                         "latency_reduction; give one kind of target")
        if self.macs_reduction is not None:
            object.__setattr__(self, "macs_reduction", _fraction("macs_reduction", self.macs_reduction))
        if self.latency_reduction is not None:
            object.__setattr__(self, "latency_reduction", _fraction("latency_reduction", self.latency_reduction))
        if self.max_drop is not None:
            value = _number(self.max_drop)
            if value is None or not 0 <= value <= 100:
                raise ConfigError("max_drop", self.max_drop, "is in accuracy points, a number between 0 and 100")
            object.__setattr__(self, "max_drop", value)

    @property
    def mode(self) -> str:
        """``"cost"`` (MACs and/or latency ceilings) or ``"drop"`` (an accuracy-drop ceiling)."""
        return "drop" if self.max_drop is not None else "cost"

    def describe(self) -> str:
        """The target in words, e.g. ``remove at least 80% of the MACs``."""
        parts = []
        if self.macs_reduction is not None:
            parts.append(f"remove at least {_pct(self.macs_reduction)} of the MACs")
        if self.latency_reduction is not None:
            parts.append(f"cut the measured latency by at least {_pct(self.latency_reduction)}")
        if self.max_drop is not None:
            parts.append(f"remove as many MACs as possible losing at most {self.max_drop:g} accuracy points")
        return " and ".join(parts)

    def to_json(self) -> dict[str, float]:
        """The target's set fields."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Target:
        """Inverse of :meth:`to_json`."""
        if not isinstance(data, Mapping) or not set(data) <= {f.name for f in fields(cls)}:
            raise AutopruneError(f"saved target {data!r} is not a target of this version")
        return cls(**data)


def _pct(value: float) -> str:
    return f"{100 * value:.4g}%"


def _int(name: str, value: Any, minimum: int, maximum: int = MAX_SEED, *, optional: bool = False) -> Any:
    """``value`` as an int (numpy integers included) if it lies in ``[minimum, maximum]``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral) or not minimum <= value <= maximum:
        too_large = isinstance(value, Integral) and not isinstance(value, bool) and value > maximum
        bound = f"between {minimum} and {maximum}" if maximum < MAX_SEED or too_large else f">= {minimum}"
        raise ConfigError(name, value, f"must be an integer {bound}")
    return int(value)


#: Settings a resumed run may change: how it fine-tunes, computes and measures, not what its search evaluates
#: (every executor gives the same history).
#: The fine-tuning settings a method's own training inherits (``MethodContext.training``).
PLAN_TRAINING = ("lr", "batch_size", "momentum", "weight_decay", "warmup_epochs")
RESUMABLE_CHANGES = ("finetune", "latency_batch", "latency_repeats", "threads", "workers", "executor", "ray_address",
                     "threads_per_worker")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides a pruning run, besides the model and the data.

    Attributes:
        method: registered method name (its options in ``method_options``).
        method_options: the method's keyword options (see ``autoprune methods``).
        target: what the pruned network must achieve.
        budget: candidate evaluations allowed (default: the method's).
        score: how a candidate is scored during the search: a name in
            :data:`autoprune.engine.scoring.SCORES` (``none``, ``bn``, ``loss``, ``kl``, ``finetune``).
        score_options: the score's keyword options (e.g. ``{"steps": 100}`` for ``finetune``).
        select_top: multi-fidelity selection after the search: the ``select_top`` best distinct structures
            (by the score) and the uniform one are briefly fine-tuned and halved until one is left
            (:func:`autoprune.engine.scoring.successive_halving`); 0 or 1: keep the search's best; None (the
            default): 4 when the candidate score is a short fine-tune (``auto`` on a network without BatchNorm),
            else 0 (:func:`~autoprune.engine.scoring.selection_size`). Only with a cost target and training data.
        select_steps: fine-tuning steps of the selection's first rung (each later rung multiplies them by
            :data:`~autoprune.engine.scoring.SELECT_ETA`; a ``finetune`` score starts them at ``eta`` times its own).
        select_samples: training samples held in memory for the selection's rungs (at most 1 GiB of inputs,
            :data:`~autoprune.engine.scoring.SELECT_MAX_BYTES`): each rung step takes the next batch and cycles
            only past them, where the cheap score cycles its own ``samples``.
        finetune: fine-tuning of the pruned network (None: none; epochs 0 is the same).
        round_to: kept channel counts are multiples of this.
        min_ratio: each group keeps at least this fraction of its channels.
        ignored_layers: qualified module names whose output channels are never pruned.
        val_samples: validation samples used to score candidates (default: every batch of the loader).
        calibration_samples: training samples for BatchNorm re-estimation of each candidate.
        seed: seed of everything random in the run.
        latency_batch: the large batch size of latency measurements (batch 1 is always measured too).
        latency_repeats: timed runs per model and batch size.
        threads: CPU threads for latency measurement (default: torch's current setting).
        workers: processes evaluating candidates in parallel (1: in this process).
        executor: ``"auto"`` (serial for one worker, else a process pool), ``"serial"``, ``"pool"`` or ``"ray"``.
        ray_address: Ray cluster to use (``"auto"``, ``"local"`` or an address); implies ``executor="ray"``.
        threads_per_worker: torch threads in each worker (default: cores divided by workers).
    """

    method: str
    target: Target
    method_options: Mapping[str, Any] = field(default_factory=dict)
    budget: int | None = None
    score: str = DEFAULT_SCORE
    score_options: Mapping[str, Any] = field(default_factory=dict)
    select_top: int | None = DEFAULT_SELECT_TOP
    select_steps: int = DEFAULT_SELECT_STEPS
    select_samples: int = DEFAULT_SELECT_SAMPLES
    finetune: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.01))
    round_to: int = 1
    min_ratio: float = 0.05
    ignored_layers: tuple[str, ...] = ()
    val_samples: int | None = None
    calibration_samples: int = 512
    seed: int = 0
    latency_batch: int = 64
    latency_repeats: int = 30
    threads: int | None = None
    workers: int = 1
    executor: str = "auto"
    ray_address: str | None = None
    threads_per_worker: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError("method", self.method, "must be a method name (see `autoprune methods`)")
        if not isinstance(self.target, Target):
            raise ConfigError("target", self.target, "must be an autoprune.Target")
        if not isinstance(self.method_options, Mapping):
            raise ConfigError("method_options", self.method_options, "must be a mapping of option names to values")
        object.__setattr__(self, "method_options", dict(self.method_options))
        if not isinstance(self.score_options, Mapping):
            raise ConfigError("score_options", self.score_options, "must be a mapping of option names to values")
        object.__setattr__(self, "score_options", dict(self.score_options))
        if not isinstance(self.score, str):
            raise ConfigError("score", self.score, f"must be a score name: {', '.join(score_names())}")
        create_score(self.score, self.score_options)  # an unknown name or option: the registry's one line
        object.__setattr__(self, "select_top", _int("select_top", self.select_top, 0, 1024, optional=True))
        object.__setattr__(self, "select_steps", _int("select_steps", self.select_steps, 1, MAX_COUNT))
        object.__setattr__(self, "select_samples", _int("select_samples", self.select_samples, 1, MAX_COUNT))
        object.__setattr__(self, "ignored_layers", tuple(self.ignored_layers))
        object.__setattr__(self, "budget", _int("budget", self.budget, 1, MAX_COUNT, optional=True))
        object.__setattr__(self, "round_to", _int("round_to", self.round_to, 1, 4096))
        object.__setattr__(self, "val_samples", _int("val_samples", self.val_samples, 1, optional=True))
        object.__setattr__(self, "calibration_samples", _int("calibration_samples", self.calibration_samples, 0))
        object.__setattr__(self, "seed", _int("seed", self.seed, 0))
        object.__setattr__(self, "latency_batch", _int("latency_batch", self.latency_batch, 1, 65536))
        object.__setattr__(self, "latency_repeats", _int("latency_repeats", self.latency_repeats, 1, 100_000))
        cores = os.cpu_count() or 1  # threads on this machine; a Ray cluster's nodes may have more
        object.__setattr__(self, "threads", _int("threads", self.threads, 1, cores, optional=True))
        object.__setattr__(self, "workers", _int("workers", self.workers, 1, 4096))
        remote = self.ray_address is not None or self.executor == "ray"
        object.__setattr__(self, "threads_per_worker", _int("threads_per_worker", self.threads_per_worker, 1,
                                                            4096 if remote else cores, optional=True))
        ratio = _number(self.min_ratio)
        if ratio is None:
            raise ConfigError("min_ratio", self.min_ratio, "must be a number in [0, 1)")
        if not (math.isfinite(ratio) and 0 <= ratio < 1):
            raise ConfigError("min_ratio", self.min_ratio, "must lie in [0, 1)")
        object.__setattr__(self, "min_ratio", ratio)
        if self.finetune is not None and not isinstance(self.finetune, TrainConfig):
            raise ConfigError("finetune", self.finetune, "must be a TrainConfig or None")
        if not isinstance(self.executor, str) or self.executor not in ("auto", "serial", "pool", "ray"):
            raise ConfigError("executor", self.executor, "must be auto, serial, pool or ray")
        if self.ray_address is not None and not (isinstance(self.ray_address, str) and self.ray_address.strip()):
            raise ConfigError("ray_address", self.ray_address, "must be 'auto', 'local' or a cluster address "
                                                               "such as '10.0.0.1:6379'")
        if self.ray_address is not None and self.executor not in ("auto", "ray"):
            raise ConfigError("ray_address", self.ray_address, f"needs executor='ray', not {self.executor!r}")
        if self.executor == "serial" and self.workers > 1:
            raise ConfigError("workers", self.workers, "needs a parallel executor; executor='serial' runs one "
                                                       "evaluation at a time (use executor='auto', 'pool' or 'ray')")
        if not all(isinstance(n, str) and n for n in self.ignored_layers):
            raise ConfigError("ignored_layers", self.ignored_layers, "must be module names (strings)")

    @property
    def executor_kind(self) -> str:
        """The executor actually used: ``serial``, ``pool`` or ``ray``."""
        if self.ray_address is not None or self.executor == "ray":
            return "ray"
        if self.executor == "auto":
            return "serial" if self.workers == 1 else "pool"
        return self.executor

    def search_json(self, *, plan_trains: bool = True) -> dict[str, Any]:
        """The settings that decide what the search evaluates: a resumed run must keep them (the others,
        :data:`RESUMABLE_CHANGES`, may change). ``plan_trains``: the method trains in its plan, with the
        fine-tuning's optimiser settings (:data:`PLAN_TRAINING`), which then count too."""
        data = {k: v for k, v in self.to_json().items() if k not in RESUMABLE_CHANGES}
        if plan_trains:
            train = self.finetune or TrainConfig(epochs=1, lr=0.01)  # as the engine's make_plan
            data["plan_training"] = {name: getattr(train, name) for name in PLAN_TRAINING}
        return data

    def replace(self, **changes: Any) -> PruneConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """JSON-compatible form; :meth:`from_json` inverts it."""
        data = asdict(self)
        data["target"] = self.target.to_json()
        data["finetune"] = None if self.finetune is None else asdict(self.finetune)
        data["ignored_layers"] = list(self.ignored_layers)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PruneConfig:
        """Rebuild a configuration saved by :meth:`to_json`."""
        try:
            values = dict(data)
            values["target"] = Target.from_json(values["target"])
            if values.get("finetune") is not None:
                values["finetune"] = TrainConfig(**values["finetune"])
            values["ignored_layers"] = tuple(values.get("ignored_layers") or ())
            return cls(**values)
        except AutopruneError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AutopruneError(f"saved run configuration is damaged or from another version ({type(exc).__name__}: "
                                 f"{exc}); start a new run") from exc
