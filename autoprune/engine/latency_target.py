"""Latency as a target: searched with the per-layer latency table, checked at the end by measurement.

``latency_reduction=R`` asks for a pruned model whose *measured* latency at the latency batch size is at most
``(1 - R)`` times the base's, on the run's device. No seed paper and no common tool searches for measured
latency directly; hardware-aware pruners (NetAdapt, Yang et al. 2018; AMC, He et al. 2018) use a per-layer
latency lookup table, and so do we (:class:`~autoprune.engine.latency_table.LatencyTable`, built once per
model, device, threads and batch size, cached on disk):

* **Search.** The search's cost is ``max(MACs(x) / MACs ceiling, predicted latency(x) / latency ceiling)``,
  both relative to the unpruned model, with a ceiling of 1: a candidate is feasible when it meets every target
  it was given, and the strategies' projection onto the budget and repair work unchanged on it (it is
  monotone in every keep ratio, like MACs). Every history row carries the candidate's predicted latency.
* **Check.** After the search the chosen structure is pruned for real and timed against the base model
  (interleaved, paired per round). If the measured speed-up misses the target, the structure is shrunk along
  the line to the minimum widths, with the ceiling tightened by the miss, and measured again (a few rounds);
  if it still misses, the run fails with one line unless the miss is within the measurement's spread (the
  target lies inside the speed-up's 95% interval), which is reported as a warning instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autoprune.engine.batches import Inputs
from autoprune.engine.config import Target
from autoprune.engine.latency import Speedup, measure_latency, speedups
from autoprune.engine.latency_table import LatencyTable
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError

log = logging.getLogger(__name__)

#: Rounds of shrinking when the measured speed-up misses the target.
REPAIR_ROUNDS = 3
#: Timed rounds of the check (each runs base and candidate once).
CHECK_REPEATS = 20


def cache_dir() -> Path:
    """Where latency tables are cached: ``$AUTOPRUNE_CACHE_DIR``, else ``~/.cache/autoprune``."""
    return Path(os.environ.get("AUTOPRUNE_CACHE_DIR") or Path.home() / ".cache" / "autoprune") / "latency"


def latency_table(base: nn.Module, example: Inputs, space: PruningSpace, *, device: torch.device, batch_size: int,
                  threads: int | None, progress: bool) -> LatencyTable:
    """The cached (or newly measured) latency table of ``base`` on ``device`` at ``batch_size``."""
    return LatencyTable.load_or_build(base, example, space, cache_dir=cache_dir(), device=device,
                                      batch_size=batch_size, threads=threads, progress=progress)


def search_cost(space: PruningSpace, target: Target, table: LatencyTable | None) -> tuple[Callable[[np.ndarray], float],
                                                                                          float | None]:
    """The search's cost function and ceiling for ``target``: relative MACs (ceiling ``1 - R``) alone, or the
    largest of the targets' relative costs over their ceilings (ceiling 1)."""
    if target.latency_reduction is None or table is None:
        return space.relative_macs, None if target.macs_reduction is None else 1 - target.macs_reduction
    latency_ceiling = 1 - target.latency_reduction
    macs_ceiling = None if target.macs_reduction is None else 1 - target.macs_reduction

    def cost(keep: np.ndarray) -> float:
        value = table.predict_relative(keep) / latency_ceiling
        if macs_ceiling is not None:
            value = max(value, space.relative_macs(keep) / macs_ceiling)
        return float(value)

    return cost, 1.0


@dataclass(frozen=True)
class LatencyCheck:
    """The measured outcome of a latency target.

    Attributes:
        keep: the structure finally chosen (shrunk if the first one missed).
        speedup: its measured speed-up at the latency batch size, with spread.
        predicted: the table's predicted relative latency of ``keep``.
        rounds: how many times the structure was shrunk.
        warnings: what the report should say.
    """

    keep: np.ndarray
    speedup: Speedup
    predicted: float
    rounds: int
    warnings: tuple[str, ...]


def check(base: nn.Module, prune: Callable[[np.ndarray], nn.Module], keep: np.ndarray, space: PruningSpace,
          table: LatencyTable, target: Target, example: Inputs, *, device: torch.device, batch_size: int,
          threads: int | None) -> LatencyCheck:
    """Measure the structure ``keep`` against ``base``; shrink it while the measured speed-up misses the target.

    Args:
        prune: builds the physically pruned network of a keep vector.
    """
    assert target.latency_reduction is not None
    needed = 1 / (1 - target.latency_reduction)
    ceiling, warnings = 1.0, []
    for rounds in range(REPAIR_ROUNDS + 1):
        measured = _speedup(base, prune(keep), example, device=device, batch_size=batch_size, threads=threads)
        predicted = table.predict_relative(keep)
        if measured.ratio >= needed:
            return LatencyCheck(keep, measured, predicted, rounds, tuple(warnings))
        warnings.append(f"the structure measured {measured.ratio:.2f}x faster at batch {batch_size}, short of the "
                        f"{needed:.2f}x asked (the table predicted {1 / predicted:.2f}x); pruned further")
        if rounds == REPAIR_ROUNDS:
            break
        ceiling *= measured.ratio / needed  # the table over-promised by this much: ask it for that much more
        keep = _shrink(space, table, keep, ceiling * (1 - target.latency_reduction))
    if measured.ci95[1] >= needed:
        warnings.append(f"the measured speed-up {measured.ratio:.2f}x (95% interval {measured.ci95[0]:.2f}-"
                        f"{measured.ci95[1]:.2f}) misses the {needed:.2f}x asked within the measurement's noise")
        return LatencyCheck(keep, measured, table.predict_relative(keep), REPAIR_ROUNDS, tuple(warnings))
    raise AutopruneError(f"latency_reduction={target.latency_reduction}: the pruned model measures only "
                         f"{measured.ratio:.2f}x faster at batch {batch_size} (asked {needed:.2f}x) after "
                         f"{REPAIR_ROUNDS} rounds of pruning further; lower the target or prune more MACs")


def _speedup(base: nn.Module, pruned: nn.Module, example: Inputs, *, device: torch.device, batch_size: int,
             threads: int | None) -> Speedup:
    timings = measure_latency([base, pruned.to(device)], example, batch_sizes=[batch_size], device=device,
                              threads=threads, repeats=CHECK_REPEATS)
    return speedups(timings[0], timings[1])[batch_size]


def _shrink(space: PruningSpace, table: LatencyTable, keep: np.ndarray, relative: float) -> np.ndarray:
    """The point ``lower + t (keep - lower)`` with the largest ``t`` whose predicted relative latency is at most
    ``relative`` (bisection on snapped points; the minimum widths if even they do not reach it)."""
    lower = space.lower

    def at(t: float) -> np.ndarray:
        return space.snap(lower + t * (keep - lower))

    if table.predict_relative(at(0.0)) > relative:
        log.warning("even the minimum widths are predicted at %.2f of the base latency",
                    table.predict_relative(at(0.0)))
        return at(0.0)
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if table.predict_relative(at(mid)) <= relative:
            low = mid
        else:
            high = mid
    return at(low)
