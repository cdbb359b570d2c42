"""Interruption and resume: Ctrl-C, SIGTERM, ``kill -9``, a stop request, a full disk, a damaged history, and
two runs writing to one output directory.

An interrupted pruning run continues with ``autoprune prune --resume DIR`` and must end exactly where the
uninterrupted run with the same seed ends: the same history (without wall-clock times), keep vector,
accuracies and weights. Training and fine-tuning resume from their last epoch checkpoint with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import (  # noqa: F401  (no_figures, one_thread, restore_subnormals: autouse)
    PRUNE_FAST,
    assert_one_line_error,
    assert_one_line_interruption,
    assert_same_weights,
    history,
    no_figures,
    one_thread,
    outcome,
    reference_run,
    restore_subnormals,
    run_cli,
    start_cli,
    stop_when,
    trained_base,
    weights,
)

import autoprune.engine.train
from autoprune.data import BatchLoader
from autoprune.engine.train import TrainConfig, TrainingInterrupted, fit
from autoprune.errors import AutopruneError
from autoprune.models import NormalizedModel, create_model

BUDGET = int(PRUNE_FAST[PRUNE_FAST.index("--budget") + 1])


def _rows(out: Path) -> int:
    path = out / "history.jsonl"
    return path.read_text(encoding="utf-8").count("\n") if path.exists() else 0


def assert_matches_reference(out: Path, reference: Path) -> None:
    assert history(out) == history(reference)
    assert outcome(out) == outcome(reference)
    assert_same_weights(weights(out), weights(reference))
    assert not (out / "work").exists()


@pytest.fixture(scope="module")
def killed_runs(tmp_path_factory):
    """Real processes pruning the same model, mid-search: one killed with SIGKILL, one sent SIGINT, one SIGTERM."""
    base = trained_base(tmp_path_factory)
    root = tmp_path_factory.mktemp("interrupted")
    procs = {sig: start_cli("prune", base, *PRUNE_FAST, "--out", root / sig.name, cwd=root)
             for sig in (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)}
    rows_at_signal, deadline = {}, time.monotonic() + 300
    while len(rows_at_signal) < len(procs):  # signal each as soon as it has made a few evaluations
        assert time.monotonic() < deadline, "the runs stalled"
        for sig, proc in procs.items():
            rows = _rows(root / sig.name)
            if sig not in rows_at_signal and (rows >= 5 or proc.poll() is not None):
                proc.send_signal(sig)
                rows_at_signal[sig] = rows
        time.sleep(0.002)
    results = {}
    for sig, proc in procs.items():
        code = proc.wait(timeout=120)
        _, err = proc.communicate()
        results[sig] = (root / sig.name, code, err, rows_at_signal[sig])
    return results


def test_sigkill_mid_search_then_resume_reaches_the_uninterrupted_result(killed_runs, tmp_path_factory, capsys):
    out, code, _, _ = killed_runs[signal.SIGKILL]
    assert code == -signal.SIGKILL
    assert 5 <= _rows(out) < BUDGET and not (out / "report.json").exists()
    assert run_cli(["prune", "--resume", out], capsys)[0] == 0
    assert_matches_reference(out, reference_run(tmp_path_factory))
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["resumed_evaluations"] >= 5


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_stops_after_the_current_evaluation_and_says_how_to_resume(sig, killed_runs,
                                                                                      tmp_path_factory, capsys):
    out, code, err, rows_at_signal = killed_runs[sig]
    assert code == 130
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("autoprune: interrupted after ")
    assert f"autoprune prune --resume {out}" in err.splitlines()[-1]
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]  # all intact
    assert [r["i"] for r in rows] == list(range(len(rows)))
    assert rows_at_signal <= len(rows) < BUDGET and not (out / "report.json").exists()
    assert (out / "run.json").exists()
    code, _, err = run_cli(["prune", "--resume", out], capsys)
    assert code == 0, err
    assert_matches_reference(out, reference_run(tmp_path_factory))


@pytest.mark.parametrize("damage", ["clean", "torn-last-line", "text-accuracy"])
def test_stop_requested_in_process_then_resume(damage, tmp_path_factory, tmp_path, capsys, monkeypatch):
    base, reference = trained_base(tmp_path_factory), reference_run(tmp_path_factory)
    out = tmp_path / "run"
    stop_when(monkeypatch, lambda: _rows(out) >= 7)
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out], capsys)
    assert code == 130
    assert err.strip() == (f"autoprune: interrupted after 7 evaluations; continue with "
                           f"`autoprune prune --resume {out}`")
    assert _rows(out) == 7 and not (out / "model.pt").exists()
    if damage == "torn-last-line":  # what a hard kill in the middle of a write leaves
        with open(out / "history.jsonl", "a", encoding="utf-8") as f:
            f.write('{"i": 7, "keep": [0.5, 0.3')
    elif damage == "text-accuracy":  # well-formed JSON, but not a row autoprune wrote: ends the replay there
        lines = (out / "history.jsonl").read_text(encoding="utf-8").splitlines()
        row = json.loads(lines[3])
        row["accuracy"] = "high"
        lines[3] = json.dumps(row)
        (out / "history.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    monkeypatch.undo()
    code, _, err = run_cli(["prune", "--resume", out], capsys)
    assert code == 0, err
    assert_matches_reference(out, reference)


def test_a_second_ctrl_c_aborts_at_once_and_the_run_still_resumes(tmp_path_factory, tmp_path, capsys, monkeypatch):
    base, reference = trained_base(tmp_path_factory), reference_run(tmp_path_factory)
    out = tmp_path / "run"

    def second_ctrl_c():  # what StopFlag's handler does when Ctrl-C comes again
        if _rows(out) >= 9:
            raise KeyboardInterrupt
        return False

    stop_when(monkeypatch, second_ctrl_c)
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out], capsys)
    assert code == 130
    assert err.strip() == f"autoprune: interrupted; continue with `autoprune prune --resume {out}`"
    monkeypatch.undo()
    assert run_cli(["prune", "--resume", out], capsys)[0] == 0
    assert_matches_reference(out, reference)


def test_stop_during_finetuning_resumes_from_the_epoch_checkpoint(tmp_path_factory, tmp_path, capsys, monkeypatch,
                                                                  caplog):
    base, reference = trained_base(tmp_path_factory), reference_run(tmp_path_factory)
    out = tmp_path / "run"
    checkpoint = out / "work" / "finetune.ckpt"
    stop_when(monkeypatch, checkpoint.exists)
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out], capsys)
    assert code == 130
    assert_one_line_interruption(err, "interrupted during fine-tuning")
    assert f"--resume {out}" in err
    assert _rows(out) == BUDGET and checkpoint.exists() and not (out / "model.pt").exists()
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger="autoprune.engine.train")
    code, _, err = run_cli(["prune", "--resume", out], capsys)
    assert code == 0, err
    assert "from epoch 1" in caplog.text
    assert_matches_reference(out, reference)


# ---- the training loop ---------------------------------------------------------------------------------

def _lenet() -> NormalizedModel:
    torch.manual_seed(0)
    net = create_model("lenet5", num_classes=10, in_channels=1, image_size=(28, 28))
    return NormalizedModel(net, [0.5], [0.25])


CONFIG = TrainConfig(epochs=3, batch_size=64, lr=0.05, seed=5)


def _loader(digits, config: TrainConfig = CONFIG) -> BatchLoader:
    """A fresh shuffled loader over the training split (each process builds its own)."""
    return BatchLoader(digits.train, config.batch_size, shuffle=True, seed=config.seed)


@pytest.fixture(scope="module")
def uninterrupted(digits):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the tests (one_thread), so that the weights can be compared bit for bit
    try:
        model = _lenet()
        fit(model, _loader(digits), CONFIG, progress=False)
    finally:
        torch.set_num_threads(before)
    return model.state_dict()


def test_fit_killed_after_an_epoch_resumes_to_the_same_weights(digits, uninterrupted, tmp_path, monkeypatch):
    start = _lenet()
    checkpoint = tmp_path / "fit.ckpt"
    save = autoprune.engine.train._save_checkpoint

    def save_then_die(*args, **kwargs):  # the process dies right after epoch 1 is on disk
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(autoprune.engine.train, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        fit(copy.deepcopy(start), _loader(digits), CONFIG, checkpoint=checkpoint, progress=False)
    monkeypatch.undo()
    fresh = copy.deepcopy(start)  # a new process: nothing but the checkpoint survives
    log = fit(fresh, _loader(digits), CONFIG, checkpoint=checkpoint, progress=False)
    assert log.resumed_from_epoch == 1 and log.epochs == 2
    assert_same_weights(fresh.state_dict(), uninterrupted)


def test_fit_stops_on_request_after_an_epoch_and_resumes(digits, uninterrupted, tmp_path):
    start = _lenet()
    checkpoint = tmp_path / "fit.ckpt"
    with pytest.raises(TrainingInterrupted, match="interrupted after epoch 2 of 3"):
        model = copy.deepcopy(start)
        fit(model, _loader(digits), CONFIG, checkpoint=checkpoint, progress=False,
            stop_requested=lambda: torch.load(checkpoint, weights_only=True)["epoch"] >= 2)
    log = fit(copy.deepcopy(start), _loader(digits), CONFIG, checkpoint=checkpoint, progress=False)
    assert log.resumed_from_epoch == 2


def test_a_checkpoint_of_another_architecture_is_not_half_loaded(digits, tmp_path):
    checkpoint = tmp_path / "fit.ckpt"
    config = TrainConfig(epochs=1, batch_size=64, lr=0.05, seed=5)
    fit(_lenet(), _loader(digits, config), config, checkpoint=checkpoint, progress=False)
    wider = NormalizedModel(create_model("lenet5", num_classes=10, in_channels=1, image_size=(28, 28)), [0.5],
                            [0.25])
    wider.net.classifier[1] = torch.nn.Linear(400, 121)
    wider.net.classifier[3] = torch.nn.Linear(121, 84)
    before = copy.deepcopy(wider.state_dict())
    assert fit(wider, _loader(digits, config), config, checkpoint=checkpoint,
               progress=False).resumed_from_epoch == 0
    assert not torch.equal(wider.state_dict()["net.features.0.weight"], before["net.features.0.weight"])


def test_weights_that_become_nan_stop_training_with_the_epoch_and_learning_rate(digits):
    def nan_gradient(model):  # finite in value, NaN in gradient: only the weight check can see it
        w = model.net.features[0].weight
        return (w - w.detach()).abs().sqrt().sum()

    one_step = TrainConfig(epochs=1, batch_size=len(digits.train), lr=0.05)
    with pytest.raises(AutopruneError, match=r"weights became NaN or infinite in epoch 1 .*"
                                                              r"learning rate"):
        fit(_lenet(), _loader(digits, one_step), one_step, regularizer=nan_gradient, progress=False)


def test_train_command_interrupted_then_run_again_resumes(tmp_path, capsys, monkeypatch):
    argv = ["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "2", "--batch-size", "32", "--quiet"]
    assert run_cli([*argv, "--out", tmp_path / "straight.pt"], capsys)[0] == 0
    out = tmp_path / "m.pt"
    stop_when(monkeypatch, lambda: True)
    code, _, err = run_cli([*argv, "--out", out], capsys)
    assert code == 130
    assert_one_line_interruption(err, "train interrupted after epoch 1 of 2")
    assert err.rstrip().endswith("run the same command again to resume from the last finished epoch")
    assert not out.exists() and Path(f"{out}.ckpt").exists()
    monkeypatch.undo()
    assert run_cli([*argv, "--out", out], capsys)[0] == 0
    assert not Path(f"{out}.ckpt").exists()
    straight = torch.load(tmp_path / "straight.pt", weights_only=True)["state_dict"]
    assert_same_weights(torch.load(out, weights_only=True)["state_dict"], straight)


# ---- nothing half-written -------------------------------------------------------------------------------

def test_a_full_disk_while_saving_leaves_no_partial_file(tmp_path_factory, tmp_path, capsys, monkeypatch):
    base = trained_base(tmp_path_factory)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if str(f).endswith(".tmp") and "model.pt" in str(f):
            Path(f).write_bytes(b"half a model")
            raise OSError(28, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--budget", "4", "--finetune-epochs", "0", "--out", out],
                           capsys)
    assert code == 1
    assert_one_line_error(err, f"could not write {str(out / 'model.pt')!r}: no space left on device (ENOSPC)")
    assert not (out / "model.pt").exists() and not (out / "report.json").exists()
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert _rows(out) == 4 and (out / "run.json").exists()  # the search survives: --resume finishes the run
    monkeypatch.undo()
    assert run_cli(["prune", "--resume", out], capsys)[0] == 0
    assert (out / "model.pt").exists()


def test_an_existing_output_is_kept_without_force(tmp_path_factory, tmp_path, capsys):
    base = trained_base(tmp_path_factory)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_text("an earlier result")
    (out / "run.json").write_text("{}")
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out], capsys)
    assert code == 1 and "--force" in err
    assert (out / "model.pt").read_text() == "an earlier result"
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "notes.txt").write_text("mine")
    code, _, err = run_cli(["demo", "--out", demo, "--epochs", "0"], capsys)
    assert code == 1 and "--force" in err
    assert (demo / "notes.txt").read_text() == "mine"


def test_force_with_an_impossible_target_deletes_nothing(tmp_path_factory, tmp_path, capsys):
    base = trained_base(tmp_path_factory)
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.pt").write_text("an earlier result")
    argv = list(PRUNE_FAST)
    argv[argv.index("--macs-reduction") + 1] = "0.999"
    code, _, err = run_cli(["prune", base, *argv, "--out", out, "--force"], capsys)
    assert code == 1
    assert_one_line_error(err, "unreachable")
    assert (out / "model.pt").read_text() == "an earlier result"


def test_a_failed_run_resumes_with_new_finetuning_but_not_new_search_settings(tmp_path_factory, tmp_path, capsys):
    base = trained_base(tmp_path_factory)
    argv = list(PRUNE_FAST)
    argv[argv.index("--budget") + 1] = "12"
    failed, reference = tmp_path / "failed", tmp_path / "reference"
    code, _, err = run_cli(["prune", base, *argv, "--finetune-lr", "1000", "--out", failed], capsys)
    assert code == 1
    assert_one_line_error(err, f"lower the learning rate or check the data; the search so far is kept: after the fix, "
                               f"continue it with `autoprune prune --resume {failed}`")
    for extra, named in ((["--budget", "12"], "--budget"), ([base], "MODEL"), (["--out", tmp_path / "x"], "--out")):
        code, _, err = run_cli(["prune", "--resume", failed, *extra], capsys)
        assert code == 1
        assert_one_line_error(err, f"--resume continues the run in {str(failed)!r} with the model, data and search "
                                   f"settings it started with, so {named} cannot be given")
    code, _, err = run_cli(["prune", "--resume", failed, "--finetune-lr", "0.01"], capsys)  # the default, given
    assert code == 0, err
    assert run_cli(["prune", base, *argv, "--out", reference], capsys)[0] == 0
    assert_matches_reference(failed, reference)


def test_force_replaces_only_a_run_never_other_files(tmp_path_factory, tmp_path, capsys):
    base = trained_base(tmp_path_factory)
    notes, with_data, precious = tmp_path / "notes", tmp_path / "run", tmp_path / "precious"
    for directory, name in ((notes, "notes.txt"), (with_data / "mnist", "train-images"), (precious, "thesis.tex")):
        directory.mkdir(parents=True)
        (directory / name).write_text("mine")
    (tmp_path / "link").symlink_to(precious)
    for out in (notes, with_data, tmp_path / "link"):
        code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out, "--force"], capsys)
        assert code == 1
        assert_one_line_error(err, "is not empty and holds no autoprune run (it holds '")
    # a model.pt alone is not a run; beside run.json it is, with the user's files around or inside it
    (with_data / "model.pt").write_text("an earlier result")
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", with_data, "--force"], capsys)
    assert code == 1 and "holds no autoprune run (it holds 'mnist', 'model.pt')" in err
    (with_data / "run.json").write_text("{}")
    (with_data / "work" / "mine").mkdir(parents=True)
    (with_data / "work" / "mine" / "thesis.tex").write_text("mine")
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", with_data, "--force"], capsys)
    assert code == 1
    assert_one_line_error(err, "holds an autoprune run and also 'mnist', 'work/mine', which autoprune did not write")
    assert [(notes / "notes.txt").read_text(), (with_data / "mnist" / "train-images").read_text(),
            (precious / "thesis.tex").read_text(), (with_data / "model.pt").read_text(),
            (with_data / "work" / "mine" / "thesis.tex").read_text()] == [
        "mine", "mine", "mine", "an earlier result", "mine"]


# ---- one run per output directory ------------------------------------------------------------------------

def test_a_second_run_into_a_busy_out_is_refused_and_force_deletes_nothing(tmp_path_factory, tmp_path, capsys):
    base, reference = trained_base(tmp_path_factory), reference_run(tmp_path_factory)
    out = tmp_path / "shared"
    holder = start_cli("prune", base, *PRUNE_FAST, "--out", out, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while _rows(out) < 1:  # the holder has locked the directory and started its search
            assert holder.poll() is None, holder.communicate()
            assert time.monotonic() < deadline, "the first run stalled"
            time.sleep(0.01)
        for extra in ([], ["--force"]):
            rows = _rows(out)
            code, stdout, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out, *extra], capsys)
            assert code == 1 and stdout == ""
            assert_one_line_error(err, f"is in use by another autoprune run (pid {holder.pid} on host ")
            assert (out / "run.json").exists() and _rows(out) >= rows  # nothing deleted, the history still grows
        refused_while_running = holder.poll() is None
    finally:
        code = holder.wait(timeout=300)
    _, err = holder.communicate()
    assert code == 0, err
    assert refused_while_running, "the first run finished before the second was tried: the test proved nothing"
    assert_matches_reference(out, reference)  # the first run completed undisturbed
