"""Every method, end to end, on LeNet-5 and small VGG / ResNet models with tiny synthetic data.

Each run must reach the requested MACs reduction, write a loadable model whose counted MACs and
params match the report and the analytic cost model, and record its search in history.jsonl.
"""

from __future__ import annotations

import json

import pytest
import torch

import autoprune
from autoprune.data import synthetic_dataset
from autoprune.engine.measure import cost_of
from autoprune.engine.train import TrainConfig, fit
from autoprune.errors import AutopruneError
from autoprune.methods import method_names
from autoprune.runs.pipeline import PruneConfig, build_model, prune_model

REDUCTION = 0.5


@pytest.fixture(scope="module")
def trained():
    """One briefly trained model per architecture, with its data and spec."""
    out = {}
    for name, channels, size, kwargs in (("lenet5", 1, (28, 28), {}), ("vgg11", 3, (32, 32), {"width": 0.125}),
                                         ("resnet20", 3, (32, 32), {"width": 0.25})):
        splits = synthetic_dataset(num_classes=10, in_channels=channels, image_size=size, n_train=160, n_test=60,
                                   seed=1)
        model, spec = build_model(name, splits, **kwargs)
        fit(model, splits.train, TrainConfig(epochs=1, batch_size=32, lr=0.02), progress=False)
        out[name] = (model, spec, splits)
    return out


def run(trained, arch, method, tmp_path, **overrides):
    model, spec, splits = trained[arch]
    settings = {"macs_reduction": REDUCTION, "budget": 8, "extra_epochs": 1, "calibration_samples": 64,
                "finetune": TrainConfig(epochs=1, batch_size=32, lr=0.01), "latency_batch": 4, "latency_repeats": 2}
    config = PruneConfig(method=method, **{**settings, **overrides})
    out = tmp_path / f"{arch}-{method}"
    out.mkdir()
    return prune_model(model, spec, splits, config, out, device=torch.device("cpu"), progress=False), out


@pytest.mark.parametrize("arch", ["lenet5", "vgg11", "resnet20"])
@pytest.mark.parametrize("method", method_names())
def test_method_reaches_target_and_saves_a_loadable_model(trained, arch, method, tmp_path):
    if method == "slim" and arch == "lenet5":
        with pytest.raises(AutopruneError, match="needs a BatchNorm"):
            run(trained, arch, method, tmp_path)
        return
    report, out = run(trained, arch, method, tmp_path)
    assert report["reduction"]["macs"] >= REDUCTION - 1e-9
    assert report["analytic_cost_matches"]
    loaded = autoprune.load(out / "model.pt")
    _, _, splits = trained[arch]
    shape = (splits.info.in_channels, *splits.info.image_size)
    counted = cost_of(loaded, shape)
    assert (counted.macs, counted.params) == (report["pruned"]["macs"], report["pruned"]["params"])
    assert loaded(torch.rand(2, *shape)).shape == (2, 10)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert 1 <= len(history) <= 8 and report["search"]["evaluations"] == len(history)
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in history)
    assert {"method", "base", "pruned", "layers", "seed", "config", "search"} <= set(report)
    assert report["search"]["seconds"] >= 0 and "best_fitness" in report["search"]
    assert not (out / "work").exists()  # scratch removed once the run completed


def test_max_drop_mode_stays_within_the_drop_on_validation(trained, tmp_path):
    report, _ = run(trained, "lenet5", "global", tmp_path, macs_reduction=None, max_drop=2.0)
    base_val = report["search"]["base_val_accuracy"]
    assert base_val - report["search"]["best_fitness"]["accuracy"] <= 0.02 + 1e-9


def test_unreachable_reduction_is_refused_before_any_search(trained, tmp_path):
    with pytest.raises(AutopruneError, match="unreachable"):
        run(trained, "lenet5", "pso", tmp_path, macs_reduction=0.999)
    assert not (tmp_path / "lenet5-pso" / "history.jsonl").exists()
