"""Users' models at the edges of what can be pruned, and what the returned model keeps of the caller's.

Each model here once went wrong: channels the forward returns were pruned (an output changed shape), tied
weights were untied, split channels or a raw functional weight were cut along the wrong dimension, an
attention layer's width broke, a PReLU's slopes were not counted; and the returned model lost the caller's
frozen parameters, memory format or loader state.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.engine.evaluate import recalibrate_bn
from autoprune.engine.space import PruningSpace, counted_cost
from autoprune.errors import AutopruneError


def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())


class ReturnsFeatures(nn.Module):
    """(logits, embedding): the embedding's channels are an output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.head = block(3, 16), block(16, 32, 2), nn.Linear(32, 4)

    def forward(self, x):
        f = self.c2(self.c1(x)).mean((2, 3))
        return self.head(f), f


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.a, self.b = block(3, 16), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.b.weight = self.a.weight
        self.c3, self.head = block(16, 24), nn.Linear(24, 4)

    def forward(self, x):
        x = self.c1(x)
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.head(self.c3(x).mean((2, 3)))


class CSP(nn.Module):
    """A CSP block: torch.chunk splits the stem's channels into two paths."""

    def __init__(self):
        super().__init__()
        self.stem, self.p, self.fuse = block(3, 32), block(16, 16), block(32, 32)
        self.c4, self.head = block(32, 32, 2), nn.Linear(32, 4)

    def forward(self, x):
        a, b = self.stem(x).chunk(2, dim=1)
        x = self.fuse(torch.cat([a, self.p(b)], 1))
        return self.head(self.c4(x).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = block(3, 16), block(16, 32, 2)
        self.attn, self.head = nn.MultiheadAttention(32, 4, batch_first=True), nn.Linear(32, 4)

    def forward(self, x):
        t = self.c2(self.c1(x)).flatten(2).transpose(1, 2)
        return self.head(self.attn(t, t, t)[0].mean(1))


class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.PReLU(16))
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.PReLU(32), nn.MaxPool2d(2))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.c2(self.c1(x)).mean((2, 3)))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(block(3, 16), block(16, 32, 2), block(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def random_keep(space: PruningSpace, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return space.snap(rng.uniform(space.lower, 1.0))


def scores(space: PruningSpace) -> list[torch.Tensor]:
    return [torch.rand(g.channels, generator=torch.Generator().manual_seed(g.index)) for g in space.groups]


X = torch.randn(1, 3, 16, 16)


def test_channels_the_forward_returns_keep_their_shape():
    model = ReturnsFeatures().eval()
    space = PruningSpace(model, X)
    assert [g.root for g in space.groups] == ["c1.0"]
    assert "returns" in space.kept_whole["c2.0"]
    pruned = space.apply(model, space.lower, scores(space))
    assert [tuple(t.shape) for t in pruned(X)] == [(1, 4), (1, 32)]


def test_tied_weights_stay_tied_and_whole():
    model = Tied().eval()
    space = PruningSpace(model, X)
    touched = {m.module for g in space.groups for m in g.members}
    assert not touched & {"a", "b"}
    assert "shares its weight" in space.kept_whole["a"]
    pruned = space.apply(model, space.lower, scores(space))
    assert pruned.a.weight is pruned.b.weight
    assert sum(p.numel() for p in pruned.parameters()) <= sum(p.numel() for p in model.parameters())


def test_split_channels_are_kept_whole_and_the_rest_prunes():
    model = CSP().eval()
    space = PruningSpace(model, X)
    assert "split" in space.kept_whole["p.0"]
    assert "stem.0" not in {g.root for g in space.groups}
    keep = random_keep(space)
    pruned = space.apply(model, keep, scores(space))
    assert pruned(X).shape == (1, 4)
    assert counted_cost(pruned, X) == space.cost(keep)


class Crop(nn.Module):
    """A UNet-style skip: spatial crops (x[:, :, 1:-1, 1:-1]) pass every channel through, and cut none."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()), block(16, 16)
        self.c, self.head = nn.Sequential(nn.Conv2d(32, 24, 3), nn.BatchNorm2d(24), nn.ReLU()), nn.Linear(24, 4)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return self.head(self.c(torch.cat([a[:, :, 1:-1, 1:-1], b[:, :, 1:-1, 1:-1]], 1)).mean((2, 3)))


class Ghost(nn.Module):
    """A Ghost block: x[:, :12] slices channels apart."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3, self.head = block(3, 16), block(12, 4), block(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        y = self.c1(x)[:, :12]
        return self.head(self.c3(torch.cat([y, self.c2(y)], 1)).mean((2, 3)))


def test_a_spatial_crop_prunes_and_a_channel_slice_is_kept_whole():
    x = torch.randn(1, 3, 20, 20)
    crop = Crop().eval()
    space = PruningSpace(crop, x)
    assert [g.root for g in space.groups] == ["a.0", "b.0", "c.0"] and not space.kept_whole
    keep = random_keep(space)
    assert counted_cost(space.apply(crop, keep, scores(space)), x) == space.cost(keep)
    ghost = Ghost().eval()
    space = PruningSpace(ghost, x)
    assert any("sliced apart" in why for why in space.kept_whole.values())
    assert [g.root for g in space.groups] == ["c3.0"]
    keep = random_keep(space)
    assert space.apply(ghost, keep, scores(space))(x).shape == (1, 4)


def test_channels_reaching_attention_are_kept_whole():
    model = Attention().eval()
    space = PruningSpace(model, X)
    assert "attention or recurrent" in space.kept_whole["c2.0"]
    keep = random_keep(space)
    pruned = space.apply(model, keep, scores(space))
    assert counted_cost(pruned, X) == space.cost(keep)  # the attention's MACs are counted, and constant


def test_prelu_slopes_and_elementwise_modules_are_counted_like_torch_pruning():
    model = PReLUNet().eval()
    space = PruningSpace(model, X)
    for seed in range(3):
        keep = random_keep(space, seed)
        pruned = space.apply(model, keep, scores(space))
        assert counted_cost(pruned, X) == space.cost(keep)
    total, params = tp.utils.count_ops_and_params(model, X)
    assert (space.base_macs, space.base_params) == (total, params)  # the counter's total, not conv + linear


def test_a_model_returning_an_object_gets_one_line():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    class Wrapped(Plain):
        def forward(self, x):
            return Out(super().forward(x))

    with pytest.raises(AutopruneError, match="returns a Out; .* wrap the model") as err:
        PruningSpace(Wrapped().eval(), X)
    assert "\n" not in str(err.value)


def test_an_unreachable_target_names_the_layers_kept_whole():
    x = torch.randn(64, 3, 16, 16)
    y = torch.randint(0, 4, (64,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    with pytest.raises(AutopruneError, match=r"unreachable.*kept whole as they are: p\.0: its channels are split"):
        autoprune.prune(CSP(), X, method="l1", macs_reduction=0.9, train_loader=loader, val_loader=loader,
                        finetune=None)


def test_a_parametrized_layer_is_refused_in_one_line():
    model = Plain()
    nn.utils.parametrizations.weight_norm(model.features[1][0])
    loader = [(torch.randn(8, 3, 16, 16), torch.arange(8) % 4)]
    with pytest.raises(AutopruneError, match="'features.1.0' has a parametrization .*remove_parametrizations"):
        autoprune.prune(model, X, method="l1", macs_reduction=0.3, train_loader=loader, val_loader=loader,
                        finetune=None)


def test_calibration_leaves_out_a_single_sample_batch():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    batches = [torch.randn(32, 8), torch.randn(1, 8)]
    recalibrate_bn(model, batches)  # a BatchNorm1d in training mode cannot take the one-sample batch
    expected = model[0](batches[0]).detach()
    assert torch.allclose(model[1].running_mean, expected.mean(0), atol=1e-5)


# ---- what the returned model keeps of the caller's --------------------------------------------------

@pytest.fixture(scope="module")
def task():
    """A tiny learnable task: the class is the brightest of 4 quadrants."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 16, 16, generator=g) * 0.3
    y = torch.randint(0, 4, (256,), generator=g)
    for i, c in enumerate(y.tolist()):
        r, s = divmod(c, 2)
        x[i, :, 8 * r:8 * r + 8, 8 * s:8 * s + 8] += 1.0
    return x, y


def trained(task) -> nn.Module:
    torch.manual_seed(0)
    model = Plain()
    x, y = task
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for i in range(0, 256, 32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            opt.step()
    return model


def call(model, task, **kwargs):
    x, y = task
    train = kwargs.pop("train", DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True))
    val = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=64)
    return autoprune.prune(model, X, train_loader=train, val_loader=val,
                           **{"method": "l1", "macs_reduction": 0.4, "finetune": autoprune.TrainConfig(epochs=1),
                              "latency_repeats": 1, **kwargs})


def test_frozen_parameters_stay_frozen_and_untrained(task):
    model = trained(task)
    model.features[0].requires_grad_(False)
    result = call(model, task)
    frozen = {n for n, p in result.model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, p in model.named_parameters() if not p.requires_grad}
    kept = result.model.features[0][0].weight.shape[0]
    # l1 keeps the strongest filters of the (unpruned-input) first layer: the fine-tuning left them as they were
    norms = model.features[0][0].weight.detach().abs().sum((1, 2, 3))
    top = torch.sort(torch.topk(norms, kept).indices).values
    assert torch.equal(result.model.features[0][0].weight, model.features[0][0].weight[top])
    assert all(p.grad is None for p in result.model.parameters())  # no gradients held after fine-tuning
    assert not result.model.training


def test_a_data_parallel_model_prunes_through_its_module_and_comes_back_unwrapped(task, tmp_path):
    model = trained(task)
    wrapped = nn.DataParallel(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = call(wrapped, task, finetune=None, ignored_layers=["module.features.0.0"])
    assert type(result.model) is Plain  # the network, not the wrapper: it saves and exports as it is
    assert result.model.features[0][0].out_channels == 16  # the wrapper's name for the layer reached it
    assert result.model.features[1][0].out_channels < 32
    same = call(model, task, finetune=None, ignored_layers=["features.0.0"])
    assert [w.after for w in same.widths] == [w.after for w in result.widths]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's untouched
    autoprune.save(tmp_path / "p.pt", nn.DataParallel(result.model))
    loaded = autoprune.load(tmp_path / "p.pt", model=Plain())  # saved without the wrapper's module. prefix
    assert loaded.features[1][0].out_channels == result.model.features[1][0].out_channels
    report = autoprune.export_onnx(nn.DataParallel(result.model), X[:1], tmp_path / "p.onnx")
    assert (tmp_path / "p.onnx").is_file() and report.max_abs_diff < 1e-4


def test_memory_format_and_grad_mode(task):
    model = trained(task).to(memory_format=torch.channels_last)
    with torch.no_grad():
        result = call(model, task)
    weight = result.model.features[1][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    with torch.inference_mode():
        again = call(model, task, finetune=None)
    assert again.model(X).shape == (1, 4)


def test_a_loaders_own_generator_is_reseeded_and_restored(task):
    model = trained(task)
    x, y = task

    def loader(generator):
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True, generator=generator)

    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    first = call(model, task, train=loader(g))
    assert torch.equal(g.get_state(), state)  # the caller's next shuffle is the one it would have been
    second = call(model, task, train=loader(torch.Generator().manual_seed(999)))
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same seed= gives the same model, whatever the generator's state


def test_slim_takes_any_batchnorm():
    model = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                          nn.Conv3d(8, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 2))
    x = torch.randn(16, 1, 4, 8, 8)
    y = torch.arange(16) % 2
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    result = autoprune.prune(copy.deepcopy(model), x[:1], method="slim", macs_reduction=0.3, train_loader=loader,
                             val_loader=loader, finetune=None, method_options={"epochs": 1}, latency_repeats=1)
    assert result.pruned.macs <= 0.7 * result.base.macs


def test_slim_names_every_layer_without_batchnorm_and_prunes_the_rest_once_they_are_ignored():
    model = nn.Sequential(block(3, 16), block(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4))
    x, y = torch.randn(16, 3, 16, 16), torch.arange(16) % 4
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    kwargs = dict(method="slim", macs_reduction=0.3, train_loader=loader, val_loader=loader, finetune=None,
                  method_options={"epochs": 1}, latency_repeats=1)
    with pytest.raises(AutopruneError, match=r"\['4', '6'\] have none: keep them whole with "
                                             r"ignored_layers=\['4', '6'\]"):
        autoprune.prune(copy.deepcopy(model), x[:1], **kwargs)
    result = autoprune.prune(copy.deepcopy(model), x[:1], ignored_layers=["4", "6"], **kwargs)
    assert result.pruned.macs <= 0.7 * result.base.macs
    assert (result.model[4].out_features, result.model[6].out_features) == (24, 24)


# ---- arguments as users pass them ------------------------------------------------------------------------

def test_numpy_scalars_are_numbers_and_strings_are_not(task):
    model = trained(task)
    result = call(model, task, macs_reduction=np.float32(0.4), budget=np.int64(2), min_ratio=np.float64(0.1),
                  finetune=None)
    assert result.target.macs_reduction == pytest.approx(0.4) and result.config.budget == 2
    for name, value in (("macs_reduction", "0.5"), ("min_ratio", "0.1")):
        with pytest.raises(AutopruneError, match=f"{name}='{value}': must be a number"):
            call(model, task, **{name: value, "finetune": None})


def test_meta_device_torchscript_and_compiled_models_get_one_line(task):
    model = trained(task)
    with pytest.raises(AutopruneError, match="device 'meta' holds no values"):
        call(model, task, device="meta")
    with pytest.raises(AutopruneError, match="TorchScript .* pass the nn.Module it was made from"):
        call(torch.jit.script(model), task)
    with pytest.raises(AutopruneError, match=r"the model is compiled with torch.compile.*\._orig_mod"):
        call(torch.compile(model), task)
    partly = copy.deepcopy(model)
    partly.features = torch.compile(partly.features)
    with pytest.raises(AutopruneError, match="layer 'features' is compiled with torch.compile"):
        call(partly, task)


# ---- the analytic MACs follow Torch-Pruning's counter on layouts and types it treats its own way -------------

class TokenMLP(nn.Module):
    """Linear + GELU on (N, T, C) tokens: channels are the last dimension; x[:, 1:] drops the class token."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2, self.head = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, t):
        return self.head(self.fc2(self.act(self.fc1(t)))[:, 1:].mean(1))


class WSConv2d(nn.Conv2d):
    """A weight-standardised convolution (BiT / NFNet): Torch-Pruning's counter skips subclasses."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class MyBN(nn.BatchNorm2d):
    pass


class Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = WSConv2d(3, 16, 3, padding=1), MyBN(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.pool, self.head = nn.MaxPool2d(2, return_indices=True), nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))
        return self.head(self.pool(x)[0].mean((2, 3)))


@pytest.mark.parametrize("cls, example", [(TokenMLP, torch.randn(1, 9, 16)), (Subclassed, X)])
def test_analytic_macs_equal_the_counter_on_tokens_subclasses_and_pools_with_indices(cls, example):
    model = cls().eval()
    space = PruningSpace(model, example)
    assert space.base_macs == tp.utils.count_ops_and_params(model, example)[0]
    assert not space.kept_whole  # a class-token slice cuts no channels
    for seed in range(3):
        keep = random_keep(space, seed)
        assert counted_cost(space.apply(model, keep, scores(space)), example) == space.cost(keep)
    assert space.relative_macs(space.lower) > 0


class SharedHead(nn.Module):
    """One head applied to two scales (as RetinaNet's and FCOS's heads are): its layers run twice a pass."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = block(3, 16), block(16, 16, 2)
        self.head = nn.Sequential(block(16, 24), nn.Conv2d(24, 4, 1))

    def forward(self, x):
        a = self.c1(x)
        return self.head(a).mean((2, 3)) + self.head(self.c2(a)).mean((2, 3))


def test_a_head_shared_across_scales_prunes_and_counts_every_call():
    model = SharedHead().eval()
    space = PruningSpace(model, X)
    assert space.base_macs == tp.utils.count_ops_and_params(model, X)[0]
    assert "head.0.0" in [g.root for g in space.groups]
    for seed in range(3):
        keep = random_keep(space, seed)
        pruned = space.apply(model, keep, scores(space))
        assert counted_cost(pruned, X) == space.cost(keep)
        assert pruned(X).shape == (1, 4)
    smallest = space.apply(model, space.lower, scores(space))
    assert smallest.head[0][0].out_channels < 24 and smallest(X).shape == (1, 4)


class FrozenBatchNorm2d(nn.Module):
    """As in torchvision.ops.misc (detection backbones): the statistics and the affine are buffers."""

    def __init__(self, n):
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x):
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


class FrozenBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16)
        self.c2, self.head = block(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.c2(torch.relu(self.b1(self.c1(x)))).mean((2, 3)))


def test_channels_through_per_channel_buffers_are_kept_whole_and_the_rest_prunes():
    model = FrozenBN().eval()
    space = PruningSpace(model, X)
    assert [g.root for g in space.groups] == ["c2.0"]
    assert "b1 (FrozenBatchNorm2d) holds buffers" in space.kept_whole["c1"]
    pruned = space.apply(model, space.lower, scores(space))
    assert pruned.b1.weight.shape == (16,) and pruned.c2[0].out_channels < 32
    assert counted_cost(pruned, X) == space.cost(space.lower)


def test_a_pixel_shuffle_keeps_its_channels_whole():
    model = nn.Sequential(block(3, 16), nn.Conv2d(16, 16, 3, padding=1), nn.PixelShuffle(2), block(4, 8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    space = PruningSpace(model, X)
    assert any("PixelShuffle" in why for why in space.kept_whole.values())
    keep = random_keep(space)
    assert counted_cost(space.apply(model, keep, scores(space)), X) == space.cost(keep)
