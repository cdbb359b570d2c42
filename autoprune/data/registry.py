"""The dataset registry and :func:`load_dataset`.

A dataset is registered with :func:`register_dataset` on its reader, a function from the user's data
directory (or ``None`` for datasets that need none) to a :class:`RawDataset`. Adding a dataset is one
decorated function in its own module, imported by ``autoprune.data``; nothing here names datasets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from autoprune.data.base import RawDataset, Splits, check_labels, check_split_args, make_splits
from autoprune.errors import AutopruneError
from autoprune.registry import Registry

logger = logging.getLogger(__name__)

Reader = Callable[[Path | None], RawDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset.

    Attributes:
        name: registry name.
        reader: ``data_dir -> RawDataset``; receives an existing directory, or ``None`` when
            ``needs_data_dir`` is false.
        needs_data_dir: whether the user must name a data directory.
        source: where to get the files, quoted in error messages.
    """

    name: str
    reader: Reader
    needs_data_dir: bool = True
    source: str = ""


#: All datasets by name.
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(
    name: str, *, needs_data_dir: bool = True, source: str = ""
) -> Callable[[Reader], Reader]:
    """Decorator registering a reader under ``name``; the reader is returned unchanged."""

    def wrap(reader: Reader) -> Reader:
        DATASETS.add(name, DatasetSpec(name, reader, needs_data_dir, source))
        return reader

    return wrap


def dataset_names() -> list[str]:
    """Names of all registered datasets, sorted."""
    return DATASETS.names()


def get_dataset_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name, raising the standard unknown-name error."""
    return DATASETS.get(name)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
) -> Splits:
    """Load a registered dataset into memory and split it into train / validation / test.

    The validation split is carved from the official training data (stratified by class, seeded by
    ``seed``); the official test split is kept apart. Datasets that need no files (``sample``,
    ``synthetic``) ignore ``data_dir``.

    Args:
        name: a name from :func:`dataset_names`.
        data_dir: the directory holding the dataset's files (see each reader for the layouts accepted).
        val_fraction: share of the training data held out for validation, in ``[0, 0.5]``.
        seed: seed of the validation split and of the ``limit`` draws.
        limit: if given, cap the training pool and the test split at this many images each (stratified,
            seeded), for quick runs; the validation split is then carved from the capped pool.

    Returns:
        The dataset's :class:`Splits`.

    Raises:
        AutopruneError: for an unknown name, a missing or absent directory, missing or malformed files,
            labels out of range, or a bad ``val_fraction`` / ``limit``.
    """
    spec = get_dataset_spec(name)
    check_split_args(val_fraction, limit)  # before reading anything
    path: Path | None = None
    if spec.needs_data_dir:
        hint = f" ({spec.source})" if spec.source else ""
        if data_dir is None:
            raise AutopruneError(
                f"--data-dir is required for dataset {name!r}; point it at the folder holding its files{hint}"
            )
        path = Path(data_dir).expanduser()
        if path.is_file() and path.suffix.lower() in (".zip", ".gz", ".tgz", ".tar"):
            raise AutopruneError(
                f"data directory {str(path)!r} for dataset {name!r} is an archive; extract it first (e.g. "
                f"`python -m zipfile -e {path.name} DIR` or `tar xzf {path.name}`) and pass the folder"
            )
        if not path.is_dir():
            raise AutopruneError(
                f"data directory {str(path)!r} for dataset {name!r} does not exist or is not a directory; "
                f"check the path{hint}"
            )
    elif data_dir is not None:
        logger.warning("dataset %r is built in and reads no files: --data-dir %s is ignored", name, data_dir)
    raw = spec.reader(path)
    check_labels(raw.train.labels, raw.info.num_classes, f"the training data of {name!r}")
    check_labels(raw.test.labels, raw.info.num_classes, f"the test data of {name!r}")
    splits = make_splits(raw, val_fraction=val_fraction, seed=seed, limit=limit)
    classes = int(splits.train.labels.unique().numel())
    if len(splits.train) and classes < 2:
        logger.warning("every training label of dataset %r is %d: nothing can be learnt from a single class; check "
                       "the label file", name, int(splits.train.labels[0]))
    elif len(splits.train) and classes < raw.info.num_classes:
        logger.warning("the training data of dataset %r has %d of its %d classes", name, classes,
                       raw.info.num_classes)
    logger.info(
        "dataset %s: %d train / %d val / %d test images, %dx%dx%d",
        name,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        raw.info.in_channels,
        *raw.info.image_size,
    )
    return splits
