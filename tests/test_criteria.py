"""Channel criteria: the contract every registered criterion keeps, and constructed cases per criterion."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoprune.criteria import (
    Criterion,
    OTPCriterion,
    create_criterion,
    criterion_names,
    max_abs_correlation,
    register_criterion,
)
from autoprune.criteria import otp as otp_module
from autoprune.criteria._common import out_members
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.models import NormalizedModel, create_model

DATA_CRITERIA = ["gradient", "otp", "taylor"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- models and data --------------------------------------------------------------------------


class ConvBNNet(nn.Module):
    """conv-BN-ReLU twice, global pooling, a linear classifier: two prunable groups (6 and 8 channels)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class PoolNet(nn.Module):
    """1x1 conv -> BN -> ReLU -> spatial mean -> linear: the loss depends on each channel in a known way."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def make_batches(shape: tuple[int, ...], classes: int, *, n: int = 2, size: int = 8, seed: int = 0
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(size, *shape, generator=gen), torch.randint(0, classes, (size,), generator=gen))
            for _ in range(n)]


def settle_bn(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, as a trained model has."""
    model.train()
    with torch.no_grad():
        for images, _ in batches:
            model(images)
    return model.eval()


def lenet() -> tuple[nn.Module, tuple[int, ...], int]:
    torch.manual_seed(0)
    net = create_model("lenet5", num_classes=10, in_channels=1, image_size=(28, 28))
    return NormalizedModel(net, [0.1307], [0.3081]), (1, 28, 28), 10


def resnet() -> tuple[nn.Module, tuple[int, ...], int]:
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, in_channels=3, image_size=(32, 32), width=0.25)
    model = NormalizedModel(net, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    return settle_bn(model, make_batches((3, 32, 32), 10, seed=1)), (3, 32, 32), 10


def convbn() -> tuple[nn.Module, tuple[int, ...], int]:
    torch.manual_seed(0)
    return settle_bn(ConvBNNet(), make_batches((3, 12, 12), 4, seed=1)), (3, 12, 12), 4


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...], int]]] = {
    "lenet5": lenet, "resnet20": resnet, "convbn": convbn}


def space_of(model: nn.Module, shape: tuple[int, ...]) -> PruningSpace:
    return PruningSpace(model, torch.rand(1, *shape))


# ---- the contract, for every registered criterion ---------------------------------------------


def _no_hooks(model: nn.Module) -> bool:
    for module in model.modules():
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return False
    return not any(p._backward_hooks for p in model.parameters())


CONTRACT_CASES = [(c, m) for c in criterion_names() for m in MODELS if not (c == "bn_scale" and m == "lenet5")]


@pytest.mark.parametrize(("name", "model_name"), CONTRACT_CASES)
def test_contract(name: str, model_name: str) -> None:
    model, shape, classes = MODELS[model_name]()
    space = space_of(model, shape)
    batches = make_batches(shape, classes)
    # a state the criterion must hand back untouched: mixed modes, a frozen parameter, an existing grad
    model.train()
    next(m for m in model.modules() if isinstance(m, nn.Conv2d)).eval()
    params = dict(model.named_parameters())
    first, second = list(params)[:2]
    params[first].requires_grad_(False)
    params[second].grad = torch.full_like(params[second], 0.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in params.items()}

    criterion = create_criterion(name)
    scores = criterion.scores(model, space, batches, device="cpu")

    assert len(scores) == len(space.groups)
    for group, score in zip(space.groups, scores, strict=True):
        assert isinstance(score, torch.Tensor)
        assert score.shape == (group.channels,)
        assert score.dtype.is_floating_point
        assert score.device.type == "cpu"
        assert not score.requires_grad
        assert torch.isfinite(score).all()
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "parameters or buffers changed"
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert (p.grad is None) if grads[n] is None else torch.equal(p.grad, grads[n]), n
    assert _no_hooks(model)
    again = criterion.scores(model, space, batches)
    assert all(torch.equal(a, b) for a, b in zip(scores, again, strict=True)), "not deterministic"


