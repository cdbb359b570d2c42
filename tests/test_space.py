"""The pruning space: groups, analytic cost == counted cost, masking == surgery, for every registry model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import small_model

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
