"""Candidate evaluation in this process, on a process pool or on a Ray cluster, with the same results.

The search driver keeps the strategy, its random generator and the result cache (the driver's
:class:`~autoprune.engine.evaluate.Evaluator`); an executor only computes the candidates the cache does not
hold. :meth:`Executor.map` takes one ask of keep vectors, drops duplicates and cached structures, has the
rest scored, and returns one :class:`~autoprune.search.Fitness` per keep vector in submission order, so
:func:`~autoprune.search.run_search` tells the strategy exactly what a serial run would tell it and
``history.jsonl`` and the chosen candidate do not depend on the executor.

Determinism: a worker scores a candidate exactly as the driver would. Everything that decides a score is
shipped from the driver once per worker (:meth:`Evaluator.state`: the model, space, channel scores,
validation and calibration batches, ``score_fn``, and the masking-vs-surgery decision that
:func:`~autoprune.engine.evaluate.choose_physical` made once, never re-timed in a worker). Each worker pins
its torch threads (``threads_per_worker``) and flushes subnormals like the driver's evaluation. A result
therefore depends on the model, the data and the candidate only, not on which worker ran it, in what
order, or when.

- :class:`SerialExecutor`: in this process, one candidate at a time (``workers=1``, today's behaviour).
- :class:`PoolExecutor`: ``workers`` processes of :class:`concurrent.futures.ProcessPoolExecutor` started
  with ``spawn``; the payload is written once to a private temporary directory and loaded by each
  worker's initializer. A worker that dies mid-batch (killed, out of memory) breaks the pool: it is
  rebuilt and the unfinished candidates run again.
- :class:`RayExecutor`: ``workers`` Ray actors (``ray.util.ActorPool``); the payload goes to the object
  store once (``ray.put``). Actors restart and retry their task when their process dies.

Build one with :func:`create_executor` and use it as a context manager: the workers are shut down at the
end, on errors and on Ctrl-C alike.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import cloudpickle
import numpy as np
import torch

from autoprune.engine.config import PruneConfig
from autoprune.engine.evaluate import Evaluator
from autoprune.engine.train import model_device
from autoprune.errors import AutopruneError
from autoprune.search import Fitness

log = logging.getLogger(__name__)

#: The one line when Ray is asked for and not installed.
RAY_MISSING = "--ray-address needs Ray: pip install 'autoprune[ray]'"
#: The one line when the caller's score_fn cannot be sent to worker processes.
SCORE_FN_NOT_PICKLABLE = ("score_fn must be picklable to evaluate candidates in worker processes (it refers to "
                          "something that is not: a lock, an open file, a live connection); use workers=1")
#: Test-only fault injection: JSON ``{"marker": path, "counts": [...]}``. The first worker to start
#: evaluating the candidate with these channel counts creates ``marker`` and SIGKILLs itself; the marker
#: makes it happen once per run. Read in the driver and shipped to the workers explicitly.
FAULT_ENV = "AUTOPRUNE_TEST_KILL_WORKER"
#: How often the workers may die while one batch is evaluated before the run gives up.
MAX_RESTARTS = 3


def default_threads(workers: int) -> int:
    """Torch threads per worker when not given: the machine's cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def threads_per_worker(config: PruneConfig) -> int | None:
    """Torch threads each worker process is pinned to; None for the serial executor (the driver's own)."""
    if config.executor_kind == "serial":
        return None
    return config.threads_per_worker or default_threads(config.workers)


