"""Model files (format 2): exact round trips, and files that never run code, validated before anything is built.

The malicious-file tests plant payloads that would create a marker file, or import a module not yet
imported (``this``, ``antigravity``), in every field of the spec and in pickled objects; reading and
loading must refuse or ignore them with one :class:`AutopruneError` line, never run or import them.
"""

from __future__ import annotations

import builtins
import copy
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from conftest import small_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.io import modelfile
from autoprune.io.modelfile import ModelFile, apply_widths, describe_module, load, load_with_spec, read_model_file
from autoprune.models import MODELS, NormalizedModel, create_model

LENET_ARGS = {"num_classes": 10, "in_channels": 1, "image_size": [28, 28]}
LENET = {"kind": "registry", "name": "lenet5", "args": LENET_ARGS}
DIGITS = {"name": "mnist", "num_classes": 10, "classes": [str(i) for i in range(10)], "input_shape": [1, 28, 28]}


def one_line_error(call, *phrases: str) -> AutopruneError:
    """Run ``call``; it must raise one single-line AutopruneError containing ``phrases``."""
    with pytest.raises(AutopruneError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and "\r" not in text, text
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in {text!r}"
    return info.value


def pruned_registry_model(name: str, seed: int = 1) -> tuple[NormalizedModel, torch.Tensor, dict]:
    model, x = small_model(name)
    space = PruningSpace(model, x[:1])
    keep = space.snap(np.random.default_rng(seed).uniform(space.lower, 1))
    g = torch.Generator().manual_seed(seed)
    pruned = space.apply(model, keep, [torch.rand(grp.channels, generator=g) for grp in space.groups]).eval()
    args = {"num_classes": 10, "in_channels": x.shape[1], "image_size": list(x.shape[2:])}
    if name != "lenet5":
        args["width"] = 0.25
    return pruned, x, {"kind": "registry", "name": name, "args": args}


def fresh_lenet() -> nn.Module:
    return create_model("lenet5", num_classes=10, in_channels=1, image_size=(28, 28))


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory) -> tuple[Path, NormalizedModel, torch.Tensor]:
    pruned, x, arch = pruned_registry_model("lenet5")
    path = tmp_path_factory.mktemp("lenet") / "model.pt"
    modelfile.save_model(path, pruned, architecture=arch, dataset=DIGITS, info={"method": "l1", "keep": [0.5, 0.4]})
    return path, pruned, x


@pytest.fixture
def base_payload(lenet_file) -> dict:
    """A valid file's raw payload, to be damaged by a test."""
    return torch.load(lenet_file[0], weights_only=True)


def save_raw(path: Path, payload) -> Path:
    torch.save(payload, path)
    return path


# ---- round trips --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg11"])
def test_registry_round_trip_is_bit_identical(tmp_path, name):
    pruned, x, arch = pruned_registry_model(name)
    path = tmp_path / "m.pt"
    spec = modelfile.save_model(path, pruned, architecture=arch, info={"keep": np.array([0.5, 1.0])})
    assert spec["normalize"]["mean"] == pruned.normalize.mean.flatten().tolist()
    assert spec["info"] == {"keep": [0.5, 1.0]}  # arrays are stored as plain lists
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "autoprune-model" and raw["version"] == 2
    loaded, mf = load_with_spec(path)
    assert isinstance(loaded, NormalizedModel) and not loaded.training
    assert isinstance(mf, ModelFile) and mf.architecture == arch
    with torch.no_grad():
        want = pruned(x)
        assert torch.equal(loaded(x), want)
        # a fresh unnormalised instance (wrapped for us) and a fresh normalised one give the same model
        net = create_model(name, **{**arch["args"], "image_size": tuple(arch["args"]["image_size"])})
        assert torch.equal(load(path, model=net)(x), want)
        assert torch.equal(load(path, model=NormalizedModel(net, [0.0] * x.shape[1], [1.0] * x.shape[1]))(x), want)
    assert sum(p.numel() for p in net.parameters()) > sum(p.numel() for p in loaded.parameters())  # untouched


def test_public_api_and_the_meta_device_build(lenet_file):
    path, pruned, x = lenet_file
    model = load(path)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(model(x), pruned(x))
    mf = read_model_file(path)
    assert mf.spec["dataset"] == DIGITS and mf.info["method"] == "l1"
    assert set(mf.spec["tensors"]) == set(mf.state_dict)


