"""Shared helpers of the CLI robustness tests: running ``autoprune`` in-process or as a subprocess, the tiny
trained LeNet-5 they prune, the settings of a fast pruning run, and the uninterrupted reference run that the
resume and determinism tests compare against.

The trained model and the reference run are cached per process (one per pytest basetemp), so every test
module that needs them shares one copy however the modules are selected.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import autoprune.cli
from autoprune.cli import main

#: A fast, deterministic pruning run: PSO (state carried across evaluations, so a resume that replayed the
#: history wrongly would diverge), enough evaluations to interrupt in the middle, two short fine-tuning epochs.
PRUNE_FAST = ["--dataset", "synthetic", "--method", "pso", "--method-option", "particles=6", "--budget", "240",
              "--macs-reduction", "0.5", "--finetune-epochs", "2", "--batch-size", "32", "--latency-batch", "8",
              "--threads", "1", "--seed", "3", "--score", "bn", "--quiet"]

_CACHE: dict[tuple[str, str], Any] = {}


@contextlib.contextmanager
def _without_figures() -> Iterator[None]:
    """Skip drawing report.html's figures (matplotlib: about a second per run); every other output is written."""
    import autoprune.report.html

    real = getattr(autoprune.report.html, "write_run_report", None)
    if real is not None:
        autoprune.report.html.write_run_report = lambda out, report: None
    try:
        yield
    finally:
        if real is not None:
            autoprune.report.html.write_run_report = real


@pytest.fixture(autouse=True)
def no_figures():
    """Pruning runs in these tests leave out the figures of report.html (see _without_figures)."""
    with _without_figures():
        yield


@pytest.fixture(scope="module", autouse=True)
def restore_subnormals():
    """Training and evaluation turn on flush-to-zero process-wide (autoprune.engine.train, for CPU speed); leave the
    process as the module found it, or later property tests cannot draw subnormal floats."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test with one intra-op thread: faster on a shared 2-core machine, and the same thread count
    in-process as in the subprocesses (``OMP_NUM_THREADS=1``), so results can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``autoprune ARGV`` in-process: (exit code, stdout, stderr); usage errors arrive as SystemExit."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, phrase: str) -> None:
    """Exactly one non-empty line on stderr, an ``autoprune: error:`` containing ``phrase``, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("autoprune: error: "), lines[0]
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"


def stop_when(monkeypatch: pytest.MonkeyPatch, condition: Callable[[], bool]) -> None:
    """Make the CLI's stop flag (what the first Ctrl-C or SIGTERM sets) read ``condition()`` each time it is asked.

    ``condition`` may also raise ``KeyboardInterrupt``: what a second Ctrl-C does. ``monkeypatch.undo()`` removes it.
    """
    flag = property(lambda self: condition(), lambda self, value: None)
    monkeypatch.setattr(autoprune.cli.StopFlag, "requested", flag, raising=False)


def assert_one_line_interruption(err: str, phrase: str) -> None:
    """Exactly one non-empty line on stderr, an ``autoprune: `` line (not an error) containing ``phrase``."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("autoprune: ") and not lines[0].startswith("autoprune: error:"), lines[0]
    assert phrase in lines[0], f"{phrase!r} not in {lines[0]!r}"


def subprocess_env() -> dict[str, str]:
    """Environment of a subprocess ``autoprune``: one intra-op thread, as in-process."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def cli_command(*argv: object) -> list[str]:
    """The command line that runs ``autoprune ARGV`` with this interpreter."""
    return [sys.executable, "-m", "autoprune.cli", *[str(a) for a in argv]]


def start_cli(*argv: object, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``autoprune ARGV`` as a real process (stdout and stderr piped); ``env`` adds variables."""
    return subprocess.Popen(cli_command(*argv), cwd=cwd, env={**subprocess_env(), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def trained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LeNet-5 trained for one epoch on the synthetic data by ``autoprune train`` (cached per session)."""
    key = (str(tmp_path_factory.getbasetemp()), "base")
    if key not in _CACHE:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            path = tmp_path_factory.mktemp("base") / "lenet5.pt"
            code = main(["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "4",
                         "--seed", "0", "--out", str(path), "--quiet"])
        finally:
            torch.set_num_threads(before)
        assert code == 0 and path.exists()
        _CACHE[key] = path
    return _CACHE[key]


def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted ``autoprune prune BASE PRUNE_FAST`` run (cached per session)."""
    key = (str(tmp_path_factory.getbasetemp()), "reference")
    if key not in _CACHE:
        base = trained_base(tmp_path_factory)
        out = tmp_path_factory.mktemp("reference") / "run"
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with _without_figures():
                assert main(["prune", str(base), *PRUNE_FAST, "--out", str(out)]) == 0
        finally:
            torch.set_num_threads(before)
        _CACHE[key] = out
    return _CACHE[key]


def history(out: Path) -> list[dict[str, Any]]:
    """The run's history.jsonl without the wall-clock column."""
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def outcome(out: Path) -> dict[str, Any]:
    """What a run decided and measured, without wall-clock times: keep vector, layers, accuracies, costs."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    payload = torch.load(out / "model.pt", weights_only=True)
    best = {k: v for k, v in report["search"]["best"].items() if k != "seconds"}
    return {
        "keep": payload["spec"]["info"]["pruned"]["keep"],
        "report_keep": report["keep"],
        "layers": report["widths"],
        "base_accuracy": report["base"]["accuracy"],
        "pruned_accuracy": report["pruned"]["accuracy"],
        "accuracy_before_finetune": report["finetune"]["accuracy_before"],
        "base_score_search": report["search"]["base_score"],
        "best": best,
        "evaluations": report["search"]["evaluations"],
        "macs": (report["base"]["macs"], report["pruned"]["macs"]),
        "params": (report["base"]["params"], report["pruned"]["params"]),
    }


def write_mnist(folder: Path, n_train: int, n_test: int, *, label: int | None = None) -> Path:
    """MNIST-layout idx files of 28x28 uint8 noise (labels cycle through 0..9, or are all ``label``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.full(n, label, np.uint8) if label is not None else (np.arange(n) % 10).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return folder


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The pruned model's saved state dict."""
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Bit-identical state dicts."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by up to {float((a[key] - b[key]).abs().max())}"
