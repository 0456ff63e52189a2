"""Where images come from: torchvision datasets by name, CelebA, a folder of images, an array file, a torch Dataset.

Every source becomes the same thing, a :class:`Source`: images ``(N, C, H, W)`` (``uint8``, or
float32 in ``[0, 1]`` for float arrays, which are never quantized), int64 labels ``(N,)`` or
``None``, and the class names.

**Preparation, done once.** Decoding, resizing and channel conversion of a folder, CelebA or an
array file that is not ``(N, C, H, W)`` already happen once, into a cache: ``images.npy`` (read
later as a memory map), ``labels.npy`` and ``source.json``, in
``CACHE_DIR/<name>-<hash of the path>/<hash of the contents and options>/``. The contents are
the listing of the folder (every image's path, size and modification time) or the file's size
and modification time, so a changed folder or other options prepare anew, and an unchanged one
is read from the cache. Each file is written atomically (:func:`pyrovae.checkpoints.write_atomic`)
and ``source.json`` last, which is what makes a cache entry: an interrupted preparation leaves no
entry, at most a whole ``images.npy`` that the next preparation writes again.

**Resizing** (``image_size=S``): the shorter side to ``S`` (antialiased bilinear), then the
centre ``S x S`` crop, with torchvision's ``Resize`` and ``CenterCrop``. **Channels**
(``channels=1`` or ``3``): Pillow's conversions ``"L"`` and ``"RGB"`` (for arrays: the ITU-R
601-2 luma of ``"L"``, or the grey channel repeated); by default 3 if any image has colour, else 1.

**Folders** follow torchvision's ``ImageFolder`` layout: class subfolders give the labels and
class names (``find_classes``, ``make_dataset``); a flat folder gives unlabelled images. Files
are those Pillow reads (by extension). **Arrays**: ``.npy`` (memory-mapped), ``.npz`` with ``x``
and optional ``y``, ``.pt`` holding a tensor or ``{"x": ..., "y": ...}``; shapes ``(N, H, W)``,
``(N, H, W, C)`` or ``(N, C, H, W)`` with ``C`` 1 or 3; ``uint8`` 0-255 or float in ``[0, 1]``.
An array that is ``(N, C, H, W)`` already, with the wanted size and channels, is used as it is
(an ``.npy`` file as a memory map), without a cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..checkpoints import write_atomic, write_text_atomic
from ..errors import InputError

__all__ = [
    "Source", "DatasetNotFoundError", "TORCHVISION_DATASETS", "DATASETS", "CELEBA_CROP", "CACHE_VERSION",
    "default_data_dir", "default_cache_dir", "image_extensions", "read_torchvision", "read_celeba",
    "read_folder", "read_array", "read_dataset", "read_path", "from_tensor",
]

TORCHVISION_DATASETS = ("mnist", "fashion_mnist", "kmnist", "cifar10")
#: the datasets pyrovae knows by name
DATASETS = (*TORCHVISION_DATASETS, "celeba")
#: the side of the centre crop of CelebA's 178 x 218 aligned faces that is then resized (64 x 64 by default)
CELEBA_CROP = 148
#: the layout of a cache entry; another version prepares anew
CACHE_VERSION = 1
#: Pillow's modes of images without colour
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_ARRAY_SUFFIXES = (".npy", ".npz", ".pt", ".pth")


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are not in the data folder and could not be downloaded."""


