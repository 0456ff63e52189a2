"""The hierarchical VAE (Tomczak and Welling's HVAE): its ELBO by hand, the VampPrior on z2, its likelihood on a toy
against quadrature, active units of both layers, Pyro's tools, training, and clear errors."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, JitTrace_ELBO, Predictive, RenyiELBO, Trace_ELBO

from pyrovae import HierarchicalVAE, HierarchicalVAEConfig, NetworkConfig
from pyrovae.data import load_dataset
from pyrovae.errors import InputError
from pyrovae.evaluation import active_units, evaluate, log_likelihood, log_weights
from pyrovae.models import build_model
from pyrovae.models.vae import free_bits_loss
from pyrovae.training import Trainer, TrainingConfig, load_model

from conftest import tiny_network


def small(**changes) -> HierarchicalVAE:
    values = dict(network=tiny_network(latent_dim=6, hidden=(16, 12), activation="tanh"), top_latent_dim=3, num_pseudo_inputs=4)
    values.update(changes)
    return HierarchicalVAE(HierarchicalVAEConfig(**values))


def vamp_log_prob(vae, z2: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k q(z2 | u_k) for ``z2: (B, L2)``, from the encoder of q(z2|x) at the pseudo-inputs: ``(B,)``."""
    loc, scale = vae.encoder(vae.prior.pseudo_inputs)  # (K, L2) each
    per_component = dist.Normal(loc, scale).log_prob(z2.unsqueeze(-2)).sum(-1)  # (B, K)
    return torch.logsumexp(per_component, dim=-1) - math.log(len(loc))


def test_elbo_matches_a_hand_computation_for_fixed_noise():
    vae = small()
    x = torch.rand(4, 1, 28, 28).bernoulli()
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z2"]["value"]  # (4, 6), (4, 3)
    with torch.no_grad():
        by_hand = (
            dist.Bernoulli(logits=vae.decoder(z1, z2)).log_prob(x).flatten(1).sum(1)  # log p(x|z1, z2)
            + dist.Normal(*vae.top_decoder(z2)).log_prob(z1).sum(1)  # log p(z1|z2)
            + vamp_log_prob(vae, z2)  # log p(z2), the VampPrior
            - dist.Normal(*vae.encoder(x)).log_prob(z2).sum(1)  # log q(z2|x)
            - dist.Normal(*vae.bottom_encoder(x.flatten(1), z2)).log_prob(z1).sum(1)  # log q(z1|x, z2)
        )
    pyro.set_rng_seed(3)  # Trace_ELBO runs the guide first: the same draws
    torch.testing.assert_close(torch.tensor(-Trace_ELBO().loss(vae.model, vae.guide, x)), by_hand.sum(), rtol=1e-5, atol=1e-3)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        torch.testing.assert_close(log_weights(vae, x)[0], by_hand, rtol=1e-5, atol=1e-3)


def test_the_decoder_reads_both_latents_and_q_z1_reads_the_image_and_z2():
    vae = small()
    z1, z2 = torch.randn(2, 6), torch.randn(2, 3)
    x = torch.rand(2, 1, 28, 28).bernoulli()
    with torch.no_grad():
        assert not torch.allclose(vae.decoder(z1, z2), vae.decoder(z1, z2 + 1.0))
        assert not torch.allclose(vae.decoder(z1, z2), vae.decoder(z1 + 1.0, z2))
        assert not torch.allclose(vae.bottom_encoder(x.flatten(1), z2)[0], vae.bottom_encoder(x.flatten(1), z2 + 1.0)[0])
        assert not torch.allclose(vae.bottom_encoder(x.flatten(1), z2)[0], vae.bottom_encoder(1 - x.flatten(1), z2)[0])


def test_a_colour_hierarchical_vae_with_the_discretized_logistic_gets_its_decoder_outputs():
    config = HierarchicalVAEConfig(network=NetworkConfig(input_shape=(3, 8, 8), latent_dim=4, hidden=(16,)), top_latent_dim=2,
                                   prior="normal", likelihood="discretized_logistic_mixture")
    vae = HierarchicalVAE(config)
    assert vae.decoder(torch.zeros(2, 4), torch.zeros(2, 2)).shape == (2, 15 * 3, 8, 8)  # 5 components: location, scale, weight
    x = torch.randint(0, 256, (4, 3, 8, 8)) / 255
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, x))
    assert vae.sample(2).shape == (2, 3, 8, 8)


