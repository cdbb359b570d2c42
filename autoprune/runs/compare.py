"""Side-by-side comparison of pruning methods on the same model, data, budget and fine-tuning schedule.

:func:`run_comparison` prunes one trained model with several methods, one after another, each by
:func:`autoprune.api.execute` with the same :class:`~autoprune.engine.config.PruneConfig` except the method
(same seed, same evaluation budget or each method's default, same fine-tuning), each into its own run
directory ``OUT/<method>/`` with its complete artifacts. A method that fails is recorded with its one-line
error and the others go on. A method option goes to the methods whose constructor takes it. The
comparison directory (locked while the comparison runs) holds:

* ``compare_run.json``: methods, configuration and data, written before any long work (``--resume``);
* ``compare.json`` and ``compare.md``: the table, rewritten after every method;
* ``accuracy_macs.png``, ``channels.png``, ``search.png`` and the self-contained ``report.html``.

Resuming skips the methods that finished (their ``report.json`` exists), resumes an interrupted one from
its own run directory and retries failed ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import autoprune
from autoprune.engine.callbacks import Callback
from autoprune.engine.config import PruneConfig
from autoprune.engine.prune import Data
from autoprune.engine.result import PruneResult
from autoprune.errors import AutopruneError, Interrupted, first_line
from autoprune.io.files import read_json, write_json, write_text
from autoprune.methods import METHODS, create_method, method_names
from autoprune.registry import coerce_options, option_defaults
from autoprune.report import FIGURES, REPORTS, plots, read_report
from autoprune.report import html as html_report
from autoprune.runs.job import run_layout
from autoprune.runs.lock import Layout, check_replaceable, clear_directory, lock_output

log = logging.getLogger(__name__)

RUN_FILE = "compare_run.json"
#: The order of ``--methods all``: the five papers, then the baselines (others, if registered, after).
DEFAULT_ORDER = ("otp", "pso", "sa", "ssa", "gdp", "l1", "global", "slim", "random")


class ComparisonInterrupted(Interrupted):
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
    names = [m.strip() for m in items if isinstance(m, str) and m.strip()]
    if not names:
        raise AutopruneError(f"--methods is empty; give comma-separated names from: {', '.join(all_methods())} "
                             "(or all)")
    if names == ["all"]:
        return all_methods()
    seen: set[str] = set()
    for name in names:
        if name not in METHODS:
            raise AutopruneError(f"unknown method {name!r} in --methods; valid methods: "
                                 f"{', '.join(method_names())} (or all)")
        if name in seen:
            raise AutopruneError(f"method {name!r} is listed twice in --methods")
        seen.add(name)
    return names


def options_for(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that ``method``'s constructor takes."""
    known = option_defaults(METHODS.get(method))
    return {k: v for k, v in options.items() if k in known}


def check_options(methods: Sequence[str], options: Mapping[str, Any]) -> None:
    """Every option must be taken by at least one compared method, with a value valid for each that takes it.

    Raises:
        AutopruneError: an option no compared method takes, or a bad value.
    """
    for key, value in options.items():
        readers = [m for m in methods if key in options_for(m, {key: value})]
        if not readers:
            raise AutopruneError(f"method option {key!r} is taken by none of the compared methods "
                                 f"({', '.join(methods)}); `autoprune methods` lists each method's options")
        for m in readers:
            create_method(m, coerce_options(METHODS.get(m), {key: value}, f"method {m!r}"))


def prepare_comparison(out: Path, *, force: bool, resume: bool) -> None:
    """Check (resume) or clear (refusing to overwrite without ``force``) the locked comparison directory."""
    if resume:
        if not (out / RUN_FILE).exists():
            raise AutopruneError(f"nothing to resume in {str(out)!r}: it has no {RUN_FILE} (was it made by "
                                 "`autoprune compare --out`?)")
        return
    if any(p.name != ".autoprune.lock" for p in out.iterdir()):
        runs = run_layout()
        check_replaceable(out, Layout("comparison", frozenset({RUN_FILE, "compare.json", "compare.md", *REPORTS,
                                                               *FIGURES}), markers=(RUN_FILE,),
                                      subdirectory=lambda entry: entry.name in METHODS.names() and (
                                          runs.holds_one(entry) or not any(entry.iterdir()))))
        if not force:
            raise AutopruneError(f"output directory {str(out)!r} already exists and is not empty; pass --force "
                                 "to overwrite it, --resume to continue it, or choose another --out")
        clear_directory(out, keep=(".autoprune.lock",))