@pytest.mark.parametrize("name", criterion_names())
def test_data_need_is_declared_and_enforced(name: str) -> None:
    model, shape, _ = convbn()
    space = space_of(model, shape)
    criterion = create_criterion(name)
    assert criterion.name == name
    if criterion.needs_data:
        with pytest.raises(AutopruneError, match=f"criterion {name} needs calibration data"):
            criterion.scores(model, space, None)
    else:
        scores = criterion.scores(model, space)
        assert [s.shape[0] for s in scores] == [g.channels for g in space.groups]


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_max_batches_bounds_the_data_read(name: str) -> None:
    model, shape, classes = convbn()
    space = space_of(model, shape)
    pool = make_batches(shape, classes, n=10, size=4)
    served = []

    def stream():
        for batch in pool:
            served.append(1)
            yield batch

    create_criterion(name, max_batches=3).scores(model, space, stream())
    assert len(served) == 3


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_data_criteria_work_inside_no_grad(name: str) -> None:
    model, shape, classes = convbn()
    space = space_of(model, shape)
    batches = make_batches(shape, classes)
    expected = create_criterion(name).scores(model, space, batches)
    with torch.no_grad():
        got = create_criterion(name).scores(model, space, batches)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_batches_made_in_inference_mode_are_accepted(name: str) -> None:
    model, shape, classes = convbn()
    space = space_of(model, shape)
    batches = make_batches(shape, classes)
    with torch.inference_mode():
        frozen = [(images.clone(), labels.clone()) for images, labels in batches]
    assert frozen[0][0].is_inference()
    expected = create_criterion(name).scores(model, space, batches)
    got = create_criterion(name).scores(model, space, frozen)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


# ---- constructed cases -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["l1", "l2", "gradient", "taylor"])
def test_zeroed_filter_ranks_lowest_without_bn(name: str) -> None:
    model, shape, classes = lenet()
    with torch.no_grad():
        conv = model.net.features[0]
        conv.weight[2].zero_()
        conv.bias[2].zero_()
    space = space_of(model, shape)
    score = create_criterion(name).scores(model, space, make_batches(shape, classes))[0]
    assert score[2] == 0.0
    assert torch.all(torch.cat([score[:2], score[3:]]) > 0.0)


@pytest.mark.parametrize("name", ["l1", "l2", "gradient", "taylor"])
def test_zeroed_filter_and_bn_rank_lowest(name: str) -> None:
    model, shape, classes = convbn()
    with torch.no_grad():
        model.conv1.weight[1].zero_()
        model.bn1.weight[1] = 0.0
        model.bn1.bias[1] = 0.0
    space = space_of(model, shape)
    score = create_criterion(name).scores(model, space, make_batches(shape, classes))[0]
    assert score[1] == 0.0
    assert torch.all(torch.cat([score[:1], score[2:]]) > 0.0)


def test_magnitude_sums_the_filters_of_every_writer_of_a_residual_stream() -> None:
    model, shape, _ = resnet()
    space = space_of(model, shape)
    modules = dict(model.named_modules())
    writers = ["net.conv1", "net.layer1.0.conv2", "net.layer1.1.conv2", "net.layer1.2.conv2"]
    with torch.no_grad():
        l1 = sum(modules[w].weight.abs().sum(dim=(1, 2, 3)) for w in writers)
        l2 = sum(modules[w].weight.flatten(1).norm(dim=1) for w in writers)
    assert torch.allclose(create_criterion("l1").scores(model, space)[0], l1, rtol=1e-5)
    assert torch.allclose(create_criterion("l2").scores(model, space)[0], l2, rtol=1e-5)


def test_bn_scale_zero_gamma_ranks_lowest() -> None:
    model, shape, _ = convbn()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.linspace(0.5, 1.5, 6))
        model.bn1.weight[3] = 0.0
    score = create_criterion("bn_scale").scores(model, space_of(model, shape))[0]
    assert int(torch.argmin(score)) == 3
    assert score[3] == 0.0


