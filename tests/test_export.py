"""ONNX export: tiny CNNs (plain, residual, depthwise-separable, two-input, Torch-Pruning-pruned) run in
onnxruntime at batch 1 and 5 like in PyTorch; the caller's model is untouched; failures are one-line
AutopruneErrors that leave no file behind; missing packages give the install hint."""

from __future__ import annotations

import copy
import logging
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import small_model
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.export import DEFAULT_OPSET, ExportReport, export_onnx


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics and affine weights, so that folding mistakes show."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model


def plain_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


class ResidualNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = torch.relu(self.down(x) + self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def depthwise_separable() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )


class TwoInput(nn.Module):
    """An image and a feature vector (different ranks), fused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.meta = nn.Linear(5, 6)
        self.head = nn.Linear(12, 4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        image = torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(a)), 1), 1)
        return self.head(torch.cat([image, torch.tanh(self.meta(b))], dim=1))


def pruned_residual() -> nn.Module:
    """A ResidualNet physically pruned with Torch-Pruning: conv1's channels 0 and 1 (and everything coupled)."""
    import torch_pruning as tp

    model = _randomise_bn(ResidualNet()).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(1, 3, 16, 16))
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    assert model.conv1.out_channels == 6 and model.conv2.out_channels == 6  # coupled through the skip
    return model


def registry_resnet() -> nn.Module:
    return small_model("resnet20")[0]


SINGLE_INPUT = {
    "plain": (plain_cnn, (3, 16, 16)),
    "residual": (ResidualNet, (3, 16, 16)),
    "depthwise": (depthwise_separable, (3, 16, 16)),
    "pruned": (pruned_residual, (3, 16, 16)),
    "registry_resnet20": (registry_resnet, (3, 32, 32)),
}


@pytest.fixture
def ort():
    return pytest.importorskip("onnxruntime")


@pytest.fixture
def onnx():
    return pytest.importorskip("onnx")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor], training: bool) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    assert model.training is training
    assert all(m.training is training for m in model.modules())


