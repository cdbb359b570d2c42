"""Saved models: round trip, weights_only loading, refusal of code-running or foreign files, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import small_model

import autoprune
from autoprune.engine.space import PruningSpace
from autoprune.errors import AutopruneError
from autoprune.io.artifact import atomic_path, make_spec, save_model


def pruned_lenet(tmp_path):
    model, x = small_model("lenet5")
    space = PruningSpace(model, x[:1])
    pruned = space.apply(model, space.snap([0.5, 0.4, 0.3, 0.6]), [torch.rand(g.channels) for g in space.groups])
    spec = make_spec(pruned, name="lenet5", args={"num_classes": 10, "in_channels": 1, "image_size": (28, 28)})
    path = tmp_path / "model.pt"
    save_model(path, pruned, spec)
    return pruned, x, path


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg11"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name):
    model, x = small_model(name)
    space = PruningSpace(model, x[:1])
    keep = space.snap(np.random.default_rng(1).uniform(space.lower, 1))
    pruned = space.apply(model, keep, [torch.rand(g.channels) for g in space.groups]).eval()
    args = {"num_classes": 10, "in_channels": x.shape[1], "image_size": tuple(x.shape[2:])}
    if name != "lenet5":
        args["width"] = 0.25
    path = tmp_path / "m.pt"
    save_model(path, pruned, make_spec(pruned, name=name, args=args))
    raw = torch.load(path, weights_only=True)  # loads with the safe unpickler
    assert raw["format"] == "autoprune-model"
    loaded = autoprune.load(path)
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)


def test_loaded_model_takes_unnormalised_images(tmp_path):
    pruned, x, path = pruned_lenet(tmp_path)
    loaded = autoprune.load(path)
    assert loaded.normalize.mean.flatten().tolist() == [0.5]
    torch.testing.assert_close(loaded(x), pruned.eval()(x))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-autoprune-test",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "autoprune-model", "version": 1, "spec": {}, "state_dict": {}, "x": _Exploit()}, path)
    with pytest.raises(AutopruneError, match="could run code"):
        autoprune.load(path)
    assert not (tmp_path / "pwned-by-autoprune-test").exists()


@pytest.mark.parametrize("content, match", [
    (b"", "cannot read"),
    (b"not a torch file at all", "cannot read"),
])
def test_unreadable_files_are_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(AutopruneError, match=match):
        autoprune.load(path)


def test_truncated_model_file(tmp_path):
    _, _, path = pruned_lenet(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AutopruneError, match="truncated"):
        autoprune.load(path)


def test_foreign_checkpoint_and_missing_file(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(small_model("lenet5")[0].state_dict(), path)
    with pytest.raises(AutopruneError, match="not an autoprune model"):
        autoprune.load(path)
    with pytest.raises(AutopruneError, match="does not exist"):
        autoprune.load(tmp_path / "missing.pt")


def test_architecture_mismatch(tmp_path):
    pruned, _, path = pruned_lenet(tmp_path)
    payload = torch.load(path, weights_only=True)
    payload["spec"]["layers"]["net.classifier.1"]["out"] += 1  # spec and weights disagree
    torch.save(payload, path)
    with pytest.raises(AutopruneError, match="architecture mismatch"):
        autoprune.load(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    target = tmp_path / "report.json"
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~mask
