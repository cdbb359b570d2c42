"""``autoprune``: thin subcommands over the Python API.

Every user error is one line on stderr (``autoprune: error: ...``) and a non-zero exit; ``--debug`` shows the
traceback instead. Arguments and files are checked before any long work starts. ``prune`` and ``compare``
read defaults from ``--config run.yaml`` (keys are the long option names, e.g. ``macs_reduction: 0.6``,
``method_options: {particles: 20}``); flags given on the command line override the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from autoprune.checks import MAX_COUNT

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
MAX_SEED = 2**63 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, exit code 2 and no abbreviated options (``--macs`` is not accepted)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"autoprune: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


_nonneg_int, _pos_int, _seed = _int_in(0, 10**9), _int_in(1, 10**9), _int_in(0, MAX_SEED)
_latency_batch, _count = _int_in(1, 65536), _int_in(1, MAX_COUNT)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_seed, default=0, help="seed for everything random (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_data(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--dataset", required=required, help="mnist, fashion-mnist, cifar10, imagefolder, sample, synthetic")
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--val-fraction", type=_float, default=0.1,
                   help="fraction of the training data held out for validation (default 0.1)")
    p.add_argument("--limit", type=_pos_int, help="use at most this many training and test images (quick runs)")


def _add_model_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="factory", metavar="PACKAGE.MODULE:FACTORY",
                   help="the factory that built the model file, if it was not a registered architecture "
                        "(autoprune never imports code a file names; you name it here)")
    p.add_argument("--allow-other-dataset", action="store_true",
                   help="measure on a dataset other than the one the model was trained on")


def _add_pruning(p: argparse.ArgumentParser) -> None:
    """The arguments `prune` and `compare` share: model, data, target, search, fine-tuning, output."""
    p.add_argument("model_file", nargs="?", metavar="MODEL", help="model file written by `autoprune train` (or prune)")
    p.add_argument("--config", metavar="YAML", help="read defaults from this YAML file (flags override it)")
    _add_model_trust(p)
    _add_data(p, required=False)
    t = p.add_argument_group("target")
    t.add_argument("--macs-reduction", type=_float, help="remove at least this fraction of the MACs, 0 < R < 1")
    t.add_argument("--latency-reduction", type=_float,
                   help="cut the measured latency at --latency-batch by at least this fraction, 0 < R < 1")
    t.add_argument("--max-drop", type=_float,
                   help="instead: remove as many MACs as possible losing at most PP points of validation accuracy")
    s = p.add_argument_group("search")
    s.add_argument("--budget", type=_count, help="candidate evaluations allowed (default: the method's)")
    s.add_argument("--method-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="method option, e.g. particles=20 (repeatable; `autoprune methods` lists them)")
    s.add_argument("--score", help="how candidates are scored during the search: none, bn (adaptive BatchNorm, "
                                   "accuracy), loss, kl (divergence from the unpruned model), finetune (a short "
                                   "distilled fine-tune of each), auto (default: kl with BatchNorm, finetune "
                                   "without)")
    s.add_argument("--select-top", type=_nonneg_int, default=None, metavar="K",
                   help="after the search, fine-tune its K best structures and the uniform one briefly and keep the "
                        "best by successive halving (default: 4 after a fine-tune score, i.e. auto on a network "
                        "without BatchNorm; 0 (off) after the cheap scores; measured in the README)")
    s.add_argument("--select-steps", type=_pos_int, default=None, metavar="N",
                   help="fine-tuning steps of the selection's first rung (default 20)")
    s.add_argument("--select-samples", type=_pos_int, default=None, metavar="N",
                   help="training samples held for the selection's rungs, so that their steps see new batches "
                        "(default 32768, at most 1 GiB of inputs)")
    s.add_argument("--val-samples", type=_pos_int, help="validation images used to score candidates (default all)")
    s.add_argument("--calibration-samples", type=_nonneg_int, default=512,
                   help="training images for BatchNorm re-estimation of each candidate (default 512)")
    s.add_argument("--round-to", type=_pos_int, default=1, help="kept channel counts are multiples of this")
    s.add_argument("--min-ratio", type=_float, default=0.05, help="each layer keeps at least this fraction")
    s.add_argument("--workers", type=_pos_int, default=1, help="processes evaluating candidates (default 1)")
    s.add_argument("--ray-address", help="evaluate candidates on a Ray cluster: auto, local or an address")
    s.add_argument("--threads-per-worker", type=_pos_int, help="torch threads per worker (default cores/workers)")
    f = p.add_argument_group("fine-tuning")
    f.add_argument("--finetune-epochs", type=_nonneg_int, default=2, help="fine-tuning epochs (default 2)")
    f.add_argument("--finetune-lr", type=_float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    f.add_argument("--batch-size", type=_pos_int, default=128, help="training batch size (default 128)")
    f.add_argument("--distill", type=_float, default=0.0,
                   help="weight of distillation from the unpruned model during fine-tuning, 0..1 (default 0)")
    m = p.add_argument_group("measurement")
    m.add_argument("--latency-batch", type=_latency_batch, default=64,
                   help="large batch size for latency (default 64)")
    m.add_argument("--latency-repeats", type=_pos_int, default=30, help="timed runs per model and batch (default 30)")
    m.add_argument("--threads", type=_pos_int, help="CPU threads for latency measurement")
    p.add_argument("--out", help="output directory")
    p.add_argument("--force", action="store_true", help="replace an earlier run in --out")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted or failed run in DIR with its model, data "
                   "and search settings; fine-tuning, worker and latency flags may be given anew")
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = _Parser(prog="autoprune", description="Automatic structured pruning of trained CNNs.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="train LeNet-5 on the embedded digit sample, prune it, show the gain")
    p.add_argument("--method", default="otp", help="pruning method (default otp)")
    p.add_argument("--macs-reduction", type=_float, default=0.7, help="MACs to remove (default 0.7)")
    p.add_argument("--epochs", type=_nonneg_int, default=20, help="training epochs (default 20)")
    p.add_argument("--finetune-epochs", type=_nonneg_int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--budget", type=_count, help="candidate evaluations (default: the method's)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo); an earlier demo's "
                   "output there is replaced, anything else only with --force")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _add_common(p)

    p = sub.add_parser("train", help="train a model from scratch")
    p.add_argument("--model", required=True, help="registry name (see `autoprune models`) or package.module:factory")
    _add_data(p)
    p.add_argument("--epochs", type=_nonneg_int, default=10, help="epochs (default 10)")
    p.add_argument("--lr", type=_float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--batch-size", type=_pos_int, default=128, help="batch size (default 128)")
    p.add_argument("--weight-decay", type=_float, default=5e-4, help="weight decay (default 5e-4)")
    p.add_argument("--width", type=_float, help="width multiplier for vgg*/resnet* models")
    p.add_argument("--out", required=True, help="model file to write, e.g. runs/lenet5.pt")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    _add_common(p)

    p = sub.add_parser("prune", help="prune a trained model with one method")
    p.add_argument("--method", default="l1", help="pruning method (see `autoprune methods`)")
    _add_pruning(p)

    p = sub.add_parser("compare", help="prune one model with several methods and compare them side by side")
    p.add_argument("--methods", default="all", help="comma-separated methods, e.g. otp,pso,l1 (default all)")
    p.add_argument("--title", help="heading of the comparison's reports, e.g. 'ResNet-20 on CIFAR-10 (JPEG q75)'")
    _add_pruning(p)

    p = sub.add_parser("eval", help="test accuracy, size, MACs and latency of a saved model")
    p.add_argument("model_file", metavar="MODEL", help="model file")
    _add_model_trust(p)
    _add_data(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--latency-batch", type=_latency_batch, default=64,
                   help="large batch size for latency (default 64)")
    _add_common(p)

    p = sub.add_parser("export", help="export a saved model to ONNX (checked in onnxruntime)")
    p.add_argument("model_file", metavar="MODEL", help="model file")
    p.add_argument("--onnx", required=True, metavar="FILE", help="ONNX file to write")
    p.add_argument("--model", dest="factory", metavar="PACKAGE.MODULE:FACTORY",
                   help="the factory that built the model file, if it was not a registered architecture")
    p.add_argument("--opset", type=_int_in(7, 30), help="ONNX opset (default 17)")
    p.add_argument("--no-verify", action="store_true", help="do not check the file in onnxruntime")
    p.add_argument("--force", action="store_true", help="replace --onnx if it exists (never the model file itself)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("methods", help="list the pruning methods and their options")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from autoprune import __version__

    return f"autoprune {__version__}"


# ---- configuration files -------------------------------------------------------------------------

def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; for ``prune``/``compare`` with ``--config``, the file's values become the defaults."""
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        given_once(getattr(args, "method_option", []))
        return args
    from autoprune.errors import AutopruneError, short

    sub = _subparser(parser, args.command)
    values = _read_config(args.config)
    dests = {a.dest: a for a in sub._actions if a.dest not in ("help", "config")}
    options = values.pop("method_options", {})
    if not isinstance(options, dict):
        raise AutopruneError(f"method_options in {args.config!r} must be a mapping, e.g. {{particles: 20}}")
    if "method_option" in values:
        raise AutopruneError(f"method_option in {args.config!r}: write method options as a mapping, "
                             "method_options: {particles: 20}")
    unknown = sorted(set(values) - set(dests))
    if unknown:
        raise AutopruneError(f"unknown setting {unknown[0]!r} in {args.config!r}; settings are the long option names "
                             f"with _ for -, e.g. macs_reduction, finetune_epochs")
    defaults = {}
    for key, value in values.items():
        action = dests[key]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction) and not isinstance(value, bool):
            raise AutopruneError(f"{key}: {short(value)} in {args.config!r}: must be true or false")
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except argparse.ArgumentTypeError as exc:
                raise AutopruneError(f"{key}: {short(value)} in {args.config!r}: {exc}") from None
        elif action.type is None and action.nargs == 0:
            pass  # a flag (true / false, checked above)
        elif action.type is None and not _text_setting(key, value):
            raise AutopruneError(f"{key}: {short(value)} in {args.config!r}: must be "
                                 + ("a comma-separated string or a list of method names" if key == "methods"
                                    else "text (a name, a path or an address)" if key != "title" else "text"))
        defaults[key] = value
    defaults["method_option"] = [(str(k), v) for k, v in options.items()]
    sub.set_defaults(**defaults)
    args = parser.parse_args(argv)
    given = args.method_option[len(defaults["method_option"]):]  # argparse appends the flags' to the file's
    given_once(given)
    args.method_option = list({**dict(defaults["method_option"]), **dict(given)}.items())  # the flags win
    return args


