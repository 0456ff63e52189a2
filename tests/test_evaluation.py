"""Tests of pyrovae.evaluation against quantities known in closed form.

The log-likelihood estimator is checked on a linear-Gaussian VAE, where
p(x) = N(x; b, W W^T + s^2 I) exactly and, with orthogonal columns of W, the true posterior is a
diagonal Gaussian that the VAE's guide can represent.
"""

import dataclasses
import math

import pyro
import pytest
import torch
from torch import nn
from torch.distributions import Normal

from pyrovae import AE, CVAE, VAE, AEConfig, CVAEConfig, HierarchicalVAE, HierarchicalVAEConfig, NetworkConfig, NormalLikelihood, TwoLayerVAE, TwoLayerVAEConfig, VAEConfig, VampPrior, evaluation, iaf_posterior
from pyrovae.data import ImageData
from pyrovae.errors import InputError
from pyrovae.models import MODELS, build_model
from pyrovae.training import Trainer, TrainingConfig
from pyrovae.evaluation import (
    MMD_SCALES,
    PCA,
    aggregate_posterior_samples,
    elbo_per_example,
    evaluate,
    linear_probe,
    log_likelihood,
    mmd,
    per_class_accuracy,
    prior_mmd,
    reconstruction_error,
    test_elbo,
)

SHAPE = (1, 2, 3)  # D = 6
NOISE = 0.5
# orthogonal columns (one non-zero per row) so that W^T W, hence the posterior covariance, is diagonal
WEIGHT = torch.tensor([[1.5, 0.0], [0.0, 1.0], [0.5, 0.0], [0.0, -0.8], [-1.0, 0.0], [0.0, 0.3]])
BIAS = torch.tensor([0.2, -0.1, 0.0, 0.3, 0.1, -0.2])


