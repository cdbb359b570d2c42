"""Model registry: architectures by name, and a user's own model by ``package.module:factory``.

Every factory takes ``num_classes``, ``in_channels`` and ``image_size`` keyword arguments (timm-style:
``create_model`` accepts a registered name or an import path, and errors list the valid names).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from autoprune.errors import AutopruneError, unknown_name

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name`` (decorator)."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = factory
        return factory

    return decorate


def model_names() -> list[str]:
    """Names of the registered architectures."""
    return sorted(MODELS)


def resolve_factory(name: str) -> ModelFactory:
    """Find the factory for a registered name or a ``package.module:factory`` import path."""
    if name in MODELS:
        return MODELS[name]
    if ":" not in name:
        raise unknown_name("model", name, model_names() + ["package.module:factory"])
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of user code is a user error
        raise AutopruneError(
            f"cannot import module {module_name!r} for --model {name!r} ({type(exc).__name__}: {exc}); "
            "check the path and that the module is on PYTHONPATH"
        ) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise AutopruneError(
            f"module {module_name!r} has no callable {attr!r}; --model takes package.module:factory "
            "where factory(num_classes=..., in_channels=...) returns an nn.Module"
        )
    return factory


def create_model(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                 **kwargs: object) -> nn.Module:
    """Build an (unnormalised) network by registered name or import path.

    Arguments the factory does not accept are not passed, so a user's factory may take only
    ``num_classes``, say.
    """
    factory = resolve_factory(name)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": tuple(image_size), **kwargs}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = offered if takes_any else {k: v for k, v in offered.items() if k in params}
    try:
        model = factory(**accepted)
    except Exception as exc:
        raise AutopruneError(f"model factory {name!r} failed with {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise AutopruneError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model
