"""autoprune: automatic structured pruning of trained convolutional networks.

The Python API in brief::

    import autoprune
    model = autoprune.load("runs/l1/model.pt")      # a plain nn.Module; inputs are floats in [0, 1]

The building blocks live in submodules: :mod:`autoprune.space` (prunable groups, costs, surgery),
:mod:`autoprune.criteria`, :mod:`autoprune.search`, :mod:`autoprune.methods`,
:mod:`autoprune.pipeline` (the train and prune jobs) and :mod:`autoprune.data`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from autoprune.artifact import load, load_with_spec, save_model  # noqa: E402
from autoprune.errors import AutopruneError  # noqa: E402

__all__ = ["AutopruneError", "__version__", "load", "load_with_spec", "save_model"]