def pin_threads(threads: int) -> None:
    """Fix this process's torch intra-op threads and flush subnormals, as the driver's evaluation does."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)


@dataclass(frozen=True)
class Fault:
    """Test-only: kill the worker process that starts evaluating the candidate with ``counts``, ``times`` times.

    Attributes:
        marker: a file created (exclusively) just before the first kill (``marker.2``, ... before the later
            ones), so exactly ``times`` workers die, whoever evaluates the candidate.
        counts: the channel counts of the candidate.
        times: how many workers die for it (1: one; more than the executor's restarts: the run must fail).
    """

    marker: str
    counts: tuple[int, ...]
    times: int = 1

    @classmethod
    def from_env(cls) -> Fault | None:
        """The fault named by :data:`FAULT_ENV`, if set."""
        text = os.environ.get(FAULT_ENV)
        if not text:
            return None
        data = json.loads(text)
        return cls(str(data["marker"]), tuple(int(c) for c in data["counts"]), int(data.get("times", 1)))

    def strike(self, key: tuple[int, ...]) -> None:
        """SIGKILL this process if ``key`` is the candidate and fewer than ``times`` workers died for it."""
        if key != self.counts:
            return
        for death in range(1, self.times + 1):
            try:
                os.close(os.open(self.marker if death == 1 else f"{self.marker}.{death}",
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class Worker:
    """One worker's evaluator, built once from the driver's payload (a pool worker, or a Ray actor).

    Args:
        state: :meth:`Evaluator.state` of the driver's evaluator.
        threads: torch threads of this process.
        fault: test-only fault injection (:class:`Fault`).
    """

    def __init__(self, state: Mapping[str, Any], threads: int, fault: Fault | None = None) -> None:
        pin_threads(threads)
        self.evaluator = Evaluator.from_state(state)
        self.fault = fault

    def evaluate(self, keep: np.ndarray) -> Fitness:
        """The candidate's fitness, exactly as the driver's evaluator computes it."""
        if self.fault is not None:
            self.fault.strike(self.evaluator.key(keep))
        return self.evaluator(keep)


#: The pool worker of this process (set by :func:`_init_pool_worker`).
_WORKER: Worker | None = None


def _init_pool_worker(payload: str, threads: int, fault: Fault | None, driver: int) -> None:
    """Pool initializer: load the payload once, pin threads; Ctrl-C is the driver's to handle, and the worker
    ends when the driver dies (``driver``: its pid), a ``kill -9`` included, rather than live on as an orphan.

    The payload is this run's own file, written by the driver into a private temporary directory a moment
    ago, so it is loaded with full unpickling (it holds the model object and ``score_fn``).
    """
    global _WORKER
    Path(payload).with_suffix(".started").touch()  # the driver tells a death in start-up from one while working
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_end_with, args=(driver,), name="autoprune-driver-watch", daemon=True).start()
    pin_threads(threads)
    try:
        state = torch.load(payload, map_location=None, weights_only=False)
    except Exception as exc:  # told to the driver through a file (a traceback here would only reach stderr)
        Path(payload).with_suffix(".error").write_text(_first_line(exc), encoding="utf-8")
        os._exit(1)
    _WORKER = Worker(state, threads, fault)


def _end_with(driver: int, every: float = 1.0) -> None:
    """Exit this process once ``driver`` is no longer its parent (it died and the worker was re-parented)."""
    while os.getppid() == driver:
        time.sleep(every)
    os._exit(1)


def _evaluate_in_pool(keep: np.ndarray) -> Fitness:
    """Pool task: one candidate on this worker's evaluator."""
    if _WORKER is None:
        raise RuntimeError("pool worker used before its initializer ran")
    return _WORKER.evaluate(keep)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def worker_state(evaluator: Evaluator) -> dict[str, Any]:
    """The payload for the workers, with ``score_fn`` checked first (the usual reason pickling fails)."""
    state = evaluator.state()
    if state["score_fn"] is not None:
        try:
            cloudpickle.dumps(state["score_fn"])
        except Exception as exc:
            raise AutopruneError(SCORE_FN_NOT_PICKLABLE) from exc
    return state


class Executor(ABC):
    """Evaluates batches of candidates for the search driver.

    Args:
        evaluator: the driver's evaluator; its cache is consulted and filled here.
        workers: processes evaluating candidates.
        threads: torch threads per worker (None: the driver's, for the serial executor).

    Attributes:
        kind: ``serial``, ``pool`` or ``ray``.
        parallel: whether candidates of one ask are evaluated concurrently.
    """

    kind: ClassVar[str] = ""
    parallel: ClassVar[bool] = True

    def __init__(self, evaluator: Evaluator, *, workers: int = 1, threads: int | None = None) -> None:
        self.evaluator = evaluator
        self.workers = workers
        self.threads = threads
        self._closed = False

    def map(self, keeps: Sequence[np.ndarray]) -> list[Fitness]:
        """One fitness per keep vector, in submission order.

        Each structure (channel counts) not in the driver's cache is computed once, however often it
        occurs in the batch; results are added to the cache in submission order.
        """
        if self._closed:
            raise AutopruneError(f"the {self.kind} executor was used after it was closed; build a new one")
        keys = [self.evaluator.key(keep) for keep in keeps]
        new: dict[tuple[int, ...], np.ndarray] = {}
        for keep, key in zip(keeps, keys, strict=True):
            if key not in new and self.evaluator.cached(key) is None:
                new[key] = np.asarray(keep, dtype=float)
        if new:
            results = self._run(list(new.values()))
            for key, fitness in zip(new, results, strict=True):
                if self.evaluator.cached(key) is None:  # the serial executor's evaluator records its own
                    self.evaluator.record(key, fitness)
        return [self.evaluator.cached(key) for key in keys]  # type: ignore[misc]

    @abstractmethod
    def _run(self, keeps: list[np.ndarray]) -> list[Fitness]:
        """Compute distinct, uncached candidates; results in order."""

    def close(self, *, failed: bool = False) -> None:
        """Shut the workers down (at once, abandoning running work, when ``failed``); idempotent."""
        self._closed = True

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc_type is not None)

    def describe(self) -> str:
        """The executor in words, for the log."""
        return f"{self.workers} {self.kind} workers, {self.threads} torch thread(s) each"