def load_comparison_run(out: Path) -> dict[str, Any]:
    """The saved inputs of a comparison (``compare_run.json``), for ``--resume``."""
    if not (out / RUN_FILE).exists():
        raise AutopruneError(f"nothing to resume in {str(out)!r}: it has no {RUN_FILE} (was it made by "
                             "`autoprune compare --out`?)")
    try:
        saved = read_json(out / RUN_FILE)
        saved["config"] = PruneConfig.from_json(saved["config"])
        saved["methods"] = parse_methods(saved["methods"])
    except AutopruneError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:
        why = first_line(exc, "") if type(exc) is ValueError else f"{type(exc).__name__}: {first_line(exc, '')}"
        raise AutopruneError(f"{str(out / RUN_FILE)!r} is damaged ({why}); start the "
                             "comparison again with --force") from exc
    return saved


# ---- running -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodResult:
    """How one method of a comparison ended.

    Attributes:
        method: its name.
        status: ``ok``, ``failed``, ``interrupted`` or ``pending`` (not started).
        result: its result (``ok`` only).
        error: the one-line error (``failed`` / ``interrupted``).
        skipped: finished in an earlier run and skipped on resume.
        resumed: continued from an interrupted earlier attempt.
        seconds: wall time spent on it in this run.
    """

    method: str
    status: str
    result: PruneResult | None = None
    error: str | None = None
    skipped: bool = False
    resumed: bool = False
    seconds: float = 0.0