class SepNet(nn.Module):
    """A user's own network: depthwise-separable block, GroupNorm, PReLU, BatchNorm, LayerNorm."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.act = nn.PReLU(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.bn = nn.BatchNorm2d(24)
        self.fc1 = nn.Linear(24, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.gn(self.stem(x)))
        x = F.relu(self.bn(self.pw(self.dw(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.ln(self.fc1(x))))


class ScaledNet(nn.Module):
    """A network with a learned per-channel scale that is a bare nn.Parameter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x) * self.scale.view(1, -1, 1, 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv2(x), 1), 1))


def _randomise(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*model.parameters(), *(b for n, b in model.named_buffers() if "running" in n)]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.1)
    return model.eval()


def test_user_class_round_trip_with_groupnorm_layernorm_prelu_and_depthwise(tmp_path):
    model, x = _randomise(SepNet()), torch.rand(2, 3, 12, 12)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    graph.get_pruning_group(model.stem, tp.prune_conv_out_channels, idxs=[0, 5, 9, 13]).prune()
    graph.get_pruning_group(model.pw, tp.prune_conv_out_channels, idxs=[1, 2, 3, 20]).prune()
    graph.get_pruning_group(model.fc1, tp.prune_linear_out_channels, idxs=[0, 7, 8]).prune()
    assert model.dw.groups == 12 and model.ln.normalized_shape == (29,) and model.act.num_parameters == 12
    described = describe_module(model)["modules"]
    assert described["dw"] == {"type": "Conv2d", "in_channels": 12, "out_channels": 12, "groups": 12}
    assert described["gn"] == {"type": "GroupNorm", "num_groups": 4, "num_channels": 12}
    assert described["ln"] == {"type": "LayerNorm", "normalized_shape": [29]}
    path = tmp_path / "sep.pt"
    spec = modelfile.save_model(path, model)
    assert spec["architecture"] == {"kind": "module", "class": "SepNet"} and spec["normalize"] is None
    fresh = SepNet()
    loaded = load(path, model=fresh)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded is not fresh and fresh.stem.out_channels == 16 and fresh.act.weight.shape == (16,)  # untouched
    one_line_error(lambda: load(path), "your own class 'SepNet'", "model=SepNet()")
    one_line_error(lambda: load(path, model=SepNet), "must be an instance", "model=SepNet()")
    one_line_error(lambda: load(path, model="SepNet"), "nn.Module instance")


def test_custom_per_channel_parameter_is_resized_from_the_tensors_part(tmp_path):
    model, x = _randomise(ScaledNet()), torch.rand(2, 3, 12, 12)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, unwrapped_parameters=[(model.scale, 0)])
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 3, 4]).prune()
    assert model.scale.shape == (5,)
    path = tmp_path / "scaled.pt"
    modelfile.save_model(path, model)
    loaded = load(path, model=ScaledNet())
    assert isinstance(loaded.scale, nn.Parameter) and loaded.scale.requires_grad
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_apply_widths_keeps_kind_dtype_and_device_and_allocates_nothing_on_meta():
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 50_000, 3), nn.BatchNorm2d(50_000))
    net[0].weight.requires_grad_(False)
    apply_widths(net, {"0": {"type": "Conv2d", "in_channels": 3, "out_channels": 7, "groups": 1},
                       "1": {"type": "BatchNorm2d", "num_features": 7}})
    assert net[0].out_channels == 7 and net[0].weight.shape == (7, 3, 3, 3) and net[0].weight.is_meta
    assert isinstance(net[0].weight, nn.Parameter) and not net[0].weight.requires_grad
    assert "running_mean" in net[1]._buffers and net[1].running_var.shape == (7,)
    assert net[1].num_batches_tracked.shape == ()
    one_line_error(lambda: apply_widths(net, {"0": {"type": "Linear", "in_features": 3, "out_features": 2}}),
                   "module '0' is a Conv2d in the model but a Linear in the file")
    one_line_error(lambda: apply_widths(net, {"9": {"type": "Linear", "in_features": 3, "out_features": 2}}),
                   "records module '9'")
    one_line_error(lambda: apply_widths(net, {"1": {"type": "BatchNorm2d", "num_features": 8}}),
                   "num_features=8", "unpruned")


