"""Where the images of one split live, and how any of them reach the training device as floats.

An :class:`ImageSet` holds ``N`` images ``(N, C, H, W)``, stored as ``uint8`` (0..255) or as floats,
in one of three places:

* ``"device"``: one tensor on the training device (MNIST on a GPU: 47 MB of ``uint8``);
* ``"host"``: one tensor in host memory; under CUDA each batch is gathered into pinned memory and
  copied without blocking (``non_blocking=True``), so the copy overlaps the previous step;
* ``"mmap"``: a memory map of an ``.npy`` file (the preparation cache, or the user's own array),
  read batch by batch: only the pages a batch touches are read, and they stay in the page cache,
  not in the process's own memory.

Images stay in their stored dtype until a batch is drawn: ``images[index]`` gathers the rows,
moves them to the device and only then makes floats, ``uint8`` ``k`` becoming exactly the float32
nearest ``k / 255`` (a correctly rounded division, the bins ``k/255`` of 8-bit data); float
images are returned as they are. :meth:`ImageSet.place` chooses the place (``storage="auto"``):
the device when the images take at most :data:`DEVICE_SHARE` of its free memory, else host memory
when they take at most :data:`HOST_SHARE` of the available memory, else the memory map (the
images of a memory map that fits are read into memory).
"""

from __future__ import annotations

import math
import os
from typing import Union

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError

__all__ = ["ImageSet", "STORAGES", "DEVICE_SHARE", "HOST_SHARE", "available_host_memory", "as_image_set"]

#: where images can live; ``"auto"`` chooses (see the module docs)
STORAGES = ("auto", "device", "host", "mmap")
#: largest share of a CUDA device's free memory that ``storage="auto"`` fills with images
DEVICE_SHARE = 0.5
#: largest share of the host's available memory that ``storage="auto"`` fills with images
HOST_SHARE = 0.5

Index = Union[int, slice, Tensor, list, np.ndarray]


