"""The model file, format version 2: plain data plus tensors, validated before anything is built.

A file is ``torch.save({"format": "autoprune-model", "version": 2, "spec": {...}, "state_dict": {...}})``
and is read with ``torch.load(weights_only=True)``, which refuses any pickle that would construct an
object. The spec is plain JSON-like data::

    architecture  {"kind": "registry", "name": "resnet20", "args": {...}}   a registered architecture
                  {"kind": "factory", "path": "pkg.mod:fn", "args": {...}}  a user's factory (trusted by the caller)
                  {"kind": "module", "class": "MyNet"}                     a user's own instance (model= required)
    normalize     {"mean": [...], "std": [...]} or None: the net is wrapped in NormalizedModel
    modules       qualified name -> {"type": "Conv2d", <the widths Torch-Pruning changes>}
    tensors       state_dict key -> shape
    dataset       {"name", "num_classes", "classes", "input_shape", ...} or None
    info          free-form plain data (training settings, pruning method, keep vector, base MACs, ...)

**A file never decides what code runs.** Reading checks every field's type and range, that the declared
shapes equal the stored tensors and agree with the declared widths, and that weights are finite floats;
nothing the file names is imported or called. Loading builds only a registered architecture (on the meta
device, so absurd sizes allocate nothing), or the factory / instance the *caller* passes; the recorded
widths are applied, the shapes compared with the file's, and only then are weights materialised and
loaded strictly. Every problem is one :class:`AutopruneError` line naming the file, the field and the fix.
"""

from __future__ import annotations

import copy
import inspect
import math
import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import AutopruneError, first_line
from autoprune.io.files import check_path, save_torch

FORMAT = "autoprune-model"
VERSION = 2

MAX_CHANNELS = 2**24
MAX_DEPTH = 20  # nesting of dataset / info / args
MAX_NODES = 200_000  # values in dataset + info together
MAX_STRING = 100_000
MAX_ENTRIES = 200_000  # modules, tensors, state_dict entries
MAX_NDIM = 16

_DAMAGED = ("the file is damaged or was not written by autoprune; re-create it with `autoprune train`, "
            "`autoprune prune` or autoprune.save_model()")

# resizable module types and the width attributes Torch-Pruning changes on them
_WIDTHS: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv1d": (nn.Conv1d, ("in_channels", "out_channels", "groups")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "groups")),
    "Conv3d": (nn.Conv3d, ("in_channels", "out_channels", "groups")),
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features",)),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features",)),
    "BatchNorm3d": (nn.BatchNorm3d, ("num_features",)),
    "InstanceNorm1d": (nn.InstanceNorm1d, ("num_features",)),
    "InstanceNorm2d": (nn.InstanceNorm2d, ("num_features",)),
    "InstanceNorm3d": (nn.InstanceNorm3d, ("num_features",)),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels")),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape",)),
    "PReLU": (nn.PReLU, ("num_parameters",)),
    "Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim")),
}
_TYPE_NAMES = {cls: name for name, (cls, _) in _WIDTHS.items()}
_CONV_DIMS = {"Conv1d": 1, "Conv2d": 2, "Conv3d": 3}
_FLOAT_NAMES = {"weight", "bias", "running_mean", "running_var"}

# architecture arguments a file may record, with their checks (shared by registry and factory files)
_ARG_RULES = {
    "num_classes": "an integer in [1, 1000000]",
    "in_channels": "an integer in [1, 4096]",
    "image_size": "two integers in [1, 65536]",
    "width": "a number in (0, 64]",
}
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_FACTORY_PATH = re.compile(rf"{_IDENT}(\.{_IDENT})*:{_IDENT}")


@dataclass(frozen=True)
class ModelFile:
    """A model file that passed validation: its path, its (plain-data) spec and its tensors."""

    path: Path
    spec: dict[str, Any]
    state_dict: dict[str, torch.Tensor]

    @property
    def architecture(self) -> dict[str, Any]:
        """How the network is built: ``{"kind": "registry" | "factory" | "module", ...}``."""
        return self.spec["architecture"]

    @property
    def info(self) -> dict[str, Any]:
        """Free-form plain data saved with the model (training settings, pruning method, ...)."""
        return self.spec["info"]


# ---- describing a live module ------------------------------------------------------------------

def _type_name(module: nn.Module) -> str | None:
    for cls in type(module).__mro__:
        if cls in _TYPE_NAMES:
            return _TYPE_NAMES[cls]
    return None


