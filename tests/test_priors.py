"""Priors p(z): shapes, learnable mixture, user-defined priors, and clear errors."""

import math

import pyro.distributions as dist
import pytest
import torch
from torch import nn

from conftest import reference_prior
from pyrovae.errors import InputError
from pyrovae.nets import MLPEncoder
from pyrovae.priors import PRIORS, GaussianMixturePrior, LaplacePrior, StandardNormal, StudentTPrior, VampPrior, check_prior, make_prior

L = 6
IMAGE = (1, 3, 3)


def build(name):
    """The built-in prior ``name`` over ``(L,)``; the VampPrior with a small Gaussian encoder of 3x3 images."""
    if name != "vamp":
        return make_prior(name, L)
    return make_prior(name, L, encoder=MLPEncoder(IMAGE, L, hidden=(8,), gaussian=True), input_shape=IMAGE, num_pseudo_inputs=4)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_builtin_priors_are_distributions_over_codes(name):
    prior = build(name)
    check_prior(prior, L)
    d = prior()
    assert d.batch_shape == () and d.event_shape == (L,)
    z = d.sample((5,))
    assert z.shape == (5, L)
    log_p = d.log_prob(z)
    assert log_p.shape == (5,) and torch.isfinite(log_p).all()
    with torch.no_grad():
        expected = reference_prior(name, prior, L)
        points = 3 * torch.randn(5, L)
        torch.testing.assert_close(d.log_prob(points), expected.log_prob(points))
        # its samples follow it too: each coordinate's deciles agree with the reference's, from 20,000 draws each
        deciles = torch.linspace(0.1, 0.9, 9)
        ours, theirs = d.sample((20000,)).quantile(deciles, dim=0), expected.sample((20000,)).quantile(deciles, dim=0)
    assert (ours - theirs).abs().max() < 0.1


def test_standard_normal_log_density():
    z = torch.randn(4, L)
    expected = -0.5 * (z.square() + math.log(2 * math.pi)).sum(1)
    torch.testing.assert_close(StandardNormal(L)().log_prob(z), expected)


def test_laplace_and_student_t_use_their_parameters():
    z = torch.randn(3, L)
    torch.testing.assert_close(LaplacePrior(L, scale=2.0)().log_prob(z), torch.distributions.Laplace(0.0, 2.0).log_prob(z).sum(1))
    torch.testing.assert_close(StudentTPrior(L, df=5.0)().log_prob(z), torch.distributions.StudentT(5.0).log_prob(z).sum(1))


def test_mixture_is_seeded_and_its_components_differ():
    a, b, c = GaussianMixturePrior(L, 4, seed=1), GaussianMixturePrior(L, 4, seed=1), GaussianMixturePrior(L, 4, seed=2)
    torch.testing.assert_close(a.locs, b.locs)
    assert not torch.equal(a.locs, c.locs)
    assert torch.cdist(a.locs, a.locs)[~torch.eye(4, dtype=torch.bool)].min() > 0.1
    torch.testing.assert_close(a().component_distribution.base_dist.scale, torch.ones(4, L), atol=1e-4, rtol=0)


def test_mixture_log_density_matches_logsumexp_and_has_gradients():
    prior = GaussianMixturePrior(L, 3)
    z = torch.randn(5, L)
    log_p = prior().log_prob(z)
    scale = nn.functional.softplus(prior.raw_scales) + 1e-5
    per_component = torch.distributions.Normal(prior.locs, scale).log_prob(z.unsqueeze(1)).sum(-1)  # (5, 3)
    expected = torch.logsumexp(per_component + torch.log_softmax(prior.logits, 0), dim=1)
    torch.testing.assert_close(log_p, expected)
    log_p.sum().backward()
    for name, param in prior.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_builtin_priors_keep_tensors_as_buffers_that_follow_the_module():
    for name in sorted(PRIORS):
        prior = build(name).double()
        if name == "vamp":
            prior._encoder[0].double()  # the VAE's encoder, moved with the VAE, not with its prior
        d = prior()
        assert d.sample().dtype == torch.float64, name
        assert all(t.dtype == torch.float64 for t in prior.state_dict().values()), name


