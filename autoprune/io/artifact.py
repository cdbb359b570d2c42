"""Saved models: an architecture spec plus a state dict, loaded without running pickled code.

A model file is ``torch.save({"format": ..., "version": 1, "spec": {...}, "state_dict": {...}})``.
The spec is plain JSON-compatible data: the model's registry name (or ``package.module:factory``), the
arguments it was built with, the input normalisation, and the shape of every convolution, linear and
normalisation layer (``layers``: name -> channel counts). Loading uses ``torch.load(weights_only=True)``,
which refuses any pickle that would construct arbitrary objects, then rebuilds the architecture from
the registry, resizes each recorded layer, and loads the weights strictly.

The atomic write helpers (``atomic_path``, ``write_text``, ``write_json``, ``write_with``) now live in
:mod:`autoprune.io.files` and are re-exported here so that existing imports keep working.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune.errors import AutopruneError
from autoprune.io.files import atomic_path, write_json, write_text, write_with  # noqa: F401  (re-exported)
from autoprune.models import NormalizedModel, create_model

FORMAT = "autoprune-model"
VERSION = 1

_RESIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---- atomic writes: moved to autoprune.io.files, re-exported here for existing imports -------------

# ---- spec ------------------------------------------------------------------------------------

def layer_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every resizable layer, by qualified name."""
    shapes: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            shapes[name] = {"in": m.in_features, "out": m.out_features}
        elif isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            shapes[name] = {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
            shapes[name] = {"out": m.num_features}
    return shapes


def make_spec(model: NormalizedModel, *, name: str, args: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON-compatible description from which :func:`build_from_spec` rebuilds ``model``."""
    return {
        "model": name,
        "args": {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()},
        "normalize": {"mean": model.normalize.mean.flatten().tolist(), "std": model.normalize.std.flatten().tolist()},
        "layers": layer_shapes(model),
        **extra,
    }


def build_from_spec(spec: dict[str, Any]) -> NormalizedModel:
    """Rebuild the (possibly pruned) architecture a spec describes, with fresh weights."""
    try:
        args = dict(spec["args"])
        if "image_size" in args:
            args["image_size"] = tuple(args["image_size"])
        net = create_model(spec["model"], **args)
        model = NormalizedModel(net, spec["normalize"]["mean"], spec["normalize"]["std"])
        layers = spec["layers"]
    except (KeyError, TypeError) as exc:
        raise AutopruneError(f"model spec is incomplete ({exc}); the file was not written by autoprune") from exc
    modules = dict(model.named_modules())
    for name, shape in layers.items():
        old = modules.get(name)
        if old is None:
            raise AutopruneError(f"architecture mismatch: the file has layer {name!r}, model {spec['model']!r} "
                                 "does not; was it saved from a different model or version?")
        _set_module(model, name, _resized(old, shape))
    return model


def _resized(m: nn.Module, shape: dict[str, int]) -> nn.Module:
    if not isinstance(m, _RESIZABLE):
        raise AutopruneError(f"architecture mismatch: layer of type {type(m).__name__} cannot be resized")
    if isinstance(m, nn.Linear):
        if (m.in_features, m.out_features) == (shape["in"], shape["out"]):
            return m
        return nn.Linear(shape["in"], shape["out"], bias=m.bias is not None)
    if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if (m.in_channels, m.out_channels, m.groups) == (shape["in"], shape["out"], shape["groups"]):
            return m
        return type(m)(shape["in"], shape["out"], m.kernel_size, stride=m.stride, padding=m.padding,
                       dilation=m.dilation, groups=shape["groups"], bias=m.bias is not None,
                       padding_mode=m.padding_mode)
    if m.num_features == shape["out"]:
        return m
    return type(m)(shape["out"], eps=m.eps, momentum=m.momentum, affine=m.affine,
                   track_running_stats=m.track_running_stats)


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


# ---- save / load ---------------------------------------------------------------------------

def save_model(path: str | os.PathLike[str], model: NormalizedModel, spec: dict[str, Any]) -> None:
    """Save ``model`` with its spec atomically. The spec's layer shapes are refreshed from the model."""
    spec = {**spec, "layers": layer_shapes(model)}
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "spec": spec, "state_dict": state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a model file safely (``weights_only=True``) and check that it is an autoprune model."""
    p = Path(path)
    if not p.exists():
        raise AutopruneError(f"model file {str(p)!r} does not exist; pass a file written by `autoprune train` "
                             "or `autoprune prune`")
    if p.is_dir():
        hint = " (did you mean model.pt inside it?)" if (p / "model.pt").exists() else ""
        raise AutopruneError(f"{str(p)!r} is a directory, not a model file{hint}")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # the safe unpickler met bytes, not a foreign object
            raise AutopruneError(f"cannot read {str(p)!r} as a model file (not a PyTorch file: {str(exc)[:60]}); "
                                 "it is truncated, corrupt or of another format") from exc
        raise AutopruneError(f"refusing to load {str(p)!r}: it contains Python objects that could run code "
                             "when unpickled; only autoprune model files (tensors and plain data) are accepted"
                             ) from exc
    except Exception as exc:  # random bytes fail in many ways (RuntimeError, EOFError, KeyError, BadZipFile, ...)
        raise AutopruneError(f"cannot read {str(p)!r} as a model file ({type(exc).__name__}); it is truncated, "
                             "corrupt or not a PyTorch file") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AutopruneError(f"{str(p)!r} is not an autoprune model file (a bare state_dict or another tool's "
                             "checkpoint?); create one with `autoprune train` or autoprune.save_model()")
    if payload.get("version") != VERSION:
        raise AutopruneError(f"{str(p)!r} has format version {payload.get('version')!r}; this autoprune reads "
                             f"version {VERSION}")
    if not isinstance(payload.get("spec"), dict) or not isinstance(payload.get("state_dict"), dict):
        raise AutopruneError(f"{str(p)!r} is missing its spec or weights; the file is damaged")
    return payload


def load(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> NormalizedModel:
    """Load a saved model as a plain ``nn.Module`` in eval mode.

    The model takes float images in [0, 1] of shape (N, C, H, W); normalisation is inside it.
    """
    model, _ = load_with_spec(path)
    return model.to(map_location)


def load_with_spec(path: str | os.PathLike[str]) -> tuple[NormalizedModel, dict[str, Any]]:
    """Load a saved model and return it with its spec."""
    payload = read_checkpoint(path)
    spec = payload["spec"]
    model = build_from_spec(spec)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "shapes differ"
        raise AutopruneError(f"architecture mismatch in {str(path)!r}: the weights do not fit model "
                             f"{spec.get('model')!r} ({first})") from exc
    return model.eval(), spec