def test_the_vampprior_on_z2_is_the_mixture_of_the_guides_q_z2_at_the_pseudo_inputs():
    vae = small()
    with torch.no_grad():  # as training moves the encoder of q(z2|x), the prior moves with it: one network, not a copy
        for layer in vae.encoder.layers:
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    u = vae.prior.pseudo_inputs.detach()  # (K, 1, 28, 28)
    with torch.no_grad():
        prior = vae.prior()
        q_at_u = poutine.trace(vae.guide).get_trace(u).nodes["z2"]["fn"]  # the guide's own q(z2|x), at x = u_k
        components = prior.component_distribution
        torch.testing.assert_close(components.base_dist.loc, q_at_u.base_dist.loc)
        torch.testing.assert_close(components.base_dist.scale, q_at_u.base_dist.scale)
        z2 = torch.randn(5, 3)
        torch.testing.assert_close(prior.log_prob(z2), vamp_log_prob(vae, z2))
    # the pseudo-inputs are trained with the model: the ELBO's gradient reaches them
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, torch.rand(4, 1, 28, 28).bernoulli())
    loss.backward()
    assert vae.prior.raw_pseudo_inputs.grad is not None and vae.prior.raw_pseudo_inputs.grad.abs().sum() > 0


def _quadrature_log_p(vae, x: torch.Tensor, points: int = 1201, half_width: float = 9.0) -> torch.Tensor:
    """log p(x) of each image of ``x: (N, 1, 1, 3)`` for a model with L1 = L2 = 1, by the trapezoid rule on a grid of
    ``points`` x ``points`` values of (z1, z2) in [-half_width, half_width]^2: ``(N,)``."""
    grid = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    z2 = grid.repeat_interleave(points).unsqueeze(-1)  # (P*P, 1)
    z1 = grid.repeat(points).unsqueeze(-1)  # (P*P, 1)
    with torch.no_grad():
        log_joint_z = vamp_log_prob(vae, z2) + dist.Normal(*vae.top_decoder(z2)).log_prob(z1).sum(-1)  # (P*P,)
        logits = vae.decoder(z1, z2)  # (P*P, 1, 1, 3)
        log_px = dist.Bernoulli(logits=logits.unsqueeze(1)).log_prob(x).flatten(2).sum(-1)  # (P*P, N)
    weights = torch.full((points,), 1.0, dtype=torch.float64)
    weights[0] = weights[-1] = 0.5
    log_cell = torch.log(torch.outer(weights, weights).flatten()) + 2 * math.log(grid[1] - grid[0])  # (P*P,)
    return torch.logsumexp(log_joint_z.unsqueeze(-1) + log_px + log_cell.unsqueeze(-1), dim=0)


def test_the_importance_sampled_likelihood_of_a_toy_matches_quadrature():
    """Three binary pixels, one unit in each latent layer: p(x) = int p(x|z1, z2) p(z1|z2) p(z2) dz1 dz2 on a grid."""
    network = NetworkConfig(input_shape=(1, 1, 3), latent_dim=1, hidden=(8, 8), activation="tanh")
    vae = HierarchicalVAE(HierarchicalVAEConfig(network=network, top_latent_dim=1, num_pseudo_inputs=3)).double()
    x = torch.tensor([[a, b, c] for a in (0.0, 1.0) for b in (0.0, 1.0) for c in (0.0, 1.0)], dtype=torch.float64).view(8, 1, 1, 3)
    # fitted to data of unequal frequencies, so that p(x) is far from uniform and the guide near each posterior
    # (an untrained guide makes the estimate too noisy to compare: seen 0.08 nats off with 20,000 samples)
    data = x.repeat_interleave(torch.tensor([6, 1, 1, 2, 2, 1, 1, 6]), dim=0)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(200):
        svi.step(data)
    exact = _quadrature_log_p(vae, x)
    torch.testing.assert_close(torch.logsumexp(exact, 0), torch.tensor(0.0, dtype=torch.float64), atol=1e-6, rtol=0)  # a distribution over x
    assert exact.max() - exact.min() > 1.0  # the images differ in probability: the test can see a wrong model
    torch.manual_seed(0)
    estimate = log_likelihood(vae, x, num_samples=20000)
    torch.testing.assert_close(estimate, exact, atol=0.02, rtol=0)  # seen: at most 0.01 off over four seeds


def _silence_units(gaussian_net, latent_dim: int, keep: int, scale: float = 3.0) -> None:
    """Make the loc of all but the first ``keep`` units of a Gaussian network's output constant, and the kept ones strong."""
    with torch.no_grad():
        last = gaussian_net.layers[-1]  # outputs: loc (latent_dim), then raw scale (latent_dim)
        last.weight[keep:latent_dim] = 0.0
        last.weight[:keep] *= scale


def test_active_units_are_counted_for_both_layers(mnist_dir):
    x = load_dataset("mnist", root=mnist_dir, binarize="dynamic", subset=300).test  # (300, 1, 28, 28) binary images
    vae = small()
    _silence_units(vae.encoder, 3, keep=2)  # z2: 2 of 3 units depend on x
    _silence_units(vae.bottom_encoder, 6, keep=4)  # z1: 4 of 6 units depend on (x, z2)
    assert active_units(vae, x) == {"z2": 2, "z1": 4}
    _silence_units(vae.encoder, 3, keep=0)
    _silence_units(vae.bottom_encoder, 6, keep=0)
    assert active_units(vae, x) == {"z2": 0, "z1": 0}


