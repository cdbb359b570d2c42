"""Side-by-side comparison of pruning methods on the same model, data, budget and fine-tuning schedule.

:func:`run_comparison` prunes one trained model with several methods, one after another, each by
:func:`autoprune.runs.pipeline.prune_model` with the same :class:`~autoprune.runs.pipeline.PruneConfig` except
``method`` (same seed, same evaluation budget or each method's default, same fine-tuning), each into
its own sub-directory ``OUT/<method>/`` with its complete artifacts. A method that fails is recorded
with its one-line error and the others go on. A ``--method-option`` goes to the methods that read it.
The comparison directory holds:

* ``compare_run.json``: methods, configuration and data, written before any long work (``--resume``);
* ``compare.json`` and ``compare.md``: the table, rewritten after every method;
* ``accuracy_macs.png``, ``channels.png``, ``search.png`` and the self-contained ``report.html``.

Resuming skips the methods that finished (their ``report.json`` exists), resumes an interrupted one
from its own ``run.json`` / ``history.jsonl`` (``prune_model(resume=True)``) and retries failed ones.

The table: per method, test accuracy and its change, parameter / MACs reduction, file size, measured
speed-up at batch 1 and at the large batch, search and fine-tuning time, evaluations. The best value
of each column is marked (ties at the displayed precision share the mark; a column where every row
ties has none).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import autoprune
from autoprune.report import html as html_report
from autoprune.report import plots
from autoprune.io.artifact import write_json, write_text
from autoprune.data import Splits
from autoprune.errors import AutopruneError, Interrupted
from autoprune.methods import create_method, method_names
from autoprune.models import NormalizedModel
from autoprune.runs.pipeline import (
    PruneConfig,
    SearchInterrupted,
    check_reachable,
    prepare_output,
    prune_model,
    pruning_space,
)

log = logging.getLogger(__name__)

RUN_FILE = "compare_run.json"
#: The order of ``--methods all``: the five papers, then the baselines (others, if registered, after).
DEFAULT_ORDER = ("otp", "pso", "sa", "ssa", "gdp", "l1", "global", "slim", "random")


class ComparisonInterrupted(SearchInterrupted):
    """The comparison was stopped on request; ``--resume`` continues it."""


# ---- inputs ------------------------------------------------------------------------------------

def all_methods() -> list[str]:
    """Every registered method, papers first."""
    names = method_names()
    return [m for m in DEFAULT_ORDER if m in names] + [m for m in names if m not in DEFAULT_ORDER]


def parse_methods(methods: str | Sequence[str]) -> list[str]:
    """Validate a comma-separated list (or sequence) of method names; ``all`` means every method.

    Raises:
        AutopruneError: an unknown or repeated name, or an empty list.
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [m.strip() for m in items if m.strip()]
    if not names:
        raise AutopruneError(f"--methods is empty; give comma-separated names from: {', '.join(all_methods())} "
                             "(or all)")
    if names == ["all"]:
        return all_methods()
    valid = set(method_names())
    seen: set[str] = set()
    for name in names:
        if name not in valid:
            raise AutopruneError(f"unknown method {name!r} in --methods; valid methods: "
                                 f"{', '.join(sorted(valid))} (or all)")
        if name in seen:
            raise AutopruneError(f"method {name!r} is listed twice in --methods")
        seen.add(name)
    return names


def _option_types(method: str) -> dict[str, type] | None:
    return getattr(create_method(method), "option_types", None)


