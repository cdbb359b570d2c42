"""The five paper methods (see SEEDS.md): otp, pso, ssa, gdp here; sa in :mod:`autoprune.methods.contrast`."""

from __future__ import annotations

import numpy as np

from autoprune.errors import AutopruneError
from autoprune.methods.base import Method, MethodContext, Plan, criterion_scores, register_method


@register_method
class OptimalThreshold(Method):
    """OTP: greedy optimal threshold (Wang, Liu & Pan, ICMAI 2020).

    The paper: node importance from *sensitivity* and *correlation*; a greedy algorithm selects the
    optimal threshold, the one that balances the largest sparsity against the smallest error (loss of
    accuracy within 2%); nodes below it are deleted. Our reading: importance = sensitivity x
    (1 - max correlation within the layer) (criterion ``otp``); the greedy strategy raises one layer's
    threshold by one step at a time, taking the step that saves the most MACs per point of validation
    accuracy lost, until the MACs target is met (or, with ``--max-drop``, until any further step would
    exceed the tolerance; the paper's tolerance is ``--max-drop 2``). The budget bounds the steps.
    """

    name = "otp"
    summary = "paper 1: sensitivity x (1 - correlation) importance, greedy per-layer threshold raising"
    source = "Wang, Liu & Pan 2020 (optimal threshold)"
    default_budget = 400
    option_types = {"step": float}

    #: Measured sensitivity costs one masked forward pass per channel and calibration sample; above this
    #: many multiply-accumulates in all (about a minute on two CPU cores) it is estimated to first order.
    MEASURED_WORK_LIMIT = 1e11

    def plan(self, ctx: MethodContext) -> Plan:
        options = {}
        if "step" in ctx.options:
            options["step"] = self.option(ctx, "step", 0.0625)
        max_batches = self.option(ctx, "max_batches", 8, int)
        samples = min(len(ctx.splits.train), max_batches * min(128, ctx.train.batch_size))
        work = float(ctx.space.channels.sum()) * samples * ctx.space.base_macs
        mode = str(ctx.options.get("mode", "measured" if work <= self.MEASURED_WORK_LIMIT else "first_order"))
        scores = criterion_scores(ctx, "otp", mode=mode, max_batches=max_batches)
        return Plan(ctx.model, scores, "greedy", options, notes={"sensitivity": mode, "calibration_samples": samples})


@register_method
class ParticleSwarm(Method):
    """PSOPruner (Zhang, Hong, Wu, Liu & Ju, ICHCI 2020).

    The paper: particles are candidate pruned structures; each particle gives a threshold per
    convolutional layer and kernels whose value is below it are deleted; the pruned structure is
    evaluated, particles and the global best are updated, and the global best is retrained; 100
    iterations. Our reading: kernel value = L1 norm of the filter; a per-layer threshold and the
    fraction of filters above it (the keep ratio) are monotone images of each other, so particles move
    in keep-ratio coordinates; standard global-best PSO with linearly decreasing inertia. Fitness is
    validation accuracy (never test) at the requested MACs budget. Default: 100 iterations of 10
    particles, capped by ``--budget``.
    """

    name = "pso"
    summary = "paper 2: particle swarm over per-layer magnitude thresholds (PSOPruner)"
    source = "Zhang et al. 2020 (PSOPruner)"
    default_budget = 1000
    option_types = {"particles": int, "iterations": int}

    def plan(self, ctx: MethodContext) -> Plan:
        options = {"particles": self.option(ctx, "particles", 10, int),
                   "iterations": self.option(ctx, "iterations", 100, int)}
        return Plan(ctx.model, criterion_scores(ctx, "l1"), "pso", options)


@register_method
class SparrowSearch(Method):
    """Sparrow search channel pruning (Xie & Feng, CECIT 2023).

    The paper: the number of channels per layer is determined by the sparrow search algorithm over a
    super-parameter constraint set that reduces the number of candidate structures. Our reading: the
    constraint set allows keep ratios in steps of ``grid`` (default 1/16) above each layer's minimum
    width; sparrows (producers, scroungers, vigilant ones) move as in Xue & Shen's SSA and snap to it;
    channels within a layer are chosen by L1 norm; fitness is validation accuracy at the MACs budget.
    """

    name = "ssa"
    summary = "paper 4: sparrow search over per-layer channel counts on a constraint grid"
    source = "Xie & Feng 2023 (sparrow search)"
    default_budget = 1000
    option_types = {"grid": float, "population": int, "iterations": int}

    def plan(self, ctx: MethodContext) -> Plan:
        grid = self.option(ctx, "grid", 1 / 16)
        if not 0 < grid <= 1:
            raise AutopruneError(f"method option grid={grid} for 'ssa' must lie in (0, 1] (a keep-ratio step)")
        space = ctx.space
        choices = tuple(np.unique(space.snap_one(i, np.arange(grid, 1.0 + 1e-9, grid)))
                        for i in range(len(space)))
        options = {"population": self.option(ctx, "population", 20, int),
                   "iterations": self.option(ctx, "iterations", 50, int)}
        return Plan(ctx.model, criterion_scores(ctx, "l1"), "ssa", options, choices=choices,
                    notes={"constraint_grid": grid})


@register_method
class GradientPruning(Method):
    """GDP: gradient-based deep network pruning (Wang, Xu, Song, Zhang & Cai, J. Comput. Appl. 2020).

    The paper: the gradient is the basis for judging each weight's importance; weights whose gradients
    fall below a threshold are removed; the threshold is found adaptively; the network is retrained.
    Our reading: |dL/dW| accumulated over training batches and summed per filter (structured pruning);
    each layer's threshold is mu + a*sigma of its own score distribution with one global multiplier
    ``a``, moved until the MACs target (or accuracy tolerance) is met; then fine-tuning.
    """

    name = "gdp"
    summary = "paper 5: accumulated gradient magnitude, adaptive per-layer threshold (mu + a*sigma)"
    source = "Wang et al. 2020 (GDP)"
    default_budget = 60

    def plan(self, ctx: MethodContext) -> Plan:
        scores = criterion_scores(ctx, "gradient")
        return Plan(ctx.model, scores, "threshold", {"scores": [s.numpy() for s in scores], "rule": "adaptive"})
