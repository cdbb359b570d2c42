"""Architectures by name (LeNet-5, CIFAR VGG, CIFAR ResNet) and a user's own by import path."""

from __future__ import annotations

from . import lenet, resnet, vgg  # noqa: F401  (registers the architectures)
from .registry import MODELS, create_model, model_names, register_model, resolve_factory
from .wrapper import Normalize, NormalizedModel

__all__ = ["MODELS", "Normalize", "NormalizedModel", "create_model", "model_names", "register_model",
           "resolve_factory"]