def make_lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A user factory (importable as test_modelfile:make_lenet)."""
    return create_model("lenet5", num_classes=num_classes, in_channels=in_channels, image_size=(28, 28))


def test_factory_files_load_only_with_the_callers_factory(tmp_path):
    sys.modules.setdefault("test_modelfile", sys.modules[__name__])  # importable by the name we record
    net = make_lenet()
    x = torch.rand(2, 1, 28, 28)
    path = tmp_path / "f.pt"
    recorded = "test_modelfile:make_lenet"
    modelfile.save_model(path, NormalizedModel(net, [0.5], [0.25]),
                         architecture={"kind": "factory", "path": recorded, "args": {"num_classes": 10}})
    want = NormalizedModel(net, [0.5], [0.25]).eval()(x)
    one_line_error(lambda: load(path), "user factory 'test_modelfile:make_lenet'",
                   "does not import code named by a file", "--model test_modelfile:make_lenet")
    one_line_error(lambda: load(path, factory="other.module:make"), "caller trusted",
                   "--model test_modelfile:make_lenet")
    assert torch.equal(load(path, factory=recorded)(x), want)
    assert torch.equal(load(path, factory=make_lenet)(x), want)
    assert torch.equal(load(path, model=make_lenet())(x), want)
    one_line_error(lambda: load(path, factory=make_lenet, model=make_lenet()), "not both")

    def exits(**kwargs):
        sys.exit(3)

    def raises(**kwargs):
        raise ValueError("broken\nfactory")

    def returns_text(**kwargs):
        return "a network"

    def not_on_meta(num_classes: int = 10) -> nn.Module:
        torch.zeros(1).item()  # fails on the meta device: built on the CPU instead
        return make_lenet(num_classes)

    one_line_error(lambda: load(path, factory=exits), "called sys.exit(3)", recorded)
    one_line_error(lambda: load(path, factory=raises), "failed with ValueError: broken", recorded)
    one_line_error(lambda: load(path, factory=returns_text), "returned 'a network', not an nn.Module")
    assert torch.equal(load(path, factory=not_on_meta)(x), want)


def test_architecture_mismatches_name_the_first_differing_key(lenet_file):
    path = lenet_file[0]
    resnet = create_model("resnet20", num_classes=10, in_channels=3, image_size=(32, 32), width=0.25)
    one_line_error(lambda: load(path, model=resnet), "architecture mismatch", "'net.features.0'")
    small = nn.Sequential(nn.Conv2d(1, 2, 5))
    one_line_error(lambda: load(path, model=small), "architecture mismatch")
    # widths only shrink: an instance narrower than the file (5 classes, the file has 10) is refused
    five = create_model("lenet5", num_classes=5, in_channels=1, image_size=(28, 28))
    one_line_error(lambda: load(path, model=five), "out_features=10 for module 'net.classifier.5'", "has 5",
                   "unpruned")
    # same widths, another kernel size: the shape comparison names the tensor
    other = fresh_lenet()
    other.features[0] = nn.Conv2d(1, 6, 3, padding=2)
    one_line_error(lambda: load(path, model=other), "architecture mismatch", "'net.features.0.weight'",
                   "3, 3] in the model but", "5, 5] in the file")


# ---- malicious files ------------------------------------------------------------------------------------

EVIL = ["os:system", "subprocess:Popen", "subprocess:getoutput", "builtins:exec", "this:x", "posix:system",
        "antigravity", "__import__('this')"]


@pytest.fixture
def sandbox(tmp_path, lenet_file):
    """A marker path that no payload may create, and a check that no module gets imported."""
    marker = tmp_path / "marker"
    # warm up every code path once, so that lazily imported internals do not count
    load(lenet_file[0])
    load(lenet_file[0], model=fresh_lenet())
    with pytest.raises(AutopruneError):
        load(save_raw(tmp_path / "warm.pt", {"x": Shell("true")}))
    before = set(sys.modules)
    yield marker
    assert not marker.exists(), "a payload ran"
    assert set(sys.modules) - before == set(), "a module was imported"
    assert "this" not in sys.modules and "antigravity" not in sys.modules


class Shell:
    """Unpickling this would run a shell command."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class GetOutput(Shell):
    def __reduce__(self):
        return (subprocess.getoutput, (self.cmd,))


class Exec(Shell):
    def __reduce__(self):
        return (builtins.exec, (f"import subprocess, this; subprocess.getoutput({self.cmd!r})",))


class Popen(Shell):
    def __reduce__(self):
        return (subprocess.Popen, (["sh", "-c", self.cmd],))


