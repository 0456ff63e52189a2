"""Where images come from and how batches of them reach the device.

* :mod:`.sources`: torchvision datasets by name, CelebA, folders of images, array files and torch
  Datasets, as ``uint8`` images ``(N, C, H, W)`` with labels and class names; decoding and resizing
  done once, into an atomic cache.
* :mod:`.storage`: :class:`ImageSet`, the images of one split on the device, in host memory or in a
  memory map, turned into floats only when a batch is drawn.
* :mod:`.batches`: seeded permutations, dynamic binarization per batch, this rank's shard.
* :mod:`.splits`: :class:`ImageData` (training, test, validation), :func:`load_dataset`,
  :func:`load_images`, and the binarized evaluation protocol.
"""

from .batches import batches, binarized, shard_bounds
from .sources import (
    CELEBA_CROP,
    DATASETS,
    TORCHVISION_DATASETS,
    DatasetNotFoundError,
    default_cache_dir,
    default_data_dir,
    image_extensions,
)
from .sources import _locked  # noqa: F401 - tests hold the data folder's lock as another process would
from .splits import BINARIZATION, EVAL_BINARIZATION_SEED, TEST_FRACTION, TEST_SPLIT_SEED, ImageData, load_dataset, load_images
from .storage import STORAGES, ImageSet

__all__ = [
    "ImageData", "ImageSet", "load_dataset", "load_images", "batches", "binarized", "shard_bounds",
    "DATASETS", "TORCHVISION_DATASETS", "BINARIZATION", "STORAGES", "EVAL_BINARIZATION_SEED", "TEST_SPLIT_SEED",
    "TEST_FRACTION", "CELEBA_CROP", "DatasetNotFoundError", "default_data_dir", "default_cache_dir", "image_extensions",
]
