"""A run directory: one pruning run's files, locked while it runs, resumable after an interruption.

``OUT/`` holds

* ``.autoprune.lock``: the lock (pid, host, start time) while a run writes here; a second run is refused;
* ``run.json``: the configuration, how the run was invoked, where its model and data came from and digests of
  the model and validation data it started from, written once the engine has checked the model, data and
  target (a run refused for its inputs leaves ``OUT`` as it was; ``--force`` clears an earlier run only then,
  and never a directory holding files no run writes), before the search, so ``--resume`` can continue it
  (with the same model, data and search settings: :meth:`PruneConfig.search_json`);
* ``history.jsonl``: every candidate evaluation, appended and flushed as it happens;
* ``work/``: the fine-tuning checkpoint (removed when the run completes);
* ``model.pt``, then ``report.md``, ``report.html`` and the figures, and last ``report.json``: its presence
  means the run is complete.

Resuming replays the recorded evaluations (the strategies are deterministic given their seed and the values
told, so they ask the same candidates again and the evaluator answers from the record), then goes on; the
fine-tuning resumes from its last epoch checkpoint. A history row that is cut short, malformed or not what
the strategy asks ends the replay there: the rest is evaluated again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import autoprune
from autoprune.engine.callbacks import Callback
from autoprune.engine.config import PruneConfig
from autoprune.engine.result import Evaluation, PruneResult
from autoprune.errors import AutopruneError, first_line
from autoprune.io.files import read_json, read_text, write_json, write_text
from autoprune.runs.lock import Layout, check_replaceable, clear_directory, lock_output

log = logging.getLogger(__name__)

RUN_FILE, HISTORY_FILE, WORK_DIR, LOCK_FILE = "run.json", "history.jsonl", "work", ".autoprune.lock"
#: the run directories whose search this process started (or resumed): a failure after that keeps the search
STARTED: set[str] = set()


def run_layout() -> Layout:
    """What a run writes into its directory (``--force`` replaces a directory holding only that)."""
    from autoprune.report import FIGURES, REPORTS  # the report layer sits above the runs

    return Layout("run", frozenset({RUN_FILE, HISTORY_FILE, "model.pt", *REPORTS, *FIGURES}),
                  markers=(RUN_FILE, "report.json"), directories={WORK_DIR: frozenset({"finetune.ckpt"})})


#: the largest history file read back (a row is under 1 kB; a budget is at most a million evaluations)
HISTORY_LIMIT = 2 * 2**30


def read_history(path: Path) -> list[Evaluation]:
    """The intact leading rows of a history file (a torn, malformed or inconsistent row ends it)."""
    rows: list[Evaluation] = []
    if not path.exists():
        return rows
    try:
        text = read_text(path, limit=HISTORY_LIMIT, errors="replace")
    except (OSError, ValueError) as exc:
        raise AutopruneError(f"cannot read the history {str(path)!r} ({first_line(exc, type(exc).__name__)}); "
                             "start the run again with --force (force=True)") from exc
    for line in text.splitlines():
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not an object")
            row = Evaluation.from_json(data, len(rows[0].counts) if rows else len(data.get("counts") or []))
        except (ValueError, KeyError, TypeError, RecursionError):
            break  # a line cut short by a hard kill, or not a row this code wrote: everything before it is intact
        if row.index != len(rows):
            break
        rows.append(row)
    return rows


def read_run_file(path: Path) -> dict[str, Any]:
    """``run.json`` of a run directory, checked; its ``"config"`` parsed into a :class:`PruneConfig`."""
    file = path / RUN_FILE
    if not file.exists():
        raise AutopruneError(f"nothing to resume in {str(path)!r}: it has no {RUN_FILE} (was it made by "
                             "`autoprune prune --out` or autoprune.prune(out=...)?)")
    try:
        saved = read_json(file)
        if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
            raise ValueError("no configuration")
        saved["config"] = PruneConfig.from_json(saved["config"])  # also refuses a value no run could write
    except (OSError, ValueError) as exc:  # (an AutopruneError is a ValueError)
        why = first_line(exc, "") if isinstance(exc, AutopruneError) or type(exc) is ValueError else type(exc).__name__
        raise AutopruneError(f"{str(file)!r} is damaged ({why}), so the run cannot be resumed; start it again with "
                             "--force") from exc
    return saved


def _trains_in_plan(method: str) -> bool:
    """Whether the method trains in its plan (an unregistered one is assumed to)."""
    from autoprune.methods import METHODS

    return bool(getattr(METHODS.get(method), "trains_in_plan", True)) if method in METHODS else True


class RunDirectory(Callback):
    """The files of one run in ``path``; a context manager holding the directory's lock.

    Args:
        path: the run directory.
        config: the run's configuration (with ``resume``, it must equal the saved one).
        resume: continue the interrupted run in ``path``.
        force: replace whatever ``path`` holds (never a live run's files: the lock is taken first).
        invocation: how the run was started (the CLI's model file and data), saved for ``--resume``.
        info: where the model and data came from (architecture, dataset).
    """

    def __init__(self, path: str | os.PathLike[str], config: PruneConfig, *, resume: bool = False,
                 force: bool = False, invocation: dict[str, Any] | None = None,
                 info: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.config, self.resume, self.force = config, resume, force
        self.invocation, self.info = dict(invocation or {}), dict(info or {})
        self.recorded: list[Evaluation] = []
        self._lock: Any = None
        self._history: IO[str] | None = None
        self._written = 0
        self._started: Any = None

    def __enter__(self) -> RunDirectory:
        if self.path.exists() and not self.path.is_dir():
            raise AutopruneError(f"output {str(self.path)!r} is a file; give a directory")
        self._lock = lock_output(self.path, kind="directory")
        self._lock.__enter__()
        try:
            self._prepare()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _prepare(self) -> None:
        if self.resume:
            saved = read_run_file(self.path)
            trains = _trains_in_plan(self.config.method)
            before = json.loads(json.dumps(saved["config"].search_json(plan_trains=trains)))
            now = json.loads(json.dumps(self.config.search_json(plan_trains=trains)))  # as saved: tuples are lists
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            if changed:
                detail = ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
                raise AutopruneError(f"the run in {str(self.path)!r} was started with other search settings "
                                     f"({detail}); resume it with the same ones (only fine-tuning, workers and "
                                     "measurement settings may change), or start a new run (force=True / --force)")
        elif any(p.name != LOCK_FILE for p in self.path.iterdir()):
            check_replaceable(self.path, run_layout())
            if not self.force:
                state = "a run" if (self.path / "report.json").exists() else "an unfinished run (interrupted or failed)"
                raise AutopruneError(f"output directory {str(self.path)!r} already holds {state}; pass force=True "
                                     "(--force) to replace it, resume=True (--resume) to continue it, or choose "
                                     "another out= (--out)")
        self.recorded = read_history(self.path / HISTORY_FILE) if self.resume else []
        self._started = saved.get("start") if self.resume else None

    def on_start(self, info: dict[str, Any]) -> None:
        """The engine has checked the model, data and target: only now is an earlier run cleared (``force``) and
        ``run.json`` written, so a run refused for its inputs leaves the directory as it was."""
        start = {key: info.get(key) for key in ("model_digest", "val_digest", "base_score", "groups")}
        if isinstance(self._started, dict):
            self._check_same_start(self._started, start)
        if self.force and not self.resume:
            clear_directory(self.path, keep=(LOCK_FILE,))
        history = self.path / HISTORY_FILE
        write_text(history, "".join(json.dumps(r.to_json()) + "\n" for r in self.recorded))
        write_json(self.path / RUN_FILE, {"config": self.config.to_json(), "invocation": self.invocation,
                                          "info": self.info, "start": start, "autoprune": autoprune.__version__})
        STARTED.add(str(self.path.resolve()))
        self._history = open(history, "a", encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self._written = len(self.recorded)

    def _check_same_start(self, before: dict[str, Any], now: dict[str, Any]) -> None:
        """A resumed run must start from the model and validation data it started with: its record of the
        evaluations is about them."""
        where = str(self.path)
        if before.get("model_digest") != now["model_digest"] or before.get("groups") != now["groups"]:
            raise AutopruneError(f"the model differs from the one the run in {where!r} started with (its layers or "
                                 "weights changed); resume with that model, or start a new run (force=True / --force)")
        old, new = (float(x) if isinstance(x, int | float) else math.nan for x in (before.get("base_score"),
                                                                                 now["base_score"]))
        if before.get("val_digest") != now["val_digest"] or not abs(old - new) <= 1e-6 * max(1.0, abs(old)):
            raise AutopruneError(f"the validation data (or score_fn) differ from those the run in {where!r} started "
                                 f"with (the unpruned model scored {old:.6g} then, {new:.6g} now); resume with the "
                                 "same data, or start a new run (force=True / --force)")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._history is not None:
            self._history.close()
            self._history = None
        if self._lock is not None:
            self._lock.__exit__(kind, exc, tb)
            self._lock = None

    @property
    def finetune_checkpoint(self) -> Path:
        """Where fine-tuning keeps its epoch checkpoint (its directory is made by the first write)."""
        return self.path / WORK_DIR / "finetune.ckpt"

    def on_evaluation(self, evaluation: Evaluation) -> None:
        """Append the row (rows replayed from the record are already there)."""
        assert self._history is not None, "RunDirectory used outside its with-block"
        if evaluation.index < self._written:
            if evaluation.counts == self.recorded[evaluation.index].counts:
                return
            log.warning("history.jsonl diverges from this run at evaluation %d; re-evaluating from there",
                        evaluation.index)
            self._history.close()
            self.recorded = self.recorded[: evaluation.index]
            write_text(self.path / HISTORY_FILE, "".join(json.dumps(r.to_json()) + "\n" for r in self.recorded))
            self._history = open(self.path / HISTORY_FILE, "a", encoding="utf-8")  # noqa: SIM115
            self._written = evaluation.index
        self._history.write(json.dumps(evaluation.to_json()) + "\n")
        self._history.flush()
        self._written += 1

    def finish(self, result: PruneResult) -> None:
        """Write the model and the reports (``report.json`` last), and drop the work files."""
        from autoprune.report import write_reports  # the report layer sits above the runs

        result.save(self.path / "model.pt")
        write_reports(self.path, result)
        shutil.rmtree(self.path / WORK_DIR, ignore_errors=True)
