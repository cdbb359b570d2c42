"""Datasets and loaders: MNIST / Fashion-MNIST, CIFAR-10, image folders, the embedded sample, synthetic data.

Everything is held in memory as uint8 tensors. :func:`load_dataset` reads a registered dataset and splits
it into train / validation (carved from the training data, stratified and seeded) / test (the official
test split, kept apart); :class:`BatchLoader` iterates over a split in float batches in [0, 1], with
optional vectorised augmentation. Normalisation (``DatasetInfo.mean`` / ``std``) is left to the model.

Importing this package registers every dataset module below.
"""

from __future__ import annotations

from autoprune.data import cifar, idx, imagefolder, sample, synthetic  # noqa: F401  (register datasets)
from autoprune.data.augment import AUGMENTATIONS, crop_flip
from autoprune.data.base import (
    DatasetInfo,
    ImageTensors,
    RawDataset,
    Splits,
    stratified_sample,
    stratified_split,
)
from autoprune.data.loader import BatchLoader
from autoprune.data.registry import DATASETS, dataset_names, load_dataset, register_dataset
from autoprune.data.synthetic import synthetic_dataset

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "BatchLoader",
    "DatasetInfo",
    "ImageTensors",
    "RawDataset",
    "Splits",
    "crop_flip",
    "dataset_names",
    "load_dataset",
    "register_dataset",
    "stratified_sample",
    "stratified_split",
    "synthetic_dataset",
]