class LinearDecoder(nn.Module):
    """z (B, L) -> W z + b as (B, *SHAPE); counts its calls."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 6)
        with torch.no_grad():
            self.linear.weight.copy_(WEIGHT)
            self.linear.bias.copy_(BIAS)
        self.calls = 0

    def forward(self, z):
        self.calls += 1
        return self.linear(z).unflatten(-1, SHAPE)


class LinearGaussianEncoder(nn.Module):
    """x -> (A (x - b) + shift, scale): the exact posterior for shift = 0 and widen = 1."""

    def __init__(self, shift=0.0, widen=1.0):
        super().__init__()
        precision = torch.eye(2) + WEIGHT.T @ WEIGHT / NOISE**2
        covariance = torch.linalg.inv(precision)
        assert torch.allclose(covariance, torch.diag(torch.diagonal(covariance)))
        self.register_buffer("matrix", covariance @ WEIGHT.T / NOISE**2)  # (L, D)
        self.register_buffer("scale", torch.diagonal(covariance).sqrt() * widen)
        self.shift = shift

    def forward(self, x):
        loc = (x.flatten(1) - BIAS) @ self.matrix.T + self.shift
        return loc, self.scale.expand_as(loc)


def linear_vae(shift=0.0, widen=1.0):
    config = VAEConfig(network=NetworkConfig(input_shape=SHAPE, latent_dim=2), likelihood="normal")
    return VAE(config, encoder=LinearGaussianEncoder(shift, widen), decoder=LinearDecoder(), likelihood=NormalLikelihood(scale=NOISE)).eval()


def exact_log_p(x):
    covariance = WEIGHT @ WEIGHT.T + NOISE**2 * torch.eye(6)
    return torch.distributions.MultivariateNormal(BIAS, covariance).log_prob(x.flatten(1))


@pytest.fixture
def observations():
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(16, 2, generator=generator)
    x = z @ WEIGHT.T + BIAS + NOISE * torch.randn(16, 6, generator=generator)
    return x.unflatten(1, SHAPE)


def test_exact_posterior_gives_exact_log_likelihood_for_every_k(observations):
    vae = linear_vae()
    exact = exact_log_p(observations)
    # the scale goes through softplus in NormalLikelihood, so allow float32 rounding
    for k in (1, 7, 1000):
        torch.manual_seed(k)
        assert torch.allclose(log_likelihood(vae, observations, num_samples=k), exact, atol=1e-4), k


def test_estimate_converges_to_exact_value_with_an_imperfect_posterior(observations):
    vae = linear_vae(shift=0.2, widen=1.5)
    exact = exact_log_p(observations)
    torch.manual_seed(0)
    error_1 = (log_likelihood(vae, observations, num_samples=1) - exact).abs().mean().item()
    error_5000 = (log_likelihood(vae, observations, num_samples=5000) - exact).abs().mean().item()
    assert error_5000 < 0.03  # Monte Carlo error about 0.01 nats here
    assert error_5000 < error_1 / 20


def test_log_likelihood_is_above_the_elbo_on_average(observations):
    vae = linear_vae(shift=0.2, widen=1.5)
    torch.manual_seed(0)
    elbo = elbo_per_example(vae, observations.repeat(50, 1, 1, 1)).mean()
    log_p = log_likelihood(vae, observations, num_samples=500).mean()
    assert log_p > elbo + 0.3  # the gap is the mean KL(q || posterior), about 0.9 nats here
    assert log_p <= exact_log_p(observations).mean() + 0.05


def test_chunking_changes_the_noise_not_the_estimator(observations):
    vae = linear_vae(shift=0.2, widen=1.5)
    exact = exact_log_p(observations)
    estimates, calls = [], []
    for budget in (2**10, 2**14, 2**30):
        torch.manual_seed(3)
        vae.decoder.calls = 0
        estimates.append(log_likelihood(vae, observations, num_samples=2000, batch_size=4, max_memory_bytes=budget))
        calls.append(vae.decoder.calls - 3)  # two calls measure the memory one sample needs, one finds the program's sites
    assert calls[0] > calls[1] > calls[2] == len(observations) // 4  # the budgets really chunk differently
    for estimate in estimates:
        assert (estimate - exact).abs().max() < 0.05  # Monte Carlo error about 0.01 nats
    torch.manual_seed(3)
    again = log_likelihood(vae, observations, num_samples=2000, batch_size=4, max_memory_bytes=2**14)
    assert torch.equal(again, estimates[1])  # the same seed and chunking: the same draws


def test_log_likelihood_rejects_bad_arguments(observations):
    vae = linear_vae()
    with pytest.raises(ValueError, match="max_memory_bytes"):
        log_likelihood(vae, observations, num_samples=10, max_memory_bytes=8)
    with pytest.raises(ValueError, match="num_samples"):
        log_likelihood(vae, observations, num_samples=0)
    with pytest.raises(ValueError, match="shape"):
        log_likelihood(vae, observations.flatten(1), num_samples=10)


def test_elbo_is_unbiased_and_ignores_beta(observations):
    vae = linear_vae()
    many = observations[:2].repeat(4000, 1, 1, 1)  # (8000, ...) alternating the two images
    torch.manual_seed(0)
    elbo = elbo_per_example(vae, many).reshape(4000, 2).mean(0)
    # with the exact posterior, the ELBO is log p(x) (the analytic KL only moves the noise around)
    assert torch.allclose(elbo, exact_log_p(observations[:2]), atol=0.05)
    vae.kl_weight = 5.0
    torch.manual_seed(0)
    assert torch.allclose(elbo_per_example(vae, many).reshape(4000, 2).mean(0), elbo)


class PriorEncoder(nn.Module):
    """x -> (0, 1): q(z|x) is the prior, so KL = 0 and the ELBO is E_q log p(x|z)."""

    def forward(self, x):
        return torch.zeros(len(x), 2), torch.ones(len(x), 2)


class ZeroDecoder(nn.Module):
    """z -> logits 0 for every pixel: p(x|z) is a fair coin (Bernoulli) or uniform on [0, 1] (continuous Bernoulli)."""

    def forward(self, z):
        return torch.zeros(*z.shape[:-1], *SHAPE)


def coin_vae(likelihood):
    config = VAEConfig(network=NetworkConfig(input_shape=SHAPE, latent_dim=2), likelihood=likelihood)
    return VAE(config, encoder=PriorEncoder(), decoder=ZeroDecoder())


def test_a_fair_coin_per_binary_pixel_costs_one_bit():
    binary = torch.randint(0, 2, (50, *SHAPE)).float()
    result = test_elbo(coin_vae("bernoulli"), binary)
    assert result["elbo"] == pytest.approx(-6 * math.log(2), rel=1e-6)
    assert result["bits_per_dim"] == pytest.approx(1.0, rel=1e-6)


def test_a_uniform_density_on_8_bit_pixels_costs_eight_bits():
    """Density 1 on [0, 1]: log p(x) = 0 nats, and each of 256 levels has probability 1/256."""
    grey = torch.randint(0, 256, (50, *SHAPE)).float() / 255
    result = test_elbo(coin_vae("continuous_bernoulli"), grey)
    assert result["elbo"] == pytest.approx(0.0, abs=1e-4)
    assert result["bits_per_dim"] == pytest.approx(8.0, abs=1e-4)


class ConstantDiscretizedLogistic(nn.Module):
    """z -> the decoder output of a discretized logistic with location 0.4 and scale 0.1 at every value."""

    def forward(self, z):
        loc = torch.full((*z.shape[:-1], *SHAPE), 0.4)
        return torch.cat([loc, torch.full_like(loc, math.log(math.expm1(0.1 - 1e-5)))], dim=-3)


def test_bits_per_dim_of_the_discretized_logistic_are_its_nats_per_value_over_ln_2():
    """p(x|z) does not depend on z and q(z|x) is the prior, so the ELBO is log P(x) exactly, computed here by hand."""
    levels = torch.randint(0, 256, (40, *SHAPE))
    x = levels / 255
    config = VAEConfig(network=NetworkConfig(input_shape=SHAPE, latent_dim=2), likelihood="discretized_logistic")
    vae = VAE(config, encoder=PriorEncoder(), decoder=ConstantDiscretizedLogistic())
    cdf = lambda k: torch.sigmoid(((k.double() / 255) - 0.4) / 0.1)  # noqa: E731
    upper = torch.where(levels == 255, torch.ones(()).double(), cdf(levels + 0.5))
    lower = torch.where(levels == 0, torch.zeros(()).double(), cdf(levels - 0.5))
    log_p = (upper - lower).log().flatten(1).sum(1).mean().item()
    result = test_elbo(vae, x)
    assert result["elbo"] == pytest.approx(log_p, rel=1e-5)
    assert result["bits_per_dim"] == pytest.approx(-log_p / (6 * math.log(2)), rel=1e-5)


def test_bits_per_dimension_only_where_they_mean_something(observations):
    grey = torch.rand(50, *SHAPE)
    assert test_elbo(coin_vae("bernoulli"), grey)["bits_per_dim"] is None  # a relaxation, not a likelihood
    assert observations.min() < 0  # a density on data that are not 8-bit levels in [0, 1]
    result = test_elbo(linear_vae(shift=0.4), observations)
    assert result["bits_per_dim"] is None and result["elbo"] < 0


def test_elbo_without_closed_form_kl_uses_samples():
    config = VAEConfig(network=NetworkConfig(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)), prior="laplace")
    vae = VAE(config).eval()
    x = torch.rand(5, 1, 4, 4)
    draws = []  # every z the decoder is given, (K, B, 3): the draws the figures score, however they are computed
    vae.decoder.register_forward_hook(lambda module, inputs, output: draws.append(inputs[0]))
    torch.manual_seed(0)
    elbo = elbo_per_example(vae, x, batch_size=2)
    assert elbo.shape == (5,) and torch.isfinite(elbo).all()

    def log_weights_by_hand(z):  # z: (K, 5, 3) -> (K, 5), from torch.distributions: no Pyro trace involved
        with torch.no_grad():
            log_lik = torch.distributions.Bernoulli(logits=vae.decoder(z), validate_args=False).log_prob(x).flatten(-3).sum(-1)
            return log_lik + torch.distributions.Laplace(0.0, 1.0).log_prob(z).sum(-1) - Normal(*vae.encoder(x)).log_prob(z).sum(-1)

    z = torch.cat(draws, dim=1)  # the three batches' draws, (1, 5, 3)
    torch.testing.assert_close(elbo, log_weights_by_hand(z)[0])
    draws.clear()
    nll = log_likelihood(vae, x, num_samples=200)
    z = torch.cat([value for value in draws if value.shape[-2] == 5])  # every chunk's draws for x (not a probe's), (200, 5, 3)
    assert z.shape == (200, 5, 3)
    torch.testing.assert_close(nll, torch.logsumexp(log_weights_by_hand(z), 0) - math.log(200))
    draws.clear()
    torch.manual_seed(0)
    assert (log_likelihood(vae, x.repeat(40, 1, 1, 1), num_samples=200).reshape(40, 5).mean(0) > elbo_per_example(vae, x.repeat(40, 1, 1, 1)).reshape(40, 5).mean(0)).all()


def test_reconstruction_error_matches_a_direct_computation():
    torch.manual_seed(0)
    model = AE(AEConfig(network=NetworkConfig(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,)))).eval()
    x = torch.rand(7, 1, 4, 4)
    result = reconstruction_error(model, x, batch_size=3)
    with torch.no_grad():
        recon = torch.sigmoid(model.decoder(model.encoder(x)))
    mse = ((recon - x) ** 2).sum(dim=(1, 2, 3)).mean()
    bce = -(x * recon.log() + (1 - x) * (1 - recon).log()).sum(dim=(1, 2, 3)).mean()
    assert result["mse"] == pytest.approx(mse.item(), rel=1e-5)
    assert result["bce"] == pytest.approx(bce.item(), rel=1e-5)


def test_reconstruction_error_has_no_bce_outside_the_unit_interval():
    x = torch.randn(20, 1, 2, 3)
    result = reconstruction_error(PCA(6).fit(x), x)
    assert result["bce"] is None
    assert result["mse"] == pytest.approx(0.0, abs=1e-8)


def test_linear_probe_separates_separable_codes():
    generator = torch.Generator().manual_seed(0)
    centres = 4 * torch.randn(4, 5, generator=generator)

    def draw(n):
        labels = torch.arange(n) % 4
        return (centres[labels] + torch.randn(n, 5, generator=generator)).reshape(n, 1, 1, 5), labels

    train_x, train_y = draw(400)
    test_x, test_y = draw(200)
    encode = lambda x: x.flatten(1)  # noqa: E731
    assert linear_probe(encode, train_x, train_y, test_x, test_y) > 0.95
    noise = torch.randn(600, 1, 1, 5, generator=generator)  # codes that say nothing about the label
    assert linear_probe(encode, noise[:400], train_y, noise[400:], test_y) < 0.4  # chance is 0.25
    with pytest.raises(ValueError, match="labels"):
        linear_probe(encode, train_x, train_y[:10], test_x, test_y)


def test_the_probe_reports_its_accuracy_on_each_class_by_name():
    """Class 0 always recognised, class 1 half the time, class 2 never; the names are the data's."""
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 0, 1, 2, 0, 1, 0])
    names = ["cat", "dog", "frog"]
    assert per_class_accuracy(predicted, labels, names) == {"cat": 1.0, "dog": 0.5, "frog": 0.0}
    assert per_class_accuracy(predicted, labels) == {"0": 1.0, "1": 0.5, "2": 0.0}
    with pytest.raises(InputError, match="class_names has 2 names"):
        per_class_accuracy(predicted, labels, names[:2])


