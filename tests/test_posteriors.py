"""Posteriors q(z|x): the flows' densities against the change-of-variables formula, and flows inside the VAE."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive, RenyiELBO, Trace_ELBO

from pyrovae import VAE, VAEConfig
from pyrovae.errors import InputError
from pyrovae.nets import MLPEncoder, build_encoder
from pyrovae.posteriors import POSTERIORS, DiagonalGaussian, FlowPosterior, iaf_posterior, make_posterior, planar_posterior, point_estimate

from conftest import tiny_network

L, C, B = 4, 3, 5


def randomised(posterior: FlowPosterior) -> FlowPosterior:
    """``posterior`` with every weight redrawn from N(0, 0.2^2): flows well away from the identity (Pyro starts some near it)."""
    with torch.no_grad():
        for param in posterior.parameters():
            param.normal_(0, 0.2)
    return posterior


def jacobian_log_det(transform, x: torch.Tensor) -> torch.Tensor:
    """log |det d transform(x)_b / dx_b| of each row b of ``x: (B, L)``, from the full Jacobian (autograd; rows are
    independent, each with its own context, so the blocks off the diagonal are zero)."""
    jacobian = torch.autograd.functional.jacobian(transform, x)  # (B, L, B, L)
    blocks = torch.stack([jacobian[b, :, b, :] for b in range(len(x))])  # (B, L, L)
    return torch.linalg.slogdet(blocks)[1]


@pytest.mark.parametrize("build", [iaf_posterior, planar_posterior], ids=["iaf", "planar"])
def test_flow_density_is_the_change_of_variables_formula(build):
    # in double precision: in float32 the IAF's inversion below (L sequential passes) was off by 1.2e-3 nats on one CPU
    posterior = randomised(build(L, 3, context_dim=C)).double()
    loc, scale, context = (torch.randn(B, L).double(), torch.rand(B, L).double() + 0.5, torch.randn(B, C).double())
    q = posterior(loc, scale, context)
    assert q.batch_shape == (B,) and q.event_shape == (L,)
    base = dist.Normal(loc, scale).to_event(1)
    z0 = base.sample()
    z, log_det = z0, torch.zeros(B, dtype=torch.float64)
    for transform in q.transforms:  # the flow, step by step, with each step's Jacobian computed by autograd
        log_det = log_det + jacobian_log_det(transform, z)
        z = transform(z)
    expected = base.log_prob(z0) - log_det
    assert log_det.abs().mean() > 0.2  # the flow really changes the density
    torch.testing.assert_close(q.log_prob(z), expected, atol=1e-8, rtol=1e-8)
    if build is iaf_posterior:  # an IAF also inverts a z it did not draw (L sequential passes)
        torch.testing.assert_close(q.log_prob(z.clone()), expected, atol=1e-8, rtol=1e-8)


def pushed_with_log_det(q, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z0: (K, N, L)`` (K particles of the N rows of ``q``'s batch) pushed through the flows of ``q``, one call per
    step on the whole tensor (so each step keeps it for ``q.log_prob``), and the log |det| of the whole flow at each
    point, ``(K, N)``, from autograd Jacobians, particle by particle."""
    z, log_det = z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype)
    for transform in q.transforms:
        log_det = log_det + torch.stack([jacobian_log_det(transform, particle) for particle in z.detach()])
        z = transform(z)
    return z, log_det


@pytest.mark.parametrize("build", [iaf_posterior, planar_posterior], ids=["iaf", "planar"])
def test_flow_samples_broadcast_over_particles_and_score_themselves(build):
    """Seven particles of each of B images: each particle's density is its own change of variables."""
    posterior = randomised(build(L, 2, context_dim=C)).double()
    q = posterior(torch.randn(B, L).double(), torch.rand(B, L).double() + 0.5, torch.randn(B, C).double())
    z = q.rsample((7,))
    assert z.shape == (7, B, L)
    assert q.log_prob(z).shape == (7, B) and torch.isfinite(q.log_prob(z)).all()
    z0 = q.base_dist.sample((7,))  # (7, B, L)
    z, log_det = pushed_with_log_det(q, z0)
    expected = q.base_dist.log_prob(z0) - log_det  # (7, B)
    assert (log_det - log_det[0]).abs().max() > 0.1  # the particles' log-dets differ
    torch.testing.assert_close(q.log_prob(z), expected, atol=1e-8, rtol=1e-8)
    if build is iaf_posterior:  # inverted rather than cached: the same densities
        torch.testing.assert_close(q.log_prob(z.clone()), expected, atol=1e-8, rtol=1e-8)


