"""CIFAR-10 in any of its three common forms.

Accepted, in this order of preference, at ``data_dir`` itself or in its ``cifar-10-batches-py`` /
``cifar-10-batches-bin`` subfolder:

* the python batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``, optional ``batches.meta``):
  pickles of dicts holding a uint8 ``(N, 3072)`` array and a label list. They are read with a restricted
  unpickler that can rebuild numpy arrays and nothing else, so a tampered file cannot run code;
* the binary batches (``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``, optional
  ``batches.meta.txt``): records of one label byte and 3072 pixel bytes (R, G, B planes of 32x32);
* an image-folder tree ``train/<class>/*`` + ``test/<class>/*`` of ten classes of 32x32 RGB images (e.g.
  a JPEG export), decoded and cached by :mod:`autoprune.data.imagefolder`.

Normalisation statistics are CIFAR-10's published training-set values in every case.
"""

from __future__ import annotations

import io
import logging
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoprune.data.base import DatasetInfo, ImageTensors, RawDataset, check_labels
from autoprune.data.imagefolder import read_image_folder
from autoprune.data.registry import register_dataset
from autoprune.errors import AutopruneError

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_SOURCE = (
    "download the python or binary version from https://www.cs.toronto.edu/~kriz/cifar.html and extract it "
    "(tar xzf cifar-10-python.tar.gz), or give an image-folder tree with train/ and test/"
)
_PIXELS = 3 * 32 * 32
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_PY_DIR, _BIN_DIR = "cifar-10-batches-py", "cifar-10-batches-bin"


def _numpy_reconstructors() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name: numpy's array and dtype rebuilders (old and new paths).

    ``_reconstruct`` (protocols up to 4, including the official Python 2 files), ``_frombuffer`` (protocol
    5), ``ndarray`` and ``dtype``; nothing that can call arbitrary code.
    """
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    allowed: dict[tuple[str, str], Any] = {}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # what protocol-5 pickles of arrays name
            allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, "latin1"); allow exactly that.
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` in pickles: latin-1 only, the one codec pickle itself uses."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return text.encode("latin1")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy's array-rebuilding globals; anything else is refused."""

    allowed = _numpy_reconstructors()

    def __init__(self, file: io.BufferedIOBase, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise AutopruneError(
                f"refusing to load {self.source}: the pickle names {module}.{name}, but a CIFAR batch may "
                "only hold numpy arrays, lists and dicts; it is not an official CIFAR-10 batch, get it again"
            ) from None


def safe_unpickle(path: Path) -> Any:
    """Unpickle a CIFAR python batch with the restricted unpickler (``encoding="bytes"``).

    Raises:
        AutopruneError: naming the file, if it is truncated, malformed or names a forbidden global.
    """
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f, path).load()
    except AutopruneError:
        raise
    except OSError as e:
        raise AutopruneError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # pickle raises many types on damaged input (EOFError, UnpicklingError, ...)
        raise AutopruneError(
            f"{path} is truncated or not a CIFAR python batch ({type(e).__name__}: {e}); download it again"
        ) from None


