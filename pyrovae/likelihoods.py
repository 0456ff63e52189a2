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
"""

from __future__ import annotations

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
    "LIKELIHOODS",
    "make_likelihood",
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


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "continuous_bernoulli": ContinuousBernoulliLikelihood,
    "normal": NormalLikelihood,
    "laplace": LaplaceLikelihood,
}


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