def test_iaf_steps_alternate_the_order_of_the_coordinates():
    orders = [flow.nn.permutation.tolist() for flow in iaf_posterior(L, 3).flows]
    assert orders == [[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]]


@pytest.mark.parametrize("build", [iaf_posterior, planar_posterior], ids=["iaf", "planar"])
def test_point_estimate_is_the_mean_or_the_flows_image_of_the_base_mean(build):
    """The flow's image of the base mean is where the posterior's draws land as its base Gaussian narrows to a point."""
    loc, scale, context = torch.randn(B, L).double(), torch.ones(B, L).double(), torch.randn(B, C).double()
    gaussian = DiagonalGaussian()(loc, scale)
    torch.testing.assert_close(point_estimate(gaussian), gaussian.sample((20000,)).mean(0), atol=0.05, rtol=0)
    posterior = randomised(build(L, 2, context_dim=C)).double()
    estimate = point_estimate(posterior(loc, scale, context))
    narrow = posterior(loc, torch.full((B, L), 1e-9).double(), context).sample((3,))  # (3, B, L): all at the image
    for draw in narrow:
        torch.testing.assert_close(estimate, draw, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(estimate, loc, atol=0.05)


@pytest.mark.parametrize("name", ["iaf", "planar"])
def test_vae_with_a_flow_posterior_trains_with_pyro_elbos_and_generates(name):
    vae = VAE(VAEConfig(network=tiny_network(), posterior=name, flow_layers=2))
    assert vae.encoder(torch.zeros(2, 1, 28, 28))[2].shape == (2, vae.posterior.context_dim)
    x = torch.rand(16, 1, 28, 28).bernoulli()
    optimizer = pyro.optim.Adam({"lr": 1e-3})
    svi = pyro.infer.SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
    before = svi.evaluate_loss(x)
    for _ in range(30):
        svi.step(x)
    assert svi.evaluate_loss(x) < before
    flow_params = [key for key in pyro.get_param_store().keys() if key.startswith(f"{vae.name}.posterior$$$")]
    assert flow_params and all(pyro.param(key).grad is not None for key in flow_params)  # the flow trains
    # the IWAE bound of 3 particles, by hand at the same draws, with the flow's density from its Jacobians
    pyro.set_rng_seed(7)
    renyi = RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(7)  # the guide draws the base noise (3, 16, L) first
    q = vae.posterior(*vae.encoder(x))
    z0 = q.base_dist.rsample((3,)).detach()
    z, log_det = pushed_with_log_det(q, z0)
    with torch.no_grad():
        log_lik = dist.Bernoulli(logits=vae.decoder(z)).log_prob(x).flatten(-3).sum(-1)  # (3, 16)
        log_w = log_lik + dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - (q.base_dist.log_prob(z0) - log_det)
    expected = -(torch.logsumexp(log_w, 0) - math.log(3)).sum()
    assert renyi == pytest.approx(expected.item(), rel=1e-4)
    assert Predictive(vae.model, num_samples=2)(batch_size=3)["x"].shape == (2, 3, 1, 28, 28)
    assert vae.encode(x).shape == (16, 8)


def test_posterior_config_and_construction_errors():
    assert sorted(POSTERIORS) == ["gaussian", "iaf", "planar"]
    with pytest.raises(InputError, match="unknown posterior 'maf'"):
        VAEConfig(posterior="maf")
    with pytest.raises(InputError, match="flow_layers must be a positive integer"):
        VAEConfig(posterior="iaf", flow_layers=0)
    with pytest.raises(InputError, match="VampPrior .* needs posterior='gaussian'"):
        VAEConfig(posterior="iaf", prior="vamp")
    with pytest.raises(InputError, match="at least one flow"):
        FlowPosterior([], C)
    with pytest.raises(InputError, match="context_dim"):  # a flow posterior with an encoder that gives no context
        VAE(VAEConfig(network=tiny_network(), posterior="iaf"), encoder=build_encoder(tiny_network(), gaussian=True))
    with pytest.raises(InputError, match="comes with a Gaussian encoder"):
        MLPEncoder((1, 28, 28), L, context_dim=3)
    assert isinstance(make_posterior("gaussian", L, 2), DiagonalGaussian)
