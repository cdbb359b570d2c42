"""Fine-tuning noise: one chosen structure, fine-tuned by the shared loop under several fine-tuning seeds.

``search_quality.py`` fine-tunes each (seed, method) structure once, with the run's seed; the spread of its
table mixes the search's choice with the luck of one fine-tuning run. This script separates them: the
structure ``method`` chooses for ``--seed`` (same data split and search as ``search_quality.py``) is
fine-tuned with each of ``--finetune-seeds`` (the order and augmentation of the training batches; the run's
own seed reproduces ``search_quality.py``), and the spread of the
test accuracies is the fine-tuning noise of that structure.

Usage (from the repository root)::

    .venv/bin/python benchmarks/finetune_noise.py lenet5 --method ssa --seed 2 --finetune-seeds 2 100 101 102

Writes ``benchmarks/results/finetune_noise/<preset>_<method>_seed<seed>.json`` and prints the summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time

from search_quality import PRESETS, RESULTS, choose, load, shared_finetune

log = logging.getLogger("finetune_noise")
OUT = RESULTS.parent / "finetune_noise"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--method", required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split and the search")
    parser.add_argument("--finetune-seeds", type=int, nargs="+", required=True)
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="a PruneConfig field for the search, JSON value (e.g. select_top=0); repeatable")
    parser.add_argument("--tag", default="", help="suffix of the result file (variants of an experiment)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from autoprune.engine.train import evaluate

    preset = PRESETS[args.preset]
    inputs = load(preset, args.seed)
    engine_options = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.engine)}
    result = choose(preset, inputs, args.seed, args.method, preset.budget, {}, engine_options)
    extra = int(result.search.notes.get("extra_training_epochs", 0))
    rows = []
    for finetune_seed in args.finetune_seeds:
        model = copy.deepcopy(result.model)
        seconds = shared_finetune(model, inputs, preset, preset.finetune_epochs - extra, finetune_seed)
        test = evaluate(model, inputs.data.test).accuracy
        rows.append({"finetune_seed": finetune_seed, "test": test,
                     "delta_points": 100 * (test - result.base.accuracy), "seconds": seconds})
        log.info("fine-tuning seed %d: %.2f%% (%+.2f points)", finetune_seed, 100 * test, rows[-1]["delta_points"])
    deltas = [r["delta_points"] for r in rows]
    summary = {
        "preset": args.preset, "method": args.method, "seed": args.seed, "engine_options": engine_options,
        "widths": [[w.name, w.before, w.after] for w in result.widths],
        "macs_reduction": 1 - result.pruned.macs / result.base.macs, "base_test": result.base.accuracy,
        "runs": rows, "mean_delta": statistics.mean(deltas),
        "std_delta": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
        "range_delta": max(deltas) - min(deltas),
        "command": "benchmarks/finetune_noise.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{args.preset}_{args.method}_seed{args.seed}{f'_{args.tag}' if args.tag else ''}.json"
    path.write_text(json.dumps(summary, indent=1))
    log.info("%s: %+.2f ± %.2f points over %d fine-tuning seeds (range %.2f); %s", path.name, summary["mean_delta"],
             summary["std_delta"], len(rows), summary["range_delta"], summary["widths"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
