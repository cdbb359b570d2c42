"""What the commands do beyond their errors: ``--config`` files, ``export``, user factories named with
``--model``, and the refusal to measure a model on data it was not trained for.

Every run is tiny (LeNet-5 on synthetic data or 40 MNIST-layout noise images, a few evaluations, no
fine-tuning); the few real processes show what an in-process call cannot (a fresh interpreter, PYTHONPATH).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import (  # noqa: F401  (no_figures, one_thread, restore_subnormals: autouse)
    assert_one_line_error,
    no_figures,
    one_thread,
    restore_subnormals,
    run_cli,
    start_cli,
    trained_base,
    write_mnist,
)

import autoprune

FAST = ["--dataset", "synthetic", "--finetune-epochs", "0", "--latency-batch", "2", "--latency-repeats", "2",
        "--threads", "1", "--quiet"]

CONFIG = """\
method: pso
macs_reduction: 0.6
budget: 9
seed: 5
finetune-epochs: 0
latency_batch: 2
latency_repeats: 2
threads: 1
quiet: true
method_options:
  particles: 4
  iterations: 50
"""


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    """`prune --config run.yaml` with some settings overridden on the command line."""
    base = trained_base(tmp_path_factory)
    d = tmp_path_factory.mktemp("config")
    (d / "run.yaml").write_text(CONFIG, encoding="utf-8")
    out = d / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        code = autoprune.cli.main(["prune", str(base), "--config", "run.yaml", "--dataset", "synthetic",
                                   "--budget", "4", "--macs-reduction", "0.5", "--method-option", "particles=2",
                                   "--out", str(out)])
    assert code == 0
    return out


# ---- --config ------------------------------------------------------------------------------------------------

def test_config_file_values_apply_and_flags_override_them(configured):
    config = report(configured)["config"]
    assert config["method"] == "pso" and config["seed"] == 5  # from the file
    assert config["finetune"]["epochs"] == 0 and config["latency_batch"] == 2 and config["threads"] == 1
    assert config["target"] == {"macs_reduction": 0.5}  # the flag, not the file's 0.6
    assert config["budget"] == 4 and report(configured)["search"]["evaluations"] == 4
    saved = json.loads((configured / "run.json").read_text(encoding="utf-8"))["config"]
    assert saved == config  # what --resume reads back


def test_config_method_options_merge_with_the_flags(configured):
    options = report(configured)["config"]["method_options"]
    assert options["particles"] == 2  # the flag wins, converted to the declared int
    assert options["iterations"] == 50  # the file's other option is kept
    assert options == {**autoprune.methods.PSO().options, "particles": 2, "iterations": 50}


def test_config_defaults_do_not_leak_into_the_next_command(tmp_path, configured, capsys):
    code, stdout, _ = run_cli(["methods", "--json"], capsys)
    assert code == 0
    pso = next(m for m in json.loads(stdout) if m["name"] == "pso")
    assert pso["options"]["particles"] == 10 and pso["options"]["iterations"] == 100


# ---- export ----------------------------------------------------------------------------------------------

def test_export_writes_an_onnx_file_that_computes_what_the_pruned_model_computes(configured, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "pruned.onnx"
    code, stdout, err = run_cli(["export", configured / "model.pt", "--onnx", onnx_path], capsys)
    assert code == 0, err
    assert stdout.startswith(f"wrote {onnx_path} (opset ") and "checked in onnxruntime (max difference" in stdout
    model = autoprune.load(configured / "model.pt")
    x = torch.rand(3, 1, 28, 28)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == (3, 10)  # the batch dimension is dynamic
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    widths = {w["name"]: w["after"] for w in report(configured)["widths"]}
    assert model.net.features[3].out_channels == widths["net.features.3"] < 16  # the pruned model was exported


# ---- a user's factory: --model pkg.mod:factory ------------------------------------------------------------------

NETS = '''\
import os
import sys
from pathlib import Path

from torch import nn

Path(__file__).with_name("IMPORTED").write_text("imported")


def tiny(num_classes=10, in_channels=1, image_size=(28, 28)):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, num_classes))


def flaky(num_classes=10, in_channels=1, image_size=(28, 28)):
    if os.environ.get("AUTOPRUNE_TEST_FACTORY_EXIT"):
        sys.exit(3)
    return tiny(num_classes, in_channels, image_size)
'''
FACTORY = "userpkg_cli_tests.nets:tiny"


@pytest.fixture(scope="module")
def user_package(tmp_path_factory):
    """A package written into a temporary directory (the directory goes on PYTHONPATH / sys.path)."""
    root = tmp_path_factory.mktemp("pythonpath")
    (root / "userpkg_cli_tests").mkdir()
    (root / "userpkg_cli_tests" / "__init__.py").write_text("")
    (root / "userpkg_cli_tests" / "nets.py").write_text(NETS)
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))


@pytest.fixture(scope="module")
def factory_models(user_package, tmp_path_factory):
    """A model trained from the user's factory, and its pruned version (both files record the factory)."""
    d = tmp_path_factory.mktemp("factory")
    base, pruned = d / "tiny.pt", d / "pruned"
    assert autoprune.cli.main(["train", "--model", FACTORY, "--dataset", "synthetic", "--epochs", "1",
                               "--batch-size", "16", "--out", str(base), "--quiet"]) == 0
    assert autoprune.cli.main(["prune", str(base), "--model", FACTORY, "--method", "l1", "--macs-reduction", "0.5",
                               "--budget", "3", "--out", str(pruned), *FAST]) == 0
    return base, pruned / "model.pt"


