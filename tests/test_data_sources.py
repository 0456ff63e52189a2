"""Sources of images: folders (ImageFolder layout or flat) of real photographs, array files, torch Datasets;
the uint8 cache (reused, rebuilt, atomic); one-line errors that name the culprit."""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder

from conftest import write_photo_crops
from conftest import tiny_network
from pyrovae import VAE, Trainer, TrainingConfig, VAEConfig
from pyrovae.data import DatasetNotFoundError, ImageSet, load_dataset, load_images, sources
from pyrovae.evaluation import evaluate
from pyrovae.data.sources import read_array, read_folder
from pyrovae.errors import InputError


def entries(cache):
    """The complete cache entries under ``cache`` (their source.json files)."""
    return sorted(cache.rglob("source.json"))


def test_a_folder_of_class_subfolders_gives_uint8_images_labels_and_class_names(photo_folder, tmp_path):
    data = load_images(photo_folder, image_size=16, cache_dir=tmp_path / "cache", test_fraction=0.25, progress=False)
    assert data.class_names == ("hopper", "pack") and data.labelled
    assert len(data.train) == 18 and len(data.test) == 6  # 24 crops, a quarter held out
    for split, labels in ((data.train, data.train_labels), (data.test, data.test_labels)):
        assert split.stored_dtype == torch.uint8 and split.image_shape == (3, 16, 16)
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    assert set(data.train_labels.tolist()) | set(data.test_labels.tolist()) == {0, 1}
    # every image is the centre crop of its photograph crop after resizing: compare one with torchvision directly
    cached = read_folder(photo_folder, image_size=16, cache_dir=tmp_path / "cache", progress=False)
    first = sorted((photo_folder / "hopper").iterdir())[0]
    expected = transforms.CenterCrop(16)(transforms.Resize(16)(Image.open(first).convert("RGB")))
    assert np.array_equal(cached.images[0], np.asarray(expected).transpose(2, 0, 1))
    assert cached.labels[0] == 0 and cached.labels[-1] == 1


def test_resizing_takes_the_shorter_side_then_the_centre(tmp_path):
    """A 120x20 image, red quarters left and right, blue in the middle: at 10 pixels only the blue centre is left
    (stretched, or cropped elsewhere, red would show)."""
    folder = tmp_path / "flat"
    folder.mkdir()
    image = np.zeros((20, 120, 3), np.uint8)
    image[:, :30, 0] = image[:, 90:, 0] = 255
    image[:, 30:90, 2] = 255
    Image.fromarray(image).save(folder / "wide.png")
    Image.fromarray(image.transpose(1, 0, 2).copy()).save(folder / "tall.png")
    source = read_folder(folder, image_size=10, cache_dir=tmp_path / "cache", progress=False)
    images = np.asarray(source.images)
    assert images.shape == (2, 3, 10, 10)
    assert (images[:, 2] == 255).all() and (images[:, 0] == 0).all()  # blue, no red
    assert source.labels is None and source.class_names is None  # a flat folder: unlabelled


def test_channels_convert_as_pillow_does(photo_folder, tmp_path):
    grey = read_folder(photo_folder, image_size=12, channels=1, cache_dir=tmp_path / "c", progress=False)
    colour = read_folder(photo_folder, image_size=12, cache_dir=tmp_path / "c", progress=False)
    assert grey.images.shape[1] == 1 and colour.images.shape[1] == 3
    first = sorted((photo_folder / "hopper").iterdir())[0]
    expected = transforms.CenterCrop(12)(transforms.Resize(12)(Image.open(first).convert("L")))
    assert np.array_equal(grey.images[0, 0], np.asarray(expected))


