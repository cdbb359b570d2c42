"""autoprune: automatic structured pruning of trained convolutional networks.

The Python API in brief::

    import autoprune
    result = autoprune.prune(model, example_inputs, method="pso", macs_reduction=0.5,
                             train_loader=train_dl, val_loader=val_dl)
    result.model                                   # the pruned nn.Module (``model`` is left untouched)
    result.save("pruned.pt")
    model = autoprune.load("pruned.pt", model=MyNet())   # your class: the recorded widths are applied to it
    autoprune.export_onnx(result.model, example_inputs, "pruned.onnx")

The building blocks live in submodules: :mod:`autoprune.engine` (space, evaluation, training, the run),
:mod:`autoprune.search` (numpy-only strategies), :mod:`autoprune.criteria`, :mod:`autoprune.methods`,
:mod:`autoprune.runs` (run directories, comparisons), :mod:`autoprune.report`, :mod:`autoprune.data`.
"""

from __future__ import annotations

from typing import Any

from autoprune.errors import AutopruneError, ConfigError

__version__ = "0.2.0"

_LAZY = {
    "prune": "autoprune.api", "PruneResult": "autoprune.engine.result", "Callback": "autoprune.engine.callbacks",
    "TrainConfig": "autoprune.engine.train", "Target": "autoprune.engine.config",
    "PruneConfig": "autoprune.engine.config", "load": "autoprune.io.modelfile",
    "load_with_spec": "autoprune.io.modelfile", "save": "autoprune.io.modelfile",
    "export_onnx": "autoprune.export", "PruningSpace": "autoprune.engine.space",
    "method_names": "autoprune.methods", "methods": "autoprune.methods",
}
_RENAMED = {"save": "save_model"}

__all__ = ["AutopruneError", "ConfigError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import torch-dependent parts on first use, so ``autoprune.search`` stays numpy-only."""
    if name in _LAZY:
        import importlib

        module = importlib.import_module(_LAZY[name])
        if name == "methods":
            return module
        return getattr(module, _RENAMED.get(name, name))
    raise AttributeError(f"module 'autoprune' has no attribute {name!r}")
