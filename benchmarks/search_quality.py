"""Search quality: the structure each method chooses, judged after one shared fine-tuning loop.

For every seed and method: the structure is chosen by the engine with ``finetune=None``
(``autoprune.api.execute``), then fine-tuned by the same loop for every method, and measured on the test
split. A method's own extra training (``Plan.extra_training_epochs``, e.g. ``slim``'s sparsity epochs) is
subtracted from the shared fine-tuning epochs, so that every network is trained as long. The script
also records how much each search explored: the distinct structures it evaluated and how far apart they
were (the engine's ``SearchStats.distinct_structures`` / ``.spread``, and the mean pairwise L1 distance
between the distinct channel-fraction vectors, computed here from the history).

Usage (from the repository root)::

    .venv/bin/python benchmarks/search_quality.py resnet20 --seeds 0 1 2 --methods l1 random pso ssa
    .venv/bin/python benchmarks/search_quality.py lenet5 --seeds 0 --methods random gdp

Each finished (seed, method) is written to ``benchmarks/results/search_quality/<preset>/runs/`` as JSON
at once (a re-run skips it unless ``--force``); ``summary.md`` and ``summary.json`` next to it are
rewritten from every run present after each one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from other_tools import RECIPES, fastnas_prune, tp_prune
from other_tools import widths as tool_widths
from torch_pruning import __version__ as tp_version

log = logging.getLogger("search_quality")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "search_quality"
PAPER_METHODS = ("otp", "pso", "sa", "ssa", "gdp")
#: validation samples the searches score candidates on (FastNAS's ``score_func`` gets the same sample)
VAL_SAMPLES = 1000


@dataclass(frozen=True)
class Preset:
    """One benchmark: base model, data and schedule (as the issue fixes them)."""

    model_path: str
    dataset: str
    data_dir: str
    limit: int | None
    macs_reduction: float
    budget: int
    finetune_epochs: int
    distill: float
    methods: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "resnet20": Preset("/work/bench/resnet20_c10q.pt", "cifar10", "/tmp/c10", 10000, 0.6, 40, 3, 0.0,
                       ("l1", "random", "pso", "ssa", "otp", "gdp", "sa")),
    "lenet5": Preset("/work/bench/lenet5_mnist.pt", "mnist", "/work/shared/data/mnist", None, 0.9, 40, 16, 0.5,
                     ("l1", "random", "pso", "ssa", "otp", "gdp", "sa")),
    # for a GPU (benchmarks/gpu_resnet56.sh trains the base): all 45,000 training images, 3 fine-tuning epochs
    "resnet56": Preset("runs/gpu/resnet56_c10q.pt", "cifar10", "/tmp/c10", None, 0.6, 40, 3, 0.0,
                       ("l1", "random", "pso", "ssa", "otp", "gdp", "sa")),
}

#: the device every run of this process uses (``--device``)
DEVICE = torch.device("cpu")


def distinct_spread(history: list[Any], channels: np.ndarray) -> dict[str, float]:
    """Distinct structures and the mean pairwise L1 distance of their channel fractions (per group)."""
    structures = sorted({tuple(row.counts) for row in history})
    fractions = np.array(structures, dtype=float) / channels if structures else np.zeros((0, len(channels)))
    pairs = [float(np.abs(a - b).mean()) for a, b in itertools.combinations(fractions, 2)]
    return {"distinct": len(structures), "mean_pairwise_l1": float(np.mean(pairs)) if pairs else 0.0}


def load(preset: Preset, seed: int) -> Any:
    """The preset's base model and data, split and shuffled by ``seed`` (``autoprune.runs.inputs.RunInputs``)."""
    from autoprune.runs.inputs import load_inputs

    return load_inputs(preset.model_path, dataset=preset.dataset, data_dir=preset.data_dir, val_fraction=0.1,
                       limit=preset.limit, seed=seed, batch_size=128, device=DEVICE)


