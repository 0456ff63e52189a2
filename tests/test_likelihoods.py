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
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    LaplaceLikelihood,
    NormalLikelihood,
    check_observations,
    eight_bit,
    make_likelihood,
    outputs_per_value,
)

SHAPE = (1, 4, 4)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
@pytest.mark.parametrize("batch", [(3,), (2, 3)], ids=["B", "KxB"])
def test_one_event_per_image(name, batch):
    likelihood = make_likelihood(name)
    c, h, w = SHAPE
    d = likelihood(torch.randn(*batch, outputs_per_value(likelihood) * c, h, w))  # decoder output
    assert d.batch_shape == batch and d.event_shape == SHAPE
    x = torch.randint(0, 256, (3, *SHAPE)) / 255  # 8-bit levels, in every support but the strict Bernoulli's; broadcasts against K
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


# --------------------------------------------------------------------------- discretized logistic

BINS = torch.arange(256, dtype=torch.float64) / 255  # the 8-bit values k / 255


def logistic_cdf(y, loc, scale):
    return torch.sigmoid((y - loc) / scale)


def bin_probability(k: int, loc, scale):
    """P(k / 255) of a logistic discretized to 8 bits, by hand: the CDF between the bin's edges, the tails in the end bins."""
    upper = logistic_cdf((k + 0.5) / 255, loc, scale) if k < 255 else torch.ones_like(loc)
    lower = logistic_cdf((k - 0.5) / 255, loc, scale) if k > 0 else torch.zeros_like(loc)
    return upper - lower