def test_bn_scale_averages_the_norm_layers_of_a_group() -> None:
    model, shape, _ = resnet()
    space = space_of(model, shape)
    norms = ["net.bn1", "net.layer1.0.bn2", "net.layer1.1.bn2", "net.layer1.2.bn2"]
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in norms:
            modules[name].weight.fill_(1.0)
        modules["net.bn1"].weight[2] = -10.0
    score = create_criterion("bn_scale").scores(model, space)[0]
    assert torch.allclose(score, torch.tensor([1.0, 1.0, 13.0 / 4, 1.0]))


def test_bn_scale_without_batchnorm_names_the_group() -> None:
    model, shape, _ = lenet()
    with pytest.raises(AutopruneError, match=r"needs a BatchNorm.*'net\.features\.0'"):
        create_criterion("bn_scale").scores(model, space_of(model, shape))


@pytest.mark.parametrize(("name", "term"), [("gradient", lambda w, g: g.abs()),
                                            ("taylor", lambda w, g: (w * g) ** 2)])
def test_gradient_criteria_match_a_hand_computation(name: str, term: Callable) -> None:
    model, shape, classes = convbn()
    space = space_of(model, shape)
    batches = make_batches(shape, classes, n=3)
    reference = copy.deepcopy(model).eval()
    expected = torch.zeros(6)
    for images, labels in batches:
        reference.zero_grad()
        F.cross_entropy(reference(images), labels).backward()
        conv, bn = reference.conv1, reference.bn1
        expected += (term(conv.weight, conv.weight.grad).sum(dim=(1, 2, 3)) + term(bn.weight, bn.weight.grad)
                     + term(bn.bias, bn.bias.grad)).detach()
    got = create_criterion(name).scores(model, space, batches)[0]
    assert torch.allclose(got, expected / len(batches), rtol=1e-4, atol=1e-10)


# ---- otp ---------------------------------------------------------------------------------------


def _pool_net(channels: int, value: torch.Tensor) -> PoolNet:
    """Channel c reads mostly input channel c % 4 (positive weights), the classifier's class 1 adds every
    channel with weight ``value[c] > 0`` and all labels are 1: removing any channel raises the loss."""
    torch.manual_seed(3)
    net = PoolNet(4, channels)
    with torch.no_grad():
        weight = 0.05 * torch.rand(channels, 4)
        weight[torch.arange(channels), torch.arange(channels) % 4] += 1.0 + 0.2 * torch.rand(channels)
        net.conv.weight.copy_(weight.view(channels, 4, 1, 1))
        net.bn.weight.copy_(1.0 + 0.2 * torch.rand(channels))
        net.bn.bias.copy_(0.1 * torch.rand(channels))
        net.bn.running_mean.copy_(0.05 * torch.rand(channels))
        net.fc.weight.zero_()
        net.fc.weight[1] = value
        net.fc.bias.zero_()
    return net.eval()


def _pool_batches(n: int = 3, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.rand(size, 4, 1, 1, generator=gen) * torch.rand(size, 4, 6, 6, generator=gen),
             torch.ones(size, dtype=torch.long)) for _ in range(n)]