def test_evaluate_keys_the_probes_accuracy_per_class_by_the_datas_class_names():
    data = _tiny_data()
    named = dataclasses.replace(data, class_names=("dark", "light"))  # the data of an image folder with two sub-folders
    pca = PCA(3).fit(data.train)
    results = evaluate(pca, named)
    per_class = results["probe_accuracy_per_class"]
    assert list(per_class) == ["dark", "light"]
    counts = torch.bincount(data.test_labels).double()
    assert sum(per_class[name] * counts[k].item() for k, name in enumerate(["dark", "light"])) / len(data.test) == pytest.approx(results["probe_accuracy"])


def test_pca_reconstructs_data_in_its_subspace_exactly():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 12, generator=generator)
    x = (torch.randn(50, 3, generator=generator) @ basis + torch.randn(12, generator=generator)).reshape(50, 1, 3, 4)
    pca = PCA(3).fit(x)
    codes = pca.encode(x)
    assert codes.shape == (50, 3) and pca.latent_dim == 3 and pca.input_shape == (1, 3, 4)
    assert torch.allclose(pca.components @ pca.components.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(pca.reconstruct(x), x, atol=1e-4)
    assert torch.allclose(pca.decode(codes), x, atol=1e-4)
    # with fewer components the error is the variance left out, and the first component explains the most
    smaller = PCA(2).fit(x)
    residual = (smaller.reconstruct(x) - x).square().sum() / (len(x) - 1)
    assert residual.item() == pytest.approx(pca.explained_variance[2].item(), rel=1e-3)
    assert (pca.explained_variance[:-1] >= pca.explained_variance[1:]).all()


def test_pca_refuses_misuse():
    with pytest.raises(ValueError, match="fit"):
        PCA(2).encode(torch.zeros(3, 1, 2, 2))
    with pytest.raises(ValueError, match="components"):
        PCA(10).fit(torch.rand(5, 1, 2, 2))


def _tiny_data():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(60, 1, 4, 4, generator=generator)
    labels = (images.mean(dim=(1, 2, 3)) > 0.5).long()
    return ImageData("tiny", images[:40], labels[:40], images[40:], labels[40:])


def test_evaluate_reports_what_applies_to_each_model():
    data = _tiny_data()
    network = NetworkConfig(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,))
    torch.manual_seed(0)
    vae = VAE(VAEConfig(network=network)).eval()
    results = evaluate(vae, data, num_samples=20)
    assert set(results) == {"elbo", "bits_per_dim", "nll", "mse", "bce", "prior_mmd", "probe_accuracy", "probe_accuracy_per_class"}
    assert results.pop("bits_per_dim") is None  # a Bernoulli on grey levels has no bits/dim
    assert set(results.pop("probe_accuracy_per_class")) == {"0", "1"}  # no class names: the indices
    assert all(isinstance(v, float) for v in results.values())
    assert results["nll"] < -results["elbo"] + 1.0  # the 20-sample bound is at least about as tight
    assert "nll" not in evaluate(vae, data, num_samples=0)
    assert set(evaluate(AE(AEConfig(network=network)), data)) == {"mse", "bce", "prior_mmd", "probe_accuracy", "probe_accuracy_per_class"}
    assert set(evaluate(PCA(3).fit(data.train), data)) == {"mse", "bce", "probe_accuracy", "probe_accuracy_per_class"}


