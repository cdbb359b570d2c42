"""Value types for in-memory datasets, and the seeded stratified splits between them.

Every dataset that ``autoprune`` handles is small enough to live in memory as one uint8 tensor, so a
dataset is a pair of tensors (:class:`ImageTensors`), a loaded dataset is train / validation / test
(:class:`Splits`) plus its description (:class:`DatasetInfo`). The validation split is always carved from
the training data (stratified, seeded); the official test split is never mixed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from autoprune.data.augment import AUGMENTATIONS
from autoprune.errors import AutopruneError

Index = torch.Tensor | np.ndarray | Sequence[int] | slice

#: Largest validation fraction that :func:`load_dataset` accepts.
MAX_VAL_FRACTION = 0.5


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader need to know about a dataset.

    ``mean`` / ``std`` are per-channel statistics of the training pixels scaled to [0, 1]; the loaders do
    not normalise (they yield raw ``[0, 1]`` floats), the model applies them in its first layer, so a saved
    model carries its own normalisation.

    Attributes:
        name: registry name, e.g. ``"mnist"``.
        num_classes: number of classes; labels are ``0 .. num_classes - 1``.
        in_channels: image channels (1 for grayscale, 3 for RGB).
        image_size: ``(H, W)``.
        mean: per-channel mean of the training pixels in [0, 1].
        std: per-channel standard deviation of the training pixels in [0, 1].
        classes: class names, index ``i`` naming label ``i``.
        augment: default training augmentation, a key of ``AUGMENTATIONS`` (``"none"`` or ``"crop_flip"``).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.num_classes < 1 or len(self.classes) != self.num_classes:
            raise AutopruneError(
                f"dataset {self.name!r} has {len(self.classes)} class names for {self.num_classes} classes; "
                "give exactly one name per class"
            )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise AutopruneError(
                f"dataset {self.name!r}: mean/std have {len(self.mean)}/{len(self.std)} entries for "
                f"{self.in_channels} channels; give one value per channel"
            )
        if self.augment not in AUGMENTATIONS:
            raise AutopruneError(
                f"dataset {self.name!r}: unknown augmentation {self.augment!r}; "
                f"valid augmentations: {', '.join(sorted(AUGMENTATIONS))}"
            )


@dataclass(frozen=True)
class ImageTensors:
    """A whole (small) split held in memory.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise AutopruneError(
                f"images must be a uint8 tensor of shape (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise AutopruneError(
                f"labels must be an int64 tensor of shape (N,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise AutopruneError(
                f"{len(self.images)} images but {len(self.labels)} labels; counts must match"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: Index) -> ImageTensors:
        """Return the rows selected by ``idx`` (indices, a boolean mask or a slice), as a new split."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
            if idx.dtype != torch.bool:
                idx = idx.long()
        return ImageTensors(self.images[idx], self.labels[idx])


@dataclass(frozen=True)
class Splits:
    """A loaded dataset: its description and its three disjoint splits.

    Attributes:
        info: the dataset's description.
        train: training data minus the validation split.
        val: validation split carved from the training data (seeded, stratified); search fitness uses it.
        test: the official test split, never mixed with train/val; only the final report touches it.
    """

    info: DatasetInfo
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors


@dataclass(frozen=True)
class RawDataset:
    """What a dataset reader returns: the official training and test data, before any split."""

    info: DatasetInfo
    train: ImageTensors
    test: ImageTensors


def _class_quotas(counts: np.ndarray, n_total: int) -> np.ndarray:
    """Share ``n_total`` over classes in proportion to ``counts`` (largest remainder, ties by class)."""
    exact = counts * (n_total / counts.sum())
    quota = np.floor(exact).astype(np.int64)
    quota = np.minimum(quota, counts)
    short = n_total - int(quota.sum())
    if short > 0:
        remainder = np.where(quota < counts, exact - quota, -1.0)
        order = np.argsort(-remainder, kind="stable")
        quota[order[:short]] += 1
    return quota


def _stratified_take(labels: torch.Tensor, n_take: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``n_take`` indices class-proportionally at random; return (rest, taken), each sorted."""
    labels = torch.as_tensor(labels).reshape(-1)
    n = int(labels.numel())
    if n == 0 or n_take == 0:
        return torch.arange(n, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = torch.from_numpy(_class_quotas(counts.numpy().astype(np.int64), n_take))
    gen = torch.Generator().manual_seed(int(seed) % 2**64)
    perm = torch.randperm(n, generator=gen)
    # Group by class, random order within each class; then take the first `quota[c]` of class c.
    order = perm[torch.argsort(inverse[perm], stable=True)]
    cls = inverse[order]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n) - starts[cls]
    taken = rank < quota[cls]
    return order[~taken].sort().values, order[taken].sort().values


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out ``fraction`` of the samples, class by class, at random.

    The held-out size is ``round(fraction * N)``, shared over classes in proportion to their sizes (largest
    remainder), so every class keeps its share in both parts. The choice depends only on ``labels`` and
    ``seed`` (a CPU ``torch.Generator``), so it is the same on every run and machine.

    Args:
        labels: class labels ``(N,)`` (any integer values).
        fraction: share to hold out, in ``[0, 1]``.
        seed: seed of the random choice within each class.

    Returns:
        ``(keep_idx, held_out_idx)``: sorted int64 index tensors, disjoint, together covering ``0 .. N-1``.

    Raises:
        AutopruneError: if ``fraction`` is outside ``[0, 1]``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise AutopruneError(f"split fraction must be in [0, 1], got {fraction}")
    n = int(torch.as_tensor(labels).numel())
    return _stratified_take(labels, int(round(fraction * n)), seed)