def available_host_memory() -> int:
    """Bytes of memory the host can give without swapping (``MemAvailable`` of ``/proc/meminfo``; elsewhere the
    physical memory)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _free_device_memory(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return free


class ImageSet:
    """``N`` images ``(N, C, H, W)`` (``uint8`` or float) stored on ``device``, in host memory or in a memory map,
    drawn as float batches on ``device``.

    ``images`` is a tensor (on any device) or a NumPy array (a ``numpy.memmap`` for a memory map).
    Indexing gives floats on ``device``: ``images[i:j]`` ``(j - i, C, H, W)``, ``images[index]`` for an
    int64 tensor of rows, ``images[k]`` one image ``(C, H, W)``, and ``images[:]`` all of them.
    :meth:`take` gives the stored dtype instead, :meth:`select` a view of some rows (no copy).
    """

    def __init__(self, images: Tensor | np.ndarray, device: str | torch.device | None = None):
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 and images.dtype != np.float32:
                raise InputError(f"stored images are uint8 or float32, got {images.dtype} of shape {tuple(images.shape)}")
        elif isinstance(images, Tensor):
            if images.dtype != torch.uint8 and not images.is_floating_point():
                raise InputError(f"images are uint8 (0-255) or float (in [0, 1]), got {images.dtype} of shape {tuple(images.shape)}")
        else:
            raise InputError(f"images are a tensor or a NumPy array (N, C, H, W), got {type(images).__name__}")
        if images.ndim != 4:
            raise InputError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        self.images = images
        self.device = torch.device(device) if device is not None else (images.device if isinstance(images, Tensor) else torch.device("cpu"))

    # ------------------------------------------------------------------ what it is

    @property
    def storage(self) -> str:
        """``"device"`` (an accelerator's memory), ``"host"`` (host memory, which is the device of a CPU run) or ``"mmap"``."""
        if isinstance(self.images, np.ndarray):
            return "mmap" if isinstance(self.images, np.memmap) or _is_mapped(self.images) else "host"
        return "host" if self.images.device.type == "cpu" else "device"

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        """``(N, C, H, W)``."""
        return tuple(self.images.shape)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)``."""
        return tuple(self.images.shape[1:])

    @property
    def stored_dtype(self) -> torch.dtype:
        """``torch.uint8`` or the float dtype the images are stored in."""
        return self.images.dtype if isinstance(self.images, Tensor) else torch.from_numpy(np.empty(0, self.images.dtype)).dtype

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the batches: float32 for ``uint8`` images, else the stored one."""
        stored = self.stored_dtype
        return torch.float32 if stored == torch.uint8 else stored

    @property
    def resident_bytes(self) -> int:
        """Bytes the images take in memory (of the device or the host); 0 for a memory map (the page cache holds them)."""
        if self.storage == "mmap":
            return 0
        return math.prod(self.shape) * self.stored_dtype.itemsize

    @property
    def index_device(self) -> torch.device:
        """Where row indices go for :meth:`take`: the tensor's device, or the CPU for a NumPy array."""
        return self.images.device if isinstance(self.images, Tensor) else torch.device("cpu")

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} images {self.image_shape}, {self.stored_dtype}, {self.storage}, batches on {self.device})"

    # ------------------------------------------------------------------ reading

    def take(self, index: Index) -> Tensor:
        """The images at ``index`` (a slice, an int64 tensor or list of rows, or one row) in their stored dtype, on the device.

        From host memory under CUDA they are gathered into pinned memory and copied without blocking.
        """
        images = self.images
        if isinstance(index, list):
            index = torch.tensor(index, dtype=torch.int64)
        if isinstance(images, np.ndarray):
            if isinstance(index, Tensor):
                index = index.cpu().numpy()
            batch = torch.from_numpy(np.array(images[index]))  # a copy: a memory map's pages are read now
        else:
            if isinstance(index, Tensor):
                index = index.to(images.device)
            batch = images[index]
        if batch.device == self.device:
            return batch
        if self.device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def __getitem__(self, index: Index) -> Tensor:
        """Float images on the device: ``uint8`` ``k`` is ``k / 255``, float images as they are."""
        return to_float(self.take(index))

    def __iter__(self):
        raise TypeError("iterate over an ImageSet with pyrovae.data.batches(images, batch_size), or take images[:] (all of it, as floats)")

    def select(self, index: slice | Tensor) -> "ImageSet":
        """The images at ``index`` (a slice: a view; a tensor of rows: a copy, or a view of a memory map's rows)."""
        if isinstance(index, slice):
            return ImageSet(self.images[index], self.device)
        if isinstance(self.images, np.ndarray) and self.storage == "mmap":
            return _RowsOfMap(self.images, index.cpu().numpy(), self.device)
        return ImageSet(self.take_stored(index), self.device)

    def take_stored(self, index: Tensor) -> Tensor | np.ndarray:
        """The images at ``index`` where they are stored (a copy)."""
        if isinstance(self.images, np.ndarray):
            return np.ascontiguousarray(self.images[index.cpu().numpy()])
        return self.images[index.to(self.images.device)]

    def stored(self) -> Tensor:
        """All images as one tensor in their stored dtype, on the CPU (reads a memory map in full)."""
        if isinstance(self.images, np.ndarray):
            return torch.from_numpy(np.array(self.images))
        return self.images.cpu()

    # ------------------------------------------------------------------ placing

    def to(self, device: str | torch.device, storage: str = "auto") -> "ImageSet":
        """These images with batches on ``device``, stored as ``storage`` says (see :meth:`place`)."""
        return ImageSet.place(self, device, storage)

    @classmethod
    def place(cls, images: "ImageSet | Tensor | np.ndarray", device: str | torch.device, storage: str = "auto") -> "ImageSet":
        """``images`` with batches drawn on ``device``, stored in ``storage`` (one of :data:`STORAGES`).

        ``"auto"``: on ``device`` when they fit in :data:`DEVICE_SHARE` of its free memory (always
        on the CPU when it is the device, unless they are a memory map larger than
        :data:`HOST_SHARE` of the available memory); else in host memory when they fit in
        :data:`HOST_SHARE` of the available memory; else a memory map (which they must be then).
        ``"mmap"`` needs images that are a memory map already (a prepared cache or an ``.npy`` file).
        """
        if storage not in STORAGES:
            raise InputError(f"storage must be one of {STORAGES}, got {storage!r}")
        source = images if isinstance(images, ImageSet) else ImageSet(images)
        device = torch.device(device)
        size = len(source) * math.prod(source.image_shape) * source.stored_dtype.itemsize
        mapped = source.storage == "mmap"
        if storage == "auto":
            fits_host = size <= HOST_SHARE * available_host_memory()
            if device.type == "cuda":
                storage = "device" if size <= DEVICE_SHARE * _free_device_memory(device) else "host" if fits_host or not mapped else "mmap"
            else:
                storage = "host" if fits_host or not mapped else "mmap"
        if storage == "mmap":
            if not mapped:
                raise InputError("storage='mmap' reads images from a memory-mapped file: load them from a folder or an .npy file (prepared into a cache)")
            return ImageSet(source.images, device) if type(source) is ImageSet else _RowsOfMap(source.images, source.rows, device)
        if storage == "device":
            return ImageSet(_read_all(source).to(device), device)
        if isinstance(source.images, Tensor) and source.images.device.type == "cpu" and type(source) is ImageSet:
            return ImageSet(source.images, device)
        return ImageSet(_read_all(source), device)


