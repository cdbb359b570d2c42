"""Honest latency measurement: interleaved timed runs, medians with their spread, paired speed-ups.

The protocol (DESIGN.md, "Evaluation protocol"): eval mode, no gradients, a fixed number of intra-op
threads, warm-up runs, then repeated timed runs whose median is reported, with CUDA synchronised
around every timed run on a GPU. Models measured together are *interleaved*: round ``r`` runs every
model once, in an order that rotates each round (with two models: A B, B A, A B, ...), so a burst of
load from another process, frequency scaling or a cache warmed by the previous call hits all of them
alike and none always runs first.

A median alone hides how noisy the machine was, so every result carries its spread:
:class:`Timing` holds the quartiles and a bootstrap 95% interval of the median and says whether the
measurement is ``reliable``; :class:`Speedup` is the median of the per-round *paired* ratios
base/pruned, which cancels load that changes between rounds (both models of a round see the same
machine), with the same statistics. On a busy machine quote the ratio, not the milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.errors import AutopruneError

log = logging.getLogger(__name__)

Inputs = torch.Tensor | tuple[Any, ...] | list[Any]
"""Example inputs of a model: one tensor or a tuple/list of them, dim 0 the batch."""

MAX_RELATIVE_SPREAD = 0.25
"""A measurement whose interquartile range exceeds this fraction of its median is not reliable."""

MAX_RELATIVE_CI = 0.30
"""A measurement whose bootstrap 95% interval of the median is wider than this fraction of it is not reliable."""

MIN_RELIABLE_SAMPLES = 5
"""Fewer timed runs than this never make a reliable measurement (quartiles of 3 numbers say little)."""

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
"""What a timed run measures. ``"wall"`` (the protocol's default): elapsed time, what a user waits.
``"process"``: CPU seconds of this process, which excludes the time other processes hold the cores, so
it stays meaningful on a shared, oversubscribed machine, but only with ``threads=1`` (it sums the time of
all threads, spin-waiting included) and only on the CPU."""


# ---- statistics ---------------------------------------------------------------------------------

def round_sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (for JSON reports)."""
    return float(f"{value:.{digits}g}") if np.isfinite(value) else float(value)


def _summary(samples: Sequence[float], seed: int) -> tuple[float, float, float, tuple[float, float]]:
    """Median, first and third quartile, and a seeded bootstrap 95% interval of the median."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise AutopruneError("no samples to summarise; time at least one run (repeats >= 1)")
    if not np.all(np.isfinite(x)):
        raise AutopruneError("timing samples contain NaN or inf; check the timer")
    q1, median, q3 = (float(v) for v in np.percentile(x, [25.0, 50.0, 75.0]))
    if x.size == 1:
        return median, q1, q3, (median, median)
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, x.size, size=(BOOTSTRAP_RESAMPLES, x.size))], axis=1)
    lo, hi = (float(v) for v in np.percentile(medians, [2.5, 97.5]))
    return median, q1, q3, (lo, hi)


def _is_reliable(median: float, q1: float, q3: float, ci95: tuple[float, float], n: int) -> bool:
    if n < MIN_RELIABLE_SAMPLES or median <= 0:
        return False
    return (q3 - q1) / median <= MAX_RELATIVE_SPREAD and (ci95[1] - ci95[0]) / median <= MAX_RELATIVE_CI


@dataclass(frozen=True)
class Timing:
    """Milliseconds per forward pass of one model at one batch size, with the spread of the runs.

    ``reliable`` is False when the interquartile range exceeds :data:`MAX_RELATIVE_SPREAD` of the
    median, when the bootstrap 95% interval of the median is wider than :data:`MAX_RELATIVE_CI` of it,
    or with fewer than :data:`MIN_RELIABLE_SAMPLES` runs: re-measure on a quieter machine or with
    more repeats before quoting it.
    """

    median_ms: float
    q1_ms: float
    q3_ms: float
    n: int
    ci95: tuple[float, float]
    samples: tuple[float, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def from_samples(cls, samples: Sequence[float], *, seed: int = BOOTSTRAP_SEED) -> Timing:
        """Summarise timed runs (milliseconds); the bootstrap is seeded, so the result is reproducible."""
        median, q1, q3, ci = _summary(samples, seed)
        return cls(median, q1, q3, len(samples), ci, tuple(float(s) for s in samples))

    @property
    def iqr_ms(self) -> float:
        """Interquartile range."""
        return self.q3_ms - self.q1_ms

    @property
    def relative_spread(self) -> float:
        """Interquartile range over the median (0.1: the middle half of the runs lie within 10%)."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    @property
    def reliable(self) -> bool:
        """Whether the runs agree well enough to quote the median (see the class docstring)."""
        return _is_reliable(self.median_ms, self.q1_ms, self.q3_ms, self.ci95, self.n)

    def to_json(self) -> dict[str, Any]:
        """Plain, rounded values for reports (the raw samples are left out)."""
        return {"median_ms": round_sig(self.median_ms), "q1_ms": round_sig(self.q1_ms), "q3_ms": round_sig(self.q3_ms),
                "ci95_ms": [round_sig(self.ci95[0]), round_sig(self.ci95[1])], "n": self.n,
                "relative_spread": round(self.relative_spread, 4), "reliable": self.reliable}


@dataclass(frozen=True)
class Speedup:
    """How many times faster ``pruned`` ran than ``base``: the median of per-round paired ratios.

    Each timed round runs both models back to back, so the ratio of one round cancels whatever load
    the machine had during it; the quartiles and the bootstrap interval describe these ratios.
    ``reliable`` follows the same thresholds as :class:`Timing`.
    """

    ratio: float
    q1: float
    q3: float
    n: int
    ci95: tuple[float, float]

    @property
    def reliable(self) -> bool:
        """Whether the per-round ratios agree well enough to quote the median."""
        return _is_reliable(self.ratio, self.q1, self.q3, self.ci95, self.n)

    def to_json(self) -> dict[str, Any]:
        """Plain, rounded values, e.g. ``{"ratio": 1.93, "q1": 1.9, "q3": 1.97, "ci95": [..], ...}``."""
        return {"ratio": round(self.ratio, 3), "q1": round(self.q1, 3), "q3": round(self.q3, 3),
                "ci95": [round(self.ci95[0], 3), round(self.ci95[1], 3)], "n": self.n, "reliable": self.reliable}


def speedup(base: Sequence[float], pruned: Sequence[float], *, seed: int = BOOTSTRAP_SEED) -> Speedup:
    """The speed-up of ``pruned`` over ``base`` from paired samples (sample i of both from round i)."""
    b = np.asarray(base, dtype=np.float64)
    p = np.asarray(pruned, dtype=np.float64)
    if b.shape != p.shape or b.ndim != 1:
        raise AutopruneError(f"speed-up needs paired samples of equal length, got {b.size} and {p.size}; "
                             "measure both models together with measure_latency")
    if np.any(b <= 0) or np.any(p <= 0):
        raise AutopruneError("speed-up needs positive timings; check the timer")
    median, q1, q3, ci = _summary(b / p, seed)
    return Speedup(median, q1, q3, b.size, ci)


def speedups(base: Mapping[int, Timing], pruned: Mapping[int, Timing]) -> dict[int, Speedup]:
    """Per batch size, the paired speed-up of two models' timings from one :func:`measure_latency` call."""
    missing = sorted(set(base) ^ set(pruned))
    if missing:
        raise AutopruneError(f"batch sizes {missing} were timed for only one of the two models; measure both together")
    return {b: speedup(base[b].samples, pruned[b].samples) for b in base}


def by_batch_json(values: Mapping[int, Timing | Speedup]) -> dict[str, dict[str, Any]]:
    """``{"64": value.to_json(), ...}``: timings or speed-ups by batch size, as reports write them."""
    return {str(b): v.to_json() for b, v in sorted(values.items())}


# ---- inputs, devices, threads ------------------------------------------------------------------

def batch_of(example_inputs: Inputs, batch_size: int, device: torch.device | str = "cpu") -> Inputs:
    """A batch of ``batch_size`` samples shaped like ``example_inputs`` (same per-sample shapes and dtypes).

    Floating-point tensors are drawn uniformly from [0, 1) (their values do not change the work a CNN
    does); integer and boolean tensors (token ids, masks) are copied, repeating the example's samples
    along dim 0. Non-tensor entries of a tuple are passed through unchanged.
    """
    if batch_size < 1:
        raise AutopruneError(f"batch size must be >= 1, got {batch_size}")
    if isinstance(example_inputs, tuple | list):
        items = [_batch_one(x, batch_size, device) for x in example_inputs]
        if hasattr(example_inputs, "_fields"):  # a namedtuple takes its fields as arguments
            return type(example_inputs)(*items)
        return type(example_inputs)(items)
    if not isinstance(example_inputs, torch.Tensor):
        raise AutopruneError(f"example inputs must be a tensor or a tuple of tensors, got "
                             f"{type(example_inputs).__name__}")
    return _batch_one(example_inputs, batch_size, device)


def _batch_one(x: Any, batch_size: int, device: torch.device | str) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() == 0 or x.shape[0] == 0:
        raise AutopruneError(f"an example input of shape {tuple(x.shape)} has no batch dimension; "
                             "pass tensors shaped (N, ...) with N >= 1")
    if x.is_floating_point() or x.is_complex():
        return torch.rand(batch_size, *x.shape[1:], dtype=x.dtype, device=device)
    index = torch.arange(batch_size, device=x.device) % x.shape[0]
    return x.detach()[index].to(device)


def call(model: Callable[..., Any], inputs: Inputs) -> Any:
    """Run ``model`` on example inputs: ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def _cpu_model() -> str:
    name = platform.processor() or platform.machine() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name


def device_description(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """The device a measurement ran on: the CPU model and thread count, or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    if device.type != "cpu":
        return device.type
    threads = threads or torch.get_num_threads()
    return f"{_cpu_model()} ({threads} thread{'s' if threads != 1 else ''})"


@contextlib.contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` intra-op threads (the current number if None), restored afterwards."""
    if threads is not None and threads < 1:
        raise AutopruneError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so a timer brackets the work itself."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_clock(clock: str, device: torch.device | str, threads: int | None) -> Callable[[], float]:
    """The timer for a clock name, refusing combinations that would not measure latency."""
    if clock not in CLOCKS:
        raise AutopruneError(f"unknown clock {clock!r}; valid clocks: {', '.join(CLOCKS)}")
    if clock == "process" and torch.device(device).type != "cpu":
        raise AutopruneError("the 'process' clock measures CPU time; use clock='wall' on a GPU")
    if clock == "process" and threads != 1:
        raise AutopruneError("the 'process' clock sums the CPU time of all threads; use it with threads=1")
    return CLOCKS[clock]


_ALLOCATOR = "default"


def steady_allocator() -> bool:
    """Keep glibc's malloc from handing freed tensor memory back to the OS (process-wide, irreversible).

    With glibc's defaults, large tensors are mmap'ed and freed memory at the top of the heap is
    trimmed, so a CPU forward pass page-faults on fresh memory for many of its activations, how many
    depending chaotically on the sequence of tensor sizes: on ResNet-20 at batch 64 (2-core Xeon) 0 to
    16k faults per pass, up to a quarter of its latency, differing between two pruned networks of
    similar size. Raising the mmap and trim thresholds (as ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` in the environment, or jemalloc / tcmalloc, which tuned CPU deployments
    use) removes that noise. Call it before timing, once; returns whether it took effect (Linux glibc).
    """
    global _ALLOCATOR
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-3, 256 << 20) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False
    if ok:
        _ALLOCATOR = "glibc steady (mmap threshold 256 MiB, trim threshold 1 GiB)"
        log.info("malloc: %s", _ALLOCATOR)
    return ok


def allocator() -> str:
    """How this process's allocator was set up for timing (``"default"`` unless :func:`steady_allocator` ran)."""
    return _ALLOCATOR