def stratified_sample(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Return ``n`` sorted indices drawn class-proportionally at random (all of them if ``n >= N``)."""
    total = int(torch.as_tensor(labels).numel())
    if n >= total:
        return torch.arange(total, dtype=torch.long)
    return _stratified_take(labels, n, seed)[1]


def check_labels(labels: torch.Tensor, num_classes: int, source: str) -> None:
    """Raise if any label is outside ``0 .. num_classes - 1``; ``source`` names the file or folder."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise AutopruneError(
            f"labels out of range in {source}: found {lo}..{hi}, expected 0..{num_classes - 1}; "
            "the file is corrupt or belongs to another dataset"
        )


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images scaled to [0, 1].

    Sums are accumulated in float64 over chunks of images, so memory stays small on large datasets.
    """
    c = images.shape[1]
    if len(images) == 0:
        return (0.0,) * c, (1.0,) * c
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255.0)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = s / count
    std = (s2 / count - mean.square()).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def check_split_args(val_fraction: float, limit: int | None) -> None:
    """Raise unless ``val_fraction`` is in ``[0, 0.5]`` and ``limit`` is ``None`` or positive."""
    if not 0.0 <= val_fraction <= MAX_VAL_FRACTION:
        raise AutopruneError(
            f"val_fraction must be in [0, {MAX_VAL_FRACTION}], got {val_fraction}; "
            "it is the share of the training data held out for validation"
        )
    if limit is not None and limit < 1:
        raise AutopruneError(f"limit must be a positive number of images, got {limit}")


def make_splits(
    raw: RawDataset, *, val_fraction: float = 0.1, seed: int = 0, limit: int | None = None
) -> Splits:
    """Turn a reader's train/test into :class:`Splits`: optional size cap, then the validation carve.

    ``limit`` caps the training pool and the test split, each by a stratified seeded draw, before the
    validation split is taken from what is left of the training pool.

    Raises:
        AutopruneError: if ``val_fraction`` is outside ``[0, 0.5]`` or ``limit`` is not positive.
    """
    check_split_args(val_fraction, limit)
    train, test = raw.train, raw.test
    if limit is not None:
        train = train.subset(stratified_sample(train.labels, limit, seed))
        test = test.subset(stratified_sample(test.labels, limit, seed))
    keep, held = stratified_split(train.labels, val_fraction, seed)
    return Splits(info=raw.info, train=train.subset(keep), val=train.subset(held), test=test)
