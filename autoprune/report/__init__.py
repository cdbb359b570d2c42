"""Reports of a pruning run: ``report.json`` (everything measured), ``report.md`` (for people), and the
figures (``accuracy_macs.png``, ``channels.png``, ``search.png``) with a self-contained ``report.html``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from autoprune.io.artifact import write_json, write_text


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f} M"


def markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of one pruning run."""
    b, p = report["base"], report["pruned"]
    batches = list(b["latency_ms"])
    lines = [
        f"# autoprune: {report['method']} on {report.get('model')} / {report.get('dataset')}",
        "",
        f"Target: {report['target']}; method source: {report.get('source', '')}; seed {report['seed']}.",
        "",
        "| | accuracy (test) | params | MACs | size | " + " | ".join(f"latency b={x} (ms)" for x in batches) + " |",
        "|---|---|---|---|---|" + "---|" * len(batches),
    ]
    for name, side in (("base", b), ("pruned", p)):
        lat = " | ".join(f"{side['latency_ms'][x]:.3f}" for x in batches)
        lines.append(f"| {name} | {100 * side['accuracy']:.2f}% | {_mb(side['params'])} | {_mb(side['macs'])} | "
                     f"{side['size_bytes'] / 1024:.1f} KiB | {lat} |")
    red = report["reduction"]
    speed = ", ".join(f"{report['speedup'][x]:.2f}x at batch {x}" for x in batches)
    lines += [
        "",
        f"- Accuracy change: {report['accuracy_change_points']:+.2f} points "
        f"(before fine-tuning: {100 * p['accuracy_before_finetune']:.2f}%).",
        f"- MACs reduction {100 * red['macs']:.1f}%, params reduction {100 * red['params']:.1f}%, "
        f"file size reduction {100 * red.get('size', 0):.1f}%.",
        f"- Measured speed-up: {speed} ({report['latency']['device']}, median of {report['latency']['repeats']} "
        "interleaved runs).",
        f"- Search: {report['search']['strategy']}, {report['search']['evaluations']} evaluations "
        f"({report['search']['unique_evaluations']} unique) in {report['search']['seconds']:.1f} s; "
        f"fine-tuning {report['finetune']['epochs']} epochs in {report['finetune']['seconds']:.1f} s.",
        "",
        "| layer | channels before | after |",
        "|---|---|---|",
    ]
    lines += [f"| {row['name']} | {row['before']} | {row['after']} |" for row in report["layers"]]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, report: dict[str, Any]) -> None:
    """Write ``report.md``, the figures, ``report.html`` and last ``report.json`` into ``out`` atomically.

    ``report.json`` comes last, so its presence means the run's outputs are complete (``compare --resume``).
    """
    from autoprune.report.html import write_run_report  # matplotlib is imported only here

    write_text(out / "report.md", markdown(report))
    write_run_report(out, report)
    write_json(out / "report.json", report)