def given_once(options: Sequence[tuple[str, str]]) -> None:
    """Refuse a method option given twice on the command line (which value was meant is not ours to guess)."""
    from autoprune.errors import AutopruneError, short

    seen: dict[str, str] = {}
    for key, value in options:
        if key in seen:
            raise AutopruneError(f"--method-option {key} given twice ({short(seen[key])} and {short(value)}); "
                                 "give each option once")
        seen[key] = value


def _text_setting(key: str, value: object) -> bool:
    """Whether a config file's value fits a setting that takes text (a path, an address, a title): a string;
    ``methods`` also takes a list of strings."""
    if key == "methods" and isinstance(value, list):
        return bool(value) and all(isinstance(v, str) and v for v in value)
    return isinstance(value, str)


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


#: the largest --config file read
CONFIG_LIMIT = 2**20


def _read_config(path: str) -> dict[str, Any]:
    import yaml

    from autoprune.errors import AutopruneError
    from autoprune.io.files import read_text

    class UniqueKeys(yaml.SafeLoader):
        """A safe loader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
            twice = next((k for i, k in enumerate(keys) if isinstance(k, str) and k in keys[:i]), None)
            if twice is not None:
                raise yaml.constructor.ConstructorError(None, None, f"the key {twice!r} is given twice",
                                                        node.start_mark)
            return super().construct_mapping(node, deep=deep)

    try:
        data = yaml.load(read_text(path, limit=CONFIG_LIMIT), Loader=UniqueKeys)  # noqa: S506 (a SafeLoader)
    except OSError as exc:
        raise AutopruneError(f"cannot read --config {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise AutopruneError(f"--config {path!r} is not a text file; give a YAML file of settings, "
                             "e.g. 'macs_reduction: 0.6'") from None
    except yaml.YAMLError as exc:
        raise AutopruneError(f"--config {path!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise AutopruneError(f"--config {path!r} is nested too deeply; give a flat file of settings, "
                             "e.g. 'macs_reduction: 0.6'") from None
    except ValueError as exc:  # a device, a pipe or a huge file
        raise AutopruneError(f"--config: {exc}; give a YAML file of settings") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise AutopruneError(f"--config {path!r} must be a mapping of settings, e.g. 'macs_reduction: 0.6'")
    return {k.replace("-", "_"): v for k, v in data.items()}


# ---- helpers -----------------------------------------------------------------------------------

def _device(name: str):
    """The device named by ``--device``; under torchrun, this rank's device, with the process group joined."""
    import torch

    from autoprune.engine.distributed import join
    from autoprune.engine.prune import resolve_device

    if name == "auto":
        return join(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return join(resolve_device(torch.nn.Module(), name))


def _say(*lines: str) -> None:
    """Print, on rank 0 only under torchrun."""
    from autoprune.engine.distributed import world

    if world().main:
        for line in lines:
            print(line, flush=True)


class StopFlag:
    """First Ctrl-C or SIGTERM: finish the current evaluation (or epoch) and stop cleanly; a second Ctrl-C: at once.

    Also an :class:`autoprune.Callback` (``should_stop``). ``main`` restores the previous handlers.
    """

    def __init__(self) -> None:
        from autoprune.engine.callbacks import Callback

        self.requested = False
        self.callback = type("StopCallback", (Callback,), {"should_stop": lambda _self: self.requested})()

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            sys.stderr.write("\nautoprune: stopping after the current evaluation or epoch (Ctrl-C again to abort)\n")

        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def before_after_table(result: Any) -> str:
    """The before/after table printed at the end of `prune` and `demo`."""
    from autoprune.report.html import speedup_text

    b, p = result.base, result.pruned
    batches = list(b.latency)
    rows = [["", result.metric, "params", "MACs", "size (KiB)"] + [f"latency b={x} (ms)" for x in batches]]
    for name, side in (("base", b), ("pruned", p)):
        rows.append([name, f"{100 * side.accuracy:.2f}%", f"{side.params:,}", f"{side.macs:,}",
                     f"{(side.size_bytes or 0) / 1024:.1f}"] + [f"{side.latency_ms(x):.3f}" for x in batches])
    red = result.reduction
    rows.append(["change", f"{result.accuracy_change_points:+.2f} pts", f"-{100 * red['params']:.1f}%",
                 f"-{100 * red['macs']:.1f}%", f"-{100 * red.get('size', 0):.1f}%"]
                + [speedup_text(result.speedup[x]) for x in batches])
    return _table(rows)





# ---- subcommands -------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from autoprune.methods import METHODS
    from autoprune.registry import option_defaults

    rows = [{"name": n, "summary": m.summary, "source": m.source, "default_budget": m.default_budget,
             "options": option_defaults(m)} for n, m in METHODS.items()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table([["method", "default budget", "options", "what it does"]]
                     + [[r["name"], str(r["default_budget"]),
                         ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in r["options"].items()) or "-", r["summary"]] for r in rows]))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from autoprune.models import MODELS

    print(_table([["model", "description"]] + [[n, (f.__doc__ or "").strip().splitlines()[0]]
                                                for n, f in MODELS.items()]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from autoprune.data import load_dataset
    from autoprune.engine.train import TrainConfig
    from autoprune.errors import AutopruneError
    from autoprune.models import resolve_factory
    from autoprune.models.registry import accepted_arguments
    from autoprune.runs.training import train_base

    out = Path(args.out)
    if out.is_dir():
        raise AutopruneError(f"--out {args.out!r} is a directory; give a file name such as runs/model.pt")
    if out.exists() and not args.force:
        raise AutopruneError(f"{args.out!r} already exists; pass --force to overwrite it or choose another --out")
    factory = resolve_factory(args.model)
    if args.width is not None and not 0 < args.width <= 64:
        raise AutopruneError(f"--width must be in (0, 64] (it multiplies every layer's width), got {args.width}")
    if args.width is not None and not accepted_arguments(factory, {"width": args.width}):
        raise AutopruneError(f"--width does not apply to --model {args.model} (it takes no width argument); leave it "
                             "out, or use a vgg* or resnet* model")
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, seed=args.seed)
    device = _device(args.device)
    splits = load_dataset(args.dataset, args.data_dir, val_fraction=args.val_fraction, seed=args.seed,
                          limit=args.limit)
    stop = StopFlag()
    stop.install()
    summary = train_base(args.model, splits, config, out, device=device, progress=not args.quiet,
                         model_kwargs={"width": args.width} if args.width is not None else {}, stop_requested=stop)
    _say(f"trained {summary['model']} on {summary['dataset']} for {summary['epochs']} epochs in "
         f"{summary['seconds']:.1f} s: test accuracy {100 * summary['test_accuracy']:.2f}% -> {summary['out']}")
    return 0


def prune_config(args: argparse.Namespace, method: str):
    """The :class:`PruneConfig` of a `prune` / `compare` command line."""
    from autoprune.engine.config import PruneConfig, Target
    from autoprune.engine.train import TrainConfig
    from autoprune.errors import AutopruneError

    if args.macs_reduction is None and args.latency_reduction is None and args.max_drop is None:
        raise AutopruneError("give a target: --macs-reduction R or --latency-reduction R (0 < R < 1), or "
                             "--max-drop PP (accuracy points)")
    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size,
                           distill=args.distill, seed=args.seed)
    return PruneConfig(
        method=method, method_options=dict(args.method_option),
        target=Target(macs_reduction=args.macs_reduction, latency_reduction=args.latency_reduction,
                      max_drop=args.max_drop),
        budget=args.budget, finetune=finetune, round_to=args.round_to, min_ratio=args.min_ratio,
        val_samples=args.val_samples, calibration_samples=args.calibration_samples, seed=args.seed,
        latency_batch=args.latency_batch, latency_repeats=args.latency_repeats, threads=args.threads,
        workers=args.workers, ray_address=args.ray_address, threads_per_worker=args.threads_per_worker,
        **({} if args.score is None else {"score": args.score}),
        **({} if args.select_top is None else {"select_top": args.select_top}),
        **({} if args.select_steps is None else {"select_steps": args.select_steps}),
        **({} if args.select_samples is None else {"select_samples": args.select_samples}))