def test_discretized_logistic_log_prob_is_the_hand_computed_bin_probability():
    """Decoder output (1, 2 * C, 1, W): locations, then raw scales, of C = 2 channels and W = 6 pixels; the
    values include the end bins 0 and 255, whose probabilities hold the tails."""
    loc = torch.tensor([[0.3, 0.3, 0.9, 0.9, 0.5, 1.2], [0.7, 0.1, 0.02, 1.0, 0.5, -0.3]], dtype=torch.float64)
    scale = torch.tensor([[0.1, 0.05, 0.03, 0.2, 0.002, 0.3], [0.02, 0.5, 0.04, 0.01, 1.0, 0.1]], dtype=torch.float64)
    levels = torch.tensor([[0, 77, 255, 128, 127, 255], [179, 0, 1, 254, 255, 0]])
    raw_scale = torch.log(torch.expm1(scale - 1e-5))  # softplus(raw) + 1e-5 = scale
    out = torch.cat([loc, raw_scale]).view(1, 4, 1, 6)
    d = DiscretizedLogisticLikelihood()(out)
    assert d.batch_shape == (1,) and d.event_shape == (2, 1, 6)
    x = (levels / 255).view(1, 2, 1, 6)
    expected = torch.tensor([[math.log(bin_probability(int(k), m, s)) for k, m, s in zip(*row)] for row in zip(levels, loc, scale)], dtype=torch.float64)
    torch.testing.assert_close(d.log_prob_per_value(x).view(2, 6), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(d.log_prob(x), expected.sum().view(1))
    # in float32, the same to a few millionths of a nat per value
    d32 = DiscretizedLogisticLikelihood()(out.float())
    torch.testing.assert_close(d32.log_prob_per_value(x.float()).view(2, 6).double(), expected, rtol=1e-5, atol=2e-5)


def test_a_mixture_weighs_its_components_by_the_softmax_of_its_logits():
    """Three components; decoder output (1, 9 * C, 1, 3): locations, raw scales, logits, each (K, C)."""
    loc = torch.tensor([[0.2, 0.6, 0.95], [0.5, 0.0, 0.3], [0.9, 0.4, 0.1]], dtype=torch.float64)  # (K, W)
    scale = torch.tensor([[0.05, 0.1, 0.02], [0.3, 0.01, 0.08], [0.1, 0.2, 0.04]], dtype=torch.float64)
    logits = torch.tensor([[0.5, -1.0, 2.0], [0.0, 1.0, -0.5], [-2.0, 0.3, 0.0]], dtype=torch.float64)
    levels = torch.tensor([0, 100, 255])
    out = torch.cat([loc, torch.log(torch.expm1(scale - 1e-5)), logits]).view(1, 9, 1, 3)
    likelihood = DiscretizedLogisticLikelihood(components=3)
    assert likelihood.outputs_per_value == 9
    d = likelihood(out)
    weights = torch.softmax(logits, 0)
    expected = torch.tensor(
        [math.log(sum(weights[i, j] * bin_probability(int(k), loc[i, j], scale[i, j]) for i in range(3))) for j, k in enumerate(levels)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(d.log_prob_per_value((levels / 255).view(1, 1, 1, 3)).view(3), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_256_bin_probabilities_sum_to_one(dtype):
    """Settings from a location far outside [0, 1] and scales from a thousandth of a bin to a thousand."""
    loc = torch.tensor([0.0, 0.3, 1.0, -2.0, 3.0, 0.5, 0.5, 0.2, 0.77], dtype=dtype).view(9, 1)
    scale = torch.tensor([0.05, 0.01, 0.2, 0.1, 1e-5, 1e3, 3e-4, 0.3, 1e-2], dtype=dtype).view(9, 1)
    for logits in (None, torch.tensor([0.0, 1.5, -1.0], dtype=dtype)):
        components = 1 if logits is None else 3
        shift = torch.linspace(-0.2, 0.2, components, dtype=dtype)
        d = DiscretizedLogistic(loc + shift, scale, logits, event_dim=0)  # (9, K): batch (9,), K components, events ()
        log_p = d.log_prob(BINS.to(dtype).view(256, 1))  # (256, 9)
        assert torch.isfinite(log_p).all()
        total = log_p.double().exp().sum(0)
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12 if dtype == torch.float64 else 5e-5)


def test_discretized_logistic_is_stable_far_out_and_gives_finite_gradients():
    loc = torch.tensor([-50.0, 50.0, 0.5, 0.5, 0.2]).requires_grad_()
    raw_scale = torch.tensor([-30.0, -30.0, -30.0, 30.0, 0.0]).requires_grad_()  # scales 1e-5 ... 30
    d = DiscretizedLogisticLikelihood()(torch.stack([loc, raw_scale]).view(1, 2, 1, 5))
    x = torch.tensor([0.5, 0.5, 0.0, 128 / 255, 1.0]).view(1, 1, 1, 5)
    log_p = d.log_prob_per_value(x)
    assert torch.isfinite(log_p).all() and log_p.max() <= 0
    assert log_p[0, 0, 0, 0] < -1e5 and log_p[0, 0, 0, 1] < -1e5  # the bin is millions of scales away: no -inf, no NaN
    log_p.sum().backward()
    assert torch.isfinite(loc.grad).all() and torch.isfinite(raw_scale.grad).all()


def test_discretized_logistic_samples_are_8_bit_values_with_the_bin_probabilities():
    """Two values: a mixture of two broad components, and one logistic narrower than a bin, at 100.7 / 255."""
    loc = torch.tensor([[0.1, 100.7 / 255], [0.7, 100.7 / 255]])  # (K, 2)
    scale = torch.tensor([[0.05, 0.3 / 255], [0.1, 0.3 / 255]])
    logits = torch.tensor([[0.0, 0.0], [0.8, 0.0]])
    d = DiscretizedLogistic(loc, scale, logits, event_dim=1)  # batch (), event (2,)
    x = d.sample((40000,))
    assert x.shape == (40000, 2) and bool(eight_bit.check(x).all())
    probabilities = d.log_prob_per_value(BINS.float().view(256, 1)).double().exp()  # (256, 2)
    for value in range(2):
        frequencies = torch.bincount((x[:, value] * 255).round().long(), minlength=256).double() / len(x)
        distance = (frequencies.cumsum(0) - probabilities[:, value].cumsum(0)).abs().max()
        assert distance < 0.01  # Kolmogorov distance; its 5% critical value is 0.0068


def test_wide_logistics_keep_their_log_probability_in_float32():
    """Where a bin is a small fraction of the scale, the difference of two CDFs would lose precision in float32
    (0.03 nats at scale 1000); the density at the bin's centre times its width keeps it."""
    scale = torch.tensor([0.3, 1.0, 10.0, 100.0, 1000.0], dtype=torch.float64).view(5, 1)
    loc = torch.full((5, 1), 0.45, dtype=torch.float64)
    levels = torch.tensor([3, 100, 115, 200, 252], dtype=torch.float64)
    expected = (logistic_cdf((levels + 0.5) / 255, loc, scale) - logistic_cdf((levels - 0.5) / 255, loc, scale)).log()  # (settings, levels)
    d = DiscretizedLogistic(loc.float(), scale.float(), event_dim=0)  # batch (5,), one component
    log_p = d.log_prob((levels / 255).float().view(5, 1)).mT  # (settings, levels)
    torch.testing.assert_close(log_p.double(), expected, rtol=0, atol=1e-4)


def test_discretized_logistic_mean_is_an_image_near_the_mean_of_the_8_bit_values():
    loc = torch.tensor([-0.5, 0.0, 0.3, 0.5, 1.0, 1.4, 0.6], dtype=torch.float64).view(7, 1)
    scale = torch.tensor([0.2, 0.05, 1e-4, 0.3, 0.01, 0.5, 20.0], dtype=torch.float64).view(7, 1)
    d = DiscretizedLogistic(loc, scale, event_dim=0)  # batch (7,), one component
    exact = (d.log_prob(BINS.view(256, 1)).exp() * BINS.view(256, 1)).sum(0)
    assert (d.mean >= 0).all() and (d.mean <= 1).all()
    assert (d.mean - exact).abs().max() <= 1 / 510


def test_discretized_logistic_takes_8_bit_values_only():
    assert bool(eight_bit.check(torch.arange(256) / 255).all()) and eight_bit.is_discrete
    assert not eight_bit.check(torch.tensor([0.5, -1 / 255, 256 / 255, 0.3 / 255])).any()
    likelihood = DiscretizedLogisticLikelihood()
    with pytest.raises(ValueError, match="outside the likelihood's support EightBit"):
        check_observations(torch.full((2, *SHAPE), 0.5), SHAPE, likelihood.support)
    d = likelihood(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError):  # torch's own support check
        d.log_prob(torch.full((2, *SHAPE), 0.5))
    with pytest.raises(ValueError, match=r"takes 2 decoder channels per image channel, got decoder output \(2, 3, 4, 4\)"):
        likelihood(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="components must be a positive integer"):
        DiscretizedLogisticLikelihood(components=0)
