"""The Pyro VAE: shapes, devices, the ELBO it defines (checked against torch.distributions),
use inside a plain SVI loop, user priors and likelihoods, training on real MNIST, bad input."""

import dataclasses
import functools
import itertools
import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import (
    SVI, JitTrace_ELBO, JitTraceGraph_ELBO, JitTraceMeanField_ELBO, Predictive, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO,
)
from torch import nn
from torch.distributions import Normal, constraints, kl_divergence

from conftest import capturing, cuda, reference_prior, tiny_network
from pyrovae.data import batches
from pyrovae.errors import InputError
from pyrovae.likelihoods import LIKELIHOODS, BernoulliLikelihood, NormalLikelihood
from pyrovae.models import MODELS, VAE, VAEConfig, build_model, config_from_dict, config_to_dict
from pyrovae.models.vae import ELBOS, free_bits_loss
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS
from pyrovae.training import Trainer, TrainingConfig

L = 8


def make_vae(**changes) -> VAE:
    return VAE(VAEConfig(network=tiny_network(), **changes))


def log_weights(vae: VAE, x, z):
    """Independent of Pyro: ``(log p(x|z), log p(z), log q(z|x))`` for a Normal prior and Bernoulli likelihood.

    ``x: (B, C, H, W)``, ``z: (..., B, L)``; each result ``(..., B)``.
    """
    loc, scale = vae.encoder(x)
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    log_p = Normal(torch.zeros(()), torch.ones(())).log_prob(z).sum(-1)
    logits = vae.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").flatten(-3).sum(-1)
    return log_lik, log_p, log_q


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "network",
    [tiny_network(), tiny_network(conv=True), tiny_network(input_shape=(3, 32, 32)), tiny_network(input_shape=(3, 32, 32), conv=True)],
    ids=["mlp-1x28x28", "conv-1x28x28", "mlp-3x32x32", "conv-3x32x32"],
)
def test_shapes(network):
    vae = VAE(VAEConfig(network=network))
    shape = network.input_shape
    x = torch.rand(5, *shape)
    z = vae.encode(x)
    assert z.shape == (5, L)
    assert vae.decode(z).shape == (5, *shape)
    recon = vae.reconstruct(x)
    assert recon.shape == (5, *shape) and not recon.requires_grad
    assert 0 <= recon.min() and recon.max() <= 1  # Bernoulli means, not logits
    samples = vae.sample(7)
    assert samples.shape == (7, *shape)
    path = vae.interpolate(x[0], x[1], steps=6)
    assert path.shape == (6, *shape)
    torch.testing.assert_close(path[0], vae.reconstruct(x[:1])[0])
    torch.testing.assert_close(path[-1], vae.reconstruct(x[1:2])[0])
    assert vae.input_shape == shape and vae.latent_dim == L
    loss = Trace_ELBO().loss(vae.model, vae.guide, x)
    assert math.isfinite(loss)


def test_encode_is_the_posterior_mean():
    vae = make_vae()
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(vae.encode(x), vae.encoder(x)[0])


def test_sample_and_interpolate_errors():
    vae = make_vae()
    with pytest.raises(ValueError, match="n must be positive"):
        vae.sample(0)
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="steps must be at least 2"):
        vae.interpolate(x[0], x[1], steps=1)


# --------------------------------------------------------------------------- devices


def all_tensors(module: nn.Module):
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_to_moves_parameters_and_buffers(prior):
    vae = VAE(VAEConfig(network=tiny_network(), prior=prior), likelihood=NormalLikelihood(0.2))
    names = set(all_tensors(vae))
    assert "likelihood.raw_scale" in names and any(name.startswith("prior.") for name in names)
    vae.to("meta")  # a device of its own, on any machine
    assert {name for name, t in all_tensors(vae).items() if t.device.type != "meta"} == set()
    assert vae.device.type == "meta"


def test_double_precision_reaches_prior_and_likelihood():
    vae = VAE(VAEConfig(network=tiny_network(), prior="laplace"), likelihood=NormalLikelihood(0.2)).double()
    assert vae.prior().sample().dtype == torch.float64
    assert vae.likelihood.scale.dtype == torch.float64
    assert vae.sample(2).dtype == torch.float64
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, torch.rand(4, 1, 28, 28, dtype=torch.float64))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)


