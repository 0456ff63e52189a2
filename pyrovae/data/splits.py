"""A dataset's splits (:class:`ImageData`): training, test and validation images, binarization and the evaluation protocol.

**Binarization and the evaluation protocol.** Bernoulli likelihoods are likelihoods of binary
images; on grey levels they are a relaxation whose numbers compare with nothing. A binarized run
is therefore scored on binary images, as in the literature on binarized MNIST:

* ``"dynamic"`` (Burda et al. 2016 and most VAE papers since): every training batch is a fresh
  draw ``x ~ Bernoulli(pixels)``; the test set, and a validation set, are drawn **once** with the
  fixed seed :data:`EVAL_BINARIZATION_SEED`, the same for every run whatever its training seed,
  so that every model is scored on the same binary images.
* ``"static"``: the training images are drawn once, with the run's ``seed``; the test and
  validation images once with :data:`EVAL_BINARIZATION_SEED`, as for ``"dynamic"``. (This is a
  fixed binarization of our own, not the file of Larochelle and Murray that papers call
  "statically binarized MNIST".)

The draws for the test set are made on the whole test set, before ``subset`` takes its first
images, so a subset holds the same binary images as the full set. Binary images are stored as
``uint8`` 0 and 255, so they are the floats 0 and 1 in every batch.

**The test split** is the source's own (torchvision's test files, ``test=`` of
:func:`load_images`), or else a held-out fraction of the images, drawn with the fixed seed
:data:`TEST_SPLIT_SEED` whatever the run's seed, so that runs on the same images are scored on
the same test images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..devices import resolve_device
from ..errors import InputError
from .batches import binarized
from .sources import (
    DATASETS,
    Source,
    default_data_dir,
    from_tensor,
    read_celeba,
    read_dataset,
    read_path,
    read_torchvision,
)
from .storage import STORAGES, ImageSet, as_image_set

__all__ = ["ImageData", "load_dataset", "load_images", "BINARIZATION", "EVAL_BINARIZATION_SEED", "TEST_SPLIT_SEED", "TEST_FRACTION"]

BINARIZATION = (None, "static", "dynamic")
#: seed of the single Bernoulli draw that binarizes the test and validation images of a binarized run
EVAL_BINARIZATION_SEED = 0
#: seed of the draw that holds out the test images of a source without a test split of its own
TEST_SPLIT_SEED = 0
#: the share of the images held out for testing when a source has no test split of its own
TEST_FRACTION = 0.1


@dataclass
class ImageData:
    """Splits of one dataset: images (:class:`~pyrovae.data.ImageSet`, ``(N, C, H, W)``) with int64 labels ``(N,)``.

    ``train``, ``test`` and ``val`` may be given as tensors (``uint8`` 0-255 or float in [0, 1]); they
    become :class:`~pyrovae.data.ImageSet` s. ``images[i:j]`` of a split is a float batch on its device.
    Labels are ``None`` for unlabelled images; ``val`` and ``val_labels`` are ``None`` without a
    validation split. ``binarization`` is ``None`` (grey levels), ``"static"`` or ``"dynamic"`` (see
    the module docs): with ``"dynamic"``, ``train`` keeps its grey levels and :func:`batches` draws
    every training batch anew, while ``test`` and ``val`` are binary already. ``class_names`` name
    the labels (class folders; torchvision's classes); ``skipped`` lists unreadable files left out.
    """

    name: str
    train: ImageSet
    train_labels: Tensor | None
    test: ImageSet
    test_labels: Tensor | None
    val: ImageSet | None = None
    val_labels: Tensor | None = None
    binarization: str | None = None
    class_names: tuple[str, ...] | None = None
    skipped: tuple[str, ...] = ()

    def __post_init__(self):
        for split in ("train", "test", "val"):
            images, labels = getattr(self, split), getattr(self, f"{split}_labels")
            if images is None:
                if split != "val":
                    raise InputError(f"ImageData needs {split} images")
                continue
            images = as_image_set(images)
            setattr(self, split, images)
            if labels is not None and len(labels) != len(images):
                raise InputError(f"{split}_labels must be one per image: {len(images)} images, {len(labels)} labels")

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.train.image_shape

    @property
    def labelled(self) -> bool:
        """Whether the images come with labels."""
        return self.train_labels is not None

    @property
    def dynamic_binarization(self) -> bool:
        """Whether training batches are drawn anew from the grey levels of ``train``."""
        return self.binarization == "dynamic"

    @property
    def protocol(self) -> str:
        """How the test images were made, in words: what an evaluation of this data measures."""
        if self.binarization is None:
            return "pixel values in [0, 1] (not binarized)"
        return (f"{self.binarization} binarization; test and validation images binarized once with seed "
                f"{EVAL_BINARIZATION_SEED}")


def _check_options(binarize, subset, val_size, storage) -> None:
    if binarize not in BINARIZATION:
        raise InputError(f"binarize must be one of {BINARIZATION}, got {binarize!r}")
    if subset is not None and subset <= 0:
        raise InputError(f"subset must be a positive number of images, got {subset}")
    if val_size < 0:
        raise InputError(f"val_size must be non-negative, got {val_size}")
    if storage not in STORAGES:
        raise InputError(f"storage must be one of {STORAGES}, got {storage!r}")


def load_dataset(
    name: str = "mnist",
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    binarize: str | None = None,
    val_size: int = 0,
    subset: int | None = None,
    seed: int = 0,
    *,
    image_size: int | None = None,
    channels: int | None = None,
    storage: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`), its images kept as ``uint8`` in ``storage`` with batches on ``device``.

    binarize: ``None`` keeps grey levels in ``[0, 1]``; ``"static"`` draws the training images
        ``x ~ Bernoulli(pixel)`` once with ``seed``; ``"dynamic"`` leaves them grey and has
        :func:`batches` draw anew each batch. Either way the test and validation images are drawn
        once with :data:`EVAL_BINARIZATION_SEED` (see the module docs).
    val_size: images taken (at random, with ``seed``) from the training set for validation.
    subset: keep at most this many images of each split (training: the first after shuffling with ``seed``;
        test: its first ones).
    image_size, channels: resize (shorter side, then the centre crop) and convert the images; CelebA is
        the centre 148 x 148 crop of its faces resized to ``image_size`` (default 64), prepared once into
        the cache in ``cache_dir`` (see :mod:`pyrovae.data.sources`).
    storage: where the images live (see :mod:`pyrovae.data.storage`): ``"auto"``, ``"device"``, ``"host"`` or ``"mmap"``.
    """
    name = name.lower().replace("-", "_")
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose from {DATASETS}")
    _check_options(binarize, subset, val_size, storage)
    device = resolve_device(device)
    root = Path(root) if root is not None else default_data_dir()
    if name == "celeba":
        if channels not in (None, 3):
            raise InputError("celeba's faces are in colour: channels must be 3")
        train = read_celeba(root, "train", image_size, cache_dir, num_workers, progress)
        test = read_celeba(root, "test", image_size, cache_dir, num_workers, progress)
    else:
        train, test = read_torchvision(name, root, train=True), read_torchvision(name, root, train=False)
        if image_size is not None or channels is not None:
            train = _converted(train, image_size, channels, name)
            test = _converted(test, image_size, channels, name)
    return _splits(name, train, test, device, binarize, val_size, subset, seed, storage)


def _converted(source: Source, image_size, channels, name: str) -> Source:
    converted = from_tensor(source.images, source.labels, image_size, channels, where=name)
    converted.class_names = source.class_names
    return converted


def _read_any(source, labels, image_size, channels, skip_unreadable, cache_dir, num_workers, progress, what: str) -> Source:
    """A :class:`Source` from a path, a tensor or array, or a torch Dataset."""
    if isinstance(source, (str, os.PathLike)):
        if labels is not None:
            raise InputError(f"labels are given with images in memory; the {what} images of {source} bring their own")
        return read_path(source, image_size, channels, skip_unreadable, cache_dir, progress)
    if isinstance(source, (Tensor, np.ndarray)):
        return from_tensor(source, labels, image_size, channels, where=f"the {what} images")
    if isinstance(source, torch.utils.data.Dataset):
        if labels is not None:
            raise InputError(f"a Dataset yields its own labels ((image, label) items): pass no {what} labels with it")
        return read_dataset(source, image_size, channels, num_workers, progress=progress, description=f"the {what} Dataset")
    raise InputError(f"the {what} images must be a folder or array file path, a tensor or NumPy array, or a torch Dataset; "
                     f"got {type(source).__name__}")


def load_images(
    source,
    test=None,
    *,
    labels: Tensor | None = None,
    test_labels: Tensor | None = None,
    test_fraction: float = TEST_FRACTION,
    image_size: int | None = None,
    channels: int | None = None,
    device: str | torch.device = "cpu",
    binarize: str | None = None,
    val_size: int = 0,
    subset: int | None = None,
    seed: int = 0,
    storage: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    skip_unreadable: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    name: str | None = None,
) -> ImageData:
    """Your own images as an :class:`ImageData`: a folder or an array file (a path), images in memory, or a torch Dataset.

    source: a folder of images (class subfolders give labels, a flat folder none), an ``.npy``,
        ``.npz`` or ``.pt`` file, a ``uint8`` or float tensor or NumPy array ``(N, H, W)``,
        ``(N, H, W, C)`` or ``(N, C, H, W)`` (with ``labels``), or a map-style torch Dataset of images or
        ``(image, label)`` pairs, read once through a DataLoader with ``num_workers`` workers (see
        :mod:`pyrovae.data.sources`).
    test: the test images, of any of the same kinds (``test_labels`` with a tensor); without them
        ``test_fraction`` of the images are held out with :data:`TEST_SPLIT_SEED`.
    image_size, channels, skip_unreadable, cache_dir: how images are prepared (see :mod:`pyrovae.data.sources`).
    binarize, val_size, subset, seed, storage, device: as for :func:`load_dataset`.
    """
    _check_options(binarize, subset, val_size, storage)
    device = resolve_device(device)
    train = _read_any(source, labels, image_size, channels, skip_unreadable, cache_dir, num_workers, progress, "training")
    if test is None:
        if test_labels is not None:
            raise InputError("test_labels were given without test images")
        if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
            raise InputError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
        train, test = _held_out(train, test_fraction)
    else:
        test = _read_any(test, test_labels, image_size, channels, skip_unreadable, cache_dir, num_workers, progress, "test")
        _check_same_kind(train, test)
    name = name or (Path(source).name if isinstance(source, (str, os.PathLike)) else type(source).__name__)
    return _splits(name, train, test, device, binarize, val_size, subset, seed, storage)


def _held_out(source: Source, fraction: float) -> tuple[Source, Source]:
    """The images of ``source`` not held out, and the ``fraction`` held out (drawn with :data:`TEST_SPLIT_SEED`), each in file order."""
    n = len(source)
    n_test = max(1, round(n * fraction))
    if n_test >= n:
        raise InputError(f"holding out {fraction:g} of {n} images for testing leaves none for training")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(TEST_SPLIT_SEED))
    images = ImageSet(source.images)
    parts = []
    for rows in (order[n_test:].sort().values, order[:n_test].sort().values):
        part = images.select(rows)
        parts.append(Source(part if isinstance(part.images, np.ndarray) and part.storage == "mmap" else part.images,
                            None if source.labels is None else source.labels[rows], source.class_names, source.skipped, source.cache))
    return parts[0], parts[1]