@pytest.mark.parametrize("exploit", [Shell, GetOutput])
def test_the_payloads_are_live(tmp_path, exploit):
    """Control: unpickled without weights_only, these files do run code (so the refusals below mean something)."""
    marker = tmp_path / "marker"
    path = save_raw(tmp_path / "evil.pt", {"state_dict": {"w": exploit(f"touch {marker}")}})
    torch.load(path, weights_only=False)
    assert marker.exists()


def try_everything(path: Path) -> None:
    """Read and load ``path`` every way; only success or one-line AutopruneErrors are acceptable."""
    for call in (lambda: read_model_file(path), lambda: load(path), lambda: load(path, model=fresh_lenet())):
        try:
            call()
        except AutopruneError as exc:
            assert "\n" not in str(exc), str(exc)


def _conv(n):
    return {"type": "Conv2d", "in_channels": 1, "out_channels": 6, "groups": 1, "hook": n}


INJECTIONS = {
    "architecture.name": lambda p, n, cmd: p["spec"]["architecture"].update(name=n),
    "architecture.factory": lambda p, n, cmd: p["spec"].update(
        architecture={"kind": "factory", "path": n, "args": {"num_classes": 10}}),
    "architecture.factory.args": lambda p, n, cmd: p["spec"].update(
        architecture={"kind": "factory", "path": n, "args": {"command": cmd, "args": [cmd]}}),
    "architecture.class": lambda p, n, cmd: p["spec"].update(architecture={"kind": "module", "class": n}),
    "architecture.kind": lambda p, n, cmd: p["spec"]["architecture"].update(kind=n),
    "architecture.extra": lambda p, n, cmd: p["spec"]["architecture"].update(factory=n, call=[n, cmd]),
    "args.value": lambda p, n, cmd: p["spec"]["architecture"]["args"].update(num_classes=[n, cmd]),
    "args.name": lambda p, n, cmd: p["spec"]["architecture"]["args"].update({n: cmd}),
    "args.nested": lambda p, n, cmd: p["spec"]["architecture"]["args"].update(image_size={"f": n, "a": [cmd]}),
    "modules.type": lambda p, n, cmd: p["spec"]["modules"]["net.features.0"].update(type=n),
    "modules.attr": lambda p, n, cmd: p["spec"]["modules"].update({"net.features.0": _conv([n, cmd])}),
    "modules.name": lambda p, n, cmd: p["spec"]["modules"].update({n: _conv(n)}),
    "tensors.name": lambda p, n, cmd: p["spec"]["tensors"].update({n: [1]}),
    "state_dict.name": lambda p, n, cmd: (p["spec"]["tensors"].update({n: [1]}),
                                          p["state_dict"].update({n: torch.zeros(1)})),
    "dataset": lambda p, n, cmd: p["spec"].update(dataset={"name": n, "loader": {"call": n, "args": [cmd]}}),
    "dataset.classes": lambda p, n, cmd: p["spec"]["dataset"].update(classes=[n, cmd] * 5),
    "info": lambda p, n, cmd: p["spec"].update(info={"callback": n, "argv": [cmd], "deep": [[{"f": (n, cmd)}]]}),
    "normalize": lambda p, n, cmd: p["spec"].update(normalize={"mean": n, "std": [cmd]}),
    "normalize.extra": lambda p, n, cmd: p["spec"]["normalize"].update(hook=n),
    "spec.extra": lambda p, n, cmd: p["spec"].update(loader={"call": n, "args": [cmd]}),
    "payload.extra": lambda p, n, cmd: p.update(hook=n, argv=[cmd]),
    "format": lambda p, n, cmd: p.update(format=n),
}


@pytest.mark.parametrize("field", sorted(INJECTIONS))
def test_names_of_callables_in_any_field_never_run_or_import(sandbox, base_payload, field):
    cmd = f"touch {sandbox}"
    path = sandbox.parent / "evil.pt"
    for name in EVIL:
        payload = copy.deepcopy(base_payload)
        INJECTIONS[field](payload, name, cmd)
        save_raw(path, payload)
        try_everything(path)


def test_a_file_naming_a_factory_is_refused_without_the_callers_trust(sandbox, base_payload):
    path = sandbox.parent / "evil.pt"
    for name in ("os:system", "this:x", "antigravity:fly", "subprocess:getoutput", "posix:system"):
        payload = copy.deepcopy(base_payload)
        payload["spec"]["architecture"] = {"kind": "factory", "path": name, "args": {"num_classes": 10}}
        save_raw(path, payload)
        one_line_error(lambda p=path: load(p), "does not import code named by a file")
        one_line_error(lambda p=path: load(p, factory="mypkg.nets:make"), "caller trusted")
        load(path, model=fresh_lenet())  # the caller's instance: the recorded path is never touched
        load(path, factory=make_lenet)  # the caller's callable, likewise


