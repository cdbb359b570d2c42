"""Score fidelity: does a candidate score rank pruned structures the way their fine-tuned accuracy does?

For one trained base model and one MACs target, this samples N feasible structures (uniform random keep
vectors pushed onto the budget, the uniform structure, and deliberately bad allocations that squeeze one
group to its minimum width, so that the range of outcomes is real), prunes each physically (L1 channel
choice, as the ``random`` method does), fine-tunes each with the benchmark schedule (one shared loop) and
measures its test accuracy. Every candidate score (:mod:`autoprune.engine.scoring`) is computed for every
structure, exactly as the engine's evaluator computes it during a search, and timed; the multi-fidelity
selection (successive halving over the cheap score's best) is run too. It reports, per score, Kendall's
tau-b and Spearman's rho against the final test accuracy, the seconds per candidate, and the regret of
picking the score's best (final accuracy points below the best structure's).

Usage (from the repository root)::

    .venv/bin/python benchmarks/score_fidelity.py lenet5          # LeNet-5 / MNIST, 90% MACs removed
    .venv/bin/python benchmarks/score_fidelity.py resnet20        # ResNet-20 / CIFAR-10 (JPEG q75), 60%
    .venv/bin/python benchmarks/score_fidelity.py resnet20 --n 32 --seed 1 --threads 2

Results go to ``benchmarks/results/score_fidelity/<bench>_seed<seed>/`` (``summary.md``, ``summary.json``,
``structures.jsonl``: one row per structure with every score); an interrupted run continues where it
stopped (finished structures and scores are read back from ``structures.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autoprune.engine.config import PruneConfig, Target  # noqa: E402
from autoprune.engine.evaluate import Evaluator, choose_physical  # noqa: E402
from autoprune.engine.prune import Data, Setup, make_plan, prepare, uniform_candidate  # noqa: E402
from autoprune.engine.scoring import (  # noqa: E402
    DEFAULT_SCORE,
    DEFAULT_SELECT_STEPS,
    DEFAULT_SELECT_TOP,
    SELECT_ETA,
    create_score,
    resolve_score,
    selection_score,
    selection_steps,
    successive_halving,
)
from autoprune.engine.train import TrainConfig, evaluate, fit  # noqa: E402
from autoprune.methods import create_method  # noqa: E402
from autoprune.runs.inputs import load_inputs  # noqa: E402
from autoprune.search import Problem  # noqa: E402

log = logging.getLogger("score_fidelity")

RESULTS = ROOT / "benchmarks" / "results" / "score_fidelity"


@dataclass(frozen=True)
class Bench:
    """One benchmark: base model, data, target and the fine-tuning schedule every structure gets."""

    label: str
    model: str
    dataset: str
    data_dir: str
    limit: int | None
    reduction: float
    epochs: int
    distill: float
    scores: tuple[str, ...]


BENCHES = {
    "lenet5": Bench("LeNet-5 / MNIST", "/work/bench/lenet5_mnist.pt", "mnist", "/work/shared/data/mnist", None,
                    0.9, epochs=16, distill=0.5, scores=("none", "bn", "loss", "kl", "auto", "finetune-10-kl",
                                                         "finetune-30-kl", "finetune-30-acc", "finetune-100-kl")),
    "resnet20": Bench("ResNet-20 / CIFAR-10 (JPEG q75)", "/work/bench/resnet20_c10q.pt", "cifar10", "/tmp/c10",
                      10000, 0.6, epochs=3, distill=0.0,
                      scores=("none", "bn", "loss", "kl", "auto", "finetune-10-kl", "finetune-30-kl",
                              "finetune-30-acc")),
}


@dataclass(frozen=True)
class Spec:
    """A score to measure: a label, the registered name and its options."""

    label: str
    score: str
    options: dict[str, Any] = field(default_factory=dict)


#: Every registered score; the fine-tune score at several lengths and with two metrics (each benchmark
#: measures the ones its ``scores`` name: 100 fine-tuning steps of ResNet-20 per structure is half the
#: benchmark's own 3-epoch schedule, so that one is left out there).
SPECS = [
    Spec("none", "none"), Spec("bn", "bn"), Spec("loss", "loss"), Spec("kl", "kl"), Spec("auto", "auto"),
    Spec("finetune-10-kl", "finetune", {"steps": 10}),
    Spec("finetune-30-kl", "finetune", {"steps": 30}),
    Spec("finetune-30-loss", "finetune", {"steps": 30, "metric": "loss"}),
    Spec("finetune-30-acc", "finetune", {"steps": 30, "metric": "accuracy"}),
    Spec("finetune-100-kl", "finetune", {"steps": 100}),
]
#: The cheap scores the multi-fidelity selection is benchmarked on.
SELECTION_CHEAP = ("bn", "kl", "auto")


def machine() -> dict[str, Any]:
    """CPU model, cores, load and versions, for the header."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": commit, "python": platform.python_version()}