def test_evaluation_turns_dropout_off_and_restores_the_mode():
    data = _tiny_data()
    network = NetworkConfig(input_shape=(1, 4, 4), latent_dim=3, hidden=(32,), dropout=0.5)
    for model in (VAE(VAEConfig(network=network)), AE(AEConfig(network=network))):
        model.train()
        assert not torch.equal(model.encode(data.test[:]), model.encode(data.test[:]))  # dropout is on in training mode
        assert reconstruction_error(model, data.test[:]) == reconstruction_error(model, data.test[:])
        torch.manual_seed(0)
        in_training_mode = evaluate(model, data, num_samples=5)
        assert model.training
        model.eval()
        torch.manual_seed(0)
        assert evaluate(model, data, num_samples=5) == in_training_mode


def test_mmd_by_hand():
    """Two copies of 0 against two of 1 in one dimension: the kernel is sum_s C_s / (C_s + d^2), C_s = 2 s."""
    a, b = torch.zeros(2, 1), torch.ones(2, 1)
    same = len(MMD_SCALES)  # k(u, u) = 1 per scale
    across = sum(2 * s / (2 * s + 1) for s in MMD_SCALES)
    assert mmd(a, b) == pytest.approx(2 * same - 2 * across, rel=1e-12)
    assert mmd(a, b) == pytest.approx(mmd(b, a), rel=1e-12)