@pytest.mark.parametrize("exploit", [Shell, GetOutput, Exec, Popen])
@pytest.mark.parametrize("where", ["state_dict", "spec", "info", "top"])
def test_pickled_objects_are_refused_and_never_run(sandbox, base_payload, exploit, where):
    payload = copy.deepcopy(base_payload)
    evil = exploit(f"touch {sandbox}")
    if where == "state_dict":
        payload["state_dict"]["net.features.0.weight"] = evil
    elif where == "spec":
        payload["spec"]["architecture"]["args"]["num_classes"] = evil
    elif where == "info":
        payload["spec"]["info"] = {"deep": [{"x": evil}]}
    else:
        payload["extra"] = evil
    path = save_raw(sandbox.parent / "evil.pt", payload)
    for call in (lambda: read_model_file(path), lambda: load(path), lambda: load(path, model=fresh_lenet())):
        one_line_error(call, "refusing to load", "could run code")


def test_a_plain_pickle_file_is_refused_and_never_run(sandbox):
    path = sandbox.parent / "evil.pkl"
    path.write_bytes(pickle.dumps({"format": "autoprune-model", "version": 2, "x": Shell(f"touch {sandbox}")}))
    one_line_error(lambda: load(path))
    path.write_bytes(pickle.dumps(Exec(f"touch {sandbox}"), protocol=0))
    one_line_error(lambda: load(path))
    path.write_bytes(pickle.dumps(Exec(f"touch {sandbox}"), protocol=4))  # the unpickler's own words, not its advice
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "Detected pickle protocol 4" warning on the way
        one_line_error(lambda: load(path), "(not a PyTorch file: Unsupported operand 149)")


# ---- damaged and hostile specs ------------------------------------------------------------------------

def _setter(*keys):
    def set_value(payload, value):
        node = payload
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return set_value


NUMERIC_FIELDS = {
    "num_classes": _setter("spec", "architecture", "args", "num_classes"),
    "in_channels": _setter("spec", "architecture", "args", "in_channels"),
    "image_size": _setter("spec", "architecture", "args", "image_size", 0),
    "out_channels": _setter("spec", "modules", "net.features.0", "out_channels"),
    "groups": _setter("spec", "modules", "net.features.3", "groups"),
    "in_features": _setter("spec", "modules", "net.classifier.1", "in_features"),
    "out_features": _setter("spec", "modules", "net.classifier.5", "out_features"),
    "spec.tensors": _setter("spec", "tensors", "net.features.0.weight", 0),
    "spec.normalize.std": _setter("spec", "normalize", "std", 0),
    "spec.normalize.mean": _setter("spec", "normalize", "mean", 0),
    "spec.dataset.num_classes": _setter("spec", "dataset", "num_classes"),
    "spec.dataset.input_shape": _setter("spec", "dataset", "input_shape", 1),
}
BAD_NUMBERS = [-1, 0, 1.5, True, False, "3", None, [3], {"v": 3}, 2**31 - 1, 10**12, 10**400, float("nan"),
               float("inf")]


@pytest.mark.parametrize("field", sorted(NUMERIC_FIELDS))
def test_bad_numbers_in_every_numeric_field_are_refused(tmp_path, base_payload, field):
    path = tmp_path / "bad.pt"
    for value in BAD_NUMBERS:
        payload = copy.deepcopy(base_payload)
        NUMERIC_FIELDS[field](payload, value)
        save_raw(path, payload)
        started = time.perf_counter()
        one_line_error(lambda: read_model_file(path), str(path), field.rpartition(".")[2])
        one_line_error(lambda: load(path, model=fresh_lenet()), str(path))
        assert time.perf_counter() - started < 1.0


def test_width_argument_checks(tmp_path, base_payload):
    path = tmp_path / "w.pt"
    for value in [-1, 0, True, "1", None, [1], 64.5, 10**12, float("nan"), float("inf")]:
        payload = copy.deepcopy(base_payload)
        payload["spec"]["architecture"]["args"]["width"] = value
        save_raw(path, payload)
        one_line_error(lambda: read_model_file(path), "width", "(0, 64]")
    payload["spec"]["architecture"]["args"]["width"] = 0.5  # valid; lenet5 takes no width, so it is not passed
    assert torch.equal(load(save_raw(path, payload)).net.classifier[5].weight, base_payload["state_dict"][
        "net.classifier.5.weight"])


