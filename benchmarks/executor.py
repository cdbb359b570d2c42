"""Benchmark: one search generation of 16 candidates evaluated serially and by 2 and 4 pool workers.

ResNet-20 (CIFAR-shaped, 3x32x32, 10 classes, random weights: only time is measured here) on synthetic
batches held in memory, as the engine holds validation and calibration data. Each configuration builds
a fresh driver-side :class:`~autoprune.engine.evaluate.Evaluator` (empty cache) with the masking-vs-surgery
decision made once beforehand (:func:`~autoprune.engine.evaluate.choose_physical`, not timed), builds the
executor with :func:`~autoprune.engine.executor.create_executor`, and times apart:

- start-up: building the executor and one warm-up candidate per worker (pool workers spawn, import torch
  and load the payload), what the first ask of a search pays on top;
- generation: 16 other candidates on the started workers (every ask of a search).

Configurations: serial with torch's default threads (today's ``workers=1``), serial pinned to one thread,
and the pool with 2 and 4 workers (``threads_per_worker = max(1, cores // N)``). They are interleaved
within each round and the order reverses every other round, so drifting load from other users of the
machine hits all of them alike. Speed-ups are ratios of times in the same round, summarised as the median
and the interquartile range over rounds. CPU seconds are ``resource.getrusage`` of this process plus its
reaped children over one executor's life. Every configuration's results must equal the serial ones.

Usage::

    .venv/bin/python benchmarks/executor.py --out benchmarks/results/executor
    .venv/bin/python benchmarks/executor.py --rounds 1 --candidates 4 --out /tmp/executor  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.engine.config import PruneConfig, Target
from autoprune.engine.evaluate import Evaluator, choose_physical
from autoprune.engine.executor import create_executor, threads_per_worker
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import subnormals_flushed
from autoprune.models import create_model

log = logging.getLogger("benchmarks.executor")

ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its terminated, waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine() -> dict[str, Any]:
    """CPU model, core count, OS, Python and library versions."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray_version,
            "commit": commit.strip() or "unknown"}


def build(args: argparse.Namespace) -> tuple[Evaluator, list[list[np.ndarray]]]:
    """The evaluator inputs (model, space, scores, data) and two generations of 16 candidates."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=3, image_size=(32, 32)).eval()
    example = torch.randn(1, 3, 32, 32)
    space = PruningSpace(model, example)
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(grp.channels, generator=g) for grp in space.groups]

    def batches(n: int) -> list[torch.Tensor]:
        return [torch.randn(min(args.batch, n - i), 3, 32, 32, generator=g) for i in range(0, n, args.batch)]

    val = [(x, torch.randint(0, 10, (len(x),), generator=g)) for x in batches(args.val)]
    calibration = batches(args.calibration)
    rng = np.random.default_rng(0)
    generations = [[space.snap(rng.uniform(0.3, 1.0, len(space))) for _ in range(args.candidates)]
                   for _ in range(2)]
    return Evaluator(model, space, scores, val, calibration), generations


def run_one(template: Evaluator, physical: bool, warmup: list[np.ndarray], generation: list[np.ndarray],
            config: dict[str, Any], executor: str) -> dict[str, Any]:
    """One configuration: a fresh evaluator and executor; start-up (with one warm-up candidate per worker)
    and the generation timed apart."""
    workers, serial_threads = config["workers"], config.get("threads")
    evaluator = Evaluator.from_state({**template.state(), "physical": physical})
    prune_config = PruneConfig(method="pso", target=Target(macs_reduction=0.5), workers=workers,
                               executor="serial" if workers == 1 else executor,
                               ray_address="local" if executor == "ray" and workers > 1 else None)
    threads = threads_per_worker(prune_config) or serial_threads or torch.get_num_threads()
    driver_threads = torch.get_num_threads()
    if serial_threads is not None:
        torch.set_num_threads(serial_threads)
    cpu = cpu_seconds()
    try:
        started = time.perf_counter()
        # the driver flushes subnormals during the search, as the engine's run() does
        with subnormals_flushed(), create_executor(prune_config, evaluator) as ex:
            ex.map(warmup[:workers])
            ready = time.perf_counter()
            results = ex.map(generation)
            done = time.perf_counter()
    finally:
        torch.set_num_threads(driver_threads)
    return {"config": config["label"], "workers": workers, "threads": threads, "startup_s": ready - started,
            "generation_s": done - ready, "cold_s": done - started, "cpu_s": cpu_seconds() - cpu,
            "results": [(f.accuracy, f.macs, f.params) for f in results]}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Median, first and third quartile."""
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return float(median), float(q1), float(q3)


