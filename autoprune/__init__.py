"""autoprune: automatic structured pruning of trained convolutional networks."""

from __future__ import annotations

__version__ = "0.1.0"