def warn_if_busy(what: str, clock: str = "wall") -> float:
    """Log a warning when more processes want to run than there are cores; returns the 1-minute load average."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return float("nan")
    cores = os.cpu_count() or 1
    if load > cores and clock == "wall":
        log.warning("the machine is busy while timing %s (load average %.1f on %d cores): wall-clock timings "
                    "are inflated and noisy, multi-threaded ones most; compare ratios measured together, or "
                    "time with threads=1 and clock='process'", what, load, cores)
    return load


def _check_devices(models: Sequence[nn.Module], device: torch.device) -> None:
    for i, m in enumerate(models):
        p = next(iter(m.parameters()), None) if isinstance(m, nn.Module) else None
        if p is not None and p.device.type != device.type:
            raise AutopruneError(f"model {i} is on {p.device} but the measurement is on {device}; "
                                 f"move it with model.to({str(device)!r}) or pass device={str(p.device)!r}")


# ---- timed runs -------------------------------------------------------------------------------

def round_order(round_index: int, count: int) -> list[int]:
    """The order in which round ``round_index`` runs ``count`` models: rotated by one each round."""
    return [(round_index + k) % count for k in range(count)]


def time_interleaved(calls: Sequence[Callable[[], Any]], *, warmup: int, repeats: int,
                     device: torch.device | str = "cpu", number: Sequence[int] | None = None, settle: int = 0,
                     clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Milliseconds per call of each callable in ``repeats`` interleaved rounds (see :func:`round_order`).

    Args:
        calls: zero-argument callables, e.g. one forward pass each.
        warmup: untimed calls of each callable first.
        repeats: timed rounds; each yields one sample per callable.
        device: synchronised before and after every timed sample when it is a GPU.
        number: calls per sample for each callable (the sample is their mean): several calls per
            sample make sub-millisecond timings less sensitive to timer and scheduler jitter.
        settle: untimed calls of a callable right before each of its samples, so that every sample
            sees warm caches and a settled allocator, as a network's layers do when it runs, not the
            state the previous callable left.
        clock: seconds; injectable for tests.
    """
    if repeats < 1 or warmup < 0 or settle < 0:
        raise AutopruneError(f"need repeats >= 1, warmup >= 0 and settle >= 0, got {repeats}, {warmup}, {settle}")
    number = list(number) if number is not None else [1] * len(calls)
    if len(number) != len(calls) or any(k < 1 for k in number):
        raise AutopruneError("number must give a count >= 1 for every callable")
    for fn in calls:
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        for i in round_order(r, len(calls)):
            fn, k = calls[i], number[i]
            for _ in range(settle):
                fn()
            synchronize(device)
            start = clock()
            for _ in range(k):
                fn()
            synchronize(device)
            samples[i].append((clock() - start) * 1000.0 / k)
    return samples