@pytest.mark.parametrize("mode", ["measured", "first_order"])
def test_otp_duplicate_channel_ranks_among_the_two_lowest(mode: str) -> None:
    net = _pool_net(6, 0.5 + torch.rand(6, generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():  # channel 5 becomes an exact copy of channel 2
        net.conv.weight[5] = net.conv.weight[2]
        for tensor in (net.bn.weight, net.bn.bias, net.bn.running_mean, net.bn.running_var):
            tensor[5] = tensor[2]
    space = PruningSpace(net, torch.rand(1, 4, 6, 6))
    score = OTPCriterion(mode=mode).scores(net, space, _pool_batches())[0]
    assert set(torch.argsort(score)[:2].tolist()) == {2, 5}
    assert torch.all(score > 0.0)


def test_otp_measured_ranks_the_most_harmful_removal_highest() -> None:
    value = torch.tensor([0.6, 0.9, 0.7, 5.0, 0.8, 0.5])
    net = _pool_net(6, value)
    space = PruningSpace(net, torch.rand(1, 4, 6, 6))
    score = OTPCriterion(mode="measured").scores(net, space, _pool_batches())[0]
    assert int(torch.argmax(score)) == 3


def test_otp_measured_sensitivity_is_the_masked_loss_increase() -> None:
    model, shape, classes = resnet()
    space = PruningSpace(model, torch.rand(1, *shape), min_ratio=0.0)
    data = make_batches(shape, classes, n=2, size=5)
    members = out_members(model, space)
    order, _ = otp_module._probe(model, members, data[0][0])
    last = [max(group, key=lambda item: order[item[0]]) for group in members]
    old_chunk = otp_module.CHUNK_SAMPLES
    otp_module.CHUNK_SAMPLES = 15  # three masked copies per pass, the last pass partly filled
    try:
        sensitivity, _ = otp_module._measured(model, space, members, last, data, "cpu")
    finally:
        otp_module.CHUNK_SAMPLES = old_chunk

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(model(x), y, reduction="sum")) for x, y in data) / 10

    base = mean_loss()
    for gi in (0, 1):  # a residual stream and a block-internal group
        group = space.groups[gi]
        for c in range(group.channels):
            keep = np.ones(len(space.groups))
            keep[gi] = (group.channels - 1) / group.channels
            scores = [torch.ones(g.channels) for g in space.groups]
            scores[gi][c] = 0.0
            with space.masked(model, keep, scores):
                assert float(sensitivity[gi][c]) == pytest.approx(mean_loss() - base, abs=1e-5)


def test_otp_first_order_matches_a_hand_computation() -> None:
    model, shape, classes = convbn()
    space = space_of(model, shape)
    batches = make_batches(shape, classes, n=3)
    reference = copy.deepcopy(model).eval()
    norms = [reference.bn1, reference.bn2]  # the final writer of each group (not the conv before it)
    outputs: dict[nn.Module, torch.Tensor] = {}

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        outputs[module] = output

    for bn in norms:
        bn.register_forward_hook(keep)
    sensitivity = [torch.zeros(bn.num_features) for bn in norms]
    activations: list[list[torch.Tensor]] = [[] for _ in norms]
    for images, labels in batches:
        F.cross_entropy(reference(images), labels).backward()
        for i, bn in enumerate(norms):
            a = outputs[bn]
            sensitivity[i] += (a * a.grad).sum(dim=(0, 2, 3)).abs().detach()
            activations[i].append(a.mean(dim=(2, 3)).detach())
    got = OTPCriterion(mode="first_order").scores(model, space, batches)
    for i, score in enumerate(got):
        sens = (sensitivity[i] / len(batches)).double()
        sens = sens / sens.max()
        corr = np.abs(np.corrcoef(torch.cat(activations[i]).double().numpy(), rowvar=False))
        np.fill_diagonal(corr, 0.0)
        expected = sens * (1.0 - torch.from_numpy(corr.max(axis=1))) + 1e-6 * sens
        assert torch.allclose(score.double(), expected, rtol=1e-4, atol=1e-7)


def test_otp_correlation_reads_the_last_writer_of_a_residual_stream() -> None:
    model, shape, classes = resnet()
    space = space_of(model, shape)
    batches = make_batches(shape, classes, n=3)
    reference = copy.deepcopy(model).eval()
    means: list[torch.Tensor] = []
    reference.net.layer1[2].bn2.register_forward_hook(lambda m, i, out: means.append(out.mean(dim=(2, 3))))
    with torch.no_grad():
        for images, _ in batches:
            reference(images)
    corr = np.abs(np.corrcoef(torch.cat(means).double().numpy(), rowvar=False))
    np.fill_diagonal(corr, 0.0)
    factors = OTPCriterion(mode="first_order").factors(model, space, batches)
    assert factors.mode == "first_order"
    assert np.allclose(factors.correlation[0].numpy(), corr.max(axis=1), atol=1e-6)