@cuda
@pytest.mark.parametrize("conv", [False, True])
def test_runs_on_cuda(conv):
    vae = VAE(VAEConfig(network=tiny_network(conv=conv), prior="mixture"), likelihood=NormalLikelihood(0.2, learn_scale=True)).to("cuda")
    assert {t.device.type for t in all_tensors(vae).values()} == {"cuda"}
    x = torch.rand(6, 1, 28, 28, device="cuda")
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(x, num_data=100))
    assert vae.sample(3).device.type == "cuda"
    assert vae.interpolate(x[0], x[1], steps=3).device.type == "cuda"
    assert vae.reconstruct(x).device.type == "cuda"


# --------------------------------------------------------------------------- the ELBO


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_gradients_reach_every_parameter(conv, images):
    vae = VAE(VAEConfig(network=tiny_network(conv=conv), prior="mixture"), likelihood=NormalLikelihood(0.3, learn_scale=True))
    names = {name for name, _ in vae.named_parameters()}
    assert {"prior.logits", "prior.locs", "prior.raw_scales", "likelihood.raw_scale"} <= names
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, images[:8]).backward()
    for name, param in vae.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("beta, num_data", [(1.0, None), (0.0, None), (2.5, 1000)])
def test_trace_elbo_equals_hand_computed_elbo_at_the_same_z(beta, num_data, images):
    vae = make_vae(beta=beta)
    x = images[:8]
    draws = []
    loss = Trace_ELBO().differentiable_loss(vae.model, capturing(vae.guide, draws), x, num_data=num_data)
    log_lik, log_p, log_q = log_weights(vae, x, draws[0])
    scale = (num_data or len(x)) / len(x)
    expected = -scale * (log_lik + beta * (log_p - log_q)).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("beta, num_data", [(1.0, None), (0.0, None), (2.5, 1000)])
def test_mean_field_elbo_equals_analytic_kl_plus_reconstruction(beta, num_data, images):
    vae = make_vae(beta=beta)
    x = images[:8]
    draws = []
    loss = TraceMeanField_ELBO().differentiable_loss(vae.model, capturing(vae.guide, draws), x, num_data=num_data)
    log_lik, _, _ = log_weights(vae, x, draws[0])
    loc, scale = vae.encoder(x)
    kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)
    expected = -(num_data or len(x)) / len(x) * (log_lik - beta * kl).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("beta, num_data", [(1.0, None), (0.5, 1000)])
@pytest.mark.parametrize("free_bits", [0.0, 1.0, 1e4])
def test_free_bits_floor_the_batchs_kl_and_leave_the_reconstruction(beta, num_data, free_bits, images):
    """Kingma et al. 2016, eq. 15 with the site z as the group: -E[log p(x|z)] + beta * max(KL, free_bits), the
    KL averaged over the batch, scaled to the ``num_data`` images like the ELBO; without free bits, Trace_ELBO."""
    vae = make_vae()
    vae.kl_weight = beta
    x = images[:8]
    draws = []
    pyro.set_rng_seed(1)
    loss = free_bits_loss(vae.model, capturing(vae.guide, draws), x, num_data=num_data, free_bits=free_bits)
    log_lik, log_p, log_q = log_weights(vae, x, draws[0])
    scale = (num_data or len(x)) / len(x)
    kl_per_image = (log_q - log_p).mean()
    expected = scale * (-log_lik.sum() + beta * len(x) * torch.clamp(kl_per_image, min=free_bits))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    if free_bits == 0:
        pyro.set_rng_seed(1)
        torch.testing.assert_close(loss, Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=num_data), rtol=1e-5, atol=1e-3)


def test_a_site_under_its_free_bits_gets_no_gradient_from_its_kl(images):
    """Below the floor the loss is the reconstruction term plus a constant: the same gradients as with the KL masked."""
    vae = make_vae()
    x = images[:8]
    pyro.set_rng_seed(2)
    free_bits_loss(vae.model, vae.guide, x, free_bits=1e4).backward()
    floored = {name: param.grad.clone() for name, param in vae.named_parameters()}
    vae.zero_grad()
    vae.kl_weight = 0.0  # masks the KL: only log p(x|z) is left
    pyro.set_rng_seed(2)
    Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    for name, param in vae.named_parameters():
        torch.testing.assert_close(floored[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert floored["encoder.layers.0.weight"].abs().sum() > 0  # the reconstruction still trains the encoder


def test_pyro_svi_trains_with_the_free_bits_loss(images):
    vae = make_vae()
    x = images[:32]
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), loss=functools.partial(free_bits_loss, free_bits=1.0))
    first = svi.step(x)
    for _ in range(30):
        last = svi.step(x)
    assert last < first - 100
    assert {f"{vae.name}.encoder", f"{vae.name}.decoder"} <= {key.split("$$$")[0] for key in pyro.get_param_store().keys()}


