"""Named pruning methods: the five papers and the classic baselines, as interchangeable recipes.

Build one by name (``create_method("pso", {"particles": 20})``) or directly (``PSO(particles=20)``).
"""

from __future__ import annotations

from .base import (
    METHODS,
    Method,
    MethodContext,
    Plan,
    create_method,
    criterion_scores,
    method_names,
    register_method,
)
from .baselines import L1, Global, Random, Slim
from .contrast import SA
from .papers import GDP, OTP, PSO, SSA

__all__ = ["GDP", "L1", "METHODS", "OTP", "PSO", "SA", "SSA", "Global", "Method", "MethodContext", "Plan", "Random",
           "Slim", "create_method", "criterion_scores", "method_names", "register_method"]