def default_data_dir() -> Path:
    """``$PYROVAE_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("PYROVAE_DATA", "data"))


def default_cache_dir() -> Path:
    """``$PYROVAE_CACHE`` if set, else the ``cache`` folder of :func:`default_data_dir`."""
    return Path(os.environ["PYROVAE_CACHE"]) if os.environ.get("PYROVAE_CACHE") else default_data_dir() / "cache"


@dataclass
class Source:
    """Images of one source, ready for :class:`pyrovae.data.ImageSet`.

    images:      ``(N, C, H, W)``: a ``uint8`` (or float32) tensor, or a NumPy array (a memory map of a cache).
    labels:      int64 ``(N,)``, or ``None`` for unlabelled images.
    class_names: the name of each label (the class folders), or ``None``.
    skipped:     files left out because they could not be read (only with ``skip_unreadable``).
    cache:       the cache entry the images were read from, if any.
    """

    images: Tensor | np.ndarray
    labels: Tensor | None = None
    class_names: tuple[str, ...] | None = None
    skipped: tuple[str, ...] = ()
    cache: Path | None = None
    description: str = field(default="")

    def __len__(self) -> int:
        return self.images.shape[0]


# --------------------------------------------------------------------------- torchvision datasets by name


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


def read_torchvision(name: str, root: Path, train: bool) -> Source:
    """``uint8`` images ``(N, C, H, W)`` and int64 labels ``(N,)`` of one split of a :data:`TORCHVISION_DATASETS` name."""
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
    return Source(images.contiguous(), torch.as_tensor(ds.targets, dtype=torch.int64), tuple(ds.classes), description=name)


# --------------------------------------------------------------------------- the cache


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_entry(cache_dir: Path | None, name: str, identity: str, contents) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{name}-{_digest(identity)[:8]}" / _digest({"version": CACHE_VERSION, "contents": contents})


def _read_cache(entry: Path) -> Source | None:
    """The source cached in ``entry``, or ``None`` when there is no complete entry."""
    try:
        meta = json.loads((entry / "source.json").read_text())
        images = np.load(entry / "images.npy", mmap_mode="r")
        labels = torch.from_numpy(np.load(entry / "labels.npy")) if meta["labelled"] else None
    except (OSError, ValueError, KeyError):
        return None
    if list(images.shape) != meta["shape"]:
        return None
    names = tuple(meta["class_names"]) if meta["class_names"] is not None else None
    return Source(images, labels, names, tuple(meta["skipped"]), entry, meta["description"])


def _write_cache(entry: Path, shape: tuple[int, ...], dtype: np.dtype, chunks, labels: Tensor | None,
                 class_names, skipped, description: str) -> Source:
    """Write the images (``chunks`` yields ``(N_i, C, H, W)`` arrays that add up to ``shape``) and the rest atomically;
    ``source.json`` last. Returns the cached source (its images memory-mapped)."""
    def write_images(file):
        np.lib.format.write_array_header_2_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)})
        written = 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            file.write(chunk.tobytes())
            written += len(chunk)
        if written != shape[0]:  # a bug, not the user's: never leave a short file
            raise RuntimeError(f"prepared {written} images, expected {shape[0]}")

    write_atomic(entry / "images.npy", write_images)
    if labels is not None:
        write_atomic(entry / "labels.npy", lambda file: np.save(file, labels.numpy()))
    meta = {"version": CACHE_VERSION, "shape": list(shape), "labelled": labels is not None,
            "class_names": None if class_names is None else list(class_names), "skipped": list(skipped), "description": description}
    write_text_atomic(entry / "source.json", json.dumps(meta, indent=1) + "\n")
    cached = _read_cache(entry)
    assert cached is not None
    return cached


# --------------------------------------------------------------------------- images and their conversion


def image_extensions() -> tuple[str, ...]:
    """The file extensions Pillow opens (``.png``, ``.jpg``, ...), lower case."""
    from PIL import Image

    Image.init()
    return tuple(sorted({ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}))


def _resize(image_size: int | None):
    """torchvision's ``Resize(S)`` (the shorter side to S) then ``CenterCrop(S)``, or ``None``; for PIL images and tensors."""
    if image_size is None:
        return None
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(image_size, antialias=True), transforms.CenterCrop(image_size)])


