"""Image datasets as tensors on a device, and seeded minibatches by index slicing.

A dataset is read once through torchvision into ``uint8`` arrays, turned into float
tensors ``(N, C, H, W)`` with pixels in ``[0, 1]`` and moved to the device; training then
slices it by shuffled indices, without a per-item ``DataLoader``.

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
images, so a subset holds the same binary images as the full set.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor

from .devices import resolve_device
from .errors import InputError

__all__ = ["ImageData", "DATASETS", "load_dataset", "batches", "default_data_dir", "DatasetNotFoundError"]

DATASETS = ("mnist", "fashion_mnist", "kmnist", "cifar10")
BINARIZATION = (None, "static", "dynamic")
#: seed of the single Bernoulli draw that binarizes the test and validation images of a binarized run
EVAL_BINARIZATION_SEED = 0


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not in the data folder and could not be downloaded."""


def default_data_dir() -> Path:
    """``$PYROVAE_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("PYROVAE_DATA", "data"))


@dataclass
class ImageData:
    """Splits of one dataset, each ``(N, C, H, W)`` float in ``[0, 1]`` with labels ``(N,)`` int64.

    ``val`` and ``val_labels`` are ``None`` without a validation split. ``binarization`` is
    ``None`` (grey levels), ``"static"`` or ``"dynamic"`` (see the module docs): with
    ``"dynamic"``, ``train`` keeps its grey levels and :func:`batches` draws every training batch
    anew, while ``test`` and ``val`` are binary already.
    """

    name: str
    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    val: Tensor | None = None
    val_labels: Tensor | None = None
    binarization: str | None = None

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train.shape[1:])

    @property
    def dynamic_binarization(self) -> bool:
        """Whether training batches are drawn anew from the grey levels of ``train``."""
        return self.binarization == "dynamic"

    @property
    def protocol(self) -> str:
        """How the test images were made, in words: what an evaluation of this data measures."""
        if self.binarization is None:
            return "grey levels in [0, 1] (not binarized)"
        return (f"{self.binarization} binarization; test and validation images binarized once with seed "
                f"{EVAL_BINARIZATION_SEED}")


def _torchvision_class(name: str):
    import torchvision.datasets as tvd

    return {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "kmnist": tvd.KMNIST, "cifar10": tvd.CIFAR10}[name]


def _expected_files(dataset_class, root: Path) -> tuple[Path, list[str]]:
    if hasattr(dataset_class, "resources"):  # MNIST family
        folder = root / dataset_class.__name__ / "raw"
        return folder, [os.path.basename(url) for url, _ in dataset_class.resources]
    return root, [dataset_class.filename]  # CIFAR-10: one archive


@contextmanager
def _locked(directory: Path):
    """Hold an exclusive lock on ``directory`` (``flock`` on its descriptor; nothing is written there), so
    processes that load a dataset at the same moment (parallel runs, distributed ranks) take turns:
    torchvision unpacks the ``.gz`` files on first use, and a second process would otherwise read
    them half-written. Where the platform has no ``flock`` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # and with it the lock


def _read(name: str, root: Path, train: bool) -> tuple[Tensor, Tensor]:
    """uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)`` of one split, read via torchvision."""
    dataset_class = _torchvision_class(name)
    folder, files = _expected_files(dataset_class, root)
    missing = []  # folders a failed download may create, deepest first
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    try:
        with _locked(path):  # the deepest folder that exists
            ds = dataset_class(root=str(root), train=train, download=True)
    except Exception as error:  # torchvision raises URLError, RuntimeError, ... when offline
        for path in missing:  # leave no empty folders behind, and none that were there before
            if not path.is_dir() or any(path.iterdir()):
                break
            path.rmdir()
        reason = " ".join(str(error).split())
        raise DatasetNotFoundError(
            f"{name} is not in {folder} and could not be downloaded ({type(error).__name__}: {reason}). "
            f"Put {', '.join(files)} in {folder} (as torchvision lays them out), or point "
            "root (--data-dir, $PYROVAE_DATA) at a folder that holds them."
        ) from None
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)  # (N, C, H, W)
    return images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64)