def test_training_uses_the_free_bits_and_validation_the_plain_elbo(mnist):
    vae = make_vae(free_bits=5000.0)  # far above any KL of this model: the floor binds
    history = Trainer(vae, TrainingConfig(epochs=1, batch_size=50, progress=False)).fit(mnist.train[:100], test=mnist.test[:50])
    assert history[0]["train_loss"] > 5000  # the floor counts in the training loss...
    assert history[0]["test_loss"] < 1000  # ...not in the bound it is scored by (about 540 nats here)
    pyro.set_rng_seed(3)
    plain = Trace_ELBO().differentiable_loss(vae.model, vae.guide, mnist.test[:50]) / 50
    pyro.set_rng_seed(3)
    torch.testing.assert_close(vae.validation_loss(mnist.test[:50]), plain.detach())


def test_kl_weight_can_be_changed_on_the_instance(images):
    """A trainer anneals beta by setting ``kl_weight``; with 0 only the reconstruction term is left."""
    vae = make_vae()
    vae.kl_weight = 0.0
    x = images[:8]
    draws = []
    loss = Trace_ELBO().differentiable_loss(vae.model, capturing(vae.guide, draws), x)
    log_lik, _, _ = log_weights(vae, x, draws[0])
    torch.testing.assert_close(loss, -log_lik.sum(), rtol=1e-5, atol=1e-3)


def test_trace_elbo_agrees_with_an_independent_monte_carlo_estimate(images):
    vae = make_vae()
    x = images[:8]
    particles = 2000
    with torch.no_grad():
        pyro_loss = Trace_ELBO(num_particles=particles, vectorize_particles=True).loss(vae.model, vae.guide, x)
        loc, scale = vae.encoder(x)
        z = Normal(loc, scale).sample((particles,))  # (P, B, L), drawn by torch, not Pyro
        log_lik, log_p, log_q = log_weights(vae, x, z)
        per_draw = -(log_lik + log_p - log_q).sum(-1)  # (P,) one-sample estimates of the loss
    mean, sd = per_draw.mean().item(), per_draw.std().item()
    tolerance = 4 * sd * math.sqrt(2 / particles)  # two independent means, four standard errors
    assert abs(pyro_loss - mean) < tolerance, (pyro_loss, mean, tolerance)
    # and both sit above the exact-KL value by no more than noise: E[log q - log p] = KL
    kl = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum()
    assert abs((-log_lik.sum(-1).mean() + kl).item() - mean) < 4 * sd / math.sqrt(particles)


@pytest.mark.parametrize("vectorize", [False, True])
def test_iwae_bound_equals_hand_computed_importance_weights(vectorize, images):
    vae = make_vae()
    x = images[:6]
    k = 5
    draws = []
    loss = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=vectorize).loss(vae.model, capturing(vae.guide, draws), x)
    z = draws[-1] if vectorize else torch.stack(draws)  # (k, B, L); a vectorized ELBO first runs the guide once alone
    assert z.shape == (k, 6, L)
    with torch.no_grad():
        log_lik, log_p, log_q = log_weights(vae, x, z)
        expected = -(torch.logsumexp(log_lik + log_p - log_q, dim=0) - math.log(k)).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_num_data_scales_the_whole_loss(images):
    vae = make_vae()
    x = images[:8]
    pyro.set_rng_seed(3)
    plain = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    scaled = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=300)
    torch.testing.assert_close(scaled, plain * 300 / 8)


# --------------------------------------------------------------------------- in a user's SVI loop


def test_plain_svi_loop_trains_every_parameter_through_the_param_store(images):
    vae = VAE(VAEConfig(network=tiny_network(), prior="mixture"), likelihood=NormalLikelihood(0.3, learn_scale=True))
    start = {name: p.detach().clone() for name, p in vae.named_parameters()}
    x = images[:64]
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True)

    def evaluate():
        pyro.set_rng_seed(1)
        return elbo.loss(vae.model, vae.guide, x)

    before = evaluate()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 3e-3}), Trace_ELBO())
    for _ in range(40):
        svi.step(x)
    after = evaluate()
    assert after < before - 0.05 * abs(before), (before, after)
    for name, param in vae.named_parameters():
        assert not torch.equal(param, start[name]), f"{name} was not trained"
    store = pyro.get_param_store()
    for name, param in vae.named_parameters():  # the store holds the module's own tensors
        part, rest = name.split(".", 1)
        assert store[f"{vae.name}.{part}$$${rest}"] is param


