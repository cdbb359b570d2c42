"""Structure probe: candidate score (BatchNorm-recalibrated validation accuracy) of hand-made and sampled
structures, and optionally their test accuracy after the shared fine-tuning loop.

Used to decide the strategies' and methods' defaults by measurement (see ``search_quality.py`` for the
end-to-end comparison of methods). Families of structures at the preset's MACs target:

* ``uniform``: one keep ratio everywhere (PFEC / ``l1``);
* ``streams=R``: every group written by several layers (a residual stream) keeps ``R``, the others share
  the largest common ratio that meets the target (and the reverse, ``internal=R``);
* ``random``/``ray``: random structures projected as ``random`` does now / as before (the fill along the
  ray from the minimum widths);
* ``otp-global``/``otp-group``, ``gdp-beta=B``: the methods' first threshold meeting the target.

Usage::

    .venv/bin/python benchmarks/structure_probe.py resnet20 --seed 0 --random 12 --finetune uniform streams=1.0
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import PRESETS, RESULTS, Preset  # noqa: E402

log = logging.getLogger("structure_probe")


def solve(problem: Any, fixed: dict[int, float]) -> np.ndarray:
    """The fixed ratios where given, the largest common ratio elsewhere that meets the cost ceiling."""
    def at(r: float) -> np.ndarray:
        x = np.full(problem.dim, r)
        for i, v in fixed.items():
            x[i] = v
        return problem.clip(x)

    low, high = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if problem.cost_ok(at(mid)) else (low, mid)
    return at(low)


def main(argv: list[str] | None = None) -> int:
    from autoprune.engine.config import PruneConfig, Target
    from autoprune.engine.evaluate import Evaluator
    from autoprune.engine.prune import Data, prepare
    from autoprune.engine.train import TrainConfig, evaluate, fit
    from autoprune.methods import GDP, OTP, MethodContext, criterion_scores
    from autoprune.runs.inputs import load_inputs
    from autoprune.search import Problem, create_strategy
    from autoprune.search.random_search import RandomSearch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default=None, help="another base model file than the preset's")
    parser.add_argument("--random", type=int, default=0, help="random structures of each projection")
    parser.add_argument("--streams", type=float, nargs="*", default=[1.0, 0.85])
    parser.add_argument("--methods", nargs="*", default=["otp", "gdp"])
    parser.add_argument("--otp-mode", default="auto", choices=["auto", "measured", "first_order"])
    parser.add_argument("--otp-batches", type=int, default=8)
    parser.add_argument("--gdp-reduction", nargs="*", default=["mean"])
    parser.add_argument("--counts", nargs="*", default=[], metavar="NAME=C1,C2,...",
                        help="extra structures by channel counts (channels ranked by L1 norm)")
    parser.add_argument("--finetune", nargs="*", default=[], help="names of probed structures to fine-tune")
    parser.add_argument("--finetune-top", type=int, default=0, help="also fine-tune the N best-scored")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    preset: Preset = PRESETS[args.preset]
    if args.model_path:
        preset = Preset(**{**preset.__dict__, "model_path": args.model_path})
    cpu = torch.device("cpu")
    inputs = load_inputs(preset.model_path, dataset=preset.dataset, data_dir=preset.data_dir, val_fraction=0.1,
                         limit=preset.limit, seed=args.seed, batch_size=128, device=cpu)
    data = inputs.data
    config = PruneConfig(method="l1", target=Target(macs_reduction=preset.macs_reduction), val_samples=1000,
                         finetune=None, seed=args.seed)
    setup = prepare(inputs.model, inputs.example_inputs, config, Data(train=data.train, val=data.val, test=data.test),
                    cpu)
    space = setup.space
    problem = Problem(lower=space.lower, upper=space.upper, cost=space.relative_macs, snap=space.snap,
                      base_accuracy=setup.base_score, max_cost=1 - preset.macs_reduction)
    ctx = MethodContext(model=setup.base, space=space, example_inputs=setup.example, train_loader=data.train,
                        device=cpu, seed=args.seed, progress=False)
    l1 = criterion_scores(ctx, "l1", method="probe")
    modules = dict(setup.base.named_modules())
    streams = [i for i, g in enumerate(space.groups)
               if sum(m.dim == "out" and isinstance(modules[m.module], torch.nn.Conv2d | torch.nn.Linear)
                      for m in g.members) > 1]
    log.info("groups %s; streams %s", [g.name for g in space.groups], [space.groups[i].name for i in streams])
    l1g = criterion_scores(ctx, "l1_group", method="probe")
    structures: dict[str, tuple[np.ndarray, list[torch.Tensor]]] = {"uniform": (problem.uniform(), l1),
                                                                      "uniform-l1group": (problem.uniform(), l1g)}
    for r in args.streams:
        structures[f"streams={r}"] = (solve(problem, dict.fromkeys(streams, r)), l1)
        structures[f"streams={r}-l1group"] = (solve(problem, dict.fromkeys(streams, r)), l1g)
    internal = [i for i in range(problem.dim) if i not in streams]
    for r in args.streams:
        if internal and streams:
            structures[f"internal={r}"] = (solve(problem, dict.fromkeys(internal, r)), l1)
    for item in args.counts:
        name, _, text = item.partition("=")
        counts = np.array([int(c) for c in text.split(",")], dtype=float)
        structures[name] = (problem.clip(counts / space.channels), l1)
    rng = np.random.default_rng(1000 + args.seed)
    sampler = RandomSearch(problem, seed=args.seed, batch=max(args.random, 1))
    for k, x in enumerate(sampler.ask()[: args.random]):
        structures[f"random{k}"] = (x, l1)
    for k in range(args.random):
        u = problem.lower + rng.random(problem.dim) * (problem.upper - problem.lower)
        structures[f"ray{k}"] = (problem.place(u, fill=True), l1)
    if "otp" in args.methods:
        for normalize in ("global", "group"):
            plan = OTP(max_batches=args.otp_batches, mode=args.otp_mode, normalize=normalize, probes=0).plan(ctx)
            for per_cost in (False, True):
                options = {**plan.strategy_options, "per_cost": per_cost}
                x = create_strategy("threshold", problem, **options).ask()[0]
                structures[f"otp-{normalize}{'-mac' if per_cost else ''}"] = (x, plan.scores)
        structures["otp-uniform"] = (problem.uniform(), plan.scores)
    for reduction in args.gdp_reduction if "gdp" in args.methods else []:
        plan = GDP(probes=0, reduction=reduction).plan(ctx)
        for per_cost in (False, True):
            options = {**plan.strategy_options, "per_cost": per_cost}
            strategy = create_strategy("threshold", problem, **options)
            for beta, path in zip(strategy.exponents, strategy.paths, strict=True):
                x = next(x for x in path if problem.cost_ok(x))
                structures[f"gdp-{reduction}-beta={beta}{'-mac' if per_cost else ''}"] = (x, plan.scores)
        structures[f"gdp-{reduction}-uniform"] = (problem.uniform(), plan.scores)
    rows: dict[str, dict[str, Any]] = {}
    for name, (x, scores) in structures.items():
        evaluator = Evaluator(setup.base, space, scores, setup.val, setup.calibration)
        started = time.perf_counter()
        fitness = evaluator(x)
        rows[name] = {"counts": [int(c) for c in space.counts(x)], "cost": float(space.relative_macs(x)),
                      "val": fitness.accuracy, "seconds": time.perf_counter() - started}
        log.info("%-16s val %.4f cost %.3f counts %s", name, fitness.accuracy, rows[name]["cost"],
                 rows[name]["counts"])
    chosen = list(args.finetune)
    if args.finetune_top:
        chosen += [n for n in sorted(rows, key=lambda n: -rows[n]["val"]) if n not in chosen][: args.finetune_top]
    for name in chosen:
        x, scores = structures[name]
        pruned = space.apply(setup.base, x, scores)
        from autoprune.engine.evaluate import recalibrate_bn

        recalibrate_bn(pruned, setup.calibration)
        epochs = preset.finetune_epochs
        fit(pruned, data.train, TrainConfig(epochs=epochs, lr=0.01, batch_size=128, distill=preset.distill,
                                            seed=args.seed),
            teacher=setup.base if preset.distill > 0 else None, progress=False)
        rows[name]["test"] = evaluate(pruned, data.test).accuracy
        log.info("%-16s val %.4f -> test after %d epochs %.4f", name, rows[name]["val"], epochs, rows[name]["test"])
    base_test = evaluate(setup.base, data.test).accuracy
    out = RESULTS / "probes"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.preset}_seed{args.seed}_{int(time.time())}.json"
    path.write_text(json.dumps({"preset": args.preset, "seed": args.seed, "base_val": setup.base_score,
                                "base_test": base_test, "streams": [space.groups[i].name for i in streams],
                                "rows": rows}, indent=1))
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
