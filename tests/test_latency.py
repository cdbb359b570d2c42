"""Latency measurement (interleaving, spread, paired speed-ups) and the per-layer latency table.

Everything that depends on real timings uses injected fake clocks and cost models, so the assertions
are exact and the file runs in seconds on a busy machine; no test asserts a real speed-up.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.engine.latency import (
    Speedup,
    Timing,
    batch_of,
    by_batch_json,
    call,
    device_description,
    measure_latency,
    round_order,
    speedup,
    speedups,
    time_interleaved,
)
from autoprune.engine.latency_table import LatencyTable, TableOptions, grid_widths, pearson, spearman, validate
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError

# ---- inputs ---------------------------------------------------------------------------------------


def test_batch_of_tensor_draws_floats_of_the_same_per_sample_shape():
    example = torch.zeros(2, 3, 5, 4, dtype=torch.float64)
    batch = batch_of(example, 7, "cpu")
    assert batch.shape == (7, 3, 5, 4) and batch.dtype == torch.float64
    assert float(batch.min()) >= 0.0 and float(batch.max()) < 1.0
    assert float(batch.std()) > 0.1  # random, not the example's zeros


def test_batch_of_tuple_copies_integers_and_passes_other_entries_through():
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    images = torch.rand(2, 1, 4, 4)
    batch = batch_of((images, ids, None), 5, "cpu")
    assert isinstance(batch, tuple) and len(batch) == 3
    assert batch[0].shape == (5, 1, 4, 4)
    assert torch.equal(batch[1], ids[[0, 1, 0, 1, 0]])  # repeated along dim 0
    assert batch[2] is None
    assert isinstance(batch_of([images], 3, "cpu"), list)


def test_batch_of_rejects_inputs_without_batch_dimension():
    with pytest.raises(AutopruneError, match="batch dimension"):
        batch_of(torch.tensor(1.0), 4, "cpu")
    with pytest.raises(AutopruneError, match="batch size"):
        batch_of(torch.rand(1, 3), 0, "cpu")


def test_call_unpacks_tuples_only():
    assert call(lambda *a: len(a), (torch.zeros(1), torch.zeros(1))) == 2
    assert call(lambda *a: len(a), torch.zeros(3, 3)) == 1


def test_clock_choices_are_checked():
    with pytest.raises(AutopruneError, match="threads=1"):
        measure_latency([Recorder("a", [])], torch.rand(1, 3), batch_sizes=(1,), threads=2, clock="process")
    with pytest.raises(AutopruneError, match="valid clocks"):
        TableOptions(clock="sundial")
    with pytest.raises(AutopruneError, match="fractions"):
        TableOptions(fractions=(0.0, 1.0))
    timings = measure_latency([Recorder("a", [])], torch.rand(1, 3), batch_sizes=(1,), threads=1, clock="process",
                              warmup=0, repeats=2)
    assert timings[0][1].n == 2


def test_a_busy_machine_is_reported(monkeypatch, caplog):
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    with caplog.at_level("WARNING", logger="autoprune.engine.latency"):
        measure_latency([Recorder("a", [])], torch.rand(1, 3), batch_sizes=(1,), warmup=0, repeats=1)
    assert "busy" in caplog.text and "64.0" in caplog.text


def test_device_description_names_cpu_and_threads():
    assert device_description("cpu", 3).endswith("(3 threads)")
    assert device_description("cpu", 1).endswith("(1 thread)")


# ---- interleaving, modes, threads -----------------------------------------------------------------


class Recorder(nn.Module):
    """Appends its name, mode and the thread count to a shared log on every call."""

    def __init__(self, name: str, log: list, fail: bool = False):
        super().__init__()
        self.name, self.log, self.fail = name, log, fail
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, self.training, torch.get_num_threads(), torch.is_grad_enabled(), x.shape[0]))
        if self.fail:
            raise RuntimeError("boom")
        return self.lin(x)


def test_round_order_alternates_which_model_goes_first():
    assert [round_order(r, 2) for r in range(4)] == [[0, 1], [1, 0], [0, 1], [1, 0]]
    firsts = [round_order(r, 3)[0] for r in range(6)]
    assert sorted(firsts) == [0, 0, 1, 1, 2, 2]


def test_measure_latency_interleaves_rounds_and_makes_inputs_per_batch_size():
    log: list = []
    a, b = Recorder("a", log), Recorder("b", log)
    timings = measure_latency([a, b], torch.rand(1, 3), batch_sizes=(1, 4), warmup=2, repeats=4)
    calls = [(name, batch) for name, _, _, _, batch in log]
    assert calls[:4] == [("a", 1), ("a", 1), ("b", 1), ("b", 1)]  # warm-up
    assert [n for n, _ in calls[4:12]] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(batch == 4 for _, batch in calls[12:])
    assert len(calls) == 2 * 12
    assert set(timings[0]) == {1, 4} and timings[1][4].n == 4
    assert all(not grad for *_, grad, _ in log)  # no gradients


def test_too_few_rounds_are_reported_as_too_few_not_as_noise(caplog):
    log: list = []
    measure_latency([Recorder("a", log)], torch.rand(1, 3), batch_sizes=(1,), warmup=0, repeats=2)
    messages = [r.getMessage() for r in caplog.records
                if r.levelname == "WARNING" and "latency of model" in r.getMessage()]
    assert messages == ["latency of model 0 at batch 1 rests on 2 timed round(s), fewer than 5: not a measurement to "
                        "quote; raise latency_repeats (--latency-repeats)"]


def test_measure_latency_restores_modes_and_threads_even_on_error():
    before = torch.get_num_threads()
    log: list = []
    a, b = Recorder("a", log).train(), Recorder("b", log).eval()
    measure_latency([a, b], torch.rand(2, 3), batch_sizes=(2,), threads=1, warmup=1, repeats=2)
    assert all(not training and threads == 1 for _, training, threads, _, _ in log)
    assert a.training and not b.training
    assert torch.get_num_threads() == before
    broken = Recorder("c", log, fail=True).train()
    with pytest.raises(RuntimeError):
        measure_latency([broken], torch.rand(2, 3), batch_sizes=(2,), threads=1, warmup=1, repeats=2)
    assert broken.training and torch.get_num_threads() == before


def test_time_interleaved_converts_to_milliseconds_per_call():
    now = [0.0]
    costs = [0.002, 0.0005]  # seconds per call

    def make(cost: float):
        def run():
            now[0] += cost
        return run

    samples = time_interleaved([make(c) for c in costs], warmup=1, repeats=3, number=[1, 4], clock=lambda: now[0])
    assert np.allclose(samples, [[2.0] * 3, [0.5] * 3])
    # settling runs happen before every sample but are not timed
    samples = time_interleaved([make(c) for c in costs], warmup=0, repeats=2, settle=2, clock=lambda: now[0])
    assert np.allclose(samples, [[2.0] * 2, [0.5] * 2])
    calls: list[int] = []
    time_interleaved([lambda: calls.append(0)], warmup=1, repeats=2, number=[2], settle=1)
    assert len(calls) == 1 + 2 * (1 + 2)


# ---- statistics ------------------------------------------------------------------------------------


def test_timing_statistics_on_known_samples():
    t = Timing.from_samples([9, 1, 8, 2, 7, 3, 6, 4, 5])
    assert (t.median_ms, t.q1_ms, t.q3_ms, t.iqr_ms, t.n) == (5.0, 3.0, 7.0, 4.0, 9)
    assert t.ci95[0] <= 5.0 <= t.ci95[1] and t.ci95[0] < t.ci95[1]
    assert t.relative_spread == pytest.approx(0.8)
    assert not t.reliable  # the middle half spans 80% of the median
    assert Timing.from_samples([9, 1, 8, 2, 7, 3, 6, 4, 5]).ci95 == t.ci95  # seeded bootstrap


def test_tight_timings_are_reliable_and_few_are_not():
    tight = Timing.from_samples([10.0, 10.1, 9.9, 10.05, 9.95, 10.2, 9.8, 10.0])
    assert tight.reliable and tight.median_ms == pytest.approx(10.0)
    assert not Timing.from_samples([10.0, 10.0, 10.0]).reliable  # too few runs
    # a tight middle half but a median that the bootstrap cannot pin down is flagged too
    bimodal = Timing.from_samples([10.0] * 5 + [20.0] * 5)
    assert bimodal.ci95[1] - bimodal.ci95[0] > 0.3 * bimodal.median_ms and not bimodal.reliable
    j = tight.to_json()
    assert j["median_ms"] == 10.0 and j["reliable"] is True and len(j["ci95_ms"]) == 2
    assert "samples" not in j
    json.dumps(j)


def test_speedup_is_the_median_of_paired_ratios():
    base = [10.0, 30.0, 12.0, 28.0, 11.0, 40.0]  # the machine's load changes between rounds...
    pruned = [5.0, 15.0, 6.0, 14.0, 5.5, 20.0]  # ...and both models of a round see it
    s = speedup(base, pruned)
    assert (s.ratio, s.q1, s.q3, s.ci95, s.n) == (2.0, 2.0, 2.0, (2.0, 2.0), 6)
    assert s.reliable
    noisy = speedup([10, 10, 10, 10, 10, 10], [5, 10, 4, 9, 5, 8])
    assert not noisy.reliable
    assert s.to_json() == {"ratio": 2.0, "q1": 2.0, "q3": 2.0, "ci95": [2.0, 2.0], "n": 6, "reliable": True}
    with pytest.raises(AutopruneError, match="paired"):
        speedup([1.0, 2.0], [1.0])


def test_speedups_by_batch_size_from_timings():
    base = {1: Timing.from_samples([2.0, 2.2, 2.1, 2.0, 2.0]), 64: Timing.from_samples([9.0, 9.0, 9.0, 9.0, 9.0])}
    pruned = {1: Timing.from_samples([1.0, 1.1, 1.05, 1.0, 1.0]), 64: Timing.from_samples([3.0] * 5)}
    result = speedups(base, pruned)
    assert isinstance(result[64], Speedup) and result[64].ratio == 3.0 and result[1].ratio == 2.0
    assert list(by_batch_json(result)) == ["1", "64"] and by_batch_json(result)["64"]["ratio"] == 3.0
    with pytest.raises(AutopruneError, match="batch sizes"):
        speedups(base, {1: pruned[1]})


def test_correlations():
    assert pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [8, 6, 4, 2]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties


# ---- the latency table with a fake cost model --------------------------------------------------------


class TinyNet(nn.Module):
    """conv-bn-relu (3->8), two identical 8->8 conv-bn-relu blocks, a strided conv, pooling, a classifier."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv4 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = torch.relu(self.conv4(x))
        return self.fc(x.mean(dim=(2, 3)))