def test_default_names_are_unique_and_a_taken_name_is_refused():
    a, b = make_vae(), make_vae()
    assert a.name != b.name
    with pytest.raises(InputError, match=f"another VAE in this process is called '{a.name}'"):
        VAE(VAEConfig(network=tiny_network()), name=a.name)
    with pytest.raises(InputError, match="without"):
        VAE(VAEConfig(network=tiny_network()), name="a$$$b")
    named = VAE(VAEConfig(network=tiny_network()), name="mine")
    named.guide(torch.rand(2, 1, 28, 28))
    assert any(key.startswith("mine.encoder$$$") for key in pyro.get_param_store().keys())


def test_two_vaes_trained_side_by_side_do_not_interfere(images):
    """A trained alone, and A trained with B's steps in between (same seeds for A's steps): the same bits."""
    x = images[:16]

    def steps_of_a(vae, other=None):
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        other_svi = None if other is None else SVI(other.model, other.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
        for step in range(5):
            pyro.set_rng_seed(step)
            svi.step(x)
            if other_svi is not None:
                other_svi.step(1 - x)
        return {name: t.clone() for name, t in vae.state_dict().items()}

    torch.manual_seed(0)
    alone = steps_of_a(make_vae())
    torch.manual_seed(0)
    a = make_vae()
    b = make_vae()
    b.load_state_dict(a.state_dict())  # same weights, same parameter names within the modules
    b_start = {name: t.clone() for name, t in b.state_dict().items()}
    beside = steps_of_a(a, other=b)
    assert all(torch.equal(alone[name], beside[name]) for name in alone)
    assert not all(torch.equal(b_start[name], t) for name, t in b.state_dict().items())  # B trained too


# --------------------------------------------------------------------------- Pyro's tools


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
@pytest.mark.parametrize("elbo_class", [JitTrace_ELBO, JitTraceMeanField_ELBO, JitTraceGraph_ELBO])
def test_jit_elbos_train_the_vae(elbo_class, images):
    vae = make_vae()
    start = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), elbo_class(ignore_jit_warnings=True))
    losses = [svi.step(images, num_data=1000) for _ in range(30)]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5]), losses
    assert all(not torch.equal(p, start[name]) for name, p in vae.named_parameters())


def test_per_parameter_pyro_optim_settings(images):
    vae = make_vae()
    optimizer = pyro.optim.Adam(lambda module_name, param_name: {"lr": 0.0 if module_name.endswith(".decoder") else 1e-2})
    decoder = {name: p.detach().clone() for name, p in vae.decoder.named_parameters()}
    encoder = {name: p.detach().clone() for name, p in vae.encoder.named_parameters()}
    svi = SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
    for _ in range(3):
        svi.step(images)
    assert all(torch.equal(p, decoder[name]) for name, p in vae.decoder.named_parameters())
    assert all(not torch.equal(p, encoder[name]) for name, p in vae.encoder.named_parameters())


def test_pyro_optim_state_save_and_load_continues_training_exactly(images, tmp_path):
    def run(split: bool):
        torch.manual_seed(0)
        vae = make_vae()
        optimizer = pyro.optim.Adam({"lr": 1e-2})
        svi = SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
        pyro.set_rng_seed(1)
        for step in range(6):
            if split and step == 3:
                optimizer.save(tmp_path / "optim.pt")
                optimizer = pyro.optim.Adam({"lr": 1e-2})
                optimizer.load(tmp_path / "optim.pt")
                svi = SVI(vae.model, vae.guide, optimizer, Trace_ELBO())
            svi.step(images)
        return vae.state_dict()

    straight, resumed = run(split=False), run(split=True)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_param_store_save_and_load_round_trip(images, tmp_path):
    vae = make_vae()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(images)
    trained = {name: t.clone() for name, t in vae.state_dict().items()}
    parameter_names = [n for n, _ in vae.named_parameters()]
    pyro.get_param_store().save(tmp_path / "params.pt")

    name = vae.name  # a new process: a fresh model of the same name, an empty store, then load
    del vae, svi
    pyro.clear_param_store()
    fresh = VAE(VAEConfig(network=tiny_network()), name=name)
    assert not torch.equal(fresh.state_dict()["decoder.layers.0.weight"], trained["decoder.layers.0.weight"])
    pyro.get_param_store().load(tmp_path / "params.pt")
    loss = SVI(fresh.model, fresh.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO()).evaluate_loss(images)
    assert math.isfinite(loss)
    assert all(torch.equal(t, trained[name]) for name, t in fresh.state_dict().items())
    assert [n for n, _ in fresh.named_parameters()] == parameter_names  # still the module's parameters