class SerialExecutor(Executor):
    """Candidates scored one after another by the driver's evaluator, in this process."""

    kind = "serial"
    parallel = False

    def _run(self, keeps: list[np.ndarray]) -> list[Fitness]:
        return [self.evaluator(keep) for keep in keeps]

    def describe(self) -> str:
        return "in this process"


class PoolExecutor(Executor):
    """A ``spawn`` process pool; the payload goes to each worker once, through a temporary file.

    Args:
        evaluator: the driver's evaluator (its :meth:`~Evaluator.state` is the payload).
        workers: worker processes.
        threads: torch threads per worker.
        fault: test-only fault injection (:class:`Fault`).

    Raises:
        AutopruneError: ``score_fn``, the model or the data cannot be pickled.
    """

    kind = "pool"

    def __init__(self, evaluator: Evaluator, *, workers: int, threads: int, fault: Fault | None = None) -> None:
        super().__init__(evaluator, workers=workers, threads=threads)
        state = worker_state(evaluator)
        self._dir = Path(tempfile.mkdtemp(prefix="autoprune-workers-"))
        self.payload = self._dir / "payload.pt"
        try:  # cloudpickle: classes and functions defined in __main__ (a script, a notebook) travel by value
            torch.save(state, self.payload, pickle_module=cloudpickle)
        except Exception as exc:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise AutopruneError(f"the model or its data cannot be pickled for worker processes ({_first_line(exc)}); "
                                 "use workers=1") from exc
        self._fault = fault
        self.restarts = 0
        self._pool: ProcessPoolExecutor | None = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_pool_worker,
                                   initargs=(str(self.payload), self.threads, self._fault, os.getpid()))

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's live workers (started lazily, on the first batch)."""
        processes = getattr(self._pool, "_processes", None) or {}
        return [p.pid for p in processes.values() if p.pid is not None]

    def _run(self, keeps: list[np.ndarray]) -> list[Fitness]:
        results: list[Fitness | None] = [None] * len(keeps)
        for attempt in range(MAX_RESTARTS + 1):
            todo = [i for i, r in enumerate(results) if r is None]
            if not todo:
                break
            if attempt:
                log.warning("a worker process died during the batch; restarting the pool and evaluating the %d "
                            "unfinished candidate(s) again", len(todo))
                self._shutdown(terminate=True)
                self._pool = self._start()
                self.restarts += 1
            self._collect(keeps, todo, results)
            self._check_loaded()
        if any(r is None for r in results):
            raise AutopruneError(f"worker processes died {MAX_RESTARTS + 1} times evaluating one batch (out of "
                                 "memory? a crash in score_fn?); use fewer workers or workers=1")
        return results  # type: ignore[return-value]

    def _check_loaded(self) -> None:
        """A worker that could not load the payload, or died before it came to load it, failed for good
        (restarting would fail the same way)."""
        if not self.payload.with_suffix(".started").exists():
            raise AutopruneError("worker processes died while starting, before loading the model: a script that asks "
                                 "for workers must run its top-level code under if __name__ == '__main__': (each "
                                 "worker imports the script again), or use workers=1")
        error = self.payload.with_suffix(".error")
        if error.exists():
            raise AutopruneError(f"worker processes cannot load the model and data sent to them "
                                 f"({error.read_text(encoding='utf-8').strip()}); define the model's class in an "
                                 "importable module (or in the script's __main__), or use workers=1")

    def _collect(self, keeps: list[np.ndarray], todo: list[int], results: list[Fitness | None]) -> None:
        """Submit ``todo`` and fill ``results``; candidates lost to a broken pool stay None."""
        assert self._pool is not None
        futures: list[tuple[int, Future[Fitness]]] = []
        with contextlib.suppress(BrokenProcessPool):
            for i in todo:
                futures.append((i, self._pool.submit(_evaluate_in_pool, keeps[i])))
        for i, future in futures:
            with contextlib.suppress(BrokenProcessPool):
                results[i] = future.result()

    def _shutdown(self, *, terminate: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        if terminate:
            for process in processes:
                if process.is_alive():
                    process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    def close(self, *, failed: bool = False) -> None:
        try:
            self._shutdown(terminate=failed)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
            super().close(failed=failed)


def import_ray() -> Any:
    """The ``ray`` module, or the one-line error saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise AutopruneError(RAY_MISSING) from exc
    return ray


class RayExecutor(Executor):
    """Ray actors (one per worker) behind a ``ray.util.ActorPool``; the payload goes to the object store once.

    Args:
        evaluator: the driver's evaluator (its :meth:`~Evaluator.state` is the payload).
        workers: actors.
        threads: torch threads per actor.
        address: ``"local"`` (or None): start a local Ray instance with ``num_cpus=workers``; ``"auto"`` or
            ``"host:port"``: connect to a running cluster. An already initialised Ray is used as it is.
        fault: test-only fault injection (:class:`Fault`).

    Raises:
        AutopruneError: Ray is not installed, the cluster cannot be reached, the model is not on the CPU,
            or ``score_fn`` / the model / the data cannot be pickled.
    """

    kind = "ray"

    def __init__(self, evaluator: Evaluator, *, workers: int, threads: int, address: str | None = None,
                 fault: Fault | None = None) -> None:
        super().__init__(evaluator, workers=workers, threads=threads)
        ray = import_ray()
        from ray.util import ActorPool

        if model_device(evaluator.state()["model"]).type != "cpu":
            raise AutopruneError("Ray workers evaluate candidates on the CPU; prune with device='cpu', or use "
                                 "workers= without ray_address")
        state = worker_state(evaluator)
        self._ray = ray
        self._actors: list[Any] = []
        self._payload: Any = None
        self._started = self._connect(address)
        try:
            try:
                # held for the executor's life: a restarted actor runs __init__ again with this reference, and Ray
                # frees the object once the driver drops its last one (the restart then fails to construct)
                self._payload = ray.put(state)
            except Exception as exc:
                raise AutopruneError(f"the model or its data cannot be sent to Ray workers ({_first_line(exc)}); "
                                     "use workers=1") from exc
            self._check_payload_loads()
            # restarts are bounded; task retries are not (-1): a task sent while its actor restarts fails fast and
            # uses up a retry (ray-project/ray#44719), so a small count can lose a task the restart would have
            # served. Once the restarts are used up the actor is dead and its tasks fail with RayActorError.
            actor = ray.remote(Worker).options(num_cpus=1, max_restarts=MAX_RESTARTS, max_task_retries=-1)
            self._actors = [actor.remote(self._payload, threads, fault) for _ in range(workers)]
            self._pool = ActorPool(self._actors)
        except BaseException:
            self.close(failed=True)
            raise

    def _connect(self, address: str | None) -> bool:
        """Initialise Ray unless it already is; True when this executor started it (and shuts it down)."""
        ray = self._ray
        if ray.is_initialized():
            return False
        if address not in (None, "local", "auto"):
            _check_reachable(address)
        try:
            # workers' output stays in Ray's log files: their failures reach the caller as one line each
            if address in (None, "local"):
                ray.init(num_cpus=self.workers, include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False)
            else:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except Exception as exc:
            raise AutopruneError(f"cannot connect to Ray at {address!r} ({_first_line(exc)}); start a cluster with "
                                 "`ray start --head`, or use ray_address='local'") from exc
        return True

    def _check_payload_loads(self) -> None:
        """Load the payload in one Ray task before starting the actors: a model class or ``score_fn`` that the
        workers cannot import fails there once, with its cause, rather than in every actor's restarts."""
        probe = self._ray.remote(_payload_loads).options(num_cpus=1, max_retries=0)
        try:
            self._ray.get(probe.remote(self._payload))
        except Exception as exc:
            raise AutopruneError(f"Ray workers cannot load the model and data sent to them ({_ray_cause(exc)}); "
                                 "define the model's class (and score_fn) in the script's __main__ or in a module "
                                 "installed on every node, or use workers=1") from None

    def _run(self, keeps: list[np.ndarray]) -> list[Fitness]:
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return list(self._pool.map(lambda actor, keep: actor.evaluate.remote(keep), keeps))
        except RayTaskError as exc:  # what the evaluation raised in the worker, without Ray's traceback
            cause = _root_cause(exc)
            if isinstance(cause, AutopruneError):
                raise AutopruneError(_plain(str(cause))) from None
            raise AutopruneError(f"a Ray worker failed evaluating a candidate ({_ray_cause(exc)})") from None
        except RayActorError as exc:
            if getattr(exc, "actor_init_failed", False):
                raise AutopruneError(f"Ray workers failed to start ({_ray_cause(exc)}); use workers=1") from None
            raise AutopruneError(f"a Ray worker died more than {MAX_RESTARTS} times evaluating candidates "
                                 f"({_ray_cause(exc)}); use fewer workers or workers=1") from exc

    def close(self, *, failed: bool = False) -> None:
        try:
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    self._ray.kill(actor)
            self._actors = []
            self._payload = None
            if self._started:
                self._started = False
                self._ray.shutdown()
        finally:
            super().close(failed=failed)


def _payload_loads(state: Mapping[str, Any]) -> None:
    """A Ray task whose argument is the workers' payload: it fails if a worker cannot unpickle it."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _plain(text: str) -> str:
    """``text`` without terminal colour codes (Ray colours its worker names)."""
    return _ANSI.sub("", text)


def _root_cause(exc: BaseException) -> BaseException:
    """The exception under Ray's wrappers (``RayTaskError.cause``, ``RaySystemError.client_exc``)."""
    for _ in range(8):
        inner = getattr(exc, "cause", None) or getattr(exc, "client_exc", None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    return exc


def _ray_cause(exc: BaseException) -> str:
    """The first line of the exception under Ray's wrappers, without colour codes."""
    return _plain(_first_line(_root_cause(exc)))


def create_executor(config: PruneConfig, evaluator: Evaluator) -> Executor:
    """The executor ``config`` asks for (:attr:`PruneConfig.executor_kind`), around the driver's evaluator.

    Raises:
        AutopruneError: Ray asked for and not installed, or the payload cannot be sent to workers.
    """
    kind = config.executor_kind
    if kind == "serial":
        return SerialExecutor(evaluator)
    threads = threads_per_worker(config)
    assert threads is not None
    fault = Fault.from_env()
    if kind == "pool":
        executor: Executor = PoolExecutor(evaluator, workers=config.workers, threads=threads, fault=fault)
    else:
        executor = RayExecutor(evaluator, workers=config.workers, threads=threads, address=config.ray_address,
                               fault=fault)
    log.info("evaluating candidates on %s", executor.describe())
    return executor


class BatchEvaluation:
    """``run_search(evaluate_batch=...)``: an ask evaluated by the executor, and one note for one-at-a-time strategies.

    A strategy that asks one candidate at a time (simulated annealing, bisection) leaves every worker but
    one idle; that is said once, at INFO, when two asks in a row held a single candidate.

    Args:
        executor: evaluates the batches.
        strategy: the strategy's name, for the note.
    """

    def __init__(self, executor: Executor, strategy: str) -> None:
        self.executor = executor
        self.strategy = strategy
        self._singles = 0
        self.noted = False

    def __call__(self, keeps: list[np.ndarray]) -> list[Fitness]:
        self._singles = self._singles + 1 if len(keeps) == 1 else 0
        if self._singles == 2 and not self.noted and self.executor.workers > 1:
            self.noted = True
            log.info("strategy %s asks one candidate at a time; %d workers cannot speed it up", self.strategy,
                     self.executor.workers)
        return self.executor.map(keeps)


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in one line, within ``timeout`` seconds, when nothing listens at a Ray ``host:port`` address
    (``ray.init`` itself retries an unreachable address for minutes)."""
    import socket

    host_port = address.split("://", 1)[-1]
    host, sep, port = host_port.rpartition(":")
    if not sep or not port.isdigit():
        raise AutopruneError(f"ray_address {address!r} is not HOST:PORT (or ray://HOST:PORT); give the head node's "
                             "address, 'auto' (a cluster started on this machine) or 'local'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise AutopruneError(f"cannot connect to Ray at {address!r} ({exc.strerror or exc}); start a cluster with "
                             "`ray start --head`, or use ray_address='local'") from None
