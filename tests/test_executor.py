"""Candidate evaluation on a process pool or Ray gives what one process gives: same history, same choice, same model.

A tiny BatchNorm CNN, trained here for a few seconds on a learnable toy task, is pruned by PSO (asks of
four candidates) serially, on a 2-worker ``spawn`` pool and on 2 Ray actors; then with a worker SIGKILLed
in the middle of a batch (the test-only :data:`~autoprune.engine.executor.FAULT_ENV` hook, once per run
through a marker file). Executor-level tests cover the driver's deduplication and cache, the one-line
errors, the once-only note for one-at-a-time strategies, and that no worker process outlives an executor
that failed. Ray tests share one ``ray.init(num_cpus=2)`` per module and are skipped when Ray is absent.

Runtime on the 2-core development machine (shared): about 1.5 minutes with Ray installed, most of it
worker start-up (each spawned process imports torch; Ray starts once).
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autoprune
import autoprune.engine.executor as executor_module
from autoprune.engine.config import PruneConfig, Target
from autoprune.engine.evaluate import Evaluator
from autoprune.engine.executor import (
    FAULT_ENV,
    MAX_RESTARTS,
    RAY_MISSING,
    SCORE_FN_NOT_PICKLABLE,
    BatchEvaluation,
    Executor,
    PoolExecutor,
    create_executor,
    default_threads,
)
from autoprune.engine.prune import SearchInterrupted
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.search import Fitness

torch.set_num_threads(2)

CLASSES, SIZE = 3, 12
# PSO asks four candidates at a time: three asks of the 2-worker executors
RUN = {"method": "pso", "method_options": {"particles": 4, "iterations": 3}, "macs_reduction": 0.5, "budget": 12,
       "finetune": None, "latency_repeats": 2, "latency_batch": 4, "calibration_samples": 64, "seed": 0}


# ---- a tiny trained model and its data ------------------------------------------------------------------

def toy_data(n: int, seed: int) -> TensorDataset:
    """Noise images whose label is the channel raised in them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, 3, SIZE, SIZE, generator=g) + 0.12 * F.one_hot(y, 3).float()[:, :, None, None]
    return TensorDataset(x, y)


def build() -> nn.Sequential:
    # standard layers only: Ray workers unpickle the model without importing this test module
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, CLASSES))