def test_predictive_generates_images_from_the_prior():
    vae = make_vae()
    samples = Predictive(vae.model, num_samples=400)(batch_size=3)
    assert samples["z"].shape == (400, 3, L)
    assert samples["x"].shape == (400, 3, 1, 28, 28)
    assert set(samples["x"].unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():  # x | z is Bernoulli(sigmoid(decoder(z))): the pixel means agree
        expected = torch.sigmoid(vae.decoder(samples["z"])).mean((0, 1))
    observed = samples["x"].mean((0, 1))
    assert (observed - expected).abs().max() < 0.1


def test_model_returns_the_images_it_scores_or_samples(images):
    vae = make_vae()
    assert vae.model(images) is images
    assert vae.model(batch_size=5).shape == (5, 1, 28, 28)


def test_one_pyro_optimizer_can_train_two_instances_independently(images):
    a, b = make_vae(), make_vae()
    x = images[:16]
    optimizer = pyro.optim.Adam({"lr": 1e-2})
    svi_a = SVI(a.model, a.guide, optimizer, Trace_ELBO())
    svi_b = SVI(b.model, b.guide, optimizer, Trace_ELBO())
    b_start = {name: t.clone() for name, t in b.state_dict().items()}
    svi_a.step(x)
    assert all(torch.equal(t, b_start[name]) for name, t in b.state_dict().items())
    a_after = {name: t.clone() for name, t in a.state_dict().items()}
    svi_b.step(x)
    assert all(torch.equal(t, a_after[name]) for name, t in a.state_dict().items())
    assert not all(torch.equal(t, b_start[name]) for name, t in b.state_dict().items())


# --------------------------------------------------------------------------- user-defined parts


class ShiftedNormal(nn.Module):
    """A user's prior with a learnable mean."""

    def __init__(self, latent_dim):
        super().__init__()
        self.loc = nn.Parameter(torch.full((latent_dim,), 0.5))

    def forward(self):
        return dist.Normal(self.loc, 1.0).to_event(1)


class StudentT(nn.Module):
    """A user's likelihood: Student-t pixels with a learned scale."""

    support = constraints.real

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(-1.0))

    def forward(self, out):
        return dist.StudentT(4.0, out, self.log_scale.exp()).to_event(3)


def train_svi(vae, x, steps, lr=3e-3):
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(steps)]
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


@pytest.mark.parametrize("kind", ["module", "function"])
def test_user_prior_and_likelihood_plug_in_and_train(kind, images):
    latent = tiny_network().latent_dim
    if kind == "module":
        prior = ShiftedNormal(latent)
    else:
        def prior():
            return dist.Laplace(torch.zeros(latent), 1.0).to_event(1)
    vae = VAE(VAEConfig(network=tiny_network()), prior=prior, likelihood=StudentT())
    assert vae.support is constraints.real
    likelihood_start = vae.likelihood.log_scale.item()
    first, last = train_svi(vae, images[:32], steps=40)
    assert last < first
    assert vae.likelihood.log_scale.item() != likelihood_start
    if kind == "module":
        assert not torch.equal(vae.prior.loc, torch.full((latent,), 0.5))
    assert vae.sample(3).shape == (3, 1, 28, 28)


@pytest.mark.parametrize(
    "prior, message",
    [
        (lambda: dist.Normal(torch.zeros(L), 1.0), r"event_shape \(8,\), got batch_shape \(8,\) and event_shape \(\)"),
        (lambda: dist.Normal(torch.zeros(3), 1.0).to_event(1), r"event_shape \(8,\).*event_shape \(3,\)"),
        (lambda: torch.zeros(L), "not a distribution"),
    ],
)
def test_bad_prior_is_rejected_at_construction(prior, message):
    with pytest.raises(ValueError, match=message):
        VAE(VAEConfig(network=tiny_network()), prior=prior)


@pytest.mark.parametrize(
    "likelihood, message",
    [
        (lambda out: dist.Normal(out, 1.0), r"use .to_event\(3\)"),
        (lambda out: dist.Normal(out, 1.0).to_event(4), r"batch_shape \(B,\) and event_shape \(1, 28, 28\)"),
        (lambda out: out.sigmoid(), "the likelihood returned Tensor, not a distribution"),
    ],
)
def test_bad_likelihood_is_rejected_at_construction(likelihood, message):
    with pytest.raises(ValueError, match=message):
        VAE(VAEConfig(network=tiny_network()), likelihood=likelihood)