def summarise(runs: list[dict[str, Any]], configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration: median and IQR of times and CPU seconds, per-round speed-ups vs both serial runs."""
    by = {(r["config"], r["round"]): r for r in runs}
    rows = []
    for config in configs:
        mine = [r for r in runs if r["config"] == config["label"]]
        row: dict[str, Any] = {"config": config["label"], "workers": config["workers"], "threads": mine[0]["threads"],
                               "rounds": len(mine)}
        for key in ("startup_s", "generation_s", "cold_s", "cpu_s"):
            row[key] = quartiles([r[key] for r in mine])
        for ref, name in ((configs[0]["label"], "default"), (configs[1]["label"], "one_thread")):
            row[f"speedup_vs_serial_{name}"] = quartiles([by[(ref, r["round"])]["generation_s"] / r["generation_s"]
                                                           for r in mine])
        row["speedup_cold_vs_serial_default"] = quartiles([by[(configs[0]["label"], r["round"])]["cold_s"] / r["cold_s"]
                                                           for r in mine])
        rows.append(row)
    return rows


def fmt(q: tuple[float, float, float], digits: int = 1, suffix: str = "") -> str:
    """``median [q1-q3]``."""
    return f"{q[0]:.{digits}f}{suffix} [{q[1]:.{digits}f}-{q[2]:.{digits}f}]"


def write(out: Path, args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]],
          runs: list[dict[str, Any]], load: dict[str, Any], seconds: float) -> None:
    """``results.json`` (every run) and ``README.md`` (header, table, reading)."""
    out.mkdir(parents=True, exist_ok=True)
    data = {"args": vars(args) | {"out": str(args.out)}, "machine": info, "load_average": load,
            "summary": rows, "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
            "seconds": seconds}
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    table = ["| configuration | torch threads each | start-up s | generation s | speed-up vs serial (default "
             "threads) | speed-up vs serial (1 thread) | cold speed-up (start-up included) | CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        table.append(f"| {r['config']} | {r['threads']} | {fmt(r['startup_s'])} | {fmt(r['generation_s'])} | "
                     f"{fmt(r['speedup_vs_serial_default'], 2, 'x')} | "
                     f"{fmt(r['speedup_vs_serial_one_thread'], 2, 'x')} | "
                     f"{fmt(r['speedup_cold_vs_serial_default'], 2, 'x')} | {fmt(r['cpu_s'])} |")
    command = " ".join(["benchmarks/executor.py", *sys.argv[1:]])
    text = f"""# Candidate evaluation: serial vs {args.executor} workers

One search generation of {args.candidates} candidates of ResNet-20 (CIFAR-shaped 3x32x32, 10 classes, random
weights; synthetic data in memory: {args.val} validation samples, {args.calibration} calibration samples for
BatchNorm re-estimation, batches of {args.batch}), scored through `autoprune.engine.executor.create_executor`
as the engine's search does. Start-up: building the executor and one warm-up candidate per worker (pool
workers spawn, import torch and load the payload once); generation: the {args.candidates} candidates on the
started workers (every ask of a search after the first). {args.rounds} interleaved rounds, the order of the
configurations reversed every other round; each speed-up is a ratio of generation times in the same round;
values are the median [interquartile range] over rounds. CPU s: this process plus its reaped children over
one executor's life (start-up, warm-up, generation, shutdown). Every configuration returned exactly the
serial results (checked in every round).

- Command: `{command}`
- Date: {info['date']}; wall time {seconds / 60:.1f} min
- Machine: {info['cpu']}, {info['cores']} cores ({info['platform']}); Python {info['python']}
- Versions: torch {info['torch']}, ray {info['ray']}; autoprune commit {info['commit']}
- Load average (1 min) at start {load['start']:.1f}, at end {load['end']:.1f}

{chr(10).join(table)}

## Reading

This machine has {info['cores']} cores. "serial (default threads)" is today's `workers=1`: the driver
evaluates with torch's default thread count ({rows[0]['threads']}); "serial (1 thread)" pins it to one.
N pool workers get max(1, {info['cores']} // N) torch threads each, so more workers than cores
oversubscribe them.
"""
    (out / "README.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "executor")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="pool sizes besides the serial runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--val", type=int, default=64, help="validation samples per candidate")
    parser.add_argument("--calibration", type=int, default=32, help="BatchNorm calibration samples per candidate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--executor", choices=["pool", "ray"], default="pool")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configs = [{"label": "serial (default threads)", "workers": 1},
               {"label": "serial (1 thread)", "workers": 1, "threads": 1},
               *({"label": f"{args.executor}, {n} workers", "workers": n} for n in args.workers)]
    info = machine() | {"date": datetime.datetime.now().astimezone().isoformat(timespec="minutes")}
    load = {"start": os.getloadavg()[0]}
    started = time.perf_counter()
    template, (warmup, generation) = build(args)
    with subnormals_flushed():
        physical = choose_physical(template)
    log.info("candidates are %s", "pruned physically" if physical else "masked")
    runs: list[dict[str, Any]] = []
    reference: list[Any] | None = None
    for round_ in range(args.rounds):
        for config in configs if round_ % 2 == 0 else list(reversed(configs)):
            run = run_one(template, physical, warmup, generation, config, args.executor) | {"round": round_}
            reference = reference if reference is not None else run["results"]
            if run["results"] != reference:
                raise SystemExit(f"{config['label']} gave other results than {runs[0]['config']}: determinism broken")
            log.info("round %d, %s: start-up %.1f s, generation %.1f s, CPU %.1f s", round_, config["label"],
                     run["startup_s"], run["generation_s"], run["cpu_s"])
            runs.append(run)
    load["end"] = os.getloadavg()[0]
    write(args.out, args, info, summarise(runs, configs), runs, load, time.perf_counter() - started)
    log.info("wrote %s", args.out / "README.md")


if __name__ == "__main__":
    main()
