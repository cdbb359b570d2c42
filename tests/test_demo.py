"""The one end-to-end run on the embedded sample: `autoprune demo`, shortened."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_helpers import one_thread, restore_subnormals  # noqa: F401  (autouse)

import autoprune
from autoprune.cli import main

pytest.importorskip("mlxtend")


@pytest.mark.slow
def test_demo_trains_prunes_and_prints_the_before_after_table(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--method", "gdp", "--epochs", "2", "--finetune-epochs", "1", "--out", str(out), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    for word in ("base", "pruned", "accuracy", "params", "MACs", "latency b=1", "latency b=64"):
        assert word in printed
    change = next(line for line in printed.splitlines() if line.startswith("change"))
    assert re.search(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", change), change  # speed-up with its interval
    report = json.loads((out / "pruned" / "report.json").read_text())
    assert report["reduction"]["macs"] >= 0.7 - 1e-9
    assert report["base"]["accuracy"] > 0.5  # really trained on real digits
    model = autoprune.load(out / "pruned" / "model.pt")
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert (out / "pruned" / "report.md").read_text().startswith("# autoprune")
    assert (out / "pruned" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert report["finetune"]["epochs"] == 1 and report["method"] == "gdp"