class DiscretizedLogisticPixels:
    """The discretized logistic's probability of each pixel from torch's logistic CDF (a sigmoid-transformed uniform):
    decoder output ``(B, P * C, H, W)`` with locations, raw scales (softplus + 1e-5) and mixture logits of K components."""

    def __init__(self, out, components):
        params = out.unflatten(1, (2 if components == 1 else 3 * components, -1))  # (B, P, C, H, W)
        self.loc, self.scale = params[:, :components], F.softplus(params[:, components : 2 * components]) + 1e-5  # (B, K, C, H, W)
        self.weights = torch.softmax(params[:, 2 * components :], 1) if components > 1 else torch.ones_like(self.loc)

    def log_prob(self, x):
        uniform = torch.distributions.Uniform(torch.zeros_like(self.loc), torch.ones_like(self.loc))
        transforms = [torch.distributions.SigmoidTransform().inv, torch.distributions.AffineTransform(self.loc, self.scale)]
        logistic = torch.distributions.TransformedDistribution(uniform, transforms)
        k = (x * 255).round().unsqueeze(1)  # (B, 1, C, H, W)
        upper = torch.where(k == 255, torch.ones_like(self.loc), logistic.cdf(((k + 0.5) / 255).expand_as(self.loc)))
        lower = torch.where(k == 0, torch.zeros_like(self.loc), logistic.cdf(((k - 0.5) / 255).expand_as(self.loc)))
        return (self.weights * (upper - lower)).sum(1).log()


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("prior", sorted(PRIORS))
def test_every_builtin_prior_and_likelihood(prior, likelihood, images):
    """The ELBO at the trace's z, from torch.distributions: the prior's density, the likelihood's (per pixel,
    summed), the Gaussian posterior's."""
    vae = make_vae(prior=prior, likelihood=likelihood)
    x, draws = images[:4], []
    loss = Trace_ELBO().differentiable_loss(vae.model, capturing(vae.guide, draws), x, num_data=300)
    z = draws[0]  # (4, L)
    with torch.no_grad():
        out = vae.decoder(z)  # (4, 1, 28, 28): logits or locations
        pixels = {
            "bernoulli": lambda: torch.distributions.Bernoulli(logits=out, validate_args=False),  # grey levels: minus the BCE
            "continuous_bernoulli": lambda: torch.distributions.ContinuousBernoulli(logits=out),
            "normal": lambda: torch.distributions.Normal(out, vae.likelihood.scale),
            "laplace": lambda: torch.distributions.Laplace(out, vae.likelihood.scale),
            "discretized_logistic": lambda: DiscretizedLogisticPixels(out, 1),
            "discretized_logistic_mixture": lambda: DiscretizedLogisticPixels(out, 5),
        }[likelihood]()
        log_lik = pixels.log_prob(x).flatten(1).sum(1)
        log_p = reference_prior(prior, vae.prior, L).log_prob(z)
        log_q = Normal(*vae.encoder(x)).log_prob(z).sum(1)
        torch.testing.assert_close(vae.likelihood(out).log_prob(x), log_lik)
        torch.testing.assert_close(vae.prior().log_prob(z), log_p)
    torch.testing.assert_close(loss.detach(), -(300 / 4) * (log_lik + log_p - log_q).sum(), rtol=1e-5, atol=1e-2)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters())
    assert vae.sample(2).shape == (2, 1, 28, 28)


# --------------------------------------------------------------------------- training on real MNIST


@pytest.mark.parametrize("likelihood", ["discretized_logistic", "discretized_logistic_mixture"])
def test_a_vae_with_the_discretized_logistic_trains_under_svi_and_has_finite_bits_per_dim(likelihood, mnist):
    """MNIST's grey levels are 8-bit values k / 255; conv networks, as for colour images."""
    from pyrovae.evaluation import test_elbo

    vae = VAE(VAEConfig(network=tiny_network(conv=True), likelihood=likelihood))
    assert vae.decoder(torch.zeros(1, L)).shape == (1, vae.likelihood.outputs_per_value, 28, 28)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    before = test_elbo(vae, mnist.test[:])
    for x in itertools.islice(itertools.cycle(batches(mnist.train, 32, shuffle=False)), 30):
        svi.step(x, num_data=len(mnist.train))
    after = test_elbo(vae, mnist.test[:])
    assert after["elbo"] > before["elbo"] + 150, (before, after)  # about -1470 -> -1130 nats per image
    assert math.isfinite(after["bits_per_dim"])
    assert after["bits_per_dim"] == pytest.approx(-after["elbo"] / (784 * math.log(2)))  # 8-bit values: no offset


