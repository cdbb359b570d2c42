"""latency_reduction: searched with the latency table, checked by measurement, shrunk while it misses.

Timing is replaced by a deterministic fake (a block's "latency" is its parameter count), so these tests check
the logic, not this machine's speed: the real protocol has its own tests (test_latency.py) and benchmarks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
from autoprune.engine import latency_target
from autoprune.engine import prune as engine_prune
from autoprune.engine.latency import Speedup
from autoprune.engine.latency_table import LatencyTable, TableOptions
from autoprune.errors import AutopruneError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


def params(module: nn.Module) -> float:
    return float(sum(p.numel() for p in module.parameters()))


def fake_measure(modules, inputs):
    """Every module's 'latency' is its parameter count (x 1e-3 ms), in every round."""
    return [[params(m) * 1e-3] * 3 for m in modules]


@pytest.fixture
def fake_timing(monkeypatch):
    """The table is built from parameter counts; a measured speed-up is the parameter ratio times ``factor``,
    at most ``cap``."""
    state = {"factor": 1.0, "cap": float("inf"), "calls": 0}

    def table(base, example, space, *, device, batch_size, threads, progress):
        return LatencyTable.build(base, example, space, device=device, batch_size=2, threads=1,
                                  options=TableOptions(calibrate=()), measure=fake_measure, progress=False)

    def speedup(base, pruned, example, *, device, batch_size, threads):
        state["calls"] += 1
        ratio = min(params(base) / params(pruned) * state["factor"], state["cap"])
        return Speedup(ratio, ratio * 0.99, ratio * 1.01, 20, (ratio * 0.98, ratio * 1.02))

    monkeypatch.setattr(latency_target, "latency_table", table)
    monkeypatch.setattr(engine_prune, "latency_table", table)
    monkeypatch.setattr(latency_target, "_speedup", speedup)
    return state


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    x = torch.rand(240, 3, 8, 8)
    y = x.mean((2, 3)).argmax(1)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True)
    for _ in range(8):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model, loader, DataLoader(TensorDataset(x[192:], y[192:]), batch_size=48)


def run(trained, **kwargs):
    model, train, val = trained
    options = {"method": "pso", "method_options": {"particles": 4, "iterations": 3}, "train_loader": train,
               "val_loader": val, "finetune": None, "latency_repeats": 3, **kwargs}
    return autoprune.prune(model, torch.rand(1, 3, 8, 8), **options)


def test_the_search_meets_the_predicted_latency_and_records_it(trained, fake_timing):
    result = run(trained, latency_reduction=0.5)
    assert result.history and all(row.latency_ms is not None for row in result.history)
    assert result.search.notes["latency_predicted_relative"] <= 0.5 + 1e-9
    assert result.search.notes["latency_check_speedup"]["ratio"] >= 2.0
    assert result.search.notes["latency_repairs"] == 0
    assert fake_timing["calls"] == 1  # measured once: it met the target


def test_a_measured_miss_prunes_further_until_the_target_is_met(trained, fake_timing):
    fake_timing["factor"] = 0.8  # the machine runs the pruned model 20% slower than the table predicts
    result = run(trained, latency_reduction=0.5)
    assert result.search.notes["latency_repairs"] >= 1
    assert result.search.notes["latency_check_speedup"]["ratio"] >= 2.0
    assert result.search.notes["latency_predicted_relative"] < 0.5  # shrunk below what the table asked
    assert any("short of the 2.00x asked" in w for w in result.warnings)


def test_a_target_that_measurement_never_meets_fails_in_one_line(trained, fake_timing):
    fake_timing["cap"] = 1.5  # e.g. a device bound by per-call overhead: never more than 1.5x faster
    with pytest.raises(AutopruneError, match=r"measures only .*faster at batch .* after 3 rounds") as info:
        run(trained, latency_reduction=0.5)
    assert "\n" not in str(info.value)


def test_latency_and_macs_targets_together_are_both_met(trained, fake_timing):
    result = run(trained, latency_reduction=0.3, macs_reduction=0.6)
    assert result.reduction["macs"] >= 0.6 - 1e-9
    assert result.search.notes["latency_check_speedup"]["ratio"] >= 1 / 0.7


def test_an_unreachable_latency_target_fails_before_the_search(trained, fake_timing):
    with pytest.raises(AutopruneError, match="latency_reduction=0.9 is unreachable"):
        run(trained, latency_reduction=0.9, min_ratio=0.5)


def test_search_cost_is_the_largest_target_ratio():
    class Table:
        def predict_relative(self, keep):
            return float(np.mean(keep))

    model = Net()
    space = autoprune.PruningSpace(model, torch.rand(1, 3, 8, 8))
    target = autoprune.Target(macs_reduction=0.5, latency_reduction=0.2)
    cost, ceiling = latency_target.search_cost(space, target, Table())
    keep = np.full(len(space), 0.6)
    assert ceiling == 1.0
    assert cost(keep) == pytest.approx(max(0.6 / 0.8, space.relative_macs(keep) / 0.5))
    macs_only, macs_ceiling = latency_target.search_cost(space, autoprune.Target(macs_reduction=0.5), None)
    assert macs_ceiling == 0.5 and macs_only(keep) == space.relative_macs(keep)


def test_a_final_measurement_short_of_the_target_is_a_warning(trained, fake_timing, monkeypatch):
    # the check during the run met 2x; the final, longer measurement on a busier machine shows 1.8x
    monkeypatch.setattr(engine_prune, "speedups", lambda base, pruned: {
        b: Speedup(1.8, 1.79, 1.81, 30, (1.78, 1.82)) for b in base})
    result = run(trained, latency_reduction=0.5)
    assert result.search.notes["latency_check_speedup"]["ratio"] >= 2.0
    assert any(w.startswith("the final measurement shows a 1.80x speed-up at batch 64 (95% interval 1.78-1.82), "
                            "short of the 2.00x that latency_reduction=0.5 asks") for w in result.warnings)
