"""Datasets as tensors, splits, binarization, seeded minibatches, and a clear error for missing data."""

import re
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.mnist
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cuda
from pyrovae.data import EVAL_BINARIZATION_SEED, DatasetNotFoundError, ImageData, ImageSet, batches, default_data_dir, load_dataset


def projections(images):
    """One random projection per image ``(N,)``: equal images give equal numbers, distinct ones (almost surely) not."""
    direction = torch.randn(images[0].numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return images.flatten(1).double() @ direction


def test_mnist_slice_shapes_dtypes_and_range(mnist):
    assert isinstance(mnist, ImageData) and mnist.name == "mnist"
    for images, labels in [(mnist.train[:], mnist.train_labels), (mnist.test[:], mnist.test_labels)]:
        assert images.shape == (300, 1, 28, 28) and images.dtype == torch.float32
        assert labels.shape == (300,) and labels.dtype == torch.int64
        assert images.min() == 0 and images.max() == 1
        assert set(labels.tolist()) == set(range(10))
    assert ((mnist.train[:] > 0) & (mnist.train[:] < 1)).any()  # grey levels kept
    assert mnist.val is None and mnist.val_labels is None and not mnist.dynamic_binarization
    assert mnist.image_shape == (1, 28, 28)
    for split in (mnist.train, mnist.test):  # stored as uint8, a quarter of the floats' bytes, made floats per batch
        assert isinstance(split, ImageSet) and split.stored_dtype == torch.uint8 and split.storage == "host"
        assert split.resident_bytes == 300 * 784 and split.take(slice(0, 3)).dtype == torch.uint8


def test_subset_keeps_the_first_images_of_the_seeded_shuffle(mnist, mnist_dir):
    small = load_dataset("MNIST", root=mnist_dir, subset=50, seed=0)
    assert len(small.train[:]) == len(small.test[:]) == 50
    torch.testing.assert_close(small.train[:], mnist.train[:50])
    torch.testing.assert_close(small.train_labels, mnist.train_labels[:50])
    other = load_dataset("mnist", root=mnist_dir, subset=50, seed=1)
    assert not torch.equal(other.train[:], small.train[:])


def test_validation_split_is_disjoint_from_training(mnist_dir):
    data = load_dataset("mnist", root=mnist_dir, val_size=100)
    assert len(data.train[:]) == 59_900 and len(data.val[:]) == len(data.val_labels) == 100
    assert len(data.test[:]) == 10_000
    train, val = projections(data.train[:]), projections(data.val[:])
    assert not torch.isin(val, train).any()
    assert len(torch.unique(torch.cat([train, val]))) == 60_000  # together: the whole training set


def test_validation_split_with_subset(mnist_dir):
    data = load_dataset("mnist", root=mnist_dir, val_size=100, subset=300)
    assert data.train[:].shape == (300, 1, 28, 28) and data.val[:].shape == (100, 1, 28, 28)
    assert data.val_labels.shape == (100,)
    assert not torch.isin(projections(data.val[:]), projections(data.train[:])).any()


def test_static_binarization_is_binary_and_repeatable(mnist, mnist_dir):
    a = load_dataset("mnist", root=mnist_dir, subset=300, binarize="static", seed=0)
    b = load_dataset("mnist", root=mnist_dir, subset=300, binarize="static", seed=0)
    c = load_dataset("mnist", root=mnist_dir, subset=300, binarize="static", seed=1)
    for split in ("train", "test"):
        assert set(getattr(a, split)[:].unique().tolist()) == {0.0, 1.0}
        torch.testing.assert_close(getattr(a, split)[:], getattr(b, split)[:])
    assert not torch.equal(a.train[:], c.train[:])  # the training draw follows the run's seed ...
    assert torch.equal(a.test[:], c.test[:])  # ... the test draw does not
    # a draw of Bernoulli(pixel): black stays black, white stays white, the mean is kept
    assert (a.train[mnist.train[:] == 0] == 0).all() and (a.train[mnist.train[:] == 1] == 1).all()
    assert abs(a.train[:].mean() - mnist.train[:].mean()) < 0.01


def test_dynamic_binarization_keeps_grey_levels_and_flags_batches(mnist, mnist_dir):
    data = load_dataset("mnist", root=mnist_dir, subset=300, binarize="dynamic")
    assert data.dynamic_binarization
    torch.testing.assert_close(data.train[:], mnist.train[:])


def test_binarized_runs_are_scored_on_one_fixed_binary_test_set(mnist, mnist_dir):
    """Binary, the same across calls, training seeds, subsets and both binarizations; a Bernoulli draw of the grey test set."""
    runs = [load_dataset("mnist", root=mnist_dir, subset=300, binarize=b, seed=s) for b in ("dynamic", "static") for s in (0, 7)]
    for data in runs:
        assert set(data.test[:].unique().tolist()) == {0.0, 1.0}
        assert torch.equal(data.test[:], runs[0].test[:])
        assert EVAL_BINARIZATION_SEED == 0 and "seed 0" in data.protocol and data.binarization in data.protocol
    small = load_dataset("mnist", root=mnist_dir, subset=50, binarize="dynamic")
    assert torch.equal(small.test[:], runs[0].test[:50])
    grey = mnist.test[:]  # the same images, grey: the draw keeps black and white and the mean
    assert (runs[0].test[grey == 0] == 0).all() and (runs[0].test[grey == 1] == 1).all()
    assert abs(runs[0].test[:].mean() - grey.mean()) < 0.01


def test_grey_level_runs_keep_grey_test_images(mnist):
    assert mnist.binarization is None and "pixel values in [0, 1] (not binarized)" in mnist.protocol
    assert len(mnist.test[:].unique()) > 2


def test_validation_images_are_binarized_once_with_the_fixed_seed(mnist_dir):
    a = load_dataset("mnist", root=mnist_dir, subset=100, val_size=500, binarize="dynamic", seed=3)
    b = load_dataset("mnist", root=mnist_dir, subset=100, val_size=500, binarize="dynamic", seed=3)
    grey = load_dataset("mnist", root=mnist_dir, subset=100, val_size=500, seed=3)
    assert set(a.val[:].unique().tolist()) == {0.0, 1.0} and torch.equal(a.val[:], b.val[:])
    assert (a.val[grey.val[:] == 0] == 0).all() and (a.val[grey.val[:] == 1] == 1).all()
    assert len(a.train[:].unique()) > 2  # dynamic: the training images stay grey


def ramp(n):
    """``(n, 1, 1, 1)`` images whose single pixel is their index."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)


def test_batches_cover_every_index_once_per_epoch():
    x = ramp(10)
    generator = torch.Generator().manual_seed(0)
    epochs = []
    for _ in range(3):
        parts = list(batches(x, 3, generator))
        assert [len(p) for p in parts] == [3, 3, 3, 1]
        seen = torch.cat(parts).flatten()
        assert sorted(seen.tolist()) == list(range(10))
        epochs.append(seen)
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # reshuffled each epoch
    assert not torch.equal(epochs[0], torch.arange(10.0))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 120), batch_size=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_batches_partition_any_dataset(n, batch_size, seed):
    parts = list(batches(ramp(n), batch_size, torch.Generator().manual_seed(seed)))
    assert all(len(p) == batch_size for p in parts[:-1]) and 1 <= len(parts[-1]) <= batch_size
    assert sorted(torch.cat(parts).flatten().tolist()) == list(range(n))


def test_batches_are_repeatable_with_a_seeded_generator():
    x = ramp(50)
    runs = []
    for _ in range(2):
        generator = torch.Generator().manual_seed(7)
        runs.append([torch.cat(list(batches(x, 8, generator))) for _ in range(2)])
    for first, second in zip(*runs):
        torch.testing.assert_close(first, second)
    other = torch.cat(list(batches(x, 8, torch.Generator().manual_seed(8))))
    assert not torch.equal(other, runs[0][0])


def test_batches_in_order_without_shuffle():
    parts = list(batches(ramp(7), 4, shuffle=False))
    assert [p.flatten().tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6]]


def test_dynamic_binarization_draws_each_pixel():
    x = torch.cat([torch.zeros(100, 1, 4, 4), torch.ones(100, 1, 4, 4), torch.full((800, 1, 4, 4), 0.25)])
    drawn = torch.cat(list(batches(x, 64, torch.Generator().manual_seed(0), shuffle=False, binarize=True)))
    assert set(drawn.unique().tolist()) == {0.0, 1.0} and drawn.dtype == x.dtype
    assert (drawn[:100] == 0).all() and (drawn[100:200] == 1).all()
    assert abs(drawn[200:].mean().item() - 0.25) < 0.02  # 12,800 draws: sd 0.004
    again = torch.cat(list(batches(x, 64, torch.Generator().manual_seed(0), shuffle=False, binarize=True)))
    torch.testing.assert_close(drawn, again)


@pytest.mark.parametrize("shuffle", [True, False])
def test_labels_come_with_their_own_images_and_draw_nothing(shuffle):
    """The same images (and binarization) as without labels, for the same seed; each with its label."""
    x = torch.rand(23, 1, 2, 2)
    labels = torch.arange(23) * 10
    plain = list(batches(x, 5, torch.Generator().manual_seed(3), shuffle=shuffle, binarize=True))
    generator = torch.Generator().manual_seed(3)
    labelled = list(batches(x, 5, generator, shuffle=shuffle, binarize=True, labels=labels))
    assert len(labelled) == len(plain) == 5
    index = torch.randperm(23, generator=torch.Generator().manual_seed(3)) if shuffle else torch.arange(23)
    for start, (images, (same, y)) in zip(range(0, 23, 5), zip(plain, labelled)):
        assert torch.equal(images, same)
        assert torch.equal(y, labels[index[start : start + 5]])
    assert torch.equal(generator.get_state(), _drained(torch.Generator().manual_seed(3), x, shuffle))
    with pytest.raises(ValueError, match="one per image: 23 images, 22 labels"):
        next(batches(x, 5, labels=labels[:22]))


def _drained(generator, x, shuffle):
    """The state of ``generator`` after an epoch of batches of ``x`` without labels."""
    for _ in batches(x, 5, generator, shuffle=shuffle, binarize=True):
        pass
    return generator.get_state()


def test_batch_errors():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        next(batches(ramp(5), 0))
    with pytest.raises(ValueError, match="empty dataset"):
        next(batches(ramp(0), 2))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="imagenet"), "unknown dataset 'imagenet'; choose from"),
        (dict(binarize="sometimes"), "binarize must be one of"),
        (dict(subset=0), "subset must be a positive number"),
        (dict(val_size=-1), "val_size must be non-negative"),
        (dict(val_size=60_000), "val_size=60000 leaves no training images"),
        (dict(device="gpu"), "unknown device 'gpu'"),
    ],
)
def test_load_dataset_errors(mnist_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(**{"name": "mnist", "root": mnist_dir, **kwargs})


def test_cuda_asked_without_cuda(mnist_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_dataset("mnist", root=mnist_dir, device="cuda")


@pytest.fixture
def offline(monkeypatch):
    """torchvision's downloads fail at once, as on a machine without network."""

    def fail(*args, **kwargs):
        raise URLError("no network (test)")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", fail)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", fail)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("kmnist", "KMNIST"), ("fashion-mnist", "FashionMNIST")])