def _run_ort(ort, path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def _one_line_error(excinfo: pytest.ExceptionInfo[AutopruneError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and 0 < len(message) < 600
    return message


@pytest.mark.parametrize("kind", sorted(SINGLE_INPUT))
def test_export_runs_in_onnxruntime_at_other_batch_sizes_and_leaves_model_untouched(tmp_path, onnx, ort, kind):
    factory, shape = SINGLE_INPUT[kind]
    torch.manual_seed(0)
    model = _randomise_bn(factory())
    model.train()  # the export must not flip the caller's mode or update BN statistics
    before = _state(model)
    path = tmp_path / "sub" / "model.onnx"

    report = export_onnx(model, torch.rand(2, *shape), path)

    _assert_unchanged(model, before, training=True)
    assert isinstance(report, ExportReport)
    assert report.path == path and path.is_file() and report.size_bytes == path.stat().st_size > 0
    assert (report.input_names, report.output_names) == (("input",), ("output",))
    assert report.opset == DEFAULT_OPSET
    assert report.verified and report.max_abs_diff is not None and report.max_abs_diff < 1e-4
    assert report.seconds > 0
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary file left behind
    graph_input = onnx.load(str(path)).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"

    model.eval()
    for batch in (1, 5):
        x = torch.rand(batch, *shape)
        (got,) = _run_ort(ort, path, {"input": x.numpy()})
        with torch.no_grad():
            want = model(x).numpy()
        assert got.shape == want.shape == (batch, want.shape[1])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_two_input_model_gets_numbered_names_and_a_dynamic_batch(tmp_path, ort):
    torch.manual_seed(0)
    model = TwoInput().eval()
    before = _state(model)
    path = tmp_path / "two.onnx"

    report = export_onnx(model, (torch.rand(2, 3, 8, 8), torch.rand(2, 5)), path)

    _assert_unchanged(model, before, training=False)
    assert report.input_names == ("input_0", "input_1") and report.output_names == ("output",)
    assert report.verified
    for batch in (1, 5):
        a, b = torch.rand(batch, 3, 8, 8), torch.rand(batch, 5)
        (got,) = _run_ort(ort, path, {"input_0": a.numpy(), "input_1": b.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, model(a, b).numpy(), rtol=1e-3, atol=1e-4)


def test_custom_names_and_several_outputs(tmp_path, ort):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = plain_cnn()

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.body(x)
            return logits, torch.softmax(logits, dim=1)

    model = TwoHeads().eval()
    path = tmp_path / "heads.onnx"
    report = export_onnx(model, torch.rand(3, 3, 16, 16), path, input_names=["image"],
                         output_names=["logits", "probs"])
    assert (report.input_names, report.output_names) == (("image",), ("logits", "probs"))
    x = torch.rand(5, 3, 16, 16)
    logits, probs = _run_ort(ort, path, {"image": x.numpy()})
    with torch.no_grad():
        want_logits, want_probs = model(x)
    np.testing.assert_allclose(logits, want_logits.numpy(), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_export_is_silent_and_deterministic(tmp_path, capfd, onnx):
    model = _randomise_bn(ResidualNet()).eval()
    x = torch.rand(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning leaking out of the exporter fails the test
        export_onnx(model, x, tmp_path / "a.onnx")
        export_onnx(model, x, tmp_path / "b.onnx")
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert torch._C._jit_is_onnx_log_enabled() is False  # the exporter's C++ log switch is restored


def test_fixed_batch_when_dynamic_batch_is_off(tmp_path, onnx, ort):
    path = tmp_path / "fixed.onnx"
    report = export_onnx(plain_cnn().eval(), torch.rand(2, 3, 16, 16), path, dynamic_batch=False)
    assert report.verified
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _run_ort(ort, path, {"input": np.random.rand(5, 3, 16, 16).astype(np.float32)})


def test_unwritable_destination_gives_one_line_error_and_no_file(tmp_path, onnx):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    path = blocker / "model.onnx"
    with pytest.raises(AutopruneError) as excinfo:
        export_onnx(plain_cnn(), torch.rand(2, 3, 16, 16), path)
    message = _one_line_error(excinfo)
    assert message.startswith("cannot write the ONNX file of Sequential") and str(path) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_float64_model_that_onnxruntime_cannot_run_is_told_to_export_float32(tmp_path, onnx, ort):
    path = tmp_path / "f64.onnx"
    with pytest.raises(AutopruneError) as excinfo:
        export_onnx(plain_cnn().double(), torch.rand(2, 3, 16, 16, dtype=torch.float64), path)
    assert "export model.float() with float32 inputs" in _one_line_error(excinfo)
    assert not path.exists()
    assert export_onnx(plain_cnn().double().float(), torch.rand(2, 3, 16, 16), path).verified


def test_directory_as_destination_is_refused(tmp_path, onnx):
    with pytest.raises(AutopruneError, match="is a directory") as excinfo:
        export_onnx(plain_cnn(), torch.rand(2, 3, 16, 16), tmp_path)
    _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


class CumMax(nn.Module):
    """``torch.cummax`` has no ONNX mapping in the TorchScript exporter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.conv(x), dim=1).values


class ValueThroughPython(nn.Module):
    """The output's value leaves the graph through ``.item()``: the traced file ignores its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[x.mean().item()]])


class LoopOverBatch(nn.Module):
    """A Python loop over the samples: tracing unrolls it for the example batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.conv(sample[None])[0] for sample in x])


def test_operator_without_onnx_mapping_gives_one_line_error(tmp_path, capfd, onnx):
    path = tmp_path / "m.onnx"
    with pytest.raises(AutopruneError) as excinfo:
        export_onnx(CumMax(), torch.rand(2, 3, 8, 8), path, verify=False)
    message = _one_line_error(excinfo)
    assert message.startswith("cannot export CumMax to ONNX") and "aten::cummax" in message
    assert "replace that operation" in message
    assert list(tmp_path.iterdir()) == []
    assert "graph(" not in capfd.readouterr().err  # the exporter's graph dump is kept off the console
    assert torch._C._jit_is_onnx_log_enabled() is False


def test_values_routed_through_python_are_refused_even_without_verification(tmp_path, onnx):
    with pytest.raises(AutopruneError, match=r"does not use input\(s\) \['input'\]") as excinfo:
        export_onnx(ValueThroughPython(), torch.rand(2, 3, 8, 8), tmp_path / "m.onnx", verify=False)
    assert ".item()" in _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_verification_catches_a_trace_frozen_at_the_example_batch(tmp_path, ort, caplog):
    path = tmp_path / "m.onnx"
    with caplog.at_level(logging.WARNING, logger="autoprune.export"), pytest.raises(AutopruneError) as excinfo:
        export_onnx(LoopOverBatch(), torch.rand(2, 3, 8, 8), path)
    message = _one_line_error(excinfo)
    assert "LoopOverBatch" in message and "batch 1" in message and "dynamic_batch=False" in message
    assert not path.exists() and list(tmp_path.iterdir()) == []  # a file that failed verification is not kept
    assert any("Iterating over a tensor" in r.getMessage() for r in caplog.records)  # the tracer's hint is logged
    # Without verification the same (wrong for other batch sizes) file is written: the check is what stops it.
    assert not export_onnx(LoopOverBatch(), torch.rand(2, 3, 8, 8), path, verify=False).verified
    assert path.is_file()


def test_shape_asserts_are_logged_not_refused(tmp_path, ort, caplog):
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = plain_cnn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[1] == 3, "expects RGB"
            return self.body(x)

    with caplog.at_level(logging.WARNING, logger="autoprune.export"):
        report = export_onnx(Checked().eval(), torch.rand(2, 3, 16, 16), tmp_path / "m.onnx")
    assert report.verified
    assert [r.levelno for r in caplog.records if "Python boolean" in r.getMessage()] == [logging.WARNING]


def test_missing_onnxruntime_gives_install_hint_unless_verify_is_off(tmp_path, monkeypatch, onnx):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    path = tmp_path / "m.onnx"
    with pytest.raises(AutopruneError) as excinfo:
        export_onnx(plain_cnn(), torch.rand(2, 3, 16, 16), path)
    message = _one_line_error(excinfo)
    assert "'onnxruntime'" in message and "pip install" in message and "autoprune[onnx]" in message
    assert "verify=False" in message
    assert not path.exists()

    report = export_onnx(plain_cnn(), torch.rand(2, 3, 16, 16), path, verify=False)
    assert path.is_file() and not report.verified and report.max_abs_diff is None


def test_missing_onnx_gives_install_hint_even_without_verification(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(AutopruneError) as excinfo:
        export_onnx(plain_cnn(), torch.rand(2, 3, 16, 16), tmp_path / "m.onnx", verify=False)
    message = _one_line_error(excinfo)
    assert "'onnx'" in message and "pip install onnx" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("inputs", "kwargs", "match"), [
    ((torch.rand(2, 3, 8, 8), torch.rand(3, 5)), {}, "share one non-zero batch size"),
    ([], {}, "tensor or a non-empty tuple"),
    (torch.rand(2, 3, 8, 8), {"output_names": ["a", "b"]}, "output_names"),
    (torch.rand(2, 3, 8, 8), {"input_names": ["x"], "output_names": ["x"]}, "must all differ"),
    (torch.rand(2, 3, 8, 8), {"opset": 99}, "opset=99"),
    (torch.rand(2, 3, 8, 8), {"atol": -1.0}, "tolerances"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, onnx, inputs, kwargs, match):
    model = TwoInput() if isinstance(inputs, tuple) else nn.Conv2d(3, 4, 3)
    with pytest.raises(AutopruneError, match=match) as excinfo:
        export_onnx(model, inputs, tmp_path / "m.onnx", **kwargs)
    _one_line_error(excinfo)
    assert list(tmp_path.iterdir()) == []


def test_tolerance_is_enforced(tmp_path, ort):
    """With a tolerance below float32 rounding the comparison must fail: proof that it compares at all."""
    model = _randomise_bn(depthwise_separable()).eval()
    with torch.no_grad():
        model[-1].weight.mul_(1e4)  # large outputs: float32 differences of order 1e-3
    x = torch.rand(4, 3, 16, 16)
    report = export_onnx(copy.deepcopy(model), x, tmp_path / "ok.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff > 0
    with pytest.raises(AutopruneError, match="differs from PyTorch") as excinfo:
        export_onnx(model, x, tmp_path / "strict.onnx", rtol=0.0,
                    atol=report.max_abs_diff / 1e6)
    _one_line_error(excinfo)
    assert not (tmp_path / "strict.onnx").exists()