def _check_image_options(image_size, channels) -> None:
    if image_size is not None and (not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0):
        raise InputError(f"image_size must be a positive number of pixels, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise InputError(f"channels must be 1 (grey) or 3 (colour), got {channels!r}")


def _pil_to_array(image, channels: int, resize) -> np.ndarray:
    """A PIL image as ``uint8`` ``(C, H, W)``: converted to ``"L"`` or ``"RGB"``, then resized."""
    image = image.convert("L" if channels == 1 else "RGB")
    if resize is not None:
        image = resize(image)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# --------------------------------------------------------------------------- folders


def _folder_files(folder: Path, extensions: tuple[str, ...]) -> tuple[list[tuple[str, int]], tuple[str, ...] | None]:
    """The images of ``folder`` with their labels (``-1`` without classes), and the class names (``None`` for a flat folder)."""
    from torchvision.datasets.folder import find_classes, has_file_allowed_extension, make_dataset

    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and has_file_allowed_extension(e.name, extensions)]
    folders = [e.name for e in entries if e.is_dir()]
    if folders and loose:
        raise InputError(
            f"{folder} holds both images ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}) and subfolders "
            f"({', '.join(folders[:3])}{', ...' if len(folders) > 3 else ''}): put every image in a class subfolder, or none"
        )
    if not folders:
        if not loose:
            raise InputError(f"{folder} holds no images (files Pillow reads: {', '.join(extensions[:8])}, ...)")
        return [(str(folder / name), -1) for name in loose], None
    classes, class_to_idx = find_classes(str(folder))
    try:
        files = make_dataset(str(folder), class_to_idx, extensions=extensions, allow_empty=False)
    except FileNotFoundError as error:
        raise InputError(f"{folder}: {' '.join(str(error).split())}") from None
    return files, tuple(classes)


def _fingerprint(files: list[tuple[str, int]]) -> list:
    listing = []
    for path, label in files:
        stat = os.stat(path)
        listing.append([path, label, stat.st_size, stat.st_mtime_ns])
    return listing


