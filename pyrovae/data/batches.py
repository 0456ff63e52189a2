"""Seeded minibatches: a permutation drawn on the CPU, rows gathered where the images live, floats made on the device.

Each batch is turned into floats only once it is on the training device (see
:mod:`pyrovae.data.storage`): ``uint8`` ``k`` becomes ``k / 255``. What a likelihood then sees:

* Bernoulli, continuous Bernoulli, Normal, Laplace: the pixels ``k / 255`` in ``[0, 1]``;
  with dynamic binarization (``binarize=True``) a fresh draw ``Bernoulli(k / 255)`` per batch,
  binary floats.
* A discretized likelihood of 8-bit data (the discretized logistic): the same ``k / 255``, the
  centres of its 256 bins; no noise is added (a continuous density would need uniform
  dequantization, which is the likelihood's business, not the batch's).

Under ``torch.distributed`` every rank draws the same permutation (and binarization noise) for
the whole global batch and keeps its contiguous shard (``shard=(rank, world)``), so only this
rank's images are read and moved.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from ..errors import InputError
from .storage import ImageSet, as_image_set

__all__ = ["batches", "shard_bounds", "binarized"]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous shard of ``n`` items over ``world`` ranks.

    The first ``n % world`` ranks hold one item more; a rank holds none when ``n < world``.
    """
    small, extra = divmod(n, world)
    start = rank * small + min(rank, extra)
    return start, start + small + (rank < extra)


def binarized(images: Tensor, generator: torch.Generator) -> Tensor:
    """One draw ``Bernoulli(pixels)`` of images ``(N, C, H, W)`` (``uint8`` ``k``: pixel ``k / 255``; float: as it is),
    as ``uint8`` 0 or 255."""
    pixels = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    return torch.bernoulli(pixels, generator=generator).to(torch.uint8).mul_(255)


def batches(
    x: ImageSet | Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    binarize: bool = False,
    labels: Tensor | None = None,
    shard: tuple[int, int] | None = None,
    first: int = 0,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """Yield float minibatches ``(b, C, H, W)`` of ``x`` (an :class:`ImageSet` or a tensor ``(N, C, H, W)``), by (shuffled) index.

    The permutation is drawn on the CPU from ``generator`` (seed it for repeatable epochs) and
    the last batch may be smaller. ``binarize`` draws ``Bernoulli(pixels)`` for each batch
    (dynamic binarization), also from ``generator``. With ``labels: (N, ...)`` each batch comes
    with its labels, ``(images, labels)``, sliced by the same indices; the labels draw nothing
    from ``generator``, so the images are those of a run without labels.

    shard: ``(rank, world)``: yield only this rank's contiguous part of every batch (see the module docs).
    first: skip the batches before this one without reading their images (their draws are made,
        so the later batches are those of a whole epoch): where an interrupted epoch resumes.
    """
    images = as_image_set(x)
    n = len(images)
    if n == 0:
        raise InputError("cannot make batches of an empty dataset")
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if labels is not None and len(labels) != n:
        raise InputError(f"labels must be one per image: {n} images, {len(labels)} labels")
    if shuffle:
        index = torch.randperm(n, generator=generator).to(images.index_device)
    for number, start in enumerate(range(0, n, batch_size)):
        stop = min(start + batch_size, n)
        noise = torch.rand((stop - start, *images.image_shape), generator=generator) if binarize else None
        if number < first:
            continue
        if shard is not None:
            lo, hi = shard_bounds(stop - start, *shard)
            start, stop = start + lo, start + hi
            noise = None if noise is None else noise[lo:hi]
        where = index[start:stop] if shuffle else slice(start, stop)
        batch = images[where]
        if noise is not None:
            batch = (noise.to(batch.device) < batch).to(batch.dtype)
        if labels is None:
            yield batch
        else:
            yield batch, labels[where.to(labels.device) if shuffle else where]