#: Flags a resumed run may change (its fine-tuning, computing and measuring), by the TrainConfig field they set...
_RESUME_FINETUNE = {"finetune_epochs": "epochs", "finetune_lr": "lr", "batch_size": "batch_size", "distill": "distill"}
#: ... or the PruneConfig field of the same name; and those that are not settings of the run at all.
_RESUME_RUN = ("latency_batch", "latency_repeats", "threads", "workers", "ray_address", "threads_per_worker")
_RESUME_ANY = ("command", "resume", "quiet", "debug", "device", "help")


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations of the arguments of a subcommand that ``argv`` gives (a default value given counts)."""
    unset = object()
    sub = _subparser(parser, argv[0])
    accumulating = (argparse._AppendAction, argparse._AppendConstAction, argparse._CountAction)
    start = {a.dest: None if isinstance(a, accumulating) else unset  # these add to what is there: start from None
             for a in sub._actions if a.dest != argparse.SUPPRESS}
    namespace = argparse.Namespace(**start)
    sub.parse_args(list(argv[1:]), namespace=namespace)  # argparse leaves what is already set unless given...
    optional_positionals = {a.dest: a.default for a in sub._actions if not a.option_strings and a.nargs == "?"}
    return {dest for dest, value in vars(namespace).items()  # ... but sets an absent optional positional's default
            if value is not start[dest] and not (dest in optional_positionals and value == optional_positionals[dest])}


def resume_config(args: argparse.Namespace, config: Any) -> Any:
    """The saved configuration of the run ``--resume`` continues, with the fine-tuning, worker and measurement
    flags given on this command line; any other flag given (the model, data, target or search) is refused,
    since the run continues with the ones it started with."""
    from dataclasses import replace

    from autoprune.engine.train import TrainConfig
    from autoprune.errors import AutopruneError

    given = [a for a in _subparser(build_parser(), args.command)._actions
             if a.dest not in _RESUME_ANY and a.dest in getattr(args, "given", ())]
    # a comparison's methods must share their fine-tuning and measurement: only where workers run may change
    free = {*_RESUME_FINETUNE, *_RESUME_RUN} if args.command == "prune" else {"workers", "ray_address",
                                                                              "threads_per_worker"}
    fixed = [a for a in given if a.dest not in free]
    if fixed:
        names = ", ".join(a.option_strings[-1] if a.option_strings else str(a.metavar) for a in fixed)
        settings = ("model, data and search settings" if args.command == "prune" else
                    "settings (its methods share them)")
        raise AutopruneError(f"--resume continues the {'run' if args.command == 'prune' else 'comparison'} in "
                             f"{args.resume!r} with the {settings} it started with, so {names} cannot be given; drop "
                             "them, or start a new run (another --out, or --force)")
    values = {a.dest: getattr(args, a.dest) for a in given}
    finetune = {field: values[flag] for flag, field in _RESUME_FINETUNE.items() if flag in values}
    if finetune:
        config = config.replace(finetune=replace(config.finetune or TrainConfig(), **finetune))
    return config.replace(**{k: values[k] for k in _RESUME_RUN if k in values})


def _resumed(args: argparse.Namespace, run_file: dict[str, Any]) -> None:
    """Fill the model file and data arguments of ``args`` from a resumed run's saved invocation."""
    from autoprune.errors import AutopruneError

    invocation = run_file.get("invocation") or {}
    _check_invocation(args.resume, invocation)
    if not invocation.get("model") or not invocation.get("dataset"):
        raise AutopruneError(f"{args.resume!r} does not name its model file and dataset (was the run started from "
                             "Python?); resume it with autoprune.prune(..., out=DIR, resume=True)")
    args.model_file, args.factory = invocation["model"], invocation.get("model_factory")
    args.dataset, args.data_dir = invocation["dataset"], invocation.get("data_dir")
    args.val_fraction, args.limit = invocation.get("val_fraction", 0.1), invocation.get("limit")