CONTAINERS = {
    "spec": _setter("spec"), "spec.architecture": _setter("spec", "architecture"),
    "spec.architecture.args": _setter("spec", "architecture", "args"), "spec.normalize": _setter("spec", "normalize"),
    "spec.modules": _setter("spec", "modules"), "net.features.0": _setter("spec", "modules", "net.features.0"),
    "spec.tensors": _setter("spec", "tensors"), "spec.dataset": _setter("spec", "dataset"),
    "spec.info": _setter("spec", "info"), "state_dict": _setter("state_dict"),
    "spec.normalize.mean": _setter("spec", "normalize", "mean"),
}


@pytest.mark.parametrize("field", sorted(CONTAINERS))
def test_wrong_container_types_are_refused(tmp_path, base_payload, field):
    path = tmp_path / "c.pt"
    for value in ([], [1, 2], "x", 3, 2.5, True, (1,)):
        payload = copy.deepcopy(base_payload)
        CONTAINERS[field](payload, value)
        save_raw(path, payload)
        one_line_error(lambda: read_model_file(path), str(path))


def _fast_and_small(call, *phrases):
    """``call`` must fail quickly with one line, without a large allocation (peak RSS grows < 200 MB)."""
    _quick(lambda: one_line_error(call, *phrases))


def _quick(call):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = call()
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KiB
    return result


def test_absurd_declared_sizes_are_refused_quickly(tmp_path, base_payload):
    path = tmp_path / "huge.pt"
    payload = copy.deepcopy(base_payload)
    payload["spec"]["modules"]["net.classifier.5"] = {"type": "Linear", "in_features": 200_000,
                                                      "out_features": 200_000}
    payload["spec"]["tensors"]["net.classifier.5.weight"] = [200_000, 200_000]
    save_raw(path, payload)
    _fast_and_small(lambda: load(path), "net.classifier.5.weight", "declares shape [200000, 200000]")
    _fast_and_small(lambda: load(path, model=fresh_lenet()), "declares shape")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["modules"]["net.features.0"]["out_channels"] = 2**31 - 1
    save_raw(path, payload)
    _fast_and_small(lambda: load(path), "out_channels", "[1, 16777216]")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["architecture"]["args"]["num_classes"] = 10**12
    save_raw(path, payload)
    _fast_and_small(lambda: load(path), "num_classes", "1000000")


def test_large_but_valid_arguments_are_built_on_the_meta_device(tmp_path, base_payload, lenet_file):
    """The base network is built on the meta device and shrunk to the recorded widths: nothing large is allocated."""
    _, pruned, x = lenet_file
    load(lenet_file[0])  # the first use of the meta device imports parts of torch (~1 s, once per process)
    path = tmp_path / "big.pt"
    payload = copy.deepcopy(base_payload)
    payload["spec"]["architecture"]["args"]["num_classes"] = 1_000_000  # a 1e6 x 84 classifier before shrinking
    save_raw(path, payload)
    with torch.no_grad():
        assert torch.equal(_quick(lambda: load(path))(x), pruned(x))
    resnet, x, arch = pruned_registry_model("resnet20")
    modelfile.save_model(path, resnet, architecture={**arch, "args": {**arch["args"], "width": 64}})
    with torch.no_grad():  # ResNet-20 with 1024-4096 channel stages (~1 GB) before shrinking
        assert torch.equal(_quick(lambda: load(path))(x), resnet(x))
    payload = copy.deepcopy(base_payload)  # the recorded widths cannot grow a network: that is a mismatch
    payload["spec"]["architecture"]["args"]["num_classes"] = 5
    _fast_and_small(lambda: load(save_raw(path, payload)), "out_features=10", "has 5")


