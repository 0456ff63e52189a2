"""The two-layer VAE: its ELBO by hand, Pyro's tools on it, training, and clear errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from pyrovae import TwoLayerVAE, TwoLayerVAEConfig
from pyrovae.errors import InputError
from pyrovae.evaluation import evaluate, log_weights
from pyrovae.models.vae import free_bits_loss
from pyrovae.training import Trainer, TrainingConfig

from conftest import tiny_network


def small(**changes) -> TwoLayerVAE:
    return TwoLayerVAE(TwoLayerVAEConfig(network=tiny_network(latent_dim=6), top_latent_dim=3, top_hidden=(16,), **changes))


def test_elbo_matches_a_hand_computation_for_fixed_noise():
    vae = small()
    x = torch.rand(4, 1, 28, 28).bernoulli()
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z2"]["value"]  # (4, 6), (4, 3)
    with torch.no_grad():
        by_hand = (
            dist.Bernoulli(logits=vae.decoder(z1)).log_prob(x).flatten(1).sum(1)  # log p(x|z1)
            + dist.Normal(*vae.top_decoder(z2)).log_prob(z1).sum(1)  # log p(z1|z2)
            + dist.Normal(0.0, 1.0).log_prob(z2).sum(1)  # log p(z2)
            - dist.Normal(*vae.encoder(x)).log_prob(z1).sum(1)  # log q(z1|x)
            - dist.Normal(*vae.top_encoder(z1)).log_prob(z2).sum(1)  # log q(z2|z1)
        )
    pyro.set_rng_seed(3)  # Trace_ELBO runs the guide first: the same draws
    torch.testing.assert_close(torch.tensor(-Trace_ELBO().loss(vae.model, vae.guide, x)), by_hand.sum(), rtol=1e-5, atol=1e-3)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(log_weights(vae, x)[0], by_hand, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("free_bits", [0.0, 3.0, 1e4])
def test_free_bits_floor_each_layers_kl_on_its_own(free_bits):
    vae = small()
    x = torch.rand(4, 1, 28, 28).bernoulli()
    pyro.set_rng_seed(5)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z2"]["value"]
    with torch.no_grad():
        reconstruction = dist.Bernoulli(logits=vae.decoder(z1)).log_prob(x).flatten(1).sum(1).sum()
        kl1 = (dist.Normal(*vae.encoder(x)).log_prob(z1) - dist.Normal(*vae.top_decoder(z2)).log_prob(z1)).sum()
        kl2 = (dist.Normal(*vae.top_encoder(z1)).log_prob(z2) - dist.Normal(0.0, 1.0).log_prob(z2)).sum()
        pyro.set_rng_seed(5)
        loss = free_bits_loss(vae.model, vae.guide, x, free_bits=free_bits)
    floor = torch.tensor(free_bits * len(x))
    torch.testing.assert_close(loss, -reconstruction + torch.maximum(kl1, floor) + torch.maximum(kl2, floor), rtol=1e-5, atol=1e-3)


def test_two_sample_sites_in_both_programs_and_the_prior_on_z2():
    vae = small()
    x = torch.rand(5, 1, 28, 28)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    sites = lambda trace: [name for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)]  # noqa: E731
    assert sites(guide_trace) == ["z1", "z2"] and sites(model_trace) == ["z2", "z1", "x"]
    assert model_trace.nodes["z2"]["value"].shape == (5, 3) and model_trace.nodes["z1"]["value"].shape == (5, 6)
    assert vae.prior_site == "z2" and vae.prior_dim == 3 and vae.latent_dim == 6
    assert vae.encode(x).shape == (5, 6) and vae.sample(7).shape == (7, 1, 28, 28)
    assert Predictive(vae.model, num_samples=2)(batch_size=3)["x"].shape == (2, 3, 1, 28, 28)


def log_weights_by_hand(vae, x, particles):
    """``log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1)`` from torch distributions, ``(K, B)``,
    for ``K = particles`` draws of (z1, z2) from the guide's networks, in the guide's order (z1, then z2)."""
    z1 = dist.Normal(*vae.encoder(x)).rsample((particles,))  # (K, B, L1)
    z2 = dist.Normal(*vae.top_encoder(z1)).rsample()  # (K, B, L2)
    return (
        dist.Bernoulli(logits=vae.decoder(z1), validate_args=False).log_prob(x).flatten(-3).sum(-1)
        + dist.Normal(*vae.top_decoder(z2)).log_prob(z1).sum(-1)
        + dist.Normal(0.0, 1.0).log_prob(z2).sum(-1)
        - dist.Normal(*vae.encoder(x)).log_prob(z1).sum(-1)
        - dist.Normal(*vae.top_encoder(z1)).log_prob(z2).sum(-1)
    )


def test_pyro_svi_and_the_iwae_bound_train_it(mnist):
    vae = small()
    x = mnist.train[:64]
    iwae = RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    # the bound Pyro computes is the log-mean-exp of the weights of both layers, by hand at the same draws
    pyro.set_rng_seed(4)
    loss = iwae.loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(4)
    with torch.no_grad():
        expected = -(torch.logsumexp(log_weights_by_hand(vae, x, 3), 0) - math.log(3)).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), iwae)
    start = {name: p.detach().clone() for name, p in vae.named_parameters()}
    before = svi.evaluate_loss(x)
    for _ in range(40):
        svi.step(x)
    assert svi.evaluate_loss(x) < before - 50
    assert all(not torch.equal(p, start[name]) for name, p in vae.named_parameters())  # the top layer's networks too
    names = {key.split("$$$")[0] for key in pyro.get_param_store().keys()}
    assert {f"{vae.name}.{part}" for part in ("encoder", "decoder", "top_encoder", "top_decoder")} <= names


def test_trainer_and_evaluation(mnist):
    vae = small()
    history = Trainer(vae, TrainingConfig(epochs=2, batch_size=50, progress=False)).fit(mnist.train[:300])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    torch.manual_seed(2)
    results = evaluate(vae, mnist, num_samples=20)
    assert results["nll"] <= -results["elbo"] + 1.0  # the importance-sampled bound is tighter than the ELBO (up to noise)
    assert results["prior_mmd"] >= 0 and 0 <= results["probe_accuracy"] <= 1
    # both figures by hand, from the weights of both layers: the ELBO at evaluate's own draws (its first), the NLL
    # with draws of its own (the same estimator: 20 samples of each of 300 images; it scatters by ~0.1 nats)
    vae.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        assert results["elbo"] == pytest.approx(log_weights_by_hand(vae, mnist.test, 1).mean().item(), rel=1e-5)
        nll = -(torch.logsumexp(log_weights_by_hand(vae, mnist.test, 20), 0) - math.log(20)).mean()
    assert results["nll"] == pytest.approx(nll.item(), abs=1.0)


def test_config_errors():
    with pytest.raises(InputError, match="does not offer the VampPrior"):
        TwoLayerVAEConfig(prior="vamp")
    with pytest.raises(InputError, match="top_latent_dim"):
        TwoLayerVAEConfig(top_latent_dim=0)
    with pytest.raises(InputError, match="top_hidden"):
        TwoLayerVAEConfig(top_hidden=(10, -1))
    with pytest.raises(InputError, match="needs a TwoLayerVAEConfig"):
        TwoLayerVAE(tiny_network())
    assert TwoLayerVAEConfig().network.latent_dim == 100


@pytest.mark.parametrize("tanh_init", ["glorot", "pytorch"])
def test_the_top_layers_networks_start_as_the_network_config_says(tanh_init):
    torch.manual_seed(0)
    model = TwoLayerVAE(TwoLayerVAEConfig(network=tiny_network(latent_dim=6, activation="tanh", tanh_init=tanh_init), top_latent_dim=3, top_hidden=(16,)))
    for net in (model.encoder, model.decoder, model.top_encoder, model.top_decoder):
        biases_zero = [bool((layer.bias == 0).all()) for layer in net.layers]
        assert biases_zero == [tanh_init == "glorot"] * len(net.layers)  # Glorot's start zeroes biases, PyTorch's does not


class _Copy(torch.nn.Module):
    """A stochastic layer that copies its input, ``(..., L) -> (loc, scale)`` with loc = the input: layers fully coupled."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return z + self.shift, torch.full_like(z, self.scale)


def test_the_mean_field_elbo_is_refused_it_would_estimate_another_objective():
    """q(z2|z1) depends on z1, and TraceMeanField_ELBO integrates z1's KL as if it did not."""
    with pytest.raises(InputError, match="meanfield"):
        TwoLayerVAEConfig(elbo="meanfield")
    torch.manual_seed(0)
    vae = TwoLayerVAE(TwoLayerVAEConfig(network=tiny_network(latent_dim=3), top_latent_dim=3, top_hidden=(8,)),
                      top_encoder=_Copy(0.05), top_decoder=_Copy(0.05))
    x = torch.rand(8, 1, 28, 28).bernoulli()
    losses = []
    for elbo in (Trace_ELBO, TraceMeanField_ELBO):
        pyro.set_rng_seed(0)
        with torch.no_grad(), pyro.validation_enabled(False):
            losses.append(elbo(num_particles=1000, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x) / len(x))
    assert losses[1] > losses[0] + 100  # seen: 1353 nats against 557