def measure_latency(models: Sequence[nn.Module], example_inputs: Inputs, *, batch_sizes: Sequence[int] = (1, 64),
                    device: torch.device | str = "cpu", threads: int | None = None, warmup: int = 10,
                    repeats: int = 30, clock: str = "wall") -> list[dict[int, Timing]]:
    """Latency of several models by the protocol, their timed runs interleaved round by round.

    Args:
        models: the models, already on ``device``; each one's train/eval mode is restored afterwards.
        example_inputs: a tensor or tuple of tensors (dim 0 the batch) from which each batch size's
            inputs are made once (:func:`batch_of`) and shared by all models.
        batch_sizes: batch sizes to time.
        device: where the inputs are made and the models run.
        threads: intra-op threads during the measurement (default: the current setting), restored after.
        warmup: untimed runs per model and batch size.
        repeats: timed rounds per batch size; round r runs every model once.
        clock: ``"wall"`` or ``"process"`` (CPU time, threads=1 only; see :data:`CLOCKS`).

    Returns:
        Per model, a :class:`Timing` per batch size. Pass two models' timings to :func:`speedups` for
        their paired speed-up.
    """
    if not models:
        raise AutopruneError("no models to measure; pass at least one")
    if any(b < 1 for b in batch_sizes):
        raise AutopruneError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    device = torch.device(device)
    timer = resolve_clock(clock, device, threads)
    _check_devices(models, device)
    warn_if_busy(f"{len(models)} model(s)", clock)
    modes = [m.training for m in models]
    results: list[dict[int, Timing]] = [{} for _ in models]
    try:
        for m in models:
            m.eval()
        with fixed_threads(threads), torch.no_grad():
            for b in batch_sizes:
                inputs = batch_of(example_inputs, b, device)
                calls = [_bound(m, inputs) for m in models]
                samples = time_interleaved(calls, warmup=warmup, repeats=repeats, device=device, clock=timer)
                for result, s in zip(results, samples, strict=True):
                    result[b] = Timing.from_samples(s)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    for i, result in enumerate(results):
        for b, t in result.items():
            if t.reliable:
                continue
            if t.n < MIN_RELIABLE_SAMPLES:
                log.warning("latency of model %d at batch %d rests on %d timed round(s), fewer than %d: not a "
                            "measurement to quote; raise latency_repeats (--latency-repeats)", i, b, t.n,
                            MIN_RELIABLE_SAMPLES)
            else:
                log.warning("latency of model %d at batch %d is noisy (median %.3f ms, IQR %.0f%% of it); "
                            "re-measure on a quieter machine or with more repeats", i, b, t.median_ms,
                            100 * t.relative_spread)
    return results


def _bound(model: Callable[..., Any], inputs: Inputs) -> Callable[[], Any]:
    return lambda: call(model, inputs)