def _field(d: Any, key: str, path: Path) -> Any:
    """``d[key]`` for a bytes- or str-keyed dict; missing keys are an error naming the file."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise AutopruneError(f"{path} is not a CIFAR python batch: it has no {key!r} entry; download it again")


def _read_py_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = safe_unpickle(path)
    data = _field(batch, "data", path)
    labels = np.asarray(_field(batch, "labels", path))
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _PIXELS
    ):
        shape = getattr(data, "shape", type(data).__name__)
        raise AutopruneError(
            f"{path}: 'data' must be a uint8 array (N, {_PIXELS}), got {shape}; download it again"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise AutopruneError(f"{path}: expected {len(data)} integer labels, got shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _read_bin_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % (_PIXELS + 1):
        raise AutopruneError(
            f"{path} holds {raw.size} bytes, not a whole number of {_PIXELS + 1}-byte CIFAR records; "
            "it is truncated, download it again"
        )
    records = raw.reshape(-1, _PIXELS + 1)
    return records[:, 1:].reshape(-1, 3, 32, 32), records[:, 0]


def _to_tensors(parts: list[tuple[np.ndarray, np.ndarray]], source: str) -> ImageTensors:
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    check_labels(labels, len(CIFAR10_CLASSES), source)
    return ImageTensors(images, labels)


def _read_batches(
    folder: Path, suffix: str, reader: Callable[[Path], tuple[np.ndarray, np.ndarray]]
) -> RawDataset:
    names = [*(b + suffix for b in _TRAIN_BATCHES), "test_batch" + suffix]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise AutopruneError(
            f"CIFAR-10 batches incomplete in {folder}: missing {', '.join(missing)}; {CIFAR10_SOURCE}"
        )
    train = _to_tensors([reader(folder / n) for n in names[:-1]], f"the training batches in {folder}")
    test = _to_tensors([reader(folder / names[-1])], str(folder / names[-1]))
    return RawDataset(_info(_class_names(folder)), train, test)


def _class_names(folder: Path) -> tuple[str, ...]:
    """Class names from ``batches.meta`` (python) or ``batches.meta.txt`` (binary), else the standard ten."""
    names: list[str] = []
    if (folder / "batches.meta").is_file():
        meta = safe_unpickle(folder / "batches.meta")
        raw = meta.get(b"label_names", meta.get("label_names", [])) if isinstance(meta, dict) else []
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    elif (folder / "batches.meta.txt").is_file():
        names = [ln.strip() for ln in (folder / "batches.meta.txt").read_text().splitlines() if ln.strip()]
    if len(names) != len(CIFAR10_CLASSES):
        if names:
            logger.warning("ignoring class names in %s: %d names, expected 10", folder, len(names))
        return CIFAR10_CLASSES
    return tuple(names)


def _info(classes: tuple[str, ...]) -> DatasetInfo:
    return DatasetInfo(
        name="cifar10",
        num_classes=10,
        in_channels=3,
        image_size=(32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        classes=classes,
        augment="crop_flip",
    )


def _read_folder(root: Path) -> RawDataset:
    data = read_image_folder(root)
    shape = tuple(data.train.images.shape[1:])
    if len(data.classes) != 10 or shape != (3, 32, 32):
        raise AutopruneError(
            f"{root} is an image folder of {len(data.classes)} classes of "
            f"{shape[0]}x{shape[1]}x{shape[2]} images, but CIFAR-10 has 10 classes of 3x32x32 RGB images; "
            "use dataset 'imagefolder' for other trees"
        )
    return RawDataset(_info(data.classes), data.train, data.test)


@register_dataset("cifar10", source=CIFAR10_SOURCE)
def read_cifar10(data_dir: Path | None) -> RawDataset:
    """Read CIFAR-10 from python batches, binary batches or an image folder (see the module docstring)."""
    if data_dir is None:
        raise AutopruneError(f"--data-dir is required for dataset 'cifar10'; {CIFAR10_SOURCE}")
    data_dir = Path(data_dir)
    for folder in (data_dir, data_dir / _PY_DIR):
        if (folder / "data_batch_1").is_file():
            logger.debug("reading CIFAR-10 python batches from %s", folder)
            return _read_batches(folder, "", _read_py_batch)
    for folder in (data_dir, data_dir / _BIN_DIR):
        if (folder / "data_batch_1.bin").is_file():
            logger.debug("reading CIFAR-10 binary batches from %s", folder)
            return _read_batches(folder, ".bin", _read_bin_batch)
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return _read_folder(data_dir)
    raise AutopruneError(
        f"no CIFAR-10 found in {data_dir}: expected data_batch_1..5 + test_batch (in it or in {_PY_DIR}/), "
        f"data_batch_1..5.bin + test_batch.bin (or in {_BIN_DIR}/), or train/ + test/ class folders; "
        f"{CIFAR10_SOURCE}"
    )