def test_a_colour_vae_at_64x64_with_a_mixture_of_discretized_logistics():
    vae = VAE(VAEConfig(network=tiny_network(input_shape=(3, 64, 64), conv=True), likelihood="discretized_logistic_mixture"))
    x = torch.randint(0, 256, (4, 3, 64, 64)) / 255
    assert vae.decoder(vae.encode(x)).shape == (4, 15 * 3, 64, 64)  # 5 components: location, scale and weight each
    means = vae.reconstruct(x)
    assert means.shape == x.shape and 0 <= means.min() and means.max() <= 1
    drawn = Predictive(vae.model, num_samples=2)(batch_size=3)["x"]
    assert drawn.shape == (2, 3, 3, 64, 64) and torch.equal(drawn * 255, (drawn * 255).round())
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, x))
    with pytest.raises(InputError, match="outside the likelihood's support EightBit"):
        Trace_ELBO().loss(vae.model, vae.guide, x + 0.3 / 255)  # grey levels between the 8-bit values


def test_short_training_run_lowers_the_loss(mnist):
    vae = make_vae()
    data = mnist.train[:]  # 300 images
    elbo = Trace_ELBO()

    def loss_per_image():
        pyro.set_rng_seed(1)
        with torch.no_grad():
            return sum(elbo.loss(vae.model, vae.guide, x) for x in batches(data, 100, shuffle=False)) / len(data)

    before = loss_per_image()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    with pyro.validation_enabled(False):  # the data was checked once, above
        for _ in range(4):
            for x in batches(data, 32, generator):
                optimizer.zero_grad()
                elbo.differentiable_loss(vae.model, vae.guide, x, num_data=len(data)).backward()
                optimizer.step()
    after = loss_per_image()
    assert after < 0.7 * before, (before, after)  # ~545 -> ~260 nats per image


# --------------------------------------------------------------------------- bad input and config


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.rand(4, 784), r"expected images of shape \(B, 1, 28, 28\), got \(4, 784\)"),
        (torch.rand(4, 3, 28, 28), r"got \(4, 3, 28, 28\)"),
        (torch.randint(0, 256, (4, 1, 28, 28)), "floating-point"),
        (torch.full((4, 1, 28, 28), math.nan), "NaN"),
        (torch.full((4, 1, 28, 28), 1.5), "outside the likelihood's support"),
        (torch.full((4, 1, 28, 28), -0.1), "outside the likelihood's support"),
    ],
)
def test_bad_input_is_named(x, message):
    vae = make_vae()
    with pytest.raises(ValueError, match=message):
        Trace_ELBO().loss(vae.model, vae.guide, x)
    with pytest.raises(ValueError, match=message):
        vae.guide(x)


def test_strict_bernoulli_rejects_grey_levels():
    vae = VAE(VAEConfig(network=tiny_network()), likelihood=BernoulliLikelihood(strict=True))
    with pytest.raises(ValueError, match="outside the likelihood's support"):
        Trace_ELBO().loss(vae.model, vae.guide, torch.full((4, 1, 28, 28), 0.5))
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, torch.bernoulli(torch.full((4, 1, 28, 28), 0.5))))


def test_checks_follow_the_likelihood_and_pyro_validation():
    x = torch.full((4, 1, 28, 28), 1.5)
    vae = make_vae(likelihood="normal")  # real support: 1.5 is fine
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, x))
    vae = make_vae()
    with pyro.validation_enabled(False):  # the user turned checks off: no ValueError
        vae.guide(x)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(prior="cauchy"), r"unknown prior 'cauchy'; choose from \['laplace', 'mixture', 'normal', 'student_t', 'vamp'\]"),
        (dict(likelihood="poisson"), "unknown likelihood 'poisson'; choose from"),
        (dict(beta=-1.0), "beta must be a non-negative number"),
        (dict(beta=math.nan), "beta must be a non-negative number"),
        (dict(elbo="renyi"), "unknown elbo 'renyi'"),
        (dict(num_particles=0), "num_particles must be a positive integer"),
        (dict(kl_warmup_epochs=-1), "kl_warmup_epochs must be a non-negative integer"),
        (dict(elbo="iwae", beta=0.5), r"IWAE bound .* beta=1 and no KL warm-up"),
        (dict(elbo="iwae", kl_warmup_epochs=2), r"IWAE bound .* beta=1 and no KL warm-up"),
        (dict(free_bits=-1.0), "free_bits must be a non-negative number"),
        (dict(free_bits=math.nan), "free_bits must be a non-negative number"),
        (dict(free_bits=2.0, elbo="iwae"), r"free bits .* need elbo='trace' and num_particles=1"),
        (dict(free_bits=2.0, elbo="meanfield"), r"free bits .* need elbo='trace' and num_particles=1"),
        (dict(free_bits=2.0, num_particles=3), r"free bits .* need elbo='trace' and num_particles=1"),
        (dict(network=dict(latent_dim=0)), "latent_dim must be a positive integer"),
    ],
)
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig(**changes)