def test_the_cache_is_reused_and_rebuilt_when_the_folder_or_the_options_change(photo_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = read_folder(photo_folder, image_size=16, cache_dir=cache, progress=False)
    assert len(entries(cache)) == 1 and isinstance(first.images, np.memmap)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    again = read_folder(photo_folder, image_size=16, cache_dir=cache, progress=False)
    assert opened == [] and again.cache == first.cache  # nothing decoded: read from the cache
    assert np.array_equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    write_photo_crops(photo_folder, per_class=13, seed=1)  # rewrites the crops and adds one per class
    changed = read_folder(photo_folder, image_size=16, cache_dir=cache, progress=False)
    assert len(changed) == 26 and changed.cache != first.cache and opened
    read_folder(photo_folder, image_size=8, cache_dir=cache, progress=False)
    assert len(entries(cache)) == 3


def test_an_interrupted_preparation_leaves_no_cache_entry(photo_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    decoded = []
    real = sources._pil_to_array

    def interrupted(*args):
        if len(decoded) == 5:
            raise KeyboardInterrupt
        decoded.append(1)
        return real(*args)

    monkeypatch.setattr(sources, "_pil_to_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_folder(photo_folder, image_size=16, cache_dir=cache, progress=False)
    assert entries(cache) == [] and not [p for p in cache.rglob("*") if p.is_file()]
    monkeypatch.setattr(sources, "_pil_to_array", real)
    assert len(read_folder(photo_folder, image_size=16, cache_dir=cache, progress=False)) == 24


def test_a_dataset_is_read_through_a_dataloader_with_workers(photo_folder, tmp_path):
    """torchvision's own ImageFolder with the user's transforms, read by two workers: the same images as the folder."""
    resize = transforms.Compose([transforms.Resize(16), transforms.CenterCrop(16)])
    dataset = ImageFolder(str(photo_folder), transform=resize)
    from_dataset = load_images(dataset, num_workers=2, test_fraction=0.25, progress=False)
    from_folder = load_images(photo_folder, image_size=16, cache_dir=tmp_path / "cache", test_fraction=0.25, progress=False)
    assert from_dataset.class_names == from_folder.class_names == ("hopper", "pack")
    for split in ("train", "test"):
        assert torch.equal(getattr(from_dataset, split).take(slice(None)), getattr(from_folder, split).take(slice(None)))
        assert torch.equal(getattr(from_dataset, f"{split}_labels"), getattr(from_folder, f"{split}_labels"))
    vae = VAE(VAEConfig(network=tiny_network(input_shape=(3, 16, 16)), likelihood="normal"))
    history = Trainer(vae, TrainingConfig(epochs=2, batch_size=6, progress=False)).fit(from_dataset.train, test=from_dataset.test)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"elbo", "probe_accuracy"} <= set(evaluate(vae, from_dataset, num_samples=0))


def test_missing_celeba_names_its_files(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"celeba is not in {tmp_path / 'celeba'}") + ".*img_align_celeba/, list_eval_partition.txt"):
        load_dataset("celeba", root=tmp_path)


class _Floats(torch.utils.data.Dataset):
    """Float images in [0, 1] without labels, as a transform such as ToTensor gives them."""

    def __init__(self, n):
        self.images = torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_a_dataset_of_float_images_keeps_its_floats():
    data = load_images(_Floats(20), test_fraction=0.25, progress=False)
    assert not data.labelled and data.train.stored_dtype == torch.float32
    assert torch.equal(torch.cat([data.train[:], data.test[:]]).sort(0).values, _Floats(20).images.sort(0).values)


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_array_files_of_every_layout(tmp_path, layout):
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if layout == "NHW":
        images = images[:, :1]
    stored = {"NHW": images[:, 0], "NHWC": images.permute(0, 2, 3, 1), "NCHW": images}[layout].numpy()
    path = tmp_path / "images.npy"
    np.save(path, stored)
    source = read_array(path, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(torch.from_numpy(np.array(source.images)), images)
    assert isinstance(source.images, np.memmap) and source.labels is None
    assert (layout == "NCHW") == (entries(tmp_path / "cache") == [])  # (N, C, H, W) is read as it is, without a cache


def test_npz_pt_and_float_arrays(tmp_path):
    x = torch.randint(0, 256, (30, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    y = torch.arange(30) % 3
    np.savez(tmp_path / "a.npz", x=x.numpy(), y=y.numpy())
    data = load_images(tmp_path / "a.npz", cache_dir=tmp_path / "cache", test_fraction=0.2, progress=False)
    assert data.image_shape == (3, 8, 8) and sorted(torch.cat([data.train_labels, data.test_labels]).tolist()) == sorted(y.tolist())
    torch.save({"x": x, "y": y}, tmp_path / "b.pt")
    torch.save(x.permute(0, 3, 1, 2).float() / 255, tmp_path / "c.pt")
    from_pt = load_images(tmp_path / "b.pt", cache_dir=tmp_path / "cache", test_fraction=0.2, progress=False)
    floats = load_images(tmp_path / "c.pt", cache_dir=tmp_path / "cache", test_fraction=0.2, progress=False)
    assert torch.equal(from_pt.train[:], data.train[:]) and torch.equal(from_pt.test_labels, data.test_labels)
    assert floats.train.stored_dtype == torch.float32 and not floats.labelled  # floats are never quantized
    torch.testing.assert_close(floats.train[:], data.train[:], rtol=0, atol=1e-6)


def test_images_in_memory_with_an_image_size(tmp_path):
    x = torch.rand(12, 1, 10, 20)
    data = load_images(x, labels=torch.arange(12) % 2, image_size=5, test_fraction=0.25, progress=False)
    assert data.image_shape == (1, 5, 5) and data.train.stored_dtype == torch.float32 and len(data.test) == 3


def _bad_file(folder, name="broken.png"):
    (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return folder / name


@pytest.mark.parametrize(
    "arrange, message",
    [
        (lambda folder: None, "holds no images"),
        (lambda folder: (folder / "notes.txt").write_text("no images here"), "holds no images"),
        (lambda folder: _bad_file(folder), "broken.png cannot be read as an image"),
        (lambda folder: [Image.new("RGB", size).save(folder / f"{size[0]}.png") for size in ((8, 8), (9, 8))], r"different sizes \(.*8\.png is 8x8, .*9\.png is 9x8\).*--image-size"),
        (lambda folder: (Image.new("L", (4, 4)).save(folder / "a.png"), (folder / "cats").mkdir(), Image.new("L", (4, 4)).save(folder / "cats" / "b.png")), "holds both images .*a.png.* and subfolders .*cats"),
    ],
)
def test_bad_folders_name_the_culprit_and_write_nothing(tmp_path, arrange, message):
    folder = tmp_path / "mine"
    folder.mkdir()
    arrange(folder)
    with pytest.raises(InputError, match=message):
        load_images(folder, cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_unreadable_files_are_skipped_only_when_asked(photo_folder, tmp_path):
    bad = _bad_file(photo_folder / "pack")
    truncated = photo_folder / "hopper" / "truncated.jpg"
    truncated.write_bytes(sorted((photo_folder / "hopper").glob("*.jpg"))[0].read_bytes()[:200])
    with pytest.raises(InputError, match=re.escape(str(bad)) + "|" + re.escape(str(truncated))):
        load_images(photo_folder, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    data = load_images(photo_folder, image_size=8, cache_dir=tmp_path / "cache", skip_unreadable=True, test_fraction=0.25, progress=False)
    assert data.skipped == tuple(sorted([str(bad), str(truncated)]))
    assert len(data.train) + len(data.test) == 24


def test_train_and_test_class_folders_must_match(photo_folder, tmp_path):
    test = tmp_path / "test"
    write_photo_crops(test, per_class=2)
    os.rename(test / "pack", test / "box")
    with pytest.raises(InputError, match=r"class folders of the test images \(box, hopper\) differ from those of the training images \(hopper, pack\)"):
        load_images(photo_folder, test, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    os.rename(test / "box", test / "pack")
    data = load_images(photo_folder, test, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    assert len(data.train) == 24 and len(data.test) == 4  # the user's own test split: nothing held out


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((5, 8), np.uint8), r"shape \(5, 8\): expected images"),
        (np.zeros((5, 2, 8, 8, 3), np.uint8), r"shape \(5, 2, 8, 8, 3\): expected images"),
        (np.zeros((5, 4, 8, 8), np.uint8), r"shape \(5, 4, 8, 8\): images .* need C = 1 or 3"),
        (np.zeros((5, 8, 8), np.int16), r"shape \(5, 8, 8\) has dtype int16: images are uint8"),
        (np.full((5, 8, 8), 2.0, np.float32), r"shape \(5, 8, 8\) and dtype float has values in \[2, 2\]"),
        (np.full((5, 8, 8), np.nan, np.float32), r"shape \(5, 8, 8\) holds NaN"),
        (np.zeros((0, 8, 8), np.uint8), r"shape \(0, 8, 8\) holds no images"),
    ],
)
def test_bad_arrays_quote_their_shape(tmp_path, array, message):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(InputError, match=message):
        load_images(tmp_path / "x.npy", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache").exists()


def test_bad_labels_and_archives(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(InputError, match="holds no array 'x' .*images"):
        load_images(tmp_path / "a.npz", progress=False)
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(InputError, match=r"must be integers \(N,\) = \(4,\), got torch.int64 of shape \(3,\)"):
        load_images(tmp_path / "b.npz", progress=False)
    (tmp_path / "c.npy").write_bytes(b"garbage")
    with pytest.raises(InputError, match="c.npy cannot be read as an array"):
        load_images(tmp_path / "c.npy", progress=False)
    with pytest.raises(InputError, match="does not exist"):
        load_images(tmp_path / "nowhere", progress=False)


def test_cache_files_are_complete_npy_files(photo_folder, tmp_path):
    source = read_folder(photo_folder, image_size=8, cache_dir=tmp_path / "cache", progress=False)
    meta = json.loads((source.cache / "source.json").read_text())
    assert meta["shape"] == [24, 3, 8, 8] and meta["class_names"] == ["hopper", "pack"]
    assert np.array_equal(np.load(source.cache / "images.npy"), np.asarray(source.images))
    assert isinstance(ImageSet(source.images), ImageSet) and ImageSet(source.images).storage == "mmap"


def test_a_preparation_interrupted_while_writing_leaves_no_file(tmp_path, monkeypatch):
    """Killed half-way through writing images.npy (here: an interrupt between chunks), the cache holds nothing."""
    np.save(tmp_path / "x.npy", np.zeros((3000, 8, 8, 3), np.uint8))  # (N, H, W, C): converted, in chunks of 1,024
    converted = []
    real = sources._convert

    def interrupted(*args):
        if converted:
            raise KeyboardInterrupt
        converted.append(1)
        return real(*args)

    monkeypatch.setattr(sources, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        read_array(tmp_path / "x.npy", cache_dir=tmp_path / "cache", progress=False)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    monkeypatch.setattr(sources, "_convert", real)
    assert read_array(tmp_path / "x.npy", cache_dir=tmp_path / "cache", progress=False).images.shape == (3000, 3, 8, 8)


def test_the_held_out_test_images_do_not_follow_the_run_seed():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    a, b = (load_images(images, seed=seed, test_fraction=0.2, progress=False) for seed in (0, 5))
    assert torch.equal(a.test[:], b.test[:]) and len(a.test) == 10
    assert not torch.equal(a.train[:], b.train[:])  # the training order does follow it
    together = torch.cat([a.train.take(slice(None)), a.test.take(slice(None))]).flatten().sort().values
    assert torch.equal(together, images.flatten())  # disjoint, and together every image
