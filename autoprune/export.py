"""Export a (pruned) model to ONNX and prove that onnxruntime computes what PyTorch computes.

:func:`export_onnx` writes a deep copy of the model, in eval mode and on the CPU, to one ``.onnx`` file with
a dynamic batch dimension on every input and output, then (``verify=True``) loads that file in onnxruntime,
runs it at the example batch size and at another one, and compares the outputs with PyTorch's. The file
appears at its destination only after all of that succeeded (it is written to a temporary file beside it
and renamed), so a path that exists holds a model that was checked.

Exporter choice: the TorchScript (tracing) exporter, ``torch.onnx.export(..., dynamo=False)``. The default
since torch 2.9 is the ``torch.export``-based exporter; for plain CNNs the tracing one is the better fit
here: it needs no ``onnxscript`` (only ``onnx``), it is much faster on small models (a first export of a
small CNN took 0.3 s against 5 s with torch 2.13, which matters in tests and in the CLI), it prints nothing
(the dynamo exporter prints progress lines and logs through onnxscript), it writes byte-identical files,
it marks the batch dimension dynamic with ``dynamic_axes`` without the 0/1 specialisation rules of
``torch.export``, and it exists, with the same behaviour, in every torch this package supports
(``>=2.1,<2.14``; torch deprecates it, so a future torch range must revisit this). Its price is that
Python-side logic in ``forward`` is frozen at the example inputs: the tracer's warnings about that are
logged at WARNING level, and the verification at a second batch size catches what depends on the batch
size (loops over samples, ``int(x.shape[0])``). A branch on tensor *values* (``if x.mean() > 0``) that
takes the same way for both verification batches cannot be detected.

The opset defaults to :data:`DEFAULT_OPSET` (17) rather than the exporter's own default, so that the file
does not change with the torch version; every torch in range and onnxruntime >= 1.14 support it.

``onnx`` is needed to export at all (the exporter imports it); ``onnxruntime`` only to verify. Both are in
the ``autoprune[onnx]`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from autoprune.engine.distributed import PARALLEL_WRAPPERS
from autoprune.errors import AutopruneError
from autoprune.io.files import atomic_path

__all__ = ["DEFAULT_OPSET", "ExportReport", "export_onnx"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
"""Opset used when the caller passes none: supported by every torch in range and by onnxruntime >= 1.14."""

_MAX_PROTO_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit, less room for the graph itself
_INSTALL_HINT = "pip install onnx onnxruntime (or pip install 'autoprune[onnx]')"


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path: The ONNX file.
        opset: The default-domain opset recorded in the file.
        input_names: Graph input names, in ``forward``'s argument order.
        output_names: Graph output names, in the order ``forward`` returns them (nested tuples flattened).
        size_bytes: Size of the file.
        verified: Whether onnxruntime ran the file and matched PyTorch within tolerance.
        max_abs_diff: Largest absolute difference between onnxruntime and PyTorch over all outputs and both
            batch sizes; ``None`` when not verified.
        seconds: Wall time of the export and the verification.
    """

    path: Path
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    size_bytes: int
    verified: bool
    max_abs_diff: float | None
    seconds: float


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> ExportReport:
    """Export ``model`` to an ONNX file at ``path`` and (by default) check it in onnxruntime.

    The caller's model is not touched: a deep copy is moved to the CPU, put in eval mode and traced with
    ``example_inputs``. The file is written atomically; on any failure nothing is left at ``path``.

    Args:
        model: Any ``nn.Module`` whose ``forward`` takes the example tensors positionally and returns a tensor
            or a (nested) tuple/list of tensors.
        example_inputs: One tensor, or a tuple of tensors for a multi-input model; dim 0 of each is the batch
            (the same size in all of them).
        path: Destination file; its directory is created if needed.
        opset: ONNX opset; default :data:`DEFAULT_OPSET`.
        dynamic_batch: Mark dim 0 of every input and output as the symbolic dimension ``batch``. With False
            the file accepts only the example batch size (and verification runs only at it).
        input_names: Graph input names; default ``input`` for one input, else ``input_0``, ``input_1``, ...
        output_names: Graph output names; default ``output`` for one output, else ``output_0``, ...
        verify: Run the file in onnxruntime (CPUExecutionProvider) on the example inputs and on a batch of
            another size, and require ``|onnx - torch| <= atol + rtol * |torch|`` element-wise.
        rtol: Relative tolerance of the comparison.
        atol: Absolute tolerance of the comparison.

    Returns:
        An :class:`ExportReport`.

    Raises:
        AutopruneError: One line naming the model, the cause and the fix, when a package is missing, the
            arguments are inconsistent, the exporter fails (e.g. an operator without an ONNX mapping), the
            file cannot be written, or onnxruntime disagrees with PyTorch.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"export_onnx needs an nn.Module, got {type(model).__name__}")
    name = _model_name(model)
    inputs = _as_input_tuple(example_inputs, name)
    opset = DEFAULT_OPSET if opset is None else _check_opset(opset)
    if rtol < 0 or atol < 0 or not (math.isfinite(rtol) and math.isfinite(atol)):
        raise AutopruneError(f"export_onnx: rtol={rtol!r}, atol={atol!r}; tolerances must be finite and >= 0")
    onnx = _require("onnx", "to export to ONNX")
    ort = _require("onnxruntime", "to verify the exported model (or pass verify=False)") if verify else None
    target = Path(path)
    if target.is_dir():
        raise AutopruneError(f"cannot export {name} to {str(target)!r}: it is a directory; pass a file path such "
                             f"as {str(target / 'model.onnx')!r}")

    net = _cpu_eval_copy(model, name)
    _check_size(net, name)
    with torch.no_grad():
        try:
            reference = _flatten_outputs(net(*inputs), name)
        except AutopruneError:
            raise
        except Exception as exc:
            raise AutopruneError(f"cannot export {name} to ONNX: its forward fails on the example inputs "
                                 f"({_first_line(exc)}); pass inputs that the model accepts") from exc
    in_names = _names(input_names, len(inputs), "input", name)
    out_names = _names(output_names, len(reference), "output", name)
    if len(set(in_names) | set(out_names)) != len(in_names) + len(out_names):
        raise AutopruneError(f"cannot export {name}: input and output names must all differ, got inputs "
                             f"{list(in_names)} and outputs {list(out_names)}")
    axes: dict[str, dict[int, str]] | None = None
    if dynamic_batch:
        axes = {n: {0: "batch"} for n, t in zip(in_names + out_names, inputs + reference, strict=True) if t.dim()}

    try:
        with atomic_path(target) as tmp:
            _run_exporter(net, inputs, tmp, opset=opset, input_names=in_names, output_names=out_names,
                          dynamic_axes=axes, name=name)
            written_opset = _check_file(onnx, tmp, in_names, default_opset=opset, name=name)
            max_diff = None
            if ort is not None:
                max_diff = _verify(onnx, ort, tmp, net, inputs, reference, in_names, out_names,
                                   other_batch=dynamic_batch, rtol=rtol, atol=atol, name=name)
            size = tmp.stat().st_size
    except OSError as exc:
        raise AutopruneError(f"cannot write the ONNX file of {name} to {str(target)!r} "
                             f"({exc.strerror or _first_line(exc)}); choose a writable path") from exc
    except AutopruneError as exc:
        if not isinstance(exc.__cause__, OSError):
            raise
        # atomic_path reports write failures itself (without the model); name the model and the target
        raise AutopruneError(f"cannot write the ONNX file of {name} to {str(target)!r}: {exc}") from exc

    seconds = time.perf_counter() - start
    logger.info("exported %s to %s (opset %d, %d bytes, %s) in %.2fs", name, target, written_opset, size,
                f"max |onnx - torch| {max_diff:.2e}" if max_diff is not None else "not verified", seconds)
    return ExportReport(path=target, opset=written_opset, input_names=in_names, output_names=out_names,
                        size_bytes=size, verified=ort is not None, max_abs_diff=max_diff, seconds=seconds)


# ---- arguments -----------------------------------------------------------------------------------

def _model_name(model: nn.Module) -> str:
    inner = getattr(model, "net", None)  # autoprune's NormalizedModel wraps the architecture
    if isinstance(inner, nn.Module):
        return f"{type(model).__name__}({type(inner).__name__})"
    return type(model).__name__


def _as_input_tuple(example_inputs: Any, name: str) -> tuple[torch.Tensor, ...]:
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, tuple | list) or not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise AutopruneError(f"cannot export {name}: example_inputs must be a tensor or a non-empty tuple of "
                             f"tensors, got {type(example_inputs).__name__}")
    if any(t.dim() == 0 for t in items):
        raise AutopruneError(f"cannot export {name}: every example input needs a batch dimension (dim 0); "
                             "add one with x.unsqueeze(0)")
    batches = {t.shape[0] for t in items}
    if len(batches) != 1 or 0 in batches:
        raise AutopruneError(f"cannot export {name}: example inputs must share one non-zero batch size (dim 0), "
                             f"got {[t.shape[0] for t in items]}")
    return tuple(t.detach().cpu() for t in items)


def _check_opset(opset: int) -> int:
    from torch.onnx import _constants

    top = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
    low = _constants.ONNX_MIN_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= top:
        raise AutopruneError(f"opset={opset!r}: this torch exports ONNX opsets {low} to {top}; "
                             f"omit opset for {DEFAULT_OPSET}")
    return opset


def _names(given: Sequence[str] | None, count: int, stem: str, name: str) -> tuple[str, ...]:
    if given is None:
        return (stem,) if count == 1 else tuple(f"{stem}_{i}" for i in range(count))
    names = (given,) if isinstance(given, str) else tuple(given)
    if len(names) != count or not all(isinstance(n, str) and n for n in names) or len(set(names)) != count:
        raise AutopruneError(f"cannot export {name}: {stem}_names={list(names)!r} must be {count} distinct "
                             f"non-empty string(s), one per model {stem}")
    return names


def _require(module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise AutopruneError(f"the package {module!r} is needed {purpose} but is not installed; "
                             f"{_INSTALL_HINT}") from exc


def _cpu_eval_copy(model: nn.Module, name: str) -> nn.Module:
    if isinstance(model, PARALLEL_WRAPPERS):  # the exporter refuses the wrapper; the network is inside it
        model = model.module
    try:
        net = copy.deepcopy(model)
    except Exception as exc:
        raise AutopruneError(f"cannot export {name}: the model cannot be deep-copied ({_first_line(exc)}); "
                             "remove non-copyable attributes (open files, locks) from it") from exc
    return net.cpu().eval()


def _check_size(net: nn.Module, name: str) -> None:
    total = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    if total > _MAX_PROTO_BYTES:
        raise AutopruneError(f"cannot export {name}: its weights take {total / 2**30:.1f} GiB, over the 2 GiB "
                             "limit of a single ONNX file; export a smaller (pruned) model")


def _flatten_outputs(out: Any, name: str) -> tuple[torch.Tensor, ...]:
    if isinstance(out, torch.Tensor):
        return (out,)
    if isinstance(out, tuple | list) and out:
        return tuple(t for item in out for t in _flatten_outputs(item, name))
    raise AutopruneError(f"cannot export {name}: forward must return a tensor or a tuple/list of tensors, got "
                         f"{type(out).__name__}; wrap the model in a module that returns tensors")


def _first_line(exc: BaseException) -> str:
    """The exception's message on one line (whitespace collapsed), cut to 240 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 240 else text[:237] + "..."