FULL_MS = 50.0
EIGHTHS = tuple(i / 8 for i in range(1, 9))  # every width of an 8-channel layer is a grid point


def fake_cost(module: nn.Module) -> float:
    """A made-up, non-bilinear cost of one timed block (or of the whole model, which shrinks with conv1)."""
    if isinstance(module, TinyNet):
        return FULL_MS * (0.5 + 0.5 * module.conv1.out_channels / 8)
    layer = module[0]
    extra = 0.05 * (len(module) - 1)  # its norm and activation
    if isinstance(layer, nn.Linear):
        return 0.01 * layer.in_features * layer.out_features ** 0.5 + extra
    stride = layer.stride[0]
    return 0.002 * (layer.in_channels * layer.out_channels) ** 1.5 / stride ** 2 + 0.1 + extra


class FakeMeasure:
    """Returns ``fake_cost`` for every round, times ``slowdown`` (a busier machine), and counts calls."""

    def __init__(self, slowdowns: tuple[float, ...] = (1.0,)):
        self.calls = 0
        self.slowdowns = slowdowns
        self.batches: list[list[nn.Module]] = []

    def __call__(self, modules, inputs):
        factor = self.slowdowns[self.calls % len(self.slowdowns)]
        self.calls += 1
        self.batches.append(list(modules))
        for m, x in zip(modules, inputs, strict=True):
            assert call(m, x) is not None  # each block runs on its input
        return [[fake_cost(m) * factor] * 3 for m in modules]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.rand(1, 3, 8, 8)
    return model, x, PruningSpace(model, x)