def choose(preset: Preset, inputs: Any, seed: int, method: str, budget: int,
           method_options: dict[str, Any], engine_options: dict[str, Any] | None = None) -> Any:
    """The structure ``method`` chooses, with the weights it produced (``finetune=None``): a ``PruneResult``.
    ``engine_options``: other ``PruneConfig`` fields (e.g. ``score``, ``select_top``), the defaults otherwise."""
    from autoprune.api import execute
    from autoprune.engine.config import PruneConfig, Target
    from autoprune.engine.prune import Data
    from autoprune.methods import create_method

    data = inputs.data
    config = PruneConfig(method=method, target=Target(macs_reduction=preset.macs_reduction), budget=budget,
                         val_samples=VAL_SAMPLES, finetune=None, seed=seed, method_options=method_options,
                         latency_batch=1, latency_repeats=1, **(engine_options or {}))
    return execute(inputs.model, inputs.example_inputs, config, create_method(method, method_options),
                   Data(train=data.train, val=data.val, test=data.test), device=DEVICE)


def shared_finetune(model: torch.nn.Module, inputs: Any, preset: Preset, epochs: int, seed: int) -> float:
    """The one fine-tuning loop every structure gets (``seed``: the order and augmentation of its batches);
    returns its seconds."""
    from autoprune.engine.train import TrainConfig, fit

    inputs.data.train.seed = seed  # BatchLoader draws each epoch's order from its own seed
    started = time.perf_counter()
    fit(model, inputs.data.train, TrainConfig(epochs=epochs, lr=0.01, batch_size=128, distill=preset.distill,
                                              seed=seed),
        teacher=inputs.model if preset.distill > 0 else None, progress=False)
    return time.perf_counter() - started