def _check_invocation(run_dir: str, invocation: Any) -> None:
    """Refuse a saved invocation whose values no run writes (an edited run.json), naming the first such value."""
    from numbers import Integral, Real

    from autoprune.errors import AutopruneError, short

    def text(v: Any) -> bool:
        return isinstance(v, str) and bool(v)

    def fraction(v: Any) -> bool:
        return isinstance(v, Real) and not isinstance(v, bool) and 0 <= v < 1

    def count(v: Any) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool) and v >= 1

    where = str(Path(run_dir) / "run.json")
    if not isinstance(invocation, dict):
        raise AutopruneError(f"{where!r} is damaged (invocation={short(invocation)}), so the run cannot be resumed; "
                             "start it again with --force")
    expected = {"model": (text, True), "dataset": (text, True), "model_factory": (text, True),
                "data_dir": (text, True), "val_fraction": (fraction, False), "limit": (count, True)}
    for key, (check, optional) in expected.items():
        value = invocation.get(key)
        if key in invocation and not (value is None and optional) and not check(value):
            raise AutopruneError(f"{where!r} is damaged (invocation {key}={short(value)}), so the run cannot be "
                                 "resumed; start it again with --force")


def _inputs(args: argparse.Namespace, config: Any):
    from autoprune.errors import AutopruneError
    from autoprune.runs.inputs import load_inputs

    if not args.model_file:
        raise AutopruneError(f"give the model file (autoprune {args.command} MODEL ...) or --resume DIR")
    if not args.dataset:
        raise AutopruneError("--dataset is required (the data the model was trained on)")
    inputs = load_inputs(args.model_file, dataset=args.dataset, data_dir=args.data_dir,
                         val_fraction=args.val_fraction, limit=args.limit, seed=config.seed,
                         batch_size=config.finetune.batch_size, device=_device(args.device), factory=args.factory,
                         allow_other_dataset=getattr(args, "allow_other_dataset", False))
    if inputs.data.val is None:
        raise AutopruneError("the validation split is empty (--val-fraction 0 or a tiny --limit), but the search "
                             "scores candidates on it; use --val-fraction 0.1 or a larger --limit")
    return inputs