def test_user_priors_pass_the_check():
    class Gumbel(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("loc", torch.zeros(L))

        def forward(self):
            return dist.Gumbel(self.loc, 1.0).to_event(1)

    check_prior(Gumbel(), L)
    check_prior(lambda: dist.Laplace(torch.zeros(L), 1.0).to_event(1), L)


@pytest.mark.parametrize(
    "prior, message",
    [
        ("normal", "a prior must be callable"),
        (lambda: torch.zeros(L), "the prior returned Tensor, not a distribution"),
        (lambda: dist.Normal(torch.zeros(L), 1.0), r"batch_shape \(\) and event_shape \(6,\).*got batch_shape \(6,\)"),
        (lambda: dist.Normal(torch.zeros(L + 1), 1.0).to_event(1), r"got batch_shape \(\) and event_shape \(7,\)"),
        (lambda: dist.Normal(torch.zeros(2, L), 1.0).to_event(1), r"got batch_shape \(2,\)"),
    ],
)
def test_check_prior_names_the_problem(prior, message):
    with pytest.raises(ValueError, match=message):
        check_prior(prior, L)


def test_unknown_prior_name():
    with pytest.raises(ValueError, match=r"unknown prior 'cauchy'; choose from \['laplace', 'mixture', 'normal', 'student_t', 'vamp'\]"):
        make_prior("cauchy", L)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: LaplacePrior(L, scale=0.0), "scale must be positive"),
        (lambda: LaplacePrior(L, scale=float("nan")), "scale must be positive"),
        (lambda: StudentTPrior(L, df=-1.0), "df must be positive"),
        (lambda: StudentTPrior(L, df=float("nan")), "df must be positive"),
        (lambda: GaussianMixturePrior(L, num_components=0), "num_components must be positive"),
    ],
)
def test_bad_prior_parameters(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_vamp_prior_is_the_mixture_of_the_encoders_posteriors_at_its_pseudo_inputs():
    encoder = MLPEncoder(IMAGE, L, hidden=(8,), gaussian=True)
    prior = VampPrior(L, encoder=encoder, input_shape=IMAGE, num_pseudo_inputs=5)
    with torch.no_grad():  # raw values where training may take them, well outside [0, 1]
        prior.raw_pseudo_inputs.copy_(2 * torch.randn(5, *IMAGE))
    clipped = prior.raw_pseudo_inputs.detach().clamp(0, 1)  # hardtanh(raw, 0, 1)
    assert (clipped == 0).any() and (clipped == 1).any() and ((clipped > 0) & (clipped < 1)).any()
    torch.testing.assert_close(prior.pseudo_inputs, clipped, rtol=0, atol=0)
    z = torch.randn(7, L)
    loc, scale = encoder(clipped)  # (5, L) each
    by_hand = torch.stack([torch.distributions.Normal(loc[k], scale[k]).log_prob(z).sum(1) for k in range(5)])  # (5, 7)
    torch.testing.assert_close(prior().log_prob(z), torch.logsumexp(by_hand, 0) - math.log(5))
    # the pseudo-inputs are the prior's only parameter; the encoder stays the VAE's, trained by both terms
    assert [name for name, _ in prior.named_parameters()] == ["raw_pseudo_inputs"]
    prior().log_prob(z).sum().backward()
    assert prior.raw_pseudo_inputs.grad.abs().sum() > 0 and encoder.layers[0].weight.grad.abs().sum() > 0
    assert ((prior.pseudo_inputs >= 0) & (prior.pseudo_inputs <= 1)).all()


def test_vamp_prior_samples_a_component_then_a_code():
    encoder = MLPEncoder(IMAGE, 2, hidden=(8,), gaussian=True)
    prior = VampPrior(2, encoder=encoder, input_shape=IMAGE, num_pseudo_inputs=2)
    with torch.no_grad():  # pseudo-inputs of zeros and of ones, whose posteriors are narrow at (-5, -5) and (5, 5)
        for layer in encoder.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        encoder.layers[0].weight[0] = 1.0  # hidden unit 0 = sum of the pixels: 0 or 9
        encoder.layers[1].weight[:2, 0] = 10 / 9
        encoder.layers[1].bias.copy_(torch.tensor([-5.0, -5.0, -9.0, -9.0]))  # loc = 10/9 * h0 - 5, scale = softplus(-9)
        prior.raw_pseudo_inputs.copy_(torch.stack([torch.zeros(IMAGE), torch.ones(IMAGE)]))
        z = prior().sample((2000,))
    locs = torch.tensor([[-5.0, -5.0], [5.0, 5.0]])
    assert torch.cdist(z, locs).min(1).values.max() < 0.01
    assert 0.45 < (z[:, 0] > 0).double().mean() < 0.55


def test_vamp_prior_needs_an_encoder():
    with pytest.raises(InputError, match="VampPrior"):
        make_prior("vamp", L)
    with pytest.raises(InputError, match="num_pseudo_inputs"):
        VampPrior(L, encoder=MLPEncoder(IMAGE, L, gaussian=True), input_shape=IMAGE, num_pseudo_inputs=0)