def test_pyro_tools_work_on_it():
    vae = small()
    x = torch.rand(8, 1, 28, 28).bernoulli()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    assert math.isfinite(svi.step(x, num_data=100))
    assert math.isfinite(RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True).loss(vae.model, vae.guide, x))
    draws = Predictive(vae.model, num_samples=5)(batch_size=2)
    assert draws["x"].shape == (5, 2, 1, 28, 28) and draws["z2"].shape == (5, 2, 3) and draws["z1"].shape == (5, 2, 6)
    names = set(pyro.get_param_store().keys())
    assert {f"{vae.name}.bottom_encoder$$$branches.0.weight", f"{vae.name}.prior$$$raw_pseudo_inputs"} <= names
    assert vae.encode(x).shape == (8, 9) and vae.reconstruct(x).shape == x.shape and vae.sample(3).shape == (3, 1, 28, 28)
    assert vae.interpolate(x[0], x[1], steps=4).shape == (4, 1, 28, 28)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_the_iwae_bound_and_the_jit_elbo_train_it():
    x = torch.rand(20, 1, 28, 28).bernoulli()
    iwae = small(elbo="iwae", num_particles=3)
    history = Trainer(iwae, TrainingConfig(epochs=2, batch_size=10, progress=False)).fit(x)
    assert all(math.isfinite(row["train_loss"]) for row in history)
    assert iwae.prior.raw_pseudo_inputs.grad is not None  # the RenyiELBO's gradients reach the VampPrior too
    vae = small()
    start = {name: p.detach().clone() for name, p in vae.named_parameters()}
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), JitTrace_ELBO(ignore_jit_warnings=True))
    assert all(math.isfinite(svi.step(x, num_data=100)) for _ in range(2))
    assert all(not torch.equal(p, start[name]) for name, p in vae.named_parameters())  # every part, the pseudo-inputs too


@pytest.mark.parametrize("free_bits", [0.0, 3.0])
def test_free_bits_floor_each_layers_kl(free_bits):
    vae = small()
    x = torch.rand(4, 1, 28, 28).bernoulli()
    pyro.set_rng_seed(5)
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    z1, z2 = guide_trace.nodes["z1"]["value"], guide_trace.nodes["z2"]["value"]
    with torch.no_grad():
        reconstruction = dist.Bernoulli(logits=vae.decoder(z1, z2)).log_prob(x).flatten(1).sum(1).sum()
        kl2 = (dist.Normal(*vae.encoder(x)).log_prob(z2).sum(1) - vamp_log_prob(vae, z2)).sum()
        kl1 = (dist.Normal(*vae.bottom_encoder(x.flatten(1), z2)).log_prob(z1) - dist.Normal(*vae.top_decoder(z2)).log_prob(z1)).sum()
        pyro.set_rng_seed(5)
        loss = free_bits_loss(vae.model, vae.guide, x, free_bits=free_bits)
    floor = torch.tensor(free_bits * len(x))
    torch.testing.assert_close(loss, -reconstruction + torch.maximum(kl1, floor) + torch.maximum(kl2, floor), rtol=1e-5, atol=1e-3)


def test_trains_saves_and_loads(tmp_path, mnist_dir):
    data = load_dataset("mnist", root=mnist_dir, binarize="dynamic", subset=100)
    vae = build_model("hvae", small().config)
    trainer = Trainer(vae, TrainingConfig(epochs=3, batch_size=20, lr=3e-3, progress=False), out_dir=tmp_path, model_name="hvae")
    history = trainer.fit(data.train, dynamic_binarization=True)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    loaded, _ = load_model(tmp_path)
    assert isinstance(loaded, HierarchicalVAE)
    torch.testing.assert_close(loaded.state_dict(), vae.state_dict())
    results = evaluate(loaded, data, num_samples=5)
    assert results["nll"] <= -results["elbo"] + 5.0 and results["bits_per_dim"] is not None


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"network": NetworkConfig(conv=True)}, "MLPs"),
        ({"posterior": "iaf", "prior": "normal"}, "diagonal Gaussians"),
        ({"top_latent_dim": 0}, "top_latent_dim"),
        ({"network": NetworkConfig(hidden=())}, "hidden layer"),
    ],
)
def test_what_does_not_apply_is_refused(changes, message):
    with pytest.raises(InputError, match=message):
        HierarchicalVAEConfig(**changes)


def test_the_paper_sizes_are_the_default():
    config = HierarchicalVAEConfig()
    assert (config.network.hidden, config.network.latent_dim, config.top_latent_dim, config.prior, config.num_pseudo_inputs) == ((300, 300), 40, 40, "vamp", 500)
    vae = HierarchicalVAE(config)
    assert [layer.out_features for layer in vae.encoder.layers] == [300, 300, 80]
    assert [layer.out_features for layer in vae.decoder.branches] == [300, 300] and [layer.out_features for layer in vae.decoder.layers] == [300, 784]