def _check_out(args: argparse.Namespace) -> Path:
    from autoprune.errors import AutopruneError

    if args.resume:
        return Path(args.resume)
    if not args.out:
        raise AutopruneError("--out is required: the directory for the pruned model and reports")
    out = Path(args.out)
    if args.force and out.resolve() in Path(args.model_file or ".").resolve().parents:
        raise AutopruneError(f"--out {args.out!r} holds the model being pruned and --force would delete it; choose "
                             "another --out")
    return out


def cmd_prune(args: argparse.Namespace) -> int:
    from autoprune.api import execute
    from autoprune.errors import AutopruneError, first_line
    from autoprune.methods import create_method
    from autoprune.runs.job import read_run_file

    if args.resume:
        saved = read_run_file(Path(args.resume))
        config = resume_config(args, saved["config"])
        _resumed(args, saved)
        try:
            method = create_method(config.method, config.method_options)
        except AutopruneError as exc:
            raise AutopruneError(f"{args.resume}/run.json names {first_line(exc)}: the run cannot be resumed; start "
                                 "it again with --force") from exc
    else:
        config = prune_config(args, args.method)
        method = create_method(config.method, config.method_options, from_text=True)
        config = config.replace(method_options=method.options)
    out = _check_out(args)
    inputs = _inputs(args, config)
    stop = StopFlag()
    stop.install()
    result = execute(inputs.model, inputs.example_inputs, config, method, inputs.data, device=_device(args.device),
                     callbacks=[stop.callback], out=out, resume=bool(args.resume), force=args.force,
                     progress=not args.quiet, info=inputs.info, invocation=inputs.invocation)
    _say(before_after_table(result), *(f"warning: {w}" for w in result.warnings),
         f"\nsaved {out / 'model.pt'}, {out / 'report.json'}, {out / 'report.md'}, {out / 'report.html'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from autoprune.errors import AutopruneError
    from autoprune.runs.compare import Comparison, load_comparison_run, parse_methods, run_comparison, terminal_table

    if args.resume:
        saved = load_comparison_run(Path(args.resume))
        config, methods, title = resume_config(args, saved["config"]), saved["methods"], saved.get("title")
        _resumed(args, saved)
    else:
        methods = parse_methods(args.methods)
        config = prune_config(args, methods[0])
        title = args.title
    out = _check_out(args)
    inputs = _inputs(args, config)
    stop = StopFlag()
    stop.install()

    def started(method: str, i: int, n: int) -> None:
        _say(f"[{i + 1}/{n}] {method} ...")

    def done(result: Any) -> None:
        if result.skipped:
            _say(f"      {result.method}: already finished, skipped")
        elif result.status == "ok":
            r = result.result
            _say(f"      {result.method}: {r.metric} {100 * r.pruned.accuracy:.2f}% "
                 f"({r.accuracy_change_points:+.2f} pts), MACs -{100 * r.reduction['macs']:.1f}% "
                 f"in {result.seconds:.1f} s")
        else:
            _say(f"      {result.method}: {result.status}: {result.error}")

    comparison = Comparison(inputs.model, inputs.example_inputs, inputs.data, _device(args.device), inputs.info,
                            inputs.invocation, title)
    summary = run_comparison(comparison, config, methods, out, force=args.force, resume=bool(args.resume),
                             callbacks=[stop.callback], progress=not args.quiet, on_start=started, on_done=done)
    _say("", terminal_table(summary), f"\nsaved {out / 'compare.md'}, {out / 'compare.json'}, "
         f"{out / 'report.html'} (one sub-directory per method)")
    if not any(e["status"] == "ok" for e in summary["methods"]):
        raise AutopruneError(f"every method failed; see {out / 'compare.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from autoprune.engine.latency import by_batch_json, device_description, measure_latency
    from autoprune.engine.measure import cost_of
    from autoprune.engine.train import evaluate
    from autoprune.runs.inputs import load_inputs

    device = _device(args.device)
    inputs = load_inputs(args.model_file, dataset=args.dataset, data_dir=args.data_dir,
                         val_fraction=args.val_fraction, limit=args.limit, seed=args.seed, batch_size=128,
                         device=device, factory=args.factory, allow_other_dataset=args.allow_other_dataset)
    model = inputs.model.to(device)
    accuracy = evaluate(model, inputs.data.test, progress=not args.quiet).accuracy
    cost = cost_of(model, inputs.example_inputs)
    (timing,) = measure_latency([model], inputs.example_inputs.to(device), batch_sizes=sorted({1, args.latency_batch}),
                                device=device)
    result = {"model": args.model_file, "architecture": inputs.file.architecture,
              "dataset": inputs.splits.info.name, "test_samples": len(inputs.splits.test), "accuracy": accuracy,
              "params": cost.params, "macs": cost.macs, "size_bytes": os.path.getsize(args.model_file),
              "latency": by_batch_json(timing), "latency_device": device_description(device, torch.get_num_threads())}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [["metric", "value"], ["accuracy", f"{100 * accuracy:.2f}%"], ["params", f"{cost.params:,}"],
            ["MACs", f"{cost.macs:,}"], ["size", f"{result['size_bytes'] / 1024:.1f} KiB"]]
    for b, t in sorted(timing.items()):
        flag = "" if t.reliable else "  (noisy: re-measure on a quiet machine)"
        rows.append([f"latency b={b} (ms)", f"{t.median_ms:.3f} (IQR {t.q1_ms:.3f}-{t.q3_ms:.3f}){flag}"])
    print(_table(rows))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from autoprune.errors import AutopruneError
    from autoprune.export import export_onnx
    from autoprune.io.modelfile import load_with_spec

    if not args.onnx:
        raise AutopruneError("--onnx is empty; name the ONNX file to write, e.g. --onnx model.onnx")
    target = Path(args.onnx)
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise AutopruneError(f"--onnx {args.onnx!r}: {str(blocker)!r} is a file, not a directory; name a path in a "
                             "directory")
    if target.exists() and Path(args.model_file).exists() and os.path.samefile(target, args.model_file):
        raise AutopruneError(f"--onnx {args.onnx!r} is the model file being exported; name another file")
    if target.is_dir():
        raise AutopruneError(f"--onnx {args.onnx!r} is a directory; name the ONNX file to write")
    if target.exists() and not args.force:
        raise AutopruneError(f"{args.onnx!r} exists; name another file for --onnx, or pass --force to replace it")
    model, file = load_with_spec(args.model_file, factory=args.factory)
    shape = (file.spec.get("dataset") or {}).get("input_shape")
    if not shape:
        raise AutopruneError(f"{args.model_file!r} does not record its input shape; export it from Python with "
                             "autoprune.export_onnx(model, example_inputs, path)")
    report = export_onnx(model, torch.rand(1, *shape), args.onnx, opset=args.opset, verify=not args.no_verify)
    checked = f"checked in onnxruntime (max difference {report.max_abs_diff:.2e})" if report.verified else "not checked"
    print(f"wrote {report.path} (opset {report.opset}, {report.size_bytes / 1024:.1f} KiB), {checked}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from autoprune.api import execute
    from autoprune.data import load_dataset
    from autoprune.engine.config import PruneConfig, Target
    from autoprune.engine.train import TrainConfig
    from autoprune.errors import AutopruneError
    from autoprune.methods import create_method
    from autoprune.report.html import selection_text
    from autoprune.runs.inputs import load_inputs
    from autoprune.runs.training import train_base

    method = create_method(args.method)
    config = PruneConfig(method=method.name, method_options=method.options,
                         target=Target(macs_reduction=args.macs_reduction), budget=args.budget,
                         finetune=TrainConfig(epochs=args.finetune_epochs, lr=0.01, batch_size=64, distill=0.5,
                                              seed=args.seed), seed=args.seed)
    device = _device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise AutopruneError(f"--out {args.out!r} is a file; give a directory")
    demo_files = ("base.pt", "base.pt.ckpt", "pruned", ".base.pt.lock")
    if out.is_dir() and any(p.name not in demo_files and not p.name.startswith(".base.pt.") for p in out.iterdir()) \
            and not args.force:
        raise AutopruneError(f"{args.out!r} holds files other than an earlier demo's; pass --force or choose "
                             "another --out")
    started = time.perf_counter()
    splits = load_dataset("sample", seed=args.seed)
    print(f"[1/2] training LeNet-5 on the embedded sample ({len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test real MNIST digits, {args.epochs} epochs)")
    base_path = out / "base.pt"
    base_path.unlink(missing_ok=True)
    summary = train_base("lenet5", splits, TrainConfig(epochs=args.epochs, lr=0.05, batch_size=64, seed=args.seed),
                         base_path, device=device, progress=not args.quiet)
    print(f"      test accuracy {100 * summary['test_accuracy']:.2f}% ({summary['seconds']:.1f} s)")
    print(f"[2/2] pruning with {args.method} to remove {100 * args.macs_reduction:.0f}% of the MACs, then "
          f"{args.finetune_epochs} fine-tuning epochs")
    inputs = load_inputs(str(base_path), dataset="sample", data_dir=None, val_fraction=0.1, limit=None,
                         seed=args.seed, batch_size=64, device=device)
    stop = StopFlag()
    stop.install()
    result = execute(inputs.model, inputs.example_inputs, config, method, inputs.data, device=device,
                     callbacks=[stop.callback], out=out / "pruned", force=True, progress=not args.quiet,
                     info=inputs.info, invocation=inputs.invocation)
    print()
    print(before_after_table(result))
    print(f"\nsearch: {result.search.evaluations} evaluations in {result.search.seconds:.1f} s"
          f"{selection_text(result.search.selection)}; "
          f"total {time.perf_counter() - started:.1f} s; latency on {result.latency_device}")
    print(f"saved {out / 'pruned' / 'model.pt'} (load with autoprune.load), report in "
          f"{out / 'pruned' / 'report.html'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo, "train": cmd_train, "prune": cmd_prune, "compare": cmd_compare, "eval": cmd_eval,
    "export": cmd_export, "methods": cmd_methods, "models": cmd_models,
}

#: How the CLI spells the API's setting names in its messages.
FLAGS = {"macs_reduction": "--macs-reduction", "latency_reduction": "--latency-reduction", "max_drop": "--max-drop",
         "budget": "--budget", "round_to": "--round-to", "min_ratio": "--min-ratio", "val_samples": "--val-samples",
         "calibration_samples": "--calibration-samples", "seed": "--seed", "latency_batch": "--latency-batch",
         "latency_repeats": "--latency-repeats", "threads": "--threads", "workers": "--workers",
         "ray_address": "--ray-address", "threads_per_worker": "--threads-per-worker", "lr": "--lr/--finetune-lr",
         "distill": "--distill", "epochs": "--epochs/--finetune-epochs", "batch_size": "--batch-size",
         "weight_decay": "--weight-decay", "method": "--method", "score": "--score", "select_top": "--select-top",
         "select_steps": "--select-steps", "select_samples": "--select-samples"}


def error_line(exc: Exception) -> str:
    """The one line the CLI prints for a user error."""
    from autoprune.errors import ConfigError, first_line, short

    if isinstance(exc, ConfigError) and exc.field in FLAGS:
        return f"{FLAGS[exc.field]} {short(exc.value)}: {exc.problem}"
    return first_line(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoprune`` console script."""
    from autoprune.errors import AutopruneError, Interrupted

    parser = build_parser()
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # commands install their own
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        args = apply_config_file(parser, argv)
        if getattr(args, "resume", None):
            args.given = given_flags(parser, list(sys.argv[1:] if argv is None else argv))
        logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                            format="autoprune: %(levelname)s: %(message)s")
        return COMMANDS[args.command](args)
    except AutopruneError as exc:
        if debug:
            raise
        if isinstance(exc, Interrupted):
            line = error_line(exc)
            hint = "" if "--resume" in line else _resume_hint(args)  # a comparison's message names it already
            sys.stderr.write(f"autoprune: {line}{hint}\n")
            return EXIT_INTERRUPTED
        sys.stderr.write(f"autoprune: error: {error_line(exc)}{_failed_run_hint(args)}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"autoprune: interrupted{_resume_hint(args)}\n")
        return EXIT_INTERRUPTED
    except OSError as exc:
        if debug:
            raise
        sys.stderr.write(f"autoprune: error: {exc.strerror or exc} ({exc.filename or 'file system'}); check the "
                         "path, permissions and free disk space\n")
        return EXIT_ERROR
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in previous.items():
                if handler is not None and signal.getsignal(sig) is not handler:
                    signal.signal(sig, handler)


def _failed_run_hint(args: argparse.Namespace | None) -> str:
    """After a pruning run that failed once its search had begun (its run.json written by this command): how to
    continue it rather than search again."""
    run = getattr(args, "resume", None) or getattr(args, "out", None)
    if args is None or args.command != "prune" or not run:
        return ""
    from autoprune.runs.job import STARTED

    try:
        fresh = str(Path(run).resolve()) in STARTED and not (Path(run) / "report.json").exists()
    except OSError:
        return ""
    return (f"; the search so far is kept: after the fix, continue it with `autoprune prune --resume {run}` (and the "
            "fine-tuning, worker or latency flags that changed)") if fresh else ""


def _resume_hint(args: argparse.Namespace | None) -> str:
    """How to continue after a hard Ctrl-C: what was checkpointed survives it."""
    if args is None:
        return ""
    run = getattr(args, "resume", None) or getattr(args, "out", None)
    if args.command in ("prune", "compare") and run and (Path(run) / "run.json").exists() | (
            Path(run) / "compare_run.json").exists():
        return f"; continue with `autoprune {args.command} --resume {run}`"
    if args.command == "train" and Path(f"{args.out}.ckpt").exists():
        return "; run the same command again to resume from the last finished epoch"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
