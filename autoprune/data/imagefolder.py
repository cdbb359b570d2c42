"""Image-folder datasets: ``train/<class>/*`` and ``test/<class>/*``, decoded once and cached.

Class indices are the sorted class-folder names of ``train/``; ``test/`` must hold the same folders.
Images (``.jpg .jpeg .png .bmp``, found recursively inside each class folder) are decoded with Pillow to
RGB, or to one grayscale channel when every image of both splits is grayscale, and must all share one size.

Decoding tens of thousands of small JPEGs costs seconds (Pillow's per-file overhead dominates), so the
decoded uint8 arrays are cached in ``<root>/.autoprune-cache-<hash>.npz``, where the hash covers every
file's relative path, size and modification time: any change to the tree misses the cache. The cache is
written atomically (temporary file, then ``os.replace``) and skipped when the folder is not writable.
Large trees are decoded by a pool of worker processes, one per core.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import multiprocessing
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from autoprune.data.base import DatasetInfo, ImageTensors, RawDataset, channel_stats
from autoprune.data.registry import register_dataset
from autoprune.errors import AutopruneError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
CACHE_PREFIX = ".autoprune-cache-"
_CACHE_VERSION = "1"
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
#: Below this many files, decode in this process (a worker pool costs more than it saves).
_POOL_MIN_FILES = 4096
_CHUNK = 512


@dataclass(frozen=True)
class FolderData:
    """A decoded image folder.

    Attributes:
        classes: class-folder names, index = label.
        train: the ``train/`` images.
        test: the ``test/`` images.
        mean: per-channel mean of the ``train/`` pixels in [0, 1].
        std: per-channel standard deviation of the ``train/`` pixels in [0, 1].
    """

    classes: tuple[str, ...]
    train: ImageTensors
    test: ImageTensors
    mean: tuple[float, ...]
    std: tuple[float, ...]


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _scan(directory: str, label: int, out: list[tuple[str, int, int, int]]) -> None:
    """Append ``(path, label, size, mtime_ns)`` for the images under ``directory``, recursively, sorted."""
    with os.scandir(directory) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            _scan(entry.path, label, out)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS and entry.is_file():
            st = entry.stat()
            out.append((entry.path, label, st.st_size, st.st_mtime_ns))


def _list_split(split_dir: Path, classes: list[str]) -> list[tuple[str, int, int, int]]:
    """``(path, label, size, mtime_ns)`` for every image of a split, in a fixed (sorted) order."""
    out: list[tuple[str, int, int, int]] = []
    for label, cls in enumerate(classes):
        _scan(str(split_dir / cls), label, out)
    return out


def list_image_folder(root: Path) -> tuple[list[str], dict[str, list[tuple[str, int, int, int]]]]:
    """List the class folders and image files of an image-folder tree, checking its layout.

    Returns:
        ``(classes, {"train": files, "test": files})`` with files as ``(path, label, size, mtime_ns)``.

    Raises:
        AutopruneError: if ``train/`` or ``test/`` is missing, the class folders differ between them,
            or a class (or the test split) holds no images.
    """
    layout = "train/<class>/*.jpg|png and test/<class>/*.jpg|png"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise AutopruneError(
                f"expected an image-folder tree ({layout}) in {root}, but {root / split} is missing"
            )
    classes = _class_dirs(root / "train")
    if not classes:
        raise AutopruneError(f"{root / 'train'} holds no class folders; expected {layout}")
    test_classes = _class_dirs(root / "test")
    if test_classes != classes:
        extra = sorted(set(test_classes) - set(classes))
        missing = sorted(set(classes) - set(test_classes))
        raise AutopruneError(
            f"{root / 'test'} must hold the same class folders as {root / 'train'}: "
            f"missing from test {missing}, not in train {extra}"
        )
    files = {split: _list_split(root / split, classes) for split in ("train", "test")}
    counts = np.bincount([f[1] for f in files["train"]], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise AutopruneError(
            f"class folders {empty} in {root / 'train'} hold no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if not files["test"]:
        raise AutopruneError(f"{root / 'test'} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return classes, files


#: what PIL raises on a file it cannot (or will not: a decompression bomb) decode
_BAD_IMAGE = (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError)


def _decode_chunk(paths: list[str], size: tuple[int, int], first: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode images of PIL size ``size`` to ``(n, H, W, 3)`` uint8, plus a grayscale flag per image.

    Grayscale images are stored replicated over the three channels; the caller keeps one if all are gray.
    """
    w, h = size
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    gray = np.zeros(len(paths), dtype=bool)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                if im.size != size:
                    raise AutopruneError(
                        f"all images must share one size: {path} is {im.size[0]}x{im.size[1]} (WxH) "
                        f"but {first} is {w}x{h}; resize them first"
                    )
                if im.mode == "RGB":
                    out[i] = np.asarray(im)
                elif im.mode in _GRAY_MODES:
                    gray[i] = True
                    out[i] = np.asarray(im if im.mode == "L" else im.convert("L"))[:, :, None]
                else:
                    out[i] = np.asarray(im.convert("RGB"))
        except _BAD_IMAGE as e:
            raise AutopruneError(f"cannot decode image {path}: {e}; remove or replace the file") from None
    return out, gray


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _decode_files(paths: list[str], desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode all ``paths`` (one size) to ``(N, H, W, 3)`` uint8 and grayscale flags, with a progress bar."""
    try:
        with Image.open(paths[0]) as im:
            size = im.size
    except _BAD_IMAGE as e:
        raise AutopruneError(f"cannot decode image {paths[0]}: {e}; remove or replace the file") from None
    chunks = [paths[i : i + _CHUNK] for i in range(0, len(paths), _CHUNK)]
    workers = min(_usable_cpus(), 8)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    with tqdm(total=len(paths), desc=desc, unit="img", leave=False, disable=None) as bar:
        if (
            len(paths) >= _POOL_MIN_FILES
            and workers > 1
            and "fork" in multiprocessing.get_all_start_methods()
        ):
            # fork: workers need only Pillow and numpy, and must not re-import the caller's program.
            ctx = multiprocessing.get_context("fork")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(_decode_chunk, c, size, paths[0]) for c in chunks]
                try:
                    for fut, chunk in zip(futures, chunks, strict=True):
                        parts.append(fut.result())
                        bar.update(len(chunk))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # a bad file: stop decoding the rest
                    raise
        else:
            for chunk in chunks:
                parts.append(_decode_chunk(chunk, size, paths[0]))
                bar.update(len(chunk))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _cache_key(root: Path, files: dict[str, list[tuple[str, int, int, int]]], classes: list[str]) -> str:
    """Hash of the class list and every file's relative path, label, size and mtime (16 hex digits)."""
    h = hashlib.sha256(f"autoprune-imagefolder-v{_CACHE_VERSION}\n".encode())
    h.update(("\0".join(classes) + "\n").encode())
    skip = len(str(root)) + 1
    for split in ("train", "test"):
        lines = (f"{split}\0{p[skip:]}\0{label}\0{size}\0{mtime}\n" for p, label, size, mtime in files[split])
        h.update("".join(lines).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def _load_cache(path: Path, classes: list[str]) -> FolderData | None:
    """Read a cache file; ``None`` (and a log line) if it is absent, unreadable or inconsistent."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if [str(c) for c in arrays["classes"]] != classes:
            raise ValueError("class list differs")
        tensors = {}
        for split in ("train", "test"):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            if images.dtype != np.uint8 or labels.dtype != np.int64:
                raise ValueError("wrong dtypes")
            tensors[split] = ImageTensors(torch.from_numpy(images), torch.from_numpy(labels))
        stats = arrays["stats"]
        return FolderData(
            tuple(classes),
            tensors["train"],
            tensors["test"],
            tuple(float(v) for v in stats[0]),
            tuple(float(v) for v in stats[1]),
        )
    except (OSError, KeyError, ValueError, EOFError) as e:
        logger.warning("ignoring unreadable cache %s (%s); decoding the images again", path, e)
        return None


def _write_cache(path: Path, data: FolderData) -> None:
    """Write the cache atomically; on any OS error (read-only folder, full disk) log and skip it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=CACHE_PREFIX, suffix=".tmp", dir=path.parent)
    except OSError as e:
        logger.info("not caching decoded images: cannot write to %s (%s)", path.parent, e.strerror or e)
        return
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is as readable as the images it holds
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                classes=np.array(data.classes, dtype=str),
                train_images=data.train.images.numpy(),
                train_labels=data.train.labels.numpy(),
                test_images=data.test.images.numpy(),
                test_labels=data.test.labels.numpy(),
                stats=np.array([data.mean, data.std], dtype=np.float64),
            )
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("not caching decoded images in %s: %s", path.parent, e.strerror or e)
        Path(tmp).unlink(missing_ok=True)
        return
    for stale in path.parent.glob(f"{CACHE_PREFIX}*.npz"):
        if stale != path:
            stale.unlink(missing_ok=True)
    logger.info("cached decoded images in %s", path)


