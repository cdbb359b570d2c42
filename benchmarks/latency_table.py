"""Validate the per-layer latency table on a real model: predicted vs measured latency of pruned networks.

Builds :class:`autoprune.engine.latency_table.LatencyTable` for a registry model (random weights: latency
does not depend on them) at each batch size, draws random feasible keep vectors (uniform per group in
[space.lower, 1]) plus uniform ones, prunes each for real, times them interleaved with the base model,
and reports Pearson / Spearman correlation and the median / max error of the predictions, next to what
the MACs alone predict. With ``--ablation`` it also builds tables that time the convolutions without the
BatchNorm / activation after them, scored against the same measurements.

Usage (from the repository root):

    .venv/bin/python benchmarks/latency_table.py                       # ResNet-20, batch 1 and 64, 2 threads
    .venv/bin/python benchmarks/latency_table.py --ablation --out /tmp/lt

Writes ``results.json`` and ``README.md`` into ``--out`` (default ``benchmarks/results/latency_table``),
with the command, machine, date, versions and the load average while it ran: timings on a shared
machine are noisy, and the README says how busy it was.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.engine.latency import allocator, device_description, steady_allocator
from autoprune.engine.latency_table import (
    GRID_FRACTIONS,
    LatencyTable,
    TableOptions,
    Validation,
    pearson,
    spearman,
    validate,
)
from autoprune.engine.space import PruningSpace
from autoprune.io.files import write_json, write_text
from autoprune.models import create_model

log = logging.getLogger("latency_table")
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"conv+bn+act": (True, True), "conv+bn": (True, False), "conv": (False, False)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--setups", nargs="+", default=["2:wall"], metavar="THREADS:CLOCK",
                   help="thread count and clock of each measurement setup, e.g. 2:wall 1:process (CPU time, "
                        "which other processes' load does not inflate)")
    p.add_argument("--candidates", type=int, default=20, help="random keep vectors (plus uniform 0.3/0.5/0.7)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-repeats", type=int, default=12, help="timed rounds per layer configuration")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds of the validation")
    p.add_argument("--fractions", type=float, nargs="+", default=list(GRID_FRACTIONS))
    p.add_argument("--ablation", action="store_true", help="also score tables without the norm / activation")
    p.add_argument("--steady-allocator", action="store_true",
                   help="raise glibc's mmap / trim thresholds first (see autoprune.engine.latency.steady_allocator)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latency_table")
    return p.parse_args(argv)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def candidates(space: PruningSpace, count: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    rng = np.random.default_rng(seed)
    keeps = [space.snap(rng.uniform(space.lower, 1.0)) for _ in range(count)]
    names = [f"random {i}" for i in range(count)]
    for r in (0.3, 0.5, 0.7):
        keeps.append(space.snap(np.clip(np.full(len(space), r), space.lower, 1.0)))
        names.append(f"uniform {r}")
    return keeps, names


def score(predicted: np.ndarray, full_predicted: float, v: Validation) -> dict[str, float]:
    """The metrics of ``validate`` for other predictions of the same measured candidates."""
    measured_rel = np.asarray(v.measured_relative)
    rel = np.abs(predicted / full_predicted - measured_rel) / measured_rel
    absolute = np.abs(predicted - np.asarray(v.measured_ms)) / np.asarray(v.measured_ms)
    return {"pearson": round(pearson(predicted, measured_rel), 4),
            "spearman": round(spearman(predicted, measured_rel), 4),
            "median_error": round(float(np.median(absolute)), 4), "max_error": round(float(np.max(absolute)), 4),
            "relative_median_error": round(float(np.median(rel)), 4),
            "relative_max_error": round(float(np.max(rel)), 4)}


def run_batch(model: torch.nn.Module, x: torch.Tensor, space: PruningSpace, batch: int, threads: int, clock: str,
              args: argparse.Namespace, keeps: list[np.ndarray], scores: list[torch.Tensor]) -> dict[str, Any]:
    tables = {}
    for name, (norm, act) in VARIANTS.items():
        if name != "conv+bn+act" and not args.ablation:
            continue
        options = TableOptions(fractions=tuple(args.fractions), include_norm=norm, include_activation=act,
                               clock=clock, repeats=args.table_repeats)
        tables[name] = LatencyTable.build(model, x, space, batch_size=batch, threads=threads, options=options,
                                          progress=False)
        log.info("%d thread(s), %s clock, batch %d, %s: table built in %.1f s", threads, clock, batch, name,
                 tables[name].meta["build_seconds"])
    main = tables["conv+bn+act"]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    v = validate(main, model, space, scores, keeps, x, threads=threads, repeats=args.repeats)
    seconds = time.perf_counter() - start
    macs = np.array([space.relative_macs(k) for k in keeps])
    result = {
        "table": {k: main.meta[k] for k in ("build_seconds", "build_cpu_seconds", "points", "noisy_points",
                                           "full_model", "load_average")},
        "distinct_layers": len(main.entries), "layers": len(main.layers),
        "full_ms": round(main.full_ms, 4), "remainder_ms": round(main.remainder_ms, 4),
        "remainder_slope_ms": round(main.remainder_slope_ms, 4),
        "validation": {**v.to_json(), "seconds": round(seconds, 1), "load_average_at_start": round(load, 2)},
        "macs_only": score(macs, 1.0, v),
        "ablation": {name: {**score(np.array([t.predict(k) for k in keeps]), t.full_ms, v),
                            "build_seconds": t.meta["build_seconds"], "remainder_ms": round(t.remainder_ms, 3),
                            "remainder_slope_ms": round(t.remainder_slope_ms, 3)}
                     for name, t in tables.items()},
        "candidates": [{"predicted_relative": round(p / v.base_predicted_ms, 4), "measured_relative": round(m, 4),
                        "relative_macs": round(float(c), 4)}
                       for p, m, c in zip(v.predicted_ms, v.measured_relative, macs, strict=True)],
    }
    return result


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# Latency table validation: {summary['model']}", "",
             f"- Command: `{summary['command']}`",
             f"- Date: {summary['date']}",
             f"- Machine: {summary['machine']}; malloc: {summary['allocator']}",
             f"- Versions: torch {summary['torch']}, autoprune commit {summary['commit']}, Python {summary['python']}",
             f"- Load average (1 min) at start / end: {summary['load_start']} / {summary['load_end']} on "
             f"{summary['cores']} cores; wall time {summary['wall_seconds']:.0f} s",
             f"- Grid fractions {summary['fractions']}; {summary['table_repeats']} timed rounds per layer "
             f"configuration (one settling run before each), remainder calibrated on uniform keeps "
             f"{summary['calibrate']}; {summary['repeats']} timed rounds per validated candidate.",
             f"- Candidates: {summary['candidates']} random keep vectors (uniform per group in [lower, 1]) and "
             "uniform keeps 0.3 / 0.5 / 0.7, pruned for real (random weights), each timed interleaved with the "
             "base model (two networks per measurement, as a pruning run measures its speed-up). `err.` = "
             "|predicted - measured| / measured in milliseconds; `rel.` compares latency as a "
             "fraction of the base model's (measured: median per-round ratio candidate / base), which cancels "
             "load that changed between building the table and validating it. Correlations are against the "
             "measured relative latency. `MACs` scores the relative MACs as the prediction, for comparison.",
             "", summary["note"], "",
             "| setup | batch | build (s) | build CPU (s) | points (noisy) | full-model IQR | Pearson | Spearman "
             "| median err. | max err. | median err. rel. | max err. rel. | MACs Spearman | MACs median err. rel. |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setup, batches in summary["setups"].items():
        for b, r in batches.items():
            v, t, m = r["validation"], r["table"], r["macs_only"]
            lines.append(f"| {setup} | {b} | {t['build_seconds']:.1f} | {t['build_cpu_seconds']:.1f} | {t['points']} "
                         f"({t['noisy_points']}) | {100 * t['full_model']['relative_spread']:.0f}% | "
                         f"{v['pearson']:.3f} | {v['spearman']:.3f} | "
                         f"{100 * v['median_error']:.1f}% | {100 * v['max_error']:.1f}% | "
                         f"{100 * v['relative_median_error']:.1f}% | {100 * v['relative_max_error']:.1f}% | "
                         f"{m['spearman']:.3f} | {100 * m['relative_median_error']:.1f}% |")
    if any(len(r["ablation"]) > 1 for batches in summary["setups"].values() for r in batches.values()):
        lines += ["", "What each timed block holds (scored against the same measured candidates):", "",
                  "| setup | batch | block | Spearman | median err. rel. | max err. rel. | remainder (ms) "
                  "| build (s) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for setup, batches in summary["setups"].items():
            for b, r in batches.items():
                for name, a in r["ablation"].items():
                    lines.append(f"| {setup} | {b} | {name} | {a['spearman']:.3f} | "
                                 f"{100 * a['relative_median_error']:.1f}% | {100 * a['relative_max_error']:.1f}% | "
                                 f"{a['remainder_ms']:.3f} | {a['build_seconds']:.1f} |")
    lines += ["", "Setups are `threads:clock`: `wall` is elapsed time (the protocol's default), `process` the "
              "process's CPU time (1 thread), which other processes' load inflates far less.",
              "`results.json` holds, per setup and batch size, the table's build statistics (the full model's spread "
              "while it was built), the validation with every candidate's predicted and measured latency, "
              "and the same metrics for the MACs-only prediction.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    if args.steady_allocator and not steady_allocator():
        log.warning("could not change the allocator (not Linux glibc); timing with the default one")
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    model = create_model(args.model, num_classes=10, in_channels=3, image_size=(32, 32)).eval()
    x = torch.rand(1, 3, 32, 32)
    space = PruningSpace(model, x)
    keeps, _ = candidates(space, args.candidates, args.seed)
    scores = [torch.rand(g.channels) for g in space.groups]
    setups: dict[str, dict[str, Any]] = {}
    for setup in args.setups:
        threads, _, clock = setup.partition(":")
        results = setups.setdefault(f"{int(threads)}:{clock or 'wall'}", {})
        for b in args.batch_sizes:
            results[str(b)] = run_batch(model, x, space, b, int(threads), clock or "wall", args, keeps, scores)
    load_end = os.getloadavg()[0]
    busy = max(load_start, load_end) > 1.5 * (os.cpu_count() or 1)
    summary = {
        "model": args.model, "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{device_description('cpu', 1).rsplit(' (', 1)[0]}, {os.cpu_count()} logical cores, "
                   f"{platform.system()} {platform.release()}",
        "allocator": allocator(), "cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(), "load_start": round(load_start, 2), "load_end": round(load_end, 2),
        "wall_seconds": round(time.perf_counter() - start, 1), "candidates": args.candidates,
        "fractions": [round(f, 4) for f in args.fractions], "table_repeats": args.table_repeats,
        "calibrate": list(TableOptions().calibrate),
        "repeats": args.repeats,
        "note": ("**Measured on a busy machine** (other processes shared the 2 cores: see the load average): "
                 "wall-clock milliseconds and build times are inflated and noisy, two-threaded ones most; the "
                 "relative numbers are paired per round and the `1:process` setup counts CPU time, both far "
                 "less affected. To be re-run on a quiet machine."
                 if busy else "The machine was quiet (load average below 1.5x the core count)."),
        "setups": setups,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", summary)
    text = markdown(summary)
    write_text(args.out / "README.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