def sample_structures(problem: Problem, n: int, seed: int) -> list[np.ndarray]:
    """``n`` distinct feasible structures on the budget: uniform, one group squeezed, random."""
    rng = np.random.default_rng(seed)
    lower, upper = problem.lower, problem.upper
    out: list[np.ndarray] = []
    seen: set[tuple[float, ...]] = set()

    def add(x: np.ndarray) -> None:
        key = tuple(np.round(x, 6))
        if key not in seen and len(out) < n:
            seen.add(key)
            out.append(x)

    uniform = uniform_candidate(problem)
    assert uniform is not None
    add(uniform)
    squeezed = rng.permutation(problem.dim)[: max(1, n // 4)]
    for g in squeezed:  # deliberately bad: one group at its minimum width, the others as wide as the budget allows
        x = upper.copy()
        x[g] = lower[g]
        add(problem.place(x, fill=True))
    for _ in range(50 * n):
        if len(out) >= n:
            break
        add(problem.place(rng.uniform(lower, upper), fill=True))
    return out


def read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """Finished structures (by their counts) of an interrupted run."""
    rows: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["key"]] = row
    return rows


def write_rows(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows.values()))
    tmp.replace(path)


def correlation(scores: list[float], final: list[float]) -> dict[str, float]:
    """Kendall tau-b and Spearman rho (with p-values) of a score against the final accuracy."""
    tau = stats.kendalltau(scores, final)
    rho = stats.spearmanr(scores, final)
    return {"tau": float(tau.statistic), "tau_p": float(tau.pvalue), "rho": float(rho.statistic),
            "rho_p": float(rho.pvalue)}


