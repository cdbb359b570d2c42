"""Scores at the top of a search: do they rank the structures a search ends among as the long fine-tune does?

``score_fidelity.py`` measures how well a score ranks random structures at the target (the bulk). A search
picks from its own top, where structures are close and the candidate score's bias decides. This script takes
given structures (e.g. a search's best distinct ones), scores each with several scores (the engine's
``Evaluator``, as a search does), fine-tunes each with the search-quality benchmark's shared schedule and
reports, per score, Kendall tau against the test accuracy and the test accuracy of the structure it would pick.

Usage (from the repository root; LeNet-5 / MNIST at 90% of the MACs removed)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/top_of_search.py STRUCTURES.json --seed 4 --part 0 --parts 2 \
        --out benchmarks/results/top_of_search/lenet5_seed4_part0.json

``STRUCTURES.json``: a list of channel-count lists, one per structure. ``--part``/``--parts`` split the
structures between processes run side by side; ``--summarise`` reads the parts back and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import search_quality
import torch
from scipy.stats import kendalltau

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: label -> (registered score, options)
SCORES = {
    "acc": ("none", {}), "kl": ("kl", {}),
    "ft10": ("finetune", {"steps": 10}), "ft30": ("finetune", {"steps": 30}),
    "ft100": ("finetune", {"steps": 100}), "ft300": ("finetune", {"steps": 300}),
    "ft30lr05": ("finetune", {"steps": 30, "lr": 0.05}), "ft30d1": ("finetune", {"steps": 30, "distill": 1.0}),
    "ft100acc": ("finetune", {"steps": 100, "metric": "accuracy"}),
}


def measure(structures: list[list[int]], seed: int, out: Path) -> None:
    from autoprune.engine.config import PruneConfig, Target
    from autoprune.engine.evaluate import Evaluator, choose_physical
    from autoprune.engine.prune import make_plan, prepare
    from autoprune.engine.scoring import create_score
    from autoprune.engine.train import evaluate
    from autoprune.methods import create_method

    torch.set_num_threads(1)
    preset = search_quality.PRESETS["lenet5"]
    inputs = search_quality.load(preset, seed)
    data = inputs.data
    # the search-quality benchmark's validation sample; select_top: hold the training batches every score needs
    config = PruneConfig(method="ssa", target=Target(macs_reduction=preset.macs_reduction), seed=seed,
                         val_samples=search_quality.VAL_SAMPLES, score="finetune", select_top=8)
    setup = prepare(inputs.model, inputs.example_inputs, config, data, search_quality.DEVICE)
    plan, _ = make_plan(create_method("ssa"), setup, config, data.train, progress=False)
    rows = [{"counts": counts, "scores": {}} for counts in structures]
    for label, (name, options) in SCORES.items():
        evaluator = Evaluator(plan.model, setup.space, plan.scores, setup.val, setup.calibration,
                              score=create_score(name, options), train=setup.train, seed=seed)
        evaluator.physical = choose_physical(evaluator)
        for row in rows:
            row["scores"][label] = evaluator(np.array(row["counts"], float) / setup.space.channels).ranking
    for row in rows:
        pruned = setup.space.apply(plan.model, np.array(row["counts"], float) / setup.space.channels, plan.scores)
        search_quality.shared_finetune(pruned, inputs, preset, preset.finetune_epochs, seed)
        row["test"] = evaluate(pruned, data.test).accuracy
        out.write_text(json.dumps(rows, indent=1) + "\n")


def summarise(parts: list[Path]) -> str:
    rows = [row for part in parts for row in json.loads(part.read_text())]
    test = np.array([row["test"] for row in rows])
    lines = ["| score | Kendall tau | its pick | pick's test accuracy | regret (points) |", "|---|---|---|---|---|"]
    for label in SCORES:
        values = np.array([row["scores"][label] for row in rows])
        pick = int(np.argmax(values))
        lines.append(f"| {label} | {kendalltau(values, test)[0]:.3f} | {rows[pick]['counts']} | "
                     f"{100 * test[pick]:.2f}% | {100 * (test.max() - test[pick]):.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("structures", nargs="+", help="STRUCTURES.json (or, with --summarise, the part files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--out", help="the part's JSON file")
    parser.add_argument("--summarise", action="store_true")
    args = parser.parse_args()
    if args.summarise:
        print(summarise([Path(p) for p in args.structures]))
        return 0
    structures = json.loads(Path(args.structures[0]).read_text())[args.part::args.parts]
    measure(structures, args.seed, Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
