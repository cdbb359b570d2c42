"""The pruning space: groups, analytic cost == counted cost, masking == surgery, for every registry model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ModernNet, small_model

from autoprune.engine.evaluate import recalibrate_bn
from autoprune.engine.space import PruningSpace, counted_cost
from autoprune.errors import AutopruneError
from autoprune.models import model_names


def uniform_keep(space: PruningSpace, reduction: float) -> np.ndarray:
    """Largest common keep ratio meeting the MACs reduction (bisection on the analytic model)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if space.relative_macs(np.clip(np.full(len(space), mid), space.lower, 1)) <= 1 - reduction:
            lo = mid
        else:
            hi = mid
    return space.snap(np.clip(np.full(len(space), lo), space.lower, 1))


@pytest.mark.parametrize("name", model_names())
def test_every_registry_model_prunes_to_the_requested_reduction(name):
    model, x = small_model(name)
    space = PruningSpace(model, x[:1])
    keep = uniform_keep(space, 0.5)
    scores = [torch.rand(g.channels, generator=torch.Generator().manual_seed(g.index)) for g in space.groups]
    pruned = space.apply(model, keep, scores)
    counted = counted_cost(pruned, x[:1])
    assert counted.macs <= 0.5 * space.base_macs
    assert counted == space.cost(keep)  # analytic == Torch-Pruning's counter, MACs and params
    assert counted_cost(model, x[:1]) == space.cost(space.upper)
    assert pruned(x).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == space.base_params  # original untouched


@pytest.mark.parametrize("name", model_names())
def test_masked_candidate_equals_physically_pruned(name):
    model, x = small_model(name)
    space = PruningSpace(model, x[:1])
    rng = np.random.default_rng(0)
    keep = space.snap(rng.uniform(space.lower, 1.0))
    scores = [torch.rand(g.channels) for g in space.groups]
    calibration = [torch.rand(64, *x.shape[1:])]  # one batch of 64 images
    pruned = space.apply(model, keep, scores)
    recalibrate_bn(pruned, calibration)
    with space.masked(model, keep, scores) as masked:
        recalibrate_bn(masked, calibration)
        masked.eval()
        a = masked(x)
    b = pruned.eval()(x)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # hooks are gone after the block: the model computes unpruned again
    assert not any(m._forward_hooks for m in model.modules())


def test_resnet_residual_channels_share_one_group():
    model, x = small_model("resnet20")
    space = PruningSpace(model, x[:1])
    stream = [g for g in space.groups if any(m.module == "net.layer1.2.bn2" for m in g.members)]
    assert len(stream) == 1
    writers = {m.module for m in stream[0].members if m.dim == "out"}
    assert {"net.bn1", "net.layer1.0.bn2", "net.layer1.1.bn2", "net.layer1.2.bn2"} <= writers
    assert all(not g.root.startswith("net.fc") for g in space.groups)  # classifier kept


def test_lenet_groups_and_flatten_coupling():
    model, x = small_model("lenet5")
    space = PruningSpace(model, x[:1])
    assert [g.channels for g in space.groups] == [6, 16, 120, 84]
    fc_in = [m for m in space.groups[1].members if m.module == "net.classifier.1"]
    assert fc_in and fc_in[0].ratio == 25  # 16 channels x 5x5 positions feed the first linear layer


def test_counts_respect_round_to_and_minimum_width():
    model, x = small_model("vgg11")
    space = PruningSpace(model, x[:1], round_to=4, min_ratio=0.25)
    counts = space.counts(np.full(len(space), 0.01))
    assert all(c % 4 == 0 and c >= 0.25 * g.channels for c, g in zip(counts, space.groups, strict=True))
    assert np.array_equal(space.snap(space.snap(np.full(len(space), 0.37))), space.snap(np.full(len(space), 0.37)))


def test_lowest_scored_channels_are_removed():
    model, x = small_model("lenet5")
    space = PruningSpace(model, x[:1])
    scores = [torch.arange(g.channels, dtype=torch.float32) for g in space.groups]
    removed = space.removed_channels(space.snap([0.5, 0.5, 0.5, 0.5]), scores)
    assert removed[0].tolist() == [0, 1, 2]


def test_bad_keep_vectors_are_clear_errors():
    model, x = small_model("lenet5")
    space = PruningSpace(model, x[:1])
    with pytest.raises(AutopruneError, match="4 groups"):
        space.counts([0.5])
    with pytest.raises(AutopruneError, match="NaN"):
        space.counts([0.5, float("nan"), 1, 1])