def options_for(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The ``--method-option`` entries that ``method`` reads (all of them if it does not declare its options)."""
    known = _option_types(method)
    return dict(options) if known is None else {k: v for k, v in options.items() if k in known}


def check_options(methods: Sequence[str], options: Mapping[str, Any]) -> None:
    """Every option must be read by at least one compared method, with a value valid for each that reads it.

    Raises:
        AutopruneError: an option no compared method reads, or a value of the wrong type.
    """
    for key, value in options.items():
        readers = [m for m in methods if key in options_for(m, {key: value})]
        if not readers:
            raise AutopruneError(f"--method-option {key!r} is read by none of the compared methods "
                                 f"({', '.join(methods)}); check its spelling (`autoprune methods` lists them)")
        for m in readers:
            method = create_method(m)
            if hasattr(method, "check_options"):
                method.check_options({key: value})


def check_target(model: NormalizedModel, splits: Splits, config: PruneConfig) -> None:
    """Fail early (before any method runs) if the MACs target cannot be met at the minimum widths."""
    check_reachable(pruning_space(model, splits, config), config)


def prepare_comparison(out: Path, *, force: bool, resume: bool) -> None:
    """Check (resume) or create (refusing to overwrite without ``force``) the comparison directory."""
    if resume:
        if not (out / RUN_FILE).exists():
            raise AutopruneError(f"nothing to resume in {str(out)!r}: it has no {RUN_FILE} (was it made by "
                                 "`autoprune compare --out`?)")
        return
    prepare_output(out, force=force, resume=False)


def load_comparison_run(out: Path) -> dict[str, Any]:
    """The saved inputs of a comparison (``compare_run.json``), for ``--resume``."""
    prepare_comparison(out, force=False, resume=True)
    try:
        saved = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        saved["config"] = PruneConfig.from_json(saved["config"])
        saved["methods"] = parse_methods(saved["methods"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AutopruneError(f"{str(out / RUN_FILE)!r} is damaged ({type(exc).__name__}: {exc}); start the "
                             "comparison again with --force") from exc
    return saved


# ---- running -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodResult:
    """How one method of a comparison ended.

    Attributes:
        method: its name.
        status: ``ok``, ``failed``, ``interrupted`` or ``pending`` (not started).
        report: its report (``ok`` only).
        error: the one-line error (``failed`` / ``interrupted``).
        skipped: finished in an earlier run and skipped on resume.
        resumed: continued from an interrupted earlier attempt.
        seconds: wall time spent on it in this run.
    """

    method: str
    status: str
    report: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False
    resumed: bool = False
    seconds: float = 0.0


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message's first line (prefixed by the type unless it is ours)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, AutopruneError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _finished_report(sub: Path) -> dict[str, Any] | None:
    path = sub / "report.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def run_comparison(model: NormalizedModel, spec: dict[str, Any], splits: Splits, config: PruneConfig,
                   methods: Sequence[str], out: Path, *, device: torch.device, progress: bool = True,
                   resume: bool = False, stop_requested: Callable[[], bool] | None = None,
                   invocation: dict[str, Any] | None = None, title: str | None = None,
                   on_start: Callable[[str, int, int], None] | None = None,
                   on_done: Callable[[MethodResult], None] | None = None) -> dict[str, Any]:
    """Prune ``model`` with every method in ``methods`` into ``out/<method>/`` and write the comparison.

    ``out`` must have been prepared by :func:`prepare_comparison`. Every method gets a fresh copy of
    ``model`` and ``config`` with only ``method`` changed (and the method options cut to those it reads).

    Args:
        on_start: called as ``on_start(method, index, total)`` before a method runs.
        on_done: called with each method's :class:`MethodResult` (also for skipped ones).

    Returns:
        The comparison summary (``compare.json``'s content).

    Raises:
        ComparisonInterrupted: ``stop_requested()`` became true; ``out`` can be resumed.
    """
    methods = parse_methods(methods)
    check_options(methods, config.method_options)
    started = time.perf_counter()
    meta = {"title": title, "model": spec.get("model"), "dataset": splits.info.name,
            "invocation": dict(invocation or {})}
    if not resume:
        write_json(out / RUN_FILE, {"methods": methods, "config": config.to_json(), "invocation": meta["invocation"],
                                    "title": title, "spec": spec})
    results: dict[str, MethodResult] = {}

    def current(complete: bool = False) -> dict[str, Any]:
        return summarize(results, methods, config, meta=meta, seconds=time.perf_counter() - started,
                         complete=complete)

    def finish(result: MethodResult) -> None:
        results[result.method] = result
        if on_done is not None:
            on_done(result)
        write_tables(out, current())

    def interrupt(where: str) -> None:
        write_comparison(out, current(), results)
        raise ComparisonInterrupted(f"comparison {where}; continue with `autoprune compare --resume {out}`")

    for i, method in enumerate(methods):
        sub = out / method
        if resume:
            report = _finished_report(sub)
            if report is not None:
                finish(MethodResult(method, "ok", report=report, skipped=True))
                continue
        if stop_requested is not None and stop_requested():
            interrupt(f"stopped before {method}")
        if on_start is not None:
            on_start(method, i, len(methods))
        again = resume and (sub / "run.json").exists()
        t0 = time.perf_counter()
        try:
            if not again:
                prepare_output(sub, force=True, resume=False)
            own = replace(config, method=method, method_options=options_for(method, config.method_options))
            report = prune_model(copy.deepcopy(model), spec, splits, own, sub,
                                 device=device, progress=progress, resume=again, stop_requested=stop_requested,
                                 invocation=meta["invocation"])
        except Interrupted:  # Ctrl-C during the search or a training phase: resumable
            results[method] = MethodResult(method, "interrupted", error="interrupted; resume to continue",
                                           resumed=again, seconds=time.perf_counter() - t0)
            interrupt(f"interrupted during {method}")
        except Exception as exc:  # one method's failure must not end the comparison
            log.debug("method %s failed", method, exc_info=True)
            finish(MethodResult(method, "failed", error=one_line(exc), resumed=again,
                                seconds=time.perf_counter() - t0))
            continue
        finish(MethodResult(method, "ok", report=report, resumed=again, seconds=time.perf_counter() - t0))

    summary = current(complete=True)
    write_comparison(out, summary, results)
    return summary


# ---- the summary -------------------------------------------------------------------------------

def entry(result: MethodResult) -> dict[str, Any]:
    """One method's row of ``compare.json``."""
    row: dict[str, Any] = {"method": result.method, "status": result.status, "dir": result.method}
    if result.skipped:
        row["skipped"] = True
    if result.resumed:
        row["resumed"] = True
    if result.status != "ok" or result.report is None:
        if result.error:
            row["error"] = result.error
        return row
    r = result.report
    search, plan_s = r["search"], r["search"].get("plan_seconds", 0.0)
    row.update({
        "source": r.get("source", ""),
        "accuracy": r["pruned"]["accuracy"],
        "accuracy_before_finetune": r["pruned"].get("accuracy_before_finetune"),
        "accuracy_change_points": r["accuracy_change_points"],
        "params": r["pruned"]["params"], "macs": r["pruned"]["macs"], "size_bytes": r["pruned"]["size_bytes"],
        "params_reduction": r["reduction"]["params"], "macs_reduction": r["reduction"]["macs"],
        "size_reduction": r["reduction"].get("size"),
        "speedup": dict(r["speedup"]),
        "search_seconds": round(plan_s + search["seconds"], 3), "plan_seconds": plan_s,
        "finetune_seconds": r["finetune"]["seconds"], "finetune_epochs": r["finetune"]["epochs"],
        "evaluations": search["evaluations"], "unique_evaluations": search.get("unique_evaluations"),
        "budget": search["budget"], "seconds": r.get("seconds"),
    })
    return row


def _budget_text(config: PruneConfig, methods: Sequence[str]) -> str:
    if config.budget is not None:
        return f"{config.budget} candidate evaluations for every method"
    defaults = ", ".join(f"{m} {create_method(m).default_budget}" for m in methods)
    return f"each method's own default ({defaults})"


def summarize(results: Mapping[str, MethodResult], methods: Sequence[str], config: PruneConfig, *,
              meta: Mapping[str, Any] | None = None, seconds: float = 0.0, complete: bool = False) -> dict[str, Any]:
    """The content of ``compare.json`` for the results so far (methods not yet run are ``pending``).

    ``meta`` may give ``title``, ``model`` and ``dataset`` names and the ``invocation`` (model file, data).
    """
    meta = meta or {}
    entries = [entry(results.get(m) or MethodResult(m, "pending")) for m in methods]
    reports = [results[m].report for m in methods if m in results and results[m].report is not None]
    first = reports[0] if reports else None
    batches = [str(b) for b in (first["latency"]["batch_sizes"] if first else (1, config.latency_batch))]
    summary: dict[str, Any] = {
        "title": meta.get("title"),
        "model": first.get("model") if first else meta.get("model"),
        "dataset": first.get("dataset") if first else meta.get("dataset"),
        "target": ({"macs_reduction": config.macs_reduction} if config.macs_reduction is not None
                   else {"max_drop_points": config.max_drop}),
        "budget": config.budget,
        "budget_text": _budget_text(config, methods),
        "finetune_epochs": config.finetune.epochs,
        "seed": config.seed,
        "base": ({k: first["base"][k] for k in ("accuracy", "params", "macs", "size_bytes")} if first else None),
        "latency_device": first["latency"]["device"] if first else None,
        "latency_batch_sizes": batches,
        "methods": entries,
        "best": best_methods(entries, columns(batches)),
        "complete": complete,
        "seconds": round(seconds, 3),
        "invocation": dict(meta.get("invocation") or {}),
        "config": config.to_json(),
        "versions": {"autoprune": autoprune.__version__, "torch": torch.__version__},
    }
    return summary


# ---- the table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A numeric column of the comparison table.

    Attributes:
        key: identifier (``compare.json``'s ``best``).
        title: header text.
        path: where the value lives in a method's entry (keys, e.g. ``("speedup", "1")``).
        scale: multiplier applied before display (100 for percentages).
        digits: decimals shown; values are compared at this precision.
        suffix: unit after the number.
        better: ``high``, ``low`` or ``""`` (no best mark).
        signed: show a ``+`` on positive values.
    """

    key: str
    title: str
    path: tuple[str, ...]
    scale: float = 1.0
    digits: int = 2
    suffix: str = ""
    better: str = "high"
    signed: bool = False

    def value(self, row: Mapping[str, Any]) -> float | None:
        """The column's raw value in ``row`` (None when absent)."""
        v: Any = row
        for k in self.path:
            if not isinstance(v, Mapping) or k not in v:
                return None
            v = v[k]
        return float(v) if isinstance(v, int | float) else None

    def shown(self, v: float) -> float:
        """The value as displayed (scaled and rounded): what 'best' compares."""
        return round(v * self.scale, self.digits)

    def text(self, v: float | None) -> str:
        """The displayed text."""
        if v is None:
            return "-"
        return f"{self.shown(v):{'+' if self.signed else ''},.{self.digits}f}{self.suffix}"


def columns(batch_sizes: Sequence[str | int]) -> list[Column]:
    """The table's numeric columns; ``batch_sizes`` are the latency batch sizes (1 and the large one)."""
    cols = [
        Column("accuracy", "test acc.", ("accuracy",), 100, 2, "%"),
        Column("accuracy_change", "change (pts)", ("accuracy_change_points",), 1, 2, "", signed=True),
        Column("params_reduction", "params -", ("params_reduction",), 100, 1, "%"),
        Column("macs_reduction", "MACs -", ("macs_reduction",), 100, 1, "%"),
        Column("size", "size (KiB)", ("size_bytes",), 1 / 1024, 1, "", better="low"),
    ]
    cols += [Column(f"speedup_{b}", f"speed-up b={b}", ("speedup", str(b)), 1, 2, "x") for b in batch_sizes]
    cols += [
        Column("search_seconds", "search (s)", ("search_seconds",), 1, 1, "", better="low"),
        Column("finetune_seconds", "fine-tune (s)", ("finetune_seconds",), 1, 1, "", better="low"),
        Column("evaluations", "evals", ("evaluations",), 1, 0, "", better="low"),
        Column("budget", "budget", ("budget",), 1, 0, "", better=""),
    ]
    return cols


def best_methods(entries: Sequence[Mapping[str, Any]], cols: Sequence[Column]) -> dict[str, list[str]]:
    """Per column with a direction, the methods holding its best displayed value.

    Only finished methods compete; a column is left out when fewer than two methods have a value or
    when all of them tie.
    """
    best: dict[str, list[str]] = {}
    ok = [e for e in entries if e.get("status") == "ok"]
    for col in cols:
        if not col.better:
            continue
        values = [(e["method"], col.shown(v)) for e in ok if (v := col.value(e)) is not None]
        if len(values) < 2 or len({v for _, v in values}) == 1:
            continue
        top = (max if col.better == "high" else min)(v for _, v in values)
        best[col.key] = [m for m, v in values if v == top]
    return best


@dataclass(frozen=True)
class Cell:
    """One table cell: its text, and whether it holds the column's best value / an error."""

    text: str
    best: bool = False
    failed: bool = False


@dataclass(frozen=True)
class Table:
    """The comparison table, independent of its rendering."""

    headers: list[str]
    rows: list[list[Cell]]
    notes: list[str]


def comparison_table(summary: Mapping[str, Any]) -> Table:
    """The table of a summary (``compare.json``'s content), with the best cell of each column marked."""
    cols = columns(summary.get("latency_batch_sizes") or ["1"])
    entries = summary.get("methods", [])
    best = best_methods(entries, cols)
    rows: list[list[Cell]] = []
    for e in entries:
        name = e["method"]
        if e.get("status") == "ok":
            rows.append([Cell(name)] + [Cell(c.text(c.value(e)), best=e["method"] in best.get(c.key, []))
                                        for c in cols])
        else:
            status = e.get("status", "?")
            rows.append([Cell(name), Cell(status.upper() if status == "failed" else status, failed=True)]
                        + [Cell("-") for _ in cols[1:]])
    notes = [f"Budget: {summary.get('budget_text', '')}.",
             "Best value per column marked (higher is better except size, times and evaluations); "
             "speed-up is measured latency of the unpruned over the pruned model, same process and threads.",
             "Search time includes each method's own preparation (criterion scores; slim's sparsity training, "
             "sa's shard training)."]
    base = summary.get("base")
    if base:
        notes.insert(0, f"Unpruned: {100 * base['accuracy']:.2f}% test accuracy, {base['params']:,} params, "
                        f"{base['macs']:,} MACs, {base['size_bytes'] / 1024:.1f} KiB.")
    return Table(["method"] + [c.title for c in cols], rows, notes)


def _errors(summary: Mapping[str, Any]) -> list[str]:
    return [f"{e['method']} {e['status']}: {e.get('error') or 'not run'}" for e in summary.get("methods", [])
            if e.get("status") != "ok"]


def _target(summary: Mapping[str, Any]) -> str:
    t = summary.get("target", {})
    if t.get("macs_reduction") is not None:
        return f"MACs reduction >= {t['macs_reduction']}"
    return f"accuracy drop <= {t.get('max_drop_points')} points"


def terminal_table(summary: Mapping[str, Any]) -> str:
    """The table as aligned plain text: best values carry a ``*``; errors listed below."""
    table = comparison_table(summary)
    grid = [table.headers] + [[c.text + ("*" if c.best else "") for c in row] for row in table.rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(table.headers))]
    lines = []
    for k, r in enumerate(grid):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", "* best in its column."] + table.notes
    lines += [f"  {line}" for line in _errors(summary)]
    return "\n".join(lines)


def markdown(summary: Mapping[str, Any]) -> str:
    """``compare.md``: heading, settings, the table with **bold** best values, errors."""
    table = comparison_table(summary)
    title = summary.get("title") or f"autoprune comparison: {summary.get('model')} / {summary.get('dataset')}"
    lines = [f"# {title}", "",
             f"Model {summary.get('model')} on {summary.get('dataset')}; target: {_target(summary)}; "
             f"fine-tuning epochs {summary.get('finetune_epochs')}; seed {summary.get('seed')}; latency on "
             f"{summary.get('latency_device') or 'n/a'}."
             + ("" if summary.get("complete") else " **Incomplete: resume with `autoprune compare --resume`.**"),
             "",
             "| " + " | ".join(table.headers) + " |",
             "|---|" + "---:|" * (len(table.headers) - 1)]
    for row in table.rows:
        cells = [f"**{c.text}**" if c.best else c.text for c in row]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += [""] + [f"- {n}" for n in table.notes]
    errors = _errors(summary)
    if errors:
        lines += ["", "Methods without a result:", ""] + [f"- {e}" for e in errors]
    return "\n".join(lines) + "\n"


# ---- writing -----------------------------------------------------------------------------------

def write_tables(out: Path, summary: Mapping[str, Any]) -> None:
    """Write ``compare.json`` and ``compare.md`` atomically."""
    write_json(out / "compare.json", summary)
    write_text(out / "compare.md", markdown(summary))


def comparison_figures(summary: Mapping[str, Any], reports: Mapping[str, Mapping[str, Any]],
                       histories: Mapping[str, Sequence[float]]) -> dict[str, bytes]:
    """The comparison's three figures (PNG bytes by file name) from the finished methods' reports."""
    base = summary.get("base")
    target = summary.get("target", {})
    points = [plots.AccuracyPoint(m, r["pruned"]["macs"], r["pruned"]["accuracy"],
                                  r["pruned"].get("accuracy_before_finetune")) for m, r in reports.items()]
    target_macs = (base["macs"] * (1 - target["macs_reduction"])
                   if base and target.get("macs_reduction") is not None else None)
    return {
        "accuracy_macs.png": plots.accuracy_vs_macs(
            points, plots.AccuracyPoint("unpruned", base["macs"], base["accuracy"]) if base else None,
            target_macs=target_macs),
        "channels.png": plots.channels_per_layer({m: r["layers"] for m, r in reports.items()}),
        "search.png": plots.search_progress(histories, ylabel=html_report.score_label(target)),
    }


def write_comparison(out: Path, summary: Mapping[str, Any], results: Mapping[str, MethodResult]) -> None:
    """Write the tables, the figures and ``report.html`` of a comparison (all atomic)."""
    write_tables(out, summary)
    reports = {e["method"]: results[e["method"]].report for e in summary["methods"]
               if e["status"] == "ok" and results[e["method"]].report is not None}
    histories = {m: html_report.history_scores(out / m / "history.jsonl") for m in reports}
    figures: dict[str, bytes] = {}
    if reports:
        try:
            figures = comparison_figures(summary, reports, histories)
        except Exception as exc:  # the tables are written; a broken figure must not hide them
            log.warning("could not draw the comparison figures: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
    html_report.write_figures(out, figures)
    table = comparison_table(summary)
    rows = [[(c.text, "best" if c.best else "failed" if c.failed else "") for c in row] for row in table.rows]
    write_text(out / "report.html", html_report.comparison_html(summary, table.headers, rows, figures,
                                                                notes=table.notes))