def describe_module(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The ``modules`` and ``tensors`` parts of a spec for a live module.

    ``modules`` holds, for every resizable module that owns state-dict entries, its type and the width
    attributes that pruning changes; ``tensors`` the shape of every state-dict entry.
    """
    tensors = {k: list(v.shape) for k, v in model.state_dict().items()}
    owners = {k.rpartition(".")[0] for k in tensors}
    modules: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        kind = _type_name(m)
        if kind is None or name not in owners:
            continue
        entry: dict[str, Any] = {"type": kind}
        for attr in _WIDTHS[kind][1]:
            value = getattr(m, attr)
            entry[attr] = list(value) if isinstance(value, tuple | list) else int(value)
        modules[name] = entry
    return {"modules": modules, "tensors": tensors}


# ---- saving -----------------------------------------------------------------------------------------

def save_model(path: str | os.PathLike[str], model: nn.Module, *, architecture: Mapping[str, Any] | None = None,
               normalize: Mapping[str, Any] | None = None, dataset: Mapping[str, Any] | None = None,
               info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` (structure + weights, no code) atomically; returns the spec written.

    Without ``architecture`` the file records the user's class (loading then needs ``model=``). A
    :class:`NormalizedModel` contributes its mean and std; ``normalize`` given for a plain network wraps
    it, so the file loads as a network that takes unnormalised images. The file is validated exactly as
    :func:`read_model_file` will read it, so a model that could not be loaded (e.g. NaN weights) is
    refused here rather than written.
    """
    from autoprune.engine.distributed import PARALLEL_WRAPPERS
    from autoprune.models import NormalizedModel

    path = check_path(path)
    if path.is_dir():
        raise AutopruneError(f"{str(path)!r} is a directory; give a file name, e.g. {str(path / 'pruned.pt')!r}")
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"save_model() needs an nn.Module, got {type(model).__name__}")
    if isinstance(model, PARALLEL_WRAPPERS):  # the file holds the network, not the wrapper that spread it
        model = model.module
    if isinstance(model, NormalizedModel):
        own = {"mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist()}
        if normalize is not None and not _same_numbers(normalize, own):
            raise AutopruneError("save_model(): normalize= differs from the NormalizedModel's own mean/std; "
                                 "leave normalize= out for a NormalizedModel")
        normalize, inner = own, model.net
    else:
        inner = model
        if normalize is not None:
            normalize = _check_normalize(_Checker(Path(path), saving=True), _to_plain(normalize))
            model = NormalizedModel(model, normalize["mean"], normalize["std"])
    if architecture is None:
        architecture = {"kind": "module", "class": type(inner).__name__}
    spec = {"architecture": _to_plain(architecture), "normalize": _to_plain(normalize),
            **describe_module(model), "dataset": _to_plain(dataset), "info": _to_plain(info or {})}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "spec": spec, "state_dict": state}
    checked, _ = _validate_payload(payload, Path(path), saving=True)
    save_torch(path, payload)
    return checked