def one_line(exc: BaseException) -> str:
    """An exception as one line: the message's first line (prefixed by the type unless it is ours)."""
    text = first_line(exc, "")
    if isinstance(exc, AutopruneError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@dataclass
class Comparison:
    """What a comparison runs on: the model, its example inputs and data, and what to write down."""

    model: nn.Module
    example_inputs: Any
    data: Data
    device: torch.device
    info: dict[str, Any]
    invocation: dict[str, Any]
    title: str | None = None


def _run_one(comparison: Comparison, config: PruneConfig, method: str, sub: Path, *, resume: bool,
             callbacks: Sequence[Callback], progress: bool) -> MethodResult:
    from autoprune.api import execute

    again = resume and (sub / "run.json").exists()
    started = time.perf_counter()
    own = config.replace(method=method, method_options=options_for(method, config.method_options))
    try:
        method_obj = create_method(method, coerce_options(METHODS.get(method), own.method_options,
                                                          f"method {method!r}"))
        own = own.replace(method_options=method_obj.options)
        result = execute(comparison.model, comparison.example_inputs, own, method_obj, comparison.data,
                         device=comparison.device, callbacks=callbacks, out=sub, resume=again, force=not again,
                         progress=progress, info=comparison.info, invocation=comparison.invocation)
    except Interrupted:
        raise
    except Exception as exc:  # one method's failure must not end the comparison
        log.debug("method %s failed", method, exc_info=True)
        return MethodResult(method, "failed", error=one_line(exc), resumed=again,
                            seconds=time.perf_counter() - started)
    return MethodResult(method, "ok", result=result, resumed=again, seconds=time.perf_counter() - started)


def run_comparison(comparison: Comparison, config: PruneConfig, methods: Sequence[str], out: Path, *,
                   force: bool = False, resume: bool = False, callbacks: Sequence[Callback] = (),
                   progress: bool = False, on_start: Callable[[str, int, int], None] | None = None,
                   on_done: Callable[[MethodResult], None] | None = None) -> dict[str, Any]:
    """Prune with every method in ``methods`` into ``out/<method>/`` and write the comparison.

    Returns:
        The comparison summary (``compare.json``'s content).

    Raises:
        ComparisonInterrupted: a callback asked to stop; ``out`` can be resumed.
    """
    methods = parse_methods(methods)
    check_options(methods, config.method_options)
    if not resume:  # an impossible target would fail every method: say so before anything is created or cleared
        from autoprune.api import _check_reachable_first

        _check_reachable_first(comparison.model, comparison.example_inputs, config, comparison.device)
    with lock_output(out, kind="directory"):
        prepare_comparison(out, force=force, resume=resume)
        if not resume:
            write_json(out / RUN_FILE, {"methods": methods, "config": config.to_json(), "title": comparison.title,
                                        "invocation": comparison.invocation, "info": comparison.info})
        return _run_methods(comparison, config, methods, out, resume=resume, callbacks=callbacks,
                            progress=progress, on_start=on_start, on_done=on_done)


def _run_methods(comparison: Comparison, config: PruneConfig, methods: list[str], out: Path, *, resume: bool,
                 callbacks: Sequence[Callback], progress: bool, on_start: Callable[[str, int, int], None] | None,
                 on_done: Callable[[MethodResult], None] | None) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, MethodResult] = {}

    def summary(complete: bool = False) -> dict[str, Any]:
        return summarize(results, methods, config, comparison, seconds=time.perf_counter() - started,
                         complete=complete)

    for i, method in enumerate(methods):
        finished = read_report(out / method) if resume else None
        if finished is not None:
            results[method] = MethodResult(method, "ok", result=finished, skipped=True)
        else:
            if any(c.should_stop() for c in callbacks):
                write_comparison(out, summary(), results)
                raise ComparisonInterrupted(f"comparison stopped before {method}; continue with "
                                            f"`autoprune compare --resume {out}`")
            if on_start is not None:
                on_start(method, i, len(methods))
            try:
                results[method] = _run_one(comparison, config, method, out / method, resume=resume,
                                           callbacks=callbacks, progress=progress)
            except Interrupted as exc:
                results[method] = MethodResult(method, "interrupted", error="interrupted; resume to continue")
                write_comparison(out, summary(), results)
                raise ComparisonInterrupted(f"comparison interrupted during {method}; continue with "
                                            f"`autoprune compare --resume {out}`") from exc
        if on_done is not None:
            on_done(results[method])
        write_tables(out, summary())
    final = summary(complete=True)
    write_comparison(out, final, results)
    return final


# ---- the summary -------------------------------------------------------------------------------

def entry(result: MethodResult) -> dict[str, Any]:
    """One method's row of ``compare.json``."""
    row: dict[str, Any] = {"method": result.method, "status": result.status, "dir": result.method}
    if result.skipped:
        row["skipped"] = True
    if result.resumed:
        row["resumed"] = True
    if result.status != "ok" or result.result is None:
        if result.error:
            row["error"] = result.error
        return row
    r = result.result
    search, red = r.search, r.reduction
    row.update({
        "source": r.source,
        "accuracy": r.pruned.accuracy,
        "accuracy_before_finetune": r.finetune.accuracy_before,
        "accuracy_change_points": r.accuracy_change_points,
        "params": r.pruned.params, "macs": r.pruned.macs, "size_bytes": r.pruned.size_bytes,
        "params_reduction": red["params"], "macs_reduction": red["macs"], "size_reduction": red.get("size"),
        "speedup": {b: s["ratio"] for b, s in r.speedup.items()},
        "search_seconds": round(search.plan_seconds + search.seconds, 3), "plan_seconds": search.plan_seconds,
        "finetune_seconds": r.finetune.seconds, "finetune_epochs": r.finetune.epochs,
        "evaluations": search.evaluations, "unique_evaluations": search.unique_evaluations,
        "distinct_structures": search.distinct_structures, "spread": search.spread,
        "budget": search.budget, "seconds": r.seconds, "warnings": list(r.warnings),
    })
    return row


def _budget_text(config: PruneConfig, methods: Sequence[str]) -> str:
    if config.budget is not None:
        return f"{config.budget} candidate evaluations for every method"
    defaults = ", ".join(f"{m} {METHODS.get(m).default_budget}" for m in methods)
    return f"each method's own default ({defaults})"


