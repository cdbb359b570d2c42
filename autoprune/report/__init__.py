"""Reports of a pruning run: ``report.json`` (everything measured), ``report.md`` (for people), and the
figures (``accuracy_macs.png``, ``channels.png``, ``search.png``) with a self-contained ``report.html``."""

from __future__ import annotations

from pathlib import Path

from autoprune.engine.result import PruneResult
from autoprune.io.files import read_json, write_json, write_text

#: File names of the figures, in the order they appear on a page.
FIGURES = {
    "accuracy_macs.png": "Accuracy against MACs",
    "accuracy_latency.png": "Accuracy against measured latency",
    "channels.png": "Channels kept per layer",
    "search.png": "Search progress: best fitness against evaluations",
}
#: The reports a run or a comparison writes besides its figures.
REPORTS = ("report.md", "report.html", "report.json")
#: the largest report.json read back
REPORT_LIMIT = 256 * 2**20


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} M"


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def latency_text(entry: dict) -> str:
    """``12.3 (11.9-12.8)``: median milliseconds with the interquartile range."""
    text = f"{entry['median_ms']:.3f}"
    return text + (f" ({entry['q1_ms']:.3f}-{entry['q3_ms']:.3f})" if "q1_ms" in entry else "")


def markdown(result: PruneResult) -> str:
    """A short human-readable summary of one pruning run."""
    from autoprune.report.html import finetune_text, model_name, selection_text, speedup_text

    b, p = result.base, result.pruned
    batches = list(b.latency)
    change = result.accuracy_change_points
    lines = [
        f"# autoprune: {result.method} on {model_name(result)}",
        "",
        f"Target: {result.target.describe()}. Method: {result.method} ({result.source}); seed {result.seed}.",
        "",
        f"| | {result.metric} | params | MACs | size | "
        + " | ".join(f"latency b={x} (ms)" for x in batches) + " |",
        "|---|---|---|---|---|" + "---|" * len(batches),
    ]
    for name, side in (("base", b), ("pruned", p)):
        lat = " | ".join(latency_text(side.latency[x]) for x in batches)
        lines.append(f"| {name} | {_pct(side.accuracy)} | {_mb(side.params)} | {_mb(side.macs)} | "
                     f"{(side.size_bytes or 0) / 1024:.1f} KiB | {lat} |")
    red = result.reduction
    speed = ", ".join(f"{speedup_text(result.speedup[x])} at batch {x}" for x in batches)
    search = result.search
    lines += [
        "",
        f"- {result.metric.capitalize()} change: "
        + (f"{change:+.2f} points" if change is not None else "n/a")
        + f" (before fine-tuning: {_pct(result.finetune.accuracy_before)}).",
        f"- MACs reduction {100 * red['macs']:.1f}%, params reduction {100 * red['params']:.1f}%, "
        f"file size reduction {100 * red.get('size', 0):.1f}%.",
        f"- Measured speed-up: {speed} ({result.latency_device}; median of {result.config.latency_repeats} paired "
        "interleaved runs, interquartile range in brackets; `noisy` marks a measurement too spread to trust).",
        f"- Search: {search.strategy}, {_count(search.evaluations, 'evaluation')} ({search.unique_evaluations} "
        f"unique, {_count(search.distinct_structures, 'distinct structure')}) in {search.seconds:.1f} s"
        f"{selection_text(search.selection)}; fine-tuning: {finetune_text(result.finetune)}.",
    ]
    lines += [f"- **Warning:** {w}" for w in result.warnings]
    lines += ["", "| layer | channels before | after |", "|---|---|---|"]
    lines += [f"| {w.name} | {w.before} | {w.after} |" for w in result.widths]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, result: PruneResult) -> None:
    """Write ``report.md``, the figures, ``report.html`` and last ``report.json`` into ``out`` atomically.

    ``report.json`` comes last, so its presence means the run's outputs are complete (``compare --resume``).
    """
    from autoprune.report.html import write_run_report  # matplotlib is imported only here

    write_text(out / "report.md", markdown(result))
    write_run_report(out, result)
    write_json(out / "report.json", result.to_json())


def read_report(path: Path) -> PruneResult | None:
    """A finished run's result from its ``report.json`` (None when absent or unreadable)."""
    from autoprune.runs.job import read_history

    file = path / "report.json"
    if not file.exists():
        return None
    try:
        data = read_json(file, limit=REPORT_LIMIT)
        return PruneResult.from_json(data, read_history(path / "history.jsonl"))
    except (OSError, ValueError):  # (an AutopruneError is a ValueError)
        return None