def run_one(preset: Preset, seed: int, method: str, budget: int, method_options: dict[str, Any],
            finetune_epochs: int | None = None, engine_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose a structure with ``method``, fine-tune it with the shared loop, measure it on the test split."""
    if method in RECIPES:
        return run_other_tool(preset, seed, method, finetune_epochs)
    from autoprune.engine.train import evaluate

    inputs = load(preset, seed)
    started = time.perf_counter()
    result = choose(preset, inputs, seed, method, budget, method_options, engine_options)
    search_seconds = time.perf_counter() - started
    extra = int(result.search.notes.get("extra_training_epochs", 0))
    epochs = max(0, (preset.finetune_epochs if finetune_epochs is None else finetune_epochs) - extra)
    model = result.model
    finetune_seconds = shared_finetune(model, inputs, preset, epochs, seed)
    test = evaluate(model, inputs.data.test).accuracy
    space_channels = np.array([w.before for w in result.widths], dtype=float)
    stats = result.search
    return {
        "seed": seed, "method": method, "budget": budget, "method_options": method_options,
        "engine_options": engine_options or {}, "base_test": result.base.accuracy,
        "pruned_test_before_finetune": result.pruned.accuracy,
        "test": test, "delta_points": 100 * (test - result.base.accuracy),
        "macs_reduction": 1 - result.pruned.macs / result.base.macs,
        "finetune_epochs": epochs, "extra_training_epochs": extra,
        "widths": [[w.name, w.before, w.after] for w in result.widths],
        "search": {"strategy": stats.strategy, "evaluations": stats.evaluations,
                   "distinct_structures": stats.distinct_structures, "spread": stats.spread,
                   "best_val": stats.best.accuracy, "base_val": stats.base_score, "notes": stats.notes,
                   "selection": stats.selection, **distinct_spread(list(result.history), space_channels)},
        "warnings": list(result.warnings),
        "seconds": {"search": search_seconds, "finetune": finetune_seconds}, "machine": machine(),
    }


def run_other_tool(preset: Preset, seed: int, recipe: str, finetune_epochs: int | None = None) -> dict[str, Any]:
    """Another tool's hand-free recipe (:mod:`other_tools`) on the same base, then the same shared fine-tuning."""
    from autoprune.engine.batches import take
    from autoprune.engine.prune import CALIBRATION_KEY, VAL_KEY
    from autoprune.engine.train import evaluate

    device = DEVICE
    inputs = load(preset, seed)
    inputs.model.to(device)
    data = inputs.data
    torch.manual_seed(seed)
    base_test = evaluate(inputs.model, data.test).accuracy
    started = time.perf_counter()
    if recipe == "mo-fastnas":
        # the validation sample our searches score on (the engine's own draw)
        val = take(data.val, VAL_SAMPLES, seed=seed, key=VAL_KEY, device=device, what="val")
        # FastNAS calibrates BatchNorm on a queue of 50 batches (fewer: it skips calibration); 50 x 16 images
        images = torch.cat([x for x, _ in take(data.train, 800, seed=seed, key=CALIBRATION_KEY, device=device,
                                               what="train")])
        calibration = list(images.split(16))
        with tempfile.TemporaryDirectory() as scratch:
            model, info = fastnas_prune(inputs.model, inputs.example_inputs, preset.macs_reduction,
                                        score_func=lambda m: evaluate(m, val, shared=False).accuracy,
                                        calibration=calibration, checkpoint=f"{scratch}/fastnas.pth")
        tool = info["tool"]
    else:
        model, info = tp_prune(inputs.model, inputs.example_inputs.to(device), recipe, preset.macs_reduction,
                               num_classes=inputs.splits.info.num_classes, train_batches=data.train)
        tool = f"torch-pruning {tp_version}"
    search_seconds = time.perf_counter() - started
    before = evaluate(model, data.test).accuracy
    epochs = preset.finetune_epochs if finetune_epochs is None else finetune_epochs
    finetune_seconds = shared_finetune(model, inputs, preset, epochs, seed)
    test = evaluate(model, data.test).accuracy
    return {
        "seed": seed, "method": recipe, "budget": 0, "method_options": {}, "tool": tool,
        "base_test": base_test, "pruned_test_before_finetune": before, "test": test,
        "delta_points": 100 * (test - base_test), "macs_reduction": info["macs_reduction"],
        "finetune_epochs": epochs, "extra_training_epochs": 0, "widths": tool_widths(inputs.model, model),
        "search": {"strategy": info["recipe"], "evaluations": 0,
                   "distinct_structures": 1, "spread": 0.0, "notes": info, "distinct": 1, "mean_pairwise_l1": 0.0},
        "warnings": [], "seconds": {"search": search_seconds, "finetune": finetune_seconds}, "machine": machine(),
    }


def machine() -> dict[str, Any]:
    """Where a run ran: processor, cores, the device (GPU name), torch's threads and version, and how many
    benchmark processes shared the machine (``SEARCH_QUALITY_PROCESSES``, set by the scripts that run several)."""
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None
    return {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(), "device": str(DEVICE),
            "gpu": gpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processes": int(os.environ.get("SEARCH_QUALITY_PROCESSES", "1"))}


def _machine_line(runs: list[dict[str, Any]]) -> str:
    """The summary's machine sentence: from the runs' own records where they carry one."""
    seen = sorted({json.dumps(r["machine"], sort_keys=True) for r in runs if r.get("machine")})
    if not seen:  # runs written before the records said where they ran (all on this CPU machine)
        return (f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only, 1 torch "
                "thread per run (OMP_NUM_THREADS=1), two benchmark processes side by side")
    parts = []
    for text in seen:
        m = json.loads(text)
        where = f"GPU {m['gpu']} ({m['device']})" if m.get("gpu") else "CPU only"
        parts.append(f"{m['processor']}, {m['cores']} cores, {where}, torch {m['torch']}, {m['threads']} torch "
                     f"thread(s) per run, {m['processes']} benchmark process(es) side by side")
    return "Machine: " + "; ".join(parts)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values):.2f}"