def test_declared_shapes_must_match_the_stored_tensors_and_the_widths(tmp_path, base_payload):
    path = tmp_path / "s.pt"
    payload = copy.deepcopy(base_payload)
    payload["spec"]["tensors"]["net.features.0.bias"] = [7]
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "declares shape [7]", "stored tensor is")
    payload = copy.deepcopy(base_payload)
    del payload["spec"]["tensors"]["net.features.0.bias"]
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "not declared in spec.tensors")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["tensors"]["net.extra"] = [1]
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "no such tensor")
    payload = copy.deepcopy(base_payload)
    n = payload["spec"]["modules"]["net.features.0"]["out_channels"]
    payload["spec"]["modules"]["net.features.0"]["out_channels"] = n + 1  # widths disagree with the weight
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "needs weight of shape")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["modules"]["net.features.3"]["groups"] = 4  # does not divide the channel counts
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "groups", "must divide")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["modules"]["net.features.0"]["type"] = "Conv3d"
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "Conv3d whose weight")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["modules"]["net.features.0"]["type"] = "ConvTranspose2d"
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "resizable types are")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["normalize"]["std"] = [0.0]
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "std[0]", "must be > 0")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["normalize"]["std"] = [0.25, 0.25]
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "1 means but 2 stds")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["architecture"]["name"] = "resnet1000"
    one_line_error(lambda: read_model_file(save_raw(path, payload)), "unknown architecture 'resnet1000'",
                   "may only name registered architectures: " + ", ".join(sorted(MODELS)))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_integer_weights_are_refused(tmp_path, base_payload, dtype):
    payload = copy.deepcopy(base_payload)
    w = payload["state_dict"]["net.features.0.weight"]
    payload["state_dict"]["net.features.0.weight"] = torch.zeros(w.shape, dtype=dtype)
    name = str(dtype).removeprefix("torch.")
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "q.pt", payload)), "'net.features.0.weight'",
                   f"holds {name} weights", "quantised files are not supported")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_are_refused_as_such(tmp_path, base_payload, dtype):
    payload = copy.deepcopy(base_payload)
    payload["state_dict"] = {k: v.to(dtype) if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    name = str(dtype).removeprefix("torch.")
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "h.pt", payload)), f"holds {name} (half precision) "
                   "weights", "model.float()")


def test_quantised_tensors_are_refused(tmp_path, base_payload):
    payload = copy.deepcopy(base_payload)
    w = payload["state_dict"]["net.features.0.weight"]
    payload["state_dict"]["net.features.0.weight"] = torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)
    path = tmp_path / "q.pt"
    try:
        save_raw(path, payload)
    except Exception:  # pragma: no cover - a torch build without quantised serialisation
        pytest.skip("this torch cannot save quantised tensors")
    one_line_error(lambda: read_model_file(path), str(path))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("key", ["net.features.0.weight", "net.classifier.5.bias", "normalize.std"])
def test_non_finite_tensors_are_refused(tmp_path, base_payload, bad, key):
    payload = copy.deepcopy(base_payload)
    payload["state_dict"][key].view(-1)[0] = bad
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "n.pt", payload)), repr(key),
                   "NaN or infinite", "the model diverged or the file is damaged")


def test_saving_a_diverged_model_is_refused(tmp_path):
    net = fresh_lenet()
    with torch.no_grad():
        net.features[0].weight[0, 0, 0, 0] = float("nan")
    one_line_error(lambda: modelfile.save_model(tmp_path / "m.pt", net), "cannot save model", "NaN")
    assert not (tmp_path / "m.pt").exists()
    one_line_error(lambda: modelfile.save_model(tmp_path / "m.pt", fresh_lenet(), info={"x": object()}),
                   "spec.info['x']", "plain data")


def test_other_versions_and_foreign_files(tmp_path, base_payload):
    path = tmp_path / "v.pt"
    for version in (1, 3, "2", 2.0, None):
        payload = {**base_payload, "version": version}
        save_raw(path, payload)
        one_line_error(lambda: read_model_file(path), "format version", "reads version 2")
    one_line_error(lambda: read_model_file(save_raw(path, base_payload["state_dict"])), "not an autoprune model file")
    one_line_error(lambda: read_model_file(save_raw(path, [1, 2])), "not an autoprune model file")


def test_truncated_random_and_odd_files(tmp_path, lenet_file):
    data = lenet_file[0].read_bytes()
    path = tmp_path / "cut.pt"
    for cut in (0, 1, 10, 100, len(data) // 4, len(data) // 2, len(data) - 100, len(data) - 1):
        path.write_bytes(data[:cut])
        one_line_error(lambda: read_model_file(path), str(path))
    rng = np.random.default_rng(0)
    for size in (1, 64, 4096):
        path.write_bytes(rng.bytes(size))
        one_line_error(lambda: read_model_file(path), "cannot read")
    path.write_bytes(b"PK\x03\x04" + rng.bytes(300))  # a zip header, then noise
    one_line_error(lambda: read_model_file(path), "cannot read")
    one_line_error(lambda: read_model_file(tmp_path / "missing.pt"), "does not exist")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.pt").write_bytes(data)
    one_line_error(lambda: read_model_file(tmp_path / "run"), "is a directory", "model.pt inside it")
    if Path("/dev/zero").exists():
        one_line_error(lambda: read_model_file("/dev/zero"), "not a regular file")


def test_a_torchscript_file_is_named_and_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # torch.jit is deprecated: still what such files come from
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())), str(path))
    one_line_error(lambda: load(path), "is a TorchScript file", "it holds code", "autoprune.save(path, model)",
                   "autoprune.load(path, model=YourNet())")