def pick_regret(scores: list[float], final: list[float]) -> float:
    """Points of final accuracy lost by taking the structure the score ranks first (ties: the first)."""
    return 100 * (max(final) - final[int(np.argmax(scores))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=sorted(BENCHES))
    parser.add_argument("--n", type=int, default=24, help="structures sampled (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, sampling and training")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine two threads were 3x slower)")
    parser.add_argument("--scores", help="comma-separated labels of the scores to measure (default: the benchmark's)")
    parser.add_argument("--out", help="output directory (default benchmarks/results/score_fidelity/<bench>_seed<seed>)")
    parser.add_argument("--model", help="base model file (default: the benchmark's)")
    parser.add_argument("--rescore", action="store_true",
                        help="measure every score again (keeps the fine-tuned accuracies): timings in one quiet run")
    parser.add_argument("--no-selection", action="store_true",
                        help="leave out the successive-halving selection (its fine-tunes cost minutes per score)")
    parser.add_argument("--stored", action="store_true",
                        help="score the structures already in the output's structures.jsonl instead of sampling")
    parser.add_argument("--limit", type=int, help="smoke tests only: fewer images (results not comparable)")
    parser.add_argument("--epochs", type=int, help="smoke tests only: fewer fine-tuning epochs (not comparable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("autoprune").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    bench = BENCHES[args.bench]
    if args.limit is not None or args.epochs is not None:
        log.warning("--limit / --epochs: a smoke test, not the benchmark")
        epochs = bench.epochs if args.epochs is None else args.epochs
        bench = replace(bench, limit=args.limit or bench.limit, epochs=epochs)
    out = Path(args.out) if args.out else RESULTS / f"{args.bench}_seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    wanted = args.scores.split(",") if args.scores else bench.scores
    specs = [s for s in SPECS if s.label in wanted]
    started = time.perf_counter()
    loads: list[float] = [os.getloadavg()[0]]

    device = torch.device("cpu")
    inputs = load_inputs(args.model or bench.model, dataset=bench.dataset, data_dir=bench.data_dir, val_fraction=0.1,
                         limit=bench.limit, seed=args.seed, batch_size=128, device=device)
    data: Data = inputs.data
    config = PruneConfig(method="random", target=Target(macs_reduction=bench.reduction), seed=args.seed,
                         score="finetune", select_top=8)  # holds the training batches every score needs
    setup: Setup = prepare(inputs.model, inputs.example_inputs, config, data, device)
    plan, _ = make_plan(create_method("random"), setup, config, data.train, progress=False)
    problem = Problem(lower=setup.space.lower, upper=setup.space.upper, cost=setup.space.relative_macs,
                      snap=setup.space.snap, base_accuracy=setup.base_score, max_cost=1 - bench.reduction)
    if args.stored:  # the structures an earlier run sampled (and fine-tuned), e.g. before the MACs definition changed
        stored = sorted(read_rows(out / "structures.jsonl").values(), key=lambda row: row["index"])
        if not stored:
            parser.error(f"--stored: no structures in {out / 'structures.jsonl'}")
        structures = [np.asarray(row["keep"]) for row in stored]
        changed = [row["key"] for row in stored
                   if ",".join(str(int(c)) for c in setup.space.counts(np.asarray(row["keep"]))) != row["key"]]
        if changed:
            parser.error(f"--stored: {len(changed)} stored structures no longer have their counts, e.g. {changed[0]}")
    else:
        structures = sample_structures(problem, args.n, args.seed)
    log.info("%s: %d groups, base validation accuracy %.2f%%, %d structures at %.0f%% MACs removed, "
             "%d validation / %d calibration / %d training samples held", bench.label, len(setup.space),
             100 * setup.base_score, len(structures), 100 * bench.reduction, sum(int(t.shape[0]) for _, t in setup.val),
             sum(int(x.shape[0]) for x in setup.calibration), sum(int(t.shape[0]) for _, t in setup.train))

    path = out / "structures.jsonl"
    rows = read_rows(path)
    keys = []
    for i, keep in enumerate(structures):
        counts = [int(c) for c in setup.space.counts(keep)]
        key = ",".join(map(str, counts))
        keys.append(key)
        rows.setdefault(key, {"key": key, "index": i, "counts": counts, "keep": [float(v) for v in keep],
                              "relative_macs": setup.space.relative_macs(keep),
                              "kind": "uniform" if i == 0 else ("squeezed" if i <= max(1, args.n // 4) else "random"),
                              "scores": {}})

    if args.rescore:
        for k in keys:
            rows[k]["scores"] = {}
    # 1. the scores, through the engine's evaluator (one per score, as a search would build it)
    for spec in specs:
        todo = [k for k in keys if spec.label not in rows[k]["scores"]]
        if not todo:
            continue
        evaluator = Evaluator(plan.model, setup.space, plan.scores, setup.val, setup.calibration,
                              score=create_score(spec.score, spec.options), train=setup.train, seed=args.seed)
        evaluator.physical = choose_physical(evaluator)
        evaluator.measure(problem.clip(0.5 * (problem.lower + problem.upper)))  # warm-up (first backward: ~10 s)
        for k in todo:
            keep = np.asarray(rows[k]["keep"])
            begun, cpu = time.perf_counter(), time.process_time()
            fitness = evaluator(keep)
            rows[k]["scores"][spec.label] = {"value": fitness.ranking, "accuracy": fitness.accuracy,
                                             "seconds": time.perf_counter() - begun,
                                             "cpu_seconds": time.process_time() - cpu}
        write_rows(path, rows)
        loads.append(os.getloadavg()[0])
        log.info("score %-18s %6.2f s (%.2f CPU s) per candidate", spec.label,
                 np.mean([rows[k]["scores"][spec.label]["seconds"] for k in keys]),
                 np.mean([rows[k]["scores"][spec.label]["cpu_seconds"] for k in keys]))

    # 2. the benchmark fine-tuning of every structure, then its test accuracy
    schedule = TrainConfig(epochs=bench.epochs, lr=0.01, batch_size=128, distill=bench.distill, seed=args.seed)
    for n, k in enumerate(keys):
        if "test_accuracy" in rows[k]:
            continue
        loads.append(os.getloadavg()[0])
        begun, cpu = time.perf_counter(), time.process_time()
        pruned = setup.space.apply(plan.model, np.asarray(rows[k]["keep"]), plan.scores)
        fit(pruned, data.train, schedule, teacher=setup.base if schedule.distill > 0 else None, progress=False)
        rows[k]["test_accuracy"] = evaluate(pruned, data.test, seed=args.seed).accuracy
        rows[k]["finetune_seconds"] = time.perf_counter() - begun
        rows[k]["finetune_cpu_seconds"] = time.process_time() - cpu
        rows[k]["load"] = loads[-1]
        write_rows(path, rows)
        log.info("structure %d/%d %s: test accuracy %.2f%% (%.0f s, load %.1f)", n + 1, len(keys), k,
                 100 * rows[k]["test_accuracy"], rows[k]["finetune_seconds"], loads[-1])

    # 3. multi-fidelity selection: the cheap score's best structures (and the uniform one), successive halving
    final = [rows[k]["test_accuracy"] for k in keys]
    selections = {}
    resolved: dict[str, str] = {}  # a cheap score that resolves to one already run (auto = kl with BatchNorm): skip
    for cheap in [s for s in specs if s.label in SELECTION_CHEAP and not args.no_selection]:
        same = json.dumps(resolve_score(cheap.score, cheap.options, plan.model).describe(), sort_keys=True)
        if same in resolved:
            selections[f"halving({cheap.label})"] = {"same_as": f"halving({resolved[same]})"}
            continue
        resolved[same] = cheap.label
        selections[f"halving({cheap.label})"] = run_selection(cheap, keys, rows, setup, plan, args.seed, final)
    loads.append(os.getloadavg()[0])

    concrete = {spec.label: resolve_score(spec.score, spec.options, plan.model).describe() for spec in specs}
    summary = summarise(bench, args, specs, keys, rows, final, selections, loads, time.perf_counter() - started,
                        concrete)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


def run_selection(cheap: Spec, keys: list[str], rows: dict[str, dict[str, Any]], setup: Setup, plan: Any, seed: int,
                  final: list[float]) -> dict[str, Any]:
    """Successive halving as the engine runs it after a search whose history is the sampled structures."""
    values = [rows[k]["scores"][cheap.label]["value"] for k in keys]
    order = sorted(range(len(keys)), key=lambda i: (-values[i], i))
    chosen = order[:DEFAULT_SELECT_TOP_FOR_BENCH]
    if 0 not in chosen:  # the uniform structure (index 0) always takes part
        chosen.append(0)
    evaluator = Evaluator(plan.model, setup.space, plan.scores, setup.val, setup.calibration,
                          score=create_score(cheap.score, cheap.options), train=setup.train, seed=seed)
    fidelity: Callable[[int], Any] = lambda steps: selection_score(evaluator.candidate_score, steps)  # noqa: E731
    candidates = [np.asarray(rows[keys[i]]["keep"]) for i in chosen]
    cpu = time.process_time()
    first = selection_steps(evaluator.candidate_score, SELECT_STEPS_FOR_BENCH)
    result = successive_halving(candidates, lambda keep, steps: evaluator.measure(keep, fidelity(steps)),
                                evaluator.key, steps=first, eta=SELECT_ETA, metric=fidelity(1).metric)
    # the full ranking: the selection's order on top, then the others by the cheap score
    ranked = [chosen[i] for i in result.order] + [i for i in order if i not in chosen]
    position = {i: len(ranked) - r for r, i in enumerate(ranked)}
    composite = [float(position[i]) for i in range(len(keys))]
    cpu = time.process_time() - cpu
    pick = chosen[result.index]
    rank = 1 + sorted(final, reverse=True).index(final[pick])
    cheap_seconds = float(np.sum([rows[k]["scores"][cheap.label]["seconds"] for k in keys]))
    cheap_cpu = float(np.sum([rows[k]["scores"][cheap.label].get("cpu_seconds", np.nan) for k in keys]))
    return {"cheap": cheap.label, "top": DEFAULT_SELECT_TOP_FOR_BENCH, "steps": first,
            "eta": SELECT_ETA, "rungs": [asdict(r) for r in result.rungs], "pick": pick, "pick_key": keys[pick],
            "pick_regret": 100 * (max(final) - final[pick]), "pick_rank": rank, "selection_seconds": result.seconds,
            "seconds_per_candidate": (cheap_seconds + result.seconds) / len(keys), "selection_cpu_seconds": cpu,
            "cpu_seconds_per_candidate": (cheap_cpu + cpu) / len(keys),
            **correlation(composite, final)}


#: The selection as benchmarked (the engine's settings are PruneConfig.select_top / select_steps).
DEFAULT_SELECT_TOP_FOR_BENCH = 8
SELECT_STEPS_FOR_BENCH = DEFAULT_SELECT_STEPS


def summarise(bench: Bench, args: argparse.Namespace, specs: list[Spec], keys: list[str],
              rows: dict[str, dict[str, Any]], final: list[float], selections: dict[str, Any], loads: list[float],
              seconds: float, concrete: dict[str, dict[str, Any]]) -> dict[str, Any]:
    per_score = {}
    unsqueezed = [i for i, k in enumerate(keys) if rows[k]["kind"] != "squeezed"]
    for spec in specs:
        values = [rows[k]["scores"][spec.label]["value"] for k in keys]
        inner = correlation([values[i] for i in unsqueezed], [final[i] for i in unsqueezed])
        per_score[spec.label] = {
            "score": spec.score, "options": spec.options, "resolved": concrete[spec.label],
            **correlation(values, final),
            "tau_without_squeezed": inner["tau"], "rho_without_squeezed": inner["rho"],
            "seconds_per_candidate": float(np.mean([rows[k]["scores"][spec.label]["seconds"] for k in keys])),
            "cpu_seconds_per_candidate": float(np.mean([rows[k]["scores"][spec.label].get("cpu_seconds", np.nan)
                                                        for k in keys])),
            "pick_regret": pick_regret(values, final)}
    ft = [rows[k]["finetune_seconds"] for k in keys]
    return {
        "bench": bench.label, "target_macs_reduction": bench.reduction, "structures": len(keys), "seed": args.seed,
        "schedule": {"epochs": bench.epochs, "lr": 0.01, "batch_size": 128, "distill": bench.distill},
        "final_test_accuracy": {"min": min(final), "max": max(final), "median": float(np.median(final))},
        "finetune_seconds_per_structure": float(np.mean(ft)),
        "scores": per_score, "selections": selections,
        "default": {"score": DEFAULT_SCORE, "select_top": DEFAULT_SELECT_TOP, "select_steps": DEFAULT_SELECT_STEPS},
        "load_average_1min": {"min": min(loads), "median": float(np.median(loads)), "max": max(loads)},
        "machine": machine(), "wall_seconds": seconds,
        "command": f".venv/bin/python benchmarks/score_fidelity.py {args.bench} --n {args.n} --seed {args.seed} "
                   f"--threads {args.threads}" + (f" --scores {args.scores}" if args.scores else "")
                   + (" --no-selection" if args.no_selection else "") + (" --stored" if args.stored else "")
                   + (f" --out {args.out}" if args.out else ""),
    }


def markdown(s: dict[str, Any]) -> str:
    acc = s["final_test_accuracy"]
    m = s["machine"]
    lines = [
        f"# Score fidelity: {s['bench']}, {100 * s['target_macs_reduction']:.0f}% of MACs removed",
        "",
        f"{s['structures']} structures at the target (the uniform one, {s['structures'] // 4} with one group squeezed "
        f"to its minimum width, the rest uniform random on the budget), each fine-tuned {s['schedule']['epochs']} "
        f"epochs at lr {s['schedule']['lr']} (distill {s['schedule']['distill']}): test accuracy "
        f"{100 * acc['min']:.2f}% .. {100 * acc['max']:.2f}% (median {100 * acc['median']:.2f}%), "
        f"{s['finetune_seconds_per_structure']:.0f} s per structure.",
        "",
        f"Command: `{s['command']}`. Machine: {m['cpu']}, {m['cores']} cores shared with other jobs, "
        f"{m['torch_threads']} torch threads; 1-minute load average {s['load_average_1min']['min']:.1f} .. "
        f"{s['load_average_1min']['max']:.1f} (median {s['load_average_1min']['median']:.1f}); commit {m['commit']}, "
        f"torch {m['torch']}; wall time {s['wall_seconds'] / 60:.0f} min.",
        "",
        "| score | Kendall tau | Spearman rho | tau / rho without the squeezed | CPU s / candidate | "
        "wall s / candidate | regret of its pick (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in s["scores"].items():
        if r["score"] == "auto":
            label = f"auto (= {r['resolved']['name']}, {r['resolved'].get('steps', '')} steps)" \
                if "steps" in r["resolved"] else f"auto (= {r['resolved']['name']})"
        lines.append(f"| {label} | {r['tau']:.3f} (p={r['tau_p']:.2g}) | {r['rho']:.3f} | "
                     f"{r['tau_without_squeezed']:.3f} / {r['rho_without_squeezed']:.3f} | "
                     f"{r['cpu_seconds_per_candidate']:.2f} | {r['seconds_per_candidate']:.2f} | "
                     f"{r['pick_regret']:.2f} |")
    for label, r in s["selections"].items():
        if "same_as" in r:
            lines.append(f"| {label} | = {r['same_as']} | | | | | |")
            continue
        lines.append(f"| {label}: top {r['top']} + uniform, {r['steps']} steps x{r['eta']} | {r['tau']:.3f} | "
                     f"{r['rho']:.3f} | | {r['cpu_seconds_per_candidate']:.2f} | {r['seconds_per_candidate']:.2f} | "
                     f"{r['pick_regret']:.2f} (rank {r['pick_rank']}) |")
    d = s["default"]
    lines += ["", f"Default: score `{d['score']}`, select_top {d['select_top']}, select_steps {d['select_steps']}.",
              "Selection rows: tau over the selection's order (survivors first, then the cheap score's); "
              "seconds include the cheap score on every structure.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
