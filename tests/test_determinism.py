"""Same seed, same machine, same thread count: the same keep vector, metrics and weights, bit for bit.

Measured on the 2-core CPU machine (LeNet-5 on the synthetic data, PSO, 240 evaluations, 2 fine-tuning
epochs): repeated runs with the same thread count are bit-identical, in the same process or not. Between
one and two intra-op threads the search history, keep vector and accuracies stay identical, and the weights
differ by float32 rounding only (at most ~4.5e-8 after training or fine-tuning). Thread counts are therefore
fixed to one in these tests, in-process and in subprocesses alike.
"""

from __future__ import annotations

import torch
from cli_helpers import (  # noqa: F401  (no_figures, one_thread, restore_subnormals: autouse)
    PRUNE_FAST,
    assert_same_weights,
    history,
    no_figures,
    one_thread,
    outcome,
    reference_run,
    restore_subnormals,
    run_cli,
    trained_base,
    weights,
)

TRAIN = ["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "4", "--seed", "0",
         "--quiet"]


def test_same_seed_gives_the_same_search_keep_vector_accuracy_and_weights(tmp_path_factory, tmp_path, capsys):
    base, reference = trained_base(tmp_path_factory), reference_run(tmp_path_factory)
    out = tmp_path / "again"
    code, _, err = run_cli(["prune", base, *PRUNE_FAST, "--out", out], capsys)
    assert code == 0, err
    assert history(out) == history(reference)
    got, want = outcome(out), outcome(reference)
    assert got["keep"] == want["keep"] and got["layers"] == want["layers"]
    assert got == want  # accuracies (validation, before and after fine-tuning), MACs, params
    assert_same_weights(weights(out), weights(reference))


def test_another_seed_searches_differently(tmp_path_factory, tmp_path, capsys):
    base, reference = trained_base(tmp_path_factory), reference_run(tmp_path_factory)
    out = tmp_path / "seed4"
    argv = ["prune", base, *PRUNE_FAST, "--seed", "4", "--budget", "12", "--finetune-epochs", "0", "--out", out]
    assert run_cli(argv, capsys)[0] == 0
    assert [r["keep"] for r in history(out)] != [r["keep"] for r in history(reference)[:12]]


def test_training_twice_in_one_process_gives_the_same_weights(tmp_path_factory, tmp_path, capsys):
    first = trained_base(tmp_path_factory)  # trained earlier in this process: the global RNG has moved since
    assert run_cli([*TRAIN, "--out", tmp_path / "again.pt"], capsys)[0] == 0
    load = lambda p: torch.load(p, weights_only=True)  # noqa: E731
    assert_same_weights(load(tmp_path / "again.pt")["state_dict"], load(first)["state_dict"])
    assert load(tmp_path / "again.pt")["spec"]["info"]["trained"] == load(first)["spec"]["info"]["trained"]