def build(tiny, measure, **kwargs) -> LatencyTable:
    model, x, space = tiny
    options = {"batch_size": 2, "threads": 1, "measure": measure, "progress": False,
               "options": TableOptions(fractions=EIGHTHS, calibrate=()), **kwargs}
    return LatencyTable.build(model, x, space, **options)


def expected_prediction(space: PruningSpace, keep: np.ndarray) -> float:
    """What the table must predict at grid points: the full model plus the fake cost change of every layer."""
    widths, full = space.layer_channels(keep), space.layer_channels(space.upper)
    total = FULL_MS
    for name, module in (("conv1", nn.Conv2d), ("conv2", nn.Conv2d), ("conv3", nn.Conv2d), ("conv4", nn.Conv2d),
                         ("fc", nn.Linear)):
        extra = 2 if name in ("conv1", "conv2", "conv3") else 0
        stride = 2 if name == "conv4" else 1

        def cost(cin: int, cout: int, module=module, extra=extra, stride=stride) -> float:
            layer = module(cin, cout) if module is nn.Linear else module(cin, cout, 1, stride=stride)
            return fake_cost(nn.Sequential(layer, *[nn.Identity()] * extra))

        total += cost(*widths[name]) - cost(*full[name])
    return total


def test_table_records_real_layer_configurations(tiny):
    measure = FakeMeasure()
    table = build(tiny, measure)
    configs = {n: table.entries[e].config for n, e in table.layers.items()}
    assert set(configs) == {"conv1", "conv2", "conv3", "conv4", "fc"}
    assert configs["conv1"].input_shape == (8, 8) and configs["conv4"].stride == (2, 2)
    assert configs["conv4"].bias and not configs["conv1"].bias
    assert configs["fc"].kind == "linear" and configs["fc"].input_shape == ()
    assert configs["conv1"].norm.startswith("BatchNorm2d") and configs["conv1"].activation == "ReLU()"
    assert configs["conv4"].norm is None and configs["conv4"].activation is None  # torch.relu is functional
    # conv2 and conv3 are the same configuration: timed once
    assert table.layers["conv2"] == table.layers["conv3"]
    assert measure.calls == len(table.entries) == 4
    # the network's input channels are not gridded, the pruned widths are
    assert table.entries[table.layers["conv1"]].grid_in == (3,)
    assert table.entries[table.layers["conv2"]].grid_in == tuple(range(1, 9))
    assert table.positions == {"conv1": 64, "conv2": 64, "conv3": 64, "conv4": 16, "fc": 1}
    conv1_blocks = measure.batches[0][:-1]  # layers are timed in forward order, the full model last
    assert isinstance(measure.batches[0][-1], TinyNet)
    assert sorted(m[0].out_channels for m in conv1_blocks) == list(range(1, 9))  # one per grid width
    assert all(isinstance(m[1], nn.BatchNorm2d) and m[1].num_features == m[0].out_channels
               and isinstance(m[2], nn.ReLU) for m in conv1_blocks)