def test_mmd_tells_equal_from_different_distributions():
    generator = torch.Generator().manual_seed(0)
    draw = lambda shift: torch.randn(1000, 5, generator=generator) + shift  # noqa: E731
    equal, near, far = mmd(draw(0.0), draw(0.0)), mmd(draw(0.0), draw(0.3)), mmd(draw(0.0), draw(3.0))
    assert abs(equal) < 0.005 < near < far
    with pytest.raises(InputError):
        mmd(torch.zeros(1, 5), torch.zeros(3, 5))


def test_prior_mmd_of_codes_that_follow_the_prior_is_about_zero():
    images = torch.randint(0, 2, (2000, *SHAPE)).float()
    before = torch.get_rng_state()
    on_prior = prior_mmd(coin_vae("bernoulli"), images)  # q(z|x) = p(z) for every x
    assert torch.equal(torch.get_rng_state(), before)  # its own seeded draws
    assert abs(on_prior) < 0.005
    assert prior_mmd(coin_vae("bernoulli"), images) == on_prior  # repeatable

    class Shifted(PriorEncoder):
        def forward(self, x):
            loc, scale = super().forward(x)
            return loc + 2.0, scale

    shifted = coin_vae("bernoulli")
    shifted.encoder = Shifted()
    assert prior_mmd(shifted, images) > 0.1


