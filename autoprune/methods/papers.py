"""The five paper methods (see SEEDS.md): otp, pso, ssa, gdp here; sa in :mod:`autoprune.methods.contrast`."""

from __future__ import annotations

import numpy as np

from autoprune.checks import check_choice, check_float, check_int
from autoprune.methods.base import Method, MethodContext, Plan, criterion_scores, register_method


@register_method
class OTP(Method):
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

    #: Measured sensitivity costs one masked forward pass per channel and calibration sample; above this
    #: many multiply-accumulates in all (about a minute on two CPU cores) it is estimated to first order.
    MEASURED_WORK_LIMIT = 1e11

    def __init__(self, *, mode: str = "auto", max_batches: int = 8, step: float = 1 / 16) -> None:
        """Args:
        mode: sensitivity ``"measured"``, ``"first_order"`` or ``"auto"`` (measured while affordable).
        max_batches: calibration batches of the importance.
        step: one greedy move, as a fraction of a layer's keep-ratio range.
        """
        self.mode = check_choice("mode", mode, ("auto", "measured", "first_order"))
        self.max_batches = check_int("max_batches", max_batches, minimum=1)
        self.step = check_float("step", step, low=0.0, high=1.0, low_open=True)

    def plan(self, ctx: MethodContext) -> Plan:
        samples = self.max_batches * 128
        work = float(ctx.space.channels.sum()) * samples * ctx.space.base_macs
        mode = self.mode if self.mode != "auto" else ("measured" if work <= self.MEASURED_WORK_LIMIT
                                                      else "first_order")
        scores = criterion_scores(ctx, "otp", mode=mode, max_batches=self.max_batches, method=self.name)
        return Plan(ctx.model, scores, "greedy", {"step": self.step}, notes={"sensitivity": mode})


@register_method
class PSO(Method):
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

    def __init__(self, *, particles: int = 10, iterations: int = 100) -> None:
        """Args:
        particles: swarm size.
        iterations: swarm updates (the paper's 100).
        """
        self.particles = check_int("particles", particles, minimum=1)
        self.iterations = check_int("iterations", iterations, minimum=1)

    def plan(self, ctx: MethodContext) -> Plan:
        options = {"particles": self.particles, "iterations": self.iterations}
        return Plan(ctx.model, criterion_scores(ctx, "l1", method=self.name), "pso", options)


@register_method
class SSA(Method):
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

    def __init__(self, *, grid: float = 1 / 16, population: int = 20, iterations: int = 50) -> None:
        """Args:
        grid: the constraint set's keep-ratio step, in (0, 1].
        population: sparrows.
        iterations: update rounds.
        """
        self.grid = check_float("grid", grid, low=0.0, high=1.0, low_open=True)
        self.population = check_int("population", population, minimum=2)
        self.iterations = check_int("iterations", iterations, minimum=1)

    def plan(self, ctx: MethodContext) -> Plan:
        space = ctx.space
        choices = tuple(np.unique(space.snap_one(i, np.arange(self.grid, 1.0 + 1e-9, self.grid)))
                        for i in range(len(space)))
        options = {"population": self.population, "iterations": self.iterations}
        return Plan(ctx.model, criterion_scores(ctx, "l1", method=self.name), "ssa", options, choices=choices,
                    notes={"constraint_grid": self.grid})


@register_method
class GDP(Method):
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

    def __init__(self, *, max_batches: int = 16) -> None:
        """Args:
        max_batches: training batches over which gradients are accumulated.
        """
        self.max_batches = check_int("max_batches", max_batches, minimum=1)

    def plan(self, ctx: MethodContext) -> Plan:
        scores = criterion_scores(ctx, "gradient", max_batches=self.max_batches, method=self.name)
        return Plan(ctx.model, scores, "threshold", {"scores": [s.numpy() for s in scores], "rule": "adaptive"})
