"""Likelihoods p(x|z): per-image events, stable log-probabilities, supports, and input checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from pyrovae.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    LaplaceLikelihood,
    NormalLikelihood,
    check_observations,
    make_likelihood,
)

SHAPE = (1, 4, 4)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("batch", [(3,), (2, 3)], ids=["B", "KxB"])
def test_one_event_per_image(name, batch):
    likelihood = make_likelihood(name)
    d = likelihood(torch.randn(*batch, *SHAPE))
    assert d.batch_shape == batch and d.event_shape == SHAPE
    x = torch.rand(3, *SHAPE)  # broadcasts against the leading K
    log_p = d.log_prob(x)
    assert log_p.shape == batch and torch.isfinite(log_p).all()
    assert d.mean.shape == (*batch, *SHAPE)


def test_bernoulli_log_prob_is_minus_bce_on_grey_levels_and_stable():
    logits = torch.tensor([-200.0, -3.0, 0.0, 3.0, 200.0]).repeat(2, 1).view(2, 1, 5, 1)
    x = torch.tensor([1.0, 0.2, 0.5, 0.9, 0.0]).repeat(2, 1).view(2, 1, 5, 1)
    log_p = BernoulliLikelihood()(logits).log_prob(x)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(log_p, expected)
    assert torch.isfinite(log_p).all()  # log(sigmoid(-200)) would be -inf


def test_bernoulli_gradient_is_that_of_the_bce():
    logits = (4 * torch.randn(3, *SHAPE)).requires_grad_()
    x = torch.rand(3, *SHAPE)
    (grad,) = torch.autograd.grad(BernoulliLikelihood()(logits).log_prob(x).sum(), logits)
    torch.testing.assert_close(grad, x - torch.sigmoid(logits.detach()))


def test_bernoulli_keeps_its_log_prob_when_expanded_or_broadcast():
    d = BernoulliLikelihood()(torch.randn(1, *SHAPE))
    expanded = d.expand((2, 3))  # what a plate does to a distribution with a smaller batch
    assert type(expanded) is type(d) and expanded.batch_shape == (2, 3)
    x = torch.rand(2, 3, *SHAPE)
    expected = -F.binary_cross_entropy_with_logits(expanded.base_dist.logits, x, reduction="none").sum((2, 3, 4))
    torch.testing.assert_close(expanded.log_prob(x), expected)
    torch.testing.assert_close(d.log_prob(x), expected)  # logits (1, ...) broadcast against x (2, 3, ...)


def test_bernoulli_mean_is_sigmoid_of_logits():
    logits = torch.randn(2, *SHAPE)
    torch.testing.assert_close(BernoulliLikelihood()(logits).mean, torch.sigmoid(logits))


def test_bernoulli_supports():
    assert BernoulliLikelihood().support is constraints.unit_interval
    assert BernoulliLikelihood(strict=True).support is constraints.boolean
    with pytest.raises(ValueError):  # torch's own check, on for the strict likelihood
        BernoulliLikelihood(strict=True)(torch.zeros(2, *SHAPE)).log_prob(torch.full((2, *SHAPE), 0.5))


def test_continuous_bernoulli_matches_torch():
    logits, x = torch.randn(2, *SHAPE), torch.rand(2, *SHAPE)
    expected = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(ContinuousBernoulliLikelihood()(logits).log_prob(x), expected)


@pytest.mark.parametrize("cls, family", [(NormalLikelihood, torch.distributions.Normal), (LaplaceLikelihood, torch.distributions.Laplace)])
def test_location_scale_likelihoods(cls, family):
    loc, x = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    fixed = cls(scale=0.3)
    assert not list(fixed.parameters()) and "raw_scale" in dict(fixed.named_buffers())
    torch.testing.assert_close(fixed.scale, torch.tensor(0.3 + 1e-5))
    torch.testing.assert_close(fixed(loc).log_prob(x), family(loc, 0.3 + 1e-5).log_prob(x).sum((1, 2, 3)))
    learned = cls(scale=0.3, learn_scale=True)
    assert [name for name, _ in learned.named_parameters()] == ["raw_scale"]
    learned(loc).log_prob(x).sum().backward()
    assert learned.raw_scale.grad is not None and learned.raw_scale.grad != 0


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale must be positive"):
        NormalLikelihood(scale=scale)


def test_unknown_likelihood_name():
    with pytest.raises(ValueError, match=r"unknown likelihood 'poisson'; choose from \['bernoulli'"):
        make_likelihood("poisson")


def test_check_observations_accepts_good_images():
    check_observations(torch.rand(2, *SHAPE), SHAPE, constraints.unit_interval)
    check_observations(torch.randn(2, *SHAPE), SHAPE, None)
    check_observations(torch.randint(0, 2, (2, *SHAPE)).float(), SHAPE, constraints.boolean)


@pytest.mark.parametrize(
    "x, support, message",
    [
        ([[0.0]], None, "expected a tensor of images of shape"),
        (torch.rand(2, 16), None, r"expected images of shape \(B, 1, 4, 4\), got \(2, 16\)"),
        (torch.rand(1, 4, 4), None, r"expected images of shape \(B, 1, 4, 4\), got \(1, 4, 4\)"),
        (torch.rand(2, 3, 4, 4), None, r"got \(2, 3, 4, 4\)"),
        (torch.rand(0, *SHAPE), None, "the batch is empty"),
        (torch.randint(0, 255, (2, *SHAPE)), None, "expected floating-point images.*torch.int64"),
        (torch.full((2, *SHAPE), math.nan), None, "NaN or Inf"),
        (torch.full((2, *SHAPE), math.inf), None, "NaN or Inf"),
        (torch.full((2, *SHAPE), 1.5), constraints.unit_interval, r"values in \[1.5, 1.5\], outside the likelihood's support"),
        (torch.full((2, *SHAPE), 0.5), constraints.boolean, "outside the likelihood's support"),
    ],
)
def test_check_observations_names_the_problem(x, support, message):
    with pytest.raises(ValueError, match=message):
        check_observations(x, SHAPE, support)


def test_values_too_large_for_the_networks_are_refused_not_nan():
    """Found by the property tests: one pixel of 1e30 made the VAE's loss NaN through float32 overflow."""
    from pyrovae.errors import InputError
    from pyrovae.likelihoods import MAX_ABS_OBSERVATION, check_observations

    x = torch.zeros(2, 1, 4, 4)
    check_observations(x + MAX_ABS_OBSERVATION, (1, 4, 4), torch.distributions.constraints.real)
    x[0, 0, 1, 2] = 1e30
    with pytest.raises(InputError, match="beyond"):
        check_observations(x, (1, 4, 4), torch.distributions.constraints.real)
