"""Shared fixtures: a small slice of real MNIST, seeding, tiny network shapes.

Tests stay small (a few hundred images, tiny networks) so the whole suite runs in
seconds on a laptop CPU.
"""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch
from pyro import poutine

from pyrovae.data import load_dataset
from pyrovae.nets import NetworkConfig

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def pytest_configure(config):
    """One CPU thread: the tests use tiny tensors, for which several threads on a busy machine
    spend more time waiting for each other than computing (50x slower, measured on 2 shared cores)."""
    torch.set_num_threads(1)


def capturing(guide, draws: list):
    """``guide``, also appending the ``z`` it samples on each call to ``draws``."""

    def wrapped(*args, **kwargs):
        with poutine.trace() as tracer:
            guide(*args, **kwargs)
        draws.append(tracer.trace.nodes["z"]["value"])

    return wrapped


def reference_prior(name: str, prior, latent_dim: int) -> torch.distributions.Distribution:
    """The distribution that the docs of the built-in prior ``name`` (the object ``prior``) describe over
    ``(latent_dim,)``, built from torch.distributions alone (no Pyro), to check the prior against."""
    td = torch.distributions
    if name == "normal":
        return td.Independent(td.Normal(torch.zeros(latent_dim), 1.0), 1)
    if name == "laplace":
        return td.Independent(td.Laplace(torch.zeros(latent_dim), 1.0), 1)
    if name == "student_t":
        return td.Independent(td.StudentT(3.0, torch.zeros(latent_dim), 1.0), 1)
    if name == "mixture":  # K diagonal Gaussians, scale softplus(raw) + 1e-5, weights softmax(logits)
        components = td.Independent(td.Normal(prior.locs, torch.nn.functional.softplus(prior.raw_scales) + 1e-5), 1)
        return td.MixtureSameFamily(td.Categorical(logits=prior.logits), components)
    if name == "vamp":  # the encoder's Gaussian posteriors at the pseudo-inputs hardtanh(raw, 0, 1), equal weights
        loc, scale = prior._encoder[0](prior.raw_pseudo_inputs.clamp(0, 1))[:2]
        return td.MixtureSameFamily(td.Categorical(logits=torch.zeros(len(loc))), td.Independent(td.Normal(loc, scale), 1))
    raise ValueError(f"no reference for the prior {name!r}")


def tiny_network(**changes) -> NetworkConfig:
    """A small MLP on 1x28x28 images: 784-64-8-64-784, fast enough for many tests."""
    values = dict(input_shape=(1, 28, 28), latent_dim=8, hidden=(64,))
    values.update(changes)
    return NetworkConfig(**values)


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state (torch, numpy, random)."""
    pyro.set_rng_seed(0)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding ``MNIST/raw``; tests that need real data are skipped without it."""
    raw = DATA_DIR / "MNIST" / "raw"
    if not all((raw / name).exists() for name in MNIST_FILES):
        pytest.skip(f"MNIST is not in {raw}")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    """300 training and 300 test images of real MNIST, grey levels in [0, 1] on the CPU."""
    return load_dataset("mnist", root=mnist_dir, subset=300, seed=0)


@pytest.fixture
def images(mnist) -> torch.Tensor:
    """A fixed batch of 16 real MNIST images ``(16, 1, 28, 28)``."""
    return mnist.train[:16]
