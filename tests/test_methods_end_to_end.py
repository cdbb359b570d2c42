"""Every method, end to end through :func:`autoprune.prune`, on LeNet-5 and small VGG / ResNet models with tiny
synthetic data.

Each run must reach the requested MACs reduction, save a loadable model whose counted MACs and params match
the result and the analytic cost model, record its search in ``history.jsonl`` and write ``report.json`` as
the result's JSON form.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import (  # noqa: F401  (autouse: report.html without its figures, which test_compare draws; one thread)
    no_figures,
    one_thread,
    restore_subnormals,
)

import autoprune
from autoprune.data import BatchLoader, synthetic_dataset
from autoprune.engine.measure import cost_of
from autoprune.engine.result import PruneResult
from autoprune.engine.space import PruningSpace
from autoprune.engine.train import TrainConfig, fit
from autoprune.errors import AutopruneError
from autoprune.methods import method_names
from autoprune.models import NormalizedModel, create_model

REDUCTION = 0.5
# name, input channels, image size, model arguments, training epochs (enough to be well above chance)
ARCHITECTURES = (("lenet5", 1, (28, 28), {}, 4), ("vgg11", 3, (32, 32), {"width": 0.125}, 2),
                 ("resnet20", 3, (32, 32), {"width": 0.25}, 6))


def fresh(arch: str, mean: float = 0.5, std: float = 0.25) -> NormalizedModel:
    """An untrained model of ``arch`` (also what ``autoprune.load(path, model=...)`` takes)."""
    _, channels, size, kwargs, _ = next(a for a in ARCHITECTURES if a[0] == arch)
    net = create_model(arch, num_classes=10, in_channels=channels, image_size=size, **kwargs)
    return NormalizedModel(net, [mean] * channels, [std] * channels)


class _Trained(dict):
    """One briefly trained model per architecture with its loaders, trained on first use (so that a run
    without the slow tests trains LeNet-5 only)."""

    def __missing__(self, arch: str):
        _, channels, size, _, epochs = next(a for a in ARCHITECTURES if a[0] == arch)
        splits = synthetic_dataset(num_classes=10, in_channels=channels, image_size=size, n_train=160, n_test=60,
                                   seed=1)
        loaders = {"train_loader": BatchLoader(splits.train, 16, shuffle=True, seed=1),
                   "val_loader": BatchLoader(splits.val, 100), "test_loader": BatchLoader(splits.test, 100)}
        torch.manual_seed(0)
        model = NormalizedModel(fresh(arch).net, splits.info.mean, splits.info.std)
        fit(model, loaders["train_loader"], TrainConfig(epochs=epochs, batch_size=16, lr=0.05), progress=False)
        self[arch] = (model.eval(), torch.rand(1, channels, *size), loaders)
        return self[arch]


@pytest.fixture(scope="module")
def trained():
    """Model, example input and loaders per architecture (see _Trained)."""
    return _Trained()


def run(trained, arch, method, tmp_path, **overrides) -> tuple[PruneResult, object]:
    model, example, loaders = trained[arch]
    settings = {"macs_reduction": REDUCTION, "budget": 8, "calibration_samples": 64,
                "finetune": TrainConfig(epochs=1, batch_size=16, lr=0.02), "latency_batch": 4, "latency_repeats": 2}
    out = tmp_path / f"{arch}-{method}"
    return autoprune.prune(model, example, method=method, **loaders, out=out, **{**settings, **overrides}), out


@pytest.mark.parametrize("arch", ["lenet5", pytest.param("vgg11", marks=pytest.mark.slow),
                                  pytest.param("resnet20", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", method_names())
def test_method_reaches_target_and_saves_a_loadable_model(trained, arch, method, tmp_path):
    if method == "slim" and arch == "lenet5":
        with pytest.raises(AutopruneError, match="needs a BatchNorm"):
            run(trained, arch, method, tmp_path)
        return
    model, example, _ = trained[arch]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result, out = run(trained, arch, method, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    assert result.reduction["macs"] >= REDUCTION - 1e-9
    assert result.analytic_cost_matches
    space = PruningSpace(model, example)
    assert space.cost(np.asarray(result.keep)) == cost_of(result.model, example)  # analytic == counted
    loaded = autoprune.load(out / "model.pt", model=fresh(arch))
    counted = cost_of(loaded, example)
    assert (counted.macs, counted.params) == (result.pruned.macs, result.pruned.params)
    x = torch.rand(2, *example.shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model.eval()(x))
    assert [w.after for w in result.widths] == list(space.counts(np.asarray(result.keep)))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert 1 <= len(history) <= 8 and result.search.evaluations == len(history)
    assert [row["i"] for row in history] == list(range(len(history)))
    for row in history:  # every row's costs are the analytic cost of its channel counts
        cost = space.cost(np.asarray(row["counts"]) / space.channels)
        assert (row["macs"], row["params"]) == (cost.macs, cost.params)
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(result.to_json()))  # report.json is the result's JSON form
    assert PruneResult.from_json(report).to_json() == report
    assert not (out / "work").exists()  # scratch removed once the run completed


def test_max_drop_mode_stays_within_the_drop_on_validation(trained, tmp_path):
    result, _ = run(trained, "lenet5", "global", tmp_path, macs_reduction=None, max_drop=2.0)
    assert result.target.mode == "drop"
    assert result.search.base_score - result.search.best.accuracy <= 0.02 + 1e-9
    assert result.reduction["macs"] > 0


def test_unreachable_reduction_is_refused_before_any_search(trained, tmp_path):
    with pytest.raises(AutopruneError, match="unreachable"):
        run(trained, "lenet5", "pso", tmp_path, macs_reduction=0.999)
    assert not (tmp_path / "lenet5-pso" / "history.jsonl").exists()
    assert not (tmp_path / "lenet5-pso" / "run.json").exists()
