"""Bad input at the command line: one clear line on stderr, a non-zero exit, no traceback, no long work.

The matrix runs in-process through ``autoprune.cli.main``; a few cases run again as real processes to show
that nothing else (a traceback, a warning) reaches the terminal. A property-based test throws random
arguments and config values at the CLI and at the config classes: they either work or fail cleanly.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import (  # noqa: F401  (one_thread, restore_subnormals: autouse fixtures)
    assert_one_line_error,
    one_thread,
    restore_subnormals,
    run_cli,
    start_cli,
    trained_base,
    write_mnist,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from autoprune.cli import build_parser
from autoprune.engine.config import PruneConfig, Target
from autoprune.engine.train import TrainConfig
from autoprune.errors import AutopruneError

USAGE, ERROR = 2, 1


class _Payload:
    """A pickle that would create a directory when loaded: the proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


CONFIGS = {  # --config files, by name
    "cfg_unknown": "macs: 0.5\n",
    "cfg_bad_value": "budget: zero\n",
    "cfg_bad_bool": "quiet: maybe\n",
    "cfg_range": "macs_reduction: 1.5\n",
    "cfg_options": "method_options: 5\n",
    "cfg_option_name": "method: pso\nmethod_options: {particle: 4}\n",
    "cfg_not_yaml": "macs_reduction: [0.5\n",
    "cfg_list": "- 1\n- 2\n",
    "cfg_out_int": "out: 123\n",
    "cfg_option_singular": "method_option: [particles=2]\n",
    "cfg_pso": "method: pso\nmethod_options: {particles: 3}\n",
    "cfg_huge_option": "method: pso\nmethod_options: {particles: [" + ", ".join(["1"] * 5000) + "]}\n",
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained model and every kind of bad file and directory, by name (absolute paths as strings)."""
    base = trained_base(tmp_path_factory)
    d = tmp_path_factory.mktemp("bad-inputs")
    good = torch.load(base, weights_only=True)
    made: dict[str, Path] = {"base": base, "marker": d / "PAYLOAD-RAN"}

    def variant(name: str, change) -> None:
        payload = torch.load(base, weights_only=True)
        change(payload)
        torch.save(payload, d / name)
        made[name.removesuffix(".pt")] = d / name

    def seven_classes(payload) -> None:  # a consistent file of a model trained on 7 classes
        payload["spec"]["dataset"].update(num_classes=7, classes=payload["spec"]["dataset"]["classes"][:7])

    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.pt").write_bytes(b"hello, this is not a model")
    data = base.read_bytes()
    (d / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save(good["state_dict"], d / "foreign.pt")  # a bare state_dict: another tool's checkpoint
    torch.save({**good, "x": _Payload(made["marker"])}, d / "evil.pt")
    with open(d / "evil_raw.pkl", "wb") as f:  # a plain pickle, not even a torch file
        pickle.dump({"format": "autoprune-model", "x": _Payload(made["marker"])}, f, protocol=2)
    variant("mismatch.pt", lambda p: p["spec"]["modules"]["net.classifier.1"].update(out_features=7))
    variant("wrongarch.pt", lambda p: p["spec"]["architecture"].update(name="resnet20"))
    variant("v99.pt", lambda p: p.update(version=99))
    variant("v1.pt", lambda p: p.update(version=1))
    variant("classes7.pt", seven_classes)
    variant("factory.pt", lambda p: p["spec"].update(architecture={"kind": "factory", "path": "okmodule_xyz:lenet",
                                                                   "args": p["spec"]["architecture"]["args"]}))
    for name in ("empty", "garbage", "trunc", "foreign", "evil"):
        made[name] = d / f"{name}.pt"
    made["evil_raw"] = d / "evil_raw.pkl"
    (d / "emptydir").mkdir()
    (d / "nonempty").mkdir()
    (d / "nonempty" / "keep.txt").write_text("precious")
    (d / "afile").write_text("x")
    (d / "holder").mkdir()
    shutil.copy(base, d / "holder" / "model.pt")
    made["held"] = d / "holder" / "model.pt"
    damaged = d / "damaged-run"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"config": {"method": "l1", "macs_red')
    nokeys = d / "nokeys-run"
    nokeys.mkdir()
    (nokeys / "run.json").write_text('{"config": {"method": "l1"}}')
    badvalue = d / "badvalue-run"
    badvalue.mkdir()
    config = PruneConfig(method="l1", target=Target(macs_reduction=0.5)).to_json()
    (badvalue / "run.json").write_text(json.dumps({"config": {**config, "budget": "abc"}}))
    badinvocation = d / "badinvocation-run"
    badinvocation.mkdir()
    (badinvocation / "run.json").write_text(json.dumps({"config": config, "invocation": {
        "model": str(base), "dataset": "mnist", "limit": "abc"}}))
    deep = d / "deep-run"
    deep.mkdir()
    (deep / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    (d / "zero.yaml").symlink_to("/dev/zero")
    os.mkfifo(d / "fifo.yaml")
    (d / "deep.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    (d / "badmodule_xyz.py").write_text("raise RuntimeError('boom at import')\n")
    (d / "exitmodule_xyz.py").write_text("import sys\nsys.exit(3)\n")
    (d / "okmodule_xyz.py").write_text(
        "import sys\n\nfrom autoprune.models import create_model\n\n\n"
        "def not_a_model(num_classes=10):\n    return 5\n\n\n"
        "def exits(num_classes=10):\n    sys.exit(3)\n\n\n"
        "def lenet(num_classes=10, in_channels=1, image_size=(28, 28)):\n"
        "    return create_model('lenet5', num_classes=num_classes, in_channels=in_channels, image_size=image_size)\n")
    for name, text in CONFIGS.items():
        (d / f"{name}.yaml").write_text(text)
        made[name] = d / f"{name}.yaml"
    made["single_class"] = write_mnist(d / "single-class", 40, 20, label=3)
    made["no_train"] = write_mnist(d / "no-train", 0, 20)
    made.update(emptydir=d / "emptydir", nonempty=d / "nonempty", afile=d / "afile", holder=d / "holder",
                damaged=damaged, nokeys=nokeys, badvalue=badvalue, badinvocation=badinvocation, deep=deep,
                zero=d / "zero.yaml", fifo=d / "fifo.yaml", deepyaml=d / "deep.yaml", missing=d / "missing.pt", dir=d,
                missingdir=d / "no-such-dir")
    return {k: str(v) for k, v in made.items()}


T = ["train", "--model", "lenet5", "--dataset", "synthetic", "--epochs", "1", "--quiet", "--out", "{out}.pt"]
P = ["prune", "{base}", "--dataset", "synthetic", "--method", "random", "--budget", "2", "--finetune-epochs", "0",
     "--latency-batch", "2", "--threads", "1", "--quiet", "--out", "{out}"]
R = [*P, "--macs-reduction", "0.5"]
E = ["eval", "{base}", "--dataset", "synthetic", "--latency-batch", "2", "--quiet"]
BIG_SEED = str(2**64)
SEED_RANGE = f"must be between 0 and {2**63 - 1}"

# (id, argv, exit code, phrase of the one stderr line)
CASES = [
    # ---- general
    ("no-command", [], USAGE, "required: command"),
    ("unknown-command", ["frobnicate"], USAGE, "invalid choice: 'frobnicate'"),
    ("methods-extra-arg", ["methods", "extra"], USAGE, "unrecognized arguments: extra"),
    ("methods-unknown-flag", ["methods", "--bogus"], USAGE, "unrecognized arguments: --bogus"),
    ("models-unknown-flag", ["models", "--json"], USAGE, "unrecognized arguments: --json"),
    # ---- train
    ("train-missing-args", ["train"], USAGE, "required: --model, --dataset, --out"),
    ("train-unknown-model", [*T, "--model", "nosuchnet"], ERROR, "valid models: lenet5"),
    ("train-width-for-lenet", [*T, "--width", "2"], ERROR, "--width does not apply to --model lenet5 (it takes no"),
    ("train-unknown-dataset", [*T, "--dataset", "nosuchdata"], ERROR, "valid datasets: cifar10"),
    ("train-no-data-dir", [*T, "--dataset", "mnist"], ERROR, "--data-dir is required for dataset 'mnist'"),
    ("train-missing-data-dir", [*T, "--dataset", "mnist", "--data-dir", "{missingdir}"], ERROR, "does not exist"),
    ("train-data-dir-is-file", [*T, "--dataset", "mnist", "--data-dir", "{afile}"], ERROR, "is not a directory"),
    ("train-mnist-files-missing", [*T, "--dataset", "mnist", "--data-dir", "{emptydir}"], ERROR,
     "train-images-idx3-ubyte"),
    ("train-cifar-files-missing", [*T, "--dataset", "cifar10", "--data-dir", "{emptydir}"], ERROR,
     "no CIFAR-10 found"),
    ("train-imagefolder-empty", [*T, "--dataset", "imagefolder", "--data-dir", "{emptydir}"], ERROR,
     "image-folder tree"),
    ("train-single-class", [*T, "--dataset", "mnist", "--data-dir", "{single_class}"], ERROR,
     "every training label of dataset 'mnist' is 3: a single class cannot be learnt"),
    ("train-no-training-samples", [*T, "--dataset", "mnist", "--data-dir", "{no_train}"], ERROR,
     "dataset 'mnist' has no training samples"),
    ("train-negative-epochs", [*T, "--epochs", "-1"], USAGE,
     "argument --epochs: must be between 0 and 1000000000, got -1"),
    ("train-abbreviated-option", [*T, "--epoch", "2"], USAGE, "unrecognized arguments: --epoch 2"),
    ("train-zero-lr", [*T, "--lr", "0"], ERROR, "invalid training setting lr=0.0"),
    ("train-nan-lr", [*T, "--lr", "nan"], USAGE, "expected a finite number"),
    ("train-text-lr", [*T, "--lr", "fast"], USAGE, "expected a number, got 'fast'"),
    ("train-zero-batch", [*T, "--batch-size", "0"], USAGE,
     "argument --batch-size: must be between 1 and 1000000000, got 0"),
    ("train-negative-weight-decay", [*T, "--weight-decay", "-1"], ERROR, "weight_decay=-1.0"),
    ("train-zero-width", [*T, "--width", "0"], ERROR, "--width must be in (0, 64]"),
    ("train-val-fraction", [*T, "--val-fraction", "0.9"], ERROR, "val_fraction must be in [0, 0.5]"),
    ("train-zero-limit", [*T, "--limit", "0"], USAGE, "argument --limit: must be between 1 and 1000000000, got 0"),
    ("train-negative-seed", [*T, "--seed", "-1"], USAGE, f"argument --seed: {SEED_RANGE}, got -1"),
    ("train-seed-2**64", [*T, "--seed", BIG_SEED], USAGE, f"argument --seed: {SEED_RANGE}, got {BIG_SEED}"),
    ("train-unknown-device", [*T, "--device", "tpu"], ERROR, "unknown device 'tpu'; use 'cpu', 'cuda' or 'cuda:N'"),
    ("train-out-exists", [*T, "--out", "{base}"], ERROR, "already exists; pass --force"),
    ("train-out-is-dir", [*T, "--out", "{emptydir}", "--force"], ERROR, "is a directory"),
    ("train-out-under-a-file", [*T, "--out", "{afile}/model.pt"], ERROR, "cannot create output file"),
    ("train-model-module-missing", [*T, "--model", "no_such_pkg_xyz.nets:make"], ERROR,
     "cannot import module 'no_such_pkg_xyz.nets'"),
    ("train-model-module-raises", [*T, "--model", "badmodule_xyz:make"], ERROR, "boom at import"),
    ("train-model-module-exits", [*T, "--model", "exitmodule_xyz:make"], ERROR,
     "cannot import module 'exitmodule_xyz' for --model 'exitmodule_xyz:make' (SystemExit: 3)"),
    ("train-model-factory-missing", [*T, "--model", "okmodule_xyz:nothere"], ERROR, "has no callable 'nothere'"),
    ("train-model-factory-not-module", [*T, "--model", "okmodule_xyz:not_a_model"], ERROR, "not an nn.Module"),
    ("train-model-factory-exits", [*T, "--model", "okmodule_xyz:exits"], ERROR,
     "model factory 'okmodule_xyz:exits' failed with SystemExit: 3"),
    ("train-model-wrong-image-size", [*T, "--model", "vgg11"], ERROR, "model 'vgg11' cannot take 1x28x28 images"),
    ("train-diverges", [*T, "--lr", "1e4", "--batch-size", "16"], ERROR, "training diverged: loss is nan at epoch 1"),
    ("train-lr-overflows", [*T, "--lr", "1e308"], ERROR, "invalid training setting lr=1e+308; "),
    # ---- prune
    ("prune-nothing", ["prune"], ERROR, "give a target: --macs-reduction R"),
    ("prune-no-model", ["prune", "--macs-reduction", "0.5", "--out", "{out}"], ERROR,
     "give the model file (autoprune prune MODEL ...) or --resume DIR"),
    ("prune-no-dataset", ["prune", "{base}", "--macs-reduction", "0.5", "--out", "{out}"], ERROR,
     "--dataset is required"),
    ("prune-no-out", ["prune", "{base}", "--dataset", "synthetic", "--macs-reduction", "0.5"], ERROR,
     "--out is required"),
    ("prune-no-target", P, ERROR, "give a target: --macs-reduction R"),
    ("prune-two-targets", [*R, "--max-drop", "1"], ERROR,
     "--max-drop 1.0: cannot be combined with macs_reduction or latency_reduction"),
    ("prune-abbreviated-option", [*P, "--macs", "0.8"], USAGE, "unrecognized arguments: --macs 0.8"),
    ("prune-reduction-above-1", [*P, "--macs-reduction", "1.5"], ERROR,
     "--macs-reduction 1.5: must lie strictly between 0 and 1"),
    ("prune-reduction-0", [*P, "--macs-reduction", "0"], ERROR,
     "--macs-reduction 0.0: must lie strictly between 0 and 1"),
    ("prune-reduction-1", [*P, "--macs-reduction", "1"], ERROR,
     "--macs-reduction 1.0: must lie strictly between 0 and 1"),
    ("prune-latency-reduction-1", [*P, "--latency-reduction", "1"], ERROR,
     "--latency-reduction 1.0: must lie strictly between 0 and 1"),
    ("prune-reduction-text", [*P, "--macs-reduction", "half"], USAGE, "expected a number, got 'half'"),
    ("prune-max-drop-range", [*P, "--max-drop", "200"], ERROR, "between 0 and 100"),
    ("prune-unreachable", [*P, "--macs-reduction", "0.99"], ERROR, "macs_reduction=0.99 is unreachable"),
    ("prune-unreachable-round-to", [*R, "--round-to", "1000"], ERROR, "is unreachable"),
    ("prune-min-ratio", [*R, "--min-ratio", "1.5"], ERROR, "--min-ratio 1.5: must lie in [0, 1)"),
    ("prune-budget-beyond-the-largest", [*R, "--budget", "2000000"], USAGE,
     "argument --budget: must be between 1 and 1000000, got 2000000"),
    ("prune-zero-budget", [*R, "--budget", "0"], USAGE, "argument --budget: must be between 1 and 1000000, got 0"),
    ("prune-negative-budget", [*R, "--budget", "-3"], USAGE,
     "argument --budget: must be between 1 and 1000000, got -3"),
    ("prune-negative-finetune", [*R, "--finetune-epochs", "-1"], USAGE,
     "argument --finetune-epochs: must be between 0 and 1000000000, got -1"),
    ("prune-extra-epochs-is-gone", [*R, "--extra-epochs", "1"], USAGE, "unrecognized arguments: --extra-epochs 1"),
    ("prune-negative-method-epochs", [*R, "--method", "sa", "--method-option", "epochs=-1"], ERROR,
     "option epochs must be an integer in [0, 1000000], got -1"),
    ("prune-zero-finetune-lr", [*R, "--finetune-lr", "0"], ERROR, "lr=0.0"),
    ("prune-distill-range", [*R, "--distill", "2"], ERROR, "distill=2.0"),
    ("prune-zero-val-samples", [*R, "--val-samples", "0"], USAGE,
     "argument --val-samples: must be between 1 and 1000000000, got 0"),
    ("prune-zero-workers", [*R, "--workers", "0"], USAGE, "argument --workers: must be between 1 and 1000000000"),
    ("prune-seed-2**64", [*R, "--seed", BIG_SEED], USAGE, f"argument --seed: {SEED_RANGE}, got {BIG_SEED}"),
    ("prune-empty-validation", [*R, "--val-fraction", "0"], ERROR, "the validation split is empty"),
    ("prune-unknown-method", [*R, "--method", "nosuch"], ERROR, "valid methods: gdp, global, l1"),
    ("prune-option-syntax", [*R, "--method-option", "particles"], USAGE, "expected key=value"),
    ("prune-option-unknown", [*R, "--method", "pso", "--method-option", "particle=20"], ERROR,
     "unknown option 'particle' for method 'pso'; valid options: band, iterations, particles, start_streams, "
     "start_uniform"),
    ("prune-option-renamed", [*R, "--method", "slim", "--method-option", "lambda=0.001"], ERROR,
     "unknown option 'lambda' for method 'slim'; valid options: epochs, sparsity"),
    ("prune-option-for-a-method-without-options", [*R, "--method", "l1", "--method-option", "x=1"], ERROR,
     "unknown option 'x' for method 'l1'; valid options: none"),
    ("prune-option-type", [*R, "--method", "pso", "--method-option", "particles=many"], ERROR,
     "option particles='many' for method 'pso' must be an integer"),
    ("prune-option-range", [*R, "--method", "ssa", "--method-option", "grid=0"], ERROR,
     "option grid must be a number in [0.001, 1.0], got 0.0"),
    ("prune-slim-without-bn", [*R, "--method", "slim"], ERROR, "needs a BatchNorm"),
    ("prune-unknown-dataset", [*R, "--dataset", "nosuchdata"], ERROR, "valid datasets:"),
    ("prune-dataset-files-missing", [*R, "--dataset", "cifar10", "--data-dir", "{emptydir}"], ERROR,
     "no CIFAR-10 found"),
    ("prune-missing-model", [*R[:1], "{missing}", *R[2:]], ERROR, "does not exist"),
    ("prune-empty-model", [*R[:1], "{empty}", *R[2:]], ERROR, "cannot read"),
    ("prune-garbage-model", [*R[:1], "{garbage}", *R[2:]], ERROR, "cannot read"),
    ("prune-truncated-model", [*R[:1], "{trunc}", *R[2:]], ERROR, "truncated"),
    ("prune-foreign-checkpoint", [*R[:1], "{foreign}", *R[2:]], ERROR, "not an autoprune model file"),
    ("prune-malicious-pickle", [*R[:1], "{evil}", *R[2:]], ERROR, "could run code"),
    ("prune-malicious-raw-pickle", [*R[:1], "{evil_raw}", *R[2:]], ERROR, "could run code"),
    ("prune-spec-disagrees-with-weights", [*R[:1], "{mismatch}", *R[2:]], ERROR,
     "spec.modules['net.classifier.1'] is a Linear with in_features=400, out_features=7, which needs weight of "
     "shape [7, 400], but the file's is [120, 400]"),
    ("prune-wrong-architecture", [*R[:1], "{wrongarch}", *R[2:]], ERROR, "architecture mismatch"),
    ("prune-format-version", [*R[:1], "{v99}", *R[2:]], ERROR, "format version 99"),
    ("prune-format-version-1", [*R[:1], "{v1}", *R[2:]], ERROR, "format version 1; this autoprune reads version 2"),
    ("prune-factory-not-trusted", [*R[:1], "{factory}", *R[2:]], ERROR,
     "was built by the user factory 'okmodule_xyz:lenet'; autoprune does not import code named by a file"),
    ("prune-factory-other-than-recorded", [*R[:1], "{factory}", *R[2:], "--model", "okmodule_xyz:not_a_model"],
     ERROR, "was made by factory 'okmodule_xyz:lenet' but the caller trusted 'okmodule_xyz:not_a_model'"),
    ("prune-registry-model-with-factory", [*R, "--model", "okmodule_xyz:lenet"], ERROR,
     "holds the registered architecture 'lenet5'; it needs no factory="),
    ("prune-model-dataset-mismatch", [*R[:1], "{classes7}", *R[2:]], ERROR,
     "predicts 7 classes but dataset 'synthetic' has 10"),
    ("prune-model-is-dir", [*R[:1], "{emptydir}", *R[2:]], ERROR, "is a directory, not a model file"),
    ("prune-out-is-file", [*R, "--out", "{afile}"], ERROR, "is a file; give a directory"),
    ("prune-out-not-empty", [*R, "--out", "{nonempty}"], ERROR, "is not empty and holds no autoprune run"),
    ("prune-out-not-empty-force", [*R, "--out", "{nonempty}", "--force"], ERROR, "holds no autoprune run (it holds "
     "'keep.txt'); choose a new or empty --out"),
    ("prune-force-deletes-input", [*R[:1], "{held}", *R[2:], "--out", "{holder}", "--force"], ERROR,
     "holds the model being pruned"),
    ("prune-resume-nothing", ["prune", "--resume", "{emptydir}"], ERROR, "nothing to resume"),
    ("prune-resume-damaged", ["prune", "--resume", "{damaged}"], ERROR, "is damaged"),
    ("prune-resume-incomplete", ["prune", "--resume", "{nokeys}"], ERROR, "damaged or from another version"),
    ("prune-resume-bad-value", ["prune", "--resume", "{badvalue}"], ERROR,
     "run.json' is damaged (budget='abc': must be an integer between 1 and 1000000), so the run cannot be resumed"),
    ("prune-resume-bad-invocation", ["prune", "--resume", "{badinvocation}"], ERROR,
     "run.json' is damaged (invocation limit='abc'), so the run cannot be resumed"),
    ("prune-resume-deep", ["prune", "--resume", "{deep}"], ERROR, "run.json' is damaged (nested too deeply)"),
    ("prune-config-device", [*R, "--config", "{zero}"], ERROR, "zero.yaml' is not a regular file (a device, pipe"),
    ("prune-config-fifo", [*R, "--config", "{fifo}"], ERROR, "fifo.yaml' is not a regular file (a device, pipe"),
    ("prune-config-deep", [*R, "--config", "{deepyaml}"], ERROR, "deep.yaml' is nested too deeply; give a flat"),
    ("prune-unknown-device", [*R, "--device", "tpu"], ERROR, "unknown device 'tpu'"),
    ("prune-finetune-diverges", [*R, "--finetune-epochs", "1", "--finetune-lr", "1e4", "--batch-size", "16"],
     ERROR, "training diverged: loss is nan"),
    # ---- prune --config
    ("config-missing", [*P, "--config", "{missing}"], ERROR, "cannot read --config"),
    ("config-unknown-key", [*R, "--config", "{cfg_unknown}"], ERROR, "unknown setting 'macs' in"),
    ("config-bad-value", [*R, "--config", "{cfg_bad_value}"], ERROR, "budget: 'zero' in"),
    ("config-bad-bool", [*R, "--config", "{cfg_bad_bool}"], ERROR, "quiet: 'maybe' in"),
    ("config-out-of-range", [*P, "--config", "{cfg_range}"], ERROR,
     "--macs-reduction 1.5: must lie strictly between 0 and 1"),
    ("config-options-not-a-mapping", [*R, "--config", "{cfg_options}"], ERROR, "method_options in"),
    ("config-unknown-option", [*R[:4], "--macs-reduction", "0.5", "--out", "{out}", "--config", "{cfg_option_name}"],
     ERROR, "unknown option 'particle' for method 'pso'"),
    ("config-not-yaml", [*R, "--config", "{cfg_not_yaml}"], ERROR, "is not valid YAML"),
    ("config-not-a-mapping", [*R, "--config", "{cfg_list}"], ERROR, "must be a mapping of settings"),
    ("config-path-not-text", [*R, "--config", "{cfg_out_int}"], ERROR, "out: 123 in"),
    ("config-singular-method-option", [*R, "--config", "{cfg_option_singular}"], ERROR,
     "write method options as a mapping, method_options: {particles: 20}"),
    ("config-huge-value-echoed-short", [*R[:4], "--macs-reduction", "0.5", "--out", "{out}", "--config",
                                        "{cfg_huge_option}"], ERROR, "option particles=[1, 1, 1"),
    ("prune-option-twice", [*R[:4], "--method", "pso", "--method-option", "particles=4", "--method-option",
                            "particles=6", *R[6:]], ERROR,
     "--method-option particles given twice ('4' and '6'); give each option once"),
    ("config-option-twice-in-flags", [*R[:4], "--macs-reduction", "0.5", "--out", "{out}", "--config", "{cfg_pso}",
                                      "--method-option", "particles=4", "--method-option", "particles=6"], ERROR,
     "--method-option particles given twice ('4' and '6'); give each option once"),
    ("prune-particles-unbounded", [*R[:4], "--method", "pso", "--method-option", "particles=1000000000", *R[6:]],
     ERROR, "option particles must be an integer in [1, 10000], got 1000000000"),
    ("prune-ssa-grid-tiny", [*R[:4], "--method", "ssa", "--method-option", "grid=1e-300", *R[6:]], ERROR,
     "option grid must be a number in [0.001, 1.0], got 1e-300"),
    ("prune-threads-per-worker-over-cores", [*R, "--workers", "2", "--threads-per-worker", "100000"], ERROR,
     "--threads-per-worker 100000: must be an integer between 1 and"),
    ("export-onto-the-model-file", ["export", "{base}", "--onnx", "{base}"], ERROR,
     "is the model file being exported; name another file"),
    ("export-onto-an-existing-file", ["export", "{base}", "--onnx", "{afile}"], ERROR,
     "exists; name another file for --onnx, or pass --force to replace it"),
    ("eval-huge-latency-batch", [*E, "--latency-batch", "1000000000"], USAGE,
     "argument --latency-batch: must be between 1 and 65536"),
    # ---- eval
    ("eval-missing-args", ["eval"], USAGE, "the following arguments are required: MODEL, --dataset"),
    ("eval-no-dataset", ["eval", "{base}"], USAGE, "required: --dataset"),
    ("eval-missing-model", ["eval", "{missing}", *E[2:]], ERROR, "does not exist"),
    ("eval-garbage-model", ["eval", "{garbage}", *E[2:]], ERROR, "cannot read"),
    ("eval-truncated-model", ["eval", "{trunc}", *E[2:]], ERROR, "truncated"),
    ("eval-foreign-checkpoint", ["eval", "{foreign}", *E[2:]], ERROR, "not an autoprune model file"),
    ("eval-malicious-pickle", ["eval", "{evil}", *E[2:]], ERROR, "could run code"),
    ("eval-wrong-architecture", ["eval", "{wrongarch}", *E[2:]], ERROR, "architecture mismatch"),
    ("eval-factory-not-trusted", ["eval", "{factory}", *E[2:]], ERROR, "pass --model okmodule_xyz:lenet"),
    ("eval-model-dataset-mismatch", ["eval", "{classes7}", *E[2:]], ERROR,
     "predicts 7 classes but dataset 'synthetic' has 10"),
    ("eval-unknown-dataset", [*E, "--dataset", "nosuchdata"], ERROR, "valid datasets:"),
    ("eval-dataset-files-missing", [*E, "--dataset", "mnist", "--data-dir", "{emptydir}"], ERROR,
     "train-images-idx3-ubyte"),
    ("eval-zero-latency-batch", [*E, "--latency-batch", "0"], USAGE,
     "argument --latency-batch: must be between 1 and 65536, got 0"),
    ("eval-unknown-device", [*E, "--device", "tpu"], ERROR, "unknown device 'tpu'"),
    # ---- export
    ("export-missing-onnx", ["export", "{base}"], USAGE, "the following arguments are required: --onnx"),
    ("export-empty-onnx", ["export", "{base}", "--onnx", ""], ERROR, "--onnx is empty; name the ONNX file to write"),
    ("export-onnx-under-a-file", ["export", "{base}", "--onnx", "{afile}/model.onnx"], ERROR,
     "afile' is a file, not a directory; name a path in a directory"),
    ("export-malicious-pickle", ["export", "{evil}", "--onnx", "{out}.onnx"], ERROR, "could run code"),
    ("export-factory-not-trusted", ["export", "{factory}", "--onnx", "{out}.onnx"], ERROR,
     "pass --model okmodule_xyz:lenet"),
    ("export-opset-range", ["export", "{base}", "--onnx", "{out}.onnx", "--opset", "3"], USAGE,
     "argument --opset: must be between 7 and 30, got 3"),
    # ---- demo
    ("demo-unknown-method", ["demo", "--method", "nosuch", "--out", "{out}"], ERROR, "valid methods:"),
    ("demo-reduction-range", ["demo", "--macs-reduction", "2", "--out", "{out}"], ERROR, "strictly between 0 and 1"),
    ("demo-negative-epochs", ["demo", "--epochs", "-1"], USAGE,
     "argument --epochs: must be between 0 and 1000000000, got -1"),
    ("demo-zero-budget", ["demo", "--budget", "0"], USAGE,
     "argument --budget: must be between 1 and 1000000, got 0"),
    ("demo-out-is-file", ["demo", "--out", "{afile}"], ERROR, "is a file; give a directory"),
    ("demo-out-not-empty", ["demo", "--out", "{nonempty}"], ERROR, "holds files other than an earlier demo's; "
                                                                   "pass --force"),
    ("demo-unknown-device", ["demo", "--device", "tpu", "--out", "{out}"], ERROR, "unknown device 'tpu'"),
]


@pytest.mark.parametrize("argv, code, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(argv, code, phrase, files, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(files["dir"])  # the custom --model modules
    monkeypatch.chdir(tmp_path)
    before = sorted(os.listdir(files["nonempty"]))
    args = [a.format(out=tmp_path / "out", **files) for a in argv]
    got, _, err = run_cli(args, capsys)
    assert got == code, err
    assert_one_line_error(err, phrase)
    assert len(err) < 1000, "an error line echoes a huge value in full"
    assert not Path(files["marker"]).exists(), "the malicious payload ran"
    if "diverged" not in phrase:
        assert not (tmp_path / "out" / "history.jsonl").exists(), "a search started before the input was checked"
        assert not (tmp_path / "out" / "run.json").exists(), "a refused run left a run directory behind"
    assert not (tmp_path / "out.pt.ckpt").exists() and not (tmp_path / "out.pt").exists()
    assert not (tmp_path / "out.onnx").exists()
    assert sorted(os.listdir(files["nonempty"])) == before, "an existing directory was changed"


def test_the_matrix_covers_every_subcommand():
    assert len(CASES) >= 30 and 3 <= len(SUBPROCESS_CASES) <= 5
    commands = {c[1][0] for c in CASES if c[1]}
    assert {"train", "prune", "eval", "export", "demo", "methods", "models"} <= commands


def test_errors_name_valid_choices_and_show_traceback_with_debug(files, capsys, tmp_path):
    code, _, err = run_cli(["train", "--model", "nosuchnet", "--dataset", "synthetic", "--out", tmp_path / "m.pt"],
                           capsys)
    assert code == 1 and all(n in err for n in ("lenet5", "resnet20", "vgg11", "package.module:factory"))
    with pytest.raises(AutopruneError, match="unknown model 'nosuchnet'"):
        run_cli(["train", "--model", "nosuchnet", "--dataset", "synthetic", "--out", tmp_path / "m.pt", "--debug"],
                capsys)


def test_malicious_model_is_refused_and_its_payload_never_runs(files, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["eval", files["evil"], "--dataset", "synthetic"],
                 ["prune", files["evil"], "--dataset", "synthetic", "--macs-reduction", "0.5", "--out", "o"],
                 ["eval", files["evil_raw"], "--dataset", "synthetic"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 1 and out == ""
        assert_one_line_error(err, "refusing to load")
    assert not Path(files["marker"]).exists()
    assert not (tmp_path / "o" / "run.json").exists()


# ---- real processes: nothing but the one line reaches the terminal --------------------------------------

SUBPROCESS_CASES = {
    "malicious-prune": (["prune", "{evil}", "--dataset", "synthetic", "--macs-reduction", "0.5", "--out", "o"],
                        ERROR, "could run code"),
    "malicious-eval": (["eval", "{evil}", "--dataset", "synthetic"], ERROR, "could run code"),
    "garbage-eval": (["eval", "{garbage}", "--dataset", "synthetic"], ERROR, "cannot read"),
    "wrong-image-size-train": (["train", "--model", "vgg11", "--dataset", "synthetic", "--out", "m.pt"], ERROR,
                               "cannot take 1x28x28 images"),
    "factory-calls-sys-exit": (["train", "--model", "okmodule_xyz:exits", "--dataset", "synthetic", "--out", "x.pt"],
                               ERROR, "model factory 'okmodule_xyz:exits' failed with SystemExit: 3"),
}


@pytest.fixture(scope="module")
def subprocess_results(files, tmp_path_factory):
    """Run every subprocess case at once (they spend most of their time importing torch)."""
    cwd = tmp_path_factory.mktemp("subprocess-cwd")
    procs = {name: start_cli(*[a.format(**files) for a in argv], cwd=cwd, env={"PYTHONPATH": files["dir"]})
             for name, (argv, _, _) in SUBPROCESS_CASES.items()}
    results = {name: (p.wait(timeout=120), *p.communicate()) for name, p in procs.items()}
    return results, cwd


@pytest.mark.parametrize("name", sorted(SUBPROCESS_CASES))
def test_real_process_prints_one_line_and_no_traceback(name, subprocess_results, files):
    results, cwd = subprocess_results
    code, out, err = results[name]
    _, want_code, phrase = SUBPROCESS_CASES[name]
    assert code == want_code, err
    assert out == ""
    assert_one_line_error(err, phrase)
    assert not Path(files["marker"]).exists()
    assert not (cwd / "o").exists() or not any((cwd / "o").iterdir())


# ---- properties ----------------------------------------------------------------------------------------

class _LongWorkReached(BaseException):
    """Raised in place of the long work: the arguments passed every check before it."""


_BAD_NUMBERS = ["0", "-1", "-0.5", "1.5", "nan", "inf", "-inf", "1e30", "", "abc", "0x10", "1e-9"]


def _number(*valid: str) -> st.SearchStrategy[str]:
    """Mostly plausible values (so that later checks are reached too), sometimes bad ones."""
    return st.sampled_from(list(valid) * (24 // len(valid)) + _BAD_NUMBERS)


_PATHS = ["{base}", "{missing}", "{garbage}", "{trunc}", "{foreign}", "{evil}", "{mismatch}", "{classes7}",
          "{factory}", "{emptydir}", "{afile}", "{nonempty}", "{damaged}", "{nokeys}"]
_FLAGS = {
    "--dataset": st.sampled_from(["synthetic"] * 6 + ["mnist", "cifar10", "imagefolder", "nosuch", ""]),
    "--data-dir": st.sampled_from(_PATHS),
    "--model": st.sampled_from(["lenet5", "lenet5", "resnet20", "vgg11", "nosuch", "okmodule_xyz:not_a_model",
                                "okmodule_xyz:lenet", "okmodule_xyz:exits", "badmodule_xyz:make",
                                "exitmodule_xyz:make", "no_pkg:f", ":", "a:b:c"]),
    "--method": st.sampled_from(["l1", "random", "pso", "ssa", "otp", "slim", "gdp", "sa", "nosuch", ""]),
    "--method-option": st.sampled_from(["particles=2", "particles=x", "grid=0", "grid=0.5", "step=2", "x=1",
                                        "=1", "noeq", "iterations=-1", "networks=0", "sparsity=nan",
                                        "polarization=-1", "epochs=-1", "epochs=0", "start_uniform=maybe"]),
    "--config": st.sampled_from([f"{{{name}}}" for name in CONFIGS] + ["{missing}", "{base}"]),
    "--onnx": st.sampled_from(["{out}.onnx", "{afile}/x.onnx", "{emptydir}"]),
    "--opset": _number("13", "17"), "--workers": _number("1", "2"),
    "--allow-other-dataset": st.just(None), "--latency-reduction": _number("0.3", "0.5"),
    "--out": st.sampled_from(["{out}", "{out}.pt", "{scratch_file}", "{scratch_nonempty}", "{scratch_empty}"]),
    "--resume": st.sampled_from(["{damaged}", "{nokeys}", "{emptydir}", "{missing}"]),
    "--device": st.sampled_from(["cpu", "cpu", "auto", "tpu", "cuda:x", ""]),
    "--force": st.just(None), "--quiet": st.just(None), "--json": st.just(None),
    "--epochs": _number("0", "1"), "--finetune-epochs": _number("0", "1"),
    "--lr": _number("0.01", "0.1"), "--finetune-lr": _number("0.01"), "--weight-decay": _number("0", "5e-4"),
    "--batch-size": _number("8", "128", "100000"), "--width": _number("0.25", "1", "2"),
    "--val-fraction": _number("0", "0.1", "0.5"), "--limit": _number("1", "5", "12", "50", "100000"),
    "--seed": _number("0", "7", "4294967296", BIG_SEED), "--macs-reduction": _number("0.3", "0.5", "0.9", "0.999"),
    "--max-drop": _number("0", "2", "100"), "--budget": _number("1", "5"), "--val-samples": _number("1", "10"),
    "--round-to": _number("1", "2", "8", "64"), "--min-ratio": _number("0", "0.05", "0.5", "0.99"),
    "--latency-batch": _number("1", "8"), "--threads": _number("1", "2"), "--distill": _number("0", "0.5", "1"),
}
_REQUIRED = {  # what makes an invocation complete, drawn most of the time
    "train": ["--model", "lenet5", "--dataset", "synthetic", "--out", "{out}.pt"],
    "prune": ["{base}", "--dataset", "synthetic", "--out", "{out}", "--macs-reduction", "0.5"],
    "eval": ["{base}", "--dataset", "synthetic"],
    "demo": ["--out", "{out}"], "export": ["{base}", "--onnx", "{out}.onnx"], "methods": [], "models": [],
}


@functools.lru_cache
def _flags_of(command: str) -> list[str]:
    """The options of a subcommand that _FLAGS can fill (from the parser itself)."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(f for f in subparsers.choices[command]._option_string_actions if f in _FLAGS)


@st.composite
def _argvs(draw):
    command = draw(st.sampled_from(["train", "prune", "prune", "eval", "export", "demo", "methods", "models"]))
    argv = [command]
    if draw(st.integers(0, 3)):
        argv += _REQUIRED[command]
    elif command in ("prune", "eval", "export") and draw(st.booleans()):
        argv.append(draw(st.sampled_from(_PATHS)))
    own = _flags_of(command)
    pool = own * 4 + sorted(_FLAGS) if own else sorted(_FLAGS)  # mostly the command's own options
    for flag in dict.fromkeys(draw(st.lists(st.sampled_from(pool), max_size=5))):
        value = draw(_FLAGS[flag])
        argv += [flag] if value is None else [flag, value]
    return argv


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_argvs())
def test_random_arguments_never_crash(argv, files, tmp_path, capsys, monkeypatch):
    """Any arguments: exit 0/1/2 with at most one error line and no traceback, or every check passed."""
    import autoprune.engine.prune
    import autoprune.engine.train
    import autoprune.export
    import autoprune.runs.training

    def long_work(*args, **kwargs):
        raise _LongWorkReached

    monkeypatch.setattr(autoprune.runs.training, "train_base", long_work)  # train's and demo's long work
    monkeypatch.setattr(autoprune.engine.prune, "MethodContext", long_work)  # right after the engine's checks
    monkeypatch.setattr(autoprune.engine.train, "evaluate", long_work)  # eval's first long step
    monkeypatch.setattr(autoprune.export, "export_onnx", long_work)
    if files["dir"] not in sys.path:
        monkeypatch.syspath_prepend(files["dir"])
    monkeypatch.chdir(tmp_path)
    scratch = tmp_path / "scratch"  # fresh for every example: --force may delete what --out names
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "nonempty").mkdir(parents=True)
    (scratch / "nonempty" / "keep.txt").write_text("x")
    (scratch / "empty").mkdir()
    (scratch / "file").write_text("x")
    paths = {"scratch_file": scratch / "file", "scratch_nonempty": scratch / "nonempty",
             "scratch_empty": scratch / "empty"}
    args = [a.format(out=scratch / "out", **paths, **files) for a in argv]
    try:
        code, _, err = run_cli(args, capsys)
    except _LongWorkReached:
        event("passed every check")
        return
    event(f"exit {code}")
    assert code in (0, 1, 2), (args, code, err)
    assert "Traceback" not in err
    if code:
        assert_one_line_error(err, "")
    assert not Path(files["marker"]).exists()