def test_config_round_trips_through_json():
    config = VAEConfig(network=tiny_network(conv=True), prior="laplace", likelihood="normal", beta=0.5)
    rebuilt = config_from_dict("vae", json.loads(json.dumps(config_to_dict(config))))
    assert rebuilt == config
    vae = build_model("vae", rebuilt)
    assert isinstance(vae, VAE) and vae.config == config and vae.kl_weight == 0.5


def test_model_registry_errors():
    assert set(MODELS) == {"vae", "vae2", "hvae", "cvae", "m2", "gmvae", "aae", "ae", "sparse", "stacked", "denoising"}
    with pytest.raises(ValueError, match=r"unknown model 'gan'; choose from \['aae', 'ae', 'cvae', 'denoising', 'gmvae', 'hvae', 'm2', 'sparse', 'stacked', 'vae', 'vae2'\]"):
        build_model("gan")
    with pytest.raises(ValueError, match="not a VAEConfig"):
        config_from_dict("vae", {"nonsense": 1})


#: the ELBOs each model takes (the table in VAEConfig's docs); vae2 refuses TraceMeanField_ELBO
ACCEPTED_ELBOS = {"vae": ("trace", "meanfield", "iwae"), "cvae": ("trace", "meanfield", "iwae"), "vae2": ("trace", "iwae"), "hvae": ("trace", "iwae"), "m2": ("trace",), "gmvae": ("trace",)}


def _elbo_cases():
    network = tiny_network(latent_dim=3, hidden=(16,))
    for posterior in POSTERIORS:
        yield "vae", dict(network=network, posterior=posterior)
    for prior in PRIORS:
        yield "vae", dict(network=network, prior=prior, num_pseudo_inputs=4)
    yield "cvae", dict(network=network)
    yield "cvae", dict(network=network, posterior="iaf")
    yield "vae2", dict(network=network, top_latent_dim=2, top_hidden=(8,))
    yield "hvae", dict(network=network, top_latent_dim=2, num_pseudo_inputs=4)


def test_the_elbo_table_names_every_model_that_takes_an_elbo():
    takes_elbo = sorted(name for name, (_, config_class) in MODELS.items() if "elbo" in {f.name for f in dataclasses.fields(config_class)})
    assert takes_elbo == sorted(ACCEPTED_ELBOS)


@pytest.mark.parametrize("name, options", list(_elbo_cases()), ids=lambda v: v if isinstance(v, str) else "-".join(
    str(v[k]) for k in ("prior", "posterior") if k in v))
def test_every_elbo_a_model_accepts_estimates_its_elbo(name, options):
    """Each accepted (model, ELBO) pair estimates the model's ELBO (the IWAE bound: at least as high); the others are refused."""
    config_class = MODELS[name][1]
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28).bernoulli()
    condition = {"y": torch.arange(8) % 10} if name == "cvae" else {}
    losses = {}
    for elbo in ELBOS:
        if elbo not in ACCEPTED_ELBOS[name]:
            with pytest.raises(InputError, match=elbo):
                config_class(elbo=elbo, **options)
            continue
        torch.manual_seed(1)  # the same weights for each ELBO
        model = build_model(name, config_class(elbo=elbo, num_particles=2000, **options))
        pyro.set_rng_seed(2)
        with torch.no_grad():
            losses[elbo] = model.elbo.loss(model.model, model.guide, x, **condition) / len(x)
    if "meanfield" in losses:  # analytic KL where torch knows it, Monte Carlo where not: the same bound (seen: within 0.01 nats)
        assert losses["meanfield"] == pytest.approx(losses["trace"], abs=0.1)
    assert losses["iwae"] <= losses["trace"] + 0.1
