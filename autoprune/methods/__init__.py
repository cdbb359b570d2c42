"""Named pruning methods: the five papers and the classic baselines, as interchangeable recipes."""

from __future__ import annotations

from . import baselines, contrast, papers  # noqa: F401  (registers the methods)
from .base import METHODS, Method, MethodContext, Plan, create_method, method_names, register_method

__all__ = ["METHODS", "Method", "MethodContext", "Plan", "create_method", "method_names", "register_method"]