def test_a_factory_built_model_file_needs_model_to_name_the_factory(factory_models, tmp_path, capsys):
    base, _ = factory_models
    assert torch.load(base, weights_only=True)["spec"]["architecture"]["path"] == FACTORY
    code, stdout, err = run_cli(["prune", base, "--method", "l1", "--macs-reduction", "0.5", "--out",
                                 tmp_path / "refused", *FAST], capsys)
    assert code == 1 and stdout == ""
    assert_one_line_error(err, f"was built by the user factory {FACTORY!r}; autoprune does not import code named by "
                               f"a file — pass --model {FACTORY}")
    assert not (tmp_path / "refused" / "run.json").exists()


def test_a_pruned_factory_model_keeps_the_factory_and_loads_with_it(factory_models, tmp_path, capsys):
    base, pruned = factory_models
    spec = torch.load(pruned, weights_only=True)["spec"]
    assert spec["architecture"] == {"kind": "factory", "path": FACTORY,
                                    "args": torch.load(base, weights_only=True)["spec"]["architecture"]["args"]}
    with pytest.raises(autoprune.AutopruneError, match="was built by the user factory"):
        autoprune.load(pruned)
    model = autoprune.load(pruned, factory=FACTORY)
    assert model.net[3].out_channels < 12 and model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    code, stdout, err = run_cli(["eval", pruned, "--model", FACTORY, "--dataset", "synthetic", "--json",
                                 "--latency-batch", "2", "--quiet"], capsys)
    assert code == 0, err
    measured = json.loads(stdout)
    assert measured["architecture"]["path"] == FACTORY and measured["macs"] < report(pruned.parent)["base"]["macs"]
    code, stdout, err = run_cli(["export", pruned, "--model", FACTORY, "--onnx", tmp_path / "tiny.onnx"], capsys)
    assert code == 0 and (tmp_path / "tiny.onnx").stat().st_size > 0, err