def summarize(results: Mapping[str, MethodResult], methods: Sequence[str], config: PruneConfig,
              comparison: Comparison | None = None, *, seconds: float = 0.0,
              complete: bool = False) -> dict[str, Any]:
    """The content of ``compare.json`` for the results so far (methods not yet run are ``pending``)."""
    entries = [entry(results.get(m) or MethodResult(m, "pending")) for m in methods]
    done = [results[m].result for m in methods if m in results and results[m].result is not None]
    first = done[0] if done else None
    batches = list(first.base.latency) if first else [str(b) for b in sorted({1, config.latency_batch})]
    info = comparison.info if comparison else (first.info if first else {})
    architecture = (info.get("architecture") or {})
    return {
        "title": comparison.title if comparison else None,
        "model": architecture.get("name") or architecture.get("path") or architecture.get("class"),
        "dataset": (info.get("dataset") or {}).get("name"),
        "target": config.target.to_json(),
        "target_text": config.target.describe(),
        "budget": config.budget,
        "budget_text": _budget_text(config, methods),
        "finetune_epochs": config.finetune.epochs if config.finetune else 0,
        "seed": config.seed,
        "metric": first.metric if first else "accuracy",
        "base": ({"accuracy": first.base.accuracy, "params": first.base.params, "macs": first.base.macs,
                  "size_bytes": first.base.size_bytes} if first else None),
        "latency_device": first.latency_device if first else None,
        "latency_batch_sizes": batches,
        "methods": entries,
        "best": best_methods(entries, columns(batches)),
        "complete": complete,
        "seconds": round(seconds, 3),
        "invocation": dict(comparison.invocation) if comparison else {},
        "config": config.to_json(),
        "versions": {"autoprune": autoprune.__version__, "torch": torch.__version__},
    }


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
        Column("search_seconds", "search (s)", ("search_seconds",), 1, 1, "", better=""),
        Column("finetune_seconds", "fine-tune (s)", ("finetune_seconds",), 1, 1, "", better=""),
        Column("evaluations", "evals", ("evaluations",), 1, 0, "", better=""),
        Column("distinct", "distinct structures", ("distinct_structures",), 1, 0, "", better=""),
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
             "Best result per column marked (accuracy, reductions, size, speed-up; costs such as time and "
             "evaluations are not results and are not marked); "
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
    lines = [f"# {' '.join(str(title).split())}", "",  # one line: a newline in a user's title would end the heading
             f"Model {summary.get('model')} on {summary.get('dataset')}; target: {summary.get('target_text', '')}; "
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


def comparison_figures(results: Mapping[str, PruneResult]) -> dict[str, bytes]:
    """The comparison's figures (PNG bytes by file name) from the finished methods' results."""
    target = next(iter(results.values())).target
    return {
        **html_report.accuracy_figures(results),
        "channels.png": plots.channels_per_layer({m: [asdict(w) for w in r.widths] for m, r in results.items()}),
        "search.png": plots.search_progress({m: [row.score for row in r.history] for m, r in results.items()},
                                            ylabel=html_report.score_label(target)),
    }


def write_comparison(out: Path, summary: Mapping[str, Any], results: Mapping[str, MethodResult]) -> None:
    """Write the tables, the figures and ``report.html`` of a comparison (all atomic)."""
    write_tables(out, summary)
    finished = {e["method"]: results[e["method"]].result for e in summary["methods"]
                if e["status"] == "ok" and results[e["method"]].result is not None}
    figures: dict[str, bytes] = {}
    if finished:
        try:
            figures = comparison_figures(finished)  # type: ignore[arg-type]
        except Exception as exc:  # the tables are written; a broken figure must not hide them
            log.warning("could not draw the comparison figures: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
    html_report.write_figures(out, figures)
    table = comparison_table(summary)
    rows = [[(c.text, "best" if c.best else "failed" if c.failed else "") for c in row] for row in table.rows]
    write_text(out / "report.html", html_report.comparison_html(summary, table.headers, rows, figures,
                                                                notes=table.notes))
