"""Where uint8 images live (device, host memory, memory map), floats made per batch, and the same batches
and training from every place."""

import numpy as np
import pytest
import torch

from conftest import cuda, tiny_network
from pyrovae import VAE, Trainer, TrainingConfig, VAEConfig
from pyrovae.data import ImageSet, batches, load_images, storage
from pyrovae.errors import InputError


def test_uint8_pixels_become_exactly_k_over_255():
    """The bins of 8-bit data: every value k becomes the float32 nearest k / 255, and back."""
    values = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
    floats = ImageSet(values)[:]
    assert floats.dtype == torch.float32
    assert torch.equal(floats.flatten(), torch.arange(256, dtype=torch.float32) / 255)
    assert torch.equal((floats * 255).round().to(torch.uint8), values)
    assert torch.equal(ImageSet(floats)[:], floats)  # float images are kept as they are


def test_uint8_images_take_a_quarter_of_the_bytes(mnist):
    assert mnist.train.resident_bytes * 4 == mnist.train[:].numel() * mnist.train[:].element_size()


def _mapped(tmp_path, images: torch.Tensor) -> np.memmap:
    np.save(tmp_path / "x.npy", images.numpy())
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def test_batches_from_a_memory_map_equal_those_from_memory(tmp_path):
    images = torch.randint(0, 256, (103, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mapped = ImageSet.place(_mapped(tmp_path, images), "cpu", storage="mmap")
    in_memory = ImageSet.place(images, "cpu", storage="device")
    assert mapped.storage == "mmap" and mapped.resident_bytes == 0 and in_memory.storage == "host"  # the CPU's device is the host
    labels = torch.arange(103)
    for binarize in (False, True):
        a = list(batches(mapped, 10, torch.Generator().manual_seed(4), binarize=binarize, labels=labels))
        b = list(batches(in_memory, 10, torch.Generator().manual_seed(4), binarize=binarize, labels=labels))
        assert len(a) == 11 and all(torch.equal(x, y) and torch.equal(i, j) for (x, i), (y, j) in zip(a, b))
    rows = mapped.select(torch.tensor([5, 1, 7]))  # a view of some rows: read when drawn
    assert rows.storage == "mmap" and torch.equal(rows.take(slice(None)), images[[5, 1, 7]])


def test_shards_put_together_are_the_global_batch():
    images = torch.rand(50, 1, 2, 2)
    whole = list(batches(images, 16, torch.Generator().manual_seed(1), binarize=True))
    shards = [list(batches(images, 16, torch.Generator().manual_seed(1), binarize=True, shard=(rank, 3))) for rank in range(3)]
    for step, batch in enumerate(whole):
        assert torch.equal(torch.cat([shard[step] for shard in shards]), batch)
    assert [len(shard[0]) for shard in shards] == [6, 5, 5] and [len(shard[-1]) for shard in shards] == [1, 1, 0]  # 50 = 3 x 16 + 2


def test_first_skips_batches_but_not_their_draws():
    images = torch.rand(50, 1, 2, 2)
    whole = list(batches(images, 8, torch.Generator().manual_seed(2), binarize=True))
    later = list(batches(images, 8, torch.Generator().manual_seed(2), binarize=True, first=3))
    assert len(later) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(later, whole[3:]))


def test_auto_places_by_size(tmp_path, monkeypatch):
    images = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    mapped = _mapped(tmp_path, images)
    assert ImageSet.place(mapped, "cpu").storage == "host"  # fits: read into memory
    monkeypatch.setattr(storage, "available_host_memory", lambda: 1000)  # 4,096 bytes do not fit in half of 1,000
    assert ImageSet.place(mapped, "cpu").storage == "mmap"
    assert ImageSet.place(images, "cpu").storage == "host"  # in memory already: it stays there
    with pytest.raises(InputError, match="storage='mmap' reads images from a memory-mapped file"):
        ImageSet.place(images, "cpu", storage="mmap")
    with pytest.raises(InputError, match="storage must be one of"):
        ImageSet.place(images, "cpu", storage="disk")


def test_training_from_a_memory_map_is_training_from_memory(tmp_path):
    """The same seed gives the same weights whether the images are a tensor, uint8 in memory or a memory map."""
    images = torch.randint(0, 256, (120, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", images.numpy())
    mapped = load_images(tmp_path / "x.npy", storage="mmap", test_fraction=0.25, progress=False)
    in_memory = load_images(tmp_path / "x.npy", storage="host", test_fraction=0.25, progress=False)
    assert mapped.train.storage == "mmap" and in_memory.train.storage == "host"
    weights = []
    for train in (mapped.train, in_memory.train, in_memory.train[:]):
        torch.manual_seed(0)
        vae = VAE(VAEConfig(network=tiny_network()))
        Trainer(vae, TrainingConfig(epochs=2, batch_size=32, progress=False)).fit(train, dynamic_binarization=True, test=mapped.test)
        weights.append(torch.cat([p.detach().flatten() for p in vae.parameters()]))
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])


@cuda
def test_host_images_reach_cuda_batch_by_batch():
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8)
    host = ImageSet.place(images, "cuda", storage="host")
    assert host.storage == "host" and host.images.device.type == "cpu"
    batch = next(batches(host, 8, torch.Generator().manual_seed(0)))
    assert batch.device.type == "cuda" and batch.dtype == torch.float32
    assert ImageSet.place(images, "cuda").storage == "device"
