"""Benchmarks of the image path: uint8 images made floats per batch, and images read from a memory map.

``uint8`` (in every run of ``run.py``): the VAE (784-400-50) trained by the Trainer on MNIST held as
``uint8`` (an :class:`~pyrovae.data.ImageSet`, floats made per batch) against the same MNIST held as
one float32 tensor, as pyrovae did before; epochs interleaved after a warm-up, in the same run.
Reports the epoch-time ratio and the bytes each holds.

``mmap`` (opt-in: ``run.py --only mmap``, or ``python -m benchmarks.bench_images mmap``; never in
CI): generates a ``uint8`` array file of ``images x 3 x 64 x 64`` (default 350,000: 4.3 GB) in a
temporary folder, evicts it from the page cache (``posix_fadvise(DONTNEED)``), and trains a VAE
for ``steps`` batches read from its memory map, in a fresh process that samples its own
``RssAnon`` (anonymous memory: what the process holds, not the page cache) every 10 ms; then the
same model for as many steps on an in-memory slice of the file (the first ``steps x batch``
images), in another fresh process; deletes the file. Reports both processes' images per second
and peak ``RssAnon``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_svi import TrainerEpochs  # noqa: E402
from benchmarks.common import HIDDEN, LATENT, Settings, interleave, load_mnist, median  # noqa: E402

__all__ = ["bench_uint8", "bench_mmap"]


def bench_uint8(settings: Settings, epochs: int | None = None, batch_size: int = 256, data=None) -> dict:
    """Epoch times of the VAE on MNIST as uint8 (floats per batch) and as one float32 tensor (``ratio`` = uint8 / float)."""
    from pyrovae import VAE, NetworkConfig, VAEConfig
    from pyrovae.training import Trainer, TrainingConfig

    epochs = epochs or (3 if settings.quick else 5)
    if data is None:
        data = load_mnist(settings, quick_subset=20_000)
    sources = {"uint8": data.train, "float": data.train[:]}

    def runner(x):
        torch.manual_seed(settings.seed)
        model = VAE(VAEConfig(network=NetworkConfig(input_shape=data.image_shape, hidden=HIDDEN, latent_dim=LATENT))).to(settings.device)
        return TrainerEpochs(Trainer(model, TrainingConfig(epochs=1, batch_size=batch_size, seed=settings.seed, progress=False)), x, settings.device)

    contenders = {name: runner(x) for name, x in sources.items()}
    interleave(contenders, epochs)
    n = len(data.train)
    result = {"images": n, "batch_size": batch_size, "epochs_timed": epochs, "device": str(settings.device),
              "uint8_bytes": data.train.resident_bytes, "float_bytes": sources["float"].numel() * sources["float"].element_size()}
    for name, contender in contenders.items():
        seconds = contender.epochs(epochs)
        result[name] = {"median_s": median(seconds), "epoch_s": [round(s, 4) for s in seconds], "images_per_s": n / median(seconds)}
    result["ratio"] = result["uint8"]["median_s"] / result["float"]["median_s"]
    result["bytes_ratio"] = result["float_bytes"] / result["uint8_bytes"]
    return result


# --------------------------------------------------------------------------- the memory map


def _rss_anon() -> int:
    """This process's anonymous resident memory in bytes (``RssAnon`` of ``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def _generate(path: Path, images: int, chunk: int = 8192, seed: int = 0) -> None:
    """A ``uint8`` ``.npy`` file ``(images, 3, 64, 64)`` of smooth random images, written chunk by chunk, then evicted
    from the page cache."""
    rng = np.random.default_rng(seed)
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(images, 3, 64, 64))
    for start in range(0, images, chunk):
        n = min(chunk, images - start)
        coarse = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
        array[start : start + n] = coarse.repeat(8, axis=2).repeat(8, axis=3)
    array.flush()
    del array
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)  # the reads below come from the disk
    finally:
        os.close(descriptor)