def load_dataset(
    name: str = "mnist",
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    binarize: str | None = None,
    val_size: int = 0,
    subset: int | None = None,
    seed: int = 0,
) -> ImageData:
    """Load ``name`` (one of :data:`DATASETS`) into tensors on ``device``.

    binarize: ``None`` keeps grey levels in ``[0, 1]``; ``"static"`` draws the training images
        ``x ~ Bernoulli(pixel)`` once with ``seed``; ``"dynamic"`` leaves them grey and has
        :func:`batches` draw anew each batch. Either way the test and validation images are drawn
        once with :data:`EVAL_BINARIZATION_SEED` (see the module docs).
    val_size: images taken (at random, with ``seed``) from the training set for validation.
    subset: keep at most this many images of each split (training: the first after shuffling with ``seed``;
        test: its first ones).
    """
    name = name.lower().replace("-", "_")
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose from {DATASETS}")
    if binarize not in BINARIZATION:
        raise InputError(f"binarize must be one of {BINARIZATION}, got {binarize!r}")
    if subset is not None and subset <= 0:
        raise InputError(f"subset must be a positive number of images, got {subset}")
    if val_size < 0:
        raise InputError(f"val_size must be non-negative, got {val_size}")
    device = resolve_device(device)
    root = Path(root) if root is not None else default_data_dir()

    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = _read(name, root, train=True)
    test_x, test_y = _read(name, root, train=False)
    if binarize is not None:  # drawn on the whole sets, before any split or subset, with the fixed seed
        evaluation = torch.Generator().manual_seed(EVAL_BINARIZATION_SEED)
        test_x = _binarized(test_x, evaluation)
    order = torch.randperm(len(train_x), generator=generator)
    read_order = train_x
    train_x, train_y = train_x[order], train_y[order]
    val_x = val_y = None
    if val_size:
        if val_size >= len(train_x):
            raise InputError(f"val_size={val_size} leaves no training images (the training set has {len(train_x)})")
        val_x, val_y = train_x[-val_size:], train_y[-val_size:]
        if binarize is not None:  # the validation images of the whole training set, drawn after the test set
            val_x = _binarized(read_order, evaluation)[order[-val_size:]]
        train_x, train_y = train_x[:-val_size], train_y[:-val_size]
    if subset is not None:
        train_x, train_y, test_x, test_y = train_x[:subset], train_y[:subset], test_x[:subset], test_y[:subset]
        if val_x is not None:
            val_x, val_y = val_x[:subset], val_y[:subset]

    if binarize == "static":
        train_x = _binarized(train_x, generator)

    def to_float(images: Tensor | None) -> Tensor | None:
        return None if images is None else images.to(device=device, dtype=torch.float32).div_(255.0)

    def to_device(labels: Tensor | None) -> Tensor | None:
        return None if labels is None else labels.to(device)

    return ImageData(
        name=name,
        train=to_float(train_x),
        train_labels=to_device(train_y),
        test=to_float(test_x),
        test_labels=to_device(test_y),
        val=to_float(val_x),
        val_labels=to_device(val_y),
        binarization=binarize,
    )


def _binarized(images: Tensor, generator: torch.Generator) -> Tensor:
    """One draw ``Bernoulli(pixels / 255)`` of ``uint8`` images ``(N, C, H, W)``, as ``uint8`` 0 or 255."""
    return torch.bernoulli(images.float().div_(255.0), generator=generator).to(torch.uint8).mul_(255)


def batches(
    x: Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    binarize: bool = False,
    labels: Tensor | None = None,
) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
    """Yield minibatches ``(b, C, H, W)`` of ``x: (N, C, H, W)``, sliced by (shuffled) index.

    The permutation is drawn on the CPU from ``generator`` (seed it for repeatable epochs) and
    the last batch may be smaller. ``binarize`` draws ``Bernoulli(pixels)`` for each batch
    (dynamic binarization), also from ``generator``. With ``labels: (N, ...)`` each batch comes
    with its labels, ``(images, labels)``, sliced by the same indices; the labels draw nothing
    from ``generator``, so the images are those of a run without labels.
    """
    n = len(x)
    if n == 0:
        raise InputError("cannot make batches of an empty dataset")
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}")
    if labels is not None and len(labels) != n:
        raise InputError(f"labels must be one per image: {n} images, {len(labels)} labels")
    if shuffle:
        index = torch.randperm(n, generator=generator).to(x.device)
    for start in range(0, n, batch_size):
        where = index[start : start + batch_size] if shuffle else slice(start, start + batch_size)
        batch = x[where]
        if binarize:
            noise = torch.rand(batch.shape, generator=generator).to(batch.device)
            batch = (noise < batch).to(batch.dtype)
        if labels is None:
            yield batch
        else:
            yield batch, labels[where.to(labels.device) if shuffle else where]