def test_predictions_are_exact_at_grid_points_and_the_full_model(tiny):
    _, _, space = tiny
    table = build(tiny, FakeMeasure())
    assert table.predict(space.upper) == pytest.approx(FULL_MS)
    assert table.predict_relative(space.upper) == pytest.approx(1.0)
    assert table.remainder_ms == pytest.approx(FULL_MS - table.layers_full_ms)
    rng = np.random.default_rng(0)
    conv4 = table.entries[table.layers["conv4"]]
    checked = 0
    for _ in range(40):  # the default grid holds every width of the 8-channel layers, not all of conv4's 12
        keep = space.snap(rng.uniform(space.lower, 1.0))
        if space.layer_channels(keep)["conv4"][1] in conv4.grid_out:
            assert table.predict(keep) == pytest.approx(expected_prediction(space, keep))
            checked += 1
    assert checked >= 10
    half = np.full(len(space), 0.5)
    assert table.predict(half) == pytest.approx(expected_prediction(space, half))
    assert table.predict(half) < table.predict(space.upper)


def test_predictions_interpolate_bilinearly_between_grid_points(tiny):
    _, _, space = tiny
    table = build(tiny, FakeMeasure(), options=TableOptions(fractions=(0.5, 1.0), calibrate=()))
    entry = table.entries[table.layers["conv2"]]
    assert entry.grid_in == entry.grid_out == (1, 4, 8)

    def at(cin: int, cout: int) -> float:
        return entry.values[entry.grid_in.index(cin), entry.grid_out.index(cout)]

    assert entry.lookup(4, 8) == pytest.approx(fake_cost(nn.Sequential(nn.Conv2d(4, 8, 1), nn.Identity(),
                                                                        nn.Identity())))
    # (6, 5): a quarter of the way from out 4 to 8, half way from in 4 to 8
    expected = (0.5 * 0.75 * at(4, 4) + 0.5 * 0.75 * at(8, 4) + 0.5 * 0.25 * at(4, 8) + 0.5 * 0.25 * at(8, 8))
    assert entry.lookup(6, 5) == pytest.approx(expected)
    # the whole prediction is the remainder plus the looked-up layers
    keep = space.snap(np.full(len(space), 0.75))
    assert table.predict(keep) == pytest.approx(table.remainder_ms + sum(table.layer_latency(keep).values()))