# No subnormals: autoprune.engine.train turns
# on flush-to-zero for the whole process (a speed choice on CPU), which makes
# hypothesis refuse to draw them once any training or evaluation ran in this module.
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False)
_NUMBER_VALUES = st.one_of(st.none(), st.integers(-5, 10**6), _FLOATS)


@settings(max_examples=300, deadline=None)
@given(target=st.fixed_dictionaries({}, optional={
    "macs_reduction": _NUMBER_VALUES, "latency_reduction": _NUMBER_VALUES, "max_drop": _NUMBER_VALUES,
}), fields=st.fixed_dictionaries({}, optional={
    "budget": st.one_of(st.none(), st.integers(-5, 10**6)),
    "val_samples": st.one_of(st.none(), st.integers(-3, 10**6)), "calibration_samples": st.integers(-3, 2000),
    "round_to": st.integers(-3, 64), "min_ratio": _FLOATS,
    "seed": st.integers(-3, 2**64), "latency_batch": st.integers(-3, 512), "latency_repeats": st.integers(-3, 50),
    "threads": st.one_of(st.none(), st.integers(-3, 64)), "workers": st.integers(-3, 8),
    "method": st.sampled_from(["l1", "pso", "otp", "random", "nosuch", "", "L1"]),
}), train=st.fixed_dictionaries({}, optional={
    "epochs": st.integers(-3, 100), "batch_size": st.integers(-3, 4096),
    "lr": _FLOATS, "momentum": _FLOATS,
    "weight_decay": _FLOATS,
    "warmup_epochs": _FLOATS,
    "distill": _FLOATS,
    "temperature": _FLOATS, "seed": st.integers(-3, 2**40),
}))
def test_config_values_give_a_valid_config_or_a_clear_error(target, fields, train):
    try:
        finetune = TrainConfig(**train)
        goal = Target(**target)
    except AutopruneError:
        return
    for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "distill", "temperature"):
        assert finetune.__dict__[name] == finetune.__dict__[name] and abs(finetune.__dict__[name]) != float("inf")
    cost = (goal.macs_reduction, goal.latency_reduction)
    assert cost != (None, None) or goal.max_drop is not None  # some target
    assert goal.max_drop is None or cost == (None, None)  # and never both kinds
    assert all(r is None or 0 < r < 1 for r in cost) and (goal.max_drop is None or 0 <= goal.max_drop <= 100)
    fields = {"method": "l1", **fields}
    try:
        config = PruneConfig(target=goal, finetune=finetune, **fields)
    except AutopruneError:
        return
    assert config.latency_repeats >= 1 and 0 <= config.seed < 2**63 and 0 <= config.min_ratio < 1
    assert PruneConfig.from_json(config.to_json()) == config


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), _FLOATS, st.text(max_size=5)),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                  max_size=3), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(st.sampled_from(["method", "target", "budget", "finetune", "seed", "round_to",
                                             "min_ratio", "method_options", "ignored_layers", "workers", "junk"]),
                            _JSON, max_size=6),
       target=st.dictionaries(st.sampled_from(["macs_reduction", "latency_reduction", "max_drop", "junk"]), _JSON,
                              max_size=3),
       finetune=st.dictionaries(st.sampled_from(["epochs", "lr", "batch_size", "distill", "junk"]), _JSON,
                                max_size=4))
def test_a_damaged_run_json_config_is_a_clear_error(data, target, finetune):
    data = {"method": "l1", "target": target, "finetune": finetune, **data}
    try:
        config = PruneConfig.from_json(data)
    except AutopruneError as exc:
        assert str(exc).splitlines()[0]
        return
    assert isinstance(config, PruneConfig) and isinstance(config.finetune, TrainConfig)
    assert isinstance(config.target, Target)