def _check_same_kind(train: Source, test: Source) -> None:
    if train.images.shape[1:] != test.images.shape[1:]:
        raise InputError(f"the training images are {tuple(train.images.shape[1:])} and the test images {tuple(test.images.shape[1:])}: "
                         "give --image-size (and --channels) so that both are prepared alike")
    if (train.labels is None) != (test.labels is None):
        labelled, other = ("training", "test") if train.labels is not None else ("test", "training")
        raise InputError(f"the {labelled} images have labels and the {other} images none: give both class subfolders, or neither")
    if train.class_names is not None and test.class_names is not None and train.class_names != test.class_names:
        raise InputError(f"the class folders of the test images ({', '.join(test.class_names)}) differ from those of the training "
                         f"images ({', '.join(train.class_names)})")


def _image_set(images) -> ImageSet:
    return images if isinstance(images, ImageSet) else ImageSet(images)


def _splits(name, train: Source, test: Source, device, binarize, val_size, subset, seed, storage) -> ImageData:
    """The splits of ``train`` and ``test`` as the module docs say, placed on ``device`` in ``storage``."""
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = _image_set(train.images), train.labels
    test_x, test_y = _image_set(test.images), test.labels
    if binarize is not None:  # drawn on the whole sets, before any split or subset, with the fixed seed
        evaluation = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
        test_x = ImageSet(binarized(test_x.stored(), evaluation))
    order = torch.randperm(len(train_x), generator=generator)
    read_order = train_x
    train_x = train_x.select(order)
    train_y = None if train_y is None else train_y[order]
    val_x = val_y = None
    if val_size:
        if val_size >= len(train_x):
            raise InputError(f"val_size={val_size} leaves no training images (the training set has {len(train_x)})")
        val_x, val_y = train_x.select(slice(len(train_x) - val_size, None)), None if train_y is None else train_y[-val_size:]
        if binarize is not None:  # the validation images of the whole training set, drawn after the test set
            val_x = ImageSet(binarized(read_order.stored(), evaluation)[order[-val_size:]])
        train_x, train_y = train_x.select(slice(0, len(train_x) - val_size)), None if train_y is None else train_y[:-val_size]
    if subset is not None:
        train_x, test_x = train_x.select(slice(0, subset)), test_x.select(slice(0, subset))
        train_y = None if train_y is None else train_y[:subset]
        test_y = None if test_y is None else test_y[:subset]
        if val_x is not None:
            val_x, val_y = val_x.select(slice(0, subset)), None if val_y is None else val_y[:subset]

    if binarize == "static":
        train_x = ImageSet(binarized(train_x.stored(), generator))

    def place(images: ImageSet | None) -> ImageSet | None:
        return None if images is None else ImageSet.place(images, device, storage)

    def to_device(labels: Tensor | None) -> Tensor | None:
        return None if labels is None else labels.to(device)

    return ImageData(
        name=name,
        train=place(train_x),
        train_labels=to_device(train_y),
        test=place(test_x),
        test_labels=to_device(test_y),
        val=place(val_x),
        val_labels=to_device(val_y),
        binarization=binarize,
        class_names=train.class_names,
        skipped=tuple(sorted(set(train.skipped) | set(test.skipped))),
    )
