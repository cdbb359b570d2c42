"""MNIST and Fashion-MNIST from their idx files, parsed here (no torchvision).

The four files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``) may each be plain or gzipped (``.gz``), and may lie in the directory the user
names or where torchvision leaves them (``<dir>/MNIST/raw/``, ``<dir>/FashionMNIST/raw/``). The dotted
names of some mirrors (``train-images.idx3-ubyte``) are accepted too.
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoprune.data.base import DatasetInfo, ImageTensors, RawDataset, check_labels
from autoprune.data.registry import register_dataset
from autoprune.errors import AutopruneError

logger = logging.getLogger(__name__)

#: idx type code for unsigned bytes, the only element type MNIST-style files use.
_UBYTE = 0x08

#: (split, kind) -> canonical file name.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    """Read a file, decompressing it if its name ends in ``.gz``; damaged archives become AutopruneErrors."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise AutopruneError(f"{path} is not a valid gzip file ({e}); download it again") from None
    except OSError as e:
        raise AutopruneError(f"cannot read {path}: {e.strerror or e}") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with ``ndim`` dimensions.

    Format: two zero bytes, a type code (``0x08`` = uint8), the number of dimensions, then one big-endian
    int32 per dimension and the data. The magic number, dimension count and exact data length are checked
    (a truncated file and trailing bytes are both errors).

    Args:
        path: the file, plain or ``.gz``.
        ndim: expected number of dimensions (3 for images, 1 for labels).

    Returns:
        A writable uint8 array of the declared shape.

    Raises:
        AutopruneError: naming the file, if it is truncated, malformed or has the wrong magic number.
    """
    path = Path(path)
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < 4:
        raise AutopruneError(f"{path} is truncated ({len(data)} bytes); download it again")
    expected_magic = (_UBYTE << 8) | ndim
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise AutopruneError(
            f"{path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(idx, uint8, {ndim}-d); it is not the right idx file or is corrupt"
        )
    if len(data) < header:
        raise AutopruneError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != size:
        what = "truncated" if len(data) - header < size else "longer than its header says"
        raise AutopruneError(
            f"{path} is {what}: header declares shape {dims} ({size} bytes), "
            f"file holds {len(data) - header}; download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


@dataclass(frozen=True)
class IdxDataset:
    """The fixed facts of an idx-format dataset.

    Attributes:
        name: registry name.
        raw_subdir: where torchvision leaves the files, relative to its root (e.g. ``MNIST/raw``).
        classes: class names.
        mean: training-set pixel mean.
        std: training-set pixel standard deviation.
        source: where to download the files.
    """

    name: str
    raw_subdir: str
    classes: tuple[str, ...]
    mean: float
    std: float
    source: str

    def info(self) -> DatasetInfo:
        """The dataset's description (28x28, one channel, no default augmentation)."""
        return DatasetInfo(
            name=self.name,
            num_classes=len(self.classes),
            in_channels=1,
            image_size=(28, 28),
            mean=(self.mean,),
            std=(self.std,),
            classes=self.classes,
            augment="none",
        )


def _candidates(directory: Path, name: str) -> list[Path]:
    """The file names accepted for canonical ``name`` in ``directory``, preferred first (plain before gz)."""
    dotted = name.replace("-idx", ".idx")
    return [directory / n for n in (name, f"{name}.gz", dotted, f"{dotted}.gz")]


def find_idx_files(data_dir: Path, ds: IdxDataset) -> dict[tuple[str, str], Path]:
    """Locate the four idx files in ``data_dir`` or its torchvision ``raw`` folder.

    The first folder holding all four (each plain or gzipped) wins; files are never mixed across folders.

    Raises:
        AutopruneError: naming the expected files, the folders searched and where to download them.
    """
    folders = [data_dir, data_dir / ds.raw_subdir]
    for folder in folders:
        found: dict[tuple[str, str], Path] = {}
        for key, name in IDX_FILES.items():
            hit = next((p for p in _candidates(folder, name) if p.is_file()), None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(IDX_FILES):
            return found
    expected = ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
    searched = " and ".join(str(f) for f in folders)
    raise AutopruneError(f"dataset {ds.name!r}: expected {expected} in {searched}; {ds.source}")


def read_idx_dataset(ds: IdxDataset, data_dir: Path | None) -> RawDataset:
    """Read an idx dataset's train and test splits from ``data_dir`` (see the module docstring)."""
    if data_dir is None:  # the registry guarantees a directory; guard direct calls
        raise AutopruneError(f"--data-dir is required for dataset {ds.name!r}; {ds.source}")
    files = find_idx_files(Path(data_dir), ds)
    info = ds.info()
    splits = {}
    for split in ("train", "test"):
        img_path, lab_path = files[(split, "images")], files[(split, "labels")]
        images = read_idx(img_path, 3)
        labels = read_idx(lab_path, 1)
        if images.shape[1:] != info.image_size:
            raise AutopruneError(
                f"{img_path} holds {images.shape[1]}x{images.shape[2]} images, expected 28x28; "
                f"it is not a {ds.name} file"
            )
        if len(images) != len(labels):
            raise AutopruneError(
                f"{img_path} holds {len(images)} images but {lab_path} holds {len(labels)} labels; "
                "the files do not belong together, download them again"
            )
        label_t = torch.from_numpy(labels.astype(np.int64))
        check_labels(label_t, info.num_classes, str(lab_path))
        splits[split] = ImageTensors(torch.from_numpy(images).unsqueeze(1), label_t)
    logger.debug("read %s from %s", ds.name, files[("train", "images")].parent)
    return RawDataset(info, splits["train"], splits["test"])


MNIST = IdxDataset(
    name="mnist",
    raw_subdir="MNIST/raw",
    classes=tuple(str(d) for d in range(10)),
    mean=0.1307,
    std=0.3081,
    source="download the four files from http://yann.lecun.com/exdb/mnist/ "
    "(mirror: https://ossci-datasets.s3.amazonaws.com/mnist/) or let torchvision.datasets.MNIST fetch them",
)

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    raw_subdir="FashionMNIST/raw",
    classes=(
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ),
    mean=0.2860,
    std=0.3530,
    source="download the four files from https://github.com/zalandoresearch/fashion-mnist "
    "or let torchvision.datasets.FashionMNIST fetch them",
)

for _ds in (MNIST, FASHION_MNIST):
    register_dataset(_ds.name, source=_ds.source)(functools.partial(read_idx_dataset, _ds))