def test_otp_auto_mode_follows_the_channel_limit() -> None:
    model, shape, classes = convbn()
    space = space_of(model, shape)
    batches = make_batches(shape, classes)
    measured = OTPCriterion(mode="measured").scores(model, space, batches)
    estimated = OTPCriterion(mode="first_order").scores(model, space, batches)
    small = OTPCriterion().scores(model, space, batches)
    large = OTPCriterion(measured_limit=13).scores(model, space, batches)  # the net has 14 channels
    assert OTPCriterion().resolved_mode(space) == "measured"
    assert all(torch.equal(a, b) for a, b in zip(small, measured, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(large, estimated, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(measured, estimated, strict=True))


def test_max_abs_correlation() -> None:
    x = torch.randn(50, generator=torch.Generator().manual_seed(0))
    y = torch.randn(50, generator=torch.Generator().manual_seed(1))
    acts = torch.stack([x, 2 * x + 1, 3.0 + 1e-7 * y, -x, y], dim=1).double()  # column 2: constant to
    # float32 precision
    corr = max_abs_correlation(acts)
    assert corr[:2].tolist() == pytest.approx([1.0, 1.0])
    assert corr[3] == pytest.approx(1.0)
    assert corr[2] == 0.0
    assert float(corr[4]) == pytest.approx(abs(float(np.corrcoef(x.numpy(), y.numpy())[0, 1])), abs=1e-6)
    assert max_abs_correlation(acts[:1]).tolist() == [0.0] * 5


# ---- registry and errors -----------------------------------------------------------------------


def test_registry_lists_the_criteria() -> None:
    assert {"l1", "l2", "bn_scale", "gradient", "taylor", "otp"} <= set(criterion_names())
    assert criterion_names() == sorted(criterion_names())
    criterion = create_criterion("otp", mode="first_order")
    assert create_criterion(criterion) is criterion
    assert criterion.options == {"mode": "first_order", "max_batches": 8, "measured_limit": 1024, "normalize": "group"}
    with pytest.raises(ValueError, match="criterion .l1. is registered twice"):
        register_criterion("l1")(type("Again", (Criterion,), {"scores": lambda self, *a, **k: []}))


def test_unknown_criterion_lists_the_valid_ones() -> None:
    with pytest.raises(AutopruneError, match=r"unknown criterion 'nope'.*bn_scale.*otp"):
        create_criterion("nope")


@pytest.mark.parametrize(("name", "options", "match"), [
    ("gradient", {"max_batches": 0}, "max_batches"),
    ("taylor", {"max_batches": 2.5}, "max_batches"),
    ("otp", {"mode": "exact"}, "mode must be one of auto, measured, first_order"),
    ("otp", {"measured_limit": -1}, "measured_limit"),
    ("l1", {"max_batches": 4}, "unknown option 'max_batches' for criterion 'l1'; valid options: none"),
])
def test_bad_options_are_rejected(name: str, options: dict, match: str) -> None:
    with pytest.raises(AutopruneError, match=match):
        create_criterion(name, **options)


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_bad_calibration_data_is_rejected(name: str) -> None:
    model, shape, _ = convbn()
    space = space_of(model, shape)
    with pytest.raises(AutopruneError, match="no calibration batches"):
        create_criterion(name).scores(model, space, [])
    bad = [(torch.rand(4, *shape), torch.zeros(4, 1, dtype=torch.long))]
    with pytest.raises(AutopruneError, match="expected"):
        create_criterion(name).scores(model, space, bad)


def test_non_finite_scores_are_an_error() -> None:
    model, shape, _ = convbn()
    space = space_of(model, shape)
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(AutopruneError, match=r"non-finite scores for group 'conv2'"):
        create_criterion("l1").scores(model, space)


def test_a_model_that_does_not_match_the_space_is_rejected() -> None:
    model, shape, _ = convbn()
    other, other_shape, _ = lenet()
    with pytest.raises(AutopruneError, match="has no module"):
        create_criterion("l1").scores(model, space_of(other, other_shape))
