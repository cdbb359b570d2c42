"""The typed result of a pruning run: one schema for the Python API, ``report.json``, reports and ``compare``.

:class:`PruneResult` is what :func:`autoprune.prune` returns. Everything but the model has a JSON form
(:meth:`PruneResult.to_json`, written as ``report.json``) that :meth:`PruneResult.from_json` reads back,
so reports, figures and comparisons read results by attribute, never by string keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn

from autoprune.engine.config import PruneConfig, Target
from autoprune.errors import AutopruneError

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class LayerWidth:
    """Channels of one prunable group (named after its root layer) before and after pruning."""

    name: str
    before: int
    after: int


@dataclass(frozen=True)
class Evaluation:
    """One candidate evaluated by the search (a row of ``history.jsonl``).

    Attributes:
        index: position in the search (0-based).
        keep: keep ratio per group.
        counts: channels kept per group.
        accuracy: validation score (accuracy, or the caller's score).
        macs: analytic MACs.
        params: analytic parameter count.
        score: the value the strategy maximised (score minus penalties, or an infeasibility mark).
        seconds: time since the search started (informational; excluded from comparisons).
        latency_ms: predicted latency, when a latency target is searched.
        value: what the search ranked by when it is not the accuracy (``exp(-KL)``, ``exp(-loss)``: see
            :mod:`autoprune.engine.scoring`); None under accuracy scores.
    """

    index: int
    keep: tuple[float, ...]
    counts: tuple[int, ...]
    accuracy: float
    macs: int
    params: int
    score: float
    seconds: float = 0.0
    latency_ms: float | None = None
    value: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The history row."""
        row = {"i": self.index, "keep": [round(float(v), 6) for v in self.keep], "counts": list(self.counts),
               "accuracy": self.accuracy, "macs": self.macs, "params": self.params, "score": self.score,
               "seconds": round(self.seconds, 3)}
        if self.latency_ms is not None:
            row["latency_ms"] = round(self.latency_ms, 5)
        if self.value is not None:
            row["value"] = self.value
        return row

    @classmethod
    def from_json(cls, row: Mapping[str, Any], dim: int) -> Evaluation:
        """A row read back; raises ``ValueError`` when it is not a well-formed row for ``dim`` groups."""
        counts, keep = row["counts"], row["keep"]
        if not (isinstance(counts, list) and isinstance(keep, list) and len(counts) == len(keep) == dim):
            raise ValueError("counts/keep of the wrong length")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
            raise ValueError("counts must be positive integers")
        numbers = [row["accuracy"], row["macs"], row["params"], row["score"], *keep]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            raise ValueError("a value is not a number")
        latency = row.get("latency_ms")
        if latency is not None and (isinstance(latency, bool) or not isinstance(latency, int | float)):
            raise ValueError("latency_ms is not a number")
        value = row.get("value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("value is not a number")
        index = row.get("i", 0)
        if isinstance(index, bool) or not isinstance(index, int):
            raise ValueError("i is not an integer")
        return cls(index, tuple(float(k) for k in keep), tuple(counts), float(row["accuracy"]), int(row["macs"]),
                   int(row["params"]), float(row["score"]), float(row.get("seconds", 0.0) or 0.0),
                   None if latency is None else float(latency), None if value is None else float(value))


@dataclass(frozen=True)
class ModelStats:
    """Measurements of one model (the base or the pruned one).

    Attributes:
        accuracy: test (or validation) accuracy, or the caller's score; None if not measured.
        params: parameters.
        macs: MACs per sample (Torch-Pruning's counter's total: convolution, linear, norm, activation, pooling).
        size_bytes: bytes of the saved state dict.
        latency: per batch size (as text), the timing summary (median and spread, in ms).
    """

    accuracy: float | None
    params: int
    macs: int
    size_bytes: int | None = None
    latency: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def latency_ms(self, batch: str) -> float | None:
        """Median milliseconds at ``batch``, if measured."""
        entry = self.latency.get(batch)
        return None if entry is None else float(entry["median_ms"])


@dataclass(frozen=True)
class SearchStats:
    """What the search did.

    Attributes:
        strategy: the strategy that searched.
        score: the candidate score used (see :mod:`autoprune.engine.scoring`).
        budget: candidate evaluations allowed.
        evaluations: candidates evaluated (including replayed ones of a resumed run).
        unique_evaluations: distinct structures actually scored in this process.
        distinct_structures: distinct channel-count vectors among the evaluations.
        spread: mean over groups of the standard deviation of the keep ratios evaluated.
        seconds: wall time of the search.
        plan_seconds: wall time of the method's preparation (criterion, extra training).
        base_score: validation score of the unpruned model.
        best: the chosen candidate (None when none met the target).
        resumed_evaluations: evaluations replayed from an interrupted run.
        repaired_to_target: the chosen candidate was shrunk onto the target after the search.
        executor: ``serial``, ``pool`` or ``ray``.
        workers: processes that evaluated candidates.
        threads_per_worker: torch threads each worker process was pinned to (None: serial, the run's own).
        selection: the multi-fidelity selection after the search (its rungs and choice; None: not run), see
            :func:`autoprune.engine.scoring.successive_halving`.
        notes: method-specific facts (JSON data).
    """

    strategy: str
    score: str
    budget: int
    evaluations: int
    unique_evaluations: int
    distinct_structures: int
    spread: float
    seconds: float
    plan_seconds: float
    base_score: float
    best: Evaluation | None
    resumed_evaluations: int = 0
    repaired_to_target: bool = False
    executor: str = "serial"
    workers: int = 1
    threads_per_worker: int | None = None
    selection: Mapping[str, Any] | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinetuneStats:
    """How the pruned network was fine-tuned (``epochs`` 0 and ``custom`` False: not at all)."""

    epochs: int
    seconds: float
    lr: float | None = None
    distill: float | None = None
    custom: bool = False
    world_size: int = 1
    accuracy_before: float | None = None


@dataclass
class PruneResult:
    """The outcome of a pruning run.

    Attributes:
        model: the pruned ``nn.Module`` (None for a result read back from JSON).
        method: the method's name; ``source``: the paper or baseline it follows.
        metric: ``"accuracy"``, or ``"score"`` when the caller's ``score_fn`` measured the models.
        target: what was asked.
        seed: the run's seed.
        base, pruned: measurements of the unpruned and the pruned model.
        widths: channels per prunable group before and after.
        keep: the chosen keep vector.
        speedup: per batch size (as text), the measured speed-up and its spread.
        latency_device: where latency was measured.
        search, finetune: what the search and the fine-tuning did.
        config: the run's configuration.
        history: every candidate evaluated.
        analytic_cost_matches: the analytic cost model equals Torch-Pruning's counter on the pruned module.
        seconds: wall time of the whole run.
        info: where the model and data came from (architecture, dataset), versions.
        warnings: problems worth a reader's attention (e.g. an unreliable latency measurement).
    """

    model: nn.Module | None
    method: str
    source: str
    metric: str
    target: Target
    seed: int
    base: ModelStats
    pruned: ModelStats
    widths: tuple[LayerWidth, ...]
    keep: tuple[float, ...]
    speedup: Mapping[str, Mapping[str, Any]]
    latency_device: str
    search: SearchStats
    finetune: FinetuneStats
    config: PruneConfig
    history: list[Evaluation] = field(default_factory=list, repr=False)
    analytic_cost_matches: bool = True
    seconds: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def reduction(self) -> dict[str, float]:
        """Fractions of MACs, parameters and (when known) file size removed."""
        out = {"macs": 1 - self.pruned.macs / self.base.macs, "params": 1 - self.pruned.params / self.base.params}
        if self.base.size_bytes and self.pruned.size_bytes:
            out["size"] = 1 - self.pruned.size_bytes / self.base.size_bytes
        return out

    @property
    def accuracy_change_points(self) -> float | None:
        """Pruned minus base accuracy (or score), in points (x 100)."""
        if self.base.accuracy is None or self.pruned.accuracy is None:
            return None
        return 100 * (self.pruned.accuracy - self.base.accuracy)

    def to_json(self) -> dict[str, Any]:
        """Everything but the model and the history, as JSON data (``report.json``)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "history")}
        data = {k: _plain(v) for k, v in data.items()}
        data["target"] = self.target.to_json()
        data["config"] = self.config.to_json()
        data["reduction"] = self.reduction
        data["accuracy_change_points"] = self.accuracy_change_points
        return {"schema": SCHEMA_VERSION, **data}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], history: Sequence[Evaluation] = ()) -> PruneResult:
        """A result read back from :meth:`to_json`'s output (``model`` is None)."""
        try:
            if data.get("schema") != SCHEMA_VERSION:
                raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA_VERSION}")
            search = dict(data["search"])
            best = search.get("best")
            dim = len(data["keep"])
            search["best"] = None if best is None else Evaluation.from_json(_row(best), dim)
            return cls(
                model=None, method=data["method"], source=data["source"], metric=data["metric"],
                target=Target.from_json(data["target"]), seed=data["seed"], base=ModelStats(**data["base"]),
                pruned=ModelStats(**data["pruned"]), widths=tuple(LayerWidth(**w) for w in data["widths"]),
                keep=tuple(data["keep"]), speedup=data["speedup"], latency_device=data["latency_device"],
                search=SearchStats(**search), finetune=FinetuneStats(**data["finetune"]),
                config=PruneConfig.from_json(data["config"]), history=list(history),
                analytic_cost_matches=data["analytic_cost_matches"], seconds=data["seconds"], info=data["info"],
                warnings=tuple(data["warnings"]))
        except AutopruneError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AutopruneError(f"not a report of this autoprune version ({type(exc).__name__}: {exc}); re-run "
                                 "the method") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the pruned model (weights and the recorded widths; no code) to ``path``.

        Load it with ``autoprune.load(path)`` for registry architectures, or
        ``autoprune.load(path, model=MyNet())`` for your own class.
        """
        from autoprune.io.modelfile import save_model

        if self.model is None:
            raise AutopruneError("this result has no model (it was read from a report); re-run the pruning")
        architecture = self.info.get("architecture")
        save_model(path, self.model, architecture=architecture, dataset=self.info.get("dataset"),
                   info={"pruned": {"method": self.method, "keep": list(self.keep), "target": self.target.to_json(),
                                    "base_macs": self.base.macs, "base_params": self.base.params}})


def _row(best: Mapping[str, Any]) -> dict[str, Any]:
    """A :class:`Evaluation` serialised by ``asdict`` (SearchStats.best) as a history row."""
    if "i" in best:
        return dict(best)
    return {"i": best["index"], **{k: v for k, v in best.items() if k != "index"}}


def _plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
