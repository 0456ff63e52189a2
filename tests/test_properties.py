"""Property-based tests: random shapes, dtypes and values fed to the public functions.

Each call must either succeed or raise the library's clear error for bad input
(:class:`~pyrovae.errors.InputError`) -- never a crash from deep inside torch or Pyro.
"""

import math

import pyro
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro.infer import Trace_ELBO

from pyrovae import VAE, AEConfig, NetworkConfig, VAEConfig, build_model, resolve_device
from pyrovae.data import batches
from pyrovae.errors import InputError
from pyrovae.likelihoods import LIKELIHOODS, check_observations, make_likelihood
from pyrovae.models import MODELS
from pyrovae.nets import MLPEncoder
from pyrovae.priors import PRIORS, make_prior

@pytest.fixture(scope="module")
def monkeypatch_module():
    """A monkeypatch shared by every example of a Hypothesis test (function fixtures are not reset between them)."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SHAPE = (1, 4, 4)
NETWORK = NetworkConfig(input_shape=SHAPE, hidden=(8,), latent_dim=2)

dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool])
special = st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0, math.nan, math.inf, -math.inf, 1e30, -1e-30])


@st.composite
def image_batches(draw):
    """Tensors of random rank, sizes, dtype and values, most of them close to a valid batch."""
    rank = draw(st.integers(1, 5))
    shape = draw(st.lists(st.integers(0, 5), min_size=rank, max_size=rank))
    if draw(st.booleans()):
        shape = [draw(st.integers(0, 4)), *SHAPE]
    values = torch.rand(shape, dtype=torch.float64)
    if values.numel() and draw(st.booleans()):
        values.view(-1)[draw(st.integers(0, values.numel() - 1))] = draw(special)
    if draw(st.booleans()):
        values = (values > 0.5).double()
    dtype = draw(dtypes)
    if not dtype.is_floating_point and dtype != torch.bool:
        values = values.nan_to_num(0.0, 0.0, 0.0).clamp(0, 1)
    return values.to(dtype)


def _valid_for(x, support, dtype=None) -> bool:
    """Whether ``x`` is a batch of images that a model (computing in ``dtype``) must accept."""
    return (
        (dtype is None or x.dtype == dtype)
        and tuple(x.shape[1:]) == SHAPE
        and x.shape[0] > 0
        and x.is_floating_point()
        and bool(torch.isfinite(x).all())
        and bool((x.abs() <= 1e6).all())  # larger magnitudes overflow the networks: refused
        and bool(support.check(x).all())
    )


@SETTINGS
@given(x=image_batches(), likelihood=st.sampled_from(sorted(LIKELIHOODS)))
def test_check_observations_accepts_exactly_the_valid_batches(x, likelihood):
    support = make_likelihood(likelihood).support
    if _valid_for(x, support):
        check_observations(x, SHAPE, support)
    else:
        with pytest.raises(InputError):
            check_observations(x, SHAPE, support)


@SETTINGS
@given(x=image_batches(), prior=st.sampled_from(sorted(PRIORS)), likelihood=st.sampled_from(sorted(LIKELIHOODS)))
def test_the_vae_loss_is_finite_or_a_clear_error(x, prior, likelihood):
    vae = VAE(VAEConfig(network=NETWORK, prior=prior, likelihood=likelihood))
    try:
        loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    except InputError:
        assert not _valid_for(x, vae.support, torch.float32)
        return
    assert _valid_for(x, vae.support, torch.float32)
    assert torch.isfinite(loss)


@SETTINGS
@given(x=image_batches(), name=st.sampled_from(["ae", "sparse", "stacked", "denoising"]), loss=st.sampled_from(["bce", "mse"]))
def test_autoencoder_losses_are_finite_or_a_clear_error(x, name, loss):
    model = build_model(name, MODELS[name][1](network=NETWORK, loss=loss))
    try:
        value = model.loss(x)
    except InputError:
        assert not _valid_for(x, model.support, torch.float32)
        return
    assert _valid_for(x, model.support, torch.float32)
    assert torch.isfinite(value)


@SETTINGS
@given(
    input_shape=st.lists(st.integers(-2, 6), min_size=0, max_size=4),
    latent_dim=st.one_of(st.integers(-3, 6), st.floats(allow_nan=True), st.none()),
    hidden=st.lists(st.integers(-2, 8), max_size=3),
    conv=st.booleans(),
    activation=st.sampled_from(["relu", "tanh", "nope", ""]),
)
def test_network_configs_build_or_fail_clearly(input_shape, latent_dim, hidden, conv, activation):
    try:
        config = NetworkConfig(input_shape=tuple(input_shape), latent_dim=latent_dim, hidden=tuple(hidden), conv=conv, activation=activation)
    except InputError:
        return
    x = torch.rand(3, *config.input_shape)
    for name in ["vae", "ae"]:
        model = build_model(name, VAEConfig(network=config) if name == "vae" else AEConfig(network=config))
        assert model.reconstruct(x).shape == x.shape


def _expected_device(name: str, cuda_count: int) -> torch.device | None:
    """What ``resolve_device(name)`` must give on a machine with ``cuda_count`` GPUs (None: an InputError)."""
    name = name.strip().lower()
    if name in ("auto", "cpu"):
        return torch.device("cuda" if name == "auto" and cuda_count else "cpu")
    if name == "cuda" and cuda_count:
        return torch.device("cuda", 0)
    index = name.removeprefix("cuda:")
    if name.startswith("cuda:") and index.isdigit() and int(index) < cuda_count:
        return torch.device("cuda", int(index))
    return None


@SETTINGS
@given(
    name=st.one_of(st.text(max_size=12), st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:x", "CPU", " cpu ", "Auto", "tpu", "cuda:"])),
    cuda_count=st.integers(0, 2),
)
def test_device_names_resolve_or_fail_clearly(name, cuda_count, monkeypatch_module):
    monkeypatch_module.setattr(torch.cuda, "is_available", lambda: cuda_count > 0)
    monkeypatch_module.setattr(torch.cuda, "device_count", lambda: cuda_count)
    monkeypatch_module.setattr(torch.cuda, "current_device", lambda: 0)
    expected = _expected_device(name, cuda_count)
    if expected is None:
        with pytest.raises(InputError, match="device"):
            resolve_device(name)
    else:
        assert resolve_device(name) == expected


@SETTINGS
@given(n=st.integers(0, 50), batch_size=st.integers(-3, 60), seed=st.integers(0, 2**31))
def test_batches_cover_every_image_once_or_fail_clearly(n, batch_size, seed):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    try:
        seen = torch.cat(list(batches(x, batch_size, torch.Generator().manual_seed(seed))))
    except InputError:
        assert n == 0 or batch_size <= 0
        return
    assert sorted(seen.flatten().tolist()) == list(range(n))


@SETTINGS
@given(latent_dim=st.integers(1, 5), name=st.sampled_from(sorted(PRIORS)), n=st.integers(1, 4))
def test_every_prior_samples_and_scores_its_event_shape(latent_dim, name, n):
    # the VampPrior mixes a VAE's posteriors: it takes that VAE's (Gaussian) encoder
    options = dict(encoder=MLPEncoder(SHAPE, latent_dim, (8,), gaussian=True), input_shape=SHAPE, num_pseudo_inputs=3) if name == "vamp" else {}
    prior = make_prior(name, latent_dim, **options)()
    z = prior.sample((n,))
    assert z.shape == (n, latent_dim)
    assert torch.isfinite(prior.log_prob(z)).all()


@SETTINGS
@given(steps=st.integers(-2, 6), n=st.integers(-2, 4))
def test_vae_sampling_and_interpolation_arguments(steps, n):
    vae = VAE(VAEConfig(network=NETWORK))
    x = torch.rand(2, *SHAPE)
    with pyro.validation_enabled(True):
        try:
            assert vae.sample(n).shape == (n, *SHAPE)
        except InputError:
            assert n <= 0
        try:
            assert vae.interpolate(x[0], x[1], steps).shape == (steps, *SHAPE)
        except InputError:
            assert steps < 2