def _same_numbers(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    try:
        return all(torch.allclose(torch.tensor(list(a[k]), dtype=torch.float64),
                                  torch.tensor(list(b[k]), dtype=torch.float64), rtol=1e-6, atol=1e-7)
                   for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError, RuntimeError):
        return False


def _to_plain(value: Any) -> Any:
    """Tuples, arrays, tensors and paths as lists / numbers / strings (what a spec may hold)."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and not isinstance(value, str | bytes):
        return value.tolist()
    return value


# ---- reading and validating -------------------------------------------------------------------------

def read_model_file(path: str | os.PathLike[str]) -> ModelFile:
    """Read a model file safely and validate all of it; nothing is imported, called or built."""
    p = check_path(path)
    payload = _torch_load(p)
    spec, state = _validate_payload(payload, p, saving=False)
    return ModelFile(p, spec, state)


def _torch_load(p: Path) -> Any:
    if not p.exists():
        raise AutopruneError(f"model file {str(p)!r} does not exist; pass a file written by `autoprune train` "
                             "or `autoprune prune`")
    if p.is_dir():
        hint = " (did you mean model.pt inside it?)" if (p / "model.pt").exists() else ""
        raise AutopruneError(f"{str(p)!r} is a directory, not a model file{hint}")
    if not p.is_file():
        raise AutopruneError(f"{str(p)!r} is not a regular file (a device, pipe or socket); pass a model file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it better
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # the safe unpickler met bytes, not a foreign object
            raise AutopruneError(f"cannot read {str(p)!r} as a model file (not a PyTorch file: "
                                 f"{_unpickler_detail(exc)[:60]}); it is truncated, corrupt or of another format"
                                 ) from exc
        raise AutopruneError(f"refusing to load {str(p)!r}: it contains Python objects that could run code "
                             "when unpickled; only autoprune model files (tensors and plain data) are accepted"
                             ) from exc
    except OSError as exc:
        raise AutopruneError(f"cannot read {str(p)!r}: {(exc.strerror or str(exc)).lower()}; check the file's "
                             "permissions and the disk") from exc
    except Exception as exc:  # random bytes fail in many ways (RuntimeError, EOFError, KeyError, BadZipFile, ...)
        if _is_torchscript(p):
            raise AutopruneError(f"{str(p)!r} is a TorchScript file (torch.jit.save), which autoprune does not read: "
                                 "it holds code; save the model with autoprune.save(path, model) or result.save(path) "
                                 "(weights and widths, no code) and load it with autoprune.load(path, model=YourNet())"
                                 ) from exc
        raise AutopruneError(f"cannot read {str(p)!r} as a model file ({type(exc).__name__}); it is truncated, "
                             "corrupt or not a PyTorch file") from exc


def _is_torchscript(p: Path) -> bool:
    """Whether ``p`` is a TorchScript archive (a zip holding ``constants.pkl``, as ``torch.jit.save`` writes)."""
    try:
        with zipfile.ZipFile(p) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError):
        return False


def _unpickler_detail(exc: BaseException) -> str:
    """What torch's safe unpickler objected to (its message wraps that in paragraphs of advice)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = next((line.strip() for line in text.split(marker, 1)[1].splitlines() if line.strip()), "")
        if detail:
            return detail
    return first_line(exc)


def _show(value: Any) -> str:
    """A short, single-line description of an untrusted value (never a huge or recursive repr)."""
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if abs(value) < 10**18 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, list | tuple | dict):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def _finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite and fits a float."""
    if type(value) is int:
        return abs(value) <= 2**53
    return type(value) is float and math.isfinite(value)


def _key(k: Any) -> str:
    return f"[{_show(k)}]"


class _Checker:
    """Validation of one payload; every failure names the file and the field."""

    def __init__(self, path: Path, saving: bool):
        self.path, self.saving = path, saving
        self.nodes = 0

    def fail(self, field: str, problem: str, fix: str = _DAMAGED) -> AutopruneError:
        if self.saving:
            return AutopruneError(f"cannot save model to {str(self.path)!r}: {field} {problem}")
        return AutopruneError(f"model file {str(self.path)!r}: {field} {problem}; {fix}")

    # -- scalar checks --

    def int_in(self, value: Any, field: str, lo: int, hi: int) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise self.fail(field, f"must be an integer in [{lo}, {hi}], got {_show(value)}")
        return value

    def real(self, value: Any, field: str) -> float:
        if not _finite_number(value):
            raise self.fail(field, f"must be a finite number, got {_show(value)}")
        return float(value)

    def text(self, value: Any, field: str, *, pattern: re.Pattern[str] | None = None, limit: int = 200) -> str:
        if type(value) is not str or not 0 < len(value) <= limit or not value.isprintable():
            raise self.fail(field, f"must be a printable string of 1 to {limit} characters, got {_show(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(field, f"is not a valid name: {_show(value)}")
        return value

    def mapping(self, value: Any, field: str, *, required: tuple[str, ...] = (),
                allowed: tuple[str, ...] | None = None) -> dict[str, Any]:
        if type(value) not in (dict, OrderedDict):
            raise self.fail(field, f"must be a dict, got {_show(value)}")
        if len(value) > MAX_ENTRIES:
            raise self.fail(field, f"has {len(value)} entries, more than the {MAX_ENTRIES} allowed")
        bad = [k for k in value if type(k) is not str]
        if bad:
            raise self.fail(field, f"has a key that is not a string: {_show(bad[0])}")
        missing = [k for k in required if k not in value]
        if missing:
            raise self.fail(field, f"lacks {missing[0]!r}")
        if allowed is not None:
            extra = [k for k in value if k not in allowed]
            if extra:
                raise self.fail(field, f"has unknown entry {_show(extra[0])} (allowed: {', '.join(allowed)})")
        return dict(value)

    def shape(self, value: Any, field: str) -> list[int]:
        if type(value) not in (list, tuple) or len(value) > MAX_NDIM:
            raise self.fail(field, f"must be a list of at most {MAX_NDIM} non-negative integers, got {_show(value)}")
        return [self.int_in(v, f"{field}[{i}]", 0, 2**40) for i, v in enumerate(value)]

    def plain(self, value: Any, field: str, depth: int = 0) -> Any:
        """A copy of JSON-like data (dict with str keys, list, str, int, float, bool, None), bounded."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise self.fail(field, f"is too large (more than {MAX_NODES} values in dataset and info)")
        if depth > MAX_DEPTH:
            raise self.fail(field, f"is nested more than {MAX_DEPTH} levels deep")
        kind = type(value)
        if value is None or kind in (bool, int, float):
            return value
        if kind is str:
            if len(value) > MAX_STRING:
                raise self.fail(field, f"is a string of {len(value)} characters, more than {MAX_STRING}")
            return value
        if kind in (list, tuple):
            return [self.plain(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
        if kind in (dict, OrderedDict):
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    raise self.fail(field, f"has a key that is not a string: {_show(k)}")
                out[self.plain(k, field, depth + 1)] = self.plain(v, f"{field}{_key(k)}", depth + 1)
            return out
        raise self.fail(field, f"holds {_show(value)}; only plain data (dict, list, str, int, float, bool, None) "
                        "is allowed")


def _validate_payload(payload: Any, path: Path, *, saving: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Check a loaded payload completely; return the plain-data spec and the state dict."""
    c = _Checker(path, saving)
    p = str(path)
    if type(payload) not in (dict, OrderedDict) or payload.get("format") != FORMAT:
        raise AutopruneError(f"{p!r} is not an autoprune model file (a bare state_dict or another tool's "
                             "checkpoint?); create one with `autoprune train` or autoprune.save_model()")
    version = payload.get("version")
    if type(version) is not int or version != VERSION:
        raise AutopruneError(f"{p!r} has format version {_show(version)}; this autoprune reads version {VERSION} "
                             "(re-create the file with this version's `autoprune train` or `autoprune prune`)")
    if type(payload.get("spec")) not in (dict, OrderedDict) or type(payload.get("state_dict")) not in (dict,
                                                                                                     OrderedDict):
        raise AutopruneError(f"{p!r} is missing its spec or weights; the file is damaged")
    c.mapping(payload, "the file", allowed=("format", "version", "spec", "state_dict"))
    raw = c.mapping(payload["spec"], "spec", required=("architecture", "modules", "tensors"),
                    allowed=("architecture", "normalize", "modules", "tensors", "dataset", "info"))
    spec: dict[str, Any] = {"architecture": _check_architecture(c, raw["architecture"])}
    spec["normalize"] = _check_normalize(c, raw.get("normalize"))
    spec["modules"] = _check_modules(c, raw["modules"])
    spec["tensors"] = {k: c.shape(v, f"spec.tensors{_key(k)}") for k, v in c.mapping(raw["tensors"],
                                                                                        "spec.tensors").items()}
    spec["dataset"] = _check_dataset(c, raw.get("dataset"))
    info = {} if raw.get("info") is None else raw["info"]
    spec["info"] = c.plain(c.mapping(info, "spec.info"), "spec.info")
    state = _check_state_dict(c, payload["state_dict"], spec)
    return spec, state


def _check_architecture(c: _Checker, value: Any) -> dict[str, Any]:
    arch = c.mapping(value, "spec.architecture", required=("kind",))
    kind = arch["kind"]
    if kind == "registry":
        arch = c.mapping(value, "spec.architecture", required=("kind", "name"), allowed=("kind", "name", "args"))
        name = c.text(arch["name"], "spec.architecture.name", pattern=_NAME)
        from autoprune.models import MODELS  # autoprune's own registry; nothing the file names

        if name not in MODELS:
            raise c.fail("spec.architecture.name", f"is an unknown architecture {name!r}",
                         "a file may only name registered architectures: " + ", ".join(sorted(MODELS)))
        return {"kind": kind, "name": name, "args": _check_args(c, arch.get("args", {}))}
    if kind == "factory":
        arch = c.mapping(value, "spec.architecture", required=("kind", "path"), allowed=("kind", "path", "args"))
        path = c.text(arch["path"], "spec.architecture.path", pattern=_FACTORY_PATH)
        return {"kind": kind, "path": path, "args": _check_args(c, arch.get("args", {}))}
    if kind == "module":
        arch = c.mapping(value, "spec.architecture", required=("kind", "class"), allowed=("kind", "class"))
        return {"kind": kind, "class": c.text(arch["class"], "spec.architecture.class")}
    raise c.fail("spec.architecture.kind", f"is {_show(kind)}; it must be 'registry', 'factory' or 'module'")


def _check_args(c: _Checker, value: Any) -> dict[str, Any]:
    args = c.mapping(value, "spec.architecture.args", allowed=tuple(_ARG_RULES))
    out: dict[str, Any] = {}
    for key, v in args.items():
        field = f"spec.architecture.args.{key}"
        if key == "num_classes":
            out[key] = c.int_in(v, field, 1, 1_000_000)
        elif key == "in_channels":
            out[key] = c.int_in(v, field, 1, 4096)
        elif key == "image_size":
            if type(v) not in (list, tuple) or len(v) != 2:
                raise c.fail(field, f"must be {_ARG_RULES[key]}, got {_show(v)}")
            out[key] = [c.int_in(s, f"{field}[{i}]", 1, 65536) for i, s in enumerate(v)]
        else:  # width
            if not _finite_number(v) or not 0 < v <= 64:
                raise c.fail(field, f"must be {_ARG_RULES[key]}, got {_show(v)}")
            out[key] = v
    return out


def _check_normalize(c: _Checker, value: Any) -> dict[str, list[float]] | None:
    if value is None:
        return None
    norm = c.mapping(value, "spec.normalize", required=("mean", "std"), allowed=("mean", "std"))
    out = {}
    for key in ("mean", "std"):
        seq = norm[key]
        if type(seq) not in (list, tuple) or not 1 <= len(seq) <= 4096:
            raise c.fail(f"spec.normalize.{key}", f"must be a list of 1 to 4096 numbers, got {_show(seq)}")
        out[key] = [c.real(v, f"spec.normalize.{key}[{i}]") for i, v in enumerate(seq)]
    if len(out["mean"]) != len(out["std"]):
        raise c.fail("spec.normalize", f"has {len(out['mean'])} means but {len(out['std'])} stds")
    for i, s in enumerate(out["std"]):
        if s <= 0:
            raise c.fail(f"spec.normalize.std[{i}]", f"is {s!r}; a std must be > 0 (the model divides by it)")
    return out


def _check_modules(c: _Checker, value: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for name, entry in c.mapping(value, "spec.modules").items():
        field = f"spec.modules{_key(name)}"
        if len(name) > 1000 or not name.isprintable():
            raise c.fail(field, "is not a valid module name")
        raw = c.mapping(entry, field, required=("type",))
        kind = raw["type"]
        if type(kind) is not str or kind not in _WIDTHS:
            raise c.fail(f"{field}.type", f"is {_show(kind)}; resizable types are {', '.join(_WIDTHS)}")
        attrs = _WIDTHS[kind][1]
        raw = c.mapping(entry, field, required=("type", *attrs), allowed=("type", *attrs))
        widths: dict[str, Any] = {"type": kind}
        for attr in attrs:
            if attr == "normalized_shape":
                v = raw[attr]
                if type(v) not in (list, tuple) or not 1 <= len(v) <= 8:
                    raise c.fail(f"{field}.{attr}", f"must be a list of 1 to 8 integers, got {_show(v)}")
                widths[attr] = [c.int_in(s, f"{field}.{attr}[{i}]", 1, MAX_CHANNELS) for i, s in enumerate(v)]
            else:
                widths[attr] = c.int_in(raw[attr], f"{field}.{attr}", 1, MAX_CHANNELS)
        if kind in _CONV_DIMS:
            g = widths["groups"]
            if widths["in_channels"] % g or widths["out_channels"] % g:
                raise c.fail(f"{field}.groups", f"({g}) must divide in_channels ({widths['in_channels']}) and "
                             f"out_channels ({widths['out_channels']})")
        if kind == "GroupNorm" and widths["num_channels"] % widths["num_groups"]:
            raise c.fail(f"{field}.num_groups", f"({widths['num_groups']}) must divide num_channels "
                         f"({widths['num_channels']})")
        out[name] = widths
    return out


def _check_dataset(c: _Checker, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    data = c.plain(c.mapping(value, "spec.dataset"), "spec.dataset")
    if "name" in data:
        c.text(data["name"], "spec.dataset.name")
    if "num_classes" in data:
        c.int_in(data["num_classes"], "spec.dataset.num_classes", 1, 1_000_000)
    if "classes" in data:
        classes = data["classes"]
        if type(classes) is not list or any(type(k) is not str for k in classes):
            raise c.fail("spec.dataset.classes", f"must be a list of strings, got {_show(classes)}")
        if "num_classes" in data and len(classes) != data["num_classes"]:
            raise c.fail("spec.dataset.classes", f"has {len(classes)} names for {data['num_classes']} classes")
    if "input_shape" in data:
        shape = data["input_shape"]
        if type(shape) is not list or not 1 <= len(shape) <= 4:
            raise c.fail("spec.dataset.input_shape", f"must be a list of 1 to 4 integers, got {_show(shape)}")
        for i, s in enumerate(shape):
            c.int_in(s, f"spec.dataset.input_shape[{i}]", 1, 65536)
    return data


def _expected_shapes(kind: str, w: Mapping[str, Any], kernel: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of a resizable module's own tensors, from its widths (and a conv's kernel size)."""
    if kind in _CONV_DIMS:
        out = w["out_channels"]
        return {"weight": (out, w["in_channels"] // w["groups"], *kernel), "bias": (out,)}
    if kind == "Linear":
        return {"weight": (w["out_features"], w["in_features"]), "bias": (w["out_features"],)}
    if kind == "GroupNorm":
        return {"weight": (w["num_channels"],), "bias": (w["num_channels"],)}
    if kind == "LayerNorm":
        shape = tuple(w["normalized_shape"])
        return {"weight": shape, "bias": shape}
    if kind == "PReLU":
        return {"weight": (w["num_parameters"],)}
    if kind == "Embedding":
        return {"weight": (w["num_embeddings"], w["embedding_dim"])}
    n = (w["num_features"],)  # batch / instance norm
    return {"weight": n, "bias": n, "running_mean": n, "running_var": n, "num_batches_tracked": ()}


def _by_owner(tensors: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """State-dict entries grouped by owning module: ``{"net.fc": {"weight": shape, "bias": shape}}``."""
    owners: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        owner, _, attr = key.rpartition(".")
        owners.setdefault(owner, {})[attr] = value
    return owners


def _check_state_dict(c: _Checker, value: Any, spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    raw = c.mapping(value, "state_dict")
    state: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        field = f"state_dict{_key(k)}"
        if not k or len(k) > 1000 or not k.isprintable():
            raise c.fail(field, "is not a valid parameter name")
        if type(t) not in (torch.Tensor, nn.Parameter):
            raise c.fail(field, f"is {_show(t)}, not a tensor")
        if t.is_quantized or t.layout != torch.strided or t.device.type != "cpu":
            raise c.fail(field, f"is a {t.layout} {t.dtype} tensor on {t.device}; autoprune model files hold "
                         "dense float weights (quantised or sparse files are not supported)")
        state[k] = t.detach()
    tensors = spec["tensors"]
    for k in tensors:
        if k not in state:
            raise c.fail(f"spec.tensors{_key(k)}", "is declared but the state_dict has no such tensor")
    for k, t in state.items():
        if k not in tensors:
            raise c.fail(f"state_dict{_key(k)}", "is not declared in spec.tensors")
        if list(t.shape) != tensors[k]:
            raise c.fail(f"spec.tensors{_key(k)}", f"declares shape {tensors[k]} but the stored tensor is "
                         f"{list(t.shape)}")
    float_keys = {k for k in state if k.rpartition(".")[2] in _FLOAT_NAMES}
    owners = _by_owner(tensors)
    for name, widths in spec["modules"].items():
        own = owners.get(name, {})
        field = f"spec.modules{_key(name)}"
        if not own:
            raise c.fail(field, "names a module that has no tensors in the state_dict")
        kind = widths["type"]
        kernel: tuple[int, ...] = ()
        if kind in _CONV_DIMS:
            weight = own.get("weight")
            if weight is None or len(weight) != 2 + _CONV_DIMS[kind] or 0 in weight[2:]:
                raise c.fail(field, f"is a {kind} whose weight is missing or has shape {weight}")
            kernel = tuple(weight[2:])
        expected = _expected_shapes(kind, widths, kernel)
        for attr, shape in own.items():
            if attr in expected and tuple(shape) != expected[attr]:
                detail = ", ".join(f"{a}={widths[a]}" for a in _WIDTHS[kind][1])
                raise c.fail(field, f"is a {kind} with {detail}, which needs {attr} of shape "
                             f"{list(expected[attr])}, but the file's is {shape}")
        if "weight" in expected and kind in (*_CONV_DIMS, "Linear", "PReLU", "Embedding") and "weight" not in own:
            raise c.fail(field, f"is a {kind} without a weight tensor")
        prefix = f"{name}." if name else ""
        float_keys |= {prefix + a for a in own if a != "num_batches_tracked"}
    if spec["normalize"] is not None:
        float_keys |= {"normalize.mean", "normalize.std"}
    for k, t in state.items():
        if k in float_keys and not t.is_floating_point():
            raise c.fail(f"state_dict{_key(k)}", f"holds {str(t.dtype).removeprefix('torch.')} weights; autoprune "
                         "model files hold float weights (quantised files are not supported)",
                         "save the float model instead")
        if t.dtype in (torch.float16, torch.bfloat16):
            raise c.fail(f"state_dict{_key(k)}", f"holds {str(t.dtype).removeprefix('torch.')} (half precision) "
                         "weights; autoprune model files hold float32 or float64 weights",
                         "save the model after model.float()")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise c.fail(f"state_dict{_key(k)}", "contains NaN or infinite values",
                         "the model diverged or the file is damaged; retrain it or use an earlier file")
    if spec["normalize"] is not None:
        _check_normalize_tensors(c, state, spec["normalize"])
    return state


def _check_normalize_tensors(c: _Checker, state: Mapping[str, torch.Tensor], norm: Mapping[str, list[float]]) -> None:
    for key in ("mean", "std"):
        t = state.get(f"normalize.{key}")
        if t is None:
            raise c.fail("spec.normalize", f"is set but the state_dict has no 'normalize.{key}' "
                         "(a NormalizedModel's buffers)")
        if not t.is_floating_point() or t.numel() != len(norm[key]) or not torch.allclose(
                t.detach().flatten().double(), torch.tensor(norm[key], dtype=torch.float64), rtol=1e-5, atol=1e-6):
            raise c.fail(f"spec.normalize.{key}", "disagrees with the state_dict's 'normalize." + key + "'")
    stray = [k for k in state if not k.startswith(("net.", "normalize."))]
    if stray:
        raise c.fail(f"state_dict{_key(stray[0])}", "is outside 'net.' although spec.normalize is set "
                     "(a normalised model keeps its network under 'net.')")


# ---- applying recorded widths to a module ------------------------------------------------------------

def apply_widths(module: nn.Module, modules: Mapping[str, Mapping[str, Any]],
                 tensors: Mapping[str, Any] | None = None) -> None:
    """Resize ``module`` in place to the recorded widths (pruning only shrinks, so widths may only shrink).

    Each recorded module must exist with the recorded type; its width attributes are set and its own
    parameters / buffers replaced by empty tensors of the implied shapes (same Parameter-or-buffer kind,
    ``requires_grad``, dtype and device; on the meta device nothing is allocated). With ``tensors``
    (state-dict key -> shape), any other parameter or buffer whose recorded shape is smaller (e.g. a
    custom per-channel scale that Torch-Pruning pruned) is resized the same way. Shapes that cannot be
    reached by shrinking are left alone for the caller's shape comparison to report.
    """
    done: set[str] = set()
    for name, widths in modules.items():
        kind = widths["type"]
        cls, attrs = _WIDTHS[kind]
        try:
            target = module.get_submodule(name)
        except AttributeError:
            raise AutopruneError(f"architecture mismatch: the file records module {name!r} ({kind}) but the "
                                 "model has none; pass a fresh instance of the class that was saved") from None
        if not isinstance(target, cls):
            raise AutopruneError(f"architecture mismatch: module {name!r} is a {type(target).__name__} in the "
                                 f"model but a {kind} in the file; pass a fresh instance of the class that was saved")
        for attr in attrs:
            new, old = widths[attr], getattr(target, attr)
            if attr == "normalized_shape":
                new, old = tuple(new), tuple(old)
                grows = len(new) != len(old) or any(a > b for a, b in zip(new, old, strict=True))
            else:
                grows = new > old
            if grows:
                raise AutopruneError(f"architecture mismatch: the file records {attr}={_plain_width(new)} for module "
                                     f"{name!r} but the model has {_plain_width(old)}; pass a fresh, unpruned "
                                     "instance of the class that was saved")
            setattr(target, attr, new)
        kernel = tuple(target.kernel_size) if kind in _CONV_DIMS else ()
        for attr, shape in _expected_shapes(kind, widths, kernel).items():
            _resize(target, attr, shape)
            done.add(f"{name}.{attr}" if name else attr)
    for key, shape in (tensors or {}).items():
        if key in done:
            continue
        owner_name, _, attr = key.rpartition(".")
        try:
            owner = module.get_submodule(owner_name)
        except AttributeError:
            continue
        current = _tensor_of(owner, attr)
        if current is None or tuple(current.shape) == tuple(shape):
            continue
        if len(shape) == current.dim() and all(a <= b for a, b in zip(shape, current.shape, strict=True)):
            _resize(owner, attr, tuple(shape))


def _plain_width(value: Any) -> str:
    return str(list(value)) if isinstance(value, tuple | list) else str(value)


def _tensor_of(owner: nn.Module, attr: str) -> torch.Tensor | None:
    if owner._parameters.get(attr) is not None:
        return owner._parameters[attr]
    return owner._buffers.get(attr)


def _resize(owner: nn.Module, attr: str, shape: tuple[int, ...]) -> None:
    old = _tensor_of(owner, attr)
    if old is None or tuple(old.shape) == tuple(shape):
        return
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = new  # dict assignment keeps the buffer's persistence


# ---- loading -----------------------------------------------------------------------------------------

def load(path: str | os.PathLike[str], *, model: nn.Module | None = None,
         factory: str | Callable[..., nn.Module] | None = None,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model file as a plain ``nn.Module`` in eval mode.

    Registered architectures load by themselves. A file built by a user's factory needs ``factory=``
    (the same ``"module:function"`` string, or the callable), one saved from a user's own class needs
    ``model=`` (a fresh, unpruned instance; it is copied, not modified). A registry model takes float
    images in [0, 1] of shape (N, C, H, W); normalisation is inside it.
    """
    return load_with_spec(path, model=model, factory=factory, map_location=map_location)[0]


def load_with_spec(path: str | os.PathLike[str], *, model: nn.Module | None = None,
                   factory: str | Callable[..., nn.Module] | None = None,
                   map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelFile]:
    """Like :func:`load`, and also return the validated :class:`ModelFile` (spec, info, dataset)."""
    from autoprune.engine.prune import parse_device

    if isinstance(model, nn.Module) and any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise AutopruneError("model= is on the meta device; pass a fresh instance on the CPU (it receives the "
                             "file's weights)")
    map_location = parse_device(map_location)
    mf = read_model_file(path)
    arch, where = mf.architecture, str(mf.path)
    if model is not None and factory is not None:
        raise AutopruneError("pass either model= (an instance) or factory= (a trusted factory), not both")
    if model is not None:
        net = _from_instance(mf, model)
    elif arch["kind"] == "registry":
        if factory is not None:
            raise AutopruneError(f"file {where!r} holds the registered architecture {arch['name']!r}; it needs no "
                                 "factory= (leave it out)")
        from autoprune.models import MODELS

        net = _build(mf, MODELS[arch["name"]], f"architecture {arch['name']!r}", registry=True)
    elif arch["kind"] == "factory":
        net = _build(mf, _trusted_factory(mf, factory), f"model factory {arch['path']!r}", registry=False)
    else:
        cls = arch["class"]
        raise AutopruneError(f"file {where!r} was saved from your own class {cls!r}; pass model={cls}() (a fresh, "
                             f"unpruned instance) to autoprune.load(path, model=...)")
    return net.eval().to(map_location), mf


def _trusted_factory(mf: ModelFile, factory: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module]:
    recorded, where = mf.architecture["path"], str(mf.path)
    if factory is None:
        raise AutopruneError(f"file {where!r} was built by the user factory {recorded!r}; autoprune does not "
                             f"import code named by a file — pass --model {recorded} (CLI) or factory=/model= "
                             "(Python) to trust it")
    if isinstance(factory, str):
        if factory != recorded:
            raise AutopruneError(f"file {where!r} was made by factory {recorded!r} but the caller trusted "
                                 f"{_show(factory)}; pass --model {recorded} if you trust it")
        from autoprune.models import resolve_factory

        return resolve_factory(factory)
    if not callable(factory):
        raise AutopruneError(f"factory= must be a 'module:function' string or a callable, got {_show(factory)}")
    return factory


def _factory_args(fn: Callable[..., nn.Module], args: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded (already range-checked) arguments that ``fn``'s signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {k: v for k, v in args.items() if takes_any or k in params}
    if "image_size" in out:
        out["image_size"] = tuple(out["image_size"])
    return out


class _NotOnMeta(Exception):
    """A user factory that cannot run on the meta device (it is then built on the CPU)."""


def _call_factory(fn: Callable[..., nn.Module], args: Mapping[str, Any], label: str, device: str, *,
                  cpu_fallback: bool = False) -> nn.Module:
    try:
        with torch.device(device):
            net = fn(**args)
    except SystemExit as exc:
        raise AutopruneError(f"{label} called sys.exit({_show(exc.code)}) while building the model; fix it or pass "
                             "model= (an instance)") from None
    except AutopruneError:
        raise
    except Exception as exc:
        if cpu_fallback:
            raise _NotOnMeta from exc
        raise AutopruneError(f"{label} failed with {type(exc).__name__}: {first_line(exc)[:200]}; fix it or pass "
                             "model= (an instance)") from exc
    if not isinstance(net, nn.Module):
        raise AutopruneError(f"{label} returned {_show(net)}, not an nn.Module; a factory must return the network")
    return net


def _build(mf: ModelFile, fn: Callable[..., nn.Module], label: str, *, registry: bool) -> nn.Module:
    """Build on the meta device, resize, compare shapes; only then allocate and load the weights.

    A registered architecture is always built on the meta device, so recorded arguments cannot make it
    allocate anything. A user's factory that fails there (e.g. it loads pretrained weights) is built on
    the CPU with the same range-checked arguments; so is one with non-persistent buffers, which
    ``to_empty`` would leave uninitialised.
    """
    from autoprune.models import NormalizedModel

    args = _factory_args(fn, mf.architecture["args"])
    norm = mf.spec["normalize"]

    def resized(net: nn.Module, device: str) -> nn.Module:
        if norm is not None:
            with torch.device(device):
                net = NormalizedModel(net, norm["mean"], norm["std"])
        apply_widths(net, mf.spec["modules"], mf.spec["tensors"])
        _compare_shapes(net, mf, f"{label} builds a different network than the one saved (another version of it?)")
        return net

    net: nn.Module | None
    try:
        net = resized(_call_factory(fn, args, label, "meta", cpu_fallback=not registry), "meta")
    except _NotOnMeta:
        net = None
    if net is not None and not any(m._non_persistent_buffers_set for m in net.modules()):
        net = net.to_empty(device="cpu")
    else:  # the shapes equal the file's, so this allocates no more than the file holds
        net = resized(_call_factory(fn, args, label, "cpu"), "cpu")
    _load_weights(net, mf)
    return net


def _from_instance(mf: ModelFile, model: nn.Module) -> nn.Module:
    from autoprune.models import NormalizedModel

    if isinstance(model, type):
        raise AutopruneError(f"model= must be an instance, e.g. model={model.__name__}(), not the class itself")
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model= must be an nn.Module instance, got {_show(model)}")
    try:
        net = copy.deepcopy(model)
    except Exception as exc:
        raise AutopruneError(f"cannot copy the model passed as model= ({type(exc).__name__}: "
                             f"{first_line(exc)[:120]}); pass a fresh instance that copy.deepcopy can copy") from exc
    norm = mf.spec["normalize"]
    if norm is not None and not isinstance(net, NormalizedModel):
        inner = {k[4:] for k in mf.spec["tensors"] if k.startswith("net.")}
        if set(net.state_dict()) == inner:
            net = NormalizedModel(net, norm["mean"], norm["std"])
    apply_widths(net, mf.spec["modules"], mf.spec["tensors"])
    _compare_shapes(net, mf, "pass a fresh, unpruned instance of the class that was saved")
    _load_weights(net, mf)
    return net


def _compare_shapes(net: nn.Module, mf: ModelFile, fix: str) -> None:
    have = {k: list(v.shape) for k, v in net.state_dict().items()}
    want = mf.spec["tensors"]
    problem = None
    for k, shape in want.items():
        if k not in have:
            problem = f"the file has tensor {_show(k)} that the model lacks"
        elif have[k] != shape:
            problem = f"tensor {_show(k)} is {have[k]} in the model but {shape} in the file"
        if problem:
            break
    else:
        extra = [k for k in have if k not in want]
        if extra:
            problem = f"the model has tensor {_show(extra[0])} that the file lacks"
    if problem:
        raise AutopruneError(f"architecture mismatch in {str(mf.path)!r}: {problem}; {fix}")


def _load_weights(net: nn.Module, mf: ModelFile) -> None:
    try:
        net.load_state_dict(mf.state_dict, strict=True)
    except RuntimeError as exc:  # shapes and keys were compared already; this is a dtype or device problem
        raise AutopruneError(f"cannot load the weights of {str(mf.path)!r} into the model "
                             f"({first_line(exc)[:160]}); pass a fresh instance of the class that was saved"
                             ) from exc
