"""Each paper method does what its docstring says the paper says (issue "Make the search matter").

Tiny models and synthetic data: ``otp`` searches one threshold on its importance; ``gdp``'s adaptive
threshold prunes layers with different gradient levels differently and accumulates gradients over a
whole pass; ``sa``'s contrast between shard networks is non-zero when the shards differ (and exactly zero
when they do not), is logged per layer, and its shard training does not reach the pruned network;
``slim``'s sparsity training is counted against the fine-tuning.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

import autoprune
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import TrainConfig, fit
from autoprune.methods import GDP, OTP, SA, MethodContext, Slim
from autoprune.search import Problem, create_strategy

SIZE = 12


def net(*, norm: bool = True) -> nn.Sequential:
    """Three convolutions (optionally with BatchNorm), global pooling, a classifier over 3 classes."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), *([nn.BatchNorm2d(cout)] if norm else []), nn.ReLU()]

    return nn.Sequential(*block(3, 8), *block(8, 12), *block(12, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 3))


def batches(seed: int, count: int = 6, *, channel: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable batches: the label is which third of the image is brightest (in ``channel`` only, if given)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.rand(16, 3, SIZE, SIZE, generator=g) * 0.3
        y = torch.randint(0, 3, (16,), generator=g)
        for i, label in enumerate(y.tolist()):
            rows = slice(4 * label, 4 * label + 4)
            if channel is None:
                x[i, :, rows] += 0.7
            else:
                x[i, channel, rows] += 0.7
        out.append((x, y))
    return out


def trained(model: nn.Module, data: list, epochs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    fit(model, data, TrainConfig(epochs=epochs, lr=0.05), progress=False)
    return model.eval()


def context(model: nn.Module, data: list, *, seed: int = 0, lr: float = 0.05) -> MethodContext:
    example = data[0][0][:1]
    return MethodContext(model=model, space=PruningSpace(model, example), example_inputs=example, train_loader=data,
                         device=torch.device("cpu"), seed=seed, train=TrainConfig(epochs=1, lr=lr), progress=False)


def problem_for(space: PruningSpace, max_cost: float = 0.5) -> Problem:
    return Problem(lower=space.lower, upper=space.upper, cost=space.relative_macs, snap=space.snap,
                   base_accuracy=1.0, max_cost=max_cost)


@pytest.fixture(scope="module")
def data() -> list:
    return batches(0)


@pytest.fixture(scope="module")
def model(data: list) -> nn.Module:
    torch.manual_seed(0)
    return trained(net(), data)


# --- otp ----------------------------------------------------------------------------------------------


def threshold_defined(scores: list[torch.Tensor], counts: np.ndarray, space: PruningSpace,
                      unit: np.ndarray | None = None) -> bool:
    """Every kept channel's score (divided by its layer's ``unit`` cost, if given) >= every removed channel's,
    over all layers (a layer at its minimum width keeps its best channels whatever their score, so its kept
    ones are not compared)."""
    kept, removed = [], []
    unit = np.ones(len(scores)) if unit is None else unit
    for score, count, group, cost in zip(scores, counts, space.groups, unit, strict=True):
        ranked = torch.sort(score.double() / float(cost), descending=True).values
        if count > group.min_keep:
            kept.append(ranked[:count])
        removed.append(ranked[count:])
    kept_all, removed_all = torch.cat(kept), torch.cat(removed)
    return not kept_all.numel() or not removed_all.numel() or bool(kept_all.min() >= removed_all.max())


def test_otp_candidates_are_one_threshold_on_its_importance(model: nn.Module, data: list) -> None:
    ctx = context(model, data)
    plan = OTP(max_batches=2).plan(ctx)
    assert plan.strategy == "threshold" and plan.strategy_options["rule"] == "global"
    strategy = create_strategy(plan.strategy, problem_for(ctx.space), **plan.strategy_options)
    unit = strategy.channel_costs(ctx.space.channels) if plan.strategy_options["per_cost"] else None
    candidates = strategy.ask()
    assert len(candidates) >= 3, "the first threshold meeting the target and the raises beyond it"
    costs = [ctx.space.relative_macs(x) for x in candidates]
    assert costs == sorted(costs, reverse=True) and costs[0] <= 0.5
    for x in candidates:
        assert threshold_defined(plan.scores, ctx.space.counts(x), ctx.space, unit), x
    uniform = problem_for(ctx.space).uniform()
    assert not threshold_defined(plan.scores, ctx.space.counts(uniform), ctx.space, unit), \
        "the check must be able to fail: a uniform keep ratio is not one threshold on these scores"


def test_otp_end_to_end_evaluates_only_threshold_defined_structures(model: nn.Module, data: list) -> None:
    result = autoprune.prune(model, data[0][0][:1], method="otp", method_options={"max_batches": 2},
                             macs_reduction=0.5, train_loader=data, val_loader=data, finetune=None, budget=10,
                             latency_repeats=1, latency_batch=1)
    plan = OTP(max_batches=2).plan(context(model, data))
    space = PruningSpace(model, data[0][0][:1])
    strategy = create_strategy(plan.strategy, problem_for(space), **plan.strategy_options)
    unit = strategy.channel_costs(space.channels) if plan.strategy_options["per_cost"] else None
    assert result.history
    for row in result.history:
        assert threshold_defined(plan.scores, np.array(row.counts), space, unit), row.counts
    assert result.search.notes["normalize"] == "global"


# --- gdp ----------------------------------------------------------------------------------------------


def rescaled(model: nn.Module, factor: float) -> nn.Module:
    """The same function with the second convolution's output scaled up by ``factor`` and the third's weights
    down by it (ReLU is positively homogeneous): the second layer's gradients shrink by ``factor``, the
    third's grow by it."""
    import copy

    out = copy.deepcopy(model)
    second, third = out[2], out[4]
    with torch.no_grad():
        second.weight.mul_(factor)
        second.bias.mul_(factor)
        third.weight.div_(factor)
    return out


def test_gdp_threshold_differs_in_effect_between_layers(data: list) -> None:
    torch.manual_seed(1)
    base = trained(net(norm=False), data)
    model = rescaled(base, 30.0)
    x = data[0][0]
    torch.testing.assert_close(model(x), base(x), rtol=1e-4, atol=1e-4)
    ctx = context(model, data)
    plan = GDP(exponents=(0.0, 1.0), probes=0, per_mac=False).plan(ctx)
    assert plan.strategy_options["rule"] == "relative"
    strategy = create_strategy(plan.strategy, problem_for(ctx.space), **plan.strategy_options)
    by_exponent = dict(zip((0.0, 1.0), strategy.paths, strict=True))
    problem = problem_for(ctx.space)
    first = {beta: next(x for x in path if problem.cost_ok(x)) for beta, path in by_exponent.items()}
    # beta = 0: one threshold for the network; the layer with 30x smaller gradients loses far more channels
    # than the one with 30x larger ones, and more than it did before the rescaling.
    assert first[0.0][1] <= first[0.0][2] - 0.25, first[0.0]
    plain = GDP(exponents=(0.0,), probes=0, per_mac=False).plan(context(base, data))
    unscaled = create_strategy("threshold", problem, **plain.strategy_options)
    assert first[0.0][1] < unscaled.ask()[0][1]
    # the rule used before (mu + a sigma per layer) standardises the layers: rescaling changes nothing.
    adaptive = create_strategy("threshold", problem, scores=plan.strategy_options["scores"], rule="adaptive", probes=0)
    before = create_strategy("threshold", problem, rule="adaptive", probes=0,
                             scores=GDP(probes=0).plan(context(base, data)).strategy_options["scores"])
    np.testing.assert_array_equal(adaptive.ask()[0], before.ask()[0])


def test_gdp_accumulates_gradients_over_a_whole_pass(model: nn.Module, data: list) -> None:
    plan = GDP().plan(context(model, data))
    assert plan.notes["gradient_batches"] == len(data)
    assert GDP(max_batches=2).plan(context(model, data)).notes["gradient_batches"] == 2


# --- sa -----------------------------------------------------------------------------------------------


def alternating(first: list, second: list) -> list:
    """Batches taken in turn from two lists: shard 0 of two is ``first``, shard 1 is ``second``."""
    return [batch for pair in zip(first, second, strict=True) for batch in pair]


def test_sa_contrast_is_nonzero_when_the_shards_differ_and_logged_per_layer(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    base = net(norm=False)
    shards = alternating(batches(1, channel=0), batches(2, channel=2))
    ctx = context(base, shards, lr=0.1)
    with caplog.at_level(logging.INFO, logger="autoprune.methods.contrast"):
        plan = SA(networks=2, epochs=10).plan(ctx)
    table = plan.notes["contrast_per_layer"]
    assert set(table) == {g.name for g in ctx.space.groups}
    worst = {name: max(c for _, c in rows) for name, rows in table.items()}
    assert all(value > 0.05 for value in worst.values()), worst
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sa contrast")]
    assert len(logged) == len(ctx.space.groups)
    assert plan.penalty is not None and plan.penalty(ctx.space.lower + 0.5 * (1 - ctx.space.lower)) > 0


def test_sa_contrast_is_zero_when_the_shards_are_the_same() -> None:
    torch.manual_seed(2)
    base = net(norm=False)
    same = batches(1, channel=0)
    ctx = context(base, alternating(same, same), lr=0.1)
    plan = SA(networks=2, epochs=10).plan(ctx)
    assert all(c == 0.0 for rows in plan.notes["contrast_per_layer"].values() for _, c in rows)


def test_sa_shard_training_does_not_reach_the_pruned_network(model: nn.Module, data: list) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = SA(networks=2, epochs=2).plan(context(model, data))
    assert plan.model is model and plan.extra_training_epochs == 0
    assert plan.notes["probe_training_epochs"] == 2
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


# --- training accounted ---------------------------------------------------------------------------------


def test_slim_sparsity_training_is_counted_against_the_finetuning(model: nn.Module, data: list) -> None:
    plan = Slim(epochs=2).plan(context(model, data))
    assert plan.extra_training_epochs == 2
    result = autoprune.prune(model, data[0][0][:1], method="slim", method_options={"epochs": 1}, macs_reduction=0.5,
                             train_loader=data, val_loader=data, finetune=TrainConfig(epochs=2, lr=0.01), budget=3,
                             latency_repeats=1, latency_batch=1)
    assert result.search.notes["extra_training_epochs"] == 1
    assert result.finetune.epochs == 1, "2 fine-tuning epochs minus the 1 of sparsity training"


# --- hand-set starts -------------------------------------------------------------------------------------


class Residual(nn.Module):
    """A stem and two residual blocks on one stream: the stem's and the blocks' second convolutions write it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(8, 6, 3, padding=1), nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(x + self.a2(torch.relu(self.a1(x))))
        x = torch.relu(x + self.b2(torch.relu(self.b1(x))))
        return self.fc(x.mean((2, 3)))


def test_searches_start_with_the_residual_stream_pruned_less(data: list) -> None:
    from autoprune.methods import PSO, SSA
    from autoprune.methods.base import residual_start, residual_streams

    model = Residual().eval()
    ctx = context(model, data)
    streams = residual_streams(model, ctx.space)
    assert len(streams) == 1
    assert {m.module for m in ctx.space.groups[streams[0]].members if m.dim == "out"} >= {"stem", "a2", "b2"}
    [start] = residual_start(model, ctx.space)
    assert start[streams[0]] > max(v for i, v in enumerate(start) if i not in streams)
    for method in (PSO(), SSA()):
        assert method.plan(ctx).strategy_options["starts"] == [start]
    assert PSO(start_streams=False).plan(ctx).strategy_options["starts"] == []
    plain = trained(net(), data, epochs=1)
    assert residual_start(plain, context(plain, data).space) == []