def test_prior_mmd_puts_autoencoders_on_the_standard_normal():
    network = NetworkConfig(input_shape=(1, 4, 4), latent_dim=3, hidden=(8,))
    ae = AE(AEConfig(network=network))
    x = torch.rand(500, 1, 4, 4)
    codes = aggregate_posterior_samples(ae, x)
    assert torch.equal(codes, ae.encode(x).detach())
    generator = torch.Generator().manual_seed(0)
    expected = mmd(codes, torch.randn(500, 3, generator=generator))
    assert prior_mmd(ae, x) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_with_dropout_and_evaluates_deterministically(name, mnist):
    network = NetworkConfig(input_shape=(1, 28, 28), latent_dim=4, hidden=(32,), dropout=0.2)
    model = build_model(name, MODELS[name][1](network=network))
    takes_labels = model.conditional or getattr(model, "classes_are_labels", False)  # the CVAE; M2 (all labelled here)
    labels = {"train_labels": mnist.train_labels[:100]} if takes_labels else {}
    history = Trainer(model, TrainingConfig(epochs=1, batch_size=50, progress=False)).fit(mnist.train[:100], **labels)
    assert math.isfinite(history[-1]["train_loss"]) and model.training
    data = ImageData("mnist", mnist.train[:100], mnist.train_labels[:100], mnist.test[:50], mnist.test_labels[:50])
    torch.manual_seed(0)
    in_training_mode = evaluate(model, data, num_samples=3)
    assert model.training  # evaluation left the mode alone
    torch.manual_seed(0)
    assert evaluate(model.eval(), data, num_samples=3) == in_training_mode  # dropout was off


# --------------------------------------------------------------------------- the richer models on toys with known p(x)


class ContextEncoder(LinearGaussianEncoder):
    """The linear-Gaussian encoder, widened, with a context ``h(x)``: the first two pixels minus the bias."""

    def forward(self, x):
        loc, scale = super().forward(x)
        return loc, scale, x.flatten(1)[:, :2] - BIAS[:2]


def test_the_nll_of_a_flow_posterior_uses_the_flows_density(observations):
    posterior = iaf_posterior(2, 2, context_dim=2, hidden=(16, 16))
    with torch.no_grad():  # a flow far from the identity, so that its density and its base's differ
        for param in posterior.parameters():
            param.normal_(0, 0.3)
    config = VAEConfig(network=NetworkConfig(input_shape=SHAPE, latent_dim=2), likelihood="normal", posterior="iaf")
    vae = VAE(config, encoder=ContextEncoder(widen=1.6), decoder=LinearDecoder(), likelihood=NormalLikelihood(scale=NOISE), posterior=posterior).eval()
    exact = exact_log_p(observations)
    torch.manual_seed(0)
    estimate = log_likelihood(vae, observations, num_samples=5000)
    assert (estimate - exact).abs().mean() < 0.05  # Monte Carlo error about 0.015 nats here
    # what the same draws would give if the flow's samples were weighed by the base Gaussian's density
    with torch.no_grad():
        q = vae.posterior(*vae.encoder(observations))
        z = q.sample((5000,))  # (K, N, 2)
        log_joint = vae.likelihood(vae.decoder(z)).log_prob(observations) + vae.prior().log_prob(z)
        base = q.base_dist.log_prob(_base_of(q, z))
        wrong = torch.logsumexp(log_joint - base, 0) - math.log(5000)
    assert (wrong - exact).abs().mean() > 0.3


def _base_of(q, z):
    """The base draws that ``q``'s flow took to ``z`` (its cached inverses)."""
    for transform in reversed(q.transforms):
        z = transform.inv(z)
    return z


