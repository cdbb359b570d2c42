"""autoprune: automatic structured pruning of trained convolutional networks.

The Python API in brief::

    import autoprune
    model = autoprune.load("runs/l1/model.pt")      # a plain nn.Module; inputs are floats in [0, 1]

The building blocks live in submodules: :mod:`autoprune.engine.space` (prunable groups, costs, surgery),
:mod:`autoprune.criteria`, :mod:`autoprune.search` (numpy only), :mod:`autoprune.methods`,
:mod:`autoprune.runs.pipeline` (the train and prune jobs) and :mod:`autoprune.data`.
"""

from __future__ import annotations

from typing import Any

from autoprune.errors import AutopruneError

__version__ = "0.1.0"

_LAZY = {"load": "autoprune.io.artifact", "load_with_spec": "autoprune.io.artifact",
         "save_model": "autoprune.io.artifact",
         "prune_model": "autoprune.runs.pipeline", "PruneConfig": "autoprune.runs.pipeline",
         "PruningSpace": "autoprune.engine.space", "TrainConfig": "autoprune.engine.train"}

__all__ = ["AutopruneError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import torch-dependent parts on first use, so ``autoprune.search`` stays numpy-only."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
