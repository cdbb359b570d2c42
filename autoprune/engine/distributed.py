"""Data-parallel fine-tuning under ``torchrun``: one process group, rank 0 decides, every rank trains.

``torchrun --nproc_per_node=N -m autoprune prune ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set. :func:`context` joins them into a process group (gloo on the CPU, nccl on CUDA). Rank 0
runs the search and the surgery and broadcasts the pruned model; every rank then fine-tunes it under
``DistributedDataParallel`` on its own slice of each epoch's seeded pass over the training loader (batch
``i`` goes to rank ``i mod N``; all ranks see the same number of batches), evaluation counts are summed with
``all_reduce``, and only rank 0 writes files. SyncBatchNorm is used on CUDA only (gloo has no fast path for it
and CPU runs gain nothing from it).

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here is a no-op and one process does it all.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoprune.errors import AutopruneError, first_line

log = logging.getLogger(__name__)

#: Wrappers that run a network on several devices; the network itself is their ``.module``.
PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


@dataclass(frozen=True)
class World:
    """This process's place in the group: ``rank`` of ``size`` (size 1: not distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this process writes files and measures."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.size > 1


def world() -> World:
    """The current process group (a single process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def launched_by_torchrun() -> bool:
    """Whether the environment of ``torchrun`` asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: torch.device) -> World:
    """Join the process group ``torchrun`` describes (once); a no-op outside ``torchrun``.

    On CUDA each rank uses the GPU ``LOCAL_RANK`` names; the backend is nccl there, gloo on the CPU.
    """
    if not launched_by_torchrun():
        return World()
    if dist.is_initialized():
        return world()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:  # rank 0 searches while the others wait for its structure: allow it hours
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=48))
    except Exception as exc:  # a bad MASTER_ADDR/PORT, a missing peer
        raise AutopruneError(f"cannot join the torchrun process group ({type(exc).__name__}: {exc}); start with "
                             "`torchrun --nproc_per_node=N -m autoprune ...`") from exc
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return world()


def device_for_rank(device: torch.device) -> torch.device:
    """On CUDA under torchrun, the GPU of this rank (``LOCAL_RANK``); otherwise ``device``."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def join(device: torch.device) -> torch.device:
    """This rank's device (:func:`device_for_rank`), with the ``torchrun`` process group joined (:func:`init_from_env`);
    ``device`` itself outside ``torchrun``."""
    device = device_for_rank(device)
    init_from_env(device)
    return device


def broadcast(obj: Any, *, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; models included). Identity when not distributed."""
    here = world()
    if not here.distributed:
        return obj
    box = [obj if here.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run by rank 0 only, its value (or its error) shared with every rank.

    A failure on rank 0 is re-raised on every rank as the same one-line :class:`AutopruneError`, so the other
    ranks end with the same message instead of a broken connection.
    """
    here = world()
    if not here.distributed:
        return fn()
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if here.main:
        try:
            outcome = ("ok", fn())
        except Exception as exc:
            error = exc
            text = first_line(exc)
            outcome = ("error", text if isinstance(exc, AutopruneError) else f"{type(exc).__name__}: {text}")
    status, value = broadcast(outcome)
    if error is not None:
        raise error
    if status == "error":
        raise AutopruneError(f"rank 0 failed: {value}")
    return value


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if world().distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks."""
    if not world().distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


class RankSlice:
    """The batches of a loader that belong to one rank: batch ``i`` of a pass goes to rank ``i mod size``.

    Every rank iterates the same seeded pass (same order), so together they cover it once. With ``even`` (for
    training), trailing batches that would give ranks unequal counts are dropped: ``DistributedDataParallel``
    needs every rank to step equally. Without it (evaluation), every batch is kept.
    """

    def __init__(self, loader: Iterable[Any], here: World, *, even: bool = True) -> None:
        self.loader, self.here, self.even = loader, here, even

    def set_epoch(self, epoch: int) -> None:
        """Forward ``set_epoch`` to the wrapped loader."""
        from autoprune.engine.batches import set_epoch

        set_epoch(self.loader, epoch)

    def __len__(self) -> int:
        total = len(self.loader)  # type: ignore[arg-type]
        if self.even:
            return total // self.here.size
        return len(range(self.here.rank, total, self.here.size))

    def __iter__(self) -> Iterator[Any]:
        limit = (len(self) * self.here.size) if self.even and hasattr(self.loader, "__len__") else None
        for i, batch in enumerate(self.loader):
            if limit is not None and i >= limit:
                break
            if i % self.here.size == self.here.rank:
                yield batch


def wrap_for_training(model: nn.Module, here: World) -> nn.Module:
    """``model`` under DistributedDataParallel; ``model`` itself when alone.

    On CUDA its BatchNorm layers are swapped for SyncBatchNorm for the duration (see :func:`unwrap`).
    """
    if not here.distributed:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped = nn.parallel.DistributedDataParallel(synced, device_ids=[device.index])
        wrapped._autoprune_bn_kinds = kinds  # type: ignore[attr-defined]
        return wrapped
    return nn.parallel.DistributedDataParallel(model)


def unwrap(trained: nn.Module, model: nn.Module) -> None:
    """After training: every rank takes rank 0's buffers (BatchNorm statistics follow each rank's own batches),
    so the replicas are identical; on CUDA the BatchNorm layers SyncBatchNorm replaced are put back."""
    if trained is model:
        return
    for buffer in trained.module.buffers():
        dist.broadcast(buffer.data, src=0)
    kinds = getattr(trained, "_autoprune_bn_kinds", None)
    if not kinds:
        return
    inner = trained.module
    for name, kind in kinds.items():
        sync = inner.get_submodule(name)
        bn = kind(sync.num_features, sync.eps, sync.momentum, sync.affine, sync.track_running_stats)
        bn.load_state_dict(sync.state_dict())
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, bn.to(next(sync.parameters(), sync.running_mean).device))
