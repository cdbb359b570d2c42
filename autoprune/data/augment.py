"""Batch augmentations, vectorised over whole uint8 batches on the batch's own device.

An augmentation is a callable ``(images, generator) -> images`` taking a uint8 ``(B, C, H, W)`` batch and a
CPU :class:`torch.Generator`, returning a new uint8 batch of the same shape. Random draws are made on the
CPU generator (a few numbers per image) so that results are identical on every device; the pixel work is
one gather on the batch's device. Augmentations are looked up by name in :data:`AUGMENTATIONS`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from autoprune.errors import unknown_name

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]

#: Zero padding (pixels, each side) of the ``crop_flip`` random crop, as in the CIFAR ResNet papers.
CROP_PADDING = 4


def no_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Return the batch unchanged (the generator is not consumed)."""
    return images


def crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Random crop from a zero-padded batch, then a random horizontal flip, per image.

    Each image is padded by ``padding`` zero pixels on every side and an ``H x W`` window at a uniformly
    random offset in ``[0, 2 * padding]`` is cut out; with probability 1/2 the window is mirrored left to
    right. Everything is one advanced-indexing gather over the whole batch: no per-image Python loop.
    Draws are taken from ``generator`` in a fixed order (row offsets, column offsets, flips), so the same
    generator state gives the same batch.

    Args:
        images: uint8 batch ``(B, C, H, W)`` on any device.
        generator: CPU generator supplying the random offsets and flips.
        padding: zero padding on each side; the crop offset range is ``2 * padding + 1`` positions.

    Returns:
        A new uint8 tensor with the shape, dtype and device of ``images``.
    """
    b, c, h, w = images.shape
    if b == 0:
        return images
    dev = images.device
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(dev)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=dev)  # (B, H)
    cols = torch.arange(w, device=dev).expand(b, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (B, W)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


#: Registry of batch augmentations by name (``DatasetInfo.augment`` and ``BatchLoader(augment=...)``).
AUGMENTATIONS: dict[str, Augmentation] = {"none": no_augment, "crop_flip": crop_flip}


def get_augmentation(name: str) -> Augmentation:
    """Look an augmentation up by name, raising the standard unknown-name error."""
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise unknown_name("augmentation", name, list(AUGMENTATIONS)) from None