def test_the_nll_with_a_vamp_prior_is_the_mixtures(observations):
    config = VAEConfig(network=NetworkConfig(input_shape=SHAPE, latent_dim=2), likelihood="normal")
    encoder = LinearGaussianEncoder(widen=1.5)
    prior = VampPrior(2, encoder=encoder, input_shape=SHAPE, num_pseudo_inputs=3)
    with torch.no_grad():
        prior.raw_pseudo_inputs.copy_(torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(2)))
    vae = VAE(config, encoder=encoder, decoder=LinearDecoder(), likelihood=NormalLikelihood(scale=NOISE), prior=prior).eval()
    with torch.no_grad():
        locs, scales = encoder(prior.pseudo_inputs)  # (3, 2) each: the mixture's components
    components = torch.stack(
        [
            torch.distributions.MultivariateNormal(WEIGHT @ locs[k] + BIAS, WEIGHT @ torch.diag(scales[k] ** 2) @ WEIGHT.T + NOISE**2 * torch.eye(6)).log_prob(
                observations.flatten(1)
            )
            for k in range(3)
        ]
    )
    exact = torch.logsumexp(components, 0) - math.log(3)
    assert (exact - exact_log_p(observations)).abs().mean() > 0.5  # the VampPrior is not N(0, I)
    torch.manual_seed(0)
    assert (log_likelihood(vae, observations, num_samples=5000) - exact).abs().mean() < 0.05


class TopDecoder(nn.Module):
    """z2 (..., 1) -> the loc and scale of p(z1|z2) = N(A z2 + a, diag(s^2)), each (..., 2)."""

    def forward(self, z2):
        return z2 @ TOP_A.T + TOP_LOC, TOP_SCALE.expand(*z2.shape[:-1], 2)


class ExactTopEncoder(nn.Module):
    """z1 (..., 2) -> the exact p(z2|z1), (..., 1) each: a good proposal for q(z2|z1)."""

    def forward(self, z1):
        precision = 1 + (TOP_A[:, 0] ** 2 / TOP_SCALE**2).sum()
        loc = ((z1 - TOP_LOC) * TOP_A[:, 0] / TOP_SCALE**2).sum(-1, keepdim=True) / precision
        return loc, precision.rsqrt().expand_as(loc)


class MarginalEncoder(nn.Module):
    """x -> the posterior mean of z1 under the marginal p(z1) = N(a, A A^T + S), with the diagonal of its covariance, widened."""

    def forward(self, x):
        prior_precision = torch.linalg.inv(TOP_A @ TOP_A.T + torch.diag(TOP_SCALE**2))
        covariance = torch.linalg.inv(prior_precision + WEIGHT.T @ WEIGHT / NOISE**2)
        loc = (prior_precision @ TOP_LOC + (x.flatten(1) - BIAS) @ WEIGHT / NOISE**2) @ covariance.T
        return loc, (1.2 * torch.diagonal(covariance).sqrt()).expand_as(loc)


TOP_A = torch.tensor([[0.8], [-0.5]])
TOP_LOC = torch.tensor([0.1, -0.2])
TOP_SCALE = torch.tensor([0.6, 0.7])


def test_the_nll_of_the_two_layer_vae_weighs_the_joint_latent(observations):
    config = TwoLayerVAEConfig(network=NetworkConfig(input_shape=SHAPE, latent_dim=2), likelihood="normal", top_latent_dim=1)
    vae = TwoLayerVAE(
        config, encoder=MarginalEncoder(), decoder=LinearDecoder(), likelihood=NormalLikelihood(scale=NOISE),
        top_encoder=ExactTopEncoder(), top_decoder=TopDecoder(),
    ).eval()
    z1_covariance = TOP_A @ TOP_A.T + torch.diag(TOP_SCALE**2)
    exact = torch.distributions.MultivariateNormal(WEIGHT @ TOP_LOC + BIAS, WEIGHT @ z1_covariance @ WEIGHT.T + NOISE**2 * torch.eye(6)).log_prob(
        observations.flatten(1)
    )
    torch.manual_seed(0)
    estimate = log_likelihood(vae, observations, num_samples=5000)
    assert (estimate - exact).abs().mean() < 0.05
    torch.manual_seed(0)
    assert elbo_per_example(vae, observations.repeat(200, 1, 1, 1)).reshape(200, -1).mean(0).mean() < exact.mean() - 0.01