def test_a_factory_that_calls_sys_exit_while_loading_is_one_clear_line(factory_models, tmp_path, capsys,
                                                                       monkeypatch):
    base, _ = factory_models
    flaky = "userpkg_cli_tests.nets:flaky"
    payload = torch.load(base, weights_only=True)
    payload["spec"]["architecture"]["path"] = flaky  # the same network, built by a factory that may exit
    torch.save(payload, tmp_path / "flaky.pt")
    monkeypatch.setenv("AUTOPRUNE_TEST_FACTORY_EXIT", "1")
    for argv in (["eval", tmp_path / "flaky.pt", "--dataset", "synthetic", "--quiet"],
                 ["prune", tmp_path / "flaky.pt", "--macs-reduction", "0.5", "--out", tmp_path / "o", *FAST]):
        code, stdout, err = run_cli([*argv, "--model", flaky], capsys)  # a SystemExit(3) would escape as code 3
        assert code == 1 and stdout == ""
        assert_one_line_error(err, f"model factory {flaky!r} called sys.exit(3) while building the model")
    monkeypatch.delenv("AUTOPRUNE_TEST_FACTORY_EXIT")
    code, _, err = run_cli(["eval", tmp_path / "flaky.pt", "--model", flaky, "--dataset", "synthetic", "--quiet",
                            "--latency-batch", "2"], capsys)
    assert code == 0, err


def test_in_a_fresh_process_the_file_alone_imports_nothing_and_model_on_pythonpath_works(factory_models,
                                                                                         user_package, tmp_path):
    _, pruned = factory_models
    marker = user_package / "userpkg_cli_tests" / "IMPORTED"
    marker.unlink(missing_ok=True)
    env = {"PYTHONPATH": str(user_package)}
    common = ["eval", pruned, "--dataset", "synthetic", "--json", "--latency-batch", "2", "--quiet"]
    refused = start_cli(*common, cwd=tmp_path, env=env)
    code, out, err = refused.wait(timeout=300), *refused.communicate()
    assert code == 1 and out == "", err
    assert_one_line_error(err, f"pass --model {FACTORY}")
    assert not marker.exists(), "the module named by the file was imported without --model"
    trusted = start_cli(*common, "--model", FACTORY, cwd=tmp_path, env=env)
    code, out, err = trusted.wait(timeout=300), *trusted.communicate()
    assert code == 0, err
    assert json.loads(out)["architecture"]["path"] == FACTORY and marker.exists()


# ---- the data a model was trained on ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_model(tmp_path_factory):
    """LeNet-5 trained (one epoch) on MNIST-layout files, and a Fashion-MNIST directory of the same shape."""
    d = tmp_path_factory.mktemp("idx")
    mnist, fashion = write_mnist(d / "mnist", 40, 20), write_mnist(d / "fashion", 40, 20)
    model = d / "mnist.pt"
    assert autoprune.cli.main(["train", "--model", "lenet5", "--dataset", "mnist", "--data-dir", str(mnist),
                               "--epochs", "1", "--batch-size", "8", "--out", str(model), "--quiet"]) == 0
    return model, fashion


def test_eval_on_another_dataset_is_refused_naming_the_training_dataset(mnist_model, capsys):
    model, fashion = mnist_model
    code, stdout, err = run_cli(["eval", model, "--dataset", "fashion-mnist", "--data-dir", fashion, "--quiet"],
                                capsys)
    assert code == 1 and stdout == ""
    assert_one_line_error(err, "was trained on 'mnist', not 'fashion-mnist' (other classes); pass --dataset mnist "
                               "(or --allow-other-dataset")


def test_eval_on_another_dataset_works_when_allowed(mnist_model, capsys, caplog):
    model, fashion = mnist_model
    code, stdout, err = run_cli(["eval", model, "--dataset", "fashion-mnist", "--data-dir", fashion, "--json",
                                 "--allow-other-dataset", "--latency-batch", "2", "--quiet"], capsys)
    assert code == 0, err
    measured = json.loads(stdout)
    assert measured["dataset"] == "fashion-mnist" and measured["test_samples"] == 20
    assert "was trained on 'mnist', not 'fashion-mnist' (other classes); measuring anyway" in caplog.text


def test_latency_is_measured_at_batch_64_unless_told_otherwise():
    from autoprune.cli import build_parser

    parser = build_parser()
    for argv in (["prune", "m.pt"], ["compare", "m.pt"], ["eval", "m.pt", "--dataset", "mnist"]):
        assert parser.parse_args(argv).latency_batch == 64
    assert parser.parse_args(["prune", "m.pt", "--latency-batch", "8"]).latency_batch == 8
