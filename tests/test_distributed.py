"""Data-parallel fine-tuning under torchrun: 2 gloo processes on the CPU.

Every rank trains its slice of each epoch's seeded pass; DistributedDataParallel keeps the replicas equal; the
evaluation counts are summed over the ranks; only rank 0 writes (its checkpoint, the run directory).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from autoprune.data import BatchLoader, ImageTensors
from autoprune.engine.distributed import RankSlice, World, on_main
from autoprune.engine.train import TrainConfig, evaluate, fit
from autoprune.errors import AutopruneError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n: int = 96) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    return ImageTensors(images, labels)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = _net()
        data = _data()
        loader = BatchLoader(data, 16, shuffle=True, seed=0)
        before = evaluate(model, BatchLoader(data, 10)).loss
        fit(model, loader, TrainConfig(epochs=2, lr=0.05, seed=0), checkpoint=Path(out) / f"ckpt{rank}",
            progress=False)
        shared = evaluate(model, BatchLoader(data, 10))
        alone = evaluate(model, BatchLoader(data, 10), shared=False)
        torch.save({"state": model.state_dict(), "before": before, "shared": shared, "alone": alone},
                   Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_train_equal_replicas_and_only_rank0_writes(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for key, value in r0["state"].items():  # weights and buffers: every rank ends with rank 0's statistics
        assert torch.equal(value, r1["state"][key]), f"replicas differ in {key}"
    assert r0["shared"].loss < r0["before"], "training did not lower the loss"
    assert r0["shared"].samples == r1["shared"].samples == 96  # each rank's slice, summed over the ranks
    assert r0["shared"].accuracy == pytest.approx(r0["alone"].accuracy)
    assert r0["shared"].loss == pytest.approx(r0["alone"].loss, rel=1e-6)
    assert (tmp_path / "ckpt0").exists() and not (tmp_path / "ckpt1").exists()


def test_rank_slices_cover_a_pass_once_and_step_equally():
    batches = list(range(7))
    slices = [list(RankSlice(batches, World(rank, 3))) for rank in range(3)]
    assert slices == [[0, 3], [1, 4], [2, 5]]  # batch 6 dropped: every rank steps twice
    evaluation = [list(RankSlice(batches, World(rank, 3), even=False)) for rank in range(3)]
    assert sorted(sum(evaluation, [])) == batches
    assert [len(RankSlice(batches, World(r, 3), even=False)) for r in range(3)] == [3, 2, 2]


def test_on_main_runs_in_the_only_process():
    assert on_main(lambda: 42) == 42
    with pytest.raises(AutopruneError, match="boom"):
        on_main(lambda: (_ for _ in ()).throw(AutopruneError("boom")))


@pytest.mark.slow
def test_torchrun_prune_fine_tunes_on_two_ranks_and_writes_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = [sys.executable, "-m", "autoprune"]
    base = tmp_path / "base.pt"
    subprocess.run(run + ["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "6", "--batch-size",
                          "32", "--out", str(base), "--quiet"], check=True, env=env, capture_output=True)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
         "-m", "autoprune", "prune", str(base), "--dataset", "synthetic", "--method", "l1", "--macs-reduction", "0.5",
         "--finetune-epochs", "2", "--batch-size", "16", "--latency-repeats", "3", "--out", str(out), "--quiet"],
        env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["world_size"] == 2
    assert report["finetune"]["epochs"] == 2
    assert done.stdout.count("saved ") == 1  # rank 0 alone prints
    rows = (out / "history.jsonl").read_text().splitlines()
    assert len(rows) == report["search"]["evaluations"]  # written once, not once per rank
    assert not (out / "work").exists()
