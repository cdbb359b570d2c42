"""Search strategies over keep vectors (numpy only, no torch).

A :class:`Problem` states the box of keep ratios, the cost model and the target; a :class:`Strategy`
(by registry name: :func:`create_strategy`) asks for candidates and is told their :class:`Fitness`;
:func:`run_search` is the reference loop and :func:`replay` resumes a search from its history.
Importing this package registers every strategy.
"""

from __future__ import annotations

from autoprune.search.base import (
    STRATEGIES,
    SearchResult,
    Strategy,
    create_strategy,
    register_strategy,
    replay,
    run_search,
    strategy_names,
)
from autoprune.search.greedy import Greedy
from autoprune.search.problem import TOLERANCE, Fitness, Problem
from autoprune.search.pso import ParticleSwarm
from autoprune.search.random_search import RandomSearch
from autoprune.search.sa import SimulatedAnnealing
from autoprune.search.ssa import SparrowSearch
from autoprune.search.threshold import Threshold
from autoprune.search.uniform import Uniform

__all__ = [
    "STRATEGIES",
    "TOLERANCE",
    "Fitness",
    "Greedy",
    "ParticleSwarm",
    "Problem",
    "RandomSearch",
    "SearchResult",
    "SimulatedAnnealing",
    "SparrowSearch",
    "Strategy",
    "Threshold",
    "Uniform",
    "create_strategy",
    "register_strategy",
    "replay",
    "run_search",
    "strategy_names",
]