def read_folder(
    folder: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    skip_unreadable: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Source:
    """A folder of images (``ImageFolder`` layout, or flat), prepared once into the cache (see the module docs).

    Raises :class:`InputError` for a folder without images, a file that cannot be read (unless
    ``skip_unreadable``: then it is left out and listed in ``Source.skipped``), and images of
    different sizes without ``image_size``.
    """
    _check_image_options(image_size, channels)
    folder = Path(folder)
    files, class_names = _folder_files(folder, image_extensions())
    options = {"image_size": image_size, "channels": channels, "skip_unreadable": skip_unreadable}
    entry = _cache_entry(cache_dir, folder.resolve().name or "root", str(folder.resolve()), {"files": _fingerprint(files), **options})
    cached = _read_cache(entry)
    if cached is not None:
        return cached
    with _locked(folder):  # processes preparing the same folder (torchrun's ranks) take turns: the later ones read the cache
        cached = _read_cache(entry)
        return cached if cached is not None else _prepare_folder(folder, files, class_names, entry, image_size, channels, skip_unreadable, progress)


def _prepare_folder(folder: Path, files, class_names, entry: Path, image_size, channels, skip_unreadable, progress) -> Source:
    """Decode, convert and resize the images ``files`` of ``folder`` into the cache ``entry`` (see :func:`read_folder`)."""
    from PIL import Image

    skipped, kept, sizes, colour = [], [], {}, False
    for path, label in tqdm(files, desc=f"reading {folder.name}", disable=not progress, unit="image", dynamic_ncols=True):
        try:
            with Image.open(path) as image:  # the header only
                size, mode = image.size, image.mode
                image.verify()
        except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for a bad file
            if not skip_unreadable:
                raise InputError(f"{path} cannot be read as an image ({type(error).__name__}: {_reason(error)}); "
                                 "remove it, or skip unreadable files (--skip-unreadable)") from None
            skipped.append(path)
            continue
        kept.append((path, label))
        sizes.setdefault(size, path)
        colour = colour or mode not in _GREY_MODES
    if not kept:
        raise InputError(f"{folder} holds no readable images ({len(skipped)} skipped)")
    if image_size is None and len(sizes) > 1:
        (a, first), (b, second) = list(sizes.items())[:2]
        raise InputError(f"{folder} holds images of different sizes ({first} is {a[0]}x{a[1]}, {second} is {b[0]}x{b[1]}): "
                         "give --image-size S (the shorter side to S, then the centre crop)")
    channels = channels or (3 if colour else 1)
    resize = _resize(image_size)
    width, height = next(iter(sizes)) if image_size is None else (image_size, image_size)

    decoded, labels = [], []
    for path, label in tqdm(kept, desc=f"preparing {folder.name}", disable=not progress, unit="image", dynamic_ncols=True):
        try:
            with Image.open(path) as image:
                decoded.append(_pil_to_array(image, channels, resize))
        except Exception as error:  # noqa: BLE001 - a file may be truncated after a good header
            if not skip_unreadable:
                raise InputError(f"{path} cannot be read as an image ({type(error).__name__}: {_reason(error)}); "
                                 "remove it, or skip unreadable files (--skip-unreadable)") from None
            skipped.append(path)
            continue
        labels.append(label)
    if not decoded:
        raise InputError(f"{folder} holds no readable images ({len(skipped)} skipped)")
    shape = (len(decoded), channels, height, width)
    label_tensor = torch.tensor(labels, dtype=torch.int64) if class_names is not None else None
    chunks = (np.stack(decoded[i : i + 1024]) for i in range(0, len(decoded), 1024))
    return _write_cache(entry, shape, np.uint8, chunks, label_tensor, class_names, sorted(skipped), str(folder))


def _reason(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --------------------------------------------------------------------------- arrays


def _open_array(path: Path) -> tuple:
    """The images and labels (or ``None``) of an array file, memory-mapped where the format allows."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False), None
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                if "x" not in archive.files:
                    raise InputError(f"{path} holds no array 'x' (it holds {', '.join(archive.files) or 'nothing'}): "
                                     "save the images as x (and the labels as y)")
                return archive["x"], archive["y"] if "y" in archive.files else None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            value = torch.load(path, map_location="cpu", weights_only=True)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - numpy and torch raise many kinds for a bad file
        raise InputError(f"{path} cannot be read as an array ({type(error).__name__}: {_reason(error)})") from None
    if isinstance(value, dict):
        if "x" not in value:
            raise InputError(f"{path} holds a dict without 'x' (keys: {', '.join(map(str, value))}): save {{'x': images, 'y': labels}}")
        return value["x"], value.get("y")
    if not isinstance(value, Tensor):
        raise InputError(f"{path} holds a {type(value).__name__}, not a tensor of images or a dict {{'x': ..., 'y': ...}}")
    return value, None


def _layout(shape: tuple[int, ...], where: str) -> str:
    """``"NHW"``, ``"NHWC"`` or ``"NCHW"`` for an array of ``shape``; an error quotes it otherwise."""
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        if shape[1] in (1, 3):
            return "NCHW"
        if shape[3] in (1, 3):
            return "NHWC"
        raise InputError(f"{where} has shape {shape}: images (N, C, H, W) or (N, H, W, C) need C = 1 or 3 channels")
    raise InputError(f"{where} has shape {shape}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W)")


def _as_nchw(chunk: Tensor, layout: str) -> Tensor:
    if layout == "NHW":
        return chunk.unsqueeze(1)
    if layout == "NHWC":
        return chunk.permute(0, 3, 1, 2)
    return chunk


def _convert(chunk: Tensor, channels: int, resize) -> Tensor:
    """``(n, C, H, W)`` images with ``channels`` channels (luma ``"L"`` or repeated grey), resized; dtype kept."""
    if chunk.shape[1] != channels:
        if channels == 3:
            chunk = chunk.expand(-1, 3, -1, -1)
        else:  # ITU-R 601-2 luma, as Pillow's "L"
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
            grey = (chunk.double() * weights).sum(1, keepdim=True)
            chunk = grey.round().clamp(0, 255).to(torch.uint8) if chunk.dtype == torch.uint8 else grey.to(chunk.dtype)
    if resize is not None:
        chunk = resize(chunk.contiguous())
        if chunk.is_floating_point():
            chunk = chunk.clamp(0, 1)
    return chunk.contiguous()


def _check_values(images, shape, where: str, chunk: int = 4096) -> None:
    """Float images must be finite and in [0, 1] (read in chunks, so a memory map is not loaded whole)."""
    lo, hi = np.inf, -np.inf
    for start in range(0, shape[0], chunk):
        part = torch.as_tensor(np.array(images[start : start + chunk]) if isinstance(images, np.ndarray) else images[start : start + chunk])
        if not torch.isfinite(part).all():
            raise InputError(f"{where} of shape {shape} holds NaN or infinite values")
        lo, hi = min(lo, part.min().item()), max(hi, part.max().item())
    if lo < 0 or hi > 1:
        raise InputError(f"{where} of shape {shape} and dtype float has values in [{lo:g}, {hi:g}]: float images must be in [0, 1] "
                         "(or give uint8 0-255)")


def _labels(y, n: int, where: str) -> Tensor | None:
    if y is None:
        return None
    y = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y)
    if y.dim() != 1 or len(y) != n or y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InputError(f"the labels of {where} must be integers (N,) = ({n},), got {y.dtype} of shape {tuple(y.shape)}")
    y = y.to(torch.int64)
    if len(y) and y.min() < 0:
        raise InputError(f"the labels of {where} must be class indices 0, 1, ..., got {int(y.min())}")
    return y.clone()


def _check_array(x, where: str) -> tuple[tuple[int, ...], str, np.dtype]:
    """The shape, layout and (NumPy) dtype of images ``x``: an error quotes the shape if they are not images."""
    shape = tuple(int(s) for s in x.shape)
    layout = _layout(shape, where)
    dtype = x.dtype if isinstance(x, np.ndarray) else torch.empty(0, dtype=x.dtype).numpy().dtype
    if dtype != np.uint8 and dtype.kind != "f":
        raise InputError(f"{where} of shape {shape} has dtype {dtype}: images are uint8 (0-255) or float (in [0, 1])")
    if shape[0] == 0:
        raise InputError(f"{where} of shape {shape} holds no images")
    if dtype.kind == "f":
        _check_values(x, shape, where)
    return shape, layout, dtype


def from_tensor(x, y=None, image_size: int | None = None, channels: int | None = None, where: str = "the images") -> Source:
    """Images in memory (a tensor or NumPy array of any of the array files' shapes and dtypes) as a :class:`Source`."""
    _check_image_options(image_size, channels)
    if not isinstance(x, (Tensor, np.ndarray)):
        raise InputError(f"{where} must be a tensor or a NumPy array, got {type(x).__name__}")
    shape, layout, dtype = _check_array(x, where)
    labels = _labels(y, shape[0], where)
    x = torch.as_tensor(x)
    x = _as_nchw(x.cpu(), layout)
    x = x if dtype == np.uint8 else x.to(torch.float32)
    x = _convert(x, channels or x.shape[1], _resize(image_size))
    return Source(x, labels, description=where)


def read_array(
    path: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Source:
    """An ``.npy``, ``.npz`` or ``.pt`` file of images (see the module docs): as it is when it is ``(N, C, H, W)``
    with the wanted size and channels (an ``.npy`` file memory-mapped), else prepared once into the cache."""
    _check_image_options(image_size, channels)
    path = Path(path)
    x, y = _open_array(path)
    if not isinstance(x, (np.ndarray, Tensor)):
        raise InputError(f"{path} holds a {type(x).__name__} as x, not an array of images")
    shape, layout, dtype = _check_array(x, str(path))
    labels = _labels(y, shape[0], str(path))
    in_channels = 1 if layout == "NHW" else shape[1] if layout == "NCHW" else shape[3]
    height, width = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    channels = channels or in_channels
    stored = np.uint8 if dtype == np.uint8 else np.float32
    if layout == "NCHW" and channels == in_channels and (image_size is None or image_size == height == width):
        if isinstance(x, np.ndarray) and x.dtype == stored:
            return Source(x, labels, description=str(path))
        if isinstance(x, Tensor) and x.dtype == torch.from_numpy(np.empty(0, stored)).dtype:
            return Source(x, labels, description=str(path))
    stat = path.stat()
    options = {"image_size": image_size, "channels": channels, "size": stat.st_size, "mtime": stat.st_mtime_ns}
    entry = _cache_entry(cache_dir, path.stem, str(path.resolve()), options)
    with _locked(path.parent):  # processes preparing the same file (torchrun's ranks) take turns
        cached = _read_cache(entry)
        if cached is not None:
            return Source(cached.images, labels, None, (), entry, str(path))
        return _prepare_array(path, x, shape, layout, labels, entry, stored, image_size, channels, height, width, progress)


def _prepare_array(path: Path, x, shape, layout: str, labels, entry: Path, stored, image_size, channels, height, width, progress) -> Source:
    """Convert and resize the images ``x`` of the array file ``path`` into the cache ``entry``, chunk by chunk."""
    resize = _resize(image_size)
    out_h, out_w = (image_size, image_size) if image_size is not None else (height, width)
    chunk = 1024

    def chunks():
        for start in tqdm(range(0, shape[0], chunk), desc=f"preparing {path.name}", disable=not progress, unit="chunk", dynamic_ncols=True):
            part = torch.as_tensor(np.array(x[start : start + chunk]) if isinstance(x, np.ndarray) else x[start : start + chunk])
            part = _as_nchw(part, layout)
            part = part if stored == np.uint8 else part.to(torch.float32)
            yield _convert(part, channels, resize).numpy()

    return _write_cache(entry, (shape[0], channels, out_h, out_w), stored, chunks(), labels, None, (), str(path))


# --------------------------------------------------------------------------- a torch Dataset


def _item_image(image, index: int) -> Tensor:
    """One image of a Dataset as a ``(C, H, W)`` tensor (``uint8`` or float), from a tensor, an array or a PIL image."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        array = np.asarray(image.convert("L" if image.mode in _GREY_MODES else "RGB"), dtype=np.uint8)
        return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, Tensor):
        raise InputError(f"item {index} of the dataset is a {type(image).__name__}: a Dataset yields images (a tensor (C, H, W), "
                         "a PIL image) or (image, label) pairs")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise InputError(f"item {index} of the dataset has shape {tuple(image.shape)}: expected an image (C, H, W) with C = 1 or 3")
    return image


class _Collate:
    """Stack the items of a Dataset (images, or (image, label) pairs) into ``(images (n, C, H, W), labels (n,) or None)``,
    converted and resized (runs in the DataLoader's workers)."""

    def __init__(self, channels: int | None, image_size: int | None):
        self.channels, self.image_size = channels, image_size

    def __call__(self, items):
        images, labels = [], []
        for index, item in items:
            image, label = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
            image = _item_image(image, index)
            image = _convert(image.unsqueeze(0), self.channels or image.shape[0], _resize(self.image_size))[0]
            images.append(image)
            labels.append(label)
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise InputError(f"the dataset's images have different shapes {sorted(shapes)[:2]}: give image_size (--image-size)")
        if any(isinstance(label, Tensor) and label.numel() != 1 for label in labels):
            raise InputError("a Dataset's labels are class indices, one integer per image")
        labelled = labels[0] is not None
        if any((label is not None) != labelled for label in labels):
            raise InputError("some of the dataset's items have labels and some have none")
        return torch.stack(images), (torch.tensor([int(label) for label in labels], dtype=torch.int64) if labelled else None)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return index, self.dataset[index]


def read_dataset(
    dataset: torch.utils.data.Dataset,
    image_size: int | None = None,
    channels: int | None = None,
    num_workers: int = 0,
    batch_size: int = 256,
    progress: bool = True,
    description: str = "a Dataset",
) -> Source:
    """The items of a map-style ``dataset`` (images, or ``(image, label)`` pairs; an image is a ``(C, H, W)``
    tensor, ``uint8`` or float in [0, 1], or a PIL image), read once in order through a ``DataLoader`` with
    ``num_workers`` worker processes (the dataset's own transforms run there), into memory.
    """
    _check_image_options(image_size, channels)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise InputError(f"expected a map-style torch Dataset (with __len__ and __getitem__), got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise InputError(f"{description} holds no images")
    loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=_Collate(channels, image_size))
    images, labels = [], []
    for batch, y in tqdm(loader, desc=f"reading {description}", disable=not progress, unit="batch", dynamic_ncols=True):
        if images and batch.shape[1:] != images[0].shape[1:]:
            raise InputError(f"the dataset's images have different shapes {tuple(images[0].shape[1:])} and {tuple(batch.shape[1:])}: "
                             "give image_size (--image-size)")
        if images and batch.dtype != images[0].dtype:
            raise InputError(f"the dataset's images are {images[0].dtype} and {batch.dtype}: give them all as uint8 or all as floats")
        images.append(batch)
        labels.append(y)
    x = torch.cat(images)
    if x.is_floating_point():
        _check_values(x, tuple(x.shape), description)
        x = x.to(torch.float32)
    elif x.dtype != torch.uint8:
        raise InputError(f"the images of {description} are {x.dtype}: give uint8 (0-255) or float (in [0, 1])")
    y = None if labels[0] is None else torch.cat(labels)
    classes = getattr(dataset, "classes", None)
    return Source(x, y, tuple(map(str, classes)) if y is not None and classes is not None else None, description=description)


# --------------------------------------------------------------------------- CelebA


CELEBA_FILES = ("img_align_celeba/", "list_eval_partition.txt", "identity_CelebA.txt", "list_attr_celeba.txt",
                "list_bbox_celeba.txt", "list_landmarks_align_celeba.txt")


def read_celeba(root: Path, split: str, image_size: int | None = None, cache_dir=None, num_workers: int = 0, progress: bool = True) -> Source:
    """One split (``"train"``, ``"valid"``, ``"test"``) of CelebA's aligned faces, unlabelled: the centre
    :data:`CELEBA_CROP` square, resized to ``image_size`` (default 64), prepared once into the cache.

    Reads the files torchvision's ``CelebA`` expects in ``root/celeba`` (it cannot download them
    reliably: see :data:`CELEBA_FILES`); without them a :class:`DatasetNotFoundError` names them.
    """
    import torchvision.datasets as tvd
    from torchvision import transforms

    size = image_size or 64
    folder = Path(root) / "celeba"
    try:
        dataset = tvd.CelebA(str(root), split=split, target_type=[], download=False,
                             transform=transforms.Compose([transforms.CenterCrop(CELEBA_CROP), transforms.Resize(size, antialias=True)]))
    except Exception as error:  # noqa: BLE001 - RuntimeError "Dataset not found or corrupted", or a missing file
        raise DatasetNotFoundError(
            f"celeba is not in {folder} ({type(error).__name__}: {_reason(error)}). Put {', '.join(CELEBA_FILES)} in {folder} "
            "(as torchvision's CelebA lays them out), or point root (--data-dir, $PYROVAE_DATA) at a folder that holds them."
        ) from None
    entry = _cache_entry(cache_dir, "celeba", str(folder.resolve()), {"split": split, "size": size, "crop": CELEBA_CROP, "n": len(dataset)})
    cached = _read_cache(entry)
    if cached is not None:
        return cached
    source = read_dataset(dataset, channels=3, num_workers=num_workers, progress=progress, description=f"celeba {split}")
    images = source.images.numpy()
    chunks = (images[i : i + 4096] for i in range(0, len(images), 4096))
    return _write_cache(entry, tuple(images.shape), np.uint8, chunks, None, None, (), f"celeba {split}")


# --------------------------------------------------------------------------- paths


def read_path(
    path: str | os.PathLike,
    image_size: int | None = None,
    channels: int | None = None,
    skip_unreadable: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Source:
    """A folder of images or an array file (by its suffix: :data:`_ARRAY_SUFFIXES`)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist: give a folder of images or an array file (.npy, .npz, .pt)")
    if path.is_dir():
        return read_folder(path, image_size, channels, skip_unreadable, cache_dir, progress)
    if path.suffix.lower() in _ARRAY_SUFFIXES:
        if skip_unreadable:
            raise InputError(f"skipping unreadable files applies to a folder of images, not to the array file {path}")
        return read_array(path, image_size, channels, cache_dir, progress)
    raise InputError(f"{path} is neither a folder of images nor an array file (.npy, .npz, .pt)")