def _worker(path: str, storage: str, steps: int, batch_size: int, hidden: int, latent: int) -> dict:
    """Train a VAE for ``steps`` batches of the file at ``path`` (``storage``: ``"mmap"``, read batch by batch, or
    ``"memory"``, the first ``steps * batch_size`` images read into memory first); its figures."""
    peak = [_rss_anon()]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], _rss_anon())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    from pyrovae import VAE, NetworkConfig, Trainer, TrainingConfig, VAEConfig
    from pyrovae.data import ImageSet, load_images

    n = steps * batch_size
    start = time.perf_counter()
    if storage == "mmap":  # the training images: n of the seeded shuffle of the whole file, read when drawn
        train = load_images(path, storage="mmap", subset=n, test_fraction=0.01, progress=False).train
    else:
        train = ImageSet(torch.from_numpy(np.array(np.load(path, mmap_mode="r")[:n])))
    load_seconds = time.perf_counter() - start
    torch.manual_seed(0)
    vae = VAE(VAEConfig(network=NetworkConfig(input_shape=(3, 64, 64), hidden=(hidden,), latent_dim=latent)))
    history = Trainer(vae, TrainingConfig(epochs=1, batch_size=batch_size, progress=False)).fit(train)
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_anon())
    seconds = history[-1]["seconds"]
    return {"storage": train.storage, "images": n, "steps": steps, "load_s": load_seconds, "epoch_s": seconds,
            "images_per_s": n / seconds, "peak_rss_anon_bytes": peak[0], "train_loss": history[-1]["train_loss"]}


def _run_worker(path: Path, storage: str, steps: int, batch_size: int, hidden: int, latent: int, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "benchmarks.bench_images", "worker", str(path), storage, str(steps), str(batch_size), str(hidden), str(latent)]
    done = subprocess.run(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=3600)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-2000:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_mmap(settings: Settings, images: int | None = None, steps: int | None = None, batch_size: int = 256,
               hidden: int = 256, latent: int = 32, folder: str | None = None, threads: int | None = None) -> dict:
    """Train from a generated uint8 array file of ``images x 3 x 64 x 64`` through its memory map and from an in-memory
    slice (``ratio_to_memory``: images/s of the first over the second; ``peak_rss_anon_bytes`` of the first)."""
    images = images or (20_000 if settings.quick else 350_000)
    steps = steps or (20 if settings.quick else 200)
    with tempfile.TemporaryDirectory(dir=folder, prefix="pyrovae-mmap-") as temporary:
        path = Path(temporary) / "images.npy"
        start = time.perf_counter()
        _generate(path, images)
        generated = time.perf_counter() - start
        mapped = _run_worker(path, "mmap", steps, batch_size, hidden, latent, threads)
        memory = _run_worker(path, "memory", steps, batch_size, hidden, latent, threads)
        file_bytes = path.stat().st_size
    result = {"file_bytes": file_bytes, "images": images, "image_shape": [3, 64, 64], "generate_s": generated, "batch_size": batch_size,
              "network": f"MLP {3 * 64 * 64}-{hidden}-{latent}", "mmap": mapped, "memory": memory}
    if "error" not in mapped and "error" not in memory:
        result["peak_rss_anon_bytes"] = mapped["peak_rss_anon_bytes"]
        result["ratio_to_memory"] = mapped["images_per_s"] / memory["images_per_s"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mmap = sub.add_parser("mmap", help="the memory-map benchmark (writes a file of images x 12,288 bytes in --folder)")
    mmap.add_argument("--images", type=int, default=350_000)
    mmap.add_argument("--steps", type=int, default=200)
    mmap.add_argument("--batch-size", type=int, default=256)
    mmap.add_argument("--folder", default=None, help="where the temporary file goes (default: the system's temporary folder)")
    mmap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the training processes")
    worker = sub.add_parser("worker")
    for name in ("path", "storage", "steps", "batch_size", "hidden", "latent"):
        worker.add_argument(name)
    args = parser.parse_args(argv)
    if args.command == "worker":
        print(json.dumps(_worker(args.path, args.storage, int(args.steps), int(args.batch_size), int(args.hidden), int(args.latent))))
        return 0
    settings = Settings(device=torch.device("cpu"), data_dir=REPO / "data", quick=False, out_dir=REPO / "runs" / "benchmarks", seed=0)
    result = bench_mmap(settings, args.images, args.steps, args.batch_size, folder=args.folder, threads=args.threads)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