def test_vectorised_predictions_agree_with_layer_by_layer_lookups(tiny):
    _, _, space = tiny
    table = build(tiny, FakeMeasure(), options=TableOptions(fractions=(0.25, 0.5, 1.0), calibrate=()))
    keeps = np.random.default_rng(1).uniform(space.lower, 1.0, size=(50, len(space)))
    many = table.predict_many(keeps)
    slow = [table.remainder_ms + sum(table.layer_latency(k).values()) for k in keeps]  # via space.layer_channels
    assert np.allclose(many, slow) and np.allclose(many, [table.predict(k) for k in keeps])
    assert len(set(np.round(many, 6))) > 10  # the keeps really differ
    with pytest.raises(AutopruneError, match="groups"):
        table.predict(np.ones(len(space) + 1))


def test_paired_ratios_cancel_a_machine_that_slows_down_during_the_build(tiny):
    _, _, space = tiny
    steady = build(tiny, FakeMeasure())
    busy = build(tiny, FakeMeasure(slowdowns=(1.0, 3.0, 1.0, 2.0)))  # one slowdown per layer configuration
    keep = np.full(len(space), 0.5)
    # every layer is timed relative to the full model of the same round, so the table stays consistent...
    assert busy.predict_relative(keep) == pytest.approx(steady.predict_relative(keep))
    for a, b in zip(steady.entries, busy.entries, strict=True):
        assert np.allclose(a.values / steady.full_ms, b.values / busy.full_ms)
    # ...and its milliseconds are those of the median full-model run of the build
    assert busy.full_ms == pytest.approx(np.median([FULL_MS * f for f in (1.0, 3.0, 1.0, 2.0)]))


def test_calibration_fits_how_the_remainder_shrinks(tiny):
    _, _, space = tiny
    half = space.snap(np.full(len(space), 0.5))
    pruned_cost = FULL_MS * (0.5 + 0.5 * space.counts(half)[0] / 8)  # what the fake says the pruned network costs
    constant = build(tiny, FakeMeasure())
    calibrated = build(tiny, FakeMeasure(), options=TableOptions(fractions=EIGHTHS, calibrate=(0.5,)))
    assert calibrated.calibration[0][1] == pytest.approx(pruned_cost)
    assert calibrated.predict(half) == pytest.approx(pruned_cost)  # one point: the line passes through it
    assert calibrated.predict(space.upper) == pytest.approx(FULL_MS)  # and through the full model
    assert constant.predict(half) != pytest.approx(pruned_cost)
    assert calibrated.remainder_slope_ms != 0.0 and constant.remainder_slope_ms == 0.0
    keeps = np.random.default_rng(2).uniform(space.lower, 1.0, size=(20, len(space)))
    assert np.all(calibrated.predict_many(keeps) <= calibrated.predict(space.upper) + 1e-9)


def test_grid_widths():
    assert grid_widths(16, 1) == (1, 2, 4, 8, 12, 16)
    assert grid_widths(64, 4, (0.25, 0.5, 1.0)) == (4, 16, 32, 64)
    assert grid_widths(10, 10) == (10,)  # a dimension the space never changes
    assert all(w % 4 == 0 for w in grid_widths(32, 4, multiple=4))


