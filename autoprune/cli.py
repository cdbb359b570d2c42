"""``autoprune``: thin subcommands over the library.

Every user error is one line on stderr (``autoprune: error: ...``) and a non-zero exit; ``--debug``
shows the traceback instead. Arguments and files are checked before any long work starts.
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

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"autoprune: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(EXIT_USAGE)


def _nonneg_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _pos_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


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
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed for everything random (default 0)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_data(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--dataset", required=required, help="mnist, fashion-mnist, cifar10, imagefolder, sample, synthetic")
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--val-fraction", type=_float, default=0.1,
                   help="fraction of the training data held out for validation (default 0.1)")
    p.add_argument("--limit", type=_pos_int, help="use at most this many training and test images (quick runs)")


def _add_finetune(p: argparse.ArgumentParser) -> None:
    p.add_argument("--finetune-epochs", type=_nonneg_int, default=2, help="fine-tuning epochs (default 2)")
    p.add_argument("--finetune-lr", type=_float, default=0.01, help="fine-tuning learning rate (default 0.01)")
    p.add_argument("--batch-size", type=_pos_int, default=128, help="training batch size (default 128)")
    p.add_argument("--distill", type=_float, default=0.0,
                   help="weight of distillation from the unpruned model during fine-tuning, 0..1 (default 0)")


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--macs-reduction", type=_float, help="remove at least this fraction of the MACs, 0 < R < 1")
    p.add_argument("--max-drop", type=_float,
                   help="instead: remove as many MACs as possible losing at most PP points of validation accuracy")
    p.add_argument("--budget", type=_pos_int, help="candidate evaluations allowed (default: the method's)")
    p.add_argument("--extra-epochs", type=_nonneg_int, default=1,
                   help="epochs of a method's own training (slim's sparsity, sa's shards; default 1)")
    p.add_argument("--method-option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="method-specific option, e.g. particles=20 (repeatable)")
    p.add_argument("--val-samples", type=_pos_int, help="validation images used to score candidates (default all)")
    p.add_argument("--round-to", type=_pos_int, default=1, help="kept channel counts are multiples of this")
    p.add_argument("--min-ratio", type=_float, default=0.05, help="each layer keeps at least this fraction")
    p.add_argument("--latency-batch", type=_pos_int, default=256, help="large batch size for latency (default 256)")
    p.add_argument("--latency-repeats", type=_pos_int, default=30,
                   help="timed runs per model and batch size for latency (default 30)")
    p.add_argument("--threads", type=_pos_int, help="CPU threads for latency measurement")


def _add_pruning_run(p: argparse.ArgumentParser, *, out_help: str, resume_help: str) -> None:
    """The arguments `prune` and `compare` share: model, data, target, fine-tuning, output, resume."""
    p.add_argument("model", nargs="?", help="model file written by `autoprune train` (or `prune`)")
    _add_data(p, required=False)
    _add_target(p)
    _add_finetune(p)
    p.add_argument("--out", help=out_help)
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.add_argument("--resume", metavar="DIR", help=resume_help)
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
    p.add_argument("--budget", type=_pos_int, help="candidate evaluations (default: the method's)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo); an earlier demo's "
                   "output there is replaced, anything else only with --force")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
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
    _add_pruning_run(p, out_help="output directory",
                     resume_help="continue an interrupted run in DIR (other options are read from DIR/run.json)")

    p = sub.add_parser("compare", help="prune one model with several methods and compare them side by side")
    p.add_argument("--methods", default="all", help="comma-separated methods, e.g. otp,pso,l1 (default all)")
    p.add_argument("--title", help="heading of the comparison's reports, e.g. 'ResNet-20 on CIFAR-10 (JPEG q75)'")
    _add_pruning_run(p, out_help="output directory (one sub-directory per method)",
                     resume_help="continue an interrupted comparison in DIR (finished methods are skipped; other "
                     "options are read from DIR/compare_run.json)")

    p = sub.add_parser("eval", help="test accuracy, size, MACs and latency of a saved model")
    p.add_argument("model", help="model file")
    _add_data(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--latency-batch", type=_pos_int, default=256, help="large batch size for latency (default 256)")
    _add_common(p)

    p = sub.add_parser("methods", help="list the pruning methods")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("models", help="list the registered architectures")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def _version() -> str:
    from autoprune import __version__

    return f"autoprune {__version__}"


# ---- helpers -----------------------------------------------------------------------------------

def _device(name: str):
    import torch

    from autoprune.errors import AutopruneError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AutopruneError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AutopruneError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def _load_data(args: argparse.Namespace, seed: int):
    from autoprune.data import load_dataset

    return load_dataset(args.dataset, args.data_dir, val_fraction=args.val_fraction, seed=seed, limit=args.limit)


class _StopFlag:
    """First Ctrl-C: finish the current evaluation (or training epoch) and stop cleanly; second: stop at once.

    ``main`` restores the previous SIGINT handler when the command returns.
    """

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            sys.stderr.write("\nautoprune: stopping after the current evaluation or epoch (Ctrl-C again to abort)\n")

        if threading.current_thread() is threading.main_thread():  # signals can only be handled there
            signal.signal(signal.SIGINT, handler)


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def before_after_table(report: dict[str, Any]) -> str:
    """The before/after table printed at the end of `prune` and `demo`."""
    b, p = report["base"], report["pruned"]
    batches = list(b["latency_ms"])
    rows = [["", "accuracy", "params", "MACs", "size (KiB)"] + [f"latency b={x} (ms)" for x in batches]]
    for name, side in (("base", b), ("pruned", p)):
        rows.append([name, f"{100 * side['accuracy']:.2f}%", f"{side['params']:,}", f"{side['macs']:,}",
                     f"{side['size_bytes'] / 1024:.1f}"] + [f"{side['latency_ms'][x]:.3f}" for x in batches])
    red = report["reduction"]
    rows.append(["change", f"{report['accuracy_change_points']:+.2f} pts", f"-{100 * red['params']:.1f}%",
                 f"-{100 * red['macs']:.1f}%", f"-{100 * red['size']:.1f}%"]
                + [f"{report['speedup'][x]:.2f}x faster" for x in batches])
    return _table(rows)


# ---- subcommands -------------------------------------------------------------------------------

def cmd_methods(args: argparse.Namespace) -> int:
    from autoprune.methods import METHODS

    rows = [{"name": n, "summary": m.summary, "source": m.source, "default_budget": m.default_budget}
            for n, m in sorted(METHODS.items())]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_table([["method", "default budget", "what it does"]]
                     + [[r["name"], str(r["default_budget"]), r["summary"]] for r in rows]))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from autoprune.models import MODELS

    print(_table([["model", "description"]] + [[n, (f.__doc__ or "").strip().splitlines()[0]]
                                                for n, f in sorted(MODELS.items())]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from autoprune.engine.train import TrainConfig
    from autoprune.errors import AutopruneError
    from autoprune.models import resolve_factory
    from autoprune.runs.pipeline import train_base

    out = Path(args.out)
    if out.exists() and not args.force:
        raise AutopruneError(f"{args.out!r} already exists; pass --force to overwrite it or choose another --out")
    if out.is_dir():
        raise AutopruneError(f"--out {args.out!r} is a directory; give a file name such as runs/model.pt")
    out.parent.mkdir(parents=True, exist_ok=True)  # an unusable --out fails now, not after training (OSError)
    resolve_factory(args.model)
    if args.width is not None and not args.width > 0:
        raise AutopruneError(f"--width must be > 0 (it multiplies every layer's width), got {args.width}")
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         weight_decay=args.weight_decay, seed=args.seed)
    device = _device(args.device)
    splits = _load_data(args, args.seed)
    kwargs = {"width": args.width} if args.width is not None else {}
    stop = _StopFlag()
    stop.install()
    summary = train_base(args.model, splits, config, out, device=device, progress=not args.quiet,
                         model_kwargs=kwargs, stop_requested=stop)
    print(f"trained {summary['model']} on {summary['dataset']} for {summary['epochs']} epochs in "
          f"{summary['seconds']:.1f} s: test accuracy {100 * summary['test_accuracy']:.2f}% -> {summary['out']}")
    return 0


def _prune_config(args: argparse.Namespace):
    from autoprune.engine.train import TrainConfig
    from autoprune.runs.pipeline import PruneConfig

    finetune = TrainConfig(epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.batch_size,
                           distill=args.distill, seed=args.seed)
    return PruneConfig(method=args.method, macs_reduction=args.macs_reduction, max_drop=args.max_drop,
                       budget=args.budget, finetune=finetune, extra_epochs=args.extra_epochs,
                       method_options=dict(args.method_option), val_samples=args.val_samples,
                       round_to=args.round_to, min_ratio=args.min_ratio, seed=args.seed,
                       latency_batch=args.latency_batch, latency_repeats=args.latency_repeats, threads=args.threads)


def cmd_prune(args: argparse.Namespace) -> int:
    from autoprune.errors import AutopruneError
    from autoprune.io.artifact import load_with_spec
    from autoprune.methods import create_method
    from autoprune.runs.pipeline import (
        PruneConfig,
        check_compatible,
        check_reachable,
        prepare_output,
        prune_model,
        pruning_space,
    )

    if args.resume:
        out = Path(args.resume)
        prepare_output(out, force=False, resume=True)
        try:
            saved = json.loads((out / "run.json").read_text(encoding="utf-8"))
            config = PruneConfig.from_json(saved["config"])
            invocation = dict(saved.get("invocation") or {})
        except AutopruneError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError is a ValueError
            raise AutopruneError(f"{str(out / 'run.json')!r} is damaged ({type(exc).__name__}), so the run cannot be "
                                 "resumed; start it again with --out") from exc
        model_path, dataset, data_dir = invocation.get("model"), invocation.get("dataset"), invocation.get("data_dir")
        if not model_path or not dataset:
            raise AutopruneError(f"{str(out / 'run.json')!r} does not name the model file and dataset (was the run "
                                 "started from Python?); resume it from Python with prune_model(resume=True)")
        args.val_fraction, args.limit = invocation.get("val_fraction", 0.1), invocation.get("limit")
    else:
        if not args.model:
            raise AutopruneError("give the model file to prune (autoprune prune MODEL ...) or --resume DIR")
        if not args.dataset:
            raise AutopruneError("--dataset is required (the data the model was trained on)")
        if not args.out:
            raise AutopruneError("--out is required: the directory for the pruned model and reports")
        config = _prune_config(args)
        create_method(config.method).check_options(config.method_options)
        out, model_path, dataset, data_dir = Path(args.out), args.model, args.dataset, args.data_dir
        if args.force and out.resolve() in Path(model_path).resolve().parents:
            raise AutopruneError(f"--out {args.out!r} holds the model being pruned and --force would delete it; "
                                 "choose another --out")
    args.dataset, args.data_dir = dataset, data_dir
    device = _device(args.device)
    model, spec = load_with_spec(model_path)
    splits = _load_data(args, config.seed)
    check_compatible(spec, splits, model_path)
    check_reachable(pruning_space(model, splits, config), config)
    prepare_output(out, force=args.force, resume=bool(args.resume))
    invocation = {"model": str(Path(model_path).resolve()), "dataset": dataset,
                  "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                  "val_fraction": args.val_fraction, "limit": args.limit}
    stop = _StopFlag()
    stop.install()
    report = prune_model(model, spec, splits, config, out, device=device, progress=not args.quiet,
                         resume=bool(args.resume), stop_requested=stop, invocation=invocation)
    print(before_after_table(report))
    print(f"\nsaved {out / 'model.pt'}, {out / 'report.json'}, {out / 'report.md'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from autoprune.engine.measure import compare_latency, cost_of, device_name
    from autoprune.engine.train import evaluate
    from autoprune.io.artifact import load_with_spec
    from autoprune.runs.pipeline import check_compatible

    model, spec = load_with_spec(args.model)
    splits = _load_data(args, args.seed)
    check_compatible(spec, splits, args.model)
    device = _device(args.device)
    info = splits.info
    shape = (info.in_channels, *info.image_size)
    accuracy = evaluate(model.to(device), splits.test, progress=not args.quiet).accuracy
    cost = cost_of(model, shape)
    (lat,) = compare_latency([model.cpu()], shape, batch_sizes=(1, args.latency_batch))
    result = {"model": args.model, "architecture": spec.get("model"), "dataset": info.name,
              "test_samples": len(splits.test), "accuracy": accuracy, "params": cost.params, "macs": cost.macs,
              "size_bytes": os.path.getsize(args.model),
              "latency_ms": {str(b): round(v, 4) for b, v in lat.ms.items()}, "latency_device": device_name("cpu")}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table([["metric", "value"], ["accuracy", f"{100 * accuracy:.2f}%"], ["params", f"{cost.params:,}"],
                      ["MACs", f"{cost.macs:,}"], ["size", f"{result['size_bytes'] / 1024:.1f} KiB"]]
                     + [[f"latency b={b} (ms)", f"{v:.3f}"] for b, v in lat.ms.items()]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from autoprune.data import load_dataset
    from autoprune.engine.train import TrainConfig
    from autoprune.methods import create_method
    from autoprune.runs.pipeline import PruneConfig, prepare_output, prune_model, train_base

    create_method(args.method)
    config = PruneConfig(method=args.method, macs_reduction=args.macs_reduction, budget=args.budget,
                         finetune=TrainConfig(epochs=args.finetune_epochs, lr=0.01, batch_size=64, distill=0.5,
                                              seed=args.seed),
                         seed=args.seed)
    device = _device(args.device)
    out = Path(args.out)
    earlier_demo = out.is_dir() and all(p.name in ("base.pt", "base.pt.ckpt", "pruned")
                                        or p.name.startswith(".base.pt.") for p in out.iterdir())
    prepare_output(out, force=args.force or earlier_demo, resume=False)
    started = time.perf_counter()
    splits = load_dataset("sample", seed=args.seed)
    print(f"[1/2] training LeNet-5 on the embedded sample ({len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test real MNIST digits, {args.epochs} epochs)")
    base_path = out / "base.pt"
    train_config = TrainConfig(epochs=args.epochs, lr=0.05, batch_size=64, seed=args.seed)
    summary = train_base("lenet5", splits, train_config, base_path, device=device, progress=not args.quiet)
    print(f"      test accuracy {100 * summary['test_accuracy']:.2f}% ({summary['seconds']:.1f} s)")
    print(f"[2/2] pruning with {args.method} to remove {100 * args.macs_reduction:.0f}% of the MACs, then "
          f"{args.finetune_epochs} fine-tuning epochs")
    from autoprune.io.artifact import load_with_spec

    model, spec = load_with_spec(base_path)
    pruned_dir = out / "pruned"
    prepare_output(pruned_dir, force=True, resume=False)
    stop = _StopFlag()
    stop.install()
    report = prune_model(model, spec, splits, config, pruned_dir, device=device, progress=not args.quiet,
                         stop_requested=stop)
    print()
    print(before_after_table(report))
    print(f"\nsearch: {report['search']['evaluations']} evaluations in {report['search']['seconds']:.1f} s; "
          f"total {time.perf_counter() - started:.1f} s; latency on {report['latency']['device']}")
    print(f"saved {pruned_dir / 'model.pt'} (load with autoprune.load), report in {pruned_dir / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from autoprune.errors import AutopruneError
    from autoprune.io.artifact import load_with_spec
    from autoprune.runs.compare import (
        check_options,
        check_target,
        load_comparison_run,
        parse_methods,
        prepare_comparison,
        run_comparison,
        terminal_table,
    )
    from autoprune.runs.pipeline import check_compatible

    if args.resume:
        out = Path(args.resume)
        saved = load_comparison_run(out)
        config, methods, title = saved["config"], saved["methods"], saved.get("title")
        invocation = saved.get("invocation", {})
        model_path = invocation.get("model")
        args.dataset, args.data_dir = invocation.get("dataset"), invocation.get("data_dir")
        args.val_fraction, args.limit = invocation.get("val_fraction", 0.1), invocation.get("limit")
    else:
        if not args.model:
            raise AutopruneError("give the model file to prune (autoprune compare MODEL ...) or --resume DIR")
        methods = parse_methods(args.methods)
        if not args.dataset:
            raise AutopruneError("--dataset is required (the data the model was trained on)")
        if not args.out:
            raise AutopruneError("--out is required: the directory for the comparison")
        args.method = methods[0]
        config = _prune_config(args)
        check_options(methods, config.method_options)
        out, model_path, title = Path(args.out), args.model, args.title
        if args.force and out.resolve() in Path(model_path).resolve().parents:
            raise AutopruneError(f"--out {args.out!r} holds the model being pruned and --force would delete it; "
                                 "choose another --out")
        invocation = {"model": str(Path(model_path).resolve()), "dataset": args.dataset,
                      "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
                      "val_fraction": args.val_fraction, "limit": args.limit}
    device = _device(args.device)
    model, spec = load_with_spec(model_path)
    splits = _load_data(args, config.seed)
    check_compatible(spec, splits, model_path)
    check_target(model, splits, config)
    prepare_comparison(out, force=args.force, resume=bool(args.resume))

    def started(method: str, i: int, n: int) -> None:
        print(f"[{i + 1}/{n}] {method} ...", flush=True)

    def done(result: Any) -> None:
        if result.skipped:
            print(f"      {result.method}: already finished, skipped", flush=True)
        elif result.status == "ok":
            r = result.report
            print(f"      {result.method}: test accuracy {100 * r['pruned']['accuracy']:.2f}% "
                  f"({r['accuracy_change_points']:+.2f} pts), MACs -{100 * r['reduction']['macs']:.1f}% "
                  f"in {result.seconds:.1f} s", flush=True)
        else:
            print(f"      {result.method}: {result.status}: {result.error}", flush=True)

    stop = _StopFlag()
    stop.install()
    summary = run_comparison(model, spec, splits, config, methods, out, device=device, progress=not args.quiet,
                             resume=bool(args.resume), stop_requested=stop, invocation=invocation, title=title,
                             on_start=started, on_done=done)
    print()
    print(terminal_table(summary))
    print(f"\nsaved {out / 'compare.md'}, {out / 'compare.json'}, {out / 'report.html'} (one sub-directory per "
          "method)")
    if not any(e["status"] == "ok" for e in summary["methods"]):
        raise AutopruneError(f"every method failed; see {out / 'compare.md'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo, "train": cmd_train, "prune": cmd_prune, "compare": cmd_compare, "eval": cmd_eval,
    "methods": cmd_methods, "models": cmd_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoprune`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="autoprune: %(levelname)s: %(message)s")
    from autoprune.errors import AutopruneError, Interrupted

    previous_sigint = signal.getsignal(signal.SIGINT)  # commands install their own (_StopFlag)
    try:
        return COMMANDS[args.command](args)
    except AutopruneError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"autoprune: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}\n")
        return EXIT_INTERRUPTED if isinstance(exc, Interrupted) else 1
    except KeyboardInterrupt:
        if args.debug:
            raise
        sys.stderr.write(f"autoprune: interrupted{_resume_hint(args)}\n")
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.debug:
            raise
        sys.stderr.write(f"autoprune: error: {exc.strerror or exc} ({exc.filename or 'file system'}); check the "
                         "path, permissions and free disk space\n")
        return 1
    finally:
        if (previous_sigint is not None and signal.getsignal(signal.SIGINT) is not previous_sigint
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGINT, previous_sigint)


def _resume_hint(args: argparse.Namespace) -> str:
    """How to continue after a hard Ctrl-C: what was checkpointed survives it."""
    run = getattr(args, "resume", None) or getattr(args, "out", None)
    if args.command == "prune" and run and (Path(run) / "run.json").exists():
        return f"; continue with `autoprune prune --resume {run}`"
    if args.command == "train" and Path(f"{args.out}.ckpt").exists():
        return "; run the same command again to resume from the last finished epoch"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