def test_missing_dataset_names_folder_and_files_and_leaves_nothing(tmp_path, offline, name, folder):
    with pytest.raises(DatasetNotFoundError) as error:
        load_dataset(name, root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / folder / "raw") in message
    for file in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert file in message
    assert isinstance(error.value, FileNotFoundError)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []  # the user's folder stays, empty


def test_missing_dataset_removes_only_the_folders_it_made(tmp_path, offline):
    root = tmp_path / "new" / "data"
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(root / "MNIST" / "raw"))):
        load_dataset("mnist", root=root)
    assert list(tmp_path.iterdir()) == []


def test_missing_cifar(tmp_path, offline):
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"cifar-10-python.tar.gz in {tmp_path}")):
        load_dataset("cifar10", root=tmp_path)
    assert tmp_path.is_dir() and list(tmp_path.iterdir()) == []


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("PYROVAE_DATA", raising=False)
    assert str(default_data_dir()) == "data"
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path


@cuda
def test_load_and_batch_on_cuda(mnist_dir):
    data = load_dataset("mnist", root=mnist_dir, subset=64, device="cuda", binarize="static")
    for tensor in (data.train[:], data.train_labels, data.test[:], data.test_labels):
        assert tensor.device.type == "cuda"
    for batch in batches(data.train, 16, torch.Generator().manual_seed(0), binarize=True):
        assert batch.device.type == "cuda" and batch.shape == (16, 1, 28, 28)


def test_a_load_waits_while_another_process_unpacks(mnist_dir, tmp_path):
    """torchvision unpacks the ``.gz`` files on first use; a second process that looked meanwhile would read
    them half-written (two of three reproduction runs started together failed so). So a load waits for
    the lock on the data folder: here the test holds it, as an unpacking process would."""
    import shutil
    import threading

    from pyrovae.data import _locked

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in (mnist_dir / "MNIST" / "raw").glob("*.gz"):
        shutil.copy(path, raw)
    loaded = []
    with _locked(raw):  # a lock of its own (flock locks belong to each open), as another process's
        loader = threading.Thread(target=lambda: loaded.append(load_dataset("mnist", root=tmp_path, subset=10)))
        loader.start()
        loader.join(timeout=1.0)
        assert loader.is_alive() and not loaded and not any(path.suffix != ".gz" for path in raw.iterdir())
    loader.join(timeout=120)
    assert len(loaded) == 1 and loaded[0].train.shape == (10, 1, 28, 28)