# --------------------------------------------------------------------------- the one-latent-site shortcut of log_likelihood

TINY = NetworkConfig(hidden=(32,), latent_dim=4)


class HyperPrior(nn.Module):
    """p(z | s) = N(0, s^2 I) with a scale s ~ LogNormal(0, 0.1) that is a sample site of its own."""

    def forward(self):
        s = pyro.sample("prior_scale", pyro.distributions.LogNormal(0.0, 0.1)).unsqueeze(-1)
        return pyro.distributions.Normal(torch.zeros(TINY.latent_dim), s).to_event(1)


class OwnProgramVAE(VAE):
    """A subclass with a program of its own (here the VAE's, plus a factor): not the program the shortcut knows."""

    def model(self, x=None, num_data=None, batch_size=1):
        out = super().model(x, num_data, batch_size)
        pyro.factor("bonus", torch.zeros(()))
        return out


def _binary_images(n=12):
    return (torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(5)) > 0.5).float()


def _nll_models():
    torch.manual_seed(0)
    return {
        "gaussian": (VAE(VAEConfig(network=TINY)), None),
        "iaf": (VAE(VAEConfig(network=TINY, posterior="iaf")), None),
        "vamp": (VAE(VAEConfig(network=TINY, prior="vamp", num_pseudo_inputs=5)), None),
        "cvae": (CVAE(CVAEConfig(network=TINY)), torch.arange(12) % 10),
    }


@pytest.mark.parametrize("name", ["gaussian", "iaf", "vamp", "cvae"])
def test_the_one_site_shortcut_gives_the_traced_estimates(name, monkeypatch):
    model, labels = _nll_models()[name]
    model.eval()
    x = _binary_images()
    assert evaluation._one_latent_site(model, x, labels)  # the shortcut applies to this program
    torch.manual_seed(1)
    shortcut = log_likelihood(model, x, num_samples=300, batch_size=5, max_memory_bytes=2**20, labels=labels)
    monkeypatch.setattr(evaluation, "_one_latent_site", lambda *args: False)  # the traced path, on the same draws
    torch.manual_seed(1)
    traced = log_likelihood(model, x, num_samples=300, batch_size=5, max_memory_bytes=2**20, labels=labels)
    torch.testing.assert_close(shortcut, traced, rtol=0, atol=1e-5)


def _counting_log_weights(monkeypatch) -> list:
    calls = []
    traced = evaluation.log_weights

    def counting(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("num_samples", 1))
        return traced(*args, **kwargs)

    monkeypatch.setattr(evaluation, "log_weights", counting)
    return calls


def test_programs_the_shortcut_does_not_know_are_traced(monkeypatch):
    torch.manual_seed(0)
    x = _binary_images(6)
    covered = VAE(VAEConfig(network=TINY))
    others = {
        "two layers": TwoLayerVAE(TwoLayerVAEConfig(network=TINY, top_latent_dim=2)),
        "the hierarchical VAE": HierarchicalVAE(HierarchicalVAEConfig(network=TINY, top_latent_dim=2, num_pseudo_inputs=3)),
        "a subclass's own program": OwnProgramVAE(VAEConfig(network=TINY)),
        "a prior with a site of its own": VAE(VAEConfig(network=TINY), prior=HyperPrior()),
    }
    calls = _counting_log_weights(monkeypatch)
    log_likelihood(covered, x, num_samples=40, batch_size=3, max_memory_bytes=2**30)
    assert calls == [1, 2]  # only the memory measurement traces; the samples are drawn without traces
    for name, model in others.items():
        assert not evaluation._one_latent_site(model, x), name
        calls.clear()
        estimate = log_likelihood(model, x, num_samples=40, batch_size=3, max_memory_bytes=2**30)
        assert calls == [1, 2, 40, 40], name  # every batch's samples come from the traces
        assert torch.isfinite(estimate).all(), name


def test_the_shortcut_is_decided_without_drawing_from_the_global_generator():
    model, _ = _nll_models()["gaussian"]
    torch.manual_seed(4)
    evaluation._one_latent_site(model.eval(), _binary_images(2))
    after = torch.rand(3)
    torch.manual_seed(4)
    assert torch.equal(after, torch.rand(3))