# ---- export ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Route the TorchScript exporter's warnings and its C++ log to :mod:`logging`.

    The exporter warns about its own deprecation on every call, and (a torch bug: it tests the function
    ``_jit_is_onnx_log_enabled`` instead of calling it) switches its C++ log on and leaves it on, so that a
    failed export dumps the whole graph to stderr. Here the log is sent to ``logger.debug`` and its switch
    restored; warnings are logged once each, trace warnings (frozen Python logic) at WARNING level.
    """
    c = torch._C
    was_enabled = c._jit_is_onnx_log_enabled() if hasattr(c, "_jit_is_onnx_log_enabled") else None
    original_log = getattr(c, "_jit_onnx_log", None)
    if original_log is not None:
        c._jit_onnx_log = lambda *parts: logger.debug("torch.onnx: %s", " ".join(map(str, parts)))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        if original_log is not None:
            c._jit_onnx_log = original_log
        if was_enabled is not None:
            c._jit_set_onnx_log_enabled(was_enabled)
        seen: set[str] = set()
        for w in caught:
            text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else w.category.__name__
            if text in seen:
                continue
            seen.add(text)
            if issubclass(w.category, torch.jit.TracerWarning):
                logger.warning("ONNX export: %s", text)
            else:
                logger.debug("ONNX export: %s: %s", w.category.__name__, text)


def _run_exporter(net: nn.Module, inputs: tuple[torch.Tensor, ...], file: Path, *, opset: int,
                  input_names: tuple[str, ...], output_names: tuple[str, ...],
                  dynamic_axes: dict[str, dict[int, str]] | None, name: str) -> None:
    kwargs: dict[str, Any] = {"opset_version": opset, "input_names": list(input_names),
                              "output_names": list(output_names), "dynamic_axes": dynamic_axes,
                              "do_constant_folding": True}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # torch >= 2.5; before that the TorchScript exporter is the only one
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(net, inputs, str(file), **kwargs)
    except OSError:
        raise
    except Exception as exc:
        raise AutopruneError(_export_failure(exc, name, opset)) from exc


def _export_failure(exc: Exception, name: str, opset: int) -> str:
    cause = _first_line(exc)
    if type(exc).__name__ == "UnsupportedOperatorError":
        top = _max_opset()
        higher = f"a higher opset (up to {top}) may map it; otherwise " if opset < top else ""
        return (f"cannot export {name} to ONNX: {cause}; {higher}replace that operation in the model or export a "
                "submodule without it")
    if "tracer" in cause.lower() or "trace" in cause.lower():
        fix = ("forward must compute its outputs from its tensor inputs with torch operations (no .item(), "
               ".tolist() or numpy round trips, no Python values as outputs)")
    else:
        fix = "simplify forward (tensor inputs and outputs, no data-dependent Python logic) or export a submodule"
    return f"cannot export {name} to ONNX: {type(exc).__name__}: {cause}; {fix}"


def _max_opset() -> int:
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET))


def _check_file(onnx: ModuleType, file: Path, in_names: tuple[str, ...], *, default_opset: int, name: str) -> int:
    """The file's default-domain opset, after checking that the graph still takes every input.

    The tracer drops an input whose values reach the outputs only through Python (``.item()``,
    ``.tolist()``, numpy): the file then computes constants, whatever it is fed.
    """
    proto = onnx.load(str(file), load_external_data=False)
    graph_inputs = {i.name for i in proto.graph.input} - {i.name for i in proto.graph.initializer}
    missing = [n for n in in_names if n not in graph_inputs]
    if missing:
        raise AutopruneError(f"cannot export {name} to ONNX: the traced graph does not use input(s) {missing}, "
                             "so its outputs are constants; forward must compute them from its inputs with torch "
                             "ops, not through .item(), .tolist() or numpy")
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return default_opset


# ---- verification ----------------------------------------------------------------------------------

def _other_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example inputs at another batch size: 1 (or 2 when the example batch is 1), by repeating rows.

    Repeating the caller's rows, not drawing noise, keeps the inputs valid for any dtype and range
    (token ids, images in [0, 1]).
    """
    batch = inputs[0].shape[0]
    size = 2 if batch == 1 else 1
    reps = -(-size // batch)
    return tuple(torch.cat([t] * reps)[:size] for t in inputs)


def _verify(onnx: ModuleType, ort: ModuleType, file: Path, net: nn.Module, inputs: tuple[torch.Tensor, ...],
            reference: tuple[torch.Tensor, ...], in_names: tuple[str, ...], out_names: tuple[str, ...], *,
            other_batch: bool, rtol: float, atol: float, name: str) -> float:
    try:
        onnx.checker.check_model(str(file))
        options = ort.SessionOptions()
        options.log_severity_level = 4  # fatal only: its errors reach the caller in the AutopruneError
        session = ort.InferenceSession(str(file), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        fix = ("export model.float() with float32 inputs: onnxruntime's CPU provider lacks float64 kernels for "
               "some layers (Conv)" if any(t.dtype == torch.float64 for t in (*net.parameters(), *inputs))
               else "upgrade onnxruntime or export with a lower opset")
        raise AutopruneError(f"the ONNX file exported from {name} fails onnx.checker or onnxruntime "
                             f"{getattr(ort, '__version__', '?')} ({_first_line(exc)}); {fix}") from exc
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    cases = [(inputs, reference)]
    if other_batch:
        more = _other_batch(inputs)
        with torch.no_grad():
            cases.append((more, _flatten_outputs(net(*more), name)))
    worst = 0.0
    for batch_inputs, expected in cases:
        batch = batch_inputs[0].shape[0]
        feed = {n: t.numpy() for n, t in zip(in_names, batch_inputs, strict=True)}
        try:
            got = session.run(list(out_names), feed, run_options)
        except Exception as exc:
            raise AutopruneError(f"onnxruntime cannot run the ONNX file exported from {name} at batch {batch} "
                                 f"({_first_line(exc)}); forward probably freezes the example batch size (e.g. "
                                 "int(x.shape[0]) or a Python loop over the batch): use torch ops on whole "
                                 "tensors, or pass dynamic_batch=False") from exc
        for out_name, onnx_out, torch_out in zip(out_names, got, expected, strict=True):
            want = torch_out.detach().cpu().numpy()
            if onnx_out.shape != want.shape:
                raise AutopruneError(f"ONNX output {out_name!r} of {name} has shape {list(onnx_out.shape)} at "
                                     f"batch {batch}, PyTorch's {list(want.shape)}; forward's Python logic was "
                                     "frozen at the example inputs: compute shapes with torch ops")
            diff, bad = _compare(onnx_out, want, rtol=rtol, atol=atol)
            worst = max(worst, diff)
            if bad:
                raise AutopruneError(f"ONNX output {out_name!r} of {name} differs from PyTorch at batch {batch} "
                                     f"by up to {diff:.3g} (rtol={rtol:g}, atol={atol:g}); forward's Python logic "
                                     "may depend on the input values (frozen by tracing), or loosen rtol/atol")
    return worst


def _compare(got: np.ndarray, want: np.ndarray, *, rtol: float, atol: float) -> tuple[float, bool]:
    """Max absolute difference, and whether any element is outside ``atol + rtol * |want|`` (NaN == NaN)."""
    if got.size == 0:
        return 0.0, False
    a, b = got.astype(np.float64), want.astype(np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    same_inf = np.isinf(a) & (a == b)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan | same_inf, 0.0, np.abs(a - b))
    diff = np.where(np.isnan(diff), np.inf, diff)
    bad = bool(np.any(diff > atol + rtol * np.abs(np.where(np.isfinite(b), b, 0.0))))
    return float(diff.max()), bad