def test_bad_measurements_are_rejected(tiny):
    with pytest.raises(AutopruneError, match="positive milliseconds"):
        build(tiny, lambda modules, inputs: [[-1.0]] * len(modules))
    with pytest.raises(AutopruneError, match="equally long"):
        build(tiny, lambda modules, inputs: [[1.0]])


# ---- caching -------------------------------------------------------------------------------------------


def load(tiny, cache_dir, measure, **kwargs) -> LatencyTable:
    model, x, space = tiny
    options = {"batch_size": 2, "threads": 1, "measure": measure, "progress": False, "device_label": "fake CPU",
               "options": TableOptions(calibrate=(0.5,)), **kwargs}
    return LatencyTable.load_or_build(model, x, space, cache_dir=cache_dir, **options)


def test_cache_is_reused_and_keyed_by_batch_size_and_device(tiny, tmp_path):
    _, _, space = tiny
    measure = FakeMeasure()
    first = load(tiny, tmp_path, measure)
    built = measure.calls
    again = load(tiny, tmp_path, measure)
    assert measure.calls == built  # nothing timed
    keep = np.full(len(space), 0.6)
    assert again.predict(keep) == pytest.approx(first.predict(keep))
    assert again.key == first.key and again.meta["batch_size"] == 2
    load(tiny, tmp_path, measure, batch_size=4)
    assert measure.calls == 2 * built
    load(tiny, tmp_path, measure, device_label="another CPU")
    assert measure.calls == 3 * built
    load(tiny, tmp_path, measure, options=TableOptions(clock="process", calibrate=(0.5,)))  # another measurement
    assert measure.calls == 4 * built
    load(tiny, tmp_path, measure, options=TableOptions(repeats=5, calibrate=(0.5,)))  # effort is not in the key
    assert measure.calls == 4 * built
    assert len(list(tmp_path.glob("latency_*.json"))) == 4


def test_corrupt_or_mismatching_cache_is_rebuilt(tiny, tmp_path):
    measure = FakeMeasure()
    load(tiny, tmp_path, measure)
    built = measure.calls  # the layer configurations and the calibration network
    (path,) = tmp_path.glob("latency_*.json")
    path.write_text("{not json", encoding="utf-8")
    load(tiny, tmp_path, measure)
    assert measure.calls == 2 * built
    data = json.loads(path.read_text(encoding="utf-8"))  # rewritten whole
    data["key"] = "0" * 64
    path.write_text(json.dumps(data), encoding="utf-8")
    load(tiny, tmp_path, measure)
    assert measure.calls == 3 * built
    data = json.loads(path.read_text(encoding="utf-8"))
    data["entries"][0]["values_ms"] = [[1.0]]  # wrong shape
    path.write_text(json.dumps(data), encoding="utf-8")
    rebuilt = load(tiny, tmp_path, measure)
    assert measure.calls == 4 * built
    assert rebuilt.predict(np.ones(len(tiny[2]))) == pytest.approx(FULL_MS)
    assert load(tiny, tmp_path, measure).calibration == rebuilt.calibration  # read back from the cache
    assert measure.calls == 4 * built


# ---- validation (real timing of tiny networks: structure only, no speed asserted) ----------------------


def test_validate_prunes_and_measures_every_candidate(tiny):
    model, x, space = tiny
    table = build(tiny, FakeMeasure())
    keeps = [np.full(len(space), r) for r in (0.3, 0.6, 0.9)]
    scores = [torch.rand(g.channels) for g in space.groups]
    result = validate(table, model, space, scores, keeps, x, threads=1, warmup=1, repeats=3)
    assert len(result.predicted_ms) == len(result.measured_ms) == 3
    assert result.predicted_ms[0] < result.predicted_ms[2]  # the fake costs grow with width
    assert result.base_predicted_ms == pytest.approx(FULL_MS)
    assert -1.0 <= result.spearman <= 1.0 and result.median_error >= 0
    assert len(result.to_json()["pairs_ms"]) == 3
    with pytest.raises(AutopruneError, match="at least 2"):
        validate(table, model, space, scores, keeps[:1], x)
