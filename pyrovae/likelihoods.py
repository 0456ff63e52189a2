"""Likelihoods p(x|z): objects that map the decoder output to a distribution over images.

Called with the decoder output ``(..., C, H, W)`` they return a Pyro distribution with
``batch_shape == (...)`` and ``event_shape == (C, H, W)``: one log-probability per image,
``(B,)`` for a batch and ``(K, B)`` for K samples of each code (vectorized ELBO particles,
importance sampling). A user's own likelihood is any callable doing the same (an
``nn.Module`` if it has parameters); give it a ``support`` attribute (a
:mod:`torch.distributions.constraints` object) to have inputs checked::

    def student(out):
        return dist.StudentT(4.0, out, 0.1).to_event(3)

    VAE(config, likelihood=student)

Log-probabilities are computed from logits or locations, never as ``log(sigmoid(.))``.

**Decoder outputs.** A likelihood with ``P`` parameters for each observed value (the
discretized logistic's location and scale, and mixture weights) says so with an attribute
``outputs_per_value = P``; the models then build their decoder with
``build_decoder(network, outputs_per_value=P)`` (:mod:`pyrovae.nets`), so it gives
``(..., P * C, H, W)``: parameter ``p`` of channel ``c`` is channel ``p * C + c``. A likelihood
without the attribute takes one value per observed one, ``(..., C, H, W)``. A likelihood's
global parameters (the learned scale of :class:`NormalLikelihood`) are its own, not the decoder's.

**8-bit data.** :class:`DiscretizedLogisticLikelihood` is a probability over the 256 values
``k / 255`` of 8-bit images scaled to ``[0, 1]`` (``uint8 / 255``, as pyrovae's data loading gives
them); its support :data:`eight_bit` holds exactly those values, so the models refuse other
inputs, and :func:`pyrovae.evaluation.test_elbo` reports its bits per dimension without the
discretisation offset that densities need.
"""

from __future__ import annotations

import functools
import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import constraints

from .errors import InputError

#: the trailing dimensions ``(C, H, W)`` that make one image, one event of the likelihood
IMAGE_DIMS = 3

__all__ = [
    "IndependentBernoulli",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "NormalLikelihood",
    "LaplaceLikelihood",
    "DiscretizedLogistic",
    "DiscretizedLogisticLikelihood",
    "eight_bit",
    "LIKELIHOODS",
    "make_likelihood",
    "outputs_per_value",
    "check_observations",
]