class _RowsOfMap(ImageSet):
    """Some rows (``rows``, an int64 array) of a memory-mapped array, read only when a batch is drawn."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, device: str | torch.device):
        super().__init__(images, device)
        self.rows = np.asarray(rows, dtype=np.int64)

    @property
    def storage(self) -> str:
        return "mmap"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.images.shape[1:])

    def _rows(self, index) -> np.ndarray:
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        elif isinstance(index, list):
            index = np.asarray(index, dtype=np.int64)
        return self.rows[index]

    def take(self, index: Index) -> Tensor:
        rows = self._rows(index)
        batch = torch.from_numpy(np.array(self.images[rows]))
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch.to(self.device)

    def select(self, index) -> ImageSet:
        rows = self.rows[index] if isinstance(index, slice) else self._rows(index)
        return _RowsOfMap(self.images, rows, self.device)

    def take_stored(self, index: Tensor) -> np.ndarray:
        return np.ascontiguousarray(self.images[self._rows(index)])

    def stored(self) -> Tensor:
        return torch.from_numpy(np.array(self.images[self.rows]))


def _is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is (a view of) a ``numpy.memmap``."""
    base = array
    while base is not None:
        if isinstance(base, np.memmap):
            return True
        base = getattr(base, "base", None)
    return False


def _read_all(source: ImageSet) -> Tensor:
    """All of ``source``'s images as one CPU tensor, read in chunks (from a memory map: sequentially where possible)."""
    if isinstance(source.images, Tensor) and type(source) is ImageSet:
        return source.images
    return source.stored()


def to_float(batch: Tensor) -> Tensor:
    """``uint8`` images as float32 ``k / 255`` (correctly rounded), float images as they are."""
    if batch.dtype == torch.uint8:
        return batch.to(torch.float32).div_(255.0)
    return batch


def as_image_set(images: "ImageSet | Tensor", device: str | torch.device | None = None) -> ImageSet:
    """``images`` as an :class:`ImageSet` (a tensor's batches on its own device unless ``device`` says otherwise)."""
    if isinstance(images, ImageSet):
        return images if device is None or torch.device(device) == images.device else images.to(device)
    if not isinstance(images, Tensor):
        raise InputError(f"expected images as a tensor (N, C, H, W) or an ImageSet, got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if device is not None:
        images = images.to(device)
    return ImageSet(images)