@pytest.fixture(scope="module")
def case():
    """The trained model, its loaders and example inputs."""
    torch.manual_seed(0)
    model, train, val = build(), toy_data(192, 1), toy_data(96, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(4):
        for x, y in DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    return {"model": model, "train": DataLoader(train, batch_size=32), "val": DataLoader(val, batch_size=48),
            "example": train.tensors[0][:2]}


def prune(case, **settings):
    return autoprune.prune(case["model"], case["example"], train_loader=case["train"], val_loader=case["val"],
                           **{**RUN, **settings})


def rows(result):
    return [(r.counts, r.accuracy, r.macs, r.params, r.score) for r in result.history]


def assert_same_run(got, want) -> None:
    """Same history (timings aside), same chosen keep vector, bit-identical pruned weights."""
    assert rows(got) == rows(want)
    assert got.keep == want.keep
    resumed = {r.counts for r in want.history[: got.search.resumed_evaluations]}
    # every structure is scored once, in this process or a worker; a resumed run skips the recorded ones
    assert got.search.unique_evaluations == want.search.unique_evaluations - len(resumed)
    a, b = got.model.state_dict(), want.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def serial(case):
    result = prune(case)
    assert result.search.executor == "serial" and result.search.threads_per_worker is None
    assert len(result.history) == 12
    return result


def kill_on(monkeypatch, tmp_path, serial, index: int = 1, times: int = 1):
    """Arm the fault hook: the first ``times`` workers that evaluate history row ``index`` of the serial run die."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, json.dumps({"marker": str(marker), "counts": list(serial.history[index].counts),
                                              "times": times}))
    return marker


def deaths(marker) -> int:
    return len(list(marker.parent.glob(marker.name + "*")))


# ---- process pool ---------------------------------------------------------------------------------------

def test_pool_gives_the_serial_result(case, serial, caplog):
    caplog.set_level(logging.INFO, logger="autoprune.engine.executor")
    result = prune(case, workers=2)
    assert_same_run(result, serial)
    assert (result.search.executor, result.search.workers) == ("pool", 2)
    assert result.search.threads_per_worker == default_threads(2)
    assert any("2 pool workers" in r.getMessage() for r in caplog.records)


class NoisyForward(nn.Sequential):
    """A forward that draws random numbers at evaluation (dropout called with training=True)."""

    def forward(self, x):
        return super().forward(F.dropout(x, 0.3, training=True))


def test_a_forward_drawing_random_numbers_gives_the_same_run_serially_and_on_the_pool(case):
    noisy = {**case, "model": NoisyForward(*copy.deepcopy(case["model"]))}
    serial, pooled = prune(noisy), prune(noisy, workers=2)
    assert len({r.accuracy for r in serial.history}) > 1
    assert_same_run(pooled, serial)


def test_pool_worker_killed_mid_batch_gives_the_serial_result(case, serial, monkeypatch, tmp_path, caplog):
    marker = kill_on(monkeypatch, tmp_path, serial)
    result = prune(case, workers=2)
    assert marker.exists()  # a worker did die
    assert any("worker process died" in r.getMessage() for r in caplog.records)
    assert_same_run(result, serial)


class StopAfter(autoprune.Callback):
    """Asks the run to stop once ``n`` evaluations were reported (as Ctrl-C does in the CLI)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_evaluation(self, evaluation) -> None:
        self.seen += 1

    def should_stop(self) -> bool:
        return self.seen >= self.n


def test_pool_worker_dying_on_every_restart_fails_in_one_line(case, serial, monkeypatch, tmp_path):
    marker = kill_on(monkeypatch, tmp_path, serial, times=MAX_RESTARTS + 5)
    with pytest.raises(AutopruneError) as info:
        prune(case, workers=2)
    assert str(info.value).startswith(f"worker processes died {MAX_RESTARTS + 1} times evaluating one batch")
    assert deaths(marker) == MAX_RESTARTS + 1  # the pool gave up after its restarts, it did not loop
    assert multiprocessing.active_children() == []


def test_pool_run_stopped_mid_batch_resumes_to_the_serial_result(case, serial, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SearchInterrupted):
        prune(case, workers=2, out=out, callbacks=[StopAfter(6)])  # in the middle of the second ask of four
    resumed = prune(case, workers=2, out=out, resume=True)
    assert resumed.search.resumed_evaluations == 6
    assert_same_run(resumed, serial)


def unpicklable_score_fn():
    lock = threading.Lock()

    def score(model) -> float:
        with lock:
            return 0.5

    return score


def test_unpicklable_score_fn_is_one_line(case):
    with pytest.raises(AutopruneError) as info:
        prune(case, workers=2, score_fn=unpicklable_score_fn())
    assert str(info.value) == SCORE_FN_NOT_PICKLABLE


def test_a_model_class_and_score_fn_defined_in_main_go_to_the_workers_by_value(case, serial):
    class Wrapped(nn.Module):  # as if defined in a script's __main__, which the workers cannot import
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    Wrapped.__module__, Wrapped.__qualname__ = "__main__", "Wrapped"
    model = Wrapped(copy.deepcopy(case["model"]))
    result = prune({**case, "model": model}, workers=2)
    assert rows(result) == rows(serial) and result.keep == serial.keep
    with_lambda = prune({**case, "model": model}, workers=2,
                        score_fn=lambda m: float(m.net[0].weight.detach().abs().sum()))
    assert with_lambda.search.executor == "pool" and len(with_lambda.history) == len(serial.history)


# ---- executor level ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluator(case):
    space = PruningSpace(case["model"], case["example"])
    scores = [torch.arange(g.channels, dtype=torch.float32) for g in space.groups]
    val = [(x, y) for x, y in case["val"]]
    return lambda **kw: Evaluator(case["model"], space, scores, val, [x for x, _ in case["train"]], **kw)


def raising_score(model: nn.Module) -> float:
    raise ValueError("score_fn failed")


def worker_gone(pid: int) -> bool:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("failure", ["driver", "ctrl-c", "worker"])
def test_a_failing_pool_leaves_no_processes_and_no_payload(evaluator, failure):
    ev = evaluator(score_fn=raising_score if failure == "worker" else None)
    keeps = [np.full(len(ev.space), r) for r in (0.5, 0.75)]
    expected = {"driver": RuntimeError, "ctrl-c": KeyboardInterrupt, "worker": ValueError}[failure]
    pids: list[int] = []
    with pytest.raises(expected), PoolExecutor(ev, workers=2, threads=1) as executor:
        payload = executor.payload
        assert payload.exists()
        try:
            executor.map(keeps)
        finally:
            pids = executor.worker_pids()
        if failure == "driver":
            raise RuntimeError("the driver failed")
        raise KeyboardInterrupt
    assert pids and all(worker_gone(pid) for pid in pids)
    assert multiprocessing.active_children() == []
    assert not payload.parent.exists()


def test_pool_keeps_its_workers_and_matches_the_driver(evaluator):
    """The payload is loaded once per worker: the same processes serve every batch; results equal the driver's."""
    ev, reference = evaluator(), evaluator()
    rng = np.random.default_rng(0)
    batches = [[ev.space.snap(rng.uniform(0.3, 1.0, len(ev.space))) for _ in range(4)] for _ in range(2)]
    with PoolExecutor(ev, workers=2, threads=1) as executor:
        first = executor.map(batches[0])
        pids = sorted(executor.worker_pids())
        second = executor.map(batches[1])
        assert sorted(executor.worker_pids()) == pids and len(pids) == 2
    assert first + second == [reference(k) for k in batches[0] + batches[1]]


class Recording(Executor):
    """Records what would be sent to workers; a candidate's 'accuracy' is its mean keep ratio."""

    kind = "stub"

    def __init__(self, evaluator: Evaluator, workers: int = 2) -> None:
        super().__init__(evaluator, workers=workers, threads=1)
        self.sent: list[list[tuple[int, ...]]] = []

    def _run(self, keeps):
        self.sent.append([self.evaluator.key(k) for k in keeps])
        return [Fitness(float(np.mean(k)), 1.0, 1.0) for k in keeps]


def test_map_sends_each_new_structure_once_and_answers_in_order(evaluator):
    ev = evaluator()
    dim = len(ev.space)
    a, b, c = (ev.space.snap(np.full(dim, r)) for r in (0.5, 0.75, 1.0))
    ev.prefill(ev.key(c), Fitness(0.9, 2.0, 2.0))
    executor = Recording(ev)
    results = executor.map([a, b, a.copy(), c, b])
    assert executor.sent == [[ev.key(a), ev.key(b)]]
    assert [r.accuracy for r in results] == [float(np.mean(a)), float(np.mean(b)), float(np.mean(a)), 0.9,
                                             float(np.mean(b))]
    assert ev.evaluations == 2
    assert executor.map([b, c]) == [results[1], results[3]] and len(executor.sent) == 1  # all cached now


def test_one_at_a_time_strategies_are_noted_once(evaluator, caplog):
    caplog.set_level(logging.INFO, logger="autoprune.engine.executor")
    ev = evaluator()
    single = BatchEvaluation(Recording(ev), "sa")
    for r in (0.4, 0.5, 0.6, 0.7):
        single([ev.space.snap(np.full(len(ev.space), r))])
    batched = BatchEvaluation(Recording(ev), "pso")
    batched([ev.space.snap(np.full(len(ev.space), r)) for r in (0.3, 0.35)])
    notes = [r.getMessage() for r in caplog.records if "at a time" in r.getMessage()]
    assert notes == ["strategy sa asks one candidate at a time; 2 workers cannot speed it up"]


def test_ray_missing_is_one_line(evaluator, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    config = PruneConfig(method="pso", target=Target(macs_reduction=0.5), workers=2, ray_address="local")
    with pytest.raises(AutopruneError) as info:
        create_executor(config, evaluator())
    assert str(info.value) == RAY_MISSING


@pytest.mark.parametrize(("address", "message"), [
    ("127.0.0.1:1", "cannot connect to Ray at '127.0.0.1:1' (Connection refused); start a cluster with"),
    ("ray://127.0.0.1:1", "cannot connect to Ray at 'ray://127.0.0.1:1' (Connection refused)"),
    ("headnode", "ray_address 'headnode' is not HOST:PORT (or ray://HOST:PORT)"),
])
def test_an_unreachable_ray_address_fails_at_once_in_one_line(evaluator, address, message):
    pytest.importorskip("ray")
    config = PruneConfig(method="pso", target=Target(macs_reduction=0.5), workers=2, ray_address=address)
    started = time.monotonic()
    with pytest.raises(AutopruneError) as info:
        create_executor(config, evaluator())
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert time.monotonic() - started < 30  # ray.init alone retries an unreachable address for minutes


# ---- Ray ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def test_ray_gives_the_serial_result(case, serial, ray_instance):
    result = prune(case, workers=2, ray_address="local")
    assert_same_run(result, serial)
    assert (result.search.executor, result.search.workers) == ("ray", 2)
    assert ray_instance.is_initialized()  # an instance the caller started is left running


def test_ray_actor_killed_mid_batch_gives_the_serial_result(case, serial, ray_instance, monkeypatch, tmp_path):
    marker = kill_on(monkeypatch, tmp_path, serial, index=3)
    result = prune(case, workers=2, ray_address="local")
    assert marker.exists()
    assert_same_run(result, serial)


def test_ray_actor_dead_after_its_restarts_fails_in_one_line(case, serial, ray_instance, monkeypatch, tmp_path):
    # no restarts allowed (each restart costs this machine tens of seconds): the first death leaves the actor dead,
    # and its task, which Ray retries without limit while the actor can restart, must fail rather than wait
    monkeypatch.setattr(executor_module, "MAX_RESTARTS", 0)
    marker = kill_on(monkeypatch, tmp_path, serial, index=3, times=5)
    with pytest.raises(AutopruneError) as info:
        prune(case, workers=2, ray_address="local")
    assert str(info.value).startswith("a Ray worker died more than 0 times evaluating candidates")
    assert "\n" not in str(info.value)
    assert deaths(marker) == 1


def test_ray_refuses_an_unpicklable_score_fn(case, ray_instance):
    with pytest.raises(AutopruneError) as info:
        prune(case, workers=2, ray_address="local", score_fn=unpicklable_score_fn())
    assert str(info.value) == SCORE_FN_NOT_PICKLABLE


def test_ray_names_a_model_class_its_workers_cannot_import(case, ray_instance, tmp_path, monkeypatch):
    (tmp_path / "driver_only_models.py").write_text("from torch import nn\n\n\nclass DriverOnly(nn.Sequential):\n"
                                                    "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver imports it; Ray's workers, started before, cannot
    from driver_only_models import DriverOnly

    model = DriverOnly(*copy.deepcopy(case["model"]))
    with pytest.raises(AutopruneError) as info:
        autoprune.prune(model, case["example"], train_loader=case["train"], val_loader=case["val"],
                        **{**RUN, "workers": 2, "ray_address": "local"})
    assert str(info.value).startswith("Ray workers cannot load the model and data sent to them (ModuleNotFoundError: "
                                      "No module named 'driver_only_models'); define the model's class")


def test_ray_passes_on_what_score_fn_raised_in_a_worker_in_one_line(case, ray_instance):
    driver = os.getpid()

    def score(model):
        if os.getpid() != driver:
            raise ValueError("only the driver can score")
        return 0.5

    with pytest.raises(AutopruneError) as info:
        prune(case, workers=2, ray_address="local", score_fn=score)
    assert str(info.value) == ("score_fn raised ValueError: only the driver can score; fix score_fn (it is called "
                               "with each candidate network in eval mode)")
