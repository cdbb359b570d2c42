"""One registry class for every named family: models, datasets, criteria, strategies, methods.

A :class:`Registry` maps names to factories (classes or functions), timm-style: entries register with a
decorator, :meth:`Registry.create` builds one from a name (or passes an already built object through),
and every option is checked once, against the factory's own signature: options are keyword arguments
of the constructor, so Python callers and the CLI (``--method-option particles=20``, a YAML file) share
one list of options, one set of defaults and one validation. :func:`coerce_options` turns the CLI's and
YAML's values into the types the signature declares.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from autoprune.errors import AutopruneError, short, unknown_name

T = TypeVar("T")

_MISSING = inspect.Parameter.empty


class Registry(Generic[T]):
    """Named factories of one kind.

    Args:
        kind: what the entries are, for messages ("method", "model", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: Any = None) -> Any:
        """Decorator registering a factory under ``name``: ``@registry.register("pso")``, or bare
        ``@registry.register`` to use the factory's own ``name`` attribute.

        A class with a ``name`` class attribute gets it set to the registered name.
        """
        if name is not None and not isinstance(name, str):  # used bare: name is the factory itself
            factory = name
            self.add(getattr(factory, "name", "") or "", factory)
            return factory

        def decorate(factory: T) -> T:
            key = name or getattr(factory, "name", "")
            if not isinstance(key, str) or not key:
                raise ValueError(f"a {self.kind} needs a non-empty name to be registered")
            self.add(key, factory)
            if name and isinstance(factory, type) and hasattr(factory, "name"):
                factory.name = name  # type: ignore[attr-defined]
            return factory

        return decorate

    def add(self, name: str, factory: T) -> None:
        """Register ``factory`` under ``name`` (each name once)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} needs a non-empty name to be registered")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = factory

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> T:
        """The factory registered under ``name``; unknown names list the valid ones."""
        if not isinstance(name, str) or name not in self._entries:
            raise unknown_name(self.kind, name, self.names())
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, factory)`` pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]

    def options(self, name: str) -> dict[str, Any]:
        """The keyword options the factory of ``name`` takes, with their defaults."""
        return option_defaults(self.get(name))

    def create(self, spec: Any, /, *args: Any, **options: Any) -> Any:
        """Build an entry from a registered name or class; an already built object passes through.

        Raises:
            AutopruneError: an unknown name, an option the factory does not take, or options given
                for an object that is already built.
        """
        if isinstance(spec, str):
            factory, label = self.get(spec), spec
        elif isinstance(spec, type) or inspect.isfunction(spec):
            factory, label = spec, getattr(spec, "name", None) or spec.__name__
        else:
            if options:
                raise AutopruneError(f"options {sorted(options)} cannot be applied to an already built "
                                     f"{self.kind} {spec!r}; pass the {self.kind}'s name instead")
            return spec
        check_options(factory, options, f"{self.kind} {label!r}", positional=len(args))
        return factory(*args, **options)


def _signature_target(factory: Any) -> Any:
    return factory.__init__ if isinstance(factory, type) else factory


def _parameters(factory: Any) -> list[inspect.Parameter]:
    if isinstance(factory, type) and factory.__init__ is object.__init__:
        return []  # no constructor of its own: no options (object's signature would accept any)
    try:
        params = list(inspect.signature(_signature_target(factory)).parameters.values())
    except (TypeError, ValueError):
        return []
    if isinstance(factory, type) and params and params[0].name == "self":
        params = params[1:]
    return params


def option_defaults(factory: Any) -> dict[str, Any]:
    """Keyword options of ``factory`` (keyword-only, or keyword-capable after the first) and their defaults.

    ``seed`` is not an option: runs pass it themselves.
    """
    out = {}
    for p in _parameters(factory):
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "seed":
            out[p.name] = None if p.default is _MISSING else p.default
    return out


def check_options(factory: Any, options: Mapping[str, Any], label: str, *, positional: int = 0) -> None:
    """Raise unless ``factory`` accepts every key of ``options`` (after ``positional`` positional arguments)."""
    params = _parameters(factory)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    positional_names = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD][:positional]
    valid = [n for n in names if n not in positional_names]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        shown = ", ".join(sorted(n for n in valid if n != "seed")) or "none"
        raise AutopruneError(f"unknown option {', '.join(map(repr, unknown))} for {label}; valid options: {shown}")


def option_types(factory: Any) -> dict[str, Any]:
    """The annotated type of each keyword option (``Any`` where none is declared)."""
    target = _signature_target(factory)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolved forward references: fall back to no type information
        hints = {}
    return {name: hints.get(name, Any) for name in option_defaults(factory)}


def coerce_options(factory: Any, raw: Mapping[str, Any], label: str) -> dict[str, Any]:
    """Options from text (CLI ``key=value``) or YAML, converted to the types the factory declares.

    Raises:
        AutopruneError: an unknown option, or a value that does not convert (naming both).
    """
    check_options(factory, raw, label)
    types_ = option_types(factory)
    return {key: _coerce(value, types_.get(key, Any), f"option {key}={short(value)} for {label}")
            for key, value in raw.items()}


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(kind)
        if type(None) in members and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, where)
            except AutopruneError as exc:
                errors.append(str(exc))
        raise AutopruneError(errors[0] if errors else f"{where} has no valid type")
    if origin is typing.Literal:
        allowed = typing.get_args(kind)
        if value in allowed:
            return value
        raise AutopruneError(f"{where} must be one of {', '.join(map(repr, allowed))}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise AutopruneError(f"{where} must be true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise AutopruneError(f"{where} must be an integer")
    if kind is float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if number is None or not math.isfinite(number):
            raise AutopruneError(f"{where} must be a finite number")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise AutopruneError(f"{where} must be text")
    return value
