"""Model registry: architectures by name, and a user's own model by ``package.module:factory``.

Every registered factory takes ``num_classes``, ``in_channels`` and ``image_size`` keyword arguments
(timm-style: ``create_model`` accepts a registered name or, when the caller names one, an import path).
A model file never names code to import: only the caller's ``--model package.module:factory`` does.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from autoprune.errors import AutopruneError, unknown_name
from autoprune.registry import Registry

ModelFactory = Callable[..., nn.Module]

#: Every registered architecture by name.
MODELS: Registry[ModelFactory] = Registry("model")


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name`` (decorator)."""
    return MODELS.register(name)


def model_names() -> list[str]:
    """Names of the registered architectures."""
    return MODELS.names()


def resolve_factory(name: str) -> ModelFactory:
    """The factory for a registered name, or for a ``package.module:factory`` import path the caller named."""
    if name in MODELS:
        return MODELS.get(name)
    if ":" not in name:
        raise unknown_name("model", name, model_names() + ["package.module:factory"])
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except BaseException as exc:  # any failure of user code at import (SystemExit included) is a user error
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise AutopruneError(f"cannot import module {module_name!r} for --model {name!r} ({type(exc).__name__}: "
                             f"{exc}); check the path and that the module is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AutopruneError(f"module {module_name!r} has no callable {attr!r}; --model takes package.module:factory "
                             "where factory(num_classes=..., in_channels=...) returns an nn.Module")
    return factory


def accepted_arguments(factory: ModelFactory, offered: dict[str, object]) -> dict[str, object]:
    """The subset of ``offered`` that ``factory``'s signature takes (all of it for ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    return {k: v for k, v in offered.items() if k in params}


def call_factory(factory: ModelFactory, name: str, arguments: dict[str, object]) -> nn.Module:
    """Call a model factory; whatever it raises (even ``sys.exit``) becomes one line naming it."""
    try:
        model = factory(**arguments)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise AutopruneError(f"model factory {name!r} failed with {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                 **kwargs: object) -> nn.Module:
    """Build an (unnormalised) network by registered name or import path.

    Arguments the factory does not accept are not passed, so a user's factory may take only
    ``num_classes``, say.
    """
    factory = resolve_factory(name)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": tuple(image_size), **kwargs}
    return call_factory(factory, name, accepted_arguments(factory, offered))
