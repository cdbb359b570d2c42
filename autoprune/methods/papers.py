"""The five paper methods (see SEEDS.md): otp, pso, ssa, gdp here; sa in :mod:`autoprune.methods.contrast`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoprune.checks import check_choice, check_float, check_int
from autoprune.errors import AutopruneError
from autoprune.methods.base import Method, MethodContext, Plan, criterion_scores, register_method, residual_start
from autoprune.search.base import check_bool

#: Channel scores of the searches (pso, ssa) and of the random baseline compared with them: the L1 norm of
#: a channel's filters and of the next layers' kernels reading it. Measured on ResNet-20 / CIFAR-10 at 60%
#: of the MACs removed, seed 0 (benchmarks/structure_probe.py): after the 3-epoch fine-tuning, 65.13%
#: against 64.77% with the filters' L1 norm alone (uniform structure), 66.22% against 65.70% (streams kept
#: wider).
SEARCH_CRITERION = "l1_group"


@register_method
class OTP(Method):
    """OTP: greedy optimal threshold (Wang, Liu & Pan, ICMAI 2020).

    The paper: "The algorithm uses the optimization ability of the greedy algorithm to select an optimal
    threshold, and uses the sensitivity and correlation of the node as factors to determine whether the
    node is important. Then by deleting the nodes whose importance is below the optimal threshold, the
    purpose of pruning the network is achieved" (loss of accuracy within 2%).

    Our reading: importance = sensitivity x (1 - max correlation within the layer) (criterion ``otp``),
    the sensitivity *measured* (the loss increase when the channel is removed) where affordable, and
    divided by its largest value over the whole network (``normalize="global"``), so that one threshold
    compares channels of different layers by the loss their removal costs. "Balance the maximum sparse
    rate and the minimum error": the threshold is on importance per MAC (``per_mac``), the order in
    which a greedy algorithm removes the nodes that lose the least per unit of computation saved (the
    greedy knapsack order). It is one number for the network (strategy ``threshold``, rule ``global``
    with ``per_cost``): a channel is kept iff its importance divided by the MACs one channel of its
    layer costs is above it (a layer always keeps its minimum width, its most important channels).
    The greedy raise of the threshold, removing the least important channels first, is walked on the
    cost model up to the first threshold that meets the MACs target (every threshold before it is
    infeasible), and ``probes`` further raises are evaluated on validation data; the most accurate is
    the optimal threshold. With ``max_drop`` (the paper's 2%: ``max_drop=2``), bisection along the
    raises finds the highest threshold whose accuracy drop stays within the tolerance.

    Measured (``benchmarks/structure_probe.py``, validation accuracy after BatchNorm re-estimation, seed
    0): on LeNet-5 at 90% of the MACs removed, one threshold on the importance alone prunes every layer
    to its minimum width but one (conv1 must keep 1 channel of 6, which takes a threshold above nearly
    everything): 17.1%, per MAC 24.9%; on ResNet-20 at 60%, first-order sensitivity (8 batches)
    14.9% / 19.5% (per MAC), measured (2 batches) 21.6% / 32.2%. The uniform structure scores 35.3%
    there, so the importance's channel choice (26.7% at the uniform structure, against 35.3% for the
    filters' L1 norm) is what OTP costs on ResNet-20.

    The per-layer greedy walk this method used before (lower one layer's keep ratio at a time, taking
    the move that saves the most MACs per point of accuracy lost: strategy ``greedy``) is not a
    threshold on the importance, needs about 12 evaluations per step on ResNet-20 and did not reach a
    60% target in a budget of 40; it remains available as the ``greedy`` strategy.
    """

    name = "otp"
    summary = "paper 1: sensitivity x (1 - correlation) importance, one greedily raised threshold"
    source = "Wang, Liu & Pan 2020 (optimal threshold)"
    default_budget = 40

    #: Measured sensitivity costs one masked forward pass per channel and calibration sample. In ``"auto"``
    #: mode it is measured on as many calibration batches (up to ``max_batches``) as fit in this many
    #: multiply-accumulates (a few minutes on two CPU cores: ResNet-20 gets 2 batches of 128, LeNet-5 all
    #: 8), if at least :attr:`MIN_MEASURED_BATCHES` fit; otherwise estimated to first order.
    MEASURED_WORK_LIMIT = 5e12
    MIN_MEASURED_BATCHES = 2

    def __init__(self, *, mode: str = "auto", max_batches: int = 8, normalize: str = "global",
                 per_mac: bool = True, probes: int = 4) -> None:
        """Args:
        mode: sensitivity ``"measured"``, ``"first_order"`` or ``"auto"`` (measured while affordable).
        max_batches: calibration batches of the importance.
        normalize: sensitivities divided by the largest over the network (``"global"``) or per layer
            (``"group"``).
        per_mac: the threshold is on importance per MAC a channel costs (the greedy knapsack order).
        probes: thresholds evaluated beyond the first one that meets the MACs target.
        """
        self.mode = check_choice("mode", mode, ("auto", "measured", "first_order"))
        self.max_batches = check_int("max_batches", max_batches, minimum=1)
        self.normalize = check_choice("normalize", normalize, ("global", "group"))
        self.per_mac = check_bool("per_mac", per_mac)
        self.probes = check_int("probes", probes, minimum=0)

    def sensitivity(self, ctx: MethodContext) -> tuple[str, int]:
        """How sensitivity is obtained on ``ctx``'s model: the mode and the calibration batches."""
        if self.mode != "auto":
            return self.mode, self.max_batches
        per_batch = float(ctx.space.channels.sum()) * 128 * ctx.space.base_macs
        affordable = int(self.MEASURED_WORK_LIMIT // per_batch)
        if affordable >= min(self.MIN_MEASURED_BATCHES, self.max_batches):
            return "measured", min(self.max_batches, affordable)
        return "first_order", self.max_batches

    def plan(self, ctx: MethodContext) -> Plan:
        mode, batches = self.sensitivity(ctx)
        scores = criterion_scores(ctx, "otp", mode=mode, max_batches=batches, normalize=self.normalize,
                                  method=self.name)
        return Plan(ctx.model, scores, "threshold",
                    {"scores": [s.numpy() for s in scores], "rule": "global", "per_cost": self.per_mac,
                     "probes": self.probes},
                    notes={"sensitivity": mode, "sensitivity_batches": batches, "normalize": self.normalize,
                           "per_mac": self.per_mac})


@register_method
class PSO(Method):
    """PSOPruner (Zhang, Hong, Wu, Liu & Ju, ICHCI 2020).

    The paper: "the algorithm randomly initializes a series of particles as the pruned network structure;
    secondly, calculates the threshold corresponding to each convolutional layer according to the
    particles, deletes the convolution kernels with corresponding values less than the threshold; then,
    adapts the pruned network structure evaluation, update the particles and the global optimal fitness
    particles; finally, retrain the network structure corresponding to the global optimal fitness
    particles"; 100 iterations. Our reading: a channel's kernel value = the L1 norm of every kernel its
    removal deletes, its filters and the kernels of the next layers that read it (criterion
    ``l1_group``, :data:`SEARCH_CRITERION`); a per-layer threshold
    and the fraction of filters above it (the keep ratio) are monotone images of each other, so particles
    move in keep-ratio coordinates; standard global-best PSO with linearly decreasing inertia. Fitness is
    validation accuracy (never test) within the requested MACs budget: positions within ``band`` below
    the cost ceiling are evaluated as they are, others have their pruned fraction scaled onto it (see
    :class:`~autoprune.search.ParticleSwarm`). Where the paper initialises every particle at random, one
    particle starts at the uniform structure (``start_uniform``), the usual starting point of a
    structure search, and in a network with residual streams one with the streams pruned a quarter as
    much as the other layers (``start_streams``; :func:`~autoprune.methods.base.residual_start`).
    Default: 100 iterations of 10 particles, capped by the budget.
    """

    name = "pso"
    summary = "paper 2: particle swarm over per-layer magnitude thresholds (PSOPruner)"
    source = "Zhang et al. 2020 (PSOPruner)"
    default_budget = 1000

    def __init__(self, *, particles: int = 10, iterations: int = 100, band: float = 0.05,
                 start_uniform: bool = True, start_streams: bool = True) -> None:
        """Args:
        particles: swarm size.
        iterations: swarm updates (the paper's 100).
        band: relative width of the band below the MACs ceiling where positions are evaluated as they are.
        start_uniform: one particle starts at the uniform structure.
        start_streams: in a network with residual streams, one particle starts with the streams pruned a
            quarter as much as the other layers.
        """
        self.particles = check_int("particles", particles, minimum=1, maximum=10_000)
        self.iterations = check_int("iterations", iterations, minimum=1)
        self.band = check_float("band", band, low=0.0, high=1.0, high_open=True)
        self.start_uniform = check_bool("start_uniform", start_uniform)
        self.start_streams = check_bool("start_streams", start_streams)

    def plan(self, ctx: MethodContext) -> Plan:
        options = {"particles": self.particles, "iterations": self.iterations, "band": self.band,
                   "start_uniform": self.start_uniform,
                   "starts": residual_start(ctx.model, ctx.space) if self.start_streams else []}
        return Plan(ctx.model, criterion_scores(ctx, SEARCH_CRITERION, method=self.name), "pso", options)


@register_method
class SSA(Method):
    """Sparrow search channel pruning (Xie & Feng, CECIT 2023).

    The paper: "By setting the super-parameter constraint set, the combination number of pruning
    structures is reduced. The number of channels for each layer of the CNN is determined using the
    sparrow search algorithm, and the optimal pruned structure of the model is found." Our reading: the
    constraint set allows keep ratios in steps of ``grid`` (default 1/16) above each layer's minimum
    width; sparrows (producers, scroungers, vigilant ones) move as in Xue & Shen's SSA and snap to it;
    positions within ``band`` below the MACs ceiling are evaluated as they are, others are scaled onto
    it; one sparrow starts at the uniform structure (``start_uniform``) and, in a network with residual
    streams, one with the streams pruned a quarter as much as the other layers (``start_streams``);
    channels within a layer are chosen by the L1 norm of everything their removal deletes (criterion
    ``l1_group``); fitness is validation accuracy (see :class:`~autoprune.search.SparrowSearch`).
    """

    name = "ssa"
    summary = "paper 4: sparrow search over per-layer channel counts on a constraint grid"
    source = "Xie & Feng 2023 (sparrow search)"
    default_budget = 1000

    def __init__(self, *, grid: float = 1 / 16, population: int = 20, iterations: int = 50, band: float = 0.05,
                 start_uniform: bool = True, start_streams: bool = True) -> None:
        """Args:
        grid: the constraint set's keep-ratio step, in [0.001, 1].
        population: sparrows.
        iterations: update rounds.
        band: relative width of the band below the MACs ceiling where positions are evaluated as they are.
        start_uniform: one sparrow starts at the uniform structure.
        start_streams: in a network with residual streams, one sparrow starts with the streams pruned a
            quarter as much as the other layers.
        """
        self.grid = check_float("grid", grid, low=0.001, high=1.0)
        self.population = check_int("population", population, minimum=2, maximum=10_000)
        self.iterations = check_int("iterations", iterations, minimum=1)
        self.band = check_float("band", band, low=0.0, high=1.0, high_open=True)
        self.start_uniform = check_bool("start_uniform", start_uniform)
        self.start_streams = check_bool("start_streams", start_streams)

    def plan(self, ctx: MethodContext) -> Plan:
        space = ctx.space
        choices = tuple(np.unique(space.snap_one(i, np.arange(self.grid, 1.0 + 1e-9, self.grid)))
                        for i in range(len(space)))
        options = {"population": self.population, "iterations": self.iterations, "band": self.band,
                   "start_uniform": self.start_uniform,
                   "starts": residual_start(ctx.model, ctx.space) if self.start_streams else []}
        return Plan(ctx.model, criterion_scores(ctx, SEARCH_CRITERION, method=self.name), "ssa", options,
                    choices=choices,
                    notes={"constraint_grid": self.grid})


def _exponents(value: Sequence[float] | str) -> tuple[float, ...]:
    """A tuple of exponents in [0, 1] from a sequence or comma-separated text."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        exponents = tuple(float(v) for v in items)
    except (TypeError, ValueError) as exc:
        raise AutopruneError(f"option exponents must be numbers in [0, 1], got {value!r}") from exc
    if not exponents:
        raise AutopruneError("option exponents must name at least one exponent in [0, 1]")
    return tuple(check_float("exponents", e, low=0.0, high=1.0) for e in exponents)


@register_method
class GDP(Method):
    """GDP: gradient-based deep network pruning (Wang, Xu, Song, Zhang & Cai, J. Comput. Appl. 2020).

    The paper: "The core idea of GDP algorithm was to use the gradient as the basis for judging the
    importance of each weight. To eliminate the weights corresponding to the gradients smaller than the
    threshold, an adaptive method was used to find the threshold to screen the weights. The deep network
    model was retrained after pruning to restore the network performance." Compared with PFEC.

    Our reading:

    * Importance: ``|dL/dW|`` accumulated over training batches, by default one whole pass over the
      training data (``max_batches=0``; DESIGN.md: "the gradient magnitude accumulated over training
      batches"), per batch, averaged; aggregated per channel as the sum over the weights the channel
      owns (criterion ``gradient``, ``reduction="sum"``): a channel written by several layers (a
      residual stream) owns more weights and counts them all. (``reduction="mean"``, per weight, was
      measured worse on ResNet-20 at 60%: every exponent's first structure pruned a residual stream to
      4-26 of its 64 channels, best validation accuracy 35.8%, against 38.2% with the sum at ``beta =
      0.5``, which keeps the streams whole; the uniform structure scores 35.3%.)
    * Adaptive threshold: layer ``i`` removes the channels whose importance is below ``t * m_i ** beta``
      (``m_i`` the layer's mean importance): ``t`` is one threshold for the network, set by the MACs
      target, and ``beta`` how far each layer's threshold adapts to its own gradient level. ``beta = 0``
      prunes layers with small gradients more than others, ``beta = 1`` compares each layer with its own
      mean. One candidate per ``beta`` in ``exponents`` (and ``probes`` more thresholds beyond each) is
      evaluated on validation data; the most accurate is kept (strategy ``threshold``, rule ``relative``).
      The rule ``mu_i + a * sigma_i`` used before standardised every layer, which prunes layers alike
      when their gradient distributions have the same shape: close to uniform pruning.
    * The pruned network is fine-tuned like every other method's.
    """

    name = "gdp"
    summary = "paper 5: accumulated gradient magnitude, adaptive per-layer threshold t * mean ** beta"
    source = "Wang et al. 2020 (GDP)"
    default_budget = 60

    def __init__(self, *, max_batches: int = 0, reduction: str = "sum",
                 exponents: Sequence[float] | str = (0.0, 0.25, 0.5, 0.75, 1.0), per_mac: bool = False,
                 probes: int = 1) -> None:
        """Args:
        max_batches: training batches over which gradients are accumulated (0: one whole pass).
        reduction: a channel's score is the ``"mean"`` or the ``"sum"`` of its weights' accumulated gradients.
        exponents: the values of ``beta`` tried, in [0, 1] (a list, or comma-separated text).
        per_mac: the thresholds are on importance per MAC a channel costs.
        probes: thresholds evaluated beyond the first that meets the MACs target, per exponent.
        """
        self.max_batches = check_int("max_batches", max_batches, minimum=0)
        self.reduction = check_choice("reduction", reduction, ("mean", "sum"))
        self.exponents = _exponents(exponents)
        self.per_mac = check_bool("per_mac", per_mac)
        self.probes = check_int("probes", probes, minimum=0)

    def batches(self, ctx: MethodContext) -> int:
        """How many training batches the gradients are accumulated over."""
        if self.max_batches:
            return self.max_batches
        try:
            return max(1, len(ctx.loader(self.name, "accumulating gradients")))  # type: ignore[arg-type]
        except TypeError:
            return 256

    def plan(self, ctx: MethodContext) -> Plan:
        batches = self.batches(ctx)
        scores = criterion_scores(ctx, "gradient", max_batches=batches, reduction=self.reduction, method=self.name)
        options = {"scores": [s.numpy() for s in scores], "rule": "relative", "exponents": self.exponents,
                   "per_cost": self.per_mac, "probes": self.probes}
        return Plan(ctx.model, scores, "threshold", options,
                    notes={"gradient_batches": batches, "per_mac": self.per_mac})