class _Blocked(torch.nn.Module):
    """A GroupNorm after a plain convolution, a grouped (not depthwise) convolution, a GroupNorm after it."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2, self.b2 = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.c3, self.n3 = nn.Conv2d(24, 24, 1, groups=2), nn.GroupNorm(6, 24)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.n1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.n3(self.c3(x)))
        return self.head(x.mean((2, 3)))


def test_groupnorm_and_grouped_convolutions_keep_whole_blocks():
    torch.manual_seed(0)
    model, x = _Blocked().eval(), torch.randn(2, 3, 8, 8)
    space = PruningSpace(model, x[:1])
    by_root = {g.root: g for g in space.groups}
    # c1's 16 channels: GroupNorm(4) and c2's 4 input groups; c2's 24: its 4 groups and c3's 2 (lcm 4); c3: 6 and 2
    assert (by_root["c1"].chunks, by_root["c2"].chunks, by_root["c3"].chunks) == (4, 4, 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        keep = space.snap(rng.uniform(space.lower, 1.0))
        counts = space.counts(keep)
        assert all(c % g.chunks == 0 for c, g in zip(counts, space.groups, strict=True))
        scores = [torch.rand(g.channels) for g in space.groups]
        removed = space.removed_channels(keep, scores)
        for g, idx in zip(space.groups, removed, strict=True):  # the same positions in every block
            size = g.channels // g.chunks
            blocks = [sorted(int(i) % size for i in idx if i // size == b) for b in range(g.chunks)]
            assert all(b == blocks[0] for b in blocks)
        pruned = space.apply(model, keep, scores)
        assert pruned(x).shape == (2, 10)
        assert (pruned.n1.num_groups, pruned.c2.groups, pruned.c3.groups, pruned.n3.num_groups) == (4, 4, 2, 6)
        assert counted_cost(pruned, x[:1]) == space.cost(keep)
    # a kept output channel of the grouped convolution keeps its weights on the inputs of its own group
    keep = space.snap([0.5 if g.root == "c1" else 1.0 for g in space.groups])
    scores = [torch.arange(g.channels, dtype=torch.float32) for g in space.groups]
    pruned = space.apply(model, keep, scores)
    kept_inputs = [2, 3, 6, 7, 10, 11, 14, 15]  # the top half of each of c1's 4 blocks of 4
    assert space.removed_channels(keep, scores)[[g.root for g in space.groups].index("c1")].tolist() == [
        0, 1, 4, 5, 8, 9, 12, 13]
    original = model.c2.weight.detach()  # (24, 4, 3, 3): output o reads inputs 4 * (o // 6) ...
    for o in range(24):
        group_inputs = [i - 4 * (o // 6) for i in kept_inputs if i // 4 == o // 6]
        torch.testing.assert_close(pruned.c2.weight[o], original[o, group_inputs])


def test_groupnorm_over_a_concatenation_is_kept_whole():
    class Concat(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Conv2d(3, 6, 3, padding=1)
            self.n = torch.nn.GroupNorm(4, 12)
            self.c = torch.nn.Conv2d(12, 8, 3, padding=1)
            self.head = torch.nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.n(torch.cat([self.a(x), self.b(x)], 1)))
            return self.head(torch.relu(self.c(y)).mean((2, 3)))

    model, x = Concat().eval(), torch.randn(2, 3, 8, 8)
    space = PruningSpace(model, x[:1])
    assert [g.root for g in space.groups] == ["c"]  # a and b feed one GroupNorm whose groups straddle them
    pruned = space.apply(model, space.snap([0.5]), [torch.rand(8)])
    assert pruned(x).shape == (2, 10)


def test_modern_layers_prune_with_exact_costs_and_masks():
    torch.manual_seed(0)
    model, x = ModernNet().eval(), torch.randn(2, 3, 16, 16)
    space = PruningSpace(model, x[:1])
    writing = {m.module: g for g in space.groups for m in g.members if m.dim == "out"}
    assert len(space) == 5 and writing["up"] is writing["reduce"]  # the transposed conv writes the residual stream
    assert {"stem", "grow", "mix", "expand"} <= {g.root for g in space.groups}
    # the BatchNorm after the concatenation: stem's channels are its first 8, grow's its last 6
    pre = {root: next(m for m in writing[root].members if m.module == "pre") for root in ("stem", "grow")}
    assert pre["stem"].index == tuple(range(8)) and pre["grow"].index == tuple(range(8, 14))
    assert any(m.dim == "param" and m.module == "gamma" for m in writing["up"].members)
    rng = np.random.default_rng(0)
    for _ in range(10):
        keep = space.snap(rng.uniform(space.lower, 1.0))
        scores = [torch.rand(g.channels) for g in space.groups]
        pruned = space.apply(model, keep, scores)
        assert pruned(x).shape == (2, 10)
        # MACs of the transposed convolution, the gamma and the BatchNorm without weights: as counted
        assert counted_cost(pruned, x[:1]) == space.cost(keep)
        assert pruned.gamma.shape == (pruned.up.out_channels,)
        # masking equals surgery where no LayerNorm is pruned (it normalises over the channels it keeps)
        keep[writing["up"].index] = 1.0
        with space.masked(model, keep, scores) as masked:
            a = masked(x)
        torch.testing.assert_close(a, space.apply(model, keep, scores)(x), atol=1e-5, rtol=1e-5)


def test_a_pruned_model_that_no_longer_runs_is_one_line():
    class Fixed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).reshape(x.shape[0], 16, -1).mean(2))  # 16 channels, hard-coded

    model, x = Fixed(), torch.randn(2, 3, 8, 8)
    space = PruningSpace(model, x[:1])
    with pytest.raises(AutopruneError, match="pruned model fails on its example inputs .* ignored_layers"):
        space.apply(model, space.snap([0.5]), [torch.rand(16)])
