"""Contract tests of the public Python API: ``autoprune.prune`` / ``PruneResult`` / ``autoprune.load`` /
``autoprune.export_onnx`` on user-defined ``nn.Module``s fed by plain ``DataLoader``s.

Every registered method runs on seven small architectures (a Sequential CNN, a residual net, a depthwise-
separable net, a two-branch ``torch.cat`` net, a two-input model, a model fed standardised data and one with
GroupNorm and grouped convolutions), each
trained briefly here by a plain user loop on a learnable toy task. Then the behaviours of the call's
arguments (fine-tuning, score_fn, targets, method objects and options, errors, ignored layers, round_to,
callbacks, run directories, resume, determinism, the caller's RNG state) and a standalone user script.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from conftest import ModernNet
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

import autoprune
from autoprune.engine.prune import SearchInterrupted
from autoprune.errors import AutopruneError

REDUCTION = 0.5
CLASSES = 3
SIZE = 16
ROOT = Path(__file__).resolve().parents[1]
# latency is measured for the report; two timed runs at batch 4 keep that cheap here
FAST = {"latency_repeats": 2, "latency_batch": 4}
# per method: options that keep the run quick where the defaults are expensive
QUICK_OPTIONS = {"sa": {"networks": 2, "epochs": 1}, "pso": {"particles": 3, "iterations": 2},
                 "ssa": {"population": 3, "iterations": 1}, "otp": {"max_batches": 1},
                 "gdp": {"max_batches": 2}, "slim": {"epochs": 1}}
BUDGET = 6
# one epoch at the rate of prune()'s default fine-tuning (TrainConfig's own 0.05 can wreck a net without BatchNorm)
FINETUNE = autoprune.TrainConfig(epochs=1, lr=0.01)


# ---- the architectures (tiny widths) ------------------------------------------------------------------

def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


def sequential_cnn() -> nn.Sequential:
    """(a) a plain nn.Sequential."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))