def read_image_folder(root: str | Path, *, use_cache: bool = True) -> FolderData:
    """Decode an image-folder tree (see the module docstring), using and refreshing the on-disk cache.

    Args:
        root: the folder holding ``train/`` and ``test/``.
        use_cache: read and write ``<root>/.autoprune-cache-<hash>.npz``.

    Returns:
        The decoded tree with per-channel statistics of its training images.

    Raises:
        AutopruneError: for a bad layout, an undecodable image, or images of different sizes.
    """
    root = Path(root)
    classes, files = list_image_folder(root)
    cache = root / f"{CACHE_PREFIX}{_cache_key(root, files, classes)}.npz"
    if use_cache:
        cached = _load_cache(cache, classes)
        if cached is not None:
            logger.debug("read decoded images from cache %s", cache)
            return cached
    n_train = len(files["train"])
    all_paths = [f[0] for f in files["train"]] + [f[0] for f in files["test"]]
    logger.info("decoding %d images under %s (cached for the next run)", len(all_paths), root)
    pixels, gray = _decode_files(all_paths, desc=f"decoding {root.name or root}")
    pixels = pixels[..., :1] if gray.all() else pixels

    def to_nchw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))

    def labels(split: str) -> torch.Tensor:
        return torch.tensor([f[1] for f in files[split]], dtype=torch.long)

    train = ImageTensors(to_nchw(pixels[:n_train]), labels("train"))
    test = ImageTensors(to_nchw(pixels[n_train:]), labels("test"))
    del pixels
    mean, std = channel_stats(train.images)
    data = FolderData(tuple(classes), train, test, mean, std)
    if use_cache:
        _write_cache(cache, data)
    return data


@register_dataset(
    "imagefolder",
    source="expected layout: <data-dir>/train/<class>/*.jpg|png and <data-dir>/test/<class>/*.jpg|png",
)
def read_imagefolder_dataset(data_dir: Path | None) -> RawDataset:
    """Any ``train/<class>`` + ``test/<class>`` tree; statistics from its training images, crop+flip."""
    if data_dir is None:
        raise AutopruneError("--data-dir is required for dataset 'imagefolder'; point it at the tree's root")
    data = read_image_folder(data_dir)
    n, c, h, w = data.train.images.shape
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(data.classes),
        in_channels=c,
        image_size=(h, w),
        mean=data.mean,
        std=data.std,
        classes=data.classes,
        augment="crop_flip",
    )
    return RawDataset(info, data.train, data.test)
