"""A minimal batch iterator over an in-memory uint8 dataset.

Why not ``torch.utils.data.DataLoader``: our datasets are single uint8 tensors, so a batch is one index
operation plus one ``.float().div_(255)``; a per-sample ``Dataset.__getitem__`` and a collate function
would cost far more than the work itself on small images, and worker processes would only add start-up
time on the 2-core machines this runs on.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from autoprune.data.augment import get_augmentation
from autoprune.data.base import ImageTensors
from autoprune.errors import AutopruneError


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, epoch)`` through numpy's ``SeedSequence`` (well mixed)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(epoch) % 2**64]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class BatchLoader:
    """Iterate over ``(images, labels)`` batches: float images in [0, 1] ``(B, C, H, W)``, int64 labels.

    The whole dataset is moved to ``device`` once, at construction; batches are cut from it by indexing
    and converted with ``.float().div_(255)``, and augmentation runs on the batch there too. Each call to
    ``iter()`` is one epoch; its shuffle order and augmentation draws come from a generator seeded with
    ``(seed, epoch)``, where the epoch counter starts at 0 and advances with every epoch, so two loaders
    built alike produce identical batches epoch after epoch, and :meth:`set_epoch` resumes the sequence.

    Args:
        data: the split to iterate over.
        batch_size: images per batch (the last batch may be smaller unless ``drop_last``).
        shuffle: draw a fresh random order every epoch.
        augment: name of a batch augmentation (``"none"`` or ``"crop_flip"``).
        seed: base seed of the per-epoch generators.
        device: where batches are produced.
        drop_last: drop a final incomplete batch.
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        *,
        shuffle: bool = False,
        augment: str = "none",
        seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise AutopruneError(f"batch_size must be at least 1, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self._augment_fn = get_augmentation(augment)
        self.seed = int(seed)
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.epoch = 0
        self._images = data.images.to(self.device)
        self._labels = data.labels.to(self.device)

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch`` (for resuming a run)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = epoch_generator(self.seed, self.epoch)
        self.epoch += 1
        n = len(self.data)
        order = torch.randperm(n, generator=gen).to(self.device) if self.shuffle else None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                images, labels = self._images[lo:hi], self._labels[lo:hi]
            else:
                idx = order[lo:hi]
                images, labels = self._images[idx], self._labels[idx]
            images = self._augment_fn(images, gen)
            yield images.float().div_(255), labels