@pytest.mark.parametrize("path", [5, None, b"m.pt", ""])
def test_a_path_that_is_not_a_path_is_one_line(path):
    shown = f"path={path!r}: "
    one_line_error(lambda: load(path), shown)
    one_line_error(lambda: modelfile.save_model(path, fresh_lenet()), shown)


def test_deep_and_cyclic_plain_data_is_refused(tmp_path, base_payload):
    payload = copy.deepcopy(base_payload)
    deep: list = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    payload["spec"]["info"] = {"deep": deep}
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "d.pt", payload)), "nested more than 20")
    payload = copy.deepcopy(base_payload)
    cyclic: list = []
    cyclic.append(cyclic)
    payload["spec"]["info"] = {"cycle": cyclic}
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "c.pt", payload)), "nested more than 20")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["info"] = {"many": list(range(300_000))}
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "m.pt", payload)), "too large")
    payload = copy.deepcopy(base_payload)
    payload["spec"]["info"] = {"t": torch.zeros(2)}
    one_line_error(lambda: read_model_file(save_raw(tmp_path / "t.pt", payload)), "spec.info['t']", "torch.Tensor")


# ---- property: any JSON-like spec yields a model or one AutopruneError line --------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
_FIELDS = ["architecture", "normalize", "modules", "tensors", "dataset", "info"]
_MUTATIONS = st.one_of(
    st.tuples(st.just("spec"), _json),
    st.tuples(st.sampled_from(_FIELDS), _json),
    st.tuples(st.sampled_from(["arch.args", "module.width", "module.type", "tensor.shape"]),
              st.integers(-3, 2**25) | _json),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(mutations=st.lists(_MUTATIONS, min_size=1, max_size=3))
def test_random_specs_never_raise_anything_but_autoprune_errors(base_payload, mutations):
    payload = copy.deepcopy(base_payload)
    spec = payload["spec"]
    for where, value in mutations:
        if where == "spec":
            payload["spec"] = spec = value
        elif not isinstance(spec, dict):
            continue
        elif where in _FIELDS:
            spec[where] = value
        elif where == "arch.args" and isinstance(spec.get("architecture"), dict):
            spec["architecture"]["args"] = {"num_classes": value, "in_channels": 1}
        elif where == "module.width" and isinstance(spec.get("modules"), dict) and spec["modules"]:
            entry = next(iter(spec["modules"].values()))
            if isinstance(entry, dict):
                entry[sorted(entry)[0] if entry else "type"] = value
        elif where == "module.type" and isinstance(spec.get("modules"), dict):
            spec["modules"]["net.features.0"] = {"type": value, "in_channels": 1, "out_channels": 6, "groups": 1}
        elif where == "tensor.shape" and isinstance(spec.get("tensors"), dict):
            spec["tensors"]["net.features.0.bias"] = [value]
    with tempfile.TemporaryDirectory() as tmp:
        path = save_raw(Path(tmp) / "r.pt", payload)
        try:
            load(path)
        except AutopruneError as exc:
            assert "\n" not in str(exc)


def test_load_and_save_refuse_bad_devices_meta_instances_and_directories_in_one_line(tmp_path, lenet_file):
    path, pruned, _ = lenet_file
    for location, named in (("gpu", "unknown device 'gpu'"), (5, "unknown device 5"),
                            ("meta", "device 'meta' holds no values")):
        with pytest.raises(AutopruneError, match=named):
            modelfile.load(path, map_location=location)
    with pytest.raises(AutopruneError, match="model= is on the meta device; pass a fresh instance on the CPU"):
        modelfile.load(path, model=nn.Linear(2, 2).to("meta"))
    with pytest.raises(AutopruneError, match="is a directory; give a file name, e.g."):
        modelfile.save_model(tmp_path, pruned)
