"""Latency as a target: ``latency_reduction`` against a MACs target set to the same measured speed-up.

One seed, ResNet-20 on CIFAR-10 (JPEG q75, quick schedule: the 15-epoch base trained on 10,000 images).

1. ``latency_reduction=R`` at ``--batch``: the engine searches with the per-layer latency table and checks
   the chosen structure by measurement (shrinking it while it misses). Recorded: the table's predicted
   relative latency of the structure and the measured one.
2. ``macs_reduction=r`` runs with the same method, budget and seed, for ``r`` bisected until the
   MACs-targeted structure is measured at least as fast as the latency-targeted one at ``--batch``.
3. Both structures (and the fastest MACs-targeted one tried) are re-measured independently, interleaved
   with the base model at batch 1 and ``--batch`` with more repeats, then fine-tuned by one shared loop
   and measured on the test split.

Usage (from the repository root)::

    .venv/bin/python benchmarks/latency_target.py --model /path/resnet20_c10q.pt --data-dir /path/cifar10

Writes ``results.json`` and ``README.md`` into ``--out`` (default ``benchmarks/results/latency_target``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("latency_target")
ROOT = Path(__file__).resolve().parent.parent


def choose(args: argparse.Namespace, inputs: Any, target: Any, method: str) -> Any:
    """The structure ``method`` chooses for ``target`` (no fine-tuning), with its measured speed-ups."""
    from autoprune.api import execute
    from autoprune.engine.config import PruneConfig
    from autoprune.engine.prune import Data
    from autoprune.methods import create_method

    config = PruneConfig(method=method, target=target, budget=args.budget, val_samples=1000, finetune=None,
                         seed=args.seed, latency_batch=args.batch, latency_repeats=args.repeats,
                         threads=args.threads)
    data = inputs.data
    begun = time.perf_counter()
    result = execute(inputs.model, inputs.example_inputs, config, create_method(method, {}),
                     Data(train=data.train, val=data.val, test=data.test), device=torch.device("cpu"))
    log.info("%s: %.2fx at batch %d (%.0f s)", target.describe(), result.speedup[str(args.batch)]["ratio"],
             args.batch, time.perf_counter() - begun)
    return result


def summary(result: Any, batch: int) -> dict[str, Any]:
    """What the engine reported about one chosen structure."""
    predicted = [row.latency_ms for row in result.history if row.latency_ms is not None]
    return {"macs_reduction": 1 - result.pruned.macs / result.base.macs,
            "params_reduction": 1 - result.pruned.params / result.base.params,
            "engine_speedup": {k: dict(v) for k, v in result.speedup.items()},
            "val_accuracy_before_finetune": result.search.best.accuracy,
            "predicted_latency_ms_in_history": predicted[-1] if predicted else None,
            "widths": [[w.name, w.before, w.after] for w in result.widths],
            "warnings": list(result.warnings), "notes": dict(result.search.notes)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/bench/resnet20_c10q.pt")
    parser.add_argument("--data-dir", default="/tmp/c10")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--latency-reduction", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--method", default="pso")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds in the engine's own measurement")
    parser.add_argument("--remeasure-repeats", type=int, default=60)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--bisect", type=int, default=4, help="MACs-targeted runs at most")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_target"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)

    from autoprune.engine.config import Target
    from autoprune.engine.latency import device_description, measure_latency, speedups
    from autoprune.engine.train import TrainConfig, evaluate, fit
    from autoprune.io.files import write_json, write_text
    from autoprune.runs.inputs import load_inputs

    inputs = load_inputs(args.model, dataset="cifar10", data_dir=args.data_dir, val_fraction=0.1, limit=args.limit,
                         seed=args.seed, batch_size=128, device=torch.device("cpu"))
    loads = [os.getloadavg()[0]]
    by_latency = choose(args, inputs, Target(latency_reduction=args.latency_reduction), args.method)
    goal = by_latency.speedup[str(args.batch)]["ratio"]

    # bisect the MACs reduction for the same measured speed-up at the batch size
    low, high = 0.2, 0.9
    macs_runs: list[tuple[float, Any]] = []
    r = 1 - by_latency.pruned.macs / by_latency.base.macs  # first try: as many MACs as the latency target removed
    for _ in range(args.bisect):
        loads.append(os.getloadavg()[0])
        result = choose(args, inputs, Target(macs_reduction=round(r, 4)), args.method)
        macs_runs.append((r, result))
        if result.speedup[str(args.batch)]["ratio"] >= goal:
            high = r
        else:
            low = r
        r = 0.5 * (low + high)
    fast_enough = [(r, res) for r, res in macs_runs if res.speedup[str(args.batch)]["ratio"] >= goal]
    by_macs_r, by_macs = min(fast_enough, key=lambda x: x[0]) if fast_enough else max(
        macs_runs, key=lambda x: x[1].speedup[str(args.batch)]["ratio"])

    # independent re-measurement, interleaved with the base
    base = inputs.model.eval()
    loads.append(os.getloadavg()[0])
    timings = measure_latency([base, by_latency.model.eval(), by_macs.model.eval()], inputs.example_inputs,
                              batch_sizes=(1, args.batch), threads=args.threads, repeats=args.remeasure_repeats)
    remeasured = {name: {str(b): s.to_json() for b, s in speedups(timings[0], timings[i]).items()}
                  for i, name in ((1, "latency_target"), (2, "macs_target"))}
    base_ms = {str(b): t.to_json() for b, t in timings[0].items()}

    # one shared fine-tuning loop, then the test split
    schedule = TrainConfig(epochs=args.finetune_epochs, lr=0.01, batch_size=128, seed=args.seed)
    tested = {}
    for name, result in (("latency_target", by_latency), ("macs_target", by_macs)):
        loads.append(os.getloadavg()[0])
        fit(result.model, inputs.data.train, schedule, progress=False)
        tested[name] = evaluate(result.model, inputs.data.test).accuracy
        log.info("%s: test accuracy %.2f%% after %d epochs", name, 100 * tested[name], args.finetune_epochs)
    base_test = by_latency.base.accuracy

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    record = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {device_description(torch.device('cpu'))}",
        "threads": args.threads, "loads": loads, "torch": torch.__version__, "args": vars(args),
        "base": {"test_accuracy": base_test, "latency_ms": base_ms},
        "latency_target": {**summary(by_latency, args.batch), "test_accuracy": tested["latency_target"],
                           "remeasured_speedup": remeasured["latency_target"]},
        "macs_target": {**summary(by_macs, args.batch), "asked_macs_reduction": by_macs_r,
                        "test_accuracy": tested["macs_target"], "remeasured_speedup": remeasured["macs_target"]},
        "macs_bisection": [{"macs_reduction": r, "speedup": res.speedup[str(args.batch)]["ratio"],
                            "val_accuracy_before_finetune": res.search.best.accuracy} for r, res in macs_runs],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", record)
    write_text(out / "README.md", readme(record, args))
    print((out / "README.md").read_text())
    return 0


def readme(rec: dict[str, Any], args: argparse.Namespace) -> str:
    b = str(args.batch)

    batches = ["1"] if b == "1" else ["1", b]

    def row(name: str) -> str:
        r = rec[name]
        speeds = " | ".join(f"{s['ratio']:.2f}x ({s['q1']:.2f}-{s['q3']:.2f})"
                            for s in (r["remeasured_speedup"][x] for x in batches))
        return (f"| {name.replace('_', ' ')} | {100 * r['macs_reduction']:.1f}% | {speeds} | "
                f"{r['engine_speedup'][b]['ratio']:.2f}x | {100 * r['test_accuracy']:.2f}% | "
                f"{100 * (r['test_accuracy'] - rec['base']['test_accuracy']):+.2f} |")

    lat = rec["latency_target"]
    check = {k: v for k, v in lat["notes"].items() if k.startswith("latency")}
    lines = [
        "# Latency target vs MACs target at the same measured speed-up",
        "",
        f"ResNet-20, CIFAR-10 (JPEG q75, quick schedule: base trained 15 epochs on 10,000 images, test "
        f"{100 * rec['base']['test_accuracy']:.2f}%); method `{args.method}`, budget {args.budget}, "
        f"seed {args.seed}; "
        f"`latency_reduction={args.latency_reduction}` at batch {b} against `macs_reduction` bisected "
        f"({args.bisect} runs) to the smallest reduction measured at least as fast at batch {b}. Both structures "
        f"fine-tuned by one loop ({args.finetune_epochs} epochs, SGD lr 0.01), measured on the 10,000 test images.",
        "",
        "Speed-ups re-measured independently after the runs (interleaved with the base, "
        f"{args.remeasure_repeats} rounds, {args.threads} thread(s); median and interquartile range of the "
        "paired ratios):",
        "",
        "| target | MACs removed | " + " | ".join(f"speed-up b={x}" for x in batches)
        + f" | engine's own b={b} | test | Δ vs base (pts) |",
        "|---|---|" + "---|" * len(batches) + "---|---|---|",
        row("latency_target"), row("macs_target"),
        "",
        "MACs bisection (speed-up at batch " + b + " as the engine measured it): "
        + ", ".join(f"{100 * m['macs_reduction']:.1f}% → {m['speedup']:.2f}x" for m in rec["macs_bisection"]),
        "",
        f"Latency table: predicted relative latency of the chosen structure "
        f"{check.get('latency_predicted_relative', 'n/a')}; the engine's check after the search: "
        f"`{json.dumps(check)}`.",
        "",
        f"Warnings of the latency-targeted run: {lat['warnings'] or 'none'}.",
        "",
        f"Command: `{rec['command']}`  ",
        f"Machine: {rec['machine']}; torch {rec['torch']}; "
        f"load averages while running {[round(x, 1) for x in rec['loads']]}  ",
        f"Date: {rec['date']}; commit {rec['commit']}. One seed: a single comparison, not a mean.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