class IndependentBernoulli(dist.Independent):
    """``Bernoulli(logits=...).to_event(k)`` with a cheaper ``log_prob``: one value per image.

    ``log p(x) = sum_pixels [x * logits - softplus(logits)]``, the same number as the Bernoulli's
    ``-binary_cross_entropy_with_logits`` summed over the pixels (also for grey levels in [0, 1]),
    computed with a single transcendental pass and without torch's per-pixel negation: 15% less
    time in :func:`pyrovae.evaluation.log_likelihood` (k=1000, 300 MNIST test images, 2 CPU
    threads), where this sum is most of the work besides the decoder. ``logits`` and ``value`` broadcast: logits ``(K, B, C, H, W)``
    against images ``(B, C, H, W)`` give ``(K, B)``.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        base = self.base_dist
        if base._validate_args:
            base._validate_sample(value)
        logits, dims = base.logits, self.reinterpreted_batch_ndims
        return (logits * value).flatten(-dims).sum(-1) - F.softplus(logits).flatten(-dims).sum(-1)


class BernoulliLikelihood(nn.Module):
    """Independent Bernoulli pixels with ``logits`` from the decoder.

    ``strict=False`` (default) also accepts grey levels in ``[0, 1]``: ``log_prob`` is then
    the negative binary cross-entropy, the usual MNIST objective, which is not a normalised
    density for non-binary ``x`` (torch's support check is off for that reason only; our own
    check still rejects values outside ``[0, 1]``). Binarize the data, or use
    :class:`ContinuousBernoulliLikelihood`, for a proper likelihood. ``strict=True`` demands
    ``x`` in ``{0, 1}``.
    """

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.support = constraints.boolean if strict else constraints.unit_interval

    def forward(self, logits: Tensor) -> dist.Distribution:
        return IndependentBernoulli(dist.Bernoulli(logits=logits, validate_args=self.strict), IMAGE_DIMS)


class ContinuousBernoulliLikelihood(nn.Module):
    """The continuous Bernoulli (Loaiza-Ganem and Cunningham, 2019): a proper density on ``[0, 1]``."""

    support = constraints.unit_interval

    def forward(self, logits: Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(IMAGE_DIMS)


class _LocationScale(nn.Module):
    """Shared by Normal and Laplace: a fixed scale, or a learned one (a single positive scalar)."""

    support = constraints.real
    family: type

    def __init__(self, scale: float = 0.1, learn_scale: bool = False):
        super().__init__()
        if not scale > 0:
            raise InputError(f"scale must be positive, got {scale}")
        raw = torch.tensor(math.log(math.expm1(scale)))  # inverse softplus
        if learn_scale:
            self.raw_scale = nn.Parameter(raw)
        else:
            self.register_buffer("raw_scale", raw)

    @property
    def scale(self) -> Tensor:
        return F.softplus(self.raw_scale) + 1e-5

    def forward(self, loc: Tensor) -> dist.Distribution:
        return self.family(loc, self.scale).to_event(IMAGE_DIMS)


class NormalLikelihood(_LocationScale):
    """Independent Normal pixels, mean from the decoder, fixed or learned scale."""

    family = dist.Normal


class LaplaceLikelihood(_LocationScale):
    """Independent Laplace pixels, location from the decoder, fixed or learned scale."""

    family = dist.Laplace


# --------------------------------------------------------------------------- 8-bit data

#: the values of 8-bit data: k / (NUM_BINS - 1) for k = 0, ..., NUM_BINS - 1
NUM_BINS = 256
#: half the distance between two neighbouring values k / 255
HALF_BIN = 0.5 / (NUM_BINS - 1)
#: how far from k / 255 a value may lie, in bins, and still count as k / 255 (float32 rounding of uint8 / 255 is ~1e-5)
BIN_TOLERANCE = 1e-3
#: below this width of a bin, in units of the logistic's scale, log P(bin) is the density at the bin's centre
#: times its width (the mid-bin formula, relative error about width^2 / 24 < 5e-6): there the difference of two
#: nearly equal CDFs would lose more precision (float32) than the formula's error
MID_BIN_WIDTH = 1e-2
#: the smallest scale of a logistic, as the networks' scales (softplus(raw) + MIN_LOGISTIC_SCALE)
MIN_LOGISTIC_SCALE = 1e-5


class _EightBit(constraints.Constraint):
    """The 256 values ``k / 255``, ``k = 0, ..., 255``: 8-bit data scaled to ``[0, 1]`` (within :data:`BIN_TOLERANCE` of a bin)."""

    is_discrete = True
    event_dim = 0

    def check(self, value: Tensor) -> Tensor:
        scaled = value * (NUM_BINS - 1)
        return (value >= 0) & (value <= 1) & ((scaled - scaled.round()).abs() <= BIN_TOLERANCE)

    def __repr__(self) -> str:
        return "EightBit(the 256 values k/255)"


#: the support of 8-bit images scaled to [0, 1]: the values ``k / 255``
eight_bit = _EightBit()


def _log1mexp(d: Tensor) -> Tensor:
    """``log(1 - exp(d))`` for ``d <= 0``, accurate for ``d`` near 0 and far below it (Maechler, 2012)."""
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


class DiscretizedLogistic(dist.TorchDistribution):
    """A mixture of discretized logistics over 8-bit values (Kingma et al. 2016; Salimans et al. 2017, without
    their coupling of the colour channels): each value is independent given its parameters.

    ``loc``, ``scale`` (positive) and ``logits`` (mixture weights, unnormalised; ``None``: equal weights) are
    ``(*batch, K, *event)``: ``K`` components (``K = 1``: one logistic per value), the component axis just before
    the ``event_dim`` event dimensions (3 for an image ``(C, H, W)``). Values are ``k / 255``: the logistic on
    ``[0, 1]`` is cut into the bins ``[(k - 1/2) / 255, (k + 1/2) / 255]``, and the end bins take the tails,
    ``(-inf, 1/510]`` for 0 and ``[1 - 1/510, inf)`` for 1, so the 256 probabilities sum to one::

        P(k/255) = sum_i w_i [F_i((k + 1/2) / 255) - F_i((k - 1/2) / 255)],  F_i(y) = sigmoid((y - loc_i) / scale_i)

    ``log_prob`` sums ``log P`` over the event, ``(*batch)``, computed in log space from log-sigmoids:
    the end bins as ``log F`` and ``log(1 - F)``; an inner bin as a difference of CDFs taken on the side of
    the bin away from the location (``1 - F`` to its right), so nothing underflows in the tails; where a bin is
    narrower than :data:`MID_BIN_WIDTH` scales, as the density at its centre times its width (Salimans et al.'s
    fallback for a bin mass that underflows). A value is read as the nearest ``k / 255``; the support
    :data:`eight_bit` (checked when ``validate_args``) holds only those.

    ``sample`` gives values ``k / 255``; ``mean`` is ``sum_i w_i E[clip(Y_i, 0, 1)]`` for logistic ``Y_i``,
    ``scale_i * (softplus(loc_i / scale_i) - softplus((loc_i - 1) / scale_i))``: an image in ``[0, 1]``
    within ``1/510`` of the mean of the discrete values (the sum over the bins is the midpoint rule of its integral).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive, "logits": constraints.real}
    has_rsample = False

    def __init__(self, loc: Tensor, scale: Tensor, logits: Tensor | None = None, event_dim: int = 3, validate_args=None):
        if logits is None:
            logits = torch.zeros_like(loc)
        loc, scale, logits = torch.broadcast_tensors(loc, scale, logits)
        if loc.dim() < event_dim + 1:
            raise InputError(f"loc, scale and logits must be (*batch, K, *event) with {event_dim} event dimensions, got {tuple(loc.shape)}")
        self.loc, self.scale, self.logits = loc, scale, logits  # event_dim: Pyro's, len(event_shape)
        component_axis = loc.dim() - event_dim - 1
        super().__init__(loc.shape[:component_axis], loc.shape[component_axis + 1 :], validate_args=validate_args)

    @property
    def _component_axis(self) -> int:
        return -self.event_dim - 1

    @property
    def support(self):
        return constraints.independent(eight_bit, self.event_dim)

    @property
    def num_components(self) -> int:
        return self.loc.shape[self._component_axis]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        shape = torch.Size(batch_shape) + self.loc.shape[self._component_axis :]
        new.loc, new.scale, new.logits = self.loc.expand(shape), self.scale.expand(shape), self.logits.expand(shape)
        super(DiscretizedLogistic, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob_per_value(self, value: Tensor) -> Tensor:
        """``log P(value)`` of each value, ``(*batch, *event)`` (broadcast against ``value: (..., *event)``), before the sum over the event."""
        axis = self._component_axis
        k = torch.round(value * (NUM_BINS - 1)).to(self.loc.dtype).unsqueeze(axis)  # (..., 1, *event): bins 0..255
        centred = k / (NUM_BINS - 1) - self.loc  # (..., K, *event)
        inverse_scale = self.scale.reciprocal()
        upper, lower = (centred + HALF_BIN) * inverse_scale, (centred - HALF_BIN) * inverse_scale
        log_cdf_upper, log_sf_lower = F.logsigmoid(upper), F.logsigmoid(-lower)  # log F(upper edge), log(1 - F(lower edge))
        left = centred < 0  # left of the location: F(upper) - F(lower); right of it: (1 - F(lower)) - (1 - F(upper))
        larger = torch.where(left, log_cdf_upper, log_sf_lower)
        smaller = torch.where(left, F.logsigmoid(lower), F.logsigmoid(-upper))
        inner = larger + _log1mexp((smaller - larger).clamp(max=-1e-20))  # < 0: finite gradients where not used
        mid = centred * inverse_scale
        mid_bin = mid - 2 * F.softplus(mid) - torch.log(self.scale) - math.log(NUM_BINS - 1)  # log(density at the centre * width)
        inner = torch.where(inverse_scale / (NUM_BINS - 1) < MID_BIN_WIDTH, mid_bin, inner)
        log_p = torch.where(k == 0, log_cdf_upper, torch.where(k == NUM_BINS - 1, log_sf_lower, inner))
        return torch.logsumexp(F.log_softmax(self.logits, axis) + log_p, dim=axis)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = self.log_prob_per_value(value)
        return log_p.flatten(-self.event_dim).sum(-1) if self.event_dim else log_p

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        axis = self._component_axis
        with torch.no_grad():
            component = dist.Categorical(logits=self.logits.movedim(axis, -1)).sample(sample_shape).unsqueeze(axis)  # (*shape with 1 at axis)
            loc = self.loc.expand(*sample_shape, *self.loc.shape).gather(axis, component).squeeze(axis)
            scale = self.scale.expand(*sample_shape, *self.scale.shape).gather(axis, component).squeeze(axis)
            eps = torch.finfo(loc.dtype).eps
            u = torch.rand(shape, dtype=loc.dtype, device=loc.device).clamp(eps, 1 - eps)
            logistic = loc + scale * (torch.log(u) - torch.log1p(-u))
            return (logistic * (NUM_BINS - 1)).round().clamp(0, NUM_BINS - 1) / (NUM_BINS - 1)

    @property
    def mean(self) -> Tensor:
        axis = self._component_axis
        clipped = self.scale * (F.softplus(self.loc / self.scale) - F.softplus((self.loc - 1) / self.scale))
        return (F.softmax(self.logits, axis) * clipped).sum(axis)


class DiscretizedLogisticLikelihood(nn.Module):
    """8-bit pixels ``k / 255`` (see :class:`DiscretizedLogistic`): a logistic per value (``components=1``), or a
    mixture of ``components`` logistics per value, with every parameter from the decoder.

    The decoder gives ``(..., P * C, H, W)`` with ``P = outputs_per_value``: for each channel the locations
    (on the ``[0, 1]`` scale), then the raw scales (``softplus(raw) + 1e-5``), then, for a mixture, the mixture
    logits, ``K`` of each. Data must be ``uint8 / 255`` (:data:`eight_bit`): other values are refused.
    """

    support = eight_bit

    def __init__(self, components: int = 1):
        super().__init__()
        if isinstance(components, bool) or not isinstance(components, int) or components <= 0:
            raise InputError(f"components must be a positive integer, got {components!r}")
        self.components = components

    @property
    def outputs_per_value(self) -> int:
        """Decoder outputs per observed value: location and scale of each component, and its weight in a mixture."""
        return 2 if self.components == 1 else 3 * self.components

    def forward(self, out: Tensor) -> DiscretizedLogistic:
        per_value, k = self.outputs_per_value, self.components
        if out.dim() < IMAGE_DIMS or out.shape[-IMAGE_DIMS] % per_value:
            raise InputError(
                f"a discretized logistic with {k} component(s) takes {per_value} decoder channels per image channel, got decoder output "
                f"{tuple(out.shape)}; build the decoder with build_decoder(network, outputs_per_value={per_value})"
            )
        params = out.unflatten(-IMAGE_DIMS, (per_value, out.shape[-IMAGE_DIMS] // per_value))  # (..., P, C, H, W)
        loc, raw_scale = params[..., :k, :, :, :], params[..., k : 2 * k, :, :, :]
        logits = params[..., 2 * k :, :, :, :] if k > 1 else None
        return DiscretizedLogistic(loc, F.softplus(raw_scale) + MIN_LOGISTIC_SCALE, logits, event_dim=IMAGE_DIMS)


#: the mixture's components in the registry's ``"discretized_logistic_mixture"`` (Salimans et al. used 5 to 10)
MIXTURE_COMPONENTS = 5

LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "normal": NormalLikelihood,
    "laplace": LaplaceLikelihood,
    "discretized_logistic": DiscretizedLogisticLikelihood,
    "discretized_logistic_mixture": functools.partial(DiscretizedLogisticLikelihood, components=MIXTURE_COMPONENTS),
}


def outputs_per_value(likelihood) -> int:
    """How many decoder outputs ``likelihood`` takes per observed value: its ``outputs_per_value``, else 1."""
    return getattr(likelihood, "outputs_per_value", 1)


def make_likelihood(name: str) -> nn.Module:
    """The built-in likelihood called ``name`` (one of :data:`LIKELIHOODS`), with its defaults."""
    if name not in LIKELIHOODS:
        raise InputError(f"unknown likelihood {name!r}; choose from {sorted(LIKELIHOODS)} or pass your own callable")
    return LIKELIHOODS[name]()


#: The largest magnitude of an observed value: beyond it the networks' activations and the squared
#: errors of a Normal likelihood overflow float32 (found by the property tests at 1e30), so the
#: loss would be NaN instead of a clear error. Images in [0, 1] or standardised data are far inside.
MAX_ABS_OBSERVATION = 1e6


def check_observations(x: Tensor, event_shape: tuple[int, ...], support=None) -> None:
    """Raise :class:`~pyrovae.errors.InputError` unless ``x`` is a float batch ``(B, *event_shape)`` of finite values in ``support``
    and no larger in magnitude than :data:`MAX_ABS_OBSERVATION`."""
    if not isinstance(x, Tensor):
        raise InputError(f"expected a tensor of images of shape (B, {', '.join(map(str, event_shape))}), got {type(x).__name__}")
    if tuple(x.shape[1:]) != tuple(event_shape) or x.dim() != len(event_shape) + 1:
        raise InputError(f"expected images of shape (B, {', '.join(map(str, event_shape))}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("the batch is empty")
    if not x.is_floating_point():
        raise InputError(f"expected floating-point images (scale integers to [0, 1] first), got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise InputError("the images contain NaN or Inf values")
    if bool((x.abs() > MAX_ABS_OBSERVATION).any()):
        raise InputError(
            f"the images have values as large as {x.abs().max().item():g}, beyond {MAX_ABS_OBSERVATION:g}, where the networks "
            "overflow; scale pixels to [0, 1] or standardise the data"
        )
    if support is not None and not bool(support.check(x).all()):
        lo, hi = x.min().item(), x.max().item()
        raise InputError(
            f"the images have values in [{lo:g}, {hi:g}], outside the likelihood's support {support}; "
            "scale pixels to [0, 1], binarize them, or choose another likelihood"
        )