class ResidualNet(nn.Module):
    """(b) residual blocks: the additions couple the stem's, the block's and the shortcut's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a1, self.a2 = conv_bn(8, 8), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.b1 = conv_bn(8, 16, stride=2)
        self.b2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.a2(self.a1(x)))
        x = F.relu(self.shortcut(x) + self.b2(self.b1(x)))
        return self.fc(x.mean((2, 3)))


class SeparableNet(nn.Module):
    """(c) depthwise-separable convolutions (a depthwise conv's channels are its input's)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.dw1, self.pw1 = conv_bn(8, 8, groups=8), conv_bn(8, 16, kernel=1)
        self.dw2, self.pw2 = conv_bn(16, 16, stride=2, groups=16), conv_bn(16, 16, kernel=1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw2(self.dw2(self.pw1(self.dw1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    """(d) two branches concatenated along the channels (no BatchNorm: slim refuses it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        x = F.relu(self.mix(x))
        return self.fc(x.mean((2, 3)))


class TwoInputNet(nn.Module):
    """(e) ``forward(image, extra)``: an image path and a vector path joined before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 8), conv_bn(8, 16, stride=2))
        self.extra = nn.Linear(4, 8)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, image: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        pooled = self.features(image).mean((2, 3))
        return self.fc(torch.cat([pooled, F.relu(self.extra(extra))], dim=1))


class StandardisedNet(nn.Module):
    """(f) expects standardised inputs; the normalisation is done outside, in the loaders' tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), nn.MaxPool2d(2), conv_bn(8, 16))
        self.hidden = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.body(x).mean((2, 3))))


class BlockedNet(nn.Module):
    """(g) GroupNorm and grouped (not depthwise) convolutions: kept counts must be whole blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2, self.b2 = nn.Conv2d(16, 24, 3, padding=1, groups=4), nn.BatchNorm2d(24)
        self.c3, self.n3 = nn.Conv2d(24, 24, 1, groups=2), nn.GroupNorm(6, 24)
        self.fc = nn.Linear(24, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(self.n1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(F.relu(self.n3(self.c3(x))).mean((2, 3)))


class PairDataset(Dataset):
    """Samples ``((image, extra), target)``: the default collate gives ``[[images, extras], targets]``."""

    def __init__(self, images: torch.Tensor, extras: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.extras, self.targets = images, extras, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return (self.images[i], self.extras[i]), self.targets[i]


# ---- data: a learnable toy task ---------------------------------------------------------------------

def toy_images(n: int, seed: int, *, scale: float = 1.0, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose label is the channel with the largest mean (one channel is raised per sample)."""
    g = torch.Generator().manual_seed(seed)
    raised = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) + 0.6 * F.one_hot(raised, 3).float()[:, :, None, None]
    y = x.mean((2, 3)).argmax(1)
    return offset + scale * x, y


class Case:
    """One architecture: how to build it, its loaders and its example inputs."""

    def __init__(self, name: str, build, slim_ok: bool, train_ds: Dataset, val_ds: Dataset, example) -> None:
        self.name, self.build, self.slim_ok = name, build, slim_ok
        self.train_ds, self.val_ds, self.example = train_ds, val_ds, example
        self.state: dict[str, torch.Tensor] = {}
        # GroupNorm nets come out of 50% pruning further down (its groups' statistics change): 4 epochs, not 1
        self.finetune = autoprune.TrainConfig(epochs=4, lr=0.01) if name == "blocked" else FINETUNE

    def loaders(self) -> tuple[DataLoader, DataLoader]:
        return (DataLoader(self.train_ds, batch_size=32, shuffle=True),
                DataLoader(self.val_ds, batch_size=64))

    def trained(self) -> nn.Module:
        """A fresh instance with the trained weights (each test gets its own)."""
        model = self.build()
        model.load_state_dict(self.state)
        return model

    def batch(self, n: int):
        """``n`` validation inputs, shaped as the model takes them."""
        inputs, _ = next(iter(DataLoader(self.val_ds, batch_size=n)))
        return tuple(inputs) if isinstance(inputs, list) else inputs


def make_case(name: str) -> Case:
    n_train, n_val = 192, 96
    if name == "two_input":
        images, y = toy_images(n_train + n_val, 5)
        g = torch.Generator().manual_seed(6)
        extras = torch.randn(n_train + n_val, 4, generator=g) + 0.5 * F.one_hot(y, 4).float()
        train = PairDataset(images[:n_train], extras[:n_train], y[:n_train])
        val = PairDataset(images[n_train:], extras[n_train:], y[n_train:])
        return Case(name, TwoInputNet, False, train, val, (images[:2], extras[:2]))
    if name == "standardised":
        raw, y = toy_images(n_train + n_val, 7, scale=40.0, offset=120.0)  # pixel-like values around 120
        mean, std = raw[:n_train].mean((0, 2, 3), keepdim=True), raw[:n_train].std((0, 2, 3), keepdim=True)
        x = (raw - mean) / std  # the normalisation is the caller's, outside the model
        return Case(name, StandardisedNet, True, TensorDataset(x[:n_train], y[:n_train]),
                    TensorDataset(x[n_train:], y[n_train:]), x[:2])
    build, slim_ok = {"sequential": (sequential_cnn, True), "residual": (ResidualNet, True),
                      "separable": (SeparableNet, True), "concat": (ConcatNet, False),
                      "blocked": (BlockedNet, False), "modern": (lambda: ModernNet(3, CLASSES), False)}[name]
    seeds = {"sequential": 1, "residual": 2, "separable": 3, "concat": 4, "blocked": 8, "modern": 9}
    x, y = toy_images(n_train + n_val, seeds[name])
    return Case(name, build, slim_ok, TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:]),
                x[:2])


def user_training(model: nn.Module, loader: DataLoader, epochs: int) -> None:
    """The caller's own training loop (not autoprune's)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(epochs):
        for inputs, targets in loader:
            args = inputs if isinstance(inputs, list) else [inputs]
            loss = F.cross_entropy(model(*args), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = total = 0
    with torch.no_grad():
        for inputs, targets in loader:
            args = inputs if isinstance(inputs, list) else [inputs]
            hits += int((model(*args).argmax(1) == targets).sum())
            total += len(targets)
    return hits / total


ARCHS = ["sequential", "residual", "separable", "concat", "two_input", "standardised", "blocked", "modern"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread is as fast, and much faster on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cases() -> dict[str, Case]:
    out = {}
    for name in ARCHS:
        case = make_case(name)
        torch.manual_seed(0)
        model = case.build()
        train, val = case.loaders()
        user_training(model, train, epochs=6)
        assert accuracy(model, val) > 0.8, f"{name} did not learn the toy task"
        case.state = {k: v.clone() for k, v in model.state_dict().items()}
        out[name] = case
    return out


# ---- helpers ------------------------------------------------------------------------------------------

def outputs(model: nn.Module, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def counter_macs(model: nn.Module, example) -> int:
    """Torch-Pruning's own counter, its total (convolution and linear layers, and the BatchNorm, activation and
    pooling modules it counts): what autoprune's targets and ``ModelStats.macs`` mean. The counter counts the
    whole batch it is given (autoprune reports MACs per sample, counted on one sample)."""
    inputs = example if isinstance(example, tuple) else (example,)
    macs, _ = tp.utils.count_ops_and_params(model.eval(), inputs)
    return int(macs)


def first_sample(example):
    return tuple(t[:1] for t in example) if isinstance(example, tuple) else example[:1]


def snapshot(model: nn.Module) -> dict:
    return {"state": {k: v.clone() for k, v in model.state_dict().items()},
            "training": [(n, m.training) for n, m in model.named_modules()],
            "grad": [(n, p.requires_grad) for n, p in model.named_parameters()],
            "device": {p.device for p in model.parameters()}}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():  # bit-identical, shapes included
        assert after["state"][k].shape == v.shape and torch.equal(after["state"][k], v), k
    assert after["training"] == before["training"]
    assert after["grad"] == before["grad"]
    assert after["device"] == before["device"]


def prune(case: Case, model: nn.Module | None = None, **kwargs) -> autoprune.PruneResult:
    train, val = case.loaders()
    settings = {"method": "l1", "macs_reduction": REDUCTION, "train_loader": train, "val_loader": val,
                "finetune": case.finetune, "budget": BUDGET, **FAST, **kwargs}
    return autoprune.prune(case.trained() if model is None else model, case.example, **settings)


def history_rows(result: autoprune.PruneResult) -> list[dict]:
    return [{k: v for k, v in row.to_json().items() if k != "seconds"} for row in result.history]


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert text and "\n" not in text, text
    return text


# ---- 1. every method on every architecture ---------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", autoprune.methods.METHODS.names())
def test_every_method_on_every_architecture(cases, arch, method, tmp_path):
    case = cases[arch]
    model = case.trained()
    # the caller's model in a mixed state that the call must leave as it is
    model.train()
    first_child = next(iter(model.children()))
    first_child.eval()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)
    before = snapshot(model)
    base_macs = counter_macs(copy.deepcopy(model), case.example)
    base_sample_macs = counter_macs(copy.deepcopy(model), first_sample(case.example))

    kwargs = {"method": method, "method_options": QUICK_OPTIONS.get(method)}
    if method == "slim" and not case.slim_ok:
        with pytest.raises(AutopruneError, match="needs a BatchNorm after every prunable layer") as err:
            prune(case, model, **kwargs)
        one_line(err)
        assert_unchanged(model, before)
        return
    result = prune(case, model, **kwargs)

    # (i) the target, on Torch-Pruning's counter; the result reports the same numbers
    pruned_macs = counter_macs(result.model, case.example)
    assert pruned_macs <= (1 - REDUCTION) * base_macs
    assert (result.base.macs, result.pruned.macs) == (base_sample_macs,
                                                      counter_macs(result.model, first_sample(case.example)))
    assert result.analytic_cost_matches
    # (ii) the caller's model is untouched
    assert_unchanged(model, before)
    assert result.model is not model
    # (iii) another batch size
    batch = case.batch(5)
    out = outputs(result.model, batch)
    assert out.shape == (5, CLASSES) and torch.isfinite(out).all()
    # (iv) save, then load into a fresh instance of the class
    result.save(tmp_path / "p.pt")
    loaded = autoprune.load(tmp_path / "p.pt", model=case.build())
    assert torch.equal(outputs(loaded, batch), out)
    # (v) ONNX, checked in onnxruntime at two batch sizes
    report = autoprune.export_onnx(result.model, case.example, tmp_path / "p.onnx", verify=True)
    assert report.verified and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert report.path.exists()
    # (vi) the reported widths are the modules' channel counts
    assert result.widths
    modules = dict(result.model.named_modules())
    originals = dict(model.named_modules())
    for w in result.widths:
        assert channels_out(modules[w.name]) == w.after
        assert channels_out(originals[w.name]) == w.before
        assert 1 <= w.after <= w.before
    assert sum(w.before - w.after for w in result.widths) > 0
    # (vii) the history: every row has the space's dimension
    dim = len(result.widths)
    assert len(result.keep) == dim
    assert result.history and len(result.history) <= BUDGET
    assert all(len(row.keep) == len(row.counts) == dim for row in result.history)
    json.dumps(result.to_json())  # the JSON form is plain data


def channels_out(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


# ---- 2. behaviours of the call's arguments ------------------------------------------------------------

def l1_kept(weight: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (ascending) of the ``count`` filters with the largest L1 norms."""
    norms = weight.detach().flatten(1).abs().sum(1)
    return norms.argsort(descending=True)[:count].sort().values


def test_finetune_none_returns_the_method_weights_not_finetuned(cases):
    case = cases["sequential"]
    base = case.trained().eval()
    result = prune(case, base, finetune=None)
    assert result.finetune.epochs == 0 and not result.finetune.custom
    pruned = result.model
    convs = [0, 3, 6]
    kept = [l1_kept(base[i].weight, pruned[i].out_channels) for i in convs]
    assert [len(k) for k in kept] == [w.after for w in result.widths]
    assert any(len(k) < base[i].out_channels for k, i in zip(kept, convs, strict=True))
    previous = torch.arange(3)
    for i, k in zip(convs, kept, strict=True):  # l1's weights are the base's, sliced: nothing was trained
        assert torch.equal(pruned[i].weight, base[i].weight[k][:, previous])
        assert torch.equal(pruned[i].bias, base[i].bias[k])
        assert torch.equal(pruned[i + 1].weight, base[i + 1].weight[k])  # BatchNorm's affine parameters
        assert torch.equal(pruned[i + 1].bias, base[i + 1].bias[k])
        previous = k
    assert torch.equal(pruned[-1].weight, base[-1].weight[:, previous])
    assert torch.equal(pruned[-1].bias, base[-1].bias)


def test_finetune_callable_is_called_once_with_the_pruned_model(cases):
    case = cases["sequential"]
    train, _ = case.loaders()
    calls: list[tuple[nn.Module, dict]] = []

    def my_finetune(model: nn.Module) -> None:
        user_training(model, train, epochs=1)
        calls.append((model, {k: v.clone() for k, v in model.state_dict().items()}))

    result = prune(case, finetune=my_finetune)
    assert len(calls) == 1
    model, state = calls[0]
    assert model is result.model  # the pruned structure, fine-tuned in place and returned as it was left
    assert [model[i].out_channels for i in (0, 3, 6)] == [w.after for w in result.widths]
    assert all(torch.equal(v, state[k]) for k, v in result.model.state_dict().items())
    assert result.finetune.custom and result.finetune.epochs == 0


def test_score_fn_replaces_accuracy_and_needs_no_val_loader(cases):
    case = cases["residual"]
    probe = case.batch(8)
    calls = 0

    def score(model: nn.Module) -> float:
        nonlocal calls
        calls += 1
        return -float(outputs(model, probe).norm())

    base = case.trained()
    expected_base = score(copy.deepcopy(base))
    calls = 0
    result = prune(case, base, method="random", score_fn=score, val_loader=None)
    assert result.metric == "score"
    distinct = {row.counts for row in result.history}
    assert calls >= len(distinct) + 2  # the base, every distinct candidate, the final measurement
    assert all(row.accuracy < 0 for row in result.history)  # scores (minus a norm), not accuracies
    assert result.search.base_score == pytest.approx(expected_base, rel=1e-5)
    assert result.base.accuracy == pytest.approx(expected_base, rel=1e-5)
    assert result.pruned.accuracy == pytest.approx(score(result.model), rel=1e-5)


class DictOutputNet(nn.Module):
    """A model whose forward returns a dict (detection- or multi-head-style outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(3, 8), conv_bn(8, 16))
        self.fc = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.fc(self.body(x).mean((2, 3)))}


def test_outputs_that_are_not_logits_need_the_callers_loop_and_say_so_before_the_search(cases):
    case = cases["sequential"]
    train, val = case.loaders()
    torch.manual_seed(0)
    model = DictOutputNet().eval()

    def score(m: nn.Module) -> float:
        with torch.no_grad():
            return float(sum(int((m(x)["logits"].argmax(1) == y).sum()) for x, y in val)) / len(case.val_ds)

    def finetune(m: nn.Module) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(m(x)["logits"], y).backward()
            opt.step()

    common = {"macs_reduction": REDUCTION, "train_loader": train, "score_fn": score, "budget": BUDGET, **FAST}
    recorder = Recorder()
    with pytest.raises(AutopruneError) as err:  # the built-in fine-tuning reads logits: said before any search
        autoprune.prune(model, case.example, method="pso", method_options=QUICK_OPTIONS["pso"],
                        finetune=FINETUNE, callbacks=[recorder], **common)
    assert "fine-tuning needs logits" in one_line(err) and "the model gave dict" in str(err.value)
    assert "finetune=your_function(model)" in str(err.value) and not recorder.evaluations
    with pytest.raises(AutopruneError) as err:  # a gradient criterion reads logits too
        autoprune.prune(model, case.example, method="gdp", method_options=QUICK_OPTIONS["gdp"], finetune=finetune,
                        **common)
    assert "a gradient-based channel criterion needs logits" in one_line(err)
    assert "(l1, global, random, pso, ssa)" in str(err.value)
    result = autoprune.prune(model, case.example, method="pso", method_options=QUICK_OPTIONS["pso"],
                             finetune=finetune, **common)
    assert result.finetune.custom and result.pruned.accuracy == pytest.approx(score(result.model))


def test_max_drop_target(cases):
    case = cases["sequential"]
    result = prune(case, macs_reduction=None, max_drop=1.0, budget=8)
    assert result.target.max_drop == 1.0 and result.target.macs_reduction is None
    best = result.search.best
    assert best is not None and best.accuracy >= result.search.base_score - 0.01 - 1e-9
    assert result.pruned.macs < result.base.macs


def test_method_object_and_method_options(cases):
    case = cases["sequential"]
    result = prune(case, method=autoprune.methods.PSO(particles=3, iterations=2), budget=None)
    assert result.method == "pso" and result.search.strategy == "pso"
    assert {"particles": 3, "iterations": 2}.items() <= result.config.method_options.items()
    assert 1 <= len(result.history) <= 3 * 2  # the swarm's own end, not the method's default budget
    result = prune(case, method="ssa", method_options={"population": 3, "iterations": 1}, budget=None)
    assert result.method == "ssa"
    assert {"population": 3, "iterations": 1}.items() <= result.config.method_options.items()
    assert 1 <= len(result.history) <= 3 * 2


class HardCodedReshape(nn.Module):
    """A forward that only accepts 3x16x16 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * SIZE * SIZE, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).reshape(-1, 4 * SIZE * SIZE))


class InPlaceOnView(nn.Module):
    """Runs forward, but changes in place a tensor that autograd needs: no backward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f(x)
        y[:, :4].mul_(2)
        return self.fc(y.mean((2, 3)))


class ArgMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(1)


class ReturnsNothing(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(*sequential_cnn())

    def forward(self, x: torch.Tensor) -> None:
        super().forward(x)


class KeepsActivation(nn.Sequential):
    """Stores its last output, as models exposing features for a loss do: not deep-copyable after a forward."""

    def __init__(self) -> None:
        super().__init__(*sequential_cnn())
        self.last = super().forward(torch.randn(2, 3, SIZE, SIZE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = super().forward(x)
        return self.last


class RaisingLoader:
    """Yields one good batch, then raises ``error`` (a disk or a decoder failing mid-pass)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def __iter__(self):
        yield toy_images(8, 0)
        raise self.error


class NaNLoader:
    """Validation batches with a NaN pixel in each image."""

    def __iter__(self):
        x, y = toy_images(16, 0)
        x[:, 0, 0, 0] = float("nan")
        yield x, y


class NaNOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = sequential_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * float("nan")


class RaisingIter:
    """A loader whose ``__iter__`` itself raises (it cannot open its files)."""

    def __iter__(self):
        raise OSError("disk gone")


class AnswersNo(autoprune.Callback):
    def should_stop(self):
        return "no"


class EndlessLoader:
    """A loader whose every pass cycles for ever."""

    def __iter__(self):
        return itertools.cycle([(torch.randn(8, 3, SIZE, SIZE), torch.arange(8) % CLASSES)])


class BoomCallback(autoprune.Callback):
    def on_evaluation(self, evaluation) -> None:
        raise RuntimeError("cb boom")


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % CLASSES


def _trains_what_it_scores(model):
    """A score_fn that changes the weights of the network it is given (as an optimizer step does)."""
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    return 0.5


def _edits_through_data(model):
    """A score_fn that edits a weight through ``.data``, which the in-place version counter does not see."""
    next(model.parameters()).data[0].zero_()
    return 0.5


def _infinite_after_first_call():
    """A score_fn finite for the unpruned model and infinite for every candidate."""
    calls = []

    def score(model):
        calls.append(1)
        return 0.5 if len(calls) == 1 else float("inf")
    return score


def _one_class(n: int, cls: int = 0) -> list:
    return [(toy_images(n, 0)[0], torch.full((n,), cls, dtype=torch.long))]


@pytest.mark.parametrize(("change", "named"), [
    ({"method": "pso", "method_options": {"particle": 3}}, "particle"),
    ({"method": "nope"}, "nope"),
    ({"method": autoprune.methods.PSO(), "method_options": {"particles": 3}}, "particles"),
    ({"macs_reduction": 0.5, "max_drop": 1.0}, "max_drop"),
    ({"macs_reduction": None}, "target"),
    ({"macs_reduction": 1.5}, "macs_reduction"),
    ({"model": lambda x: x}, "nn.Module"),
    ({"model": HardCodedReshape(), "example_inputs": torch.randn(2, 3, 8, 8)}, "example_inputs"),
    ({"ignored_layers": [nn.Conv2d(3, 3, 1)]}, "ignored_layers"),
    ({"ignored_layers": ["no.such.layer"]}, "no.such.layer"),
    ({"callbacks": [object()]}, "Callback"),
    ({"callbacks": autoprune.Callback()}, "callbacks=<"),  # one callback, not a list of them
    ({"val_sample": 10}, "val_sample"),
    ({"method_options": ["particles", 3]}, "method_options=['particles', 3]: must be a dict"),
    ({"score_fn": "accuracy"}, "score_fn='accuracy': must be a callable"),
    ({"score_fn": lambda model: 1 / 0}, "score_fn raised ZeroDivisionError: division by zero"),
    ({"score_fn": lambda model: "high"}, "score_fn must return a number (higher is better), it returned str 'high'"),
    ({"score_fn": lambda model: float("nan")}, "score_fn returned nan; it must return a finite number for every"),
    ({"score_fn": _infinite_after_first_call()}, "score_fn returned inf; it must return a finite number"),
    ({"score_fn": _trains_what_it_scores}, "score_fn changed the network it was given (its weights, buffers or "
                                           "layers); it must only evaluate it: train or edit copy.deepcopy(model)"),
    ({"score_fn": _edits_through_data}, "score_fn changed the network it was given (its weights, buffers or "),
    ({"val_loader": RaisingLoader(OSError("disk gone"))}, "the validation loader raised OSError reading batch 1: disk"),
    ({"train_loader": RaisingLoader(RuntimeError())}, "the training loader raised RuntimeError reading batch 1: (no"),
    ({"val_loader": NaNLoader()}, "NaN or infinite outputs on validation batch 0; the inputs hold NaN"),
    ({"model": NaNOutput()}, "NaN or infinite outputs on validation batch 0; the inputs are finite"),
    ({"example_inputs": torch.randn(0, 3, SIZE, SIZE)}, "example_inputs has batch size 0 (shape (0, 3, 16, 16))"),
    ({"test_loader": []}, "the test loader yielded no samples; pass a non-empty test_loader"),
    ({"seed": 2**70}, "seed=1180591620717411303424: must be an integer between 0 and"),
    ({"train_loader": [], "score": "bn"}, "the candidate score 'bn' re-estimates BatchNorm statistics on training "
                                          "batches, but there are none"),
    ({"val_loader": [(torch.randn(8, 1, SIZE, SIZE), _labels(8))]},
     "the model fails on validation batch 0, inputs of shape (8, 1, 16, 16) (RuntimeError: "),
    ({"val_loader": [(torch.randn(8, 1, SIZE, SIZE), _labels(8))]},
     "the loaders must yield what the model's forward takes (example_inputs has shape (1, 3, 16, 16))"),
    ({"train_loader": [(torch.randn(8, 1, SIZE, SIZE), _labels(8))]}, "the model fails on training batch 0, inputs"),
    ({"val_loader": RaisingIter()}, "the validation loader raised OSError starting a pass (iter(loader), before batch"),
    ({"train_loader": RaisingIter()}, "the training loader raised OSError starting a pass"),
    ({"finetune": lambda model: 1 / 0}, "finetune raised ZeroDivisionError: division by zero; fix your fine-tuning"),
    ({"finetune": lambda model: model.double()}, "finetune (<lambda>) turned '0.weight' from torch.float32 on cpu "
                                                 "into torch.float64 on cpu; make <lambda> train the model it is"),
    ({"finetune": lambda model: model.append(nn.Identity()).append(nn.Linear(CLASSES, CLASSES))},
     "finetune (<lambda>) changed the pruned model's layers (['13.bias', '13.weight'])"),
    ({"finetune": lambda model: [p.data.fill_(float("nan")) for p in model.parameters()]},
     "finetune (<lambda>) left NaN or infinite values in '0.weight'; it diverged"),
    ({"method": 123}, "method=123: must be a method name"),
    ({"model": sequential_cnn().half(), "example_inputs": torch.randn(1, 3, SIZE, SIZE).half()},
     "the model's parameters are float16; autoprune prunes float32 models: pass model.float()"),
    ({"model": sequential_cnn().bfloat16()}, "the model's parameters are bfloat16; autoprune prunes float32 models"),
    ({"model": sequential_cnn().to("meta")}, "is on the meta device (no weights); load its weights first"),
    ({"model": sequential_cnn().to("meta"), "device": "cpu"}, "is on the meta device (no weights)"),
    ({"example_inputs": torch.randn(1, 3, SIZE, SIZE, device="meta")}, "example_inputs are on the meta device"),
    ({"out": 5}, "out=5: must be a directory path (str or os.PathLike)"),
    ({"out": ""}, "out='': is empty"),
    ({"resume": "yes"}, "resume='yes': must be True or False"),
    ({"train_loader": [toy_images(8, 0), (torch.randn(8, 1, SIZE, SIZE), _labels(8))]},
     "the model fails on training batch 1, inputs of shape (8, 1, 16, 16)"),
    ({"method": "sa", "train_loader": [toy_images(8, 0)] * 2},
     "method 'sa' trains each of its 3 shard networks on one training batch in 3, but the training loader has only 2"),
    ({"ignored_layers": ["0", "3", "6"]}, "ignored_layers (['0', '3', '6']) leave no layer to prune; keep fewer"),
    ({"round_to": 64}, "is unreachable: at the minimum widths the model keeps 100.0% of its MACs (largest reduction "
                       "0.000); lower the target, min_ratio or round_to=64"),
    ({"model": nn.Sequential(sequential_cnn(), ArgMax())}, "model Sequential returns torch.int64 values (an argmax"),
    ({"model": ReturnsNothing()}, "the model returns a NoneType; autoprune (and Torch-Pruning) need a tensor"),
    ({"val_loader": [(torch.randn(8, 3, SIZE, SIZE), _labels(8).tolist())]},
     "accuracy needs integer class targets as a tensor (B,), the loader gave a list"),
    ({"model": KeepsActivation()}, "cannot copy model KeepsActivation: its attribute 'last' holds a tensor a forward "
                                   "computed with gradients; store it detached"),
    ({"model": InPlaceOnView(), "finetune": FINETUNE},
     "the model's backward pass failed during a check of the fine-tuning on training batch 0 (one of the variables"),
    ({"model": InPlaceOnView(), "method": "gdp", "finetune": None},
     "the model's backward pass failed during the gradient criterion's gradients"),
    ({"val_loader": EndlessLoader()}, "the validation loader never ends (iter() gives an itertools.cycle)"),
    ({"test_loader": EndlessLoader()}, "the test loader never ends (iter() gives an itertools.cycle), but each"),
    ({"val_loader": [(torch.randn(8, 3, SIZE, SIZE, device="meta"), _labels(8))]},
     "batch 0 of the validation loader is on the meta device (no data)"),
    ({"progress": "no"}, "progress='no': must be True or False"),
    ({"ray_address": 5, "workers": 2}, "ray_address=5: must be 'auto', 'local' or a cluster address"),
    ({"executor": "serial", "workers": 2}, "workers=2: needs a parallel executor; executor='serial' runs one"),
    ({"callbacks": [BoomCallback()]}, "callback BoomCallback.on_evaluation raised RuntimeError: cb boom; fix the"),
    ({"callbacks": [AnswersNo()]}, "callback AnswersNo.should_stop returned 'no'; it must return True (stop) or"),
    ({"train_loader": (batch for batch in [toy_images(8, 0)])}, "train_loader is a generator, which can be read only"),
    ({"test_loader": iter([toy_images(8, 0)])}, "test_loader is an iterator (list_iterator), which can be read only"),
    ({"ignored_layers": "no.such.layer"}, "ignored layer(s) ['no.such.layer'] are not"),  # one name, not letters
    ({"val_loader": _one_class(16, 2)}, "the validation data hold only class 2; pruning is judged by how well the"),
    ({"val_loader": DataLoader(TensorDataset(*toy_images(32, 0)), batch_size=8), "val_samples": 1},
     "(the first val_samples=1 samples); pruning is judged"),
    ({"train_loader": _one_class(16) * 2, "finetune": FINETUNE}, "the training data hold only class 0 (every target"),
])
def test_bad_arguments_give_one_line_naming_the_problem(cases, change, named):
    case = cases["sequential"]
    train, val = case.loaders()
    kwargs = {"method": "l1", "macs_reduction": REDUCTION, "train_loader": train, "val_loader": val,
              "finetune": None, "budget": 2, **change}
    model, example = kwargs.pop("model", case.trained()), kwargs.pop("example_inputs", case.example)
    with pytest.raises(AutopruneError) as err:
        autoprune.prune(model, example, **kwargs)
    assert named in one_line(err)


@pytest.mark.parametrize(("field", "value", "named"), [
    ("epochs", "2", "epochs='2': must be an integer (TrainConfig's epochs), not str"),
    ("epochs", 2.0, "epochs=2.0: must be an integer"),
    ("batch_size", True, "batch_size=True: must be an integer"),
    ("seed", None, "seed=None: must be an integer"),
    ("lr", "0.1", "lr='0.1': must be a number (TrainConfig's lr), not str"),
    ("distill", [0.5], "distill=[0.5]: must be a number"),
    ("lr", 10**400, "must be a finite number"),
])
def test_train_config_settings_of_the_wrong_type_are_one_line(field, value, named):
    with pytest.raises(autoprune.ConfigError) as err:
        autoprune.TrainConfig(**{field: value})
    assert named in one_line(err) and err.value.field == field


def test_train_config_takes_numpy_numbers_as_plain_ones():
    config = autoprune.TrainConfig(epochs=np.int64(3), lr=np.float32(0.5), momentum=0)
    assert (type(config.epochs), type(config.lr), type(config.momentum)) == (int, float, float)


class FailsLater(nn.Module):
    """A forward that starts raising once ``broken`` is set (a bug that only some inputs reach)."""

    broken = {"on": False}

    def __init__(self) -> None:
        super().__init__()
        self.net = sequential_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FailsLater.broken["on"]:
            raise ValueError("boom inside forward")
        return self.net(x)


class BreakAfterFirst(autoprune.Callback):
    def on_evaluation(self, evaluation) -> None:
        FailsLater.broken["on"] = True


def test_the_models_forward_failing_mid_search_is_one_line_naming_the_evaluation(cases):
    train, val = cases["sequential"].loaders()
    FailsLater.broken["on"] = False
    try:
        with pytest.raises(AutopruneError) as err:
            autoprune.prune(FailsLater(), cases["sequential"].example, method="random", macs_reduction=REDUCTION,
                            train_loader=train, val_loader=val, finetune=None, budget=4,
                            callbacks=[BreakAfterFirst()], **FAST)
    finally:
        FailsLater.broken["on"] = False
    assert "the model's forward (FailsLater) raised ValueError in evaluation 2 of the search: boom inside forward; " \
           "the forward must run" in one_line(err)
    assert isinstance(err.value.__cause__, ValueError)


def test_single_class_validation_data_are_fine_with_a_score_fn_and_one_module_is_one_ignored_layer(cases):
    case = cases["sequential"]
    train, _ = case.loaders()
    model = case.trained()
    result = autoprune.prune(model, case.example, method="l1", macs_reduction=REDUCTION, train_loader=train,
                             val_loader=_one_class(16), score_fn=lambda m: 0.5, finetune=None, budget=2,
                             ignored_layers=model[3], **FAST)  # one module, not a list of them
    assert result.model[3].out_channels == 16 and "3" not in {w.name for w in result.widths}
    assert result.config.ignored_layers == ("3",)


def test_a_validation_generator_is_read_once_into_memory(cases):
    case = cases["sequential"]
    train, val = case.loaders()
    batches = list(val)
    result = autoprune.prune(case.trained(), case.example, method="l1", macs_reduction=REDUCTION, train_loader=train,
                             val_loader=(b for b in batches), finetune=None, budget=2, **FAST)
    from autoprune.engine.train import evaluate

    assert result.base.accuracy == pytest.approx(evaluate(case.trained(), batches).accuracy)


def _relabelled(case: Case, relabel) -> DataLoader:
    inputs, targets = next(iter(DataLoader(case.val_ds, batch_size=len(case.val_ds))))
    return DataLoader(TensorDataset(inputs, relabel(targets)), batch_size=32)


@pytest.mark.parametrize(("loader", "relabel", "named"), [
    ("val_loader", lambda t: t + CLASSES, f"a target class lies outside 0..{CLASSES - 1}"),
    ("val_loader", lambda t: t.float(), "the targets are float32; a classifier's targets are integer class indices"),
    ("train_loader", lambda t: t - 1, f"a target class lies outside 0..{CLASSES - 1} (got -1.."),
    ("val_loader", lambda t: t[:, None], "the targets have shape (32, 1) for outputs (32, 3)"),
])
def test_targets_that_are_not_class_indices_are_one_line(cases, loader, relabel, named):
    case = cases["sequential"]
    train, val = case.loaders()
    loaders = {"train_loader": train, "val_loader": val, loader: _relabelled(case, relabel)}
    with pytest.raises(AutopruneError) as err:
        autoprune.prune(case.trained(), case.example, method="l1", macs_reduction=REDUCTION, budget=2,
                        finetune=autoprune.TrainConfig(epochs=1), **loaders, **FAST)
    assert named in one_line(err)


def test_ignored_layers_keep_their_width(cases):
    case = cases["sequential"]
    model = case.trained()
    result = prune(case, model, ignored_layers=[model[3]])  # a module of the caller's model
    assert result.model[3].out_channels == 16
    assert "3" not in {w.name for w in result.widths}
    assert all(w.after < w.before for w in result.widths)
    assert result.pruned.macs <= (1 - REDUCTION) * result.base.macs

    case = cases["residual"]
    result = prune(case, ignored_layers=["b1.0"])  # by name
    assert result.model.b1[0].out_channels == 16
    assert "b1.0" not in {w.name for w in result.widths}
    assert result.pruned.macs <= (1 - REDUCTION) * result.base.macs


def test_round_to_gives_multiples(cases):
    case = cases["residual"]
    result = prune(case, round_to=4, method="random")
    assert all(w.after % 4 == 0 for w in result.widths)
    assert all(c % 4 == 0 for row in result.history for c in row.counts)
    assert any(w.after < w.before for w in result.widths)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 4 == 0 for m in convs)


class Recorder(autoprune.Callback):
    """Records the hooks called, in order; asks to stop after ``stop_after`` evaluations (if given)."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.events: list[str] = []
        self.evaluations: list = []
        self.info: dict = {}
        self.result = self.best = None
        self.stop_after = stop_after

    def on_start(self, info):
        self.events.append("start")
        self.info = info

    def on_evaluation(self, evaluation):
        self.events.append("evaluation")
        self.evaluations.append(evaluation)

    def on_search_end(self, best):
        self.events.append("search_end")
        self.best = best

    def on_finetune_epoch(self, epoch, epochs):
        self.events.append("finetune_epoch")

    def on_end(self, result):
        self.events.append("end")
        self.result = result

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.evaluations) >= self.stop_after


def test_callbacks_follow_the_run(cases):
    case = cases["sequential"]
    recorder = Recorder()
    result = prune(case, method="pso", method_options=QUICK_OPTIONS["pso"], callbacks=[recorder])
    n = len(result.history)
    assert recorder.events == ["start"] + ["evaluation"] * n + ["search_end", "finetune_epoch", "end"]
    assert recorder.evaluations == result.history
    assert recorder.result is result
    assert recorder.info["groups"] == [w.name for w in result.widths]
    assert recorder.best is not None and recorder.best.counts == tuple(w.after for w in result.widths)


def test_should_stop_interrupts_the_search(cases):
    case = cases["sequential"]
    recorder = Recorder(stop_after=3)
    with pytest.raises(SearchInterrupted):
        prune(case, method="pso", method_options=QUICK_OPTIONS["pso"], callbacks=[recorder])
    assert len(recorder.evaluations) == 3
    assert "search_end" not in recorder.events and "end" not in recorder.events


def test_out_writes_the_run_directory(cases, tmp_path):
    case = cases["separable"]
    out = tmp_path / "run"
    result = prune(case, out=out)
    for name in ("history.jsonl", "report.json", "model.pt", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert rows == [row.to_json() for row in result.history]
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(result.to_json()))
    assert autoprune.PruneResult.from_json(report).keep == result.keep
    loaded = autoprune.load(out / "model.pt", model=case.build())
    batch = case.batch(4)
    assert torch.equal(outputs(loaded, batch), outputs(result.model, batch))
    assert not (out / "work").exists()


def test_resume_after_an_interruption_equals_an_uninterrupted_run(cases, tmp_path):
    case = cases["concat"]
    settings = {"method": "pso", "method_options": {"particles": 3, "iterations": 3}, "budget": 9}
    out = tmp_path / "run"
    with pytest.raises(SearchInterrupted):
        prune(case, out=out, callbacks=[Recorder(stop_after=4)], **settings)
    assert len((out / "history.jsonl").read_text().splitlines()) == 4
    assert not (out / "report.json").exists()
    resumed = prune(case, out=out, resume=True, **settings)
    reference = prune(case, **settings)
    assert resumed.search.resumed_evaluations == 4
    assert resumed.keep == reference.keep
    assert history_rows(resumed) == history_rows(reference)
    batch = case.batch(4)
    assert torch.equal(outputs(resumed.model, batch), outputs(reference.model, batch))


def test_a_method_that_trains_in_its_plan_keeps_its_training_settings_on_resume():
    from autoprune.runs.job import _trains_in_plan

    assert [_trains_in_plan(m) for m in ("sa", "slim", "l1", "pso")] == [True, True, False, False]
    config = autoprune.PruneConfig(method="sa", target=autoprune.Target(macs_reduction=0.5))
    other = config.replace(finetune=autoprune.TrainConfig(epochs=2, lr=0.05))  # sa trains its shards with lr 0.05
    assert config.search_json(plan_trains=True) != other.search_json(plan_trains=True)
    assert config.search_json(plan_trains=False) == other.search_json(plan_trains=False)


def test_a_method_with_sequence_options_resumes(cases, tmp_path):
    case = cases["sequential"]
    settings = {"method": "gdp", "method_options": {"max_batches": 1}}
    with pytest.raises(SearchInterrupted):
        prune(case, out=tmp_path / "run", callbacks=[Recorder(stop_after=2)], **settings)
    resumed = prune(case, out=tmp_path / "run", resume=True, **settings)  # gdp's exponents: a tuple, saved as a list
    assert resumed.search.resumed_evaluations == 2


def test_resume_refuses_another_model_or_other_data_and_takes_new_finetuning(cases, tmp_path):
    case = cases["concat"]
    settings = {"method": "random", "budget": 6}
    out = tmp_path / "run"
    with pytest.raises(SearchInterrupted):
        prune(case, out=out, callbacks=[Recorder(stop_after=3)], **settings)
    other = case.trained()
    with torch.no_grad():
        other.fc.bias.add_(0.01)
    with pytest.raises(AutopruneError, match="the model differs from the one the run in") as err:
        prune(case, other, out=out, resume=True, **settings)
    one_line(err)
    train, _ = case.loaders()
    fewer = DataLoader(Subset(case.val_ds, range(40)), batch_size=64)
    with pytest.raises(AutopruneError, match="the validation data .* differ from those the run in") as err:
        autoprune.prune(case.trained(), case.example, macs_reduction=REDUCTION, train_loader=train, val_loader=fewer,
                        finetune=case.finetune, **FAST, out=out, resume=True, **settings)
    one_line(err)
    with pytest.raises(AutopruneError, match=r"other search settings \(budget 6 -> 5\)"):
        prune(case, out=out, resume=True, **{**settings, "budget": 5})
    assert len((out / "history.jsonl").read_text().splitlines()) == 3  # the record survives the refusals
    # the fine-tuning may change on resume, and the same samples may come in other batches
    rebatched = DataLoader(case.val_ds, batch_size=16)
    resumed = prune(case, out=out, resume=True, val_loader=rebatched, **settings,
                    finetune=autoprune.TrainConfig(epochs=2, lr=0.01))
    assert resumed.search.resumed_evaluations == 3
    reference = history_rows(prune(case, **settings))  # (the new batches' sums differ in the last bits)
    assert [(r["counts"], r["accuracy"]) for r in history_rows(resumed)] == [(r["counts"], r["accuracy"])
                                                                             for r in reference]
    assert [r["score"] for r in history_rows(resumed)] == pytest.approx([r["score"] for r in reference], rel=1e-6)


def test_same_seed_same_run_other_seed_other_search(cases):
    case = cases["two_input"]
    settings = {"method": "pso", "method_options": QUICK_OPTIONS["pso"]}
    first, second = prune(case, seed=3, **settings), prune(case, seed=3, **settings)
    assert first.keep == second.keep
    assert history_rows(first) == history_rows(second)
    first_state, second_state = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(v, second_state[k]) for k, v in first_state.items())
    other = prune(case, seed=4, **settings)
    assert [row.keep for row in other.history] != [row.keep for row in first.history]


def test_the_callers_random_state_is_left_alone(cases):
    case = cases["standardised"]
    model, (train, val) = case.trained(), case.loaders()  # building them draws from the caller's generator
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    autoprune.prune(model, case.example, method="random", macs_reduction=REDUCTION, train_loader=train,
                    val_loader=val, finetune=FINETUNE, budget=BUDGET, **FAST)
    assert torch.equal(torch.get_rng_state(), before)  # shuffled loaders and fine-tuning drew from it inside


# ---- 3. a user's standalone script ----------------------------------------------------------------------

def test_user_script_runs_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model on a shared machine
    proc = subprocess.run([sys.executable, "tests/user_script.py", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert float(lines["macs reduction"]) >= 0.5
    assert lines["reloaded outputs"] == "identical"
    assert lines["onnx"].startswith("verified")
    assert (tmp_path / "pruned.pt").is_file() and (tmp_path / "pruned.onnx").is_file()