def summarise(folder: Path, preset_name: str, preset: Preset, tag: str = "") -> None:
    """Rewrite ``summary.json`` / ``summary.md`` from every run file in ``folder/runs``."""
    runs = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    rows = []
    for method, items in sorted(by_method.items(), key=lambda kv: -statistics.mean(r["delta_points"] for r in kv[1])):
        rows.append({
            "method": method, "seeds": sorted(r["seed"] for r in items),
            "delta_points": [r["delta_points"] for r in sorted(items, key=lambda r: r["seed"])],
            "mean_delta": statistics.mean(r["delta_points"] for r in items),
            "distinct": [r["search"]["distinct"] for r in items],
            "spread_l1": [round(r["search"]["mean_pairwise_l1"], 4) for r in items],
            "evaluations": [r["search"]["evaluations"] for r in items],
            "macs_reduction": [round(r["macs_reduction"], 4) for r in sorted(items, key=lambda r: r["seed"])],
        })
    _write(folder / "summary.json", json.dumps({"preset": preset_name, "rows": rows,
                                                "paired": paired_comparisons(by_method)}, indent=1))
    lines = [f"# Search quality: {preset_name}", "",
             f"{preset.dataset}, MACs reduction {preset.macs_reduction}, budget {preset.budget}, "
             f"{preset.finetune_epochs} shared fine-tuning epochs (distill {preset.distill}); "
             "test accuracy change in points vs the base (mean ± std over seeds)."
             + "".join(sorted({f" Engine options: {r['engine_options']}." for r in runs if r.get("engine_options")})),
             "",
             "| method | seeds | Δ test (points) | per seed | MACs removed | distinct structures | mean pairwise L1 "
             "| evaluations |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['seeds']} | {_fmt(row['delta_points'])} | "
                     f"{', '.join(f'{d:+.2f}' for d in row['delta_points'])} | "
                     f"{', '.join(f'{100 * m:.1f}%' for m in row['macs_reduction'])} | {row['distinct']} | "
                     f"{row['spread_l1']} | {row['evaluations']} |")
    paired = paired_comparisons(by_method)
    if paired:
        lines += ["", "Paired by seed (same seed: same data split, validation sample and fine-tuning order): "
                  "method minus baseline, in points; p from a two-sided paired t-test (3 seeds: weak evidence).",
                  "", "| method | vs | mean difference ± std | per seed | wins | p |", "|---|---|---|---|---|---|"]
        for c in paired:
            lines.append(f"| {c['method']} | {c['baseline']} | {_fmt(c['differences'])} | "
                         f"{', '.join(f'{d:+.2f}' for d in c['differences'])} | {c['wins']}/{len(c['differences'])} | "
                         f"{c['p']:.3f} |")
    base_test = runs[0]["base_test"] if runs else float("nan")
    used = sorted({json.dumps(r["search"]["notes"].get("score"), sort_keys=True) for r in runs
                   if r["method"] not in RECIPES})
    tools = sorted({r["tool"] for r in runs if r["method"] in RECIPES})
    if tools:
        lines += ["", f"`tp-*` and `mo-*` rows: other tools' hand-free recipes on the same base and the same shared "
                  f"fine-tuning ({', '.join(tools)}; Torch-Pruning's progressive global pruning to the MACs target, "
                  "ModelOpt's FastNAS width search; `benchmarks/other_tools.py`)."]
    lines += ["", f"Candidate score of the searches: {', '.join(f'`{u}`' for u in used)}."]
    selected = [r for r in runs if r.get("search", {}).get("selection")]
    if selected:
        rungs = sorted({"/".join(str(g["steps"]) for g in r["search"]["selection"]["rungs"]) for r in selected})
        lines += ["", f"A selection (successive halving of short fine-tunes) followed the search in {len(selected)} "
                  f"of the {len(runs)} runs (rungs of {', '.join(rungs)} steps)."]
    lines += ["", f"Base model `{preset.model_path}` (not committed), test accuracy {100 * base_test:.2f}%. "
              f"Command: `.venv/bin/python benchmarks/search_quality.py {preset_name} --seeds "
              f"{' '.join(map(str, sorted({r['seed'] for r in runs})))} --methods {' '.join(m for m in by_method)}"
              + "".join(sorted({f" --engine {k}={json.dumps(v)}" for r in runs
                                for k, v in (r.get("engine_options") or {}).items()}))
              + "".join(sorted({f" --device {r['machine']['device']}" for r in runs
                                if r.get("machine", {}).get("device", "cpu") != "cpu"}))
              + (f" --tag {tag}" if tag else "") + "` "
              "(each (seed, method) one run file; the table is rewritten from all of them).",
              f"{_machine_line(runs)}; load average at writing "
              f"{os.getloadavg()[0]:.1f}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"commit {_commit()}."]
    _write(folder / "summary.md", "\n".join(lines) + "\n")


def _write(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: processes running side by side rewrite the summary."""
    scratch = path.with_name(f".{path.name}.{os.getpid()}")
    scratch.write_text(text)
    os.replace(scratch, path)


def paired_comparisons(by_method: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each method against ``random`` and ``l1``, and each paper method against every other tool's recipe, over
    the seeds both ran: differences, wins, paired t-test."""
    from scipy import stats

    out = []
    for baseline in ("random", "l1", *sorted(m for m in by_method if m in RECIPES)):
        base = {r["seed"]: r["delta_points"] for r in by_method.get(baseline, [])}
        for method, items in sorted(by_method.items()):
            if method == baseline or (baseline in RECIPES and method not in PAPER_METHODS):
                continue
            pairs = sorted((r["seed"], r["delta_points"] - base[r["seed"]]) for r in items if r["seed"] in base)
            if len(pairs) < 2:
                continue
            differences = [d for _, d in pairs]
            p = float(stats.ttest_1samp(differences, 0.0).pvalue) if statistics.pstdev(differences) > 0 else 0.0
            out.append({"method": method, "baseline": baseline, "seeds": [s for s, _ in pairs],
                        "differences": differences, "wins": sum(d > 0 for d in differences), "p": p})
    return out


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="a method option (JSON value), e.g. pso:particles=8")
    parser.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                        help="a PruneConfig field (JSON value) for every method, e.g. select_top=8 (tag the folder)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="override the preset's shared fine-tuning epochs (a proxy; tag the folder)")
    parser.add_argument("--model-path", default=None, help="another base model file than the preset's (tag the folder)")
    parser.add_argument("--tag", default="", help="suffix of the results folder (variants of an experiment)")
    parser.add_argument("--data-dir", default=None, help="the dataset's directory, if not the preset's")
    parser.add_argument("--limit", type=int, default=None, help="at most this many training and test images (trials)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    parser.add_argument("--summarise-only", action="store_true",
                        help="rewrite the summary from the run files, run nothing")
    parser.add_argument("--force", action="store_true", help="re-run finished (seed, method) pairs")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preset = PRESETS[args.preset]
    if args.finetune_epochs is not None:
        preset = Preset(**{**preset.__dict__, "finetune_epochs": args.finetune_epochs})
    if args.model_path:
        preset = Preset(**{**preset.__dict__, "model_path": args.model_path})
    if args.data_dir:
        preset = Preset(**{**preset.__dict__, "data_dir": args.data_dir})
    if args.limit:
        preset = Preset(**{**preset.__dict__, "limit": args.limit})
    budget = args.budget or preset.budget
    options: dict[str, dict[str, Any]] = {}
    for item in args.option:
        method, _, assignment = item.partition(":")
        key, _, value = assignment.partition("=")
        options.setdefault(method, {})[key] = json.loads(value)
    engine_options = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.engine)}
    folder = RESULTS / (args.preset + (f"_{args.tag}" if args.tag else ""))
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    if args.summarise_only:
        summarise(folder, args.preset, preset, args.tag)
        return 0
    failed = 0
    for seed in args.seeds:
        for method in args.methods or preset.methods:
            path = folder / "runs" / f"seed{seed}_{method}.json"
            if path.exists() and not args.force:
                log.info("skip %s (done)", path.name)
                continue
            log.info("seed %d, method %s, budget %d", seed, method, budget)
            try:
                row = run_one(preset, seed, method, budget, options.get(method, {}), args.finetune_epochs,
                              engine_options)
            except Exception as exc:  # e.g. another tool refusing the target: record nothing, go on with the rest
                log.error("seed %d, method %s failed, no run file written: %s: %s", seed, method,
                          type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
                failed += 1
                continue
            _write(path, json.dumps(row, indent=1))
            log.info("%s: %.2f points (distinct %d, %s)", path.name, row["delta_points"], row["search"]["distinct"],
                     row["seconds"])
            summarise(folder, args.preset, preset, args.tag)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
